package engine

import (
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/balance"
	"github.com/sluice-proxy/sluice/internal/rawsys"
	"github.com/sluice-proxy/sluice/internal/testpeer"
	"github.com/sluice-proxy/sluice/rules"
)

func udpEcho(t *testing.T) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(testpeer.UDPEcho(pc))
	return pc.LocalAddr().String()
}

func dialUDP(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// waitStats polls the engine's counters until ok says yes, or fails.
func waitStats(t *testing.T, e *Engine, what string, ok func(Stats) bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !ok(e.Stats()) {
		if time.Now().After(deadline) {
			t.Fatalf("%s: stats %+v", what, e.Stats())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Many clients at once, each its own flow: every datagram comes back whole
// to the client that sent it; flows expire after timeout.idle. (Sizes stay
// small here: 20 clients' 64 KiB datagrams at once would overflow the
// sockets' receive buffers, a loss UDP allows; TestUDPLargeDatagrams sends
// those one at a time.)
func TestUDPFlows(t *testing.T) {
	echo := udpEcho(t)
	e, addr := start(t, "udp 127.0.0.1:0 -> "+echo+" timeout.idle=300ms", Config{})
	const clients, each = 20, 50
	sizes := []int{1, 8, 100, 1400, 512}
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for id := 0; id < clients; id++ {
		c := dialUDP(t, addr)
		wg.Add(1)
		go func(id int) {
			defer wg.Done()
			if err := testpeer.UDPPingPong(c, id, each, sizes, 2*time.Second); err != nil {
				errs <- err
			}
		}(id)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	waitStats(t, e, "every datagram counted once each way", func(s Stats) bool {
		return s.UDPFlowsOpened == clients && s.UDPDatagramsUp == clients*each && s.UDPDatagramsDown == clients*each && s.UDPDropped == 0
	})
	waitStats(t, e, "flows expire after timeout.idle", func(s Stats) bool { return s.UDPFlows == 0 && s.UDPFlowsExpired == clients })
	// A client that comes back after expiry gets a new flow and is served.
	if err := testpeer.UDPPingPong(dialUDP(t, addr), 99, 3, sizes, 2*time.Second); err != nil {
		t.Fatal(err)
	}
}

// Datagrams up to the largest UDP payload over loopback keep their size:
// never merged, never split.
func TestUDPLargeDatagrams(t *testing.T) {
	echo := udpEcho(t)
	e, addr := start(t, "udp 127.0.0.1:0 -> "+echo, Config{Loops: 1})
	sizes := []int{65507, 1, 9000, 32768, 65000}
	if err := testpeer.UDPPingPong(dialUDP(t, addr), 1, 20, sizes, 2*time.Second); err != nil {
		t.Fatal(err)
	}
	// The last reply may reach the client just before it is counted.
	waitStats(t, e, "20 datagrams each way", func(s Stats) bool { return s.UDPDatagramsUp == 20 && s.UDPDatagramsDown == 20 })
}

// The flow table is bounded: past MaxFlows, datagrams of new sources are
// dropped and counted while existing flows keep working.
func TestUDPFlowTableBounded(t *testing.T) {
	echo := udpEcho(t)
	e, addr := start(t, "udp 127.0.0.1:0 -> "+echo, Config{Loops: 1, MaxFlows: 2})
	a, b, c := dialUDP(t, addr), dialUDP(t, addr), dialUDP(t, addr)
	for id, cl := range []net.Conn{a, b} {
		if err := testpeer.UDPPingPong(cl, id, 2, []int{64}, 2*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	if err := testpeer.UDPPingPong(c, 3, 1, []int{64}, 300*time.Millisecond); err == nil {
		t.Fatal("a third flow was served past MaxFlows=2")
	}
	waitStats(t, e, "the third source's datagram is counted as dropped", func(s Stats) bool { return s.UDPDropped == 1 && s.UDPFlows == 2 })
	if err := testpeer.UDPPingPong(a, 0, 2, []int{64}, 2*time.Second); err != nil {
		t.Fatalf("an existing flow stopped working: %v", err)
	}
}

// A target with nothing listening: the kernel's port-unreachable closes the
// flow, and the engine keeps serving the next client.
func TestUDPTargetUnreachable(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := pc.LocalAddr().String()
	pc.Close()
	e, addr := start(t, "udp 127.0.0.1:0 -> "+dead, Config{Loops: 1})
	c := dialUDP(t, addr)
	for i := 0; i < 3; i++ {
		c.Write([]byte("anyone?"))
		time.Sleep(20 * time.Millisecond)
	}
	waitStats(t, e, "the refused flow is closed", func(s Stats) bool { return s.UDPFlowsOpened >= 1 && s.UDPFlows == 0 })
}

// udpNamed runs a udp target that answers every datagram with its name, so a
// client can tell which backend of a pool its flow reached.
func udpNamed(t *testing.T, name string) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 64)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo([]byte(name), from)
		}
	}()
	t.Cleanup(func() { pc.Close(); wg.Wait() })
	return pc.LocalAddr().String()
}

// deadUDP returns a loopback address with no socket bound: a datagram sent
// there gets a port-unreachable.
func deadUDP(t *testing.T) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := pc.LocalAddr().String()
	pc.Close()
	return addr
}

// dialUDPFrom opens a new client source on address from (any 127/8 address
// is local): a new flow on the engine.
func dialUDPFrom(t *testing.T, from, addr string) net.Conn {
	t.Helper()
	raddr, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.DialUDP("udp", &net.UDPAddr{IP: net.ParseIP(from)}, raddr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// ask sends one datagram on c and returns the name of the backend that
// answered, or "" when none did within a second.
func ask(t *testing.T, c net.Conn) string {
	t.Helper()
	if _, err := c.Write([]byte("who?")); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(time.Second))
	buf := make([]byte, 64)
	n, err := c.Read(buf)
	if err != nil {
		return ""
	}
	return string(buf[:n])
}

// backendStats returns the state of the engine's first listener's backends,
// in the rule's order (any clock: only a mark counts as down).
func backendStats(e *Engine) []balance.BackendStats { return e.Listeners()[0].Pool().Stats(0) }

// UDP rules pick each flow's backend through the listener's pool, as tcp
// does: balance= is honoured, and the pool counts the live flows of each
// backend (which leastconn reads).
func TestUDPBalance(t *testing.T) {
	for _, tc := range []struct {
		balance string
		sources []string // one flow per entry, opened in this order
		busy    int      // flows pretended live on backend b0 before the test's (leastconn)
		check   func(got []string) error
	}{
		{"roundrobin", []string{"127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.1"}, 0,
			func(got []string) error {
				for k, name := range got {
					if want := fmt.Sprintf("b%d", k%2); name != want {
						return fmt.Errorf("flow %d went to %s, want %s: flows do not take turns", k, name, want)
					}
				}
				return nil
			}},
		{"source", []string{"127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.2", "127.0.0.3", "127.0.0.4"}, 0,
			func(got []string) error {
				for k := 3; k < len(got); k++ {
					if got[k] != got[k%3] {
						return fmt.Errorf("source 127.0.0.%d: flow %d went to %s, its first to %s", k%3+2, k, got[k], got[k%3])
					}
				}
				return nil
			}},
		{"leastconn", []string{"127.0.0.1", "127.0.0.1", "127.0.0.1"}, 3,
			func(got []string) error {
				// b0 carries 3 flows: the next 3 go to b1 (round robin would
				// send the first and the third to b0).
				for k, name := range got {
					if name != "b1" {
						return fmt.Errorf("flow %d went to %s, want b1, the backend with fewer flows", k, name)
					}
				}
				return nil
			}},
	} {
		t.Run(tc.balance, func(t *testing.T) {
			targets := udpNamed(t, "b0") + "," + udpNamed(t, "b1")
			e, addr := start(t, "udp 127.0.0.1:0 -> "+targets+" balance="+tc.balance, Config{Loops: 1})
			pool := e.Listeners()[0].Pool()
			for i := 0; i < tc.busy; i++ {
				pool.Acquire(0)
			}
			var got []string
			perBackend := map[string]int32{}
			for k, src := range tc.sources {
				name := ask(t, dialUDPFrom(t, src, addr))
				if name == "" {
					t.Fatalf("flow %d from %s: no reply", k, src)
				}
				got = append(got, name)
				perBackend[name]++
			}
			if err := tc.check(got); err != nil {
				t.Fatalf("balance=%s: %v (flows went to %v)", tc.balance, err, got)
			}
			for i := 0; i < tc.busy; i++ {
				pool.Release(0)
			}
			// Every live flow is counted on its backend, and on it only.
			for i, b := range backendStats(e) {
				if name := fmt.Sprintf("b%d", i); b.Active != perBackend[name] || !b.Up || b.Failures != 0 {
					t.Errorf("backend %s: %+v, want %d flows, up, no failure", name, b, perBackend[name])
				}
			}
			if s := e.Stats(); s.UDPFlows != int64(len(tc.sources)) {
				t.Errorf("%d live flows, want %d", s.UDPFlows, len(tc.sources))
			}
		})
	}
}

// Passive health on udp rules: a backend whose connect(2) fails, or whose
// flow the kernel reports unreachable (the port-unreachable of a port with
// nothing bound), is marked down, and new flows skip it for the live one
// while the mark lasts (balance.DownFor).
func TestUDPPassiveHealth(t *testing.T) {
	for _, tc := range []struct {
		name string
		dead string // the pool's first backend, the one round robin gives the first flow
		// firstServed: the first flow is served too (its datagram goes on
		// to the next backend) rather than lost with the refused flow.
		firstServed bool
	}{
		// connect(2) of a datagram socket to the broadcast address without
		// SO_BROADCAST fails at once (EACCES).
		{"connect fails", "255.255.255.255:9", true},
		{"port unreachable", "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dead := tc.dead
			if dead == "" {
				dead = deadUDP(t)
			}
			live := udpNamed(t, "live")
			e, addr := start(t, "udp 127.0.0.1:0 -> "+dead+","+live, Config{Loops: 1})
			first := dialUDP(t, addr)
			if got := ask(t, first); (got == "live") != tc.firstServed {
				t.Fatalf("first flow answered by %q, served=%v, want served=%v", got, got != "", tc.firstServed)
			}
			deadline := time.Now().Add(5 * time.Second)
			for b := backendStats(e)[0]; b.Up || b.Failures != 1 || b.Active != 0; b = backendStats(e)[0] {
				if time.Now().After(deadline) {
					t.Fatalf("dead backend never marked down with its flow released: %+v", b)
				}
				time.Sleep(10 * time.Millisecond)
			}
			// Round robin alone would give every other flow to the dead
			// backend: each one is served by the live one, and the dead one
			// is not tried again (one failure).
			for k := 0; k < 4; k++ {
				if got := ask(t, dialUDP(t, addr)); got != "live" {
					t.Fatalf("flow %d after the failure answered by %q, want live", k, got)
				}
			}
			if got := ask(t, first); got != "live" {
				t.Fatalf("the first source again: answered by %q, want live", got)
			}
			st := backendStats(e)
			if st[0].Failures != 1 || st[0].Up || st[1].Failures != 0 || !st[1].Up {
				t.Fatalf("backends %+v: want the dead one down after its one failure, the live one up", st)
			}
			if tc.dead == "" && st[0].Active != 0 {
				t.Errorf("the refused flow is still counted on its backend: %+v", st[0])
			}
		})
	}
}

// unreachable names the errors of a flow's socket that mark its backend down.
func TestUDPUnreachable(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{unix.ECONNREFUSED, true},
		{unix.EHOSTUNREACH, true},
		{unix.ENETUNREACH, true},
		{unix.EAGAIN, false},
		{unix.ENOBUFS, false},
		{unix.EMSGSIZE, false},
		{nil, false},
	} {
		if got := unreachable(tc.err); got != tc.want {
			t.Errorf("unreachable(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

// boundUDP returns a non-blocking datagram socket bound to a free loopback
// port, and its address.
func boundUDP(t *testing.T) (int, netip.AddrPort) {
	t.Helper()
	fd, err := rawsys.Socket(unix.AF_INET, unix.SOCK_DGRAM)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rawsys.Close(fd) })
	if err := rawsys.Bind(fd, netip.MustParseAddrPort("127.0.0.1:0")); err != nil {
		t.Fatal(err)
	}
	addr, err := rawsys.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	return fd, addr
}

// A datagram forwarded each way through an open flow allocates nothing: the
// listener's recvmsg and the reply's sendmsg code their addresses and the
// IP_PKTINFO control data (the path of a wildcard listener) on the stack.
// The loop is not running: the test drives its handlers itself.
func TestUDPForwardAllocatesNothing(t *testing.T) {
	lfd, laddr := boundUDP(t) // the rule's listening socket
	if err := rawsys.SetsockoptInt(lfd, unix.IPPROTO_IP, unix.IP_PKTINFO, 1); err != nil {
		t.Fatal(err)
	}
	tfd, taddr := boundUDP(t) // the target
	cfd, caddr := boundUDP(t) // the client
	ffd, err := rawsys.Socket(unix.AF_INET, unix.SOCK_DGRAM)
	if err != nil {
		t.Fatal(err)
	}
	defer rawsys.Close(ffd)
	if err := rawsys.Connect(ffd, taddr); err != nil {
		t.Fatal(err)
	}
	ln := &Listener{fd: lfd, pool: balance.New(rules.BalanceRoundRobin, []netip.AddrPort{taddr}), udp: &udpState{flows: map[flowKey]*flow{}}}
	f := &flow{ln: ln, fd: ffd, key: flowKey{cli: caddr, local: laddr.Addr()}, heard: true}
	ln.udp.flows[f.key] = f
	l := &Loop{udp: new(udpScratch)}
	msg, buf := []byte("datagram"), make([]byte, 64)
	var bad string
	roundTrip := func() {
		rawsys.Sendto(cfd, msg, 0, laddr)
		ln.handleUDP(l) // client to flow: loopback delivers within the send
		n, from, err := rawsys.Recvfrom(tfd, buf, 0)
		if err != nil || string(buf[:n]) != string(msg) {
			bad = fmt.Sprintf("target got %q, %v", buf[:max(n, 0)], err)
			return
		}
		rawsys.Sendto(tfd, buf[:n], 0, from)
		f.handle(l, ffd, unix.EPOLLIN) // the reply, to the client
		if n, from, err = rawsys.Recvfrom(cfd, buf, 0); err != nil || from != laddr || string(buf[:n]) != string(msg) {
			bad = fmt.Sprintf("client got %q from %v, %v", buf[:max(n, 0)], from, err)
		}
	}
	allocs := testing.AllocsPerRun(100, roundTrip)
	if bad != "" {
		t.Fatal(bad)
	}
	if allocs != 0 {
		t.Errorf("%.1f allocations per datagram each way, want 0", allocs)
	}
	if u := ln.udp; u.DatagramsUp.Load() != 101 || u.DatagramsDown.Load() != 101 || u.Dropped.Load() != 0 {
		t.Errorf("in %d, out %d, dropped %d; want 101 each way", u.DatagramsUp.Load(), u.DatagramsDown.Load(), u.Dropped.Load())
	}
}
