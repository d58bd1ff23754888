// Package netnstest makes network namespaces for tests, with `ip netns`, and
// opens sockets inside them. It is test support: nothing in sluice imports it.
// Namespaces need root; New skips the test loudly without it.
package netnstest

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/internal/netns"
)

var seq atomic.Uint32

// NS is a network namespace made for one test.
type NS struct {
	Name string // as `ip netns` knows it
	Path string // /run/netns/NAME, for setns
}

// New creates a namespace with its loopback up, deleted when the test ends.
// It skips the test when not root or when `ip` is missing.
func New(tb testing.TB) *NS {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("SKIPPED: network namespace tests need root (ip netns add)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		tb.Skip("SKIPPED: network namespace tests need iproute2's ip command")
	}
	name := fmt.Sprintf("sluice-t%d-%d", os.Getpid(), seq.Add(1))
	Run(tb, "ip", "netns", "add", name)
	tb.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	ns := &NS{Name: name, Path: "/run/netns/" + name}
	ns.Exec(tb, "ip", "link", "set", "lo", "up")
	return ns
}

// Veth links the namespace to the host with a veth pair: hostCIDR on the
// host's end, nsCIDR on the namespace's (as "10.77.0.1/30"), both up. The
// host's end goes when the namespace is deleted.
func (ns *NS) Veth(tb testing.TB, hostCIDR, nsCIDR string) {
	tb.Helper()
	n := seq.Add(1)
	host, peer := fmt.Sprintf("slh%d-%d", os.Getpid()%10000, n), fmt.Sprintf("sln%d-%d", os.Getpid()%10000, n)
	Run(tb, "ip", "link", "add", host, "type", "veth", "peer", "name", peer)
	tb.Cleanup(func() { _ = exec.Command("ip", "link", "del", host).Run() })
	Run(tb, "ip", "link", "set", peer, "netns", ns.Name)
	Run(tb, "ip", "addr", "add", hostCIDR, "dev", host)
	Run(tb, "ip", "link", "set", host, "up")
	ns.Exec(tb, "ip", "addr", "add", nsCIDR, "dev", peer)
	ns.Exec(tb, "ip", "link", "set", peer, "up")
}

// Run runs a command and fails the test with its output if it fails.
func Run(tb testing.TB, name string, args ...string) string {
	tb.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		tb.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Exec runs a command inside the namespace.
func (ns *NS) Exec(tb testing.TB, name string, args ...string) string {
	tb.Helper()
	return Run(tb, "ip", append([]string{"netns", "exec", ns.Name, name}, args...)...)
}

// Start runs a command inside the namespace in the background; it is killed
// (by its PID) when the test ends.
func (ns *NS) Start(tb testing.TB, name string, args ...string) *os.Process {
	tb.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns.Name, name}, args...)...)
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	// `ip netns exec` enters the namespace after it starts: wait until the
	// process is inside, so /proc/PID/ns/net names the namespace.
	var want, got unix.Stat_t
	if err := unix.Stat(ns.Path, &want); err != nil {
		tb.Fatal(err)
	}
	procNS := fmt.Sprintf("/proc/%d/ns/net", cmd.Process.Pid)
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if err := unix.Stat(procNS, &got); err == nil && got.Ino == want.Ino && got.Dev == want.Dev {
			return cmd.Process
		}
		if time.Now().After(deadline) {
			tb.Fatalf("%s did not enter namespace %s", name, ns.Name)
		}
	}
}

// Do runs fn on an OS thread switched into the namespace. Sockets fn creates
// belong to the namespace for their whole life and may be used from any
// goroutine afterwards. The thread is switched back before the runtime may
// use it again (netns.Enter).
func (ns *NS) Do(tb testing.TB, fn func()) {
	tb.Helper()
	errc := make(chan error, 1)
	go func() {
		f, err := os.Open(ns.Path)
		if err != nil {
			errc <- err
			return
		}
		leave, err := netns.Enter(f)
		f.Close()
		if err != nil {
			errc <- err
			return
		}
		defer leave()
		fn()
		errc <- nil
	}()
	if err := <-errc; err != nil {
		tb.Fatal(err)
	}
}

// Listen opens a TCP listener inside the namespace, closed when the test ends.
func (ns *NS) Listen(tb testing.TB, addr string) net.Listener {
	tb.Helper()
	var ln net.Listener
	var err error
	ns.Do(tb, func() { ln, err = net.Listen("tcp", addr) })
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ln.Close() })
	return ln
}

// ListenPacket opens a UDP socket inside the namespace, closed when the test
// ends.
func (ns *NS) ListenPacket(tb testing.TB, addr string) net.PacketConn {
	tb.Helper()
	var pc net.PacketConn
	var err error
	ns.Do(tb, func() { pc, err = net.ListenPacket("udp", addr) })
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { pc.Close() })
	return pc
}

// Dial connects from inside the namespace.
func (ns *NS) Dial(tb testing.TB, network, addr string) net.Conn {
	tb.Helper()
	var c net.Conn
	var err error
	ns.Do(tb, func() { c, err = net.Dial(network, addr) })
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close() })
	return c
}
