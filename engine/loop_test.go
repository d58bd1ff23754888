package engine

import (
	"context"
	"crypto/tls"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/internal/rawsys"
	"github.com/sluice-proxy/sluice/internal/testcert"
	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// onLoop runs fn on l's goroutine and waits for it: fn may touch everything
// the loop owns (its clock, wheel, table, sessions) as the loop itself does.
func onLoop(l *Loop, fn func()) {
	done := make(chan struct{})
	l.post(func(*Loop) { fn(); close(done) })
	<-done
}

// Every loop that fails to register an added listener reports it, at the
// same time: the first error must be kept under a lock (go test -race).
func TestSyncLoopsErrorRace(t *testing.T) {
	e, _ := start(t, "tcp 127.0.0.1:0 -> 127.0.0.1:1", Config{Loops: 4})
	ln := e.Listeners()[0]
	// Already polled by every loop: each one's epoll_ctl says EEXIST.
	if err := e.syncLoops(nil, []*Listener{ln}, nil); err == nil {
		t.Fatal("registering a listener every loop already polls: no error")
	}
}

// A stopped loop closed its eventfd; a wake-up asked of it afterwards must
// not write to whatever file got that number since.
func TestWakeAfterStop(t *testing.T) {
	e, err := New(Config{Loops: 1})
	if err != nil {
		t.Fatal(err)
	}
	e.Start()
	l := e.loops[0]
	old := l.wakefd
	if err := e.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	// Take the freed number with a file of our own.
	var mine []int
	defer func() {
		for _, fd := range mine {
			unix.Close(fd)
		}
	}()
	reused := -1
	for i := 0; i < 64 && reused < 0; i++ {
		fd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
		if err != nil {
			t.Fatal(err)
		}
		mine = append(mine, fd)
		if fd == old {
			reused = fd
		}
	}
	if reused < 0 {
		t.Skipf("fd %d was not handed out again", old)
	}
	l.wake()
	var buf [8]byte
	if n, err := unix.Read(reused, buf[:]); err != unix.EAGAIN {
		t.Errorf("the stopped loop's wake wrote into fd %d, now another file (read %d, %v)", reused, n, err)
	}
}

// Sessions parked for want of an fd (real EMFILE: the open-files limit is
// lowered to the fds in use) keep the connect deadline they got when they
// first parked and their place in line, however often the resume timer
// retries them, and each counts one pause. The loop is driven by the test
// on its own goroutine, with its clock stepped tick by tick.
func TestFdWaitKeepsDeadlineAndOrder(t *testing.T) {
	const connect = time.Second
	bfd := rawListener(t, 16)
	baddr, err := rawsys.Getsockname(bfd)
	if err != nil {
		t.Fatal(err)
	}
	e, _ := start(t, "tcp 127.0.0.1:0 -> "+baddr.String()+" timeout.connect=1s", Config{Loops: 1})
	ln := e.Listeners()[0]
	l := e.loops[0]

	var peers []int
	defer func() {
		for _, fd := range peers {
			unix.Close(fd)
		}
	}()
	clients := make([]int, 3)
	for i := range clients {
		p, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		clients[i] = p[0]
		peers = append(peers, p[1])
	}

	type seen struct {
		order            []int // indexes of the parked sessions, head first
		states           [3]sessionState
		pauses, resource uint64
		timeouts         uint64 // connect-timeout
	}
	var at []seen // after A's deadline, after C's
	onLoop(l, func() {
		var rl unix.Rlimit
		unix.Getrlimit(unix.RLIMIT_NOFILE, &rl)
		probe, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
		if err != nil {
			t.Errorf("eventfd: %v", err)
			return
		}
		unix.Close(probe)
		low := rl
		low.Cur = uint64(probe) // the lowest free fd is at the limit: every new fd is EMFILE
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &low); err != nil {
			t.Errorf("setrlimit: %v", err)
			return
		}
		defer unix.Setrlimit(unix.RLIMIT_NOFILE, &rl)

		ss := make([]*session, 3)
		index := func(s *session) int {
			for i, x := range ss {
				if x == s {
					return i
				}
			}
			return -1
		}
		snap := func() seen {
			var v seen
			for _, s := range l.fdWait {
				v.order = append(v.order, index(s))
			}
			for i, s := range ss {
				v.states[i] = s.state
			}
			v.pauses = ln.Paused.Load()
			v.resource = e.endCodes[conn.CodeResource].Load()
			v.timeouts = e.endCodes[conn.CodeConnectTimeout].Load()
			return v
		}
		t0 := l.now
		step := func(to time.Duration) {
			for l.now < t0+int64(to) {
				l.now += int64(tick)
				l.wheel.advance(l, l.now/int64(tick))
			}
		}
		// A, B, C park 300 ms apart; their deadlines are 1.0, 1.3, 1.6 s.
		for i, fd := range clients {
			step(time.Duration(i) * 300 * time.Millisecond)
			newSession(l, ln, fd, netip.MustParseAddrPort("127.0.0.1:1000"))
			clients[i] = -1
			ss[i] = l.fdWait[len(l.fdWait)-1]
		}
		// The resume timer retried them every 100 ms meanwhile. At A's
		// deadline A ends (resource); the fd its client held goes to B,
		// the oldest left, and C waits on. B's connect (never polled: the
		// test holds the loop) times out at B's first deadline, its two
		// fds go to C, whose connect times out at C's.
		step(connect + 2*tick)
		at = append(at, snap())
		step(600*time.Millisecond + connect + 2*tick)
		at = append(at, snap())
		for _, s := range ss {
			s.finish(l, conn.CodeStopping, true)
		}
	})
	if t.Failed() {
		return
	}
	a, c := at[0], at[1]
	t.Logf("at A's deadline: parked %v, states %v, pauses %d, resource %d, connect-timeout %d", a.order, a.states, a.pauses, a.resource, a.timeouts)
	t.Logf("at C's deadline: parked %v, states %v, pauses %d, resource %d, connect-timeout %d", c.order, c.states, c.pauses, c.resource, c.timeouts)
	if a.states[0] != stClosed || a.resource != 1 {
		t.Errorf("A still %v at its first connect deadline (resource %d): retries gave it a fresh one", a.states[0], a.resource)
	}
	if a.states[1] == stWaitFd || len(a.order) != 1 || a.order[0] != 2 {
		t.Errorf("the fd A freed did not go to B, the oldest waiting: B %v, parked %v", a.states[1], a.order)
	}
	if c.states[2] != stClosed || c.timeouts != 2 {
		t.Errorf("C still %v at its first connect deadline (connect-timeout %d)", c.states[2], c.timeouts)
	}
	if a.pauses != 3 {
		t.Errorf("%d pauses counted for 3 sessions that each paused once", a.pauses)
	}
}

// rawListener is a listening socket on 127.0.0.1 nobody accepts on:
// connects to it complete in the kernel's backlog.
func rawListener(t *testing.T, backlog int) int {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, backlog); err != nil {
		t.Fatal(err)
	}
	return fd
}

// freeSessions counts the session structs the engine's loops keep for reuse.
func freeSessions(e *Engine) int {
	n := 0
	var mu sync.Mutex
	e.onLoops(func(l *Loop) { mu.Lock(); n += len(l.free); mu.Unlock() })
	return n
}

// A plain session's struct is reused by a later one (recycle), at most
// maxFreeSessions per loop are kept, and a session whose TLS handshake ran
// on a goroutine is never reused (the goroutine may still post to it).
func TestSessionRecycle(t *testing.T) {
	be, err := testpeer.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(be.Close)
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+be.Addr(), Config{Loops: 1})
	var conns []*net.TCPConn
	for i := 0; i < maxFreeSessions+10; i++ { // all open at once, then all closed
		conns = append(conns, dial(t, addr))
	}
	waitActive(t, e, len(conns))
	for _, c := range conns {
		c.Close()
	}
	waitIdle(t, e)
	if n := freeSessions(e); n != maxFreeSessions {
		t.Fatalf("%d free session structs after %d sessions ended, want the bound %d", n, len(conns), maxFreeSessions)
	}
	for i := 0; i < 5; i++ { // one at a time: each takes a struct and gives it back
		c := dial(t, addr)
		if err := testpeer.Exchange(c, 100, 100, uint64(i)); err != nil {
			t.Fatal(err)
		}
		c.Close()
		waitIdle(t, e)
	}
	if n := freeSessions(e); n != maxFreeSessions {
		t.Fatalf("%d free session structs after sequential sessions, want %d", n, maxFreeSessions)
	}

	dir := t.TempDir()
	ca := testcert.NewCA(t, dir)
	cert, key := ca.Leaf(t, "srv", "a.example.com")
	e2, addr2 := start(t, "tcp 127.0.0.1:0 -> "+be.Addr()+" tls.cert="+cert+" tls.key="+key, Config{Loops: 1})
	for i := 0; i < 3; i++ {
		c, err := tls.Dial("tcp", addr2, &tls.Config{RootCAs: caPool(t, ca), ServerName: "a.example.com"})
		if err != nil {
			t.Fatal(err)
		}
		if err := testpeer.Exchange(c, 100, 100, uint64(i)); err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	waitIdle(t, e2)
	if n := freeSessions(e2); n != 0 {
		t.Fatalf("%d TLS session structs kept for reuse, want 0", n)
	}

	// A routed session (its sessionExt holds the name) is reused too, and a
	// plain session in its struct shows nothing of the name.
	e3, routed := start(t, "tcp 127.0.0.1:0 -> "+be.Addr()+" sni=a.example.com", Config{Loops: 1})
	plain := listen(t, e3, "tcp 127.0.0.1:0 -> "+be.Addr())
	hello, err := testpeer.ClientHello("a.example.com")
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		c := dial(t, routed)
		if _, err := c.Write(hello); err != nil {
			t.Fatal(err)
		}
		waitActive(t, e3, 1)
		deadline := time.Now().Add(5 * time.Second)
		for l := e3.SessionList("", 0).List; len(l) != 1 || l[0].SNI != "a.example.com"; l = e3.SessionList("", 0).List {
			if time.Now().After(deadline) {
				t.Fatalf("routed session %d lists %+v, want one with sni a.example.com", i, l)
			}
			time.Sleep(time.Millisecond)
		}
		c.Close()
		waitIdle(t, e3)
		if n := freeSessions(e3); n != 1 {
			t.Fatalf("%d free session structs after routed session %d ended, want 1", n, i)
		}
	}
	c := dial(t, plain)
	defer c.Close()
	waitActive(t, e3, 1)
	if n := freeSessions(e3); n != 0 {
		t.Fatalf("%d free session structs with a plain session open, want 0: it took the routed one's", n)
	}
	l := e3.SessionList("", 0).List
	if len(l) != 1 || l[0].SNI != "" || l[0].ALPN != "" || l[0].Peer.IsValid() {
		t.Fatalf("a plain session in a routed one's struct lists %+v, want one without sni, alpn or peer", l)
	}
}

// waitActive waits until the engine holds n sessions.
func waitActive(t *testing.T, e *Engine, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for e.active.Load() != int64(n) {
		if time.Now().After(deadline) {
			t.Fatalf("%d sessions active, want %d", e.active.Load(), n)
		}
		time.Sleep(time.Millisecond)
	}
}

// A busy-polling loop (Config.BusyPoll) keeps calling epoll_wait without
// sleeping for the window after its last event, then sleeps as a loop
// without it does; without it, the loop sleeps at once.
func TestBusyPoll(t *testing.T) {
	be, err := testpeer.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(be.Close)
	const window = 300 * time.Millisecond
	for _, bp := range []time.Duration{0, window} {
		e, addr := start(t, "tcp 127.0.0.1:0 -> "+be.Addr(), Config{Loops: 1, BusyPoll: bp})
		l := e.loops[0]
		c := dial(t, addr)
		if err := testpeer.Exchange(c, 1000, 1000, 1); err != nil {
			t.Fatal(err)
		}
		c.Close()
		waitIdle(t, e) // reads a counter: no event for the loop
		w0 := l.waits.Load()
		time.Sleep(20 * time.Millisecond) // inside the window
		spun := l.waits.Load() - w0
		if bp == 0 && spun > 20 {
			t.Errorf("busy-poll off: %d epoll_waits in the 20 ms after the last event, want a few", spun)
		}
		if bp != 0 && spun < 50 {
			t.Errorf("busy-poll %s: %d epoll_waits in the 20 ms after the last event, want it polling", bp, spun)
		}
		time.Sleep(window + 200*time.Millisecond) // past the window
		w1 := l.waits.Load()
		time.Sleep(200 * time.Millisecond)
		if idle := l.waits.Load() - w1; idle > 20 {
			t.Errorf("busy-poll %s: %d epoll_waits in 200 ms with nothing to do past the window, want it asleep", bp, idle)
		}
	}
}
