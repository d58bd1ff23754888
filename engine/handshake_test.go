package engine

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/pires/go-proxyproto"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/sluice-proxy/sluice/internal/testpeer"
	"github.com/sluice-proxy/sluice/rules"
)

// An idle established session is the session struct alone: the handshake
// state was given back. 2 KiB is the design goal for everything an idle
// session costs; the struct must stay far below it.
func TestSessionSize(t *testing.T) {
	if n := unsafe.Sizeof(session{}); n > 448 {
		t.Errorf("session is %d bytes; keep per-session fields small (handshake state belongs in handshake.State)", n)
	}
}

func TestSessionNames(t *testing.T) {
	for bit := sessionFlags(1); bit != 0 && bit <= allSessionFlags; bit <<= 1 {
		if allSessionFlags&bit != 0 && strings.HasPrefix(bit.String(), "0x") {
			t.Errorf("session flag %#x has no name", uint8(bit))
		}
	}
	for st := stHandshake; st <= stClosed; st++ {
		if strings.HasPrefix(st.String(), "state-") {
			t.Errorf("session state %d has no name", st)
		}
	}
}

// proxyEcho is a backend that reads the PROXY header sluice sends, with the
// library, and answers "SRC DST\n" followed by an echo of the stream.
func proxyEcho(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	testpeer.Accept(ln, func(c net.Conn) {
		defer c.Close()
		r := bufio.NewReader(c)
		h, err := proxyproto.Read(r)
		if err != nil {
			fmt.Fprintf(c, "ERR %v\n", err)
			return
		}
		s, d, _ := h.TCPAddrs()
		tl, _ := h.TLVs()
		auth := ""
		for _, x := range tl {
			if x.Type == proxyproto.PP2_TYPE_AUTHORITY {
				auth = string(x.Value)
			}
		}
		fmt.Fprintf(c, "%v %v %d %s\n", s, d, h.Version, auth)
		io.Copy(c, r)
		c.(*net.TCPConn).CloseWrite()
	})

	return ln.Addr().String()
}

func observed(level zap.AtomicLevel) (*zap.Logger, *observer.ObservedLogs) {
	core, logs := observer.New(level)
	return zap.New(core), logs
}

// accept-proxy in, send-proxy out: the client address of the incoming header
// reaches the backend, the TLVs are passed on, the payload after the header
// arrives whole (and is spliced: nothing was left behind in user space).
func TestProxyInAndOut(t *testing.T) {
	back := proxyEcho(t)
	for _, v := range []string{"v1", "v2"} {
		t.Run(v, func(t *testing.T) {
			log, logs := observed(zap.NewAtomicLevelAt(zap.InfoLevel))
			e, addr := start(t, "tcp 127.0.0.1:0 -> "+back+" accept-proxy=127.0.0.0/8 send-proxy="+v+" splice=on", Config{Log: log})
			c := dial(t, addr)
			defer c.Close()
			h := proxyproto.HeaderProxyFromAddrs(2, &net.TCPAddr{IP: net.IPv4(192, 0, 2, 7), Port: 4242}, &net.TCPAddr{IP: net.IPv4(198, 51, 100, 1), Port: 443})
			h.SetTLVs([]proxyproto.TLV{{Type: proxyproto.PP2_TYPE_AUTHORITY, Value: []byte("example.com")}})
			hb, _ := h.Format()
			payload := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
			go func() {
				c.Write(append(hb, payload[:100]...)) // header and payload in one segment
				c.Write(payload[100:])
				c.CloseWrite()
			}()
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			r := bufio.NewReader(c)
			line, err := r.ReadString('\n')
			if err != nil {
				t.Fatal(err)
			}
			want := "192.0.2.7:4242 198.51.100.1:443 1 \n"
			if v == "v2" {
				want = "192.0.2.7:4242 198.51.100.1:443 2 example.com\n"
			}
			if line != want {
				t.Fatalf("backend saw %q, want %q", line, want)
			}
			got, err := io.ReadAll(r)
			if err != nil || !bytes.Equal(got, payload) {
				t.Fatalf("echo: %d bytes, %v", len(got), err)
			}
			waitIdle(t, e)
			ln := e.Listeners()[0]
			s := ln.Policy().Stats()
			if s.ProxyV2 != 1 || s.SentV1+s.SentV2 != 1 || s.Ended["done"] != 1 {
				t.Errorf("rule stats %+v", s)
			}
			ent := logs.FilterMessage("session").All()
			if len(ent) != 1 {
				t.Fatalf("%d session log lines", len(ent))
			}
			f := ent[0].ContextMap()
			if f["src"] != "192.0.2.7:4242" || f["spliced"].(uint64) == 0 {
				t.Errorf("session log %v: want the header's source and spliced bytes", f)
			}
		})
	}
}

// dialFrom connects to addr from source address from ("": any).
func dialFrom(addr, from string) (net.Conn, error) {
	d := net.Dialer{Timeout: 2 * time.Second}
	if from != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
	}
	return d.Dial("tcp", addr)
}

// httpGet sends a GET from source address from and returns the whole reply.
func httpGet(t *testing.T, addr string, from string) (string, error) {
	t.Helper()
	c, err := dialFrom(addr, from)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "GET / HTTP/1.0\r\n\r\n")
	b, err := io.ReadAll(c)
	return string(b), err
}

// A health-only rule answers 200; while the engine drains (a live session
// holds it) the same port answers 503; after the drain it is closed.
func TestHealthDrain(t *testing.T) {
	b := backend(t)
	e, haddr := start(t, "tcp 127.0.0.1:0 health=http", Config{})
	line := "tcp 127.0.0.1:0 -> " + b.Addr()
	r, _ := rules.Parse(line)
	lns, err := e.Listen(r)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := httpGet(t, haddr, ""); err != nil || !strings.HasPrefix(got, "HTTP/1.0 200 OK\r\n") {
		t.Fatalf("before drain: %q %v", got, err)
	}
	c := dial(t, lns[0].Addr().String())
	defer c.Close()
	hold := make(chan struct{})
	go func() { c.Write([]byte("x")); <-hold; c.Close() }() // a live session
	// Accepted, not only queued: Shutdown resets what waits in the queue.
	waitStats(t, e, "the session to be accepted", func(s Stats) bool {
		return slices.ContainsFunc(s.Rules, func(r RuleStats) bool { return r.Line == line && r.Sessions == 1 })
	})
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done <- e.Shutdown(ctx)
	}()
	deadline := time.Now().Add(5 * time.Second)
	for !e.Draining() && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	for i := 0; i < 3; i++ {
		got, err := httpGet(t, haddr, "")
		if err != nil || !strings.HasPrefix(got, "HTTP/1.0 503 Service Unavailable\r\n") {
			t.Fatalf("while draining: %q %v", got, err)
		}
	}
	// Shutdown closes the forwarding listener just after it starts
	// draining; give it the moment it needs on a loaded machine.
	for closed := false; !closed; time.Sleep(10 * time.Millisecond) {
		c, err := net.DialTimeout("tcp", lns[0].Addr().String(), time.Second)
		if closed = err != nil; !closed {
			c.Close()
			if time.Now().After(deadline) {
				t.Fatal("the forwarding port still accepts while draining")
			}
		}
	}
	select {
	case err := <-done:
		t.Fatalf("drain ended with a session live: %v", err)
	default:
	}
	close(hold)
	if err := <-done; err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	if _, err := net.DialTimeout("tcp", haddr, time.Second); err == nil {
		t.Error("the health port still accepts after the drain")
	}
}

// A rule with a target answers monitor sources itself; once its only
// backend refused, the reply is 503 and other sources still go to the pool.
func TestMonitorHealthFollowsBackends(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := ln.Addr().String()
	ln.Close()
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+dead+" health=http monitor=127.0.0.3/32", Config{})
	if got, err := httpGet(t, addr, "127.0.0.3"); err != nil || !strings.HasPrefix(got, "HTTP/1.0 200") {
		t.Fatalf("monitor source: %q %v", got, err)
	}
	if got, _ := httpGet(t, addr, "127.0.0.2"); got != "" {
		t.Fatalf("a non-monitor source got %q, want its conn closed by the refused backend", got)
	}
	if got, err := httpGet(t, addr, "127.0.0.3"); err != nil || !strings.HasPrefix(got, "HTTP/1.0 503") {
		t.Fatalf("monitor source with the pool down: %q %v", got, err)
	}
	waitIdle(t, e)
	s := e.Listeners()[0].Policy().Stats()
	if s.MonitorHits != 2 || s.HealthUp != 1 || s.HealthDown != 1 || s.Ended["connect-refused"] != 1 {
		t.Errorf("stats %+v", s)
	}
}

// A handshake that does not finish within timeout.handshake is closed and
// counted on the step it was stuck in.
func TestHandshakeTimeout(t *testing.T) {
	b := backend(t)
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+b.Addr()+" accept-proxy timeout.handshake=300ms", Config{})
	c := dial(t, addr)
	defer c.Close()
	began := time.Now()
	c.Write([]byte("PROXY TCP4 "))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("read data from a conn that never finished its header")
	}
	if took := time.Since(began); took < 250*time.Millisecond || took > 3*time.Second {
		t.Errorf("closed after %v, timeout 300ms", took)
	}
	waitIdle(t, e)
	s := e.Listeners()[0].Policy().Stats()
	if s.Refused["accept-proxy"]["handshake-timeout"] != 1 || e.Stats().Ended["handshake-timeout"] != 1 {
		t.Errorf("stats %+v / %v", s, e.Stats().Ended)
	}
	if b.Conns() != 0 || b.Served.Load()+b.Failures.Load() != 0 {
		t.Error("the backend was dialed for a conn that failed its handshake")
	}
}

func TestMaxConnInEngine(t *testing.T) {
	b := backend(t)
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+b.Addr()+" maxconn=2", Config{})
	inUse := func(n int) func() bool {
		return func() bool { return e.Listeners()[0].Policy().Stats().MaxConnInUse == int64(n) }
	}
	c1, c2 := dial(t, addr), dial(t, addr)
	waitFor(t, "both conns to hold a slot", inUse(2))
	if refusedFrom(t, addr, "") {
		t.Fatal("third conn over maxconn=2 was served")
	}
	c1.Close()
	waitFor(t, "the closed conn's slot to free", inUse(1))
	c4 := dial(t, addr)
	if err := exchange(c4); err != nil {
		t.Fatalf("after a slot freed: %v", err)
	}
	c2.Close()
	waitIdle(t, e)
	s := e.Listeners()[0].Policy().Stats()
	if s.MaxConnRefused != 1 || s.MaxConnInUse != 0 {
		t.Errorf("stats %+v", s)
	}
}

// A backend that refused is skipped afterwards: one connect error for many
// sessions, not one per session (round robin would otherwise try it every
// other session).
func TestPassiveHealthSkipsDeadBackend(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := ln.Addr().String()
	ln.Close()
	b := backend(t)
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+dead+","+b.Addr()+" balance=roundrobin", Config{Loops: 1})
	for i := 0; i < 6; i++ {
		c := dial(t, addr)
		if err := exchange(c); err != nil {
			t.Fatalf("session %d: %v", i, err)
		}
	}
	waitIdle(t, e)
	if n := e.Stats().ConnectErrors; n != 1 {
		t.Errorf("%d connect errors; the dead backend should be tried once", n)
	}
	st := e.Listeners()[0].Pool().Stats(0)
	if st[0].Failures != 1 || st[1].Active != 0 {
		t.Errorf("pool %+v", st)
	}
}

func TestDenyInEngine(t *testing.T) {
	b := backend(t)
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+b.Addr()+" deny=127.0.0.5/32", Config{})
	if refusedFrom(t, addr, "127.0.0.5") {
		t.Fatal("denied source was served")
	}
	if err := exchange(dial(t, addr)); err != nil {
		t.Fatalf("allowed source: %v", err)
	}
	waitIdle(t, e)
	if s := e.Listeners()[0].Policy().Stats(); s.Refused["rules"]["denied"] != 1 || s.Ended["done"] != 1 {
		t.Errorf("stats %+v", s)
	}
}

// refusedFrom connects to addr (from a given source address, or any) and
// reports whether the conn was served: false when sluice closed or reset it,
// which a fast reset can make the dial itself report.
func refusedFrom(t *testing.T, addr, from string) (served bool) {
	t.Helper()
	c, err := dialFrom(addr, from)
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	c.Write(make([]byte, 16))
	_, err = c.Read(make([]byte, 1))
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return true // held open: that is being served (the backend waits for more)
	}
	return err == nil
}

// exchange runs one small checked exchange through c, then closes it.
func exchange(c *net.TCPConn) error {
	defer c.Close()
	return testpeer.Exchange(c, 1000, 1000, 1)
}

// A source outside accept-proxy's trusted list may connect without a header,
// but a header from it is refused (proxy-not-trusted), even one split across
// segments; its other bytes are payload, and a server that speaks first is
// heard before the client sends anything.
func TestUntrustedHeaderRefused(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	testpeer.Accept(ln, func(c net.Conn) { // greets first, then echoes
		defer c.Close()
		c.Write([]byte("220 hello\n"))
		io.Copy(c, c)
	})
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+ln.Addr().String()+" accept-proxy=10.0.0.0/8", Config{Loops: 1})

	readLine := func(c net.Conn) (string, error) {
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		return bufio.NewReader(c).ReadString('\n')
	}
	// Server first: the greeting arrives while the client is silent.
	c := dial(t, addr)
	if got, err := readLine(c); err != nil || got != "220 hello\n" {
		t.Fatalf("greeting %q, %v", got, err)
	}
	// Then payload flows both ways, even bytes that merely look like a
	// PROXY header somewhere later in the stream.
	c.Write([]byte("hello, PROXY is a word here\n"))
	buf := make([]byte, 28)
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "hello, PROXY is a word here\n" {
		t.Fatalf("echo %q, %v", buf, err)
	}
	c.Close()

	for _, parts := range [][]string{
		{"PROXY TCP4 1.2.3.4 5.6.7.8 1000 80\r\nGET / HTTP/1.0\r\n\r\n"},
		{"PRO", "XY TCP4 1.2.3.4 5.6.7.8 1000 80\r\n"},
		{"\r\n\r\n\x00\r\nQU", "IT\n\x21\x11\x00\x0c\x01\x02\x03\x04\x05\x06\x07\x08\x03\xe8\x00\x50"},
	} {
		c := dial(t, addr)
		readLine(c) // the greeting
		for _, p := range parts {
			c.Write([]byte(p))
			time.Sleep(20 * time.Millisecond)
		}
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		if n, err := c.Read(make([]byte, 64)); err == nil {
			t.Errorf("%q: the header went through (%d bytes back)", parts, n)
		}
		c.Close()
	}
	waitFor(t, "three conns ended proxy-not-trusted", func() bool { return e.Stats().Ended["proxy-not-trusted"] == 3 })
}
