package handshake

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"testing"

	"github.com/pires/go-proxyproto"
)

func v1(src, dst string) []byte {
	s, d := netip.MustParseAddrPort(src), netip.MustParseAddrPort(dst)
	b, err := formatHeader(1, s, d, nil)
	if err != nil {
		panic(err)
	}
	return b
}

func v2(src, dst string, tlvs ...proxyproto.TLV) []byte {
	s, d := netip.MustParseAddrPort(src), netip.MustParseAddrPort(dst)
	b, err := formatHeader(2, s, d, tlvs)
	if err != nil {
		panic(err)
	}
	return b
}

func TestHeaderLen(t *testing.T) {
	h1 := v1("192.0.2.1:1234", "198.51.100.2:80")
	h2 := v2("[2001:db8::1]:1234", "[2001:db8::2]:443")
	big := v2("192.0.2.1:1", "192.0.2.2:2", proxyproto.TLV{Type: 0xE0, Value: bytes.Repeat([]byte{'x'}, maxV2Len-12-3)})
	over := append([]byte(nil), h2[:16]...)
	binary.BigEndian.PutUint16(over[14:], maxV2Len+1)
	for _, c := range []struct {
		name string
		b    []byte
		n    int
		err  error
	}{
		{"empty", nil, 0, nil},
		{"v1 complete", h1, len(h1), nil},
		{"v1 with payload", append(append([]byte(nil), h1...), "GET /"...), len(h1), nil},
		{"v1 prefix P", []byte("P"), 0, nil},
		{"v1 no CRLF yet", h1[:len(h1)-2], 0, nil},
		{"v1 107 bytes without LF", append([]byte("PROXY "), bytes.Repeat([]byte{'1'}, 101)...), 0, ErrTooLong},
		{"v1 bad signature", []byte("PROXZ TCP4"), 0, ErrNoHeader},
		{"v2 complete", h2, len(h2), nil},
		{"v2 prefix", h2[:5], 0, nil},
		{"v2 length known", h2[:16], len(h2), nil},
		{"v2 largest allowed", big, maxHeaderLen, nil},
		{"v2 oversized", over, 0, ErrTooLong},
		{"v2 bad signature", []byte("\r\n\r\n\x00\r\nQUIX\n"), 0, ErrNoHeader},
		{"http", []byte("GET / HTTP/1.0\r\n"), 0, ErrNoHeader},
		{"tls", []byte{0x16, 0x03, 0x01}, 0, ErrNoHeader},
	} {
		n, err := HeaderLen(c.b)
		if n != c.n || !errors.Is(err, c.err) {
			t.Errorf("%s: HeaderLen = %d, %v; want %d, %v", c.name, n, err, c.n, c.err)
		}
	}
}

// Every prefix of a valid header is "need more", never an error and never a
// wrong length: the split-segment bug is a prefix taken for a whole.
func TestHeaderLenEveryPrefix(t *testing.T) {
	for _, h := range [][]byte{
		v1("192.0.2.1:1234", "198.51.100.2:80"),
		v1("[2001:db8::1]:1", "[2001:db8::2]:2"),
		v2("192.0.2.1:1234", "198.51.100.2:80", proxyproto.TLV{Type: proxyproto.PP2_TYPE_AUTHORITY, Value: []byte("example.com")}),
	} {
		for i := 0; i < len(h); i++ {
			n, err := HeaderLen(h[:i])
			if err != nil || (n != 0 && n != len(h)) {
				t.Fatalf("prefix %d of %q: %d, %v", i, h, n, err)
			}
			if n != 0 && i >= n {
				t.Fatalf("prefix %d of %q said complete", i, h)
			}
		}
	}
}

func TestParseHeader(t *testing.T) {
	tlv := proxyproto.TLV{Type: proxyproto.PP2_TYPE_UNIQUE_ID, Value: []byte("abc")}
	for _, c := range []struct {
		b        []byte
		src, dst string
	}{
		{v1("192.0.2.1:1234", "198.51.100.2:80"), "192.0.2.1:1234", "198.51.100.2:80"},
		{v1("[2001:db8::1]:1", "[2001:db8::2]:2"), "[2001:db8::1]:1", "[2001:db8::2]:2"},
		{v2("192.0.2.1:1234", "198.51.100.2:80", tlv), "192.0.2.1:1234", "198.51.100.2:80"},
		{v2("[2001:db8::1]:1", "[2001:db8::2]:2"), "[2001:db8::1]:1", "[2001:db8::2]:2"},
	} {
		h, err := ParseHeader(c.b)
		if err != nil {
			t.Fatalf("%q: %v", c.b, err)
		}
		src, dst, ok := headerAddrs(h)
		if !ok || src.String() != c.src || dst.String() != c.dst {
			t.Errorf("%q: %v %v %v", c.b, src, dst, ok)
		}
	}
	local := []byte("PROXY UNKNOWN\r\n")
	h, err := ParseHeader(local)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, ok := headerAddrs(h); ok {
		t.Error("UNKNOWN gave addresses")
	}
	for _, bad := range [][]byte{
		[]byte("PROXY TCP4 1.2.3.4\r\n"),
		[]byte("PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n"),
		[]byte("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"),
		[]byte("PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n"),
		append(v1("192.0.2.1:1", "192.0.2.2:2"), 'x'),
	} {
		if _, err := ParseHeader(bad); !errors.Is(err, ErrBad) {
			t.Errorf("%q: %v, want ErrBad", bad, err)
		}
	}
}

// The header sent onwards carries the client's addresses and the kept TLVs.
func TestFormatHeaderRoundTrip(t *testing.T) {
	tlvs := []proxyproto.TLV{{Type: proxyproto.PP2_TYPE_ALPN, Value: []byte("h2")}, {Type: proxyproto.PP2_TYPE_AUTHORITY, Value: []byte("example.com")}}
	b := v2("127.0.0.7:4242", "127.0.0.1:80", tlvs...)
	h, err := ParseHeader(b)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := h.TLVs()
	if len(got) != 2 || string(got[1].Value) != "example.com" {
		t.Errorf("TLVs %v", got)
	}
	sa, _, _ := h.TCPAddrs()
	if !sa.IP.Equal(net.IPv4(127, 0, 0, 7)) || sa.Port != 4242 {
		t.Errorf("source %v", sa)
	}
	// Mixed families cannot be a v1 TCP4 line: the LOCAL fallback still formats.
	if _, err := formatHeader(1, netip.MustParseAddrPort("192.0.2.1:1"), netip.MustParseAddrPort("[2001:db8::1]:2"), nil); err != nil {
		t.Errorf("mixed families: %v", err)
	}
}

// FuzzHeader drives the completeness check and the parser with arbitrary
// bytes, fed in two segments as a network would: no panic, the length never
// shrinks or changes as bytes arrive, a prefix is never taken for a whole,
// and a header the library accepts yields usable addresses.
func FuzzHeader(f *testing.F) {
	f.Add(v1("192.0.2.1:1234", "198.51.100.2:80"), 10)
	f.Add(v2("[2001:db8::1]:1", "[2001:db8::2]:2", proxyproto.TLV{Type: 1, Value: []byte("h2")}), 20)
	f.Add([]byte("PROXY UNKNOWN\r\n"), 3)
	f.Add([]byte("\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"), 12)
	f.Add([]byte("\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c\x01\x02\x03\x04\x05\x06\x07\x08\x00\x01\x00\x02"), 15)
	f.Add([]byte("GET / HTTP/1.1\r\n"), 1)
	f.Fuzz(func(t *testing.T, b []byte, cut int) {
		if cut < 0 || cut > len(b) {
			cut = len(b) / 2
		}
		n1, err1 := HeaderLen(b[:cut])
		n2, err2 := HeaderLen(b)
		if n1 < 0 || n2 < 0 || n2 > maxHeaderLen {
			t.Fatalf("lengths %d %d", n1, n2)
		}
		if err1 != nil && (err2 == nil || !errors.Is(err2, err1)) && !(errors.Is(err1, ErrNoHeader) && errors.Is(err2, ErrNoHeader)) {
			t.Fatalf("error %v on %d bytes but %v on %d", err1, cut, err2, len(b))
		}
		if n1 > 0 && n2 != n1 {
			t.Fatalf("length %d on %d bytes but %d on %d", n1, cut, n2, len(b))
		}
		if err2 != nil || n2 == 0 || n2 > len(b) {
			return
		}
		h, err := ParseHeader(b[:n2])
		if err != nil {
			if !errors.Is(err, ErrBad) {
				t.Fatalf("error %v does not wrap ErrBad", err)
			}
			return
		}
		if src, dst, ok := headerAddrs(h); ok && (!src.IsValid() || !dst.IsValid()) {
			t.Fatalf("invalid addresses %v %v from %q", src, dst, b[:n2])
		}
		if h.Version == 2 {
			_, _ = h.TLVs()
		}
	})
}

// FuzzRoundTrip formats a header for arbitrary addresses and checks that the
// completeness check and the parser give them back.
func FuzzRoundTrip(f *testing.F) {
	f.Add([]byte{127, 0, 0, 7}, uint16(4242), []byte{127, 0, 0, 1}, uint16(80), true, []byte("h2"))
	f.Add(bytes.Repeat([]byte{0x20}, 16), uint16(1), bytes.Repeat([]byte{0x21}, 16), uint16(2), false, []byte(nil))
	f.Fuzz(func(t *testing.T, sip []byte, sport uint16, dip []byte, dport uint16, two bool, alpn []byte) {
		sa, ok1 := netip.AddrFromSlice(sip)
		da, ok2 := netip.AddrFromSlice(dip)
		if !ok1 || !ok2 || sa.Is4() != da.Is4() || len(alpn) > 1000 {
			return
		}
		sa, da = sa.Unmap(), da.Unmap()
		if sa.Is4() != da.Is4() {
			return
		}
		src, dst := netip.AddrPortFrom(sa, sport), netip.AddrPortFrom(da, dport)
		v := uint8(1)
		var tlvs []proxyproto.TLV
		if two {
			v = 2
			if len(alpn) > 0 {
				tlvs = []proxyproto.TLV{{Type: proxyproto.PP2_TYPE_ALPN, Value: alpn}}
			}
		}
		b, err := formatHeader(v, src, dst, tlvs)
		if err != nil {
			t.Fatal(err)
		}
		n, err := HeaderLen(b)
		if err != nil || n != len(b) {
			t.Fatalf("HeaderLen(%q) = %d, %v", b, n, err)
		}
		h, err := ParseHeader(b)
		if err != nil {
			t.Fatalf("ParseHeader(%q): %v", b, err)
		}
		gs, gd, ok := headerAddrs(h)
		if !ok || gs != src || gd != dst {
			t.Fatalf("round trip %v %v -> %v %v (%v)", src, dst, gs, gd, ok)
		}
	})
}

func TestSignature(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Sig
	}{
		{"", SigNone}, {"P", SigMaybe}, {"PROX", SigMaybe}, {"PROXY", SigProxy}, {"PROXY TCP4 ", SigProxy},
		{"PROXZ", SigNone}, {"GET / HTTP/1.1", SigNone}, {"hello PROXY", SigNone},
		{"\r\n", SigMaybe}, {"\r\n\r\n\x00\r\nQUIT", SigMaybe}, {"\r\n\r\n\x00\r\nQUIT\n", SigProxy},
		{"\r\n\r\n\x00\r\nQUIT\n\x21", SigProxy}, {"\r\nX", SigNone},
	} {
		if got := Signature([]byte(tc.in)); got != tc.want {
			t.Errorf("Signature(%q) = %d, want %d", tc.in, got, tc.want)
		}
	}
}
