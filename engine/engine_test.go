package engine

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/internal/testpeer"
	"github.com/sluice-proxy/sluice/rules"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// start runs an engine with one rule and returns its first listen address.
func start(t *testing.T, line string, cfg Config) (*Engine, string) {
	t.Helper()
	r, err := rules.Parse(line)
	if err != nil {
		t.Fatalf("parse %q: %v", line, err)
	}
	if cfg.Loops == 0 {
		cfg.Loops = 2
	}
	e, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	e.Start()
	lns, err := e.Listen(r)
	if err != nil {
		e.Shutdown(context.Background())
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		e.Shutdown(ctx)
	})
	return e, lns[0].Addr().String()
}

func backend(t *testing.T) *testpeer.Backend {
	b, err := testpeer.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	return b
}

// waitIdle waits until the engine has no session and lends no buffer or pipe.
func waitIdle(t *testing.T, e *Engine) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s := e.Stats()
		if s.Sessions == 0 && s.Pools.BuffersInUse == 0 && s.Pools.PipesInUse == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("engine not idle: %+v", s)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func dial(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return c.(*net.TCPConn)
}

// Concurrent exchanges of random sizes, both ways at once, each byte checked.
func TestConcurrentStreamsEveryMode(t *testing.T) {
	for _, mode := range []string{"on", "off", "auto"} {
		t.Run("splice="+mode, func(t *testing.T) {
			b := backend(t)
			e, addr := start(t, "tcp 127.0.0.1:0 -> "+b.Addr()+" splice="+mode, Config{})
			const n = 60
			var wg sync.WaitGroup
			errs := make(chan error, n)
			for i := 0; i < n; i++ {
				wg.Add(1)
				go func(i int) {
					defer wg.Done()
					rng := rand.New(rand.NewPCG(uint64(i), 7))
					up, down := 1+rng.Int64N(512<<10), 1+rng.Int64N(512<<10)
					c, err := net.Dial("tcp", addr)
					if err != nil {
						errs <- err
						return
					}
					defer c.Close()
					if err := testpeer.Exchange(c, up, down, uint64(i)); err != nil {
						errs <- fmt.Errorf("stream %d (up %d, down %d): %w", i, up, down, err)
					}
				}(i)
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
			waitIdle(t, e)
			if got := e.Stats().Ended["done"]; got != n {
				t.Errorf("sessions ended done: %d, want %d (%v)", got, n, e.Stats().Ended)
			}
		})
	}
}

// The client shuts its write side first; the backend's reply after that EOF
// arrives whole (the exchange's trailer), and the session then ends cleanly.
func TestHalfClose(t *testing.T) {
	b := backend(t)
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+b.Addr(), Config{})
	c := dial(t, addr)
	defer c.Close()
	if err := testpeer.Exchange(c, 10, 100000, 1); err != nil {
		t.Fatal(err)
	}
	waitIdle(t, e)
}

func TestBackendRefused(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := ln.Addr().String()
	ln.Close() // nothing listens there now
	b := backend(t)
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+dead+" timeout.connect=2s", Config{})
	c := dial(t, addr)
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if n, err := c.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("read %d, %v: want EOF, the proxy closing", n, err)
	}
	c.Close()
	waitIdle(t, e)
	if e.Stats().Ended["connect-refused"] != 1 {
		t.Errorf("ended: %v", e.Stats().Ended)
	}
	_ = b
}

// A pool whose first backend refuses: the session goes to the next.
func TestRetryNextBackend(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := ln.Addr().String()
	ln.Close()
	b := backend(t)
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+dead+","+b.Addr(), Config{})
	for i := 0; i < 4; i++ { // round robin starts on each backend in turn
		c := dial(t, addr)
		if err := testpeer.Exchange(c, 100, 100, uint64(i)); err != nil {
			t.Fatalf("exchange %d: %v", i, err)
		}
		c.Close()
	}
	waitIdle(t, e)
	if e.Stats().ConnectErrors == 0 {
		t.Error("no connect error counted")
	}
}

// fillBacklog returns an address whose SYNs are dropped: a listener with a
// zero backlog whose accept queue is full and never drained.
func fillBacklog(t *testing.T) string {
	t.Helper()
	fd := rawListener(t, 0)
	sa, _ := unix.Getsockname(fd)
	addr := fmt.Sprintf("127.0.0.1:%d", sa.(*unix.SockaddrInet4).Port)
	for i := 0; i < 8; i++ {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err != nil {
			return addr // the queue is full: SYNs are now dropped
		}
		t.Cleanup(func() { c.Close() })
	}
	t.Fatal("could not fill the accept queue")
	return ""
}

func TestBackendSilent(t *testing.T) {
	silent := fillBacklog(t)
	b := backend(t)
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+silent+" timeout.connect=300ms", Config{})
	began := time.Now()
	c := dial(t, addr)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("read: %v, want EOF", err)
	}
	if took := time.Since(began); took > 3*time.Second {
		t.Errorf("closed after %v; connect timeout is 300ms", took)
	}
	c.Close()
	// The daemon keeps serving: another rule to a live backend works.
	r, _ := rules.Parse("tcp 127.0.0.1:0 -> " + b.Addr())
	lns, err := e.Listen(r)
	if err != nil {
		t.Fatal(err)
	}
	c2 := dial(t, lns[0].Addr().String())
	defer c2.Close()
	if err := testpeer.Exchange(c2, 1000, 1000, 3); err != nil {
		t.Fatal(err)
	}
	waitIdle(t, e)
	if e.Stats().Ended["connect-timeout"] != 1 {
		t.Errorf("ended: %v", e.Stats().Ended)
	}
}

// A client that sends its request and its FIN while the backend connect is
// still pending: both were signalled (edge-triggered) before the channels
// existed, so the first pump must read on to the end of input, not stop at the
// short read and wait for an edge that already passed.
func TestFinQueuedDuringConnect(t *testing.T) {
	silent := fillBacklog(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() { // reads to EOF, answers with what it read, closes
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				b, _ := io.ReadAll(c)
				c.Write(append([]byte("got "), b...))
			}()
		}
	}()
	// Round robin: of two sessions one waits out the silent backend's
	// connect timeout, with its request and FIN queued all along.
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+silent+","+ln.Addr().String()+" timeout.connect=200ms", Config{Loops: 1})
	for i := 0; i < 2; i++ {
		c := dial(t, addr)
		if _, err := c.Write([]byte("hello")); err != nil {
			t.Fatal(err)
		}
		c.CloseWrite()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, err := io.ReadAll(c)
		c.Close()
		if err != nil || string(got) != "got hello" {
			t.Fatalf("session %d: read %q, %v; want \"got hello\" then EOF", i, got, err)
		}
	}
	waitIdle(t, e)
	if e.Stats().Ended["connect-timeout"] != 0 || e.Stats().ConnectErrors == 0 {
		t.Errorf("want one connect error retried on the live backend: %+v", e.Stats())
	}
}

// A reset from the backend closes the client promptly, with a reset.
func TestResetPropagates(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		c.Write([]byte("hello"))
		c.(*net.TCPConn).SetLinger(0)
		time.Sleep(50 * time.Millisecond)
		c.Close()
	}()
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+ln.Addr().String(), Config{})
	c := dial(t, addr)
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatal(err)
	}
	_, err = c.Read(buf)
	if err == nil || err == io.EOF {
		// A reset is what we promise; EOF would mean the reset was hidden.
		t.Fatalf("after backend reset: %v, want a connection reset", err)
	}
	waitIdle(t, e)
	if e.Stats().Ended["server-reset"] != 1 {
		t.Errorf("ended: %v", e.Stats().Ended)
	}
}

func TestIdleTimeout(t *testing.T) {
	b := backend(t)
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+b.Addr()+" timeout.idle=200ms", Config{})
	// Timed from before the dial: the session's idle clock starts at its
	// accept, which may come before this goroutine runs again.
	began := time.Now()
	c := dial(t, addr)
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("read: %v, want EOF", err)
	}
	if took := time.Since(began); took < 200*time.Millisecond {
		t.Errorf("closed after %v, before the idle timeout", took)
	}
	waitIdle(t, e)
	if e.Stats().Ended["idle-timeout"] != 1 {
		t.Errorf("ended: %v", e.Stats().Ended)
	}
}

func TestShutdownDrains(t *testing.T) {
	b := backend(t)
	r, _ := rules.Parse("tcp 127.0.0.1:0 -> " + b.Addr())
	e, err := New(Config{Loops: 1})
	if err != nil {
		t.Fatal(err)
	}
	e.Start()
	lns, err := e.Listen(r)
	if err != nil {
		t.Fatal(err)
	}
	addr := lns[0].Addr().String()
	c := dial(t, addr)
	defer c.Close()
	// Accepted, not only queued (Shutdown closes the listener, which resets
	// what still waits in its accept queue), and live: the client has sent
	// nothing yet, so the session cannot end before Shutdown begins.
	waitStats(t, e, "the session to be accepted", func(s Stats) bool { return s.Sessions == 1 })
	// And past its (empty) incoming chain: a session still in it when the
	// drain begins is refused, as a new one is (sessionStep).
	waitFor(t, "the session to leave its handshake", func() bool { return e.handshaking.Load() == 0 })
	stopped := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		stopped <- e.Shutdown(ctx)
	}()
	waitFor(t, "the engine to start draining", e.Draining)
	// The session that holds the stop up is listed (ctl sessions while
	// the daemon drains).
	if l := e.SessionList("", 0); l.Total != 1 || len(l.List) != 1 || l.List[0].Rule != lns[0].ruleName() {
		t.Errorf("sessions while draining: %+v", l)
	}
	// And its rule's counters still read (ctl stats while the daemon drains),
	// though its listener is closed.
	if st := e.Stats(); len(st.Rules) != 1 || st.Rules[0].Sessions != 1 || st.Rules[0].Policy.Accepted != 1 {
		t.Errorf("rule stats while draining: %+v", st.Rules)
	}
	time.Sleep(300 * time.Millisecond) // the session outlives the stop's start by far
	if err := testpeer.ExchangeSlow(c, 1000, 1<<20, 9, 200*time.Millisecond); err != nil {
		t.Fatalf("session cut by a graceful stop: %v", err)
	}
	if err := <-stopped; err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	if _, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		t.Fatal("still accepting after shutdown")
	}
}

// Both ends of a session send small writes at once: TCP_NODELAY on the
// backend socket, and on the client's, which inherits it from the listener.
func TestSessionSocketsNoDelay(t *testing.T) {
	b := backend(t)
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+b.Addr(), Config{Loops: 1})
	c := dial(t, addr)
	defer c.Close()
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	waitStats(t, e, "the session to connect its backend", func(s Stats) bool { return s.Sessions == 1 && s.Rules[0].Backends[0].Active == 1 })
	var fds []int
	e.onLoops(func(l *Loop) {
		for _, h := range l.table {
			if s, ok := h.(*session); ok && !slices.Contains(fds, s.cli.FD()) {
				fds = append(fds, s.cli.FD(), s.srv.FD())
			}
		}
	})
	if len(fds) != 2 {
		t.Fatalf("session fds %v, want the client's and the backend's", fds)
	}
	for i, fd := range fds {
		if v, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY); err != nil || v == 0 {
			t.Errorf("%s socket: TCP_NODELAY = %d, %v", []string{"client", "backend"}[i], v, err)
		}
	}
}
