package engine

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/balance"
	"github.com/sluice-proxy/sluice/observe"
	"github.com/sluice-proxy/sluice/rules"
)

// httpBackend is a real HTTP server: / answers its name, /healthz the
// status the test sets.
type httpBackend struct {
	name   string
	srv    *httptest.Server
	health atomic.Int32
	checks atomic.Int64
}

func newHTTPBackend(t *testing.T, name string) *httpBackend { return newHTTPBackendOn(t, name, nil) }

// newHTTPBackendOn is newHTTPBackend on listener ln (nil: any loopback port).
func newHTTPBackendOn(t *testing.T, name string, ln net.Listener) *httpBackend {
	b := &httpBackend{name: name}
	b.health.Store(200)
	b.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/healthz" {
			b.checks.Add(1)
			w.WriteHeader(int(b.health.Load()))
			return
		}
		io.WriteString(w, b.name)
	}))
	if ln != nil {
		b.srv.Listener.Close()
		b.srv.Listener = ln
	}
	b.srv.Start()
	t.Cleanup(b.srv.Close)
	return b
}

func (b *httpBackend) addr() string { return b.srv.Listener.Addr().String() }

// via fetches / through the proxy at addr: the backend's name, or "" when
// the conn was closed without a reply.
func via(t *testing.T, addr string) string {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	fmt.Fprintf(c, "GET / HTTP/1.0\r\n\r\n")
	reply, _ := io.ReadAll(c)
	s := string(reply)
	if i := strings.Index(s, "\r\n\r\n"); i >= 0 {
		return s[i+4:]
	}
	return s
}

// waitWithin polls cond every 10ms until it holds or d passes; it returns
// how long that took.
func waitWithin(t *testing.T, d time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > d {
			t.Fatalf("%s: not within %s", what, d)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Since(start)
}

// onlyTo reports whether n fetches through addr all reach backend name.
func onlyTo(t *testing.T, addr, name string, n int) bool {
	for i := 0; i < n; i++ {
		if via(t, addr) != name {
			return false
		}
	}
	return true
}

// Traffic leaves a backend whose /healthz says 503 within fall × interval
// + timeout and comes back after rise successes; with every backend down a
// new conn is closed at once (no-backend) and health= says 503.
func TestHTTPCheckMovesTraffic(t *testing.T) {
	a, b := newHTTPBackend(t, "a"), newHTTPBackend(t, "b")
	const interval, timeout = 100 * time.Millisecond, 50 * time.Millisecond
	sub := func(e *Engine) *observe.Sub { s, _ := e.Watch(observe.GroupHealth, 64); return s }
	e, addr := start(t, fmt.Sprintf("tcp 127.0.0.1:0 -> %s,%s health=http monitor=127.0.0.3/32 check=http check.path=/healthz check.interval=100ms check.timeout=50ms check.rise=2 check.fall=2",
		a.addr(), b.addr()), Config{})
	s := sub(e)
	defer s.Close()
	waitWithin(t, time.Second, "both checked", func() bool { return a.checks.Load() > 0 && b.checks.Load() > 0 })
	seen := map[string]int{}
	for i := 0; i < 6; i++ {
		seen[via(t, addr)]++
	}
	if seen["a"] == 0 || seen["b"] == 0 {
		t.Fatalf("both up: %v", seen)
	}

	a.health.Store(503)
	took := waitWithin(t, 2*interval+timeout+300*time.Millisecond, "traffic leaves a", func() bool { return onlyTo(t, addr, "b", 4) })
	t.Logf("a down after %s (fall 2 × interval 100ms + timeout 50ms)", took)

	b.health.Store(503)
	waitWithin(t, time.Second, "b down", func() bool { return e.Listeners()[0].Pool().NoBackend() })
	t0 := time.Now()
	if got := via(t, addr); got != "" {
		t.Errorf("all down: got %q, want the conn closed", got)
	}
	if d := time.Since(t0); d > 200*time.Millisecond {
		t.Errorf("all down: conn closed after %s, want at once", d)
	}
	if got, _ := httpGet(t, addr, "127.0.0.3"); !strings.HasPrefix(got, "HTTP/1.0 503") {
		t.Errorf("health reply with all down: %q", got)
	}
	waitWithin(t, time.Second, "no-backend counted", func() bool { return e.Stats().Ended["no-backend"] > 0 })

	a.health.Store(200)
	took = waitWithin(t, 2*interval+timeout+300*time.Millisecond, "traffic back to a", func() bool { return onlyTo(t, addr, "a", 3) })
	t.Logf("a up after %s (rise 2)", took)
	if got, _ := httpGet(t, addr, "127.0.0.3"); !strings.HasPrefix(got, "HTTP/1.0 200") {
		t.Errorf("health reply with a up: %q", got)
	}

	var evs []string
	deadline := time.After(time.Second)
	for len(evs) < 3 {
		select {
		case ev := <-s.Events():
			by := ""
			for _, fl := range ev.Fields {
				if fl.Key == "by" {
					by = fmt.Sprint(fl.Value)
				}
			}
			evs = append(evs, ev.Type+"/"+by)
		case <-deadline:
			t.Fatalf("health events %v", evs)
		}
	}
	if evs[0] != "down/check" || evs[1] != "down/check" || evs[2] != "up/check" {
		t.Errorf("events %v", evs)
	}
	st := e.Listeners()[0].Pool().Stats(0)
	if !st[0].Checked || st[0].Check.Counts[0] == 0 || st[1].Check.Reason != "status not 2xx or 3xx" {
		t.Errorf("stats %+v", st)
	}
}

// check.port is checked, not the traffic port; a backend that accepts the
// check and never answers fails by check.timeout and holds no fd past it.
func TestCheckPortAndSilentBackend(t *testing.T) {
	traffic := newHTTPBackend(t, "t")
	silent, _ := net.Listen("tcp", "127.0.0.1:0")
	defer silent.Close()
	var held atomic.Int32
	go func() {
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			held.Add(1)
			go func() { io.Copy(io.Discard, c); c.Close(); held.Add(-1) }()
		}
	}()
	port := silent.Addr().(*net.TCPAddr).Port
	e, addr := start(t, fmt.Sprintf("tcp 127.0.0.1:0 -> %s check=http check.port=%d check.interval=100ms check.timeout=50ms check.fall=2",
		traffic.addr(), port), Config{})
	if got := via(t, addr); got != "t" {
		t.Fatalf("before the checks fail: %q", got)
	}
	waitWithin(t, time.Second, "down by timeouts", func() bool { return e.Listeners()[0].Pool().NoBackend() })
	st := e.Listeners()[0].Pool().Stats(0)[0]
	if st.Check.Reason != "timeout" || st.Check.Latency < 50*time.Millisecond || st.Check.Latency > 80*time.Millisecond {
		t.Errorf("check %+v, want timeouts of about 50ms", st.Check)
	}
	if got := via(t, addr); got != "" {
		t.Errorf("traffic port fine, check port silent: got %q, want no-backend", got)
	}
	time.Sleep(120 * time.Millisecond)
	if n := held.Load(); n > 1 {
		t.Errorf("%d check conns held open, want at most the one in flight", n)
	}
}

// A kept rule keeps its checks' state; a changed rule starts from it (no
// flap to up because an unrelated option changed); a removed rule's checks
// stop.
func TestChecksAcrossApply(t *testing.T) {
	a := newHTTPBackend(t, "a")
	a.health.Store(503)
	line := "tcp 127.0.0.1:0 -> " + a.addr() + " check=http check.path=/healthz check.interval=100ms check.timeout=50ms check.fall=1 check.rise=50"
	e, _ := start(t, "tcp 127.0.0.1:0 -> 127.0.0.1:2", Config{}) // replaced by the first apply
	apply := func(rs ...*rules.Rule) {
		t.Helper()
		if _, err := e.Apply(rs); err != nil {
			t.Fatal(err)
		}
		if _, err := e.Commit(); err != nil {
			t.Fatal(err)
		}
	}
	// A fixed port, so the key is kept across applies.
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	p := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	r, _ := rules.Parse(strings.Replace(line, "127.0.0.1:0", fmt.Sprintf("127.0.0.1:%d", p), 1))
	apply(r)
	pool := func() *Listener {
		for _, l := range e.Listeners() {
			if l.Rule().Check.Kind != rules.CheckNone {
				return l
			}
		}
		t.Fatal("no checked listener")
		return nil
	}
	waitWithin(t, time.Second, "down", func() bool { return pool().Pool().NoBackend() })
	a.health.Store(200) // rise 50: it stays down for 5s
	r2, _ := rules.Parse(r.String())
	apply(r2)
	if !pool().Pool().NoBackend() {
		t.Error("kept rule: state lost")
	}
	r3, _ := rules.Parse(r.String() + " timeout.idle=1m")
	apply(r3)
	if !pool().Pool().NoBackend() {
		t.Error("changed rule: flapped up")
	}
	if got := pool().Pool().Stats(0)[0].Check.Counts[balance.ResultFail]; got == 0 {
		t.Error("changed rule: counts not carried over")
	}
	apply()
	before := a.checks.Load()
	time.Sleep(300 * time.Millisecond)
	if n := a.checks.Load() - before; n > 1 {
		t.Errorf("%d checks after the rule was removed", n)
	}
	e.mu.Lock()
	n := len(e.chk.byLine)
	e.mu.Unlock()
	if n != 0 {
		t.Errorf("%d rules' checks left", n)
	}
}

// A TCP backend that stops listening is taken out by check=tcp within
// fall × interval + timeout (before any client had to find it refused),
// and put back after rise successes once it listens again.
func TestTCPCheckBackendStopsListening(t *testing.T) {
	a, b := newHTTPBackend(t, "a"), newHTTPBackend(t, "b")
	aAddr := a.addr()
	e, addr := start(t, fmt.Sprintf("tcp 127.0.0.1:0 -> %s,%s check=tcp check.interval=100ms check.timeout=50ms check.fall=2 check.rise=2", aAddr, b.addr()), Config{})
	pool := e.Listeners()[0].Pool()
	a.srv.Close()
	took := waitWithin(t, 2*100*time.Millisecond+50*time.Millisecond+300*time.Millisecond, "a down by its checks", func() bool { return pool.Check(0).Down() })
	t.Logf("a down by check=tcp after %s", took)
	if st := pool.Stats(0)[0]; st.Check.Reason != "connection refused" || st.Failures != 0 {
		t.Errorf("a: %+v (failures %d: a client found it refused first)", st.Check, st.Failures)
	}
	if !onlyTo(t, addr, "b", 4) {
		t.Error("traffic still reaches a")
	}
	ln, err := net.Listen("tcp", aAddr)
	if err != nil {
		t.Skipf("listen again on %s: %v", aAddr, err)
	}
	newHTTPBackendOn(t, "a2", ln)
	waitWithin(t, time.Second, "a up again", func() bool { return !pool.Check(0).Down() })
	waitWithin(t, time.Second, "traffic back to a", func() bool { return via(t, addr) == "a2" || via(t, addr) == "a2" })
}

// On a routed key every route's pool is checked on its own: a route whose
// backends are all down by their checks refuses its sessions (no-backend)
// while the other routes serve; a table change that keeps a route starts its
// checks from the state they had.
func TestChecksPerRoute(t *testing.T) {
	a, b := newHTTPBackend(t, "a"), newHTTPBackend(t, "b")
	e := newEngine(t)
	chk := "check=http check.path=/healthz check.interval=100ms check.timeout=50ms check.rise=1 check.fall=1"
	port := freePort(t)
	routeA := fmt.Sprintf("tcp 127.0.0.1:%d -> %s sni=a.example %s", port, a.addr(), chk)
	deflt := fmt.Sprintf("tcp 127.0.0.1:%d -> %s %s", port, b.addr(), chk)
	applyCommit(t, e, routeA, deflt)
	routes := func() (ra, rd *Listener) {
		lns := e.Listeners()
		if len(lns) != 1 {
			t.Fatalf("want one routed listener, got %d", len(lns))
		}
		for _, rl := range lns[0].Routes() {
			switch {
			case strings.Contains(rl.Rule().RouteString(), "sni=a.example"):
				ra = rl
			case !rl.Rule().IsRoute():
				rd = rl
			}
		}
		if ra == nil || rd == nil {
			t.Fatalf("routes %d: route a or the default missing", len(lns[0].Routes()))
		}
		return ra, rd
	}
	waitWithin(t, 2*time.Second, "both routes checked", func() bool { return a.checks.Load() > 0 && b.checks.Load() > 0 })
	a.health.Store(503)
	waitWithin(t, 2*time.Second, "route a down by its checks", func() bool { ra, _ := routes(); return ra.Pool().NoBackend() })
	if _, rd := routes(); rd.Pool().NoBackend() {
		t.Fatal("the default route went down with route a's backend")
	}
	// Another route added: the key's listener is new, route a's state carries over.
	other := fmt.Sprintf("tcp 127.0.0.1:%d -> %s sni=c.example", port, b.addr())
	applyCommit(t, e, routeA, deflt, other)
	if ra, _ := routes(); !ra.Pool().NoBackend() {
		t.Error("route a came back up across an apply that kept it: its checks did not carry their state")
	}
	a.health.Store(200)
	waitWithin(t, 2*time.Second, "route a up again", func() bool { ra, _ := routes(); return !ra.Pool().NoBackend() })
}
