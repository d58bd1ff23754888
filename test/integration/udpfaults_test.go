package integration

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"regexp"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// UDP under load with faults (issue 15, "Also cover"). A daemon whose
// open-files limit (256) makes its process-wide flow budget 64; eight
// clients, each its own flow, ping-pong checked datagrams without pause.
// Each round:
//   - the backend goes away for a second, then comes back on its port: the
//     clients lose datagrams only meanwhile, and all get replies again
//     within two seconds of its return;
//   - a flood of 2 000 new sources (clients bound to 127.3.x.y, one datagram
//     each) spends the flow budget: the excess is denied and counted
//     (udp_flows_denied), and the eight clients' flows lose nothing meanwhile;
//   - after the flood's flows expire (timeout.idle=2s) a new source is
//     served again.
//
// No reply is ever wrong (each is the datagram sent, byte for byte). The
// long form (make soak) repeats the round.
func TestFaultUDPUnderLoad(t *testing.T) {
	const clients, flood, idle = 8, 2000, 2 * time.Second
	echoAt := func(addr string) (string, func()) {
		pc, err := net.ListenPacket("udp", addr)
		if err != nil {
			t.Fatal(err)
		}
		stop := testpeer.UDPEcho(pc)
		return pc.LocalAddr().String(), func() { pc.Close(); stop() }
	}
	backend, stopEcho := echoAt("127.0.0.1:0")
	defer func() { stopEcho() }()
	port := freePort(t)
	file := writeFile(t, "udp.yaml", fmt.Sprintf("loops: 2\nlog: {level: warn}\nrules:\n  - udp 127.0.0.1:%d -> %s timeout.idle=%s\n", port, backend, idle))
	d := startRunCtl(t, forwardOpts{nofile: 256}, file)
	front := fmt.Sprintf("127.0.0.1:%d", port)

	// The steady clients: ping-pong until stop, counting replies and
	// timeouts per phase (phase is read at each datagram).
	var phase atomic.Int32 // 0 normal, 1 backend gone, 2 backend back, 3 flood
	var ok, lost [4]atomic.Int64
	var wrong atomic.Int64
	lastOK := make([]atomic.Int64, clients) // unix nanos of each client's last reply
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for id := range clients {
		c, err := net.Dial("udp", front)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 2048)
			for seq := 0; ; seq++ {
				select {
				case <-stop:
					return
				default:
				}
				p := phase.Load()
				want := testpeer.Datagram(id, seq, 64+seq%1000)
				if _, err := c.Write(want); err != nil {
					// ECONNREFUSED from an earlier datagram: sluice's
					// reply port is there, nothing to count.
					time.Sleep(10 * time.Millisecond)
					continue
				}
				c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
				for {
					n, err := c.Read(buf)
					if err != nil {
						var ne net.Error
						if !errors.As(err, &ne) || !ne.Timeout() {
							time.Sleep(10 * time.Millisecond)
						}
						if phase.Load() == 1 { // (sent just before the backend went)
							p = 1
						}
						lost[p].Add(1)
						break
					}
					if bytes.Equal(buf[:n], want) {
						ok[p].Add(1)
						lastOK[id].Store(time.Now().UnixNano())
						break
					}
					if n < 8 || int(binary.BigEndian.Uint32(buf)) != id {
						wrong.Add(1)
						continue
					}
					if s := int(binary.BigEndian.Uint32(buf[4:])); s >= seq || !bytes.Equal(buf[:n], testpeer.Datagram(id, s, 64+s%1000)) {
						wrong.Add(1) // not a late reply to one of ours either
					}
				}
			}
		}()
	}
	defer func() { close(stop); wg.Wait() }()

	allAnswered := func(since time.Time) bool {
		for i := range lastOK {
			if lastOK[i].Load() < since.UnixNano() {
				return false
			}
		}
		return true
	}
	rounds(t, 100, func(round int) {
		phase.Store(0)
		t0 := time.Now()
		waitFor(t, 5*time.Second, "every client answered", func() bool { return allAnswered(t0) })
		time.Sleep(500 * time.Millisecond)

		// The backend goes away and comes back on its port.
		phase.Store(1)
		stopEcho()
		time.Sleep(time.Second)
		_, stopEcho = echoAt(backend)
		back := time.Now()
		phase.Store(2)
		waitFor(t, 2*time.Second, "every client answered after the backend came back", func() bool { return allAnswered(back) })
		recovered := time.Since(back)

		// A flood of new sources.
		phase.Store(3)
		denied0 := udpStat(t, d, "udp_flows_denied")
		lost0 := lost[3].Load()
		for i := range flood {
			src := &net.UDPAddr{IP: net.IPv4(127, 3, byte(i>>8), byte(i)), Port: 0}
			c, err := net.DialUDP("udp", src, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port})
			if err != nil {
				t.Fatal(err)
			}
			c.Write([]byte("flood"))
			c.Close()
		}
		time.Sleep(200 * time.Millisecond)
		denied := udpStat(t, d, "udp_flows_denied") - denied0
		floodLost := lost[3].Load() - lost0
		if denied == 0 {
			t.Errorf("round %d: a flood of %d sources with a budget of 64 flows: none denied", round, flood)
		}
		if floodLost != 0 {
			t.Errorf("round %d: the steady clients lost %d datagrams during the flood", round, floodLost)
		}

		// The flood's flows expire; a new source is served again.
		phase.Store(0)
		time.Sleep(idle + time.Second)
		nc, err := net.DialUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 4, byte(round), 1)}, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port})
		if err != nil {
			t.Fatal(err)
		}
		if err := testpeer.UDPPingPong(nc, 99, 5, []int{1, 512}, 2*time.Second); err != nil {
			t.Errorf("round %d: a new source after the flood: %v", round, err)
		}
		nc.Close()
		t.Logf("round %d: backend back, all clients answered in %s; flood of %d: %d denied, steady clients lost %d; flows now %d",
			round, recovered.Round(time.Millisecond), flood, denied, floodLost, udpStat(t, d, "udp_flows"))
	})
	if w := wrong.Load(); w != 0 {
		t.Errorf("%d replies were not a datagram the client sent", w)
	}
	if lost[0].Load() != 0 {
		t.Errorf("%d datagrams lost with the backend up and no flood", lost[0].Load())
	}
	t.Logf("replies by phase (normal, backend gone, back, flood): ok %d %d %d %d, lost %d %d %d %d",
		ok[0].Load(), ok[1].Load(), ok[2].Load(), ok[3].Load(), lost[0].Load(), lost[1].Load(), lost[2].Load(), lost[3].Load())
	if err := d.stop(5 * time.Second); err != nil {
		t.Errorf("stop: %v\n%s", err, d.stderr.String())
	}
}

// udpStat reads one counter of `sluice ctl stats`.
func udpStat(t *testing.T, d *liveDaemon, name string) int64 {
	t.Helper()
	_, out, errs := d.cli("stats")
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + `\s+(\d+)$`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no %s in ctl stats:\n%s%s", name, out, errs)
	}
	v, _ := strconv.ParseInt(m[1], 10, 64)
	return v
}
