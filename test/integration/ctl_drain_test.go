package integration

import (
	"encoding/json"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/ctl"
)

// ctlStatusJSON runs `sluice ctl status --json` and decodes it.
func (d *liveDaemon) ctlStatusJSON() map[string]any {
	d.t.Helper()
	code, out, errs := d.cli("status", "--json")
	var m map[string]any
	if err := json.Unmarshal([]byte(out), &m); code != 0 || err != nil {
		d.t.Fatalf("ctl status --json: exit %d, %v\n%s%s", code, err, out, errs)
	}
	return m
}

// wantLine fails unless out has a line KEY, blanks, VALUE (ctl status's
// table).
func wantLine(t *testing.T, what, out, key, valueRE string) {
	t.Helper()
	if !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(key) + `\s{2,}` + valueRE + `$`).MatchString(out) {
		t.Errorf("%s: no line %q %q in\n%s", what, key, valueRE, out)
	}
}

// Issue 23: ctl status tells the daemon's version (as `sluice version`
// prints it), pid and uptime; during the drain (SIGTERM, drain 1m) the
// read-only verbs still answer — status says draining, sessions lists the
// session that holds the stop up — while ctl add is refused with the
// numbered code draining; the session forwards on, and the process exits as
// soon as it ends, long before the drain deadline.
func TestCtlDuringDrain(t *testing.T) {
	b := hashBackend(t)
	port, other := freePort(t), freePort(t)
	rule := fmt.Sprintf("tcp 127.0.0.1:%d -> %s", port, b.Addr())
	before := time.Now()
	cfg := writeFile(t, "drain.yaml", "log: {level: info}\ndrain: 1m\nrules:\n  - "+rule+"\n")
	d := &liveDaemon{daemon: startDaemon(t, forwardOpts{}, "run", "-c", cfg), t: t}
	d.sock = d.Ctl
	d.waitListening(fmt.Sprintf("127.0.0.1:%d", port))
	d.waitCtl()
	pid := d.cmd.Process.Pid

	// The process, serving.
	code, vout, verr := runSluice(t, "version")
	version := strings.TrimPrefix(strings.TrimSpace(vout), "sluice ")
	if code != 0 || version == "" {
		t.Fatalf("sluice version: exit %d %q %q", code, vout, verr)
	}
	time.Sleep(1100 * time.Millisecond) // an uptime of a second at least
	code, out, errs := d.cli("status")
	if code != 0 {
		t.Fatalf("ctl status: exit %d\n%s%s", code, out, errs)
	}
	wantLine(t, "ctl status", out, "version", regexp.QuoteMeta(version))
	wantLine(t, "ctl status", out, "pid", strconv.Itoa(pid))
	wantLine(t, "ctl status", out, "uptime", `[1-9][0-9]*s \(since \S+Z\)`)
	wantLine(t, "ctl status", out, "state", "serving")
	wantLine(t, "ctl status", out, "protocol", "version "+strconv.Itoa(int(ctl.MaxVersion)))
	st := d.ctlStatusJSON()
	started, err := time.Parse(time.RFC3339Nano, fmt.Sprint(st["started"]))
	if st["version"] != version || st["pid"] != float64(pid) || st["state"] != "serving" || err != nil ||
		started.Before(before.Add(-time.Second)) || started.After(time.Now()) {
		t.Errorf("ctl status --json: %v (started: %v)", st, err)
	}
	if up, _ := st["uptime_ms"].(float64); up < 1000 || up > float64(time.Since(before).Milliseconds()) {
		t.Errorf("ctl status --json: uptime_ms %v, want from 1000 to %d", st["uptime_ms"], time.Since(before).Milliseconds())
	}

	// A live session, mid-stream, then the stop.
	ps := startPaced(t, fmt.Sprintf("127.0.0.1:%d", port), 4, 7)
	waitFor(t, 5*time.Second, "the session to reach its backend", func() bool { return b.Conns() == 1 })
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "ctl status to say draining", func() bool {
		st, err := d.tryStatus()
		return err == nil && st.State == ctl.StateDraining
	})

	code, out, errs = d.cli("status")
	if code != 0 {
		t.Fatalf("ctl status while draining: exit %d\n%s%s", code, out, errs)
	}
	wantLine(t, "ctl status while draining", out, "state", `draining: stopping, [0-9m]+s left of the drain deadline; .*`)
	wantLine(t, "ctl status while draining", out, "sessions", "1")
	wantLine(t, "ctl status while draining", out, "pid", strconv.Itoa(pid))
	st = d.ctlStatusJSON()
	if left, _ := st["drain_left_ms"].(float64); st["state"] != "draining" || left <= 30000 || left > 60000 {
		t.Errorf("ctl status --json while draining: %v", st)
	}
	code, out, errs = d.cli("sessions")
	if code != 0 || !strings.Contains(out, fmt.Sprintf("tcp 127.0.0.1:%d", port)) || !strings.Contains(out, b.Addr()) {
		t.Errorf("ctl sessions while draining: exit %d, want the live session\n%s%s", code, out, errs)
	}
	code, out, errs = d.cli("stats")
	if code != 0 || !regexp.MustCompile(`(?m)^draining\s+1$`).MatchString(out) {
		t.Errorf("ctl stats while draining: exit %d, want draining 1\n%s%s", code, out, errs)
	}
	code, out, errs = d.cli("list")
	if code != 0 || !strings.Contains(out, rule) {
		t.Errorf("ctl list while draining: exit %d\n%s%s", code, out, errs)
	}
	code, out, errs = d.cli("add", fmt.Sprintf("tcp 127.0.0.1:%d -> %s", other, b.Addr()))
	if code != 1 || !strings.Contains(errs, "draining") {
		t.Errorf("ctl add while draining: exit %d, want 1 and draining\n%s%s", code, out, errs)
	}
	func() {
		ctx, cancel := ctlCtx()
		defer cancel()
		c, err := ctl.Dial(ctx, d.sock, ctl.Options{Name: "it-drain"})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.Hello(ctx, ctl.IntentWrite); ctl.CodeOf(err) != ctl.CodeDraining {
			t.Errorf("a writer while draining: %v, want code %d draining", err, ctl.CodeDraining)
		}
	}()

	// The session forwards on, every byte checked; once it ends the
	// process exits, long before the minute of the drain.
	ended := time.Now()
	if err := ps.finish(); err != nil {
		t.Fatalf("the session during the drain: %v", err)
	}
	select {
	case <-d.done:
		if d.err != nil {
			t.Fatalf("exit: %v\n%s", d.err, tail(d.stderr.String(), 3000))
		}
	case <-time.After(15 * time.Second):
		t.Fatalf("still running 15 s after its last session ended\n%s", tail(d.stderr.String(), 3000))
	}
	t.Logf("exited %v after the last session ended", time.Since(ended).Round(time.Millisecond))
	if logs := d.stderr.String(); !strings.Contains(logs, "control socket read-only while the daemon drains") {
		t.Errorf("no read-only line in the log:\n%s", tail(logs, 3000))
	}
}
