package engine

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/internal/testpeer"
	"github.com/sluice-proxy/sluice/rules"
)

func newEngine(t *testing.T) *Engine {
	t.Helper()
	e, err := New(Config{Loops: 2})
	if err != nil {
		t.Fatal(err)
	}
	e.Start()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		e.Shutdown(ctx)
	})
	return e
}

func parseAll(t *testing.T, lines ...string) []*rules.Rule {
	t.Helper()
	var rs []*rules.Rule
	for _, l := range lines {
		r, err := rules.Parse(l)
		if err != nil {
			t.Fatalf("%q: %v", l, err)
		}
		rs = append(rs, r)
	}
	return rs
}

// applyCommit applies a table that must bind whole, and commits it.
func applyCommit(t *testing.T, e *Engine, lines ...string) *rules.Summary {
	t.Helper()
	sum, err := e.Apply(parseAll(t, lines...))
	if err != nil {
		t.Fatal(err)
	}
	if !sum.OK() {
		t.Fatalf("apply failed: %v", sum.Failures())
	}
	if _, err := e.Commit(); err != nil {
		t.Fatal(err)
	}
	return sum
}

// freePorts returns n loopback ports that were free a moment ago.
func freePorts(t *testing.T, n int) []int {
	t.Helper()
	var ps []int
	for i := 0; i < n; i++ {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		ps = append(ps, ln.Addr().(*net.TCPAddr).Port)
	}
	return ps
}

// serves checks that addr forwards to a hash backend, byte-exact.
func serves(t *testing.T, addr string) error {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	return testpeer.Exchange(c, 1000, 1000, 9)
}

// refused checks that nothing accepts on addr.
func refused(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err == nil {
		c.Close()
		return false
	}
	return errors.Is(err, syscall.ECONNREFUSED)
}

// inode returns the socket inode behind the listener on port, or 0.
func inode(t *testing.T, e *Engine, port int) uint64 {
	t.Helper()
	_, ino := socketOf(t, e, port)
	return ino
}

// socketOf returns the fd and the socket inode of the listener on port, or
// zeros when there is none.
func socketOf(t *testing.T, e *Engine, port int) (int, uint64) {
	t.Helper()
	for _, ln := range e.Listeners() {
		if int(ln.Addr().Port()) == port {
			var st unix.Stat_t
			if err := unix.Fstat(ln.fd, &st); err != nil {
				t.Fatal(err)
			}
			return ln.fd, st.Ino
		}
	}
	return 0, 0
}

// A table change keeps, swaps, pauses and adds sockets; rollback restores
// the old table with the very same sockets, and commit makes it final.
func TestApplyCommitRollback(t *testing.T) {
	b1, b2 := backend(t), backend(t)
	p := freePorts(t, 4)
	A := fmt.Sprintf("tcp 127.0.0.1:%d -> %s", p[0], b1.Addr()) // unchanged
	B1 := fmt.Sprintf("tcp 127.0.0.1:%d -> %s", p[1], b1.Addr())
	B2 := fmt.Sprintf("tcp 127.0.0.1:%d -> %s splice=off", p[1], b2.Addr()) // same key, new rule
	C := fmt.Sprintf("tcp 127.0.0.1:%d -> %s", p[2], b1.Addr())             // removed
	D := fmt.Sprintf("tcp 127.0.0.1:%d -> %s", p[3], b2.Addr())             // added
	addr := func(i int) string { return fmt.Sprintf("127.0.0.1:%d", p[i]) }

	e := newEngine(t)
	applyCommit(t, e, A, B1, C)
	if g := e.Generation(); g != 1 {
		t.Fatalf("generation %d after the first commit", g)
	}
	inodes := []uint64{inode(t, e, p[0]), inode(t, e, p[1]), inode(t, e, p[2])}

	// A live session on B's old rule, started before the change.
	live, err := net.Dial("tcp", addr(1))
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()

	sum, err := e.Apply(parseAll(t, A, B2, D))
	if err != nil {
		t.Fatal(err)
	}
	if !sum.OK() || sum.Kept != 2 || sum.Added != 1 || sum.Removed != 1 || sum.Generation != 2 {
		t.Fatalf("summary %+v", sum)
	}
	if _, err := e.Apply(parseAll(t, A)); !errors.Is(err, ErrPending) {
		t.Fatalf("a second apply while one is pending: %v", err)
	}
	// Applied, not committed: the new table serves, the removed port refuses.
	for _, i := range []int{0, 1, 3} {
		if err := serves(t, addr(i)); err != nil {
			t.Fatalf("port %d after apply: %v", p[i], err)
		}
	}
	if !refused(addr(2)) {
		t.Fatal("the removed rule's port still accepts while paused")
	}
	if b2.Served.Load() != 2 { // B2 and D went to backend 2
		t.Fatalf("backend 2 served %d, want 2: the swapped rule is not in force", b2.Served.Load())
	}
	if inode(t, e, p[0]) != inodes[0] || inode(t, e, p[1]) != inodes[1] {
		t.Fatal("a kept listen key got a new socket")
	}

	back, err := e.Rollback()
	if err != nil {
		t.Fatal(err)
	}
	if !back.OK() || len(back.Rules) != 3 || back.Rules[2].Bound != 1 {
		t.Fatalf("rollback summary %+v", back)
	}
	for i := 0; i < 3; i++ {
		if got := inode(t, e, p[i]); got != inodes[i] {
			t.Fatalf("port %d has socket %d after rollback, had %d: it was re-bound", p[i], got, inodes[i])
		}
		if err := serves(t, addr(i)); err != nil {
			t.Fatalf("port %d after rollback: %v", p[i], err)
		}
	}
	if !refused(addr(3)) {
		t.Fatal("the added port still accepts after rollback")
	}
	if g := e.Generation(); g != 1 {
		t.Fatalf("generation %d after a rollback, want 1", g)
	}

	applyCommit(t, e, A, B2, D)
	if g := e.Generation(); g != 2 {
		t.Fatalf("generation %d after the second commit", g)
	}
	if !refused(addr(2)) || inode(t, e, p[2]) != 0 {
		t.Fatal("the removed rule's socket is still open after commit")
	}
	if got := strings.Join(func() (s []string) {
		for _, r := range e.Rules() {
			s = append(s, r.String())
		}
		return
	}(), "\n"); got != strings.Join([]string{A, B2, D}, "\n") {
		t.Fatalf("active table:\n%s", got)
	}

	// The session that started on B1 still goes to backend 1 (its rule's
	// snapshot), across the apply, the rollback and the commit.
	before := b1.Served.Load()
	if err := testpeer.Exchange(live, 5000, 5000, 3); err != nil {
		t.Fatalf("live session: %v", err)
	}
	waitFor(t, "the live session's exchange counted on backend 1", func() bool { return b1.Served.Load() == before+1 })
	if _, err := e.Commit(); !errors.Is(err, ErrNoPending) {
		t.Fatalf("commit with nothing pending: %v", err)
	}
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !ok(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting: %s", what)
		}
	}
}

// A port held by another socket fails its rule, with the errno; a weak rule
// that bound some of its ports does not fail the verdict.
func TestApplyBindConflict(t *testing.T) {
	b := backend(t)
	held, hp := heldWithFreeNeighbour(t)
	defer held.Close()
	e := newEngine(t)

	sum, err := e.Apply(parseAll(t, fmt.Sprintf("tcp 127.0.0.1:%d -> %s", hp, b.Addr())))
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("tcp 127.0.0.1:%d: port %d: address already in use", hp, hp)
	if sum.OK() || len(sum.Failures()) != 1 || sum.Failures()[0] != want || sum.Rules[0].Failed[0].Errno != syscall.EADDRINUSE {
		t.Fatalf("summary %+v, failures %q", sum, sum.Failures())
	}
	if _, err := e.Rollback(); err != nil {
		t.Fatal(err)
	}

	// Weak, over a two-port range of which one is held.
	sum, err = e.Apply(parseAll(t, fmt.Sprintf("tcp 127.0.0.1:%d-%d -> %s weak", hp, hp+1, b.Addr())))
	if err != nil {
		t.Fatal(err)
	}
	if !sum.OK() || sum.Rules[0].Bound != 1 || len(sum.Rules[0].Failed) != 1 {
		t.Fatalf("weak summary %+v", sum)
	}
	e.Commit()
}

// heldWithFreeNeighbour holds a loopback port whose next port is free. It
// looks below the ephemeral range, where the kernel's own picks do not
// crowd neighbours.
func heldWithFreeNeighbour(t *testing.T) (net.Listener, int) {
	t.Helper()
	for i := 0; i < 200; i++ {
		hp := 20000 + rand.IntN(10000)
		held, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", hp))
		if err != nil {
			continue
		}
		if next, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", hp+1)); err == nil {
			next.Close()
			return held, hp
		}
		held.Close()
	}
	t.Fatal("no free pair of neighbouring ports")
	return nil, 0
}

// While a client connects and closes in a tight, bounded loop on an
// unchanged port, applies and commits change other rules: not one
// connection on that port is refused or reset.
func TestApplyContinuity(t *testing.T) {
	b := backend(t)
	p := freePorts(t, 3)
	keep := fmt.Sprintf("tcp 127.0.0.1:%d -> %s", p[0], b.Addr())
	other := func(i int) string {
		return fmt.Sprintf("tcp 127.0.0.1:%d -> %s timeout.idle=%ds", p[1+i%2], b.Addr(), 10+i)
	}
	e := newEngine(t)
	applyCommit(t, e, keep, other(0))

	var stop atomic.Bool
	var ok, bad atomic.Int64
	var lastErr atomic.Value
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; i < 20000 && !stop.Load(); i++ {
			c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", p[0]), time.Second)
			if err == nil {
				err = testpeer.Exchange(c, 10, 10, uint64(i))
				c.Close()
			}
			if err != nil {
				bad.Add(1)
				lastErr.Store(err)
			} else {
				ok.Add(1)
			}
		}
	}()
	const applies = 100
	for i := 1; i <= applies; i++ {
		sum, err := e.Apply(parseAll(t, keep, other(i)))
		if err != nil {
			t.Fatal(err)
		}
		if !sum.OK() {
			t.Fatalf("apply %d: %v", i, sum.Failures())
		}
		if i%3 == 0 {
			_, err = e.Rollback()
		} else {
			_, err = e.Commit()
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	stop.Store(true)
	wg.Wait()
	t.Logf("%d applies; %d connections on the unchanged port, %d failed", applies, ok.Load(), bad.Load())
	if bad.Load() > 0 {
		t.Fatalf("%d connections failed on the unchanged port: %v", bad.Load(), lastErr.Load())
	}
	if ok.Load() == 0 {
		t.Fatal("no connection was made during the applies")
	}
}

// UDP sockets move, pause and resume like tcp ones; flows follow the socket.
func TestApplyUDP(t *testing.T) {
	echo := udpEcho(t)
	p := freePorts(t, 1)[0]
	line := fmt.Sprintf("udp 127.0.0.1:%d -> %s", p, echo)
	e := newEngine(t)
	applyCommit(t, e, line)
	c := dialUDP(t, fmt.Sprintf("127.0.0.1:%d", p))
	if err := testpeer.UDPPingPong(c, 1, 3, []int{100}, 2*time.Second); err != nil {
		t.Fatal(err)
	}
	// Same key, new rule: the flow keeps working through the swap.
	applyCommit(t, e, line+" timeout.idle=5s")
	if err := testpeer.UDPPingPong(c, 1, 3, []int{100}, 2*time.Second); err != nil {
		t.Fatalf("after the swap: %v", err)
	}
	// Removed and rolled back: the same socket serves again.
	if _, err := e.Apply(nil); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Rollback(); err != nil {
		t.Fatal(err)
	}
	if err := testpeer.UDPPingPong(c, 1, 3, []int{100}, 2*time.Second); err != nil {
		t.Fatalf("after the rollback: %v", err)
	}
	applyCommit(t, e)
	if s := e.Stats(); s.UDPFlows != 0 {
		t.Fatalf("flows left after the rule was removed: %+v", s)
	}
}

// Removing a rule pauses its socket without a false alarm: the loops stop
// polling it before it leaves LISTEN, so no loop takes the shutdown's wake-up
// for an accept failure (it logged "accept failed … invalid argument" at
// every ctl del).
func TestPauseIsNoAcceptFailure(t *testing.T) {
	log, logs := observed(zap.NewAtomicLevelAt(zap.WarnLevel))
	e, err := New(Config{Loops: 2, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	e.Start()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		e.Shutdown(ctx)
	})
	keep := "tcp 127.0.0.1:0 -> 127.0.0.1:9"
	for i := 0; i < 20; i++ {
		applyCommit(t, e, keep, "tcp 127.0.0.1:0 -> 127.0.0.1:10")
		applyCommit(t, e, keep)
	}
	// A loop that saw a stale event handles it in its next batch: give
	// both loops one round trip before reading the log.
	e.onLoops(func(*Loop) {})
	if n := logs.FilterMessage("accept failed; pausing this listener briefly").Len(); n > 0 {
		t.Errorf("%d accept-failure warnings for 20 removed rules: %v", n, logs.All()[0].ContextMap())
	}
}
