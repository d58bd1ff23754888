package engine

import (
	"bytes"
	"io"
	"math/rand/v2"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// TestPumpBudgetResumes: a stream larger than the budget, which reaches
// sluice's socket while the loop is busy, so the loop sees one readable edge
// for all of it and the client sends nothing after (no FIN). Each pump
// moves about the budget and yields; only the loop's re-queue brings the
// session back (edge-triggered: no event will), so the backend gets every
// byte, exactly, and the loop counts the re-queues. Without the re-queue the
// backend would get one budget and then wait forever.
func TestPumpBudgetResumes(t *testing.T) {
	const total, budget = 1 << 20, 16 << 10
	for _, mode := range []string{"off", "on"} {
		t.Run("splice="+mode, func(t *testing.T) {
			got := make(chan []byte, 1)
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			b := testpeer.ServeFunc(ln, func(c net.Conn) error {
				buf := make([]byte, total)
				c.SetReadDeadline(time.Now().Add(10 * time.Second))
				n, _ := io.ReadFull(c, buf)
				got <- buf[:n]
				return nil
			})
			t.Cleanup(b.Close)
			e, addr := start(t, "tcp 127.0.0.1:0 -> "+b.Addr()+" splice="+mode+" sockbuf=4m", Config{Loops: 1, Budget: budget})
			c := dial(t, addr)
			defer c.Close()
			waitForwarding(t, e)
			cli, _ := sessionFds(t, e)

			data := make([]byte, total)
			rand.NewChaCha8([32]byte{2}).Read(data)
			before := e.PumpRequeues()
			wrote := make(chan error, 1)
			e.onLoops(func(l *Loop) {
				// The loop is held here while the whole stream lands in
				// its socket: one edge for all of it.
				go func() { _, err := c.Write(data); wrote <- err }()
				for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
					if n, _ := unix.IoctlGetInt(cli, unix.SIOCINQ); n == total {
						return
					}
				}
			})
			if err := <-wrote; err != nil {
				t.Fatal(err)
			}
			var rcvd []byte
			select {
			case rcvd = <-got:
			case <-time.After(15 * time.Second):
				t.Fatal("backend did not get the stream")
			}
			requeues := e.PumpRequeues() - before
			if !bytes.Equal(rcvd, data) {
				t.Fatalf("backend got %d bytes of %d (or different bytes); %d re-queues", len(rcvd), total, requeues)
			}
			// One pump moves one budget and at most one write (a buffer, or
			// a pipe) past it.
			if min := uint64(total / (budget + 256<<10)); requeues < min {
				t.Errorf("%d re-queues for %d bytes at a budget of %d, want at least %d", requeues, total, budget, min)
			}
			t.Logf("%d bytes, %d re-queues", total, requeues)
		})
	}
}

// waitForwarding waits until e's one session forwards.
func waitForwarding(t *testing.T, e *Engine) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		ok := false
		e.onLoops(func(l *Loop) {
			for _, h := range l.table {
				if s, is := h.(*session); is && s.state == stForwarding {
					ok = true
				}
			}
		})
		if ok {
			return
		}
	}
	t.Fatal("no session forwarding")
}

// TestPumpAgainList: the again list takes a session once however often it
// yields in a batch, keeps its array, and skips a session that ended.
func TestPumpAgainList(t *testing.T) {
	l := &Loop{budget: pumpBudget(0)}
	a, b := &session{state: stClosed}, &session{state: stClosed}
	l.requeue(a)
	l.requeue(a)
	l.requeue(b)
	if len(l.again) != 2 || l.requeued.Load() != 2 || a.flags&sfAgain == 0 {
		t.Fatalf("again %d, requeued %d, flags %v", len(l.again), l.requeued.Load(), a.flags)
	}
	arr := cap(l.again)
	l.pumpAgain()
	if len(l.again) != 0 || cap(l.again) != arr || a.flags&sfAgain != 0 || b.flags&sfAgain != 0 {
		t.Fatalf("after: again %d (cap %d, was %d), flags %v %v", len(l.again), cap(l.again), arr, a.flags, b.flags)
	}
	if pumpBudget(-1) != 0 || pumpBudget(0) <= 0 || pumpBudget(4096) != 4096 {
		t.Errorf("pumpBudget: %d %d %d", pumpBudget(-1), pumpBudget(0), pumpBudget(4096))
	}
	if n := testing.AllocsPerRun(100, func() { l.requeue(a); l.pumpAgain() }); n != 0 {
		t.Errorf("requeue and pumpAgain allocate %.1f times", n)
	}
}
