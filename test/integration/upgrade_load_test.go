package integration

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/netnstest"
	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// Upgrades under load, every byte counted: the sessions of TestLoadVerified
// (random sizes up to 512 KiB each way, random half-close orders, a third
// reset by the client or the backend at a random byte), back to back on
// two rules (splice on and off) while three upgrades happen, and sessions
// held mid-stream in the first process across the first upgrade. Every
// session ends as planned at both ends — none refused, none reset but by
// plan, no byte lost or changed —, the held ones finish in the process
// that accepted them, and the processes together log exactly as many
// clean ends and resets of each side as were planned.
func TestUpgradeUnderLoad(t *testing.T) {
	const workers, held, upgrades = 6, 40, 3
	const maxSize = int64(512 << 10)
	be := chaosPeer(t, "")
	d := startConfig(t, forwardOpts{}, []string{"loops: 2", "log: {level: info, format: json}"},
		"tcp {listen} -> "+be.Addr+" splice=on",
		"tcp {listen} -> "+be.Addr+" splice=off")
	var cur atomic.Int64
	cur.Store(int64(d.cmd.Process.Pid))
	killAtEnd(t, &cur)
	first := d.cmd.Process.Pid
	var ports []int
	for _, a := range d.listens {
		ports = append(ports, int(netip.MustParseAddrPort(a).Port()))
	}
	inodes := listenInodes(t, first, ports...)
	bs0 := chaosStats(t, be)

	var seed atomic.Uint64
	var y tally
	var planned struct {
		sync.Mutex
		none, cli, srv int64
	}

	// Sessions held mid-stream in the first process: released once it has
	// handed over, they finish there, in its drain.
	release := make(chan struct{})
	var relOnce sync.Once
	releaseHeld := func() { relOnce.Do(func() { close(release) }) }
	defer releaseHeld()
	var reached, heldDone sync.WaitGroup
	reached.Add(held)
	heldRes := make([]*session, held)
	for i := range heldRes {
		p := testpeer.Plan{Seed: seed.Add(1), Up: 256 << 10, Down: 256 << 10, Order: testpeer.Order(i % 3)}
		heldDone.Add(1)
		go func() {
			defer heldDone.Done()
			var once sync.Once
			heldRes[i] = runSession(d.listens[i%2], p, testpeer.Options{Hold: release, HoldAt: 64 << 10,
				OnHold: func() { once.Do(reached.Done) }}, time.Minute)
		}()
	}
	waitGroup(t, &reached, 30*time.Second, "the held sessions to be held")

	// The load: each worker runs random plans one after the other.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), uint64(w)))
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				p := testpeer.RandomPlan(rng, seed.Add(1), maxSize, 1.0/3)
				planned.Lock()
				switch p.Fault {
				case testpeer.NoFault:
					planned.none++
				case testpeer.ClientReset:
					planned.cli++
				case testpeer.ServerReset:
					planned.srv++
				}
				planned.Unlock()
				s := runSession(d.listens[(w+i)%2], p, testpeer.Options{}, time.Minute)
				if s.dialErr != nil {
					y.fail("session %v: dial: %v", p, s.dialErr)
					continue
				}
				y.add(p, s.res, s.end.Sub(s.connected))
			}
		}()
	}

	time.Sleep(300 * time.Millisecond) // the load runs in the first process
	for i := 0; i < upgrades; i++ {
		pid := upgrade(t, d.Ctl)
		cur.Store(int64(pid))
		for port, ino := range inodes {
			if got := listenInodes(t, pid, port)[port]; got != ino || !holds(t, pid, ino) {
				t.Errorf("upgrade %d: pid %d: port %d listens on inode %s, was %s", i+1, pid, port, got, ino)
			}
		}
		if i == 0 {
			if !alive(first) {
				t.Errorf("the first process exited with %d sessions held in it", held)
			}
			releaseHeld()
			waitGroup(t, &heldDone, 30*time.Second, "the held sessions to finish")
		}
		time.Sleep(300 * time.Millisecond) // the load reaches the new process
	}
	close(stop)
	wg.Wait()
	for _, s := range heldRes {
		if s.dialErr != nil {
			t.Errorf("held session %v: dial: %v", s.plan, s.dialErr)
		} else if err := s.res.Check(s.plan, testpeer.ClientSide); err != nil {
			t.Errorf("held session %v, across the upgrade: %v", s.plan, err)
		} else {
			y.add(s.plan, s.res, s.end.Sub(s.connected))
		}
	}
	y.report(t)
	none, cli, srv := planned.none+held, planned.cli, planned.srv

	// Every process stopped: the last by SIGTERM, the others once drained.
	last := int(cur.Load())
	syscall.Kill(last, syscall.SIGTERM)
	waitFor(t, 15*time.Second, "every sluice process to exit", func() bool { return !alive(first) && !alive(last) })

	// The client's view.
	if y.completed != none || y.clientResets != cli || y.serverResets != srv {
		t.Errorf("clients: %d completed, %d reset by the client, %d by the backend; planned %d, %d, %d",
			y.completed, y.clientResets, y.serverResets, none, cli, srv)
	}
	// The backend's view.
	bs := chaosStats(t, be)
	checkBackend(t, bs0, bs, none, cli, srv)
	// The daemons' view: the session lines of all the processes (they share
	// the test's stderr pipe), by end.
	want := fmt.Sprint(map[string]int64{"done": none, "client-reset": cli, "server-reset": srv})
	var got map[string]int64
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		got = sessionEnds(d.stderr.String(), d.listens)
		if fmt.Sprint(got) == want || time.Now().After(deadline) {
			break
		}
	}
	if fmt.Sprint(got) != want {
		t.Errorf("the processes logged sessions ended %v, want %v", got, want)
	}
	t.Logf("%d upgrades under load: %d sessions (%d clean, %d held across the first upgrade, %d client resets, %d backend resets), %d MiB checked at the clients, %d MiB at the backend; slowest %v",
		upgrades, none+cli+srv, none, held, cli, srv, y.bytes>>20, (bs.Bytes-bs0.Bytes)>>20, y.maxTook.Round(time.Millisecond))
}

// sessionEnds counts the json session lines of log whose listen address is
// one of listens, by their end.
func sessionEnds(log string, listens []string) map[string]int64 {
	out := map[string]int64{}
	for _, l := range strings.Split(log, "\n") {
		if !strings.Contains(l, `"msg":"session"`) {
			continue
		}
		for _, a := range listens {
			if strings.Contains(l, `"listen":"`+a+`"`) {
				_, rest, ok := strings.Cut(l, `"end":"`)
				if end, _, ok2 := strings.Cut(rest, `"`); ok && ok2 {
					out[end]++
				}
				break
			}
		}
	}
	return out
}

// An upgrade with UDP rules and a pif: a host UDP rule's flow in the old
// process ends with the hand-over, and the next datagram of the same
// client opens a flow in the new one (the backend sees a new source); the
// UDP sockets, and a TCP and a UDP socket inside a namespace made with `ip
// netns add`, are the same inodes in the new process, the namespace's seen
// from inside it; a session dialed from inside the namespace is served.
func TestUpgradeUDPAndPif(t *testing.T) {
	inner := netnstest.New(t)
	b, err := testpeer.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	echo := newSourceEcho(t)
	hostU, innerT, innerU := freePort(t), freePort(t), freePort(t)
	file := writeFile(t, "upgrade-pif.yaml", fmt.Sprintf(`log: {level: warn}
pifs:
  - {name: inner, netns: %s}
rules:
  - udp 127.0.0.1:%d -> %s timeout.idle=30s
  - tcp inner/127.0.0.1:%d -> %s
  - udp inner/127.0.0.1:%d -> %s timeout.idle=30s
`, inner.Path, hostU, echo.addr(), innerT, b.Addr(), innerU, echo.addr()))
	d := startDaemon(t, forwardOpts{}, "run", "-c", file)
	ld := &liveDaemon{daemon: d, t: t, sock: d.Ctl}
	ld.waitCtl()
	first := d.cmd.Process.Pid
	var cur atomic.Int64
	cur.Store(int64(first))
	killAtEnd(t, &cur)

	hostInode := udpInode(t, fmt.Sprintf("/proc/%d/net/udp", first), hostU)
	inT, inU := nsInode(t, inner, "tcp", innerT), nsInode(t, inner, "udp", innerU)
	for _, ino := range []string{hostInode, inT, inU} {
		if !holds(t, first, ino) {
			t.Fatalf("pid %d does not hold socket %s", first, ino)
		}
	}
	c, err := net.Dial("udp", fmt.Sprintf("127.0.0.1:%d", hostU))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ping := func(what string, id int) string {
		t.Helper()
		if err := testpeer.UDPPingPong(c, id, 3, []int{1, 1200}, 5*time.Second); err != nil {
			t.Fatalf("%s: %v\n%s", what, err, tail(d.stderr.String(), 3000))
		}
		return echo.last()
	}
	before := ping("before the upgrade", 1)
	if again := ping("the same flow", 2); again != before {
		t.Fatalf("one client, two flows before the upgrade: from %s, then %s", before, again)
	}

	pid := upgrade(t, d.Ctl)
	cur.Store(int64(pid))
	waitFor(t, 15*time.Second, "the old process to exit", func() bool { return !alive(first) })
	if got := udpInode(t, fmt.Sprintf("/proc/%d/net/udp", pid), hostU); got != hostInode || !holds(t, pid, hostInode) {
		t.Errorf("host udp port %d: inode %s in pid %d, was %s", hostU, got, pid, hostInode)
	}
	if gotT, gotU := nsInode(t, inner, "tcp", innerT), nsInode(t, inner, "udp", innerU); gotT != inT || gotU != inU || !holds(t, pid, inT) || !holds(t, pid, inU) {
		t.Errorf("inside the namespace: tcp %s, udp %s (held by pid %d: %v, %v); were %s, %s",
			gotT, gotU, pid, holds(t, pid, inT), holds(t, pid, inU), inT, inU)
	}
	after := ping("after the upgrade, the same client", 3)
	if after == before {
		t.Errorf("the backend saw the old process's flow (%s) after the upgrade", before)
	}
	ic := inner.Dial(t, "tcp", fmt.Sprintf("127.0.0.1:%d", innerT))
	ic.SetDeadline(time.Now().Add(10 * time.Second))
	if err := testpeer.Exchange(ic, 256<<10, 256<<10, 9); err != nil {
		t.Fatalf("a session from inside the namespace after the upgrade: %v", err)
	}
	uc := inner.Dial(t, "udp", fmt.Sprintf("127.0.0.1:%d", innerU))
	if err := testpeer.UDPPingPong(uc, 4, 3, []int{1, 1200}, 5*time.Second); err != nil {
		t.Fatalf("udp from inside the namespace after the upgrade: %v", err)
	}
}

// sourceEcho is a UDP echo on the host's loopback that remembers the
// source of the last datagram: a proxy's flow is its source.
type sourceEcho struct {
	pc   net.PacketConn
	mu   sync.Mutex
	from string
}

func newSourceEcho(t *testing.T) *sourceEcho {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e := &sourceEcho{pc: pc}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 65535)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			e.mu.Lock()
			e.from = from.String()
			e.mu.Unlock()
			_, _ = pc.WriteTo(buf[:n], from)
		}
	}()
	t.Cleanup(func() { pc.Close(); <-done })
	return e
}

func (e *sourceEcho) addr() string { return e.pc.LocalAddr().String() }

func (e *sourceEcho) last() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.from
}

// udpInode is the inode of the UDP socket bound to 127.0.0.1:port in a
// /proc net/udp table.
func udpInode(t *testing.T, name string, port int) string {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return tableInode(t, string(b), "udp", port)
}

// nsInode is the inode of the socket of proto (tcp: listening) bound to
// 127.0.0.1:port, as the namespace's own /proc/net table shows it.
func nsInode(t *testing.T, ns *netnstest.NS, proto string, port int) string {
	t.Helper()
	return tableInode(t, ns.Exec(t, "cat", "/proc/net/"+proto), proto, port)
}

// tableInode finds 127.0.0.1:port in the text of a /proc net/tcp or
// net/udp table: a listening tcp socket, an unconnected udp one.
func tableInode(t *testing.T, table, proto string, port int) string {
	t.Helper()
	state := map[string]string{"tcp": "0A", "udp": "07"}[proto]
	for _, l := range strings.Split(table, "\n") {
		// sl local rem st tx:rx tr:when retrnsmt uid timeout inode
		fs := strings.Fields(l)
		if len(fs) >= 10 && fs[1] == fmt.Sprintf("0100007F:%04X", port) && fs[3] == state {
			return fs[9]
		}
	}
	t.Fatalf("no %s socket on 127.0.0.1:%d in:\n%s", proto, port, table)
	return ""
}
