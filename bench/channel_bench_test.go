package bench

import (
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/channel"
	"github.com/sluice-proxy/sluice/internal/testpeer"
	"github.com/sluice-proxy/sluice/rules"
)

// benchChannel moves b.N chunks of chunk bytes through one channel between
// two loopback TCP connections: a writer goroutine feeds the input, a reader
// goroutine drains the output, and the benchmark goroutine pumps the channel
// as the event loop does (poll(2) standing in for epoll), with the engine's
// default budget (a pump that yields is pumped again at once). Allocations
// reported are the whole process's: writer and reader use raw syscalls, so
// any allocation is the channel's.
func benchChannel(b *testing.B, mode rules.SpliceMode, chunk int) {
	src, in := testpeer.TCPPair(b)
	out, dst := testpeer.TCPPair(b)
	unix.SetNonblock(in, true)
	unix.SetNonblock(out, true)
	pools := channel.NewPools(0, 0, channel.NewPipeBudget(4))
	defer pools.Close()
	var ch channel.Channel
	ch.Init(in, out, mode)

	data := make([]byte, chunk)
	sink := make([]byte, 256<<10)
	n := b.N
	go func() {
		for i := 0; i < n; i++ {
			for p := data; len(p) > 0; {
				w, err := unix.Write(src, p)
				if err != nil {
					return
				}
				p = p[w:]
			}
		}
		unix.Shutdown(src, unix.SHUT_WR)
	}()
	done := make(chan struct{})
	go func() {
		for {
			r, err := unix.Read(dst, sink)
			if r <= 0 || err != nil {
				close(done)
				return
			}
		}
	}()
	fds := make([]unix.PollFd, 2)
	b.SetBytes(int64(chunk))
	b.ReportAllocs()
	b.ResetTimer()
	for !ch.Done() {
		ch.Pump(pools, channel.DefaultBudget)
		if ch.Failed() {
			b.Fatalf("channel failed: %v", ch.Flags())
		}
		if ch.WantShutOut() {
			unix.Shutdown(out, unix.SHUT_WR)
			ch.SetShutOut()
			break
		}
		if ch.Yielded() {
			continue // the loop's re-queue: pump again, no event will come
		}
		fds[0] = unix.PollFd{Fd: -1}
		fds[1] = unix.PollFd{Fd: -1}
		if ch.Flags()&channel.EmptyIn != 0 {
			fds[0] = unix.PollFd{Fd: int32(in), Events: unix.POLLIN | unix.POLLRDHUP}
		}
		if ch.Flags()&channel.FullOut != 0 {
			fds[1] = unix.PollFd{Fd: int32(out), Events: unix.POLLOUT}
		}
		unix.Poll(fds, -1)
		if fds[0].Revents != 0 {
			ch.Readable(fds[0].Revents&(unix.POLLRDHUP|unix.POLLHUP|unix.POLLERR) != 0)
		}
		if fds[1].Revents != 0 {
			ch.Writable()
		}
	}
	<-done
	b.StopTimer()
	if ch.Bytes != uint64(n*chunk) {
		b.Fatalf("moved %d bytes, want %d", ch.Bytes, n*chunk)
	}
}

func BenchmarkChannelBuffer64K(b *testing.B) { benchChannel(b, rules.SpliceOff, 64<<10) }
func BenchmarkChannelPipe64K(b *testing.B)   { benchChannel(b, rules.SpliceOn, 64<<10) }
func BenchmarkChannelAuto64K(b *testing.B)   { benchChannel(b, rules.SpliceAuto, 64<<10) }
func BenchmarkChannelBuffer1K(b *testing.B)  { benchChannel(b, rules.SpliceOff, 1<<10) }
func BenchmarkChannelPipe1K(b *testing.B)    { benchChannel(b, rules.SpliceOn, 1<<10) }
