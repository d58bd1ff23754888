package integration

import (
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// writeFile writes content to name in a test directory and returns the path
// relative to the test's working directory, as a user would type it: the
// messages must show the path as given.
func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	abs := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(abs, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	rel, err := filepath.Rel(wd, abs)
	if err != nil {
		t.Fatal(err)
	}
	return rel
}

// absPath makes a path given relative to the test's directory absolute, for
// programs that resolve relative paths elsewhere (nginx, against its prefix).
func absPath(t *testing.T, path string) string {
	t.Helper()
	abs, err := filepath.Abs(path)
	if err != nil {
		t.Fatal(err)
	}
	return abs
}

// lines splits output into its non-empty lines.
func lines(s string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if l != "" {
			out = append(out, l)
		}
	}
	return out
}

// `sluice check`: a good file exits 0 with a summary; a bad one exits 2 and
// lists every error as FILE:LINE: message, the path as given; bad usage
// exits 2.
func TestConfigCheck(t *testing.T) {
	good := writeFile(t, "good.yaml", `loops: 2
log: {level: warn, format: json}
ctl: {socket: /run/sluice/ctl.sock}
metrics: {listen: 127.0.0.1:9901}
drain: 3s
pifs:
  - {name: ns1, netns: /run/netns/ns1}
rules:
  - tcp 0.0.0.0:8080 -> 127.0.0.1:80 send-proxy=v2
  - tcp 0.0.0.0:8081 health=http
  - tcp ns1/127.0.0.1:9000-9009 -> 127.0.0.1:7000-7009
  - udp [::]:5353 -> [::1]:53
`)
	bad := writeFile(t, "bad.yaml", `loops: many
log: {level: loud}
colour: blue
pifs:
  - {name: host, netns: /x}
rules:
  - tcp 0.0.0.0:9000-8000 -> 127.0.0.1:80
  - tcp 0.0.0.0:8080 -> 127.0.0.1:80
  - tcp 127.0.0.1:8080 -> 127.0.0.1:81
  - tcp ns2/0.0.0.0:80 -> 127.0.0.1:80
  - tcp 0.0.0.0:81 -> 127.0.0.1:80 frobnicate
`)
	goodRules := writeFile(t, "good.rules", "# a comment\ntcp 0.0.0.0:8000-8099 -> 127.0.0.1:9000-9099\n\ntcp 0.0.0.0:8443 -> 127.0.0.1:443 weak\n")
	badRules := writeFile(t, "bad.rules", "tcp 0.0.0.0:80 -> 127.0.0.1:80\ntcp 0.0.0.0:80 -> 127.0.0.1:81\nsctp 0.0.0.0:1 -> 1.2.3.4:1\n")
	syntax := writeFile(t, "syntax.yaml", "loops: 1\nrules: [\n")
	// Control socket places run refuses: a directory open to others, a
	// missing directory whose parent is missing too.
	openDir := filepath.Join(t.TempDir(), "open")
	if err := os.Mkdir(openDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(openDir, 0o755); err != nil {
		t.Fatal(err)
	}
	openSock := writeFile(t, "open.yaml", "ctl: {socket: "+openDir+"/ctl.sock}\n")
	deepDir := filepath.Join(t.TempDir(), "a", "b")
	deepSock := writeFile(t, "deep.yaml", "ctl: {socket: "+deepDir+"/ctl.sock}\n")
	for _, tc := range []struct {
		name   string
		args   []string
		code   int
		stdout []string // exactly these lines
		stderr []string // exactly these lines, or, with stderrHas, lines containing these
		has    bool
	}{
		{"good config", []string{"check", "-c", good}, 0, []string{good + ": ok: 4 rules, 13 listen ports, 1 pif"}, nil, false},
		{"good rules", []string{"check", "-r", goodRules}, 0, []string{goodRules + ": ok: 2 rules, 101 listen ports"}, nil, false},
		{"bad config", []string{"check", "-c", bad}, 2, nil, []string{
			bad + `:1: loops: want a whole number from 0 (one per CPU) to 1024, got "many"`,
			bad + `:2: log.level: want debug, info, warn or error, got "loud"`,
			bad + `:3: unknown key "colour": want loops, busy-poll, log, ctl, metrics, state, store, drain, pifs or rules`,
			bad + `:5: pif name "host" is reserved for the daemon's own network namespace`,
			bad + `:7: port range 9000-8000 is reversed`,
			bad + `:9: listen tcp 127.0.0.1:8080 overlaps line 8 (tcp 0.0.0.0:8080): a wildcard and a specific address cannot share port 8080`,
			bad + `:10: unknown pif "ns2"`,
			bad + `:11: unknown option "frobnicate"`,
		}, false},
		{"bad rules", []string{"check", "-r", badRules}, 2, nil, []string{
			badRules + `:2: listen tcp 0.0.0.0:80 is also line 1's`,
			badRules + `:3: unknown protocol "sctp": want tcp or udp`,
		}, false},
		{"yaml syntax", []string{"check", "-c", syntax}, 2, nil, []string{syntax + ":2: YAML: did not find expected node content"}, false},
		{"a rules file as config", []string{"check", "-c", goodRules}, 2, nil, []string{goodRules + `:2: want a mapping of loops, busy-poll, log, ctl, metrics, state, store, drain, pifs, rules, got "tcp 0.0.0.0:8000-8099 -> 127.0.0.1:9000-9099"...`}, true},
		{"no file", []string{"check"}, 2, nil, []string{"want one of -c FILE or -r RULESFILE"}, true},
		{"both files", []string{"check", "-c", good, "-r", goodRules}, 2, nil, []string{"want one of -c FILE or -r RULESFILE"}, true},
		{"extra argument", []string{"check", "-c", good, "more"}, 2, nil, []string{`unexpected argument "more"`}, true},
		{"missing config", []string{"check", "-c", "no/such.yaml"}, 2, nil, []string{"no/such.yaml", "no such file"}, true},
		{"missing rules", []string{"check", "-r", "no/such.rules"}, 2, nil, []string{"no/such.rules", "no such file"}, true},
		{"unknown flag", []string{"check", "-x"}, 2, nil, []string{"-x"}, true},
		{"ctl.socket directory open", []string{"check", "-c", openSock}, 2, nil, []string{openSock + ": ctl.socket " + openDir + "/ctl.sock", "mode 0755", "0700"}, true},
		{"ctl.socket directory tree missing", []string{"check", "-c", deepSock}, 2, nil, []string{"ctl socket directory " + deepDir + " is missing and so is its parent", "only the last directory"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, stdout, stderr := runSluice(t, tc.args...)
			if code != tc.code {
				t.Errorf("sluice %s: exit %d, want %d\nstdout:\n%s\nstderr:\n%s", strings.Join(tc.args, " "), code, tc.code, stdout, stderr)
			}
			if got := lines(stdout); strings.Join(got, "\n") != strings.Join(tc.stdout, "\n") {
				t.Errorf("stdout:\n%s\nwant:\n%s", stdout, strings.Join(tc.stdout, "\n"))
			}
			if tc.has {
				for _, w := range tc.stderr {
					if !strings.Contains(stderr, w) {
						t.Errorf("stderr does not mention %q:\n%s", w, stderr)
					}
				}
			} else if got := lines(stderr); strings.Join(got, "\n") != strings.Join(tc.stderr, "\n") {
				t.Errorf("stderr:\n%s\nwant:\n%s", stderr, strings.Join(tc.stderr, "\n"))
			}
		})
	}
}

// `sluice run -c` refuses a file that does not validate (exit 2, every
// error listed) and fails at start (exit 1, naming the file's line or the
// address) on what the system refuses.
func TestConfigRunRefuses(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	backend := hashBackend(t)
	listen := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	bad := writeFile(t, "bad.yaml", "loops: -1\nrules:\n  - tcp 0.0.0.0:80\n")
	portTaken := writeFile(t, "taken.yaml", fmt.Sprintf("rules:\n  - tcp %s -> %s\n  - tcp %s -> %s\n", listen, backend.Addr(), taken.Addr(), backend.Addr()))
	metricsTaken := writeFile(t, "metrics.yaml", fmt.Sprintf("metrics: {listen: %q}\nrules:\n  - tcp %s -> %s\n", taken.Addr(), listen, backend.Addr()))
	noNetns := writeFile(t, "pif.yaml", "pifs:\n  - {name: gone, netns: /nonexistent/netns/gone}\n")
	openDir := filepath.Join(t.TempDir(), "open")
	if err := os.Mkdir(openDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(openDir, 0o755); err != nil {
		t.Fatal(err)
	}
	openSock := writeFile(t, "open.yaml", fmt.Sprintf("ctl: {socket: %s/ctl.sock}\nrules:\n  - tcp %s -> %s\n", openDir, listen, backend.Addr()))
	deepDir := filepath.Join(t.TempDir(), "a", "b")
	deepSock := writeFile(t, "deep.yaml", fmt.Sprintf("ctl: {socket: %s/ctl.sock}\nrules:\n  - tcp %s -> %s\n", deepDir, listen, backend.Addr()))
	for _, tc := range []struct {
		name string
		args []string
		code int
		want []string
		not  []string // in no line of stderr
	}{
		{"invalid", []string{"run", "-c", bad}, 2, []string{
			bad + ":1: loops: want a whole number from 0 (one per CPU) to 1024, got \"-1\"\n",
			bad + `:3: no target: give "-> TARGET", or health=tcp|http for a rule that answers probes itself` + "\n"}, nil},
		{"missing", []string{"run", "-c", "no/such.yaml"}, 2, []string{"no/such.yaml: no such file"}, nil},
		{"extra argument", []string{"run", "-c", bad, "more"}, 2, []string{`unexpected argument "more"`}, nil},
		{"port taken", []string{"run", "-c", portTaken}, 1, []string{portTaken + ":3: tcp " + taken.Addr().String(), "address already in use"}, nil},
		{"metrics port taken", []string{"run", "-c", metricsTaken}, 1, []string{"metrics listen " + taken.Addr().String(), "address already in use"}, nil},
		{"netns missing", []string{"run", "-c", noNetns}, 1, []string{noNetns + ":2: pif gone (netns /nonexistent/netns/gone)"}, nil},
		{"ctl.socket directory open", []string{"run", "-c", openSock}, 1, []string{"control socket: ctl socket directory " + openDir + " has mode 0755"}, []string{"stop the daemon"}},
		{"ctl.socket directory tree missing", []string{"run", "-c", deepSock}, 1, []string{"only the last directory"}, []string{"stop the daemon"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, stderr := runSluice(t, append(tc.args, "--log-level", "error")...)
			if code != tc.code {
				t.Errorf("exit %d, want %d\n%s", code, tc.code, stderr)
			}
			for _, w := range tc.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("stderr does not mention %q:\n%s", w, stderr)
				}
			}
			for _, w := range tc.not {
				if strings.Contains(stderr, w) {
					t.Errorf("stderr says %q:\n%s", w, stderr)
				}
			}
		})
	}
	if _, err := os.Stat(deepDir); err == nil {
		t.Errorf("run made the directory tree %s", deepDir)
	}
	// Nothing was left listening by the run that failed on its second rule.
	if c, err := net.DialTimeout("tcp", listen, time.Second); err == nil {
		c.Close()
		t.Errorf("%s still accepts after sluice exited", listen)
	}
}

// freeRange returns n consecutive loopback ports, free a moment ago, below
// the kernel's ephemeral range (ip_local_port_range, 32768 by default), so
// that no outgoing connection of a busy test takes one of them as its local
// port between a rule's listener closing and the next bind of it.
func freeRange(t *testing.T, n int) int {
	t.Helper()
	for try := 0; try < 100; try++ {
		base := 10000 + rand.IntN(22000-n)
		var lns []net.Listener
		for p := base; p < base+n; p++ {
			ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
			if err != nil {
				break
			}
			lns = append(lns, ln)
		}
		for _, ln := range lns {
			ln.Close()
		}
		if len(lns) == n {
			return base
		}
	}
	t.Fatalf("no %d consecutive free ports", n)
	return 0
}

// `sluice run -c FILE` serves a table of two TCP rules with port ranges:
// a range to one port, and a range to a range of the same length, where
// listen port i goes to target port i. Every session is byte-exact.
func TestConfigRunRanges(t *testing.T) {
	const n = 3
	one := hashBackend(t)
	tbase := freeRange(t, n)
	var many []*testpeer.Backend
	for i := range n {
		b, err := testpeer.Listen(fmt.Sprintf("127.0.0.1:%d", tbase+i))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(b.Close)
		many = append(many, b)
	}
	p := freeRange(t, n)
	r := freeRange(t, n)
	for r < p+n && p < r+n { // the picks overlap
		r = freeRange(t, n)
	}
	file := writeFile(t, "ranges.yaml", fmt.Sprintf(`# two rules with port ranges
loops: 2
log: {level: warn}
rules:
  - tcp 127.0.0.1:%d-%d -> %s
  - tcp 127.0.0.1:%d-%d -> 127.0.0.1:%d-%d splice=on
`, p, p+n-1, one.Addr(), r, r+n-1, tbase, tbase+n-1))
	d := startDaemon(t, forwardOpts{}, "run", "-c", file)
	for i := range n {
		d.waitListening(fmt.Sprintf("127.0.0.1:%d", p+i))
		d.waitListening(fmt.Sprintf("127.0.0.1:%d", r+i))
	}
	exchange := func(port int, seed uint64) {
		t.Helper()
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := testpeer.Exchange(c, 300<<10, 1<<20, seed); err != nil {
			t.Fatalf("port %d: %v\n%s", port, err, d.stderr.String())
		}
	}
	served := func(b *testpeer.Backend) int64 { return b.Served.Load() }
	for i := range n {
		exchange(p+i, uint64(i))
		exchange(r+i, uint64(10+i))
		waitFor(t, 5*time.Second, "backends to finish", func() bool {
			return served(one) == int64(i+1) && served(many[i]) == 1
		})
		for j := i + 1; j < n; j++ {
			if served(many[j]) != 0 {
				t.Fatalf("listen port %d reached target port %d", r+i, tbase+j)
			}
		}
	}
	if err := d.stop(5 * time.Second); err != nil {
		t.Errorf("stop: %v (want exit 0)\n%s", err, d.stderr.String())
	}
	for _, b := range append(many, one) {
		if b.Failures.Load() != 0 {
			t.Errorf("a backend saw a failed exchange: %v", b.LastErr.Load())
		}
	}
}

// Graceful stop, with the deadline from the file's drain key: a transfer in
// flight at SIGTERM completes, new connections are refused, and the daemon
// exits 0 once it is done, well before the deadline. A session that does
// not end is closed at the deadline (the file's, or --drain-timeout's, which
// overrides it), and the daemon still exits 0.
func TestConfigRunGracefulStop(t *testing.T) {
	start := func(t *testing.T, drain string, flags ...string) (*daemon, string, *testpeer.Backend) {
		b := hashBackend(t)
		addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
		file := writeFile(t, "drain.yaml", fmt.Sprintf("log: {level: warn}\ndrain: %s\nrules:\n  - tcp %s -> %s\n", drain, addr, b.Addr()))
		d := startDaemon(t, forwardOpts{}, append([]string{"run", "-c", file}, flags...)...)
		d.waitListening(addr)
		return d, addr, b
	}
	wait := func(t *testing.T, d *daemon, limit time.Duration) (error, time.Time) {
		t.Helper()
		select {
		case err := <-d.exited:
			d.exited <- err
			return err, time.Now()
		case <-time.After(limit):
			t.Fatalf("sluice still running %v after SIGTERM\n%s", limit, d.stderr.String())
			return nil, time.Time{}
		}
	}

	t.Run("transfer completes", func(t *testing.T) {
		d, addr, b := start(t, "20s")
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		done := make(chan error, 1)
		var finished time.Time
		go func() {
			// 16 MiB down, not read for the first 1.5 s: the session is
			// still moving bytes when SIGTERM comes.
			err := testpeer.ExchangeSlow(c, 4<<20, 16<<20, 99, 1500*time.Millisecond)
			finished = time.Now()
			done <- err
		}()
		// Accepted and forwarding, not only queued (SIGTERM resets what
		// still waits in the accept queue).
		waitFor(t, 5*time.Second, "the session to reach the backend", func() bool { return b.Conns() == 1 })
		select {
		case err := <-done:
			t.Fatalf("the transfer ended before SIGTERM: %v", err)
		default:
		}
		sent := time.Now()
		d.cmd.Process.Signal(syscall.SIGTERM)
		// Stop accepting: a new client is refused while the old one drains.
		waitFor(t, 2*time.Second, "the listener to close", func() bool {
			c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
			if err == nil {
				c.Close()
				return false
			}
			return true
		})
		if err := <-done; err != nil {
			t.Fatalf("transfer in flight at SIGTERM: %v\n%s", err, d.stderr.String())
		}
		err, exited := wait(t, d, 15*time.Second)
		if err != nil {
			t.Fatalf("exit: %v (want 0)\n%s", err, d.stderr.String())
		}
		if exited.Before(finished) {
			t.Errorf("sluice exited before the transfer finished")
		}
		if took := exited.Sub(sent); took > 10*time.Second {
			t.Errorf("exit %v after SIGTERM; the transfer was done long before", took)
		}
	})

	for _, tc := range []struct {
		name, drain string
		flags       []string
		limit       time.Duration
	}{
		{"file deadline", "1s", nil, time.Second},
		{"flag overrides file", "1m", []string{"--drain-timeout", "1s"}, time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, addr, _ := start(t, tc.drain, tc.flags...)
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			// Ask for a long download and never read it: the session never ends.
			var hdr [16]byte
			hdr[0], hdr[7] = 0, 1 // 2^56 bytes
			if _, err := c.Write(hdr[:]); err != nil {
				t.Fatal(err)
			}
			// One byte of the download proves this session is forwarding,
			// not waiting in sluice's accept queue, where SIGTERM would
			// reset it.
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(c, hdr[:1]); err != nil {
				t.Fatalf("first byte of the download: %v\n%s", err, d.stderr.String())
			}
			c.SetReadDeadline(time.Time{})
			sent := time.Now()
			d.cmd.Process.Signal(syscall.SIGTERM)
			err, exited := wait(t, d, tc.limit+5*time.Second)
			if err != nil {
				t.Fatalf("exit: %v (want 0)\n%s", err, d.stderr.String())
			}
			took := exited.Sub(sent)
			if took < tc.limit-100*time.Millisecond || took > tc.limit+2*time.Second {
				t.Errorf("exited %v after SIGTERM, want about %v", took, tc.limit)
			}
			if !strings.Contains(d.stderr.String(), "drain deadline passed") {
				t.Errorf("no warning that the deadline passed:\n%s", d.stderr.String())
			}
			// The client's session was closed by the deadline.
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.Copy(io.Discard, c); err != nil && !isReset(err) {
				t.Errorf("client after the deadline: %v", err)
			}
		})
	}
}

// isReset reports a connection reset, a way the deadline may end a session.
func isReset(err error) bool {
	return strings.Contains(err.Error(), "connection reset")
}

// metricValue finds a sample's value in a Prometheus text exposition.
func metricValue(text, sample string) (float64, bool) {
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(sample) + ` (\S+)$`)
	m := re.FindStringSubmatch(text)
	if m == nil {
		return 0, false
	}
	v, err := strconv.ParseFloat(m[1], 64)
	return v, err == nil
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(body)
}

// The built-in demo, as a newcomer runs it: `sluice run` prints how to try
// it; the printed curl URL answers through the proxy; the printed metrics
// URL answers and counts that session; SIGTERM stops it with exit 0.
func TestConfigDemo(t *testing.T) {
	d := startDaemon(t, forwardOpts{}, "run")
	tryRe := regexp.MustCompile(`try: +curl (http://\S+/)\n`)
	metricsRe := regexp.MustCompile(`metrics: +curl (http://\S+/metrics)`)
	var try, metrics string
	waitFor(t, 10*time.Second, "the demo to print how to try it", func() bool {
		out := d.stderr.String()
		if m := tryRe.FindStringSubmatch(out); m != nil {
			try = m[1]
		}
		if m := metricsRe.FindStringSubmatch(out); m != nil {
			metrics = m[1]
		}
		select {
		case err := <-d.exited:
			d.exited <- err
			t.Fatalf("the demo exited: %v\n%s", err, out)
		default:
		}
		return try != "" && metrics != ""
	})
	code, body := httpGet(t, try)
	if code != 200 || !strings.Contains(body, "hello from sluice's demo backend") || !strings.Contains(body, "proxied by sluice") {
		t.Fatalf("GET %s: %d\n%s", try, code, body)
	}
	var text string
	waitFor(t, 5*time.Second, "the session to be counted", func() bool {
		var c int
		c, text = httpGet(t, metrics)
		v, ok := metricValue(text, `sluice_sessions_ended_total{code="1",reason="done"}`)
		return c == 200 && ok && v == 1
	})
	for _, sample := range []string{"sluice_sessions", "sluice_connect_errors_total", `sluice_buffers{state="in_use"}`} {
		if v, ok := metricValue(text, sample); !ok || v != 0 {
			t.Errorf("%s = %v (found %v), want 0\n%s", sample, v, ok, text)
		}
	}
	if v, ok := metricValue(text, "sluice_event_loops"); !ok || v < 1 {
		t.Errorf("sluice_event_loops = %v (found %v)", v, ok)
	}
	code, page := httpGet(t, strings.TrimSuffix(metrics, "metrics"))
	if code != 200 || !strings.Contains(page, "<title>sluice status</title>") || !strings.Contains(page, strings.TrimSuffix(strings.TrimPrefix(try, "http://"), "/")) {
		t.Errorf("status page: %d\n%s", code, page)
	}
	if err := d.stop(10 * time.Second); err != nil {
		t.Errorf("stop: %v (want exit 0)\n%s", err, d.stderr.String())
	}
}
