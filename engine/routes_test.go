package engine

import (
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/internal/testcert"
	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// namedBackend answers each connection with its name once it has read a
// TLS record's header, and closes: which backend a hello reached.
func namedBackend(t *testing.T, name string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	testpeer.Accept(ln, func(c net.Conn) {
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, make([]byte, 5)); err == nil {
			io.WriteString(c, name)
		}
	})
	return ln.Addr().String()
}

// routedTo sends a hello for name to addr and returns the backend's name.
func routedTo(t *testing.T, addr string, hellos map[string][]byte, name string) string {
	t.Helper()
	if hellos[name] == nil {
		h, err := testpeer.ClientHello(name)
		if err != nil {
			t.Fatal(err)
		}
		hellos[name] = h
	}
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(hellos[name]); err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(c)
	return string(b)
}

// An apply that changes the routes of a kept key (a route added, one
// removed, one's target changed) keeps its listening socket, and new
// connections follow the new routes; a rollback brings the old ones back
// on the same socket. Each route's Accepted counts the connections routed
// to it, and the counters logged at stop cover every route.
func TestApplyRoutesKeepSocket(t *testing.T) {
	A, B, C, D := namedBackend(t, "A"), namedBackend(t, "B"), namedBackend(t, "C"), namedBackend(t, "D")
	port := freePorts(t, 1)[0]
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	key := "tcp " + addr
	log, logs := observed(zap.NewAtomicLevelAt(zap.InfoLevel))
	e, err := New(Config{Loops: 2, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	e.Start()
	stopped := false
	defer func() {
		if !stopped {
			e.Shutdown(context.Background())
		}
	}()
	hellos := map[string][]byte{}
	check := func(when string, want map[string]string) {
		t.Helper()
		for name, backend := range want {
			if got := routedTo(t, addr, hellos, name); got != backend {
				t.Errorf("%s: %s reached %q, want %q", when, name, got, backend)
			}
		}
	}

	old := []string{key + " -> " + A + " sni=a.example.com", key + " -> " + B + " sni=b.example.com", key + " -> " + D}
	applyCommit(t, e, old...)
	fd, ino := socketOf(t, e, port)
	if ino == 0 {
		t.Fatalf("no listener on port %d", port)
	}
	check("first table", map[string]string{"a.example.com": "A", "b.example.com": "B", "c.example.com": "D"})

	// a's target changes, b is removed, c is added; the default stays.
	applyCommit(t, e, key+" -> "+B+" sni=a.example.com", key+" -> "+C+" sni=c.example.com", key+" -> "+D)
	if f, i := socketOf(t, e, port); f != fd || i != ino {
		t.Fatalf("the kept key's socket changed: fd %d inode %d, was fd %d inode %d", f, i, fd, ino)
	}
	check("new routes", map[string]string{"a.example.com": "B", "b.example.com": "D", "c.example.com": "C"})

	// Applied and rolled back: the committed routes again, same socket.
	if _, err := e.Apply(parseAll(t, old...)); err != nil {
		t.Fatal(err)
	}
	check("pending", map[string]string{"a.example.com": "A", "b.example.com": "B", "c.example.com": "D"})
	if _, err := e.Rollback(); err != nil {
		t.Fatal(err)
	}
	if f, i := socketOf(t, e, port); f != fd || i != ino {
		t.Fatalf("the socket changed at rollback: fd %d inode %d, was fd %d inode %d", f, i, fd, ino)
	}
	check("rolled back", map[string]string{"a.example.com": "B", "c.example.com": "C", "x.example.com": "D"})

	// Per route: the connections routed to it, every route of the key.
	accepted := map[string]uint64{}
	for _, r := range e.Stats().Rules {
		for _, l := range r.Listeners {
			accepted[r.Listen] += l.Accepted
		}
	}
	for route, want := range map[string]uint64{key + " sni=a.example.com": 2, key + " sni=c.example.com": 2, key: 2} {
		if accepted[route] != want {
			t.Errorf("route %q accepted %d, want %d (all: %v)", route, accepted[route], want, accepted)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	e.Shutdown(ctx)
	stopped = true
	logged := map[string]bool{}
	for _, en := range logs.FilterMessage("rule counters").All() {
		logged[en.ContextMap()["rule"].(string)] = true
		// In the log's words, zeros left out but accepted (always there).
		c, _ := en.ContextMap()["counters"].(map[string]any)
		if _, ok := c["accepted"]; !ok {
			t.Errorf("rule counters of %v: no accepted: %v", en.ContextMap()["rule"], c)
		}
		for k, v := range c {
			if k != strings.ToLower(k) || (v == uint64(0) && k != "accepted") {
				t.Errorf("rule counters: %s = %v", k, v)
			}
		}
	}
	for _, line := range []string{" sni=a.example.com", " sni=c.example.com"} {
		found := false
		for r := range logged {
			found = found || strings.HasSuffix(r, line)
		}
		if !found {
			t.Errorf("no rule counters logged at stop for route %q: %v", line, logged)
		}
	}
	if len(logged) != 3 {
		t.Errorf("rule counters logged at stop for %d rules, want the key's 3 routes: %v", len(logged), logged)
	}
}

// A key whose clients must speak first (it routes by the hello, or it
// terminates TLS) and that gives no health reply defers the accept until
// the first bytes come (TCP_DEFER_ACCEPT, timeout.handshake rounded up);
// others do not, and a kept socket takes its new rule's setting.
func TestDeferAccept(t *testing.T) {
	dir := t.TempDir()
	ca := testcert.NewCA(t, dir)
	cert, key := ca.Leaf(t, "srv", "a.example.com")
	deferSecs := func(e *Engine) int {
		t.Helper()
		v, err := unix.GetsockoptInt(e.Listeners()[0].fd, unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	on := fmt.Sprintf("tcp 127.0.0.1:%d", freePort(t))
	for _, tc := range []struct {
		name  string
		lines []string
		min   int // the kernel reports whole retransmission periods: at least what was asked
	}{
		{"plain", []string{on + " -> 127.0.0.1:1"}, 0},
		{"routes", []string{on + " -> 127.0.0.1:1 sni=a.example.com timeout.handshake=2s", on + " -> 127.0.0.1:2 sni=b.example.com timeout.handshake=2s"}, 2},
		{"terminates", []string{on + " -> 127.0.0.1:1 tls.cert=" + cert + " tls.key=" + key}, 5},
		{"routes with a health reply", []string{on + " -> 127.0.0.1:1 sni=a.example.com health=http monitor=127.0.0.2/32", on + " -> 127.0.0.1:2 sni=b.example.com health=http monitor=127.0.0.2/32"}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEngine(t)
			applyCommit(t, e, tc.lines...)
			got := deferSecs(e)
			if (tc.min == 0) != (got == 0) || got < tc.min {
				t.Fatalf("TCP_DEFER_ACCEPT %d, want %s", got, map[bool]string{true: "0", false: fmt.Sprintf("at least %d", tc.min)}[tc.min == 0])
			}
			if tc.min == 0 {
				return
			}
			// The same key, now a plain rule: the kept socket accepts at once.
			applyCommit(t, e, on+" -> 127.0.0.1:1")
			if got := deferSecs(e); got != 0 {
				t.Fatalf("kept socket, plain rule: TCP_DEFER_ACCEPT %d, want 0", got)
			}
		})
	}
}
