package bench

// The accept path end to end on loopback: per op a client connects, writes
// one byte, reads its echo and closes, so the figure is connections, not
// bytes (BenchmarkEngineShortSessions is the same shape with 64 bytes, for
// the counters' cost). Sub-benchmarks:
//
//   - direct: straight to the echo backend, no engine: the baseline.
//   - engine: through an engine (one loop, engineTo) with one rule to it.
//   - engine-accept-proxy-v2: the same with accept-proxy, the client sending
//     a PROXY v2 header before its byte.
//   - engine-sni: the same routed by name (one sni= route), the client
//     sending a Go client's ClientHello (post-quantum, ~1.8 KB) before its
//     byte; the backend echoes the hello too, the client waits for it all.
//
//	go test -run '^$' -bench 'Accept' -benchmem ./bench/
//
// allocs/op counts the whole process: the client and the backend (Go's net:
// a dialed conn, an accepted conn and a goroutine per op) and the engine.
// The engine's share is allocs/op of an engine case minus that of direct;
// the engine cases also report it as engine-allocs/op (and engine-B/op),
// against direct conns to the same backend counted just before the timed
// loop. Each case checks that no goroutine and no fd outlives it.

import (
	"io"
	"net"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/testpeer"
	"go.uber.org/goleak"
)

// echoClient makes one conn per call with Go's net, as a Go client would.
// (A client on raw blocking syscalls allocates nothing, but holds its P in
// every wait: on 2 CPUs the engine's loop and the backend then share the
// other P, and the engine case measured 2 200 conn/s instead of 5 400.)
type echoClient struct {
	addr string
	msg  []byte // written at once; its last byte must come back
	echo int    // bytes echoed: msg's last, or all of it (the backend sees it all)
	buf  []byte
}

// newEchoClient's conns write prefix and a byte to addr; with whole, the
// backend receives the prefix too and echoes it with the byte.
func newEchoClient(addr string, prefix []byte, whole bool) *echoClient {
	c := &echoClient{addr: addr, msg: append(append([]byte(nil), prefix...), 'x'), echo: 1}
	if whole {
		c.echo = len(c.msg)
	}
	c.buf = make([]byte, c.echo)
	return c
}

// conn connects, writes msg, waits (5 s at most) for the echo (of its last
// byte, or of all of it), and closes.
func (c *echoClient) conn(tb testing.TB) {
	nc, err := net.Dial("tcp", c.addr)
	if err != nil {
		tb.Fatal(err)
	}
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := nc.Write(c.msg); err != nil {
		tb.Fatal(err)
	}
	if _, err := io.ReadFull(nc, c.buf); err != nil || c.buf[c.echo-1] != c.msg[len(c.msg)-1] {
		tb.Fatalf("echo: %q, %v", c.buf, err)
	}
}

// echoBackend is a loopback backend (serveTCP) that echoes until EOF.
func echoBackend(b *testing.B) string {
	return serveTCP(b, func(c net.Conn) {
		var buf [64]byte
		for {
			n, err := c.Read(buf[:])
			if n > 0 {
				if _, werr := c.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	})
}

// checkCleanup fails b if a goroutine or an fd is left over once every
// cleanup registered after it (the engine's Shutdown, the backend's close)
// has run. Call it before any other setup.
func checkCleanup(b *testing.B) {
	// Go's netpoller opens its own fds on first use and keeps them: have it
	// open before counting.
	if ln, err := net.Listen("tcp", "127.0.0.1:0"); err == nil {
		ln.Close()
	}
	fds := openFDs(b)
	ignore := goleak.IgnoreCurrent()
	b.Cleanup(func() {
		if err := goleak.Find(ignore); err != nil {
			b.Error(err)
		}
		// Conns are closed by goroutines that goleak just saw end; the fd
		// table follows at once, but allow a moment.
		deadline := time.Now().Add(5 * time.Second)
		for n := openFDs(b); n > fds; n = openFDs(b) {
			if time.Now().After(deadline) {
				b.Errorf("%d fds left open", n-fds)
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

func openFDs(tb testing.TB) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		tb.Fatal(err)
	}
	return len(ents)
}

// mallocs returns the process's allocations so far, count and bytes.
func mallocs() (uint64, uint64) {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.Mallocs, ms.TotalAlloc
}

// baselineConns is how many direct conns measure the non-engine share.
const baselineConns = 100

func BenchmarkAccept(b *testing.B) {
	cases := []struct {
		name   string
		engine bool
		opts   string
		proxy  bool // the client sends a PROXY v2 header before its byte
		sni    bool // the client sends a ClientHello before its byte
	}{
		{"direct", false, "", false, false},
		{"engine", true, "", false, false},
		{"engine-accept-proxy-v2", true, "accept-proxy=127.0.0.0/8", true, false},
		{"engine-sni", true, "sni=bench.example.com", false, true},
	}
	for _, tc := range cases {
		b.Run(tc.name, func(b *testing.B) {
			checkCleanup(b)
			backend := echoBackend(b)
			var prefix []byte
			if tc.proxy {
				prefix = proxyCase{"v2-tcp4", 2, proxySrc4, proxyDst4, nil}.header(b)
			}
			if tc.sni {
				hello, err := testpeer.ClientHello("bench.example.com")
				if err != nil {
					b.Fatal(err)
				}
				prefix = hello
			}
			// The non-engine share is measured with the bytes the backend
			// will see: the hello passes through, a PROXY header does not.
			cli := newEchoClient(backend, nil, false)
			if tc.sni {
				cli = newEchoClient(backend, prefix, true)
			}
			var base [2]float64
			if tc.engine {
				// The non-engine share: the same conns, straight to the
				// backend (no prefix: the backend would echo it).
				m0, b0 := mallocs()
				for range baselineConns {
					cli.conn(b)
				}
				m1, b1 := mallocs()
				base = [2]float64{float64(m1-m0) / baselineConns, float64(b1-b0) / baselineConns}
				cli = newEchoClient(engineTo(b, backend, tc.opts), prefix, tc.sni)
			}
			b.ReportAllocs()
			m0, b0 := mallocs()
			for b.Loop() {
				cli.conn(b)
			}
			m1, b1 := mallocs()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "conn/s")
			if tc.engine {
				b.ReportMetric(float64(m1-m0)/float64(b.N)-base[0], "engine-allocs/op")
				b.ReportMetric(float64(b1-b0)/float64(b.N)-base[1], "engine-B/op")
			}
		})
	}
}
