package integration

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/netnstest"
)

// healthBackend is a real HTTP server: / answers its name, /healthz the
// status the test sets (200 at first).
type healthBackend struct {
	name   string
	addr   string
	status atomic.Int32
	srv    *http.Server
}

func serveHealth(t *testing.T, name string, ln net.Listener) *healthBackend {
	t.Helper()
	b := &healthBackend{name: name, addr: ln.Addr().String()}
	b.status.Store(200)
	b.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/healthz" {
			w.WriteHeader(int(b.status.Load()))
			return
		}
		io.WriteString(w, b.name)
	})}
	go b.srv.Serve(ln)
	t.Cleanup(func() { b.srv.Close() })
	return b
}

func listenLoopback(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

// fetch gets / through addr from source 127.0.0.2 (not a monitor source):
// the backend's name, or "" when the conn was closed without a reply.
func fetch(t *testing.T, addr string) string {
	t.Helper()
	c := dialFrom(t, "127.0.0.2", addr)
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	fmt.Fprintf(c, "GET / HTTP/1.0\r\n\r\n")
	b, _ := io.ReadAll(c)
	s := string(b)
	if i := strings.Index(s, "\r\n\r\n"); i >= 0 {
		return s[i+4:]
	}
	return s
}

// probeReply is what a connection from 127.0.0.1 to addr is answered
// (on a health=http rule with monitor, the health reply).
func probeReply(t *testing.T, addr string) string {
	t.Helper()
	c := dialFrom(t, "127.0.0.1", addr)
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	fmt.Fprintf(c, "GET / HTTP/1.0\r\n\r\n")
	b, _ := io.ReadAll(c)
	return string(b)
}

// within polls cond every 20ms for d; it returns how long it took.
func within(t *testing.T, d time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > d {
			t.Fatalf("%s: not within %s", what, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Since(start)
}

// The daemon with check=http in front of two Go HTTP servers whose /healthz
// the test flips: traffic leaves a failing backend within fall × interval
// + timeout and comes back after rise; with both down a new conn is closed
// at once (no-backend), health= says 503, and HAProxy's option httpchk
// against that health port sees DOWN; metrics and ctl stats show it.
func TestActiveChecksDaemon(t *testing.T) {
	a, b := serveHealth(t, "a", listenLoopback(t)), serveHealth(t, "b", listenLoopback(t))
	port, mport := freePort(t), freePort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	const interval, timeout, fall = 200 * time.Millisecond, 100 * time.Millisecond, 2
	file := writeFile(t, "checks.yaml", fmt.Sprintf(`loops: 2
log: {level: info}
metrics: {listen: 127.0.0.1:%d}
rules:
  - tcp %s -> %s,%s health=http monitor=127.0.0.1/32 check=http check.path=/healthz check.interval=200ms check.timeout=100ms check.rise=2 check.fall=2
`, mport, addr, a.addr, b.addr))
	d := startDaemon(t, forwardOpts{}, "run", "-c", file)
	d.waitListening(addr)

	dir := t.TempDir()
	sock := filepath.Join(dir, "stats.sock")
	front := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	hconf := writeFile(t, "haproxy.cfg", fmt.Sprintf(`global
	stats socket %s mode 600 level admin
defaults
	mode tcp
	timeout connect 2s
	timeout client 10s
	timeout server 10s
	timeout check 2s
frontend f
	bind %s
	default_backend b
backend b
	mode http
	option httpchk GET /
	http-check expect status 200
	server s %s check inter 100ms fall 1 rise 1
`, sock, front, addr))
	startExt(t, front, "haproxy", "-f", hconf, "-db")
	haproxySees := func(want string) func() bool {
		return func() bool { return strings.HasPrefix(haproxyServerStatus(t, sock, "b", "s"), want) }
	}
	within(t, 5*time.Second, "HAProxy sees UP", haproxySees("UP L7OK"))
	// ctl watch health, from now on: the transitions say by=check.
	var watchOut bytes.Buffer
	watch := exec.Command(sluiceBin, "ctl", "-s", d.Ctl, "watch", "health")
	watch.Stdout = &watchOut
	if err := watch.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { watch.Process.Kill(); watch.Wait() }()
	time.Sleep(200 * time.Millisecond) // subscribed before the first change

	seen := map[string]int{}
	for i := 0; i < 6; i++ {
		seen[fetch(t, addr)]++
	}
	if seen["a"] == 0 || seen["b"] == 0 {
		t.Fatalf("both up: %v\n%s", seen, d.stderr.String())
	}

	a.status.Store(503)
	bound := fall*interval + timeout + 200*time.Millisecond // + the time to see it
	took := within(t, bound, "traffic leaves a", func() bool {
		for i := 0; i < 4; i++ {
			if fetch(t, addr) != "b" {
				return false
			}
		}
		return true
	})
	t.Logf("a failing: traffic only to b after %s (fall %d × interval %s + timeout %s = %s)", took, fall, interval, timeout, fall*interval+timeout)

	b.status.Store(503)
	within(t, bound, "b down too", func() bool { return fetch(t, addr) == "" })
	t0 := time.Now()
	if got := fetch(t, addr); got != "" {
		t.Errorf("all down: %q", got)
	}
	closedIn := time.Since(t0)
	if closedIn > 100*time.Millisecond {
		t.Errorf("all down: closed after %s, want at once", closedIn)
	}
	t.Logf("all down: a new conn is closed after %s", closedIn)
	// Raw, not net/http: the health reply is written at accept, before the
	// request, which Go's client takes for an unsolicited response when the
	// reply wins the race.
	if reply := probeReply(t, addr); !strings.HasPrefix(reply, "HTTP/1.0 503 ") {
		t.Errorf("health reply with all down: %q", reply)
	}
	within(t, 5*time.Second, "HAProxy sees DOWN", haproxySees("DOWN L7STS"))
	_, metrics := httpGet(t, fmt.Sprintf("http://127.0.0.1:%d/metrics", mport))
	rl := fmt.Sprintf(`pif="host",rule="tcp %s"`, addr)
	for _, s := range []string{
		fmt.Sprintf(`sluice_backend_up{backend="%s",%s} 0`, a.addr, rl),
		`sluice_sessions_ended_total{code="24",reason="no-backend"}`,
		fmt.Sprintf(`sluice_backend_checks_total{backend="%s",pif="host",result="fail",rule="tcp %s"}`, b.addr, addr),
		fmt.Sprintf(`sluice_backend_check_seconds_count{%s}`, rl),
	} {
		if !strings.Contains(metrics, s) {
			t.Errorf("metrics have no %s", s)
		}
	}

	a.status.Store(200)
	took = within(t, 2*interval+timeout+200*time.Millisecond, "traffic back to a", func() bool { return fetch(t, addr) == "a" })
	t.Logf("a healthy again: traffic back after %s (rise 2 × interval %s)", took, interval)
	within(t, 5*time.Second, "HAProxy sees UP again", haproxySees("UP L7OK"))
	watch.Process.Kill()
	watch.Wait()
	evs := watchOut.String()
	for _, want := range []string{`"type":"state"`, `"type":"down"`, `"by":"check"`, `"reason":"status not 2xx or 3xx"`, `"type":"up"`} {
		if !strings.Contains(evs, want) {
			t.Errorf("ctl watch health has no %s:\n%s", want, evs)
		}
	}
	logs := d.stderr.String()
	if !strings.Contains(logs, "backend health changed") || !strings.Contains(logs, "status not 2xx or 3xx") {
		t.Errorf("no log line of the transitions:\n%s", logs)
	}
}

// A check of a backend in a pif runs in the pif's namespace: the backend
// listens on the namespace's own loopback, unreachable from the host, and
// its checks pass there, then fail when it says 503. check.port is a
// listener apart from the traffic port.
func TestActiveChecksIntoPif(t *testing.T) {
	ns := netnstest.New(t)
	traffic := serveHealth(t, "inner", ns.Listen(t, "127.0.0.1:0"))
	health := serveHealth(t, "health", ns.Listen(t, "127.0.0.1:0"))
	_, hp, _ := net.SplitHostPort(health.addr)
	port := freePort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	file := writeFile(t, "pifcheck.yaml", fmt.Sprintf(`loops: 1
log: {level: info}
pifs:
  - {name: inner, netns: %s}
rules:
  - tcp %s -> inner/%s check=http check.path=/healthz check.port=%s check.interval=100ms check.timeout=50ms check.fall=1 check.rise=1
`, ns.Path, addr, traffic.addr, hp))
	d := startDaemon(t, forwardOpts{}, "run", "-c", file)
	d.waitListening(addr)
	time.Sleep(300 * time.Millisecond) // several checks, all passing
	if got := fetch(t, addr); got != "inner" {
		t.Fatalf("through the pif: %q\n%s", got, d.stderr.String())
	}
	health.status.Store(503) // the health port fails, the traffic port is fine
	within(t, 2*time.Second, "down by the check port", func() bool { return fetch(t, addr) == "" })
	health.status.Store(200)
	within(t, 2*time.Second, "back", func() bool { return fetch(t, addr) == "inner" })
	if strings.Contains(d.stderr.String(), "connection refused") {
		t.Errorf("a check was refused: it did not run in the namespace\n%s", d.stderr.String())
	}
}
