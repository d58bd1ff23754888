package channel

import (
	"bytes"
	"io"
	"math/rand/v2"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/internal/testpeer"
	"github.com/sluice-proxy/sluice/rules"
)

// bigPair is a loopback pair whose buffers (forced, as root) hold n bytes
// without the reader reading, so a test decides when readiness changes.
func bigPair(t *testing.T, n int) (a, b int) {
	t.Helper()
	a, b = testpeer.TCPPair(t)
	for _, fd := range []int{a, b} {
		for _, opt := range []int{unix.SO_SNDBUFFORCE, unix.SO_RCVBUFFORCE} {
			if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, opt, 4*n); err != nil {
				t.Skipf("forcing socket buffers: %v (needs CAP_NET_ADMIN)", err)
			}
		}
	}
	return a, b
}

// TestPumpBudget: a stream larger than the budget, all of it already in the
// input socket and no FIN after it, so no event will come again: each Pump
// stops after about the budget and says Yielded, and pumping again while it
// does (the loop's re-queue) moves every byte, exactly, with no new event.
// With no budget one Pump moves it all.
func TestPumpBudget(t *testing.T) {
	const total, budget = 1 << 20, 64 << 10
	for _, mode := range []rules.SpliceMode{rules.SpliceOff, rules.SpliceOn} {
		for _, b := range []int{budget, 0} {
			t.Run(mode.String()+"/"+map[bool]string{true: "budget", false: "none"}[b > 0], func(t *testing.T) {
				src, in := bigPair(t, total)
				out, dst := bigPair(t, total)
				unix.SetNonblock(in, true)
				unix.SetNonblock(out, true)
				data := make([]byte, total)
				rand.NewChaCha8([32]byte{1}).Read(data)
				if _, err := unix.Write(src, data); err != nil {
					t.Fatal(err)
				}
				testpeer.Delivered(t, src) // every byte in the input's kernel; src stays open: no FIN, no edge

				p := NewPools(0, 0, NewPipeBudget(2))
				defer p.Close()
				var ch Channel
				ch.Init(in, out, mode)
				ch.Prime(true, false)
				pumps := 0
				for {
					n := ch.Pump(p, b)
					pumps++
					// One write past the budget at most: a buffer, or a pipe.
					if limit := budget + DefaultPipeSize; b > 0 && n > limit {
						t.Fatalf("pump %d moved %d bytes, budget %d", pumps, n, b)
					}
					if !ch.Yielded() {
						break
					}
					if pumps > total/1024 {
						t.Fatalf("still yielding after %d pumps: flags %v", pumps, ch.Flags())
					}
				}
				if ch.Bytes != total || ch.Held() != 0 || ch.Failed() {
					t.Fatalf("after %d pumps: %d of %d bytes out, %d held, flags %v", pumps, ch.Bytes, total, ch.Held(), ch.Flags())
				}
				if ch.Flags()&EmptyIn == 0 {
					t.Errorf("flags %v: the drained input should wait for an edge", ch.Flags())
				}
				if b == 0 && pumps != 1 {
					t.Errorf("no budget: %d pumps, want 1", pumps)
				}
				if b > 0 && pumps < total/(budget+DefaultPipeSize) {
					t.Errorf("budget %d: only %d pumps for %d bytes", b, pumps, total)
				}
				got := make([]byte, total)
				if _, err := io.ReadFull(fdReader(dst), got); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, data) {
					t.Fatal("bytes differ")
				}
				t.Logf("%d bytes in %d pumps", total, pumps)
			})
		}
	}
}

// fdReader reads a blocking fd.
type fdReader int

func (f fdReader) Read(b []byte) (int, error) {
	n, err := unix.Read(int(f), b)
	if n == 0 && err == nil {
		return 0, io.EOF
	}
	return max(n, 0), err
}
