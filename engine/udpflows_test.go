package engine

import (
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/netnstest"
	"github.com/sluice-proxy/sluice/internal/testpeer"
	"github.com/sluice-proxy/sluice/rules"
)

// MaxFlows bounds the flows of the whole process, not of one listener: a
// flood of sources spread over several udp rules cannot hold more fds than
// the budget. Past it, new sources are dropped and counted as denied while
// the flows in place keep working.
func TestUDPFlowBudgetProcessWide(t *testing.T) {
	echo := udpEcho(t)
	e, a1 := start(t, "udp 127.0.0.1:0 -> "+echo, Config{Loops: 1, MaxFlows: 3})
	r, err := rules.Parse("udp 127.0.0.1:0 -> " + echo)
	if err != nil {
		t.Fatal(err)
	}
	lns, err := e.Listen(r)
	if err != nil {
		t.Fatal(err)
	}
	a2 := lns[0].Addr().String()
	served := 0
	var first net.Conn
	for i := 0; i < 6; i++ {
		addr := a1
		if i%2 == 1 {
			addr = a2
		}
		c := dialUDP(t, addr)
		if testpeer.UDPPingPong(c, i, 1, []int{64}, 300*time.Millisecond) == nil {
			served++
			if first == nil {
				first = c
			}
		}
	}
	s := e.Stats()
	t.Logf("6 sources over 2 rules, MaxFlows=3: %d served, %d flows live, %d denied, %d dropped", served, s.UDPFlows, s.UDPFlowsDenied, s.UDPDropped)
	if served != 3 || s.UDPFlows != 3 {
		t.Errorf("%d sources served, %d flows live; want 3 and 3 (the budget is the process's)", served, s.UDPFlows)
	}
	if s.UDPFlowsDenied != 3 {
		t.Errorf("%d flows denied, want 3", s.UDPFlowsDenied)
	}
	if err := testpeer.UDPPingPong(first, 0, 2, []int{64}, 2*time.Second); err != nil {
		t.Fatalf("a flow in place stopped working: %v", err)
	}
}

// A flow whose target never replied lives min(timeout.idle, the unanswered
// life) after its client's last datagram, so a spoofed-source flood does
// not hold its fds for timeout.idle; a flow that got a reply keeps the
// whole timeout.idle.
func TestUDPUnansweredFlowsShortLived(t *testing.T) {
	silent, err := net.ListenPacket("udp", "127.0.0.1:0") // takes datagrams, never answers
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	echo := udpEcho(t)
	was := unansweredLife
	unansweredLife = time.Second // set before the loops start, restored after they stop
	t.Cleanup(func() { unansweredLife = was })
	e, addr := start(t, "udp 127.0.0.1:0 -> "+silent.LocalAddr().String()+" timeout.idle=1m", Config{Loops: 1})
	_, addr2 := start(t, "udp 127.0.0.1:0 -> "+echo+" timeout.idle=1m", Config{Loops: 1})
	for i := 0; i < 5; i++ {
		dialUDP(t, addr).Write([]byte("spoofed?"))
	}
	answered := dialUDP(t, addr2)
	if err := testpeer.UDPPingPong(answered, 1, 1, []int{64}, 2*time.Second); err != nil {
		t.Fatal(err)
	}
	waitStats(t, e, "5 flows open", func(s Stats) bool { return s.UDPFlows == 5 })
	began := time.Now()
	deadline := began.Add(unansweredLife + 3*time.Second)
	for e.Stats().UDPFlows != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("unanswered flows still live %v after their last datagram (timeout.idle=1m): %+v", time.Since(began), e.Stats())
		}
		time.Sleep(50 * time.Millisecond)
	}
	s := e.Stats()
	t.Logf("5 unanswered flows ended after %v; unanswered %d, expired %d", time.Since(began).Round(time.Millisecond), s.UDPFlowsUnanswered, s.UDPFlowsExpired)
	if s.UDPFlowsUnanswered != 5 || s.UDPFlowsExpired != 0 {
		t.Errorf("unanswered %d, expired %d; want 5 and 0", s.UDPFlowsUnanswered, s.UDPFlowsExpired)
	}
	if err := testpeer.UDPPingPong(answered, 1, 1, []int{64}, 2*time.Second); err != nil {
		t.Fatalf("the answered flow did not outlive the unanswered life: %v", err)
	}
}

// On a wildcard udp listener a reply comes from the address its client sent
// to: with several addresses on the host (two of 10.77.x and 127.0.0.x on a
// namespace's loopback, and two of fd00::/8 for IPv6), a client that sent to
// one hears from that one, as a client of a connected UDP socket or of DNS
// requires.
func TestUDPReplyFromDestination(t *testing.T) {
	ns := netnstest.New(t)
	for _, a := range []string{"10.77.1.1/32", "10.77.1.2/32"} {
		ns.Exec(t, "ip", "addr", "add", a, "dev", "lo")
	}
	ns.Exec(t, "ip", "-6", "addr", "add", "fd00:77::1/128", "dev", "lo", "nodad")
	ns.Exec(t, "ip", "-6", "addr", "add", "fd00:77::2/128", "dev", "lo", "nodad")
	e := startPifs(t, map[string]*netnstest.NS{"ns1": ns})
	for _, tc := range []struct {
		wild, echo, client string
		dsts               []string
	}{
		{"0.0.0.0", "127.0.0.1:0", "127.0.0.1:0", []string{"10.77.1.1", "10.77.1.2", "127.0.0.1", "127.0.0.9"}},
		{"[::]", "[::1]:0", "[::1]:0", []string{"fd00:77::1", "fd00:77::2", "::1"}},
	} {
		t.Run(tc.wild, func(t *testing.T) {
			echo := ns.ListenPacket(t, tc.echo)
			t.Cleanup(testpeer.UDPEcho(echo))
			bound := listen(t, e, fmt.Sprintf("udp ns1/%s:0 -> ns1/%s", tc.wild, echo.LocalAddr()))
			port := netip.MustParseAddrPort(bound).Port()
			cl := ns.ListenPacket(t, tc.client)
			buf := make([]byte, 64)
			for round := 0; round < 2; round++ { // the second round through the open flows
				for _, d := range tc.dsts {
					to := netip.AddrPortFrom(netip.MustParseAddr(d), port)
					msg := "to " + to.String()
					if _, err := cl.WriteTo([]byte(msg), net.UDPAddrFromAddrPort(to)); err != nil {
						t.Fatal(err)
					}
					cl.SetReadDeadline(time.Now().Add(2 * time.Second))
					n, from, err := cl.ReadFrom(buf)
					if err != nil {
						t.Fatalf("no reply to %s: %v", msg, err)
					}
					got := from.(*net.UDPAddr).AddrPort()
					got = netip.AddrPortFrom(got.Addr().Unmap(), got.Port())
					if string(buf[:n]) != msg || got != to {
						t.Errorf("sent %q to %s: reply %q from %s, want it from %s", msg, to, buf[:n], got, to)
					}
				}
			}
		})
	}
}
