package integration

import (
	"io"
	"net"
	"testing"

	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// Benchmarks of the sluice binary next to the simplest Go proxy, one
// goroutine per direction and io.Copy, run as a peer process on the same
// machine in the same run. Speed is measured here, never asserted; the
// figures go to bench/RESULTS.md. Run them with
//
//	go test -run '^$' -bench . -benchtime 3x ./test/integration/

// peerTargetEnv tells a "gocopy" peer where to forward.
const peerTargetEnv = "SLUICE_IT_PEER_TARGET"

// goCopyProxy serves the baseline proxy on listen (an IPv4 address; "": a
// loopback port): per client, a backend conn and io.Copy each way in its own
// goroutine, half-closes passed on. Go splices TCP to TCP through a pipe
// held for the whole io.Copy, so an idle session pins two pipes.
func goCopyProxy(listen, target string) (net.Listener, error) {
	if listen == "" {
		listen = "127.0.0.1:0"
	}
	// tcp4: 0.0.0.0 is then the IPv4 wildcard, not a dual-stack socket.
	ln, err := net.Listen("tcp4", listen)
	if err != nil {
		return nil, err
	}
	testpeer.Accept(ln, func(c net.Conn) {
		defer c.Close()
		s, err := net.Dial("tcp", target)
		if err != nil {
			return
		}
		defer s.Close()
		up := make(chan struct{})
		go func() {
			io.Copy(s, c)
			s.(*net.TCPConn).CloseWrite()
			close(up)
		}()
		io.Copy(c, s)
		c.(*net.TCPConn).CloseWrite()
		<-up
	})
	return ln, nil
}

// comparedProxy starts one proxy to target and returns its address and pid;
// it is stopped when the benchmark ends.
type comparedProxy struct {
	name  string
	start func(tb testing.TB, target string) (addr string, pid int)
}

func sluiceProxy(options ...string) func(testing.TB, string) (string, int) {
	return func(tb testing.TB, target string) (string, int) {
		d := startForward(tb, target, options...)
		return d.Addr, d.cmd.Process.Pid
	}
}

func goCopyPeer(tb testing.TB, target string) (string, int) {
	tb.Setenv(peerTargetEnv, target)
	p := startPeer(tb, "gocopy")
	return p.Addr, p.cmd.Process.Pid
}

// One stream of 64 MiB each way per op, checked by SHA-256 at both ends. The
// client and the backend run in this process and hash every byte, so MiB/s is
// the whole chain's; cpu-ms/GiB is the proxy process's own CPU time per GiB
// moved (both ways counted), the steadier figure on a shared machine.
func BenchmarkSingleStream(b *testing.B) {
	const size = 64 << 20
	for _, p := range []comparedProxy{
		{"sluice/splice=auto", sluiceProxy("splice=auto")},
		{"sluice/splice=on", sluiceProxy("splice=on")},
		{"sluice/splice=off", sluiceProxy("splice=off")},
		{"gocopy", goCopyPeer},
	} {
		b.Run(p.name, func(b *testing.B) {
			be := hashBackend(b)
			addr, pid := p.start(b, be.Addr())
			cpu0 := cpuTicks(b, pid)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					b.Fatal(err)
				}
				err = testpeer.Exchange(c, size, size, uint64(i))
				c.Close()
				if err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			mib := float64(b.N) * size / (1 << 20)
			b.ReportMetric(mib/b.Elapsed().Seconds(), "MiB/s")
			b.ReportMetric(float64(cpuTicks(b, pid)-cpu0)/clockTicks*1000/(2*mib/1024), "cpu-ms/GiB")
		})
	}
}

// idleCompared is the number of idle sessions of the comparison: the Go
// proxy holds six fds per idle session (two sockets, two pipes), so 9 500
// would exhaust its 20 000 fds.
const idleCompared = 3000

// Bytes of proxy RSS and pipe fds per idle session (one round trip each, then
// silence), a fresh proxy per op.
func BenchmarkIdleSessions(b *testing.B) {
	for _, p := range []comparedProxy{
		{"sluice", sluiceProxy("--loops", "2")},
		{"gocopy", goCopyPeer},
	} {
		b.Run(p.name, func(b *testing.B) {
			echo := startPeer(b, "echo")
			var bytes, pipes float64
			for i := 0; i < b.N; i++ {
				addr, pid := p.start(b, echo.Addr)
				h := holdIdle(b, addr, pid, idleCompared)
				bytes += h.perSession()
				pipes += float64(h.fdsAfter["pipe"]-h.fdsBefore["pipe"]) / idleCompared
				h.close()
			}
			b.ReportMetric(bytes/float64(b.N), "B/session")
			b.ReportMetric(pipes/float64(b.N), "pipe-fds/session")
			b.ReportMetric(0, "ns/op") // the time to open them says nothing here
		})
	}
}
