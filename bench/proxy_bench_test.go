package bench

// The PROXY protocol on a conn's handshake (handshake/proxy.go and
// handlers.go), through the package's own entry points:
//
//   - BenchmarkProxyParse: HeaderLen then ParseHeader (and TLVs, for v2, as
//     the accept-proxy handler does) on a header in memory: the parser alone.
//   - BenchmarkProxyAccept: the accept-proxy handler as the engine runs it on
//     a new conn (handshake.Get, Policy.Begin, Policy.RunIn, handshake.Put)
//     on the server end of a real loopback connection: trusted-list check,
//     MSG_PEEK, parse, recv of exactly the header's bytes, addresses applied.
//   - BenchmarkProxySend: the send-proxy handler (Policy.RunOut): the
//     outgoing header formatted and written to a real loopback connection.
//
//	go test -run '^$' -bench 'Proxy' -benchmem ./bench/
//
// The goal for the hot path is 0 allocs/op; see bench/RESULTS.md for what
// these report and where the allocations come from.

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/handshake"
	"github.com/sluice-proxy/sluice/internal/testpeer"
	"github.com/sluice-proxy/sluice/rules"
)

// proxyCase is one header: version, addresses and (v2) TLVs.
type proxyCase struct {
	name     string
	version  uint8
	src, dst netip.AddrPort
	tlvs     []proxyproto.TLV
}

// proxyTLVs are the TLVs a balancer typically sends, all of the kind a conn
// keeps (and send-proxy=v2 passes on).
var proxyTLVs = []proxyproto.TLV{
	{Type: proxyproto.PP2_TYPE_ALPN, Value: []byte("h2")},
	{Type: proxyproto.PP2_TYPE_AUTHORITY, Value: []byte("example.com")},
	{Type: proxyproto.PP2_TYPE_UNIQUE_ID, Value: []byte("0123456789abcdef")},
}

var (
	proxySrc4, proxyDst4 = netip.MustParseAddrPort("192.0.2.9:41234"), netip.MustParseAddrPort("198.51.100.2:443")
	proxySrc6, proxyDst6 = netip.MustParseAddrPort("[2001:db8::9]:41234"), netip.MustParseAddrPort("[2001:db8::2]:443")
)

var proxyCases = []proxyCase{
	{"v1-tcp4", 1, proxySrc4, proxyDst4, nil},
	{"v1-tcp6", 1, proxySrc6, proxyDst6, nil},
	{"v2-tcp4", 2, proxySrc4, proxyDst4, nil},
	{"v2-tcp4-tlvs", 2, proxySrc4, proxyDst4, proxyTLVs},
}

// header formats pc's header with go-proxyproto (a balancer's side; the
// package's own formatter is unexported) and checks HeaderLen agrees.
func (pc proxyCase) header(tb testing.TB) []byte {
	tb.Helper()
	h := proxyproto.HeaderProxyFromAddrs(pc.version, net.TCPAddrFromAddrPort(pc.src), net.TCPAddrFromAddrPort(pc.dst))
	if len(pc.tlvs) > 0 {
		if err := h.SetTLVs(pc.tlvs); err != nil {
			tb.Fatal(err)
		}
	}
	b, err := h.Format()
	if err != nil {
		tb.Fatal(err)
	}
	if n, err := handshake.HeaderLen(b); n != len(b) || err != nil {
		tb.Fatalf("%s: HeaderLen %d, %v; want %d", pc.name, n, err, len(b))
	}
	return b
}

func BenchmarkProxyParse(b *testing.B) {
	for _, pc := range proxyCases {
		b.Run(pc.name, func(b *testing.B) {
			hdr := pc.header(b)
			b.SetBytes(int64(len(hdr)))
			b.ReportAllocs()
			for b.Loop() {
				n, err := handshake.HeaderLen(hdr)
				if err != nil || n != len(hdr) {
					b.Fatalf("HeaderLen %d, %v", n, err)
				}
				h, err := handshake.ParseHeader(hdr[:n])
				if err != nil {
					b.Fatal(err)
				}
				if h.Version == 2 {
					if _, err := h.TLVs(); err != nil {
						b.Fatal(err)
					}
				}
			}
		})
	}
}

// proxyBatch is how many headers one write sends: the handler consumes
// exactly one header per run, so a batch feeds that many runs and the
// client's write costs 1/proxyBatch of a syscall per op. 64 of the longest
// case (66 bytes) stay far below the socket buffers.
const proxyBatch = 64

func BenchmarkProxyAccept(b *testing.B) {
	for _, pc := range proxyCases {
		b.Run(pc.name, func(b *testing.B) {
			hdr := pc.header(b)
			batch := bytes.Repeat(hdr, proxyBatch)
			r, err := rules.Parse("tcp 127.0.0.1:80 -> 127.0.0.1:81 accept-proxy=127.0.0.0/8")
			if err != nil {
				b.Fatal(err)
			}
			pol := handshake.NewPolicy(r, 0)
			client, srv := testpeer.TCPPair(b)
			// Each batch is its own segment at once: no Nagle wait.
			unix.SetsockoptInt(client, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
			if err := unix.SetNonblock(srv, true); err != nil {
				b.Fatal(err)
			}
			// The conn borrows srv: TCPPair closes it at the end, so in is
			// never closed here.
			var in conn.Conn
			in.Init(srv, nil, true)
			realSrc, realDst := netip.MustParseAddrPort("127.0.0.1:50000"), netip.MustParseAddrPort("127.0.0.1:80")
			fds := []unix.PollFd{{Fd: int32(srv), Events: unix.POLLIN}}
			i := 0
			b.SetBytes(int64(len(hdr)))
			b.ReportAllocs()
			for b.Loop() {
				if i%proxyBatch == 0 {
					writeAll(b, client, batch)
				}
				i++
				in.Src, in.Dst = realSrc, realDst // as accepted: the header rewrites them
				st := handshake.Get(&in, nil)
				pol.Begin(st)
				res, code := pol.RunIn(st)
				// Loopback usually delivers within the write; if not, wait.
				var deadline time.Time
				for ; res == handshake.WantRead; res, code = pol.RunIn(st) {
					if deadline.IsZero() {
						deadline = time.Now().Add(5 * time.Second)
					} else if time.Now().After(deadline) {
						b.Fatal("header not delivered in 5s")
					}
					unix.Poll(fds, 100)
				}
				if res != handshake.Done || st.Version != pc.version {
					b.Fatalf("run %d: %v %v, version %d", i, res, code, st.Version)
				}
				handshake.Put(st)
			}
			b.StopTimer()
			if in.Src != pc.src || in.Dst != pc.dst {
				b.Fatalf("addresses %v -> %v, want %v -> %v", in.Src, in.Dst, pc.src, pc.dst)
			}
			// Whatever was written and not parsed (the rest of the last
			// batch) must still be exactly whole headers.
			if left := drain(b, srv); left != (proxyBatch-i%proxyBatch)%proxyBatch*len(hdr) {
				b.Fatalf("%d bytes left unparsed after %d runs", left, i)
			}
		})
	}
}

func BenchmarkProxySend(b *testing.B) {
	for _, pc := range proxyCases {
		b.Run(pc.name, func(b *testing.B) {
			r, err := rules.Parse(fmt.Sprintf("tcp 127.0.0.1:80 -> 127.0.0.1:81 send-proxy=v%d", pc.version))
			if err != nil {
				b.Fatal(err)
			}
			pol := handshake.NewPolicy(r, 0)
			cli, peer := testpeer.TCPPair(b)
			unix.SetsockoptInt(cli, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
			unix.SetNonblock(cli, true)
			unix.SetNonblock(peer, true)
			var in, out conn.Conn
			in.Src, in.Dst = pc.src, pc.dst
			out.Init(cli, nil, true) // borrowed, as in BenchmarkProxyAccept
			size := len(pc.header(b))
			sent := 0
			b.SetBytes(int64(size))
			b.ReportAllocs()
			for b.Loop() {
				st := handshake.Get(&in, &out)
				st.TLVs = pc.tlvs // what accept-proxy kept from the client's header
				res, code := pol.RunOut(st)
				for res == handshake.WantWrite { // the peer is drained in batches
					sent -= drain(b, peer)
					res, code = pol.RunOut(st)
				}
				if res != handshake.Done {
					b.Fatalf("%v %v", res, code)
				}
				handshake.Put(st)
				if sent += size; sent >= proxyBatch*size {
					sent -= drain(b, peer)
				}
			}
			b.StopTimer()
			for deadline := time.Now().Add(time.Second); sent > 0 && time.Now().Before(deadline); {
				sent -= drain(b, peer)
				unix.Poll([]unix.PollFd{{Fd: int32(peer), Events: unix.POLLIN}}, 10)
			}
			if sent != 0 {
				b.Fatalf("%d bytes sent unaccounted for: headers of another size", sent)
			}
		})
	}
}

// writeAll writes p to the blocking fd.
func writeAll(tb testing.TB, fd int, p []byte) {
	for len(p) > 0 {
		n, err := unix.Write(fd, p)
		if err != nil {
			tb.Fatal(err)
		}
		p = p[n:]
	}
}

// drainBuf is drain's buffer: a package variable so that draining adds no
// allocation to the benchmarks.
var drainBuf [64 << 10]byte

// drain reads what the non-blocking fd holds and returns its size.
func drain(tb testing.TB, fd int) int {
	total := 0
	for {
		n, err := unix.Read(fd, drainBuf[:])
		switch {
		case err == unix.EINTR:
		case err == unix.EAGAIN:
			return total
		case err != nil:
			tb.Fatal(err)
		case n == 0:
			return total
		default:
			total += n
		}
	}
}
