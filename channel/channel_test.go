package channel

import (
	"bytes"
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/internal/bitnames"
	"github.com/sluice-proxy/sluice/internal/testpeer"
	"github.com/sluice-proxy/sluice/rules"
)

func TestEveryFlagHasAName(t *testing.T) {
	if m := bitnames.Missing(allFlags, flagNames); m != 0 {
		t.Errorf("flag bits %#x have no name", uint16(m))
	}
	if got := (ErrIn | FullOut).String(); got != "ERR_IN|FULL_OUT" {
		t.Errorf("String = %q", got)
	}
}

// tcpPair returns a connected loopback pair: an *os.File-free non-blocking fd
// for the channel's side, and a net.Conn for the test's side.
func tcpPair(t testing.TB) (int, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	peer, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	f, err := c.(*net.TCPConn).File() // a dup, blocking: make it ours and non-blocking
	c.Close()
	if err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Dup(int(f.Fd()))
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd); peer.Close() })
	return fd, peer
}

// drive pumps ch until its input ended and it shut its output, waiting with
// poll(2) for the readiness its flags ask for, as the event loop would.
func drive(t testing.TB, ch *Channel, p *Pools, in, out int, maxHeld *int) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !ch.Done() {
		if time.Now().After(deadline) {
			t.Fatalf("channel stuck: flags %v held %d", ch.Flags(), ch.Held())
		}
		ch.Pump(p, 0)
		if h := ch.Held(); maxHeld != nil && h > *maxHeld {
			*maxHeld = h
		}
		if ch.Failed() {
			t.Fatalf("channel failed: %v", ch.Flags())
		}
		if ch.WantShutOut() {
			if err := unix.Shutdown(out, unix.SHUT_WR); err != nil {
				t.Fatal(err)
			}
			ch.SetShutOut()
			continue
		}
		fds := []unix.PollFd{{Fd: int32(in), Events: unix.POLLIN | unix.POLLRDHUP}, {Fd: int32(out), Events: unix.POLLOUT}}
		if ch.Flags()&EmptyIn == 0 {
			fds[0].Fd = -1
		}
		if ch.Flags()&FullOut == 0 {
			fds[1].Fd = -1
		}
		if fds[0].Fd == -1 && fds[1].Fd == -1 {
			continue
		}
		if _, err := unix.Poll(fds, 1000); err != nil && err != unix.EINTR {
			t.Fatal(err)
		}
		if fds[0].Revents != 0 {
			ch.Readable(fds[0].Revents&(unix.POLLRDHUP|unix.POLLHUP|unix.POLLERR) != 0)
		}
		if fds[1].Revents != 0 {
			ch.Writable()
		}
	}
}

func TestTransferEveryMode(t *testing.T) {
	sizes := []int{0, 1, 1000, DefaultBufSize, DefaultBufSize + 1, 3 << 20}
	for _, mode := range []rules.SpliceMode{rules.SpliceOff, rules.SpliceOn, rules.SpliceAuto} {
		for _, size := range sizes {
			t.Run(mode.String()+"/"+itoa(size), func(t *testing.T) {
				in, writer := tcpPair(t)
				out, reader := tcpPair(t)
				p := NewPools(0, 0, NewPipeBudget(4))
				var ch Channel
				ch.Init(in, out, mode)

				data := make([]byte, size)
				rand.NewChaCha8([32]byte{byte(size)}).Read(data)
				go func() {
					writer.Write(data)
					writer.(*net.TCPConn).CloseWrite()
				}()
				got := make(chan []byte, 1)
				go func() { b, _ := io.ReadAll(reader); got <- b }()
				drive(t, &ch, p, in, out, nil)
				b := <-got
				if sha256.Sum256(b) != sha256.Sum256(data) {
					t.Fatalf("got %d bytes, want %d, content differs", len(b), size)
				}
				if ch.Bytes != uint64(size) {
					t.Errorf("Bytes = %d, want %d", ch.Bytes, size)
				}
				switch {
				case mode == rules.SpliceOff && ch.Spliced != 0:
					t.Errorf("splice=off spliced %d bytes", ch.Spliced)
				case mode == rules.SpliceOn && size > 0 && ch.Spliced != uint64(size):
					t.Errorf("splice=on spliced %d of %d bytes", ch.Spliced, size)
				case mode == rules.SpliceAuto && size >= 3<<20 && ch.Spliced == 0:
					t.Errorf("splice=auto never moved to the pipe on a %d-byte stream", size)
				case mode == rules.SpliceAuto && size < DefaultBufSize && ch.Spliced != 0:
					t.Errorf("splice=auto spliced a small stream")
				}
				if s := p.Stats(); s.BuffersInUse != 0 || s.PipesInUse != 0 {
					t.Errorf("after the stream, pools still lend: %+v", s)
				}
				p.Close()
			})
		}
	}
}

func itoa(n int) string {
	var b [20]byte
	i := len(b)
	for {
		i--
		b[i] = byte('0' + n%10)
		n /= 10
		if n == 0 {
			return string(b[i:])
		}
	}
}

// A reader that stops reading bounds what the channel holds at one buffer
// (or one pipe), and the channel says FULL_OUT.
func TestBackPressureBoundsMemory(t *testing.T) {
	for _, mode := range []rules.SpliceMode{rules.SpliceOff, rules.SpliceOn} {
		t.Run(mode.String(), func(t *testing.T) {
			in, writer := tcpPair(t)
			out, _ := tcpPair(t) // never read
			p := NewPools(0, 0, NewPipeBudget(1))
			var ch Channel
			ch.Init(in, out, mode)
			stop := make(chan struct{})
			go func() {
				chunk := make([]byte, 64<<10)
				for {
					select {
					case <-stop:
						return
					default:
					}
					writer.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
					writer.Write(chunk)
				}
			}()
			defer close(stop)
			limit := DefaultBufSize
			if mode == rules.SpliceOn {
				limit = DefaultPipeSize * 4 // the kernel may grant a bigger pipe than asked, never this much
			}
			for i := 0; i < 200; i++ {
				ch.Pump(p, 0)
				if ch.Held() > limit {
					t.Fatalf("holds %d bytes, bound is %d", ch.Held(), limit)
				}
				if ch.Flags()&FullOut != 0 && ch.Flags()&EmptyIn == 0 {
					break // reading stopped while input was still there
				}
				ch.Readable(true)
				time.Sleep(5 * time.Millisecond)
			}
			if ch.Flags()&FullOut == 0 {
				t.Fatalf("output never reported full: %v", ch.Flags())
			}
			if n := ch.Pump(p, 0); n != 0 {
				t.Fatalf("pumped %d bytes into a full output", n)
			}
			ch.Release(p)
			if s := p.Stats(); s.BuffersInUse != 0 || s.PipesInUse != 0 {
				t.Errorf("after Release, pools still lend: %+v", s)
			}
		})
	}
}

// With no pipe to be had, splice=on carries on with buffers.
func TestPipeBudgetSpentFallsBackToBuffer(t *testing.T) {
	in, writer := tcpPair(t)
	out, reader := tcpPair(t)
	budget := NewPipeBudget(0)
	p := NewPools(0, 0, budget)
	var ch Channel
	ch.Init(in, out, rules.SpliceOn)
	data := bytes.Repeat([]byte("sluice"), 100000)
	go func() { writer.Write(data); writer.(*net.TCPConn).CloseWrite() }()
	got := make(chan []byte, 1)
	go func() { b, _ := io.ReadAll(reader); got <- b }()
	drive(t, &ch, p, in, out, nil)
	if !bytes.Equal(<-got, data) {
		t.Fatal("data differs")
	}
	if ch.Spliced != 0 || budget.Denied() == 0 {
		t.Fatalf("spliced %d, denied %d", ch.Spliced, budget.Denied())
	}
}

// An idle channel holds no buffer and no pipe between messages.
func TestIdleHoldsNothing(t *testing.T) {
	for _, mode := range []rules.SpliceMode{rules.SpliceOff, rules.SpliceOn, rules.SpliceAuto} {
		in, writer := tcpPair(t)
		out, reader := tcpPair(t)
		p := NewPools(0, 0, NewPipeBudget(2))
		var ch Channel
		ch.Init(in, out, mode)
		buf := make([]byte, 100)
		for i := 0; i < 3; i++ {
			writer.Write([]byte("ping"))
			for ch.Bytes < uint64(4*(i+1)) {
				ch.Readable(true)
				ch.Pump(p, 0)
			}
			if n, _ := reader.Read(buf); string(buf[:n]) != "ping" {
				t.Fatalf("%v: got %q", mode, buf[:n])
			}
			ch.Readable(false)
			ch.Pump(p, 0) // reads EAGAIN: now idle
			if !ch.Idle() || ch.buf != nil || ch.pipe != nil {
				t.Fatalf("%v: idle channel holds buf=%v pipe=%v flags %v", mode, ch.buf != nil, ch.pipe != nil, ch.Flags())
			}
			if s := p.Stats(); s.BuffersInUse != 0 || s.PipesInUse != 0 {
				t.Fatalf("%v: idle, pools lend %+v", mode, s)
			}
		}
	}
}

func TestResetIsErrIn(t *testing.T) {
	in, writer := tcpPair(t)
	out, _ := tcpPair(t)
	p := NewPools(0, 0, nil)
	var ch Channel
	ch.Init(in, out, rules.SpliceOff)
	writer.(*net.TCPConn).SetLinger(0)
	writer.Write([]byte("x"))
	time.Sleep(10 * time.Millisecond)
	writer.Close()
	deadline := time.Now().Add(5 * time.Second)
	for !ch.Failed() && time.Now().Before(deadline) {
		ch.Readable(true)
		ch.Pump(p, 0)
		time.Sleep(time.Millisecond)
	}
	if ch.Flags()&ErrIn == 0 {
		t.Fatalf("flags %v, want ERR_IN", ch.Flags())
	}
	ch.Release(p)
}

func TestMain(m *testing.M) { os.Exit(m.Run()) }

// pinged returns a buffer channel (and its pools) whose input's peer has
// sent "ping", and its FIN when fin, both delivered before it returns.
func pinged(t *testing.T, fin bool) (*Channel, *Pools) {
	in, writer := tcpPair(t)
	out, _ := tcpPair(t)
	ch := new(Channel)
	ch.Init(in, out, rules.SpliceOff)
	writer.Write([]byte("ping"))
	if fin {
		writer.(*net.TCPConn).CloseWrite()
	}
	testpeer.DeliveredConn(t, writer.(*net.TCPConn))
	return ch, NewPools(0, 0, nil)
}

// Prime: what the poller said before the channel existed decides whether
// the first Pump reads, and whether a short read ends reading. The peer sends
// four bytes and its FIN before the first Pump.
func TestPrime(t *testing.T) {
	for _, tc := range []struct {
		name          string
		readable, hup bool
		wantBytes     uint64 // moved by the first Pump
		wantFlag      Flags  // and where it stopped
	}{
		{"no event", false, false, 0, EmptyIn},
		{"readable", true, false, 4, EmptyIn}, // a short read: wait for the next edge
		{"readable, hang-up", true, true, 4, ShutIn},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ch, p := pinged(t, true)
			ch.Prime(tc.readable, tc.hup)
			ch.Pump(p, 0)
			if ch.Bytes != tc.wantBytes || ch.Flags()&(EmptyIn|ShutIn) != tc.wantFlag {
				t.Fatalf("first pump: moved %d, flags %v; want %d, %v", ch.Bytes, ch.Flags(), tc.wantBytes, tc.wantFlag)
			}
			ch.Readable(true) // the edge of the FIN
			ch.Pump(p, 0)
			if ch.Bytes != 4 || ch.Flags()&ShutIn == 0 {
				t.Fatalf("after the edge: moved %d, flags %v; want 4, SHUT_IN", ch.Bytes, ch.Flags())
			}
			ch.Release(p)
		})
	}
}

// ReadableFin: an event that carried RDHUP alone says the peer's FIN is
// queued behind its bytes, so the short read that drains them ends the
// input without the read that would return 0. The "FIN not sent" case shows
// that the channel trusts the event (it does not read again), which is what
// saves the system call; the engine only calls ReadableFin for RDHUP without
// HUP or ERR.
func TestReadableFinSkipsTheZeroRead(t *testing.T) {
	for _, tc := range []struct {
		name     string
		fin      bool // ReadableFin rather than Readable(true)
		closeW   bool // the peer really shut its write side
		wantFlag Flags
	}{
		{"hang-up, FIN sent", false, true, ShutIn},
		{"FIN event, FIN sent", true, true, ShutIn},
		{"hang-up, FIN not sent", false, false, EmptyIn}, // read on: EAGAIN
		{"FIN event, FIN not sent", true, false, ShutIn}, // no second read
	} {
		t.Run(tc.name, func(t *testing.T) {
			ch, p := pinged(t, tc.closeW)
			if tc.fin {
				ch.ReadableFin()
			} else {
				ch.Readable(true)
			}
			ch.Pump(p, 0)
			if ch.Bytes != 4 || ch.Flags()&(EmptyIn|ShutIn) != tc.wantFlag {
				t.Fatalf("moved %d, flags %v; want 4, %v", ch.Bytes, ch.Flags(), tc.wantFlag)
			}
			ch.Readable(false) // a later plain event forgets the FIN
			if ch.Flags()&sawFin != 0 {
				t.Fatalf("flags %v after a plain event, want no SAW_FIN", ch.Flags())
			}
			ch.Release(p)
		})
	}
}
