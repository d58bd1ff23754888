package handshake

import (
	"bytes"
	"io"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/internal/testpeer"
	"github.com/sluice-proxy/sluice/rules"
)

// pair is a handshake under test: the policy of a rule, the server side of a
// loopback TCP connection as an accepted conn (non-blocking), and the client
// side as a blocking fd the test writes to.
type pair struct {
	t      *testing.T
	p      *Policy
	in     conn.Conn
	st     *State
	client int
}

func newPair(t *testing.T, line string, src string) *pair {
	t.Helper()
	r, err := rules.Parse(line)
	if err != nil {
		t.Fatal(err)
	}
	a, b := testpeer.TCPPair(t)
	unix.SetsockoptInt(a, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1) // each send is its own segment, now
	if err := unix.SetNonblock(b, true); err != nil {
		t.Fatal(err)
	}
	// TCPPair closes both fds at the end; the conn must not close b again.
	dup, err := unix.Dup(b)
	if err != nil {
		t.Fatal(err)
	}
	pr := &pair{t: t, p: NewPolicy(r, 64), client: a}
	pr.in.Init(dup, nil, true)
	pr.in.Src = netip.MustParseAddrPort(src)
	pr.in.Dst = netip.MustParseAddrPort("127.0.0.1:80")
	pr.st = Get(&pr.in, nil)
	pr.p.Begin(pr.st)
	t.Cleanup(func() { pr.in.Close(false); Put(pr.st) })
	return pr
}

func (pr *pair) send(b []byte) {
	pr.t.Helper()
	if _, err := unix.Write(pr.client, b); err != nil {
		pr.t.Fatal(err)
	}
	testpeer.Delivered(pr.t, pr.client)
}

func (pr *pair) run() (Result, conn.Code) {
	pr.st.Now = time.Now().UnixNano()
	return pr.p.RunIn(pr.st)
}

// rest reads what the client sent after the header: it must still be in the
// kernel, untouched.
func (pr *pair) rest(n int) string {
	pr.t.Helper()
	buf := make([]byte, n)
	got, err := unix.Read(pr.in.FD(), buf)
	if err != nil {
		pr.t.Fatalf("reading the payload after the header: %v", err)
	}
	return string(buf[:got])
}

func expect(t *testing.T, what string, r Result, code conn.Code, wr Result, wcode conn.Code) {
	t.Helper()
	if r != wr || code != wcode {
		t.Fatalf("%s: %v %v, want %v %v", what, r, code, wr, wcode)
	}
}

func TestAcceptProxyV1ByteByByte(t *testing.T) {
	pr := newPair(t, "tcp 127.0.0.1:80 -> 127.0.0.1:81 accept-proxy", "127.0.0.1:5000")
	h := v1("192.0.2.9:1234", "198.51.100.2:443")
	for i := 0; i < len(h)-1; i++ {
		pr.send(h[i : i+1])
		r, code := pr.run()
		expect(t, "partial header", r, code, WantRead, conn.CodeNone)
	}
	pr.send(append(h[len(h)-1:], "payload"...))
	r, code := pr.run()
	expect(t, "complete header", r, code, Done, conn.CodeNone)
	if pr.in.Src.String() != "192.0.2.9:1234" || pr.in.Dst.String() != "198.51.100.2:443" {
		t.Errorf("addresses %v -> %v", pr.in.Src, pr.in.Dst)
	}
	if !pr.st.Has(Proxied) || pr.in.Op(conn.OpAcceptProxy) != conn.StepDone {
		t.Errorf("flags %v, step %v", pr.st.Flags(), pr.in.Op(conn.OpAcceptProxy))
	}
	if got := pr.rest(100); got != "payload" {
		t.Errorf("payload after the header: %q", got)
	}
	if s := pr.p.Stats(); s.ProxyV1 != 1 || s.Passed != 1 {
		t.Errorf("stats %+v", s)
	}
}

// A v2 header longer than the inline peek buffer, with TLVs, split in two.
func TestAcceptProxyV2LongWithTLVs(t *testing.T) {
	pr := newPair(t, "tcp 127.0.0.1:80 -> 127.0.0.1:81 accept-proxy=127.0.0.0/8", "127.0.0.1:5000")
	h := v2("[2001:db8::7]:4321", "[2001:db8::1]:443",
		proxyproto.TLV{Type: proxyproto.PP2_TYPE_ALPN, Value: []byte("h2")},
		proxyproto.TLV{Type: proxyproto.PP2_TYPE_AUTHORITY, Value: []byte("example.com")},
		proxyproto.TLV{Type: proxyproto.PP2_TYPE_UNIQUE_ID, Value: bytes.Repeat([]byte{'u'}, 100)},
		proxyproto.TLV{Type: 0xE1, Value: bytes.Repeat([]byte{'z'}, 1000)}, // not kept
	)
	if len(h) <= peekSize {
		t.Fatalf("header of %d bytes does not exercise the long path", len(h))
	}
	pr.send(h[:300])
	r, code := pr.run()
	expect(t, "first part", r, code, WantRead, conn.CodeNone)
	pr.send(append(h[300:], "xyz"...))
	r, code = pr.run()
	expect(t, "whole", r, code, Done, conn.CodeNone)
	if pr.in.Src.String() != "[2001:db8::7]:4321" {
		t.Errorf("source %v", pr.in.Src)
	}
	if len(pr.st.TLVs) != 3 || string(pr.st.TLVs[1].Value) != "example.com" {
		t.Errorf("kept TLVs %v", pr.st.TLVs)
	}
	if got := pr.rest(10); got != "xyz" {
		t.Errorf("payload %q", got)
	}
}

func TestAcceptProxyLocalKeepsAddresses(t *testing.T) {
	pr := newPair(t, "tcp 127.0.0.1:80 -> 127.0.0.1:81 accept-proxy", "127.0.0.1:5000")
	local, _ := (&proxyproto.Header{Version: 2, Command: proxyproto.LOCAL, TransportProtocol: proxyproto.UNSPEC}).Format()
	pr.send(local)
	r, code := pr.run()
	expect(t, "LOCAL", r, code, Done, conn.CodeNone)
	if pr.in.Src.String() != "127.0.0.1:5000" || !pr.st.Has(Local) {
		t.Errorf("src %v flags %v", pr.in.Src, pr.st.Flags())
	}
	if s := pr.p.Stats(); s.ProxyLocal != 1 || s.ProxyV2 != 1 {
		t.Errorf("stats %+v", s)
	}
}

// A source outside the trusted list is a plain client: a header-looking
// payload is not parsed, not consumed, and the real address counts.
func TestAcceptProxyUntrustedIsPayload(t *testing.T) {
	pr := newPair(t, "tcp 127.0.0.1:80 -> 127.0.0.1:81 accept-proxy=10.0.0.0/8", "127.0.0.1:5000")
	h := v1("192.0.2.9:1234", "198.51.100.2:443")
	pr.send(h)
	r, code := pr.run()
	expect(t, "untrusted", r, code, Done, conn.CodeNone)
	if pr.in.Src.String() != "127.0.0.1:5000" || !pr.st.Has(Untrusted) {
		t.Errorf("src %v flags %v", pr.in.Src, pr.st.Flags())
	}
	if got := pr.rest(200); got != string(h) {
		t.Errorf("payload %q", got)
	}
}

func TestAcceptProxyRefusals(t *testing.T) {
	over := v2("192.0.2.1:1", "192.0.2.2:2")
	over[14], over[15] = 0x20, 0x00 // length 8192
	for _, c := range []struct {
		name  string
		bytes []byte
		fin   bool
		code  conn.Code
	}{
		{"missing", []byte("GET / HTTP/1.0\r\n\r\n"), false, conn.CodeProxyMissing},
		{"bad", []byte("PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"), false, conn.CodeProxyBad},
		{"bad v2 family", []byte("\r\n\r\n\x00\r\nQUIT\n\x21\x13\x00\x00"), false, conn.CodeProxyBad},
		{"oversized v1", append([]byte("PROXY TCP4 "), bytes.Repeat([]byte{'9'}, 120)...), false, conn.CodeProxyOversized},
		{"oversized v2", over[:16], false, conn.CodeProxyOversized},
		{"truncated v1", []byte("PROXY TCP4 1.2.3.4 5.6"), true, conn.CodeProxyTruncated},
		{"truncated v2", v2("192.0.2.1:1", "192.0.2.2:2")[:20], true, conn.CodeProxyTruncated},
		{"closed empty", nil, true, conn.CodeProxyTruncated},
	} {
		t.Run(c.name, func(t *testing.T) {
			pr := newPair(t, "tcp 127.0.0.1:80 -> 127.0.0.1:81 accept-proxy", "127.0.0.1:5000")
			if len(c.bytes) > 0 {
				pr.send(c.bytes)
			}
			if c.fin {
				unix.Shutdown(pr.client, unix.SHUT_WR)
				testpeer.Delivered(t, pr.client)
				pr.st.Set(PeerClosed) // as the loop does on EPOLLRDHUP
			}
			r, code := pr.run()
			expect(t, c.name, r, code, Fail, c.code)
			if got := pr.p.Stats().Refused["accept-proxy"][c.code.String()]; got != 1 {
				t.Errorf("refused counter %d: %+v", got, pr.p.Stats().Refused)
			}
		})
	}
}

func readAll(t *testing.T, fd int) string {
	t.Helper()
	var out []byte
	buf := make([]byte, 512)
	for {
		n, err := unix.Read(fd, buf)
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			return string(out)
		}
		out = append(out, buf[:n]...)
	}
}

func TestHealthReplies(t *testing.T) {
	for _, c := range []struct {
		line    string
		src     string
		failing bool
		want    string
	}{
		{"tcp 127.0.0.1:80 health=http", "127.0.0.1:1", false, "HTTP/1.0 200 OK\r\n"},
		{"tcp 127.0.0.1:80 health=http", "127.0.0.1:1", true, "HTTP/1.0 503 Service Unavailable\r\n"},
		{"tcp 127.0.0.1:80 health=tcp", "127.0.0.1:1", false, "OK\n"},
		{"tcp 127.0.0.1:80 health=tcp", "127.0.0.1:1", true, "DOWN\n"},
		// monitor runs before accept-proxy: no header is expected from a monitor source.
		{"tcp 127.0.0.1:80 -> 127.0.0.1:81 health=http monitor=127.0.0.3/32 accept-proxy", "127.0.0.3:1", false, "HTTP/1.0 200 OK\r\n"},
	} {
		pr := newPair(t, c.line, c.src)
		if c.failing {
			pr.st.Set(Failing)
		}
		pr.send([]byte("GET / HTTP/1.0\r\n\r\n"))
		r, code := pr.run()
		expect(t, c.line+" reply", r, code, WantRead, conn.CodeNone)
		got := readAll(t, pr.client) // the reply, then our FIN
		if !strings.HasPrefix(got, c.want) {
			t.Errorf("%s: reply %q, want %q...", c.line, got, c.want)
		}
		unix.Shutdown(pr.client, unix.SHUT_WR)
		testpeer.Delivered(t, pr.client)
		r, code = pr.run()
		expect(t, c.line+" after the client's close", r, code, Close, conn.CodeHealth)
		s := pr.p.Stats()
		if c.failing && s.HealthDown != 1 || !c.failing && s.HealthUp != 1 {
			t.Errorf("%s: stats %+v", c.line, s)
		}
	}
}

// A conn from outside the monitor networks goes on through the chain.
func TestMonitorOtherSourcesPass(t *testing.T) {
	pr := newPair(t, "tcp 127.0.0.1:80 -> 127.0.0.1:81 health=http monitor=127.0.0.3/32", "127.0.0.2:1")
	r, code := pr.run()
	expect(t, "not a monitor source", r, code, Done, conn.CodeNone)
	if pr.st.Has(Health) || pr.p.Stats().MonitorHits != 0 {
		t.Error("a non-monitor source became a health reply")
	}
}

func TestConnRules(t *testing.T) {
	run := func(line, src string) (Result, conn.Code, *pair) {
		pr := newPair(t, line, src)
		r, code := pr.run()
		return r, code, pr
	}
	r, code, _ := run("tcp 127.0.0.1:80 -> 127.0.0.1:81 allow=10.0.0.0/8", "127.0.0.1:1")
	expect(t, "outside allow", r, code, Fail, conn.CodeDenied)
	r, code, _ = run("tcp 127.0.0.1:80 -> 127.0.0.1:81 allow=127.0.0.0/8", "127.0.0.1:1")
	expect(t, "inside allow", r, code, Done, conn.CodeNone)
	r, code, _ = run("tcp 127.0.0.1:80 -> 127.0.0.1:81 allow=127.0.0.0/8 deny=127.0.0.1/32", "127.0.0.1:1")
	expect(t, "deny wins", r, code, Fail, conn.CodeDenied)
	// Rules judge the address a PROXY header carried, not the balancer's.
	pr := newPair(t, "tcp 127.0.0.1:80 -> 127.0.0.1:81 accept-proxy deny=192.0.2.0/24", "127.0.0.1:1")
	pr.send(v1("192.0.2.9:1234", "198.51.100.2:443"))
	r, code = pr.run()
	expect(t, "denied by the header's source", r, code, Fail, conn.CodeDenied)
	if pr.p.Stats().Refused["rules"]["denied"] != 1 {
		t.Errorf("stats %+v", pr.p.Stats())
	}
}

func TestMaxConnSlots(t *testing.T) {
	r, _ := rules.Parse("tcp 127.0.0.1:80 -> 127.0.0.1:81 maxconn=2")
	p := NewPolicy(r, 0)
	var c conn.Conn
	c.Src = netip.MustParseAddrPort("127.0.0.1:1")
	var held []*State
	for i := 0; i < 3; i++ {
		st := Get(&c, nil)
		p.Begin(st)
		res, code := p.RunIn(st)
		if i < 2 {
			expect(t, "within maxconn", res, code, Done, conn.CodeNone)
			if !st.Has(MaxConn) {
				t.Fatal("slot not marked")
			}
			held = append(held, st)
		} else {
			expect(t, "over maxconn", res, code, Fail, conn.CodeRateLimited)
		}
	}
	p.ReleaseSlot()
	st := Get(&c, nil)
	p.Begin(st)
	res, code := p.RunIn(st)
	expect(t, "after a release", res, code, Done, conn.CodeNone)
	if s := p.Stats(); s.MaxConnRefused != 1 || s.MaxConnInUse != 2 {
		t.Errorf("stats %+v", s)
	}
}

func TestRatePerSource(t *testing.T) {
	r, _ := rules.Parse("tcp 127.0.0.1:80 -> 127.0.0.1:81 rate=3/s")
	p := NewPolicy(r, 0)
	try := func(src string, now int64) Result {
		var c conn.Conn
		c.Src = netip.MustParseAddrPort(src)
		st := Get(&c, nil)
		defer Put(st)
		p.Begin(st)
		st.Now = now
		res, _ := p.RunIn(st)
		return res
	}
	base := int64(10e9)
	for i := 0; i < 3; i++ {
		if try("192.0.2.1:1", base+int64(i)) != Done {
			t.Fatalf("conn %d refused", i)
		}
	}
	if try("192.0.2.1:1", base+10) != Fail {
		t.Error("4th conn in a second allowed")
	}
	if try("192.0.2.2:1", base+10) != Done {
		t.Error("another source refused")
	}
	if try("192.0.2.1:1", base+3e9) != Done {
		t.Error("still refused seconds later")
	}
	if s := p.Stats(); s.RateRefused != 1 || s.RateSources != 2 {
		t.Errorf("stats %+v", s)
	}
}

func TestSendProxy(t *testing.T) {
	for _, v := range []string{"v1", "v2"} {
		r, _ := rules.Parse("tcp 127.0.0.1:80 -> 127.0.0.1:81 send-proxy=" + v)
		p := NewPolicy(r, 0)
		a, b := testpeer.TCPPair(t)
		var in, out conn.Conn
		in.Src, in.Dst = netip.MustParseAddrPort("127.0.0.7:4242"), netip.MustParseAddrPort("127.0.0.1:80")
		dup, _ := unix.Dup(a)
		unix.SetNonblock(dup, true)
		out.Init(dup, nil, true)
		st := Get(&in, &out)
		st.TLVs = []proxyproto.TLV{{Type: proxyproto.PP2_TYPE_AUTHORITY, Value: []byte("example.com")}}
		res, code := p.RunOut(st)
		expect(t, v, res, code, Done, conn.CodeNone)
		unix.Shutdown(dup, unix.SHUT_WR) // the test still holds a (TCPPair's) fd of this socket
		out.Close(false)
		Put(st)
		got, _ := io.ReadAll(io.LimitReader(fdReader(b), 4096))
		n, err := HeaderLen(got)
		if err != nil || n != len(got) {
			t.Fatalf("%s: sent %q: %d %v", v, got, n, err)
		}
		h, err := ParseHeader(got)
		if err != nil {
			t.Fatal(err)
		}
		src, dst, ok := headerAddrs(h)
		if !ok || src != in.Src || dst != in.Dst {
			t.Errorf("%s: %v %v", v, src, dst)
		}
		if v == "v2" {
			if tl, _ := h.TLVs(); len(tl) != 1 || string(tl[0].Value) != "example.com" {
				t.Errorf("TLVs not passed on: %v", tl)
			}
		}
	}
}

type fdReader int

func (f fdReader) Read(b []byte) (int, error) {
	n, err := unix.Read(int(f), b)
	if err != nil {
		return 0, err
	}
	if n == 0 {
		return 0, io.EOF
	}
	return n, nil
}

func TestTimeoutAttribution(t *testing.T) {
	pr := newPair(t, "tcp 127.0.0.1:80 -> 127.0.0.1:81 accept-proxy timeout.handshake=1s", "127.0.0.1:5000")
	if pr.p.Timeout() != time.Second {
		t.Errorf("timeout %v", pr.p.Timeout())
	}
	pr.send([]byte("PROX"))
	r, code := pr.run()
	expect(t, "slow", r, code, WantRead, conn.CodeNone)
	if c := pr.p.Expired(pr.st); c != conn.CodeHandshakeTimeout {
		t.Errorf("expired code %v", c)
	}
	if pr.p.Stats().Refused["accept-proxy"]["handshake-timeout"] != 1 {
		t.Errorf("stats %+v", pr.p.Stats().Refused)
	}
	r2, _ := rules.Parse("tcp 127.0.0.1:80 -> 127.0.0.1:81")
	if NewPolicy(r2, 0).Timeout() != DefaultTimeout {
		t.Error("default timeout")
	}
}

func TestEveryNameIsThere(t *testing.T) {
	for bit := Flags(1); bit != 0 && bit <= allFlags; bit <<= 1 {
		if allFlags&bit != 0 && strings.HasPrefix(bit.String(), "0x") {
			t.Errorf("flag %#x has no name", uint16(bit))
		}
	}
	if got := (Health | Replied | 0x8000).String(); got != "HEALTH|REPLIED|0x8000" {
		t.Errorf("String = %q", got)
	}
	for k := Kind(0); k < kindCount; k++ {
		if strings.HasPrefix(k.String(), "kind-") {
			t.Errorf("kind %d has no name", k)
		}
	}
	for r := Done; r <= Close; r++ {
		if r.String() == "invalid" {
			t.Errorf("result %d has no name", r)
		}
	}
}

// The sni stage marks the conn Drained when the read that completed the
// hello was short (the socket held nothing more: the session need not read
// it before its next event), and not when that read filled the buffer.
func TestSNIDrained(t *testing.T) {
	hl, err := testpeer.ClientHello("a.example.com")
	if err != nil {
		t.Fatal(err)
	}
	if len(hl) >= helloTiers[0] {
		t.Fatalf("hello of %d bytes: the test wants one under the first buffer (%d)", len(hl), helloTiers[0])
	}
	for _, tc := range []struct {
		name  string
		extra int // bytes after the hello, in the same write
		want  bool
	}{
		{"hello alone", 0, true},
		{"hello and bytes that fill the buffer", helloTiers[0] - len(hl), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var g []*rules.Rule
			for _, line := range []string{"tcp 127.0.0.1:443 -> 127.0.0.1:1 sni=a.example.com", "tcp 127.0.0.1:443 -> 127.0.0.1:2 sni=b.example.com"} {
				r, err := rules.Parse(line)
				if err != nil {
					t.Fatal(err)
				}
				g = append(g, r)
			}
			pr := newPair(t, "tcp 127.0.0.1:443 -> 127.0.0.1:1", "127.0.0.1:5000")
			pr.p = NewRoutePolicies(g, 64)[0]
			Put(pr.st)
			pr.st = Get(&pr.in, nil)
			pr.p.Begin(pr.st)
			pr.send(append(append([]byte(nil), hl...), make([]byte, tc.extra)...))
			if res, code := pr.run(); res != Done {
				t.Fatalf("run: %v %v", res, code)
			}
			if got := pr.st.Has(Drained); got != tc.want {
				t.Errorf("Drained %v, want %v (flags %v)", got, tc.want, pr.st.Flags())
			}
		})
	}
}
