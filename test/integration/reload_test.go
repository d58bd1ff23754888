package integration

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/state"
)

// rewrite replaces the configuration file at path with these rules (and
// head, YAML keys before them).
func rewrite(t *testing.T, path, head string, lines ...string) {
	t.Helper()
	var b strings.Builder
	b.WriteString(head)
	b.WriteString("rules:\n")
	for _, l := range lines {
		fmt.Fprintf(&b, "  - %s\n", l)
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
}

// hup sends SIGHUP and waits for the reload's log line s, the n-th time it
// appears.
func hup(t *testing.T, d *liveDaemon, s string, n int) {
	t.Helper()
	d.cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, 5*time.Second, "log line "+s, func() bool { return strings.Count(d.stderr.String(), s) >= n })
}

func wantTable(t *testing.T, d *liveDaemon, gen uint64, want ...string) {
	t.Helper()
	if g, ls := d.list(); g != gen || !slices.Equal(ls, want) {
		t.Fatalf("table: generation %d %q, want %d %q", g, ls, gen, want)
	}
}

// SIGHUP re-reads the file: a good one is committed (its kept socket the
// same by inode) and saved with the new file's digest; a bad one is
// refused and the old table serves; one whose port is taken is rolled
// back, the old table serving on the same sockets. log.level changes
// live; loops is reported as needing a restart.
func TestReloadSIGHUP(t *testing.T) {
	base := freeRange(t, 3)
	cfg := stateConfig(t, "r.yaml", fwd(base))
	dir := filepath.Join(t.TempDir(), "state")
	d := startStateful(t, cfg, "--state", dir)
	before := d.listenInodes()

	rewrite(t, cfg, "", fwd(base), fwd(base+1))
	hup(t, d, "reload: committed", 1)
	wantTable(t, d, 2, fwd(base), fwd(base+1))
	after := d.listenInodes()
	if after[base] != before[base] || after[base+1] == "" {
		t.Fatalf("sockets: before %v, after %v", before, after)
	}

	// A file that does not validate: refused with its line, nothing changed.
	os.WriteFile(cfg, []byte("rules:\n  - tcp 127.0.0.1:99999 -> 127.0.0.1:9\n"), 0o644)
	hup(t, d, "reload: the configuration file is not applied", 1)
	if !strings.Contains(d.stderr.String(), ":2:") {
		t.Errorf("the bad file's line is not named:\n%s", tail(d.stderr.String(), 2000))
	}
	wantTable(t, d, 2, fwd(base), fwd(base+1))

	// A port taken by another process: rolled back, the old sockets serve.
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", base+2))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	rewrite(t, cfg, "", fwd(base), fwd(base+2))
	hup(t, d, "reload: verdict bad, rolled back", 1)
	wantTable(t, d, 2, fwd(base), fwd(base+1))
	if now := d.listenInodes(); len(now) != 2 || now[base] != after[base] || now[base+1] != after[base+1] {
		t.Fatalf("sockets after the rollback %v, before %v", now, after)
	}
	if !d.tcpServes(base) || !d.tcpServes(base+1) {
		t.Fatal("the old table does not serve after the rolled-back reload")
	}

	// log.level live; loops and busy-poll need a restart.
	ln.Close()
	rewrite(t, cfg, "loops: 3\nbusy-poll: 200us\nlog: {level: debug}\n", fwd(base), fwd(base+2))
	hup(t, d, "reload: committed", 2)
	wantLog(t, d, "loops changed in the file (0 -> 3): needs a restart")
	wantLog(t, d, "busy-poll changed in the file (0s -> 200µs): needs a restart")
	wantLog(t, d, "reload: log level changed")
	wantTable(t, d, 3, fwd(base), fwd(base+2))
	es, _, err := mustOpen(t, dir).History(0)
	if err != nil || len(es) != 3 || es[2].Who.Name != "reload (SIGHUP)" || !slices.Equal(es[2].Added, []string{fwd(base + 2)}) {
		t.Fatalf("history %+v, %v", es, err)
	}
	d.stop(5 * time.Second)
	// Saved with the new file's digest: the next start resumes it.
	d = startStateful(t, cfg, "--state", dir)
	wantLog(t, d, "resuming generation 3 saved at")
}

// tcpServes reports whether a connection to 127.0.0.1:port is accepted.
func (d *liveDaemon) tcpServes(port int) bool {
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 2*time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// `sluice ctl reload` exits as apply does: 0 committed (or nothing to
// change), 2 the file is invalid, 3 rolled back (with the bind failures),
// 4 busy; a key that needs a restart is printed.
func TestCtlReload(t *testing.T) {
	base := freeRange(t, 3)
	cfg := stateConfig(t, "c.yaml", fwd(base))
	d := startStateful(t, cfg)
	if code, out, errs := d.cli("reload"); code != 0 || !strings.Contains(out, "nothing applied") {
		t.Fatalf("reload unchanged: %d %q %s", code, out, errs)
	}
	rewrite(t, cfg, "loops: 2\n", fwd(base), fwd(base+1))
	code, out, errs := d.cli("reload")
	if code != 0 || !strings.Contains(out, "committed generation 2") || !strings.Contains(out, "loops changed in the file (0 -> 2): needs a restart") {
		t.Fatalf("reload: %d %q %s", code, out, errs)
	}
	os.WriteFile(cfg, []byte("rules:\n  - tcp 127.0.0.1:99999 -> 127.0.0.1:9\n"), 0o644)
	if code, out, errs := d.cli("reload"); code != 2 || !strings.Contains(errs, ":2:") {
		t.Fatalf("reload bad file: %d %q %q", code, out, errs)
	}
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", base+2))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	rewrite(t, cfg, "", fwd(base), fwd(base+2))
	code, out, errs = d.cli("reload")
	if code != 3 || !strings.Contains(out, fmt.Sprintf("port %d: address already in use", base+2)) || !strings.Contains(out, "rolled back") {
		t.Fatalf("reload port taken: %d %q %q", code, out, errs)
	}
	wantTable(t, d, 2, fwd(base), fwd(base+1))
	ctx, cancel := ctlCtx()
	defer cancel()
	c, _ := d.write(ctx)
	if code, _, errs := d.cli("reload"); code != 4 {
		t.Fatalf("reload while a writer is open: %d %q", code, errs)
	}
	c.Close()
	// History needs a state dir: a clear error.
	if code, _, errs := d.cli("history"); code != 1 || !strings.Contains(errs, "no state dir") {
		t.Fatalf("history without a state dir: %d %q", code, errs)
	}
}

// `sluice ctl history`: people's lines and --json, -n.
func TestCtlHistory(t *testing.T) {
	base := freeRange(t, 3)
	cfg := stateConfig(t, "h.yaml", fwd(base))
	d := startStateful(t, cfg, "--state", filepath.Join(t.TempDir(), "state"))
	if code, out, errs := d.cli("add", fwd(base+1)); code != 0 {
		t.Fatalf("add: %d %s%s", code, out, errs)
	}
	if code, out, errs := d.cli("apply", writeFile(t, "x.rules", "tcp 127.0.0.1:"+fmt.Sprint(base)+" -> 127.0.0.1:10\n"+fwd(base+2)+"\n")); code != 0 {
		t.Fatalf("apply: %d %s%s", code, out, errs)
	}
	code, out, errs := d.cli("history")
	want := []string{
		"by uid=", "  + " + fwd(base),
		"generation 2", `name="sluice ctl"`, "  + " + fwd(base+1),
		"generation 3", "  - " + fwd(base+1), "  ~ " + fwd(base), "    tcp 127.0.0.1:" + fmt.Sprint(base) + " -> 127.0.0.1:10", "  + " + fwd(base+2),
	}
	at := 0
	for _, w := range want {
		i := strings.Index(out[at:], w)
		if i < 0 {
			t.Fatalf("history: exit %d, no %q after offset %d:\n%s%s", code, w, at, out, errs)
		}
		at += i + len(w)
	}
	code, out, errs = d.cli("history", "-n", "1", "--json")
	var e state.Entry
	if ls := lines(out); code != 0 || len(ls) != 1 || json.Unmarshal([]byte(ls[0]), &e) != nil || e.Generation != 3 || len(e.Changed) != 1 {
		t.Fatalf("history -n 1 --json: %d %q %s", code, out, errs)
	}
}

// --confirm: the transaction outlives its command; others are busy (with
// the time left), status shows it, the state dir keeps the last committed
// table; it rolls back by itself at the deadline with the client gone, is
// confirmed or rolled back from another process, and a SIGTERM rolls it
// back before the daemon stops.
func TestCtlConfirm(t *testing.T) {
	base := freeRange(t, 3)
	cfg := stateConfig(t, "f.yaml", fwd(base))
	dir := filepath.Join(t.TempDir(), "state")
	d := startStateful(t, cfg, "--state", dir)
	saved := func() uint64 {
		tb, err := mustOpen(t, dir).Load()
		if err != nil {
			t.Fatal(err)
		}
		return tb.Generation
	}

	// The deadline, the client gone.
	code, out, errs := d.cli("add", fwd(base+1), "--confirm", "1500ms")
	if code != 0 || !strings.Contains(out, "pending: generation 2 rolls back by itself") {
		t.Fatalf("add --confirm: %d %q %s", code, out, errs)
	}
	if !d.listening()[base+1] {
		t.Fatal("the pending apply's port does not listen")
	}
	if code, _, errs := d.cli("add", fwd(base+2)); code != 4 || !strings.Contains(errs, "commit-confirmed transaction is pending (generation 2") || !strings.Contains(errs, "rolls back by itself in") {
		t.Fatalf("a writer meanwhile: %d %q", code, errs)
	}
	if code, out, _ := d.cli("status"); code != 0 || !strings.Contains(out, "commit-confirmed transaction is pending: generation 2 rolls back in") {
		t.Fatalf("status: %d %s", code, out)
	}
	if g := saved(); g != 1 {
		t.Fatalf("the state dir holds generation %d while the confirm is pending", g)
	}
	waitFor(t, 5*time.Second, "the rollback at the deadline", func() bool { return !d.listening()[base+1] })
	wantLog(t, d, "the confirm deadline passed")
	wantTable(t, d, 1, fwd(base))

	// confirm from another process.
	if code, out, errs := d.cli("add", fwd(base+1), "--confirm", "1m"); code != 0 {
		t.Fatalf("add --confirm: %d %q %s", code, out, errs)
	}
	if code, out, errs := d.cli("confirm"); code != 0 || !strings.Contains(out, "committed generation 2") {
		t.Fatalf("confirm: %d %q %s", code, out, errs)
	}
	wantTable(t, d, 2, fwd(base), fwd(base+1))
	if g := saved(); g != 2 {
		t.Fatalf("the confirmed commit is not saved: generation %d", g)
	}
	if code, _, errs := d.cli("confirm"); code != 1 || !strings.Contains(errs, "no commit-confirmed transaction is pending") {
		t.Fatalf("confirm with none pending: %d %q", code, errs)
	}

	// rollback from another process.
	if code, out, errs := d.cli("del", fwd(base+1), "--confirm", "1m"); code != 0 {
		t.Fatalf("del --confirm: %d %q %s", code, out, errs)
	}
	if code, out, errs := d.cli("rollback"); code != 0 || !strings.Contains(out, "generation 2 is active") {
		t.Fatalf("rollback: %d %q %s", code, out, errs)
	}
	wantTable(t, d, 2, fwd(base), fwd(base+1))

	// A SIGTERM during a pending confirm rolls it back first.
	if code, out, errs := d.cli("add", fwd(base+2), "--confirm", "1m"); code != 0 {
		t.Fatalf("add --confirm: %d %q %s", code, out, errs)
	}
	d.stop(10 * time.Second)
	rb, drained := -1, -1
	for i, l := range lines(d.stderr.String()) {
		switch {
		case strings.Contains(l, "table rolled back") && strings.Contains(l, "the daemon is stopping"):
			rb = i
		case strings.Contains(l, "engine stopped") || strings.HasSuffix(l, "\tstopped"):
			drained = i
		}
	}
	if rb < 0 || drained < rb {
		t.Fatalf("no rollback before the drain's end (lines %d, %d):\n%s", rb, drained, tail(d.stderr.String(), 3000))
	}
	d = startStateful(t, cfg, "--state", dir)
	wantLog(t, d, "resuming generation 2 saved at")
	wantTable(t, d, 2, fwd(base), fwd(base+1))
}
