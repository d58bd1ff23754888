package engine

import (
	"net"
	"sync"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/testpeer"
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
