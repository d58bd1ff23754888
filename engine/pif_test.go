package engine

import (
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/netnstest"
	"github.com/sluice-proxy/sluice/internal/testpeer"
	"github.com/sluice-proxy/sluice/rules"
)

// startPifs runs an engine with the given namespaces added as pifs.
func startPifs(t *testing.T, pifs map[string]*netnstest.NS) *Engine {
	t.Helper()
	e := newEngine(t)
	for name, ns := range pifs {
		if err := e.AddPif(name, ns.Path); err != nil {
			t.Fatal(err)
		}
	}
	return e
}

func listen(t *testing.T, e *Engine, line string) string {
	t.Helper()
	r, err := rules.Parse(line)
	if err != nil {
		t.Fatalf("parse %q: %v", line, err)
	}
	lns, err := e.Listen(r)
	if err != nil {
		t.Fatalf("listen %q: %v", line, err)
	}
	return lns[0].Addr().String()
}

// A port on the host forwarded into a server that listens only inside a
// namespace, and a port inside a namespace forwarded out to the host: the
// gateway into and out of a container. TCP byte-exact, and UDP.
func TestPifGateway(t *testing.T) {
	ns := netnstest.New(t)
	e := startPifs(t, map[string]*netnstest.NS{"ns1": ns})

	t.Run("host to namespace", func(t *testing.T) {
		inner := testpeer.Serve(ns.Listen(t, "127.0.0.1:0"))
		t.Cleanup(inner.Close)
		addr := listen(t, e, "tcp 127.0.0.1:0 -> ns1/"+inner.Addr())
		c := dial(t, addr)
		defer c.Close()
		if err := testpeer.Exchange(c, 1<<20, 3<<20, 1); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("namespace to host", func(t *testing.T) {
		b := backend(t)
		addr := listen(t, e, "tcp ns1/127.0.0.1:0 -> "+b.Addr())
		// The port is inside the namespace: from inside, it serves...
		c := ns.Dial(t, "tcp", addr)
		if err := testpeer.Exchange(c, 2<<20, 1<<20, 2); err != nil {
			t.Fatal(err)
		}
		// ...and the host's own loopback does not have it.
		if hc, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			hc.Close()
			t.Errorf("%s answers on the host too; it should live only in the namespace", addr)
		}
	})
	t.Run("udp host to namespace", func(t *testing.T) {
		pc := ns.ListenPacket(t, "127.0.0.1:0")
		stop := testpeer.UDPEcho(pc)
		t.Cleanup(stop)
		addr := listen(t, e, "udp 127.0.0.1:0 -> ns1/"+pc.LocalAddr().String())
		c := dialUDP(t, addr)
		if err := testpeer.UDPPingPong(c, 7, 10, []int{1, 1400, 9000}, 2*time.Second); err != nil {
			t.Fatal(err)
		}
	})
}

func TestPifErrors(t *testing.T) {
	e := startPifs(t, nil)
	if err := e.AddPif("ns9", "/nonexistent/netns"); err == nil || !strings.Contains(err.Error(), "pif ns9: open netns") {
		t.Errorf("AddPif of a missing path: %v", err)
	}
	if err := e.AddPif("host", "/proc/self/ns/net"); err == nil {
		t.Error("AddPif(host) accepted")
	}
	r, _ := rules.Parse("tcp nsX/127.0.0.1:0 -> 127.0.0.1:1")
	if _, err := e.Listen(r); err == nil || !strings.Contains(err.Error(), `unknown pif "nsX"`) {
		t.Errorf("Listen on an unknown pif: %v", err)
	}
	// A namespace named by a process in it (/proc/PID/ns/net) is a pif
	// like any other: here a process started inside a second namespace.
	// (Not /proc/self: a thread locked into a namespace may be the main
	// thread, which /proc/self then shows.)
	ns := netnstest.New(t)
	proc := ns.Start(t, "sleep", "60")
	if err := e.AddPif("proc", fmt.Sprintf("/proc/%d/ns/net", proc.Pid)); err != nil {
		t.Fatal(err)
	}
	inner := testpeer.Serve(ns.Listen(t, "127.0.0.1:0"))
	t.Cleanup(inner.Close)
	addr := listen(t, e, "tcp 127.0.0.1:0 -> proc/"+inner.Addr())
	c := dial(t, addr)
	defer c.Close()
	if err := testpeer.Exchange(c, 1000, 1000, 3); err != nil {
		t.Fatal(err)
	}
}

// A namespace deleted after the daemon entered it lives on inside the pif's
// thread, but nothing else can reach it: a rule bound there would commit and
// never be reached. Listen and Apply refuse it, and refuse a path that names
// a new namespace made under the old name. The host is not affected.
func TestPifNamespaceGone(t *testing.T) {
	ns := netnstest.New(t)
	e := startPifs(t, map[string]*netnstest.NS{"ns1": ns})
	line := "tcp ns1/127.0.0.1:0 -> 127.0.0.1:1"
	listen(t, e, line) // alive: binds

	netnstest.Run(t, "ip", "netns", "del", ns.Name)
	r, _ := rules.Parse(line)
	if _, err := e.Listen(r); err == nil || !strings.Contains(err.Error(), "pif ns1: its namespace "+ns.Path+" is gone") {
		t.Fatalf("Listen in a deleted namespace: %v", err)
	}
	other, _ := rules.Parse("tcp ns1/127.0.0.1:0 -> 127.0.0.1:2")
	if _, err := e.Apply([]*rules.Rule{other}); err == nil || !strings.Contains(err.Error(), "is gone") {
		t.Fatalf("Apply of a new rule in a deleted namespace: %v", err)
	}

	netnstest.Run(t, "ip", "netns", "add", ns.Name)
	if _, err := e.Listen(r); err == nil || !strings.Contains(err.Error(), "now names another namespace") {
		t.Fatalf("Listen in a namespace made again under the name: %v", err)
	}
	host, _ := rules.Parse("tcp 127.0.0.1:0 -> 127.0.0.1:1")
	if _, err := e.Apply([]*rules.Rule{host}); err != nil {
		t.Fatalf("Apply of a host rule: %v", err)
	}
	if _, err := e.Rollback(); err != nil {
		t.Fatal(err)
	}
}

// A rule on a pif whose namespace went away that the table keeps as it is
// does not block other changes: it goes on in the namespace the daemon
// holds (a warning); a new or changed rule there is refused.
func TestPifNamespaceGoneKeptRule(t *testing.T) {
	ns := netnstest.New(t)
	e := startPifs(t, map[string]*netnstest.NS{"ns1": ns})
	port := freePort(t)
	kept := fmt.Sprintf("tcp ns1/127.0.0.1:%d -> 127.0.0.1:1", port)
	applyCommit(t, e, kept)
	netnstest.Run(t, "ip", "netns", "del", ns.Name)
	applyCommit(t, e, kept, "tcp 127.0.0.1:0 -> 127.0.0.1:1") // kept as it is: a warning, the host rule added
	changed := fmt.Sprintf("tcp ns1/127.0.0.1:%d -> 127.0.0.1:2", port)
	if _, err := e.Apply(parseAll(t, changed)); err == nil || !strings.Contains(err.Error(), "is gone") {
		t.Fatalf("Apply of a changed rule on the gone pif: %v", err)
	}
}
