package integration

import (
	"fmt"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/internal/netnstest"
	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// sluice run in the host namespace, with two pifs: "inner", a namespace with
// only its loopback, whose servers no one outside can reach; "edge", a
// namespace joined to the host by a veth pair. A host port forwards into a
// server listening on inner's 127.0.0.1 (tcp and udp), and a port inside
// edge forwards out to a server on the host's 127.0.0.1.
func TestPifGatewayDaemon(t *testing.T) {
	inner, edge := netnstest.New(t), netnstest.New(t)
	edge.Veth(t, "10.77.0.1/30", "10.77.0.2/30")

	innerTCP := testpeer.Serve(inner.Listen(t, "127.0.0.1:0"))
	t.Cleanup(innerTCP.Close)
	innerUDP := inner.ListenPacket(t, "127.0.0.1:0")
	t.Cleanup(testpeer.UDPEcho(innerUDP))
	hostTCP := hashBackend(t)

	in, inU, out := freePort(t), freePort(t), freePort(t)
	file := writeFile(t, "pifs.yaml", fmt.Sprintf(`loops: 2
log: {level: warn}
pifs:
  - {name: inner, netns: %s}
  - {name: edge, netns: %s}
rules:
  - tcp 127.0.0.1:%d -> inner/%s
  - udp 127.0.0.1:%d -> inner/%s timeout.idle=5s
  - tcp edge/10.77.0.2:%d -> %s
`, inner.Path, edge.Path, in, innerTCP.Addr(), inU, innerUDP.LocalAddr(), out, hostTCP.Addr()))
	d := startDaemon(t, forwardOpts{}, "run", "-c", file)
	d.waitListening(fmt.Sprintf("127.0.0.1:%d", in))

	t.Run("the daemon itself stays in the host namespace", func(t *testing.T) {
		// Its pif threads live in inner and edge; the process's namespace
		// (/proc/PID/ns/net follows the main thread, which `nsenter -t PID
		// -n` enters) must stay ours.
		var self, daemon unix.Stat_t
		if err := unix.Stat(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()), &self); err != nil {
			t.Fatal(err)
		}
		if err := unix.Stat(fmt.Sprintf("/proc/%d/ns/net", d.cmd.Process.Pid), &daemon); err != nil {
			t.Fatal(err)
		}
		if daemon.Ino != self.Ino {
			t.Errorf("the daemon's /proc/PID/ns/net is netns %d, not the host's %d", daemon.Ino, self.Ino)
		}
	})
	t.Run("host into a loopback-only namespace", func(t *testing.T) {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", in))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := testpeer.Exchange(c, 2<<20, 3<<20, 1); err != nil {
			t.Fatalf("%v\n%s", err, d.stderr.String())
		}
	})
	t.Run("udp into the namespace", func(t *testing.T) {
		c, err := net.Dial("udp", fmt.Sprintf("127.0.0.1:%d", inU))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := testpeer.UDPPingPong(c, 1, 20, []int{1, 512, 9000}, 2*time.Second); err != nil {
			t.Fatalf("%v\n%s", err, d.stderr.String())
		}
	})
	t.Run("from inside a namespace out to the host", func(t *testing.T) {
		c := edge.Dial(t, "tcp", fmt.Sprintf("10.77.0.2:%d", out))
		if err := testpeer.Exchange(c, 1<<20, 1<<20, 2); err != nil {
			t.Fatalf("%v\n%s", err, d.stderr.String())
		}
	})
	t.Run("from the host over the veth", func(t *testing.T) {
		// The listener lives in edge; the host reaches it across the link.
		c, err := net.DialTimeout("tcp", fmt.Sprintf("10.77.0.2:%d", out), 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := testpeer.Exchange(c, 1<<20, 1<<20, 3); err != nil {
			t.Fatalf("%v\n%s", err, d.stderr.String())
		}
	})
	if err := d.stop(5 * time.Second); err != nil {
		t.Errorf("stop: %v\n%s", err, d.stderr.String())
	}
	if f := innerTCP.Failures.Load() + hostTCP.Failures.Load(); f != 0 {
		t.Errorf("%d failed exchanges at the backends", f)
	}
}
