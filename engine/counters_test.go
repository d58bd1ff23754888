package engine

import (
	"bufio"
	"net"
	"os"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/internal/testpeer"
	"github.com/sluice-proxy/sluice/rules"
)

// The termination code of each way a session can end.
func TestTermCodes(t *testing.T) {
	for _, c := range []struct {
		code   conn.Code
		st     sessionState
		health bool
		want   string
	}{
		{conn.CodeDone, stForwarding, false, "--"},
		{conn.CodeHealth, stHandshake, true, "-H"},
		{conn.CodeHandshakeTimeout, stHandshake, true, "cH"},
		{conn.CodeClientReset, stHandshake, true, "CH"},
		{conn.CodeDenied, stHandshake, false, "PR"},
		{conn.CodeRateLimited, stHandshake, false, "PR"},
		{conn.CodeProxyBad, stHandshake, false, "PR"},
		{conn.CodeProxyMissing, stHandshake, false, "PR"},
		{conn.CodeProxyOversized, stHandshake, false, "PR"},
		{conn.CodeProxyNotTrusted, stHandshake, false, "PR"},
		{conn.CodeProxyTruncated, stHandshake, false, "CR"},
		{conn.CodeClientReset, stHandshake, false, "CR"},
		{conn.CodeHandshakeTimeout, stHandshake, false, "cR"},
		{conn.CodeStopping, stConnecting, false, "IC"},
		{conn.CodeConnectRefused, stConnecting, false, "SC"},
		{conn.CodeConnectError, stConnecting, false, "SC"},
		{conn.CodeConnectTimeout, stConnecting, false, "sC"},
		{conn.CodeNoBackend, stConnecting, false, "SC"},
		{conn.CodeConnectTimeout, stSendProxy, false, "sC"},
		{conn.CodeServerReset, stSendProxy, false, "SC"},
		{conn.CodeClientReset, stConnecting, false, "CC"},
		{conn.CodeResource, stWaitFd, false, "RC"},
		{conn.CodeClientReset, stForwarding, false, "CD"},
		{conn.CodeServerReset, stForwarding, false, "SD"},
		{conn.CodeIdleTimeout, stForwarding, false, "cD"},
		{conn.CodeStopping, stForwarding, false, "ID"},
		{conn.CodeResource, stForwarding, false, "RD"},
		{conn.Code(999), stForwarding, false, "?D"},
	} {
		if got := termOf(c.code, c.st, c.health).String(); got != c.want {
			t.Errorf("%s in state %s (health %v): %q, want %q", c.code, c.st, c.health, got, c.want)
		}
	}
}

// Every end code and every session state has its letter: a code added to
// conn without one here fails.
func TestTermTableComplete(t *testing.T) {
	for c := conn.Code(0); !strings.HasPrefix(c.String(), "code-"); c++ {
		if int(c) >= len(whoByCode) {
			t.Errorf("end code %d (%s) has no termination letter in whoByCode", c, c)
		}
	}
	for st := stHandshake; !strings.HasPrefix(st.String(), "state-"); st++ {
		if int(st) >= len(phaseByState) {
			t.Errorf("session state %s has no phase letter in phaseByState", st)
		}
	}
	if len(whoLetters) != int(whoCount) || len(phaseLetters) != int(phaseCount) {
		t.Fatalf("letters %q %q for %d who, %d phases", whoLetters, phaseLetters, whoCount, phaseCount)
	}
}

// README.md documents every letter of the termination codes.
func TestTermCodesDocumented(t *testing.T) {
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	readme := string(b)
	for _, l := range whoLetters {
		if !regexp.MustCompile("(?m)^\\| who \\| `" + regexp.QuoteMeta(string(l)) + "` \\|").MatchString(readme) {
			t.Errorf("README.md has no row \"| who | `%c` |\" in its termination code table", l)
		}
	}
	for _, l := range phaseLetters {
		if !regexp.MustCompile("(?m)^\\| phase \\| `" + string(l) + "` \\|").MatchString(readme) {
			t.Errorf("README.md has no row \"| phase | `%c` |\" in its termination code table", l)
		}
	}
}

func TestSinceUs(t *testing.T) {
	for _, c := range []struct {
		now, start int64
		want       uint32
	}{{5000, 1000, 4}, {1000, 5000, 0}, {int64(2 * time.Hour), 0, 1<<32 - 1}} {
		if got := sinceUs(c.now, c.start); got != c.want {
			t.Errorf("sinceUs(%d, %d) = %d, want %d", c.now, c.start, got, c.want)
		}
	}
}

// The counting done on the data path allocates nothing.
func TestCountingAllocatesNothing(t *testing.T) {
	needCounters(t)
	e := &Engine{loops: make([]*Loop, 2)}
	r, _ := rules.Parse("tcp 127.0.0.1:80 -> 127.0.0.1:81")
	c := e.newRuleCounters(r)
	l := &Loop{id: 1, e: e, now: int64(3 * time.Second)}
	ln := &Listener{ctr: c}
	s := &session{ln: ln, flags: sfPassed | sfConnected, hsUs: 120, connUs: 450}
	allocs := testing.AllocsPerRun(1000, func() {
		c.begin(l)
		c.moved(l, 1000, 2000, 500)
		c.retry()
		l.connectError(ln)
		c.ended(l, s, Term{who: whoNormal, phase: phaseData})
	})
	if allocs != 0 {
		t.Errorf("%v allocations per session's counting", allocs)
	}
	sh := &c.shards[1]
	if sh.live.Load() != 0 || sh.bytesUp.Load() == 0 || c.connect.Snapshot().Count() == 0 || c.session.Snapshot().Sum == 0 {
		t.Errorf("counts: live %d, in %d, connect %+v", sh.live.Load(), sh.bytesUp.Load(), c.connect.Snapshot())
	}
}

// needCounters skips a test of the per-rule counters in a build without them.
func needCounters(t *testing.T) {
	if !CountersEnabled {
		t.Skip("built with -tags sluice_nocounters: no per-rule counters to check")
	}
}

// ruleStats returns the stats of the rule whose listen part is listen.
func ruleStats(t *testing.T, e *Engine, listen string) RuleStats {
	t.Helper()
	for _, r := range e.Stats().Rules {
		if r.Listen == listen {
			return r
		}
	}
	t.Fatalf("no rule %q in %+v", listen, e.Stats().Rules)
	return RuleStats{}
}

// sessionLogs waits for n "session" lines and returns their fields.
func sessionLogs(t *testing.T, logs *observer.ObservedLogs, n int) []map[string]any {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for logs.FilterMessage("session").Len() < n && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	var out []map[string]any
	for _, ent := range logs.FilterMessage("session").All() {
		f := ent.ContextMap()
		f["level"] = ent.Level.String()
		out = append(out, f)
	}
	if len(out) != n {
		t.Fatalf("%d session lines, want %d: %v", len(out), n, out)
	}
	return out
}

// One access-log line per session, with who ended it and when, the client's
// own address behind a PROXY header, and the per-rule counters that match.
func TestAccessLogAndRuleCounters(t *testing.T) {
	needCounters(t)
	b := backend(t)
	log, logs := observed(zap.NewAtomicLevelAt(zap.DebugLevel))
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+b.Addr()+" accept-proxy=127.0.0.0/8 deny=203.0.113.0/24", Config{Log: log})
	listen := "tcp 127.0.0.1:" + strings.Split(addr, ":")[1]

	send := func(src string) *net.TCPConn {
		c := dial(t, addr)
		h := proxyproto.HeaderProxyFromAddrs(1, &net.TCPAddr{IP: net.ParseIP(src), Port: 4242}, &net.TCPAddr{IP: net.IPv4(198, 51, 100, 1), Port: 443})
		if _, err := h.WriteTo(c); err != nil {
			t.Fatal(err)
		}
		return c
	}
	c := send("192.0.2.7")
	client := c.LocalAddr().String()
	if err := testpeer.Exchange(c, 1000, 3000, 1); err != nil {
		t.Fatal(err)
	}
	c.Close()
	waitIdle(t, e)
	c = send("203.0.113.9")
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	if n, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatalf("denied source read %d bytes", n)
	}
	c.Close()
	waitIdle(t, e)

	lines := sessionLogs(t, logs, 2)
	ok, denied := lines[0], lines[1]
	want := map[string]any{"level": "info", "rule": listen, "listen": addr, "src": "192.0.2.7:4242", "orig_src": client,
		"dst": "198.51.100.1:443", "backend": b.Addr(), "bytes_up": uint64(16 + 1000), "bytes_down": uint64(3000 + 32),
		"term": "--", "end": "done", "code": uint16(1)}
	for k, v := range want {
		if ok[k] != v {
			t.Errorf("served session: %s = %v (%T), want %v", k, ok[k], ok[k], v)
		}
	}
	for _, k := range []string{"handshake", "connect", "duration", "spliced"} {
		if _, has := ok[k]; !has {
			t.Errorf("served session: no %s: %v", k, ok)
		}
	}
	if hs, d := ok["handshake"].(time.Duration), ok["duration"].(time.Duration); hs > d || d <= 0 {
		t.Errorf("handshake %v, duration %v", hs, d)
	}
	// Each line names its session and when it started.
	if id, _ := ok["id"].(string); id == "" || id == denied["id"] {
		t.Errorf("session ids %v and %v: want two, distinct", ok["id"], denied["id"])
	}
	for _, l := range lines { // LOOP-START-FD, the client's fd as it was (not -1 after its close)
		if p := strings.Split(l["id"].(string), "-"); len(p) != 3 || p[2] == "" || p[2][0] < '0' || p[2][0] > '9' {
			t.Errorf("session id %q: want LOOP-START-FD with the client's fd", l["id"])
		}
	}
	if st, _ := ok["start"].(time.Time); time.Since(st) <= 0 || time.Since(st) > time.Minute {
		t.Errorf("served session: start %v", ok["start"])
	}
	want = map[string]any{"level": "debug", "rule": listen, "src": "203.0.113.9:4242", "term": "PR", "end": "denied"}
	for k, v := range want {
		if denied[k] != v {
			t.Errorf("denied: %s = %v, want %v", k, denied[k], v)
		}
	}
	if denied["orig_src"] == nil || denied["orig_src"] == "203.0.113.9:4242" {
		t.Errorf("denied: orig_src %v, want the socket's address", denied["orig_src"])
	}
	for _, k := range []string{"backend", "handshake", "connect"} {
		if _, has := denied[k]; has {
			t.Errorf("denied: has %s: %v", k, denied)
		}
	}

	rs := ruleStats(t, e, listen)
	if rs.Pif != "host" || rs.Proto != "tcp" || rs.Requested != 1 || len(rs.Listeners) != 1 || rs.Listeners[0].State != ListenerListening {
		t.Errorf("rule %+v", rs)
	}
	if rs.Sessions != 0 || rs.BytesUp != 1016 || rs.BytesDown != 3032 || rs.Spliced > rs.BytesUp+rs.BytesDown {
		t.Errorf("sessions %d, bytes in %d out %d spliced %d", rs.Sessions, rs.BytesUp, rs.BytesDown, rs.Spliced)
	}
	if rs.Terms["--"] != 1 || rs.Terms["PR"] != 1 || len(rs.Terms) != 2 {
		t.Errorf("terms %v", rs.Terms)
	}
	if rs.Handshake.Count() != 1 || rs.Connect.Count() != 1 || rs.Duration.Count() != 1 {
		t.Errorf("histograms: handshake %d, connect %d, session %d", rs.Handshake.Count(), rs.Connect.Count(), rs.Duration.Count())
	}
	if rs.Policy.Accepted != 2 || rs.Policy.Refused["rules"]["denied"] != 1 || rs.Policy.ProxyV1 != 2 {
		t.Errorf("policy %+v", rs.Policy)
	}
	if len(rs.Backends) != 1 || !rs.Backends[0].Up || rs.Backends[0].Target.String() != b.Addr() {
		t.Errorf("backends %+v", rs.Backends)
	}
}

// A pool whose first backend refuses: one retry, one connect error, the
// session served ("--"); a pool of one refusing backend: "SC", no connect
// time observed.
func TestRetriesAndConnectErrors(t *testing.T) {
	needCounters(t)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := ln.Addr().String()
	ln.Close()
	b := backend(t)
	log, logs := observed(zap.NewAtomicLevelAt(zap.InfoLevel))
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+dead+","+b.Addr(), Config{Log: log})
	r, _ := rules.Parse("tcp 127.0.0.1:0 -> " + dead)
	lns, err := e.Listen(r)
	if err != nil {
		t.Fatal(err)
	}
	c := dial(t, addr) // round robin starts on the dead backend
	if err := testpeer.Exchange(c, 10, 10, 1); err != nil {
		t.Fatal(err)
	}
	c.Close()
	c = dial(t, lns[0].Addr().String())
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	c.Read(make([]byte, 1))
	c.Close()
	waitIdle(t, e)

	pool := ruleStats(t, e, "tcp "+addr)
	if pool.Retries != 1 || pool.ConnectErrors != 1 || pool.Terms["--"] != 1 || pool.Connect.Count() != 1 {
		t.Errorf("pool rule: retries %d, connect errors %d, terms %v, connects %d", pool.Retries, pool.ConnectErrors, pool.Terms, pool.Connect.Count())
	}
	if pool.Backends[0].Up || !pool.Backends[1].Up {
		t.Errorf("passive health: %+v", pool.Backends)
	}
	one := ruleStats(t, e, "tcp "+lns[0].Addr().String())
	if one.Retries != 0 || one.ConnectErrors != 1 || one.Terms["SC"] != 1 || one.Connect.Count() != 0 || one.Handshake.Count() != 1 {
		t.Errorf("single rule: retries %d, connect errors %d, terms %v, connects %d, handshakes %d",
			one.Retries, one.ConnectErrors, one.Terms, one.Connect.Count(), one.Handshake.Count())
	}
	lines := sessionLogs(t, logs, 2)
	for _, l := range lines {
		if l["listen"] == lns[0].Addr().String() {
			if l["term"] != "SC" || l["backend"] != dead || l["connect"] != nil || l["handshake"] == nil {
				t.Errorf("refused session's line: %v", l)
			}
		} else if l["term"] != "--" || l["backend"] != b.Addr() || l["connect"] == nil {
			t.Errorf("retried session's line: %v", l)
		}
	}
}

// Benchmarks of the data path's counting (see bench/RESULTS.md).

// benchLoops are loops for benchmarks; next hands each parallel goroutine
// its own, as the engine runs each loop on one thread.
type benchLoops struct {
	loops []*Loop
	n     atomic.Uint32
}

func (b *benchLoops) next() *Loop { return b.loops[int(b.n.Add(1)-1)%len(b.loops)] }

func benchCounters() (*RuleCounters, *Listener, *session, *benchLoops) {
	e := &Engine{loops: make([]*Loop, 64)}
	r, _ := rules.Parse("tcp 127.0.0.1:80 -> 127.0.0.1:81")
	c := e.newRuleCounters(r)
	loops := &benchLoops{}
	for i := range e.loops {
		loops.loops = append(loops.loops, &Loop{id: i, e: e, now: int64(3 * time.Second)})
	}
	ln := &Listener{ctr: c}
	return c, ln, &session{ln: ln, flags: sfPassed | sfConnected, hsUs: 120, connUs: 450}, loops
}

// What one pump that moved bytes adds: the per-event cost.
func BenchmarkCountMoved(b *testing.B) {
	c, _, _, loops := benchCounters()
	l := loops.next()
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		c.moved(l, 16384, 512, 16384)
	}
}

// The same from several goroutines, each as its own loop, on one rule: the
// shards keep them from contending.
func BenchmarkCountMovedParallel(b *testing.B) {
	c, _, _, loops := benchCounters()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		l := loops.next()
		for pb.Next() {
			c.moved(l, 16384, 512, 16384)
		}
	})
}

// What a session's start and end add: begin, ended (terms, three histogram
// observations).
func BenchmarkCountSession(b *testing.B) {
	c, _, s, loops := benchCounters()
	l := loops.next()
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		s.start = int64(i)
		c.begin(l)
		c.ended(l, s, Term{who: whoNormal, phase: phaseData})
	}
}

// Session ends on every CPU at once, one rule: the histograms' atomics are
// shared by the loops (observed once per session, never per packet).
func BenchmarkCountSessionParallel(b *testing.B) {
	c, _, s0, loops := benchCounters()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		l := loops.next()
		s := *s0
		for pb.Next() {
			c.begin(l)
			c.ended(l, &s, Term{who: whoNormal, phase: phaseData})
		}
	})
}

// The scrape side: one rule's snapshot with 2 loops.
func BenchmarkRuleStats(b *testing.B) {
	e, err := New(Config{Loops: 2})
	if err != nil {
		b.Fatal(err)
	}
	e.Start()
	defer e.Shutdown(b.Context())
	r, _ := rules.Parse("tcp 127.0.0.1:0 -> 127.0.0.1:9")
	if _, err := e.Listen(r); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		_ = e.Stats()
	}
}

// On a wildcard listener the access line's dst is the address the client
// reached, found when the line is written (a rule without send-proxy defers
// getsockname to then), and a PROXY header's destination wins over it. With
// the line not written the session goes without.
func TestAccessLogDstOnWildcard(t *testing.T) {
	b := backend(t)
	for _, tc := range []struct {
		name, opts string
		proxyDst   *net.TCPAddr // a PROXY header's destination, or nil
		want       string       // "" : the address dialled
	}{
		{"plain", "", nil, ""},
		{"accept-proxy", " accept-proxy=127.0.0.0/8", &net.TCPAddr{IP: net.IPv4(198, 51, 100, 1), Port: 443}, "198.51.100.1:443"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			log, logs := observed(zap.NewAtomicLevelAt(zap.InfoLevel))
			e, addr := start(t, "tcp 0.0.0.0:0 -> "+b.Addr()+tc.opts, Config{Log: log})
			port := addr[strings.LastIndex(addr, ":")+1:]
			c := dial(t, "127.0.0.2:"+port)
			if tc.proxyDst != nil {
				h := proxyproto.HeaderProxyFromAddrs(1, &net.TCPAddr{IP: net.IPv4(192, 0, 2, 7), Port: 4242}, tc.proxyDst)
				if _, err := h.WriteTo(c); err != nil {
					t.Fatal(err)
				}
			}
			if err := testpeer.Exchange(c, 100, 100, 1); err != nil {
				t.Fatal(err)
			}
			c.Close()
			waitIdle(t, e)
			want := tc.want
			if want == "" {
				want = "127.0.0.2:" + port
			}
			if got := sessionLogs(t, logs, 1)[0]["dst"]; got != want {
				t.Errorf("dst %v, want %s", got, want)
			}
		})
	}
}

// send-proxy on a wildcard listener: the header carries the address the
// client reached, not 0.0.0.0 (getsockname at accept, not deferred).
func TestSendProxyDstOnWildcard(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	got := make(chan string, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- err.Error()
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		h, err := proxyproto.Read(bufio.NewReader(c))
		if err != nil {
			got <- err.Error()
			return
		}
		got <- h.DestinationAddr.String()
	}()
	_, addr := start(t, "tcp 0.0.0.0:0 -> "+ln.Addr().String()+" send-proxy=v2", Config{})
	port := addr[strings.LastIndex(addr, ":")+1:]
	c := dial(t, "127.0.0.2:"+port)
	defer c.Close()
	select {
	case dst := <-got:
		if dst != "127.0.0.2:"+port {
			t.Fatalf("PROXY header's destination %s, want 127.0.0.2:%s", dst, port)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no PROXY header reached the backend")
	}
}
