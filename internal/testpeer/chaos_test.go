package testpeer

import (
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// relay is a tiny proxy for testing the chaos exchange itself: it copies
// both ways, and can flip one byte of the download or turn a reset from
// either side into a clean FIN towards the other, the two ways a proxy could
// lose data that the exchange must catch.
type relay struct {
	ln      net.Listener
	target  string
	flipAt  int64 // >= 0: flip this byte of the backend-to-client stream
	finOnly bool  // pass a reset on as a FIN
}

func startRelay(t *testing.T, target string, flipAt int64, finOnly bool) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &relay{ln: ln, target: target, flipAt: flipAt, finOnly: finOnly}
	t.Cleanup(func() { ln.Close() })
	Accept(ln, r.handle)
	return ln.Addr().String()
}

func (r *relay) handle(c net.Conn) {
	s, err := net.Dial("tcp", r.target)
	if err != nil {
		c.Close()
		return
	}
	cc, sc := c.(*net.TCPConn), s.(*net.TCPConn)
	var wg sync.WaitGroup
	wg.Add(2)
	// An honest relay resets both sides on any error. A write that
	// fails takes the socket's error, and a read the other way then
	// sees a plain EOF: writes and the EOF check hold mu, so that
	// EOF is known for what it is.
	var mu sync.Mutex
	broken := false
	abort := func() {
		broken = true
		for _, x := range []*net.TCPConn{cc, sc} {
			x.SetLinger(0)
			x.Close()
		}
	}
	pass := func(dst, src *net.TCPConn, flip int64) {
		defer wg.Done()
		buf := make([]byte, 4096)
		var off int64
		for {
			n, err := src.Read(buf)
			if flip >= off && flip < off+int64(n) {
				buf[flip-off] ^= 0x40
			}
			off += int64(n)
			mu.Lock()
			if n > 0 {
				if _, werr := dst.Write(buf[:n]); werr != nil {
					if !r.finOnly {
						abort()
					}
					mu.Unlock()
					return
				}
			}
			switch {
			case err == nil:
				mu.Unlock()
				continue
			case r.finOnly || err == io.EOF && !broken:
				dst.CloseWrite()
			default:
				abort()
			}
			mu.Unlock()
			return
		}
	}
	go pass(sc, cc, -1)
	go pass(cc, sc, r.flipAt)
	wg.Wait()
	cc.Close()
	sc.Close()
}

func runPlan(t *testing.T, addr string, p Plan) Result {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	return p.Client(c.(*net.TCPConn), Options{})
}

// Every order and fault, straight to the backend and through an honest
// relay: the client and the backend both find what the plan says.
func TestChaosPlans(t *testing.T) {
	b, err := ListenChaos("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	honest := startRelay(t, b.Addr(), -1, false)
	rng := rand.New(rand.NewPCG(1, 2))
	want := ChaosStats{}
	seed := uint64(0)
	for _, addr := range []string{b.Addr(), honest} {
		for o := Order(0); o < orderCount; o++ {
			for f := Fault(0); f < faultCount; f++ {
				for _, size := range []int64{0, 1, 100 << 10, 3 << 20} {
					seed++
					p := Plan{Seed: seed, Up: size, Down: LogUniform(rng, 1<<20), Order: o, Fault: f}
					switch f {
					case ClientReset:
						p.At = rng.Int64N(p.Up + trailerLen)
						want.ClientReset++
					case ServerReset:
						p.At = rng.Int64N(p.Down + trailerLen)
						want.ServerReset++
					default:
						want.Completed++
					}
					r := runPlan(t, addr, p)
					if err := r.Check(p, ClientSide); err != nil {
						t.Errorf("%v via %s: %v", p, addr, err)
					}
				}
			}
		}
	}
	// A conn reset before its plan arrived may be counted early instead.
	deadline := time.Now().Add(5 * time.Second)
	var got ChaosStats
	for {
		got = b.Stats()
		if got.Open == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got.Failures != 0 {
		t.Errorf("backend failures: %v", got.Errors)
	}
	if got.Completed != want.Completed || got.ServerReset != want.ServerReset || got.ClientReset+got.Early != want.ClientReset {
		t.Errorf("backend counted %+v, want %d completed, %d server resets, %d client resets", got, want.Completed, want.ServerReset, want.ClientReset)
	}
}

// The exchange catches what a broken proxy does: a flipped byte (at the
// position it happened), and a reset turned into a clean end of stream.
func TestChaosCatches(t *testing.T) {
	b, err := ListenChaos("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	t.Run("flipped byte", func(t *testing.T) {
		for _, at := range []int64{0, 5000, 70000 + PlanLen} {
			addr := startRelay(t, b.Addr(), at, false)
			p := Plan{Seed: 9, Up: 1000, Down: 100000}
			r := runPlan(t, addr, p)
			err := r.Check(p, ClientSide)
			if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("byte %d ", at)) && !strings.Contains(err.Error(), "trailer") {
				t.Errorf("byte %d flipped: %v", at, err)
			}
		}
	})
	t.Run("trailer flipped", func(t *testing.T) {
		addr := startRelay(t, b.Addr(), 100000+3, false)
		p := Plan{Seed: 9, Up: 1000, Down: 100000}
		if err := runPlan(t, addr, p).Check(p, ClientSide); err == nil || !strings.Contains(err.Error(), "SHA-256") {
			t.Errorf("trailer flipped: %v", err)
		}
	})
	t.Run("reset passed on as FIN", func(t *testing.T) {
		addr := startRelay(t, b.Addr(), -1, true)
		// The upload is whole before the backend resets, so the relay
		// has nothing to reset the client for but the backend's reset.
		p := Plan{Seed: 10, Up: 1000, Down: 1 << 20, Order: ClientFirst, Fault: ServerReset, At: 1000}
		err := runPlan(t, addr, p).Check(p, ClientSide)
		if err == nil || !strings.Contains(err.Error(), "clean end of stream") {
			t.Errorf("server reset turned into FIN: %v", err)
		}
	})
	t.Run("no backend", func(t *testing.T) {
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		addr := ln.Addr().String()
		go func() {
			c, err := ln.Accept()
			if err == nil {
				c.Close() // a backend that closes at once: the exchange is cut
			}
		}()
		defer ln.Close()
		p := Plan{Seed: 11, Up: 10, Down: 10}
		r := runPlan(t, addr, p)
		if err := r.Check(p, ClientSide); err == nil {
			t.Errorf("closed at once: passed")
		}
		if err := r.Lost(); err != nil {
			t.Errorf("closed at once: %v; want a clean cut (EOF or reset)", err)
		}
	})
}
