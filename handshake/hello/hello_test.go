package hello

import (
	"bytes"
	"crypto/tls"
	"io"
	"net"
	"testing"
)

// CaptureClientHello returns the first flight of a Go crypto/tls client
// (its default key shares: X25519MLKEM768 and X25519, a post-quantum hello
// of ~1.8 KB) for server name sni offering alpn: the raw TLS record(s).
func captureClientHello(t testing.TB, sni string, alpn ...string) []byte {
	t.Helper()
	c, s := net.Pipe()
	defer s.Close()
	go func() {
		cl := tls.Client(c, &tls.Config{ServerName: sni, NextProtos: alpn, InsecureSkipVerify: true})
		_ = cl.Handshake() // fails once the pipe closes
		c.Close()
	}()
	var hdr [5]byte
	if _, err := io.ReadFull(s, hdr[:]); err != nil {
		t.Fatal(err)
	}
	body := make([]byte, int(hdr[3])<<8|int(hdr[4]))
	if _, err := io.ReadFull(s, body); err != nil {
		t.Fatal(err)
	}
	return append(hdr[:], body...)
}

// reframe cuts the one-record hello raw into records carrying the given
// numbers of message bytes each (the rest in the last).
func reframe(raw []byte, sizes ...int) []byte {
	msg := raw[5:]
	var out []byte
	for i := 0; len(msg) > 0; i++ {
		n := len(msg)
		if i < len(sizes) && sizes[i] < n {
			n = sizes[i]
		}
		out = append(out, 22, raw[1], raw[2], byte(n>>8), byte(n))
		out = append(out, msg[:n]...)
		msg = msg[n:]
	}
	return out
}

func scanAll(t *testing.T, raw []byte, oneByOne bool) (Status, *Scanner) {
	t.Helper()
	var s Scanner
	if !oneByOne {
		return s.Scan(raw), &s
	}
	for i := 1; i <= len(raw); i++ {
		st := s.Scan(raw[:i])
		if st != NeedMore {
			if st == Complete && i != len(raw) {
				t.Fatalf("complete after %d of %d bytes", i, len(raw))
			}
			return st, &s
		}
	}
	return NeedMore, &s
}

func TestGoClientHelloReframed(t *testing.T) {
	raw := captureClientHello(t, "A.Example.com", "h2", "http/1.1")
	if len(raw) < 1400 {
		t.Fatalf("hello is %d bytes: not the post-quantum one this test wants", len(raw))
	}
	t.Logf("Go %d-byte ClientHello", len(raw))
	msg := raw[5:]
	for _, tc := range []struct {
		name  string
		sizes []int
		recs  int
	}{
		{"one record", nil, 1},
		{"two records", []int{1000}, 2},
		{"three records, header split", []int{2, 700}, 3},
	} {
		framed := reframe(raw, tc.sizes...)
		for _, oneByOne := range []bool{false, true} {
			st, s := scanAll(t, framed, oneByOne)
			if st != Complete || s.Records() != tc.recs {
				t.Fatalf("%s (one by one %v): %s after %d records", tc.name, oneByOne, st, s.Records())
			}
			m := s.Message(framed, make([]byte, MaxMessage+4))
			if !bytes.Equal(m, msg) {
				t.Fatalf("%s: message differs from the original", tc.name)
			}
			var h Hello
			if err := Parse(m, &h); err != nil {
				t.Fatalf("%s: %v", tc.name, err)
			}
			if string(h.ServerName) != "A.Example.com" || h.NALPN != 2 || string(h.ALPN[0]) != "h2" || string(h.ALPN[1]) != "http/1.1" {
				t.Fatalf("%s: name %q, alpn %q", tc.name, h.ServerName, h.Protocols())
			}
		}
	}
	// Every truncation of the message is refused, none panics.
	var h Hello
	for i := 0; i < len(msg); i++ {
		if Parse(msg[:i], &h) == nil {
			t.Fatalf("a message cut at %d parsed", i)
		}
	}
	noName := captureClientHello(t, "")
	if st, s := scanAll(t, noName, false); st != Complete || Parse(s.Message(noName, nil), &h) != nil || h.ServerName != nil {
		t.Fatalf("hello without a name: %s, %q", st, h.ServerName)
	}
}

func TestScanRefusals(t *testing.T) {
	raw := captureClientHello(t, "a.example.com")
	bad := func(b []byte, i int, v byte) []byte {
		c := append([]byte(nil), b...)
		c[i] = v
		return c
	}
	two := reframe(raw, 100)
	for _, tc := range []struct {
		name string
		in   []byte
		want Status
	}{
		{"http", []byte("GET / HTTP/1.1\r\n"), NotTLS},
		{"ssh", []byte("SSH-2.0-OpenSSH_9\r\n"), NotTLS},
		{"0x16 then no version 3", []byte{22, 0x47}, NotTLS},
		{"empty", nil, NeedMore},
		{"half a header", raw[:3], NeedMore},
		{"half a hello", raw[:len(raw)/2], NeedMore},
		{"not a client hello", bad(raw, 5, 2), Bad},
		{"empty record", []byte{22, 3, 1, 0, 0}, Bad},
		{"record too long", []byte{22, 3, 1, 0x41, 0x01}, Bad},
		{"alert record in the middle", bad(two, 105, 21), Bad},
		{"oversized message", []byte{22, 3, 1, 0x40, 0, 1, 0, 0x40, 1}, Oversized},
	} {
		if st, _ := scanAll(t, tc.in, false); st != tc.want {
			t.Errorf("%s: %s, want %s", tc.name, st, tc.want)
		}
	}
	// Framing so small that it exceeds MaxRaw: a 1-byte record per byte.
	var tiny []byte
	hs := []byte{1, 0, 0x20, 0} // an 8 KiB message
	for i := 0; i < 8<<10+4; i++ {
		b := byte(0)
		if i < 4 {
			b = hs[i]
		}
		tiny = append(tiny, 22, 3, 1, 0, 1, b)
	}
	var s Scanner
	if st := s.Scan(tiny[:MaxRaw]); st != Oversized {
		t.Errorf("tiny records: %s, want oversized", st)
	}
}

func TestScanNoAlloc(t *testing.T) {
	raw := reframe(captureClientHello(t, "a.example.com", "h2"), 300, 300)
	scratch := make([]byte, MaxMessage+4)
	var h Hello
	if n := testing.AllocsPerRun(50, func() {
		var s Scanner
		for i := 64; i < len(raw); i += 64 {
			s.Scan(raw[:i])
		}
		if s.Scan(raw) != Complete || Parse(s.Message(raw, scratch), &h) != nil {
			panic("no hello")
		}
	}); n != 0 {
		t.Fatalf("%v allocations", n)
	}
}

func FuzzHello(f *testing.F) {
	raw := captureClientHello(f, "a.example.com", "h2")
	f.Add(raw, uint16(0))
	f.Add(reframe(raw, 3, 500), uint16(7))
	f.Add(captureClientHello(f, ""), uint16(1))
	f.Add([]byte("GET / HTTP/1.0\r\n\r\n"), uint16(3))
	scratch := make([]byte, MaxMessage+4)
	f.Fuzz(func(t *testing.T, in []byte, step uint16) {
		if len(in) > MaxRaw+100 {
			return
		}
		var whole Scanner
		st := whole.Scan(in)
		// Fed in pieces of step+1 bytes, the scan ends the same way.
		var parts Scanner
		got := NeedMore
		for i := int(step) + 1; got == NeedMore; i += int(step) + 1 {
			got = parts.Scan(in[:min(i, len(in))])
			if i >= len(in) {
				break
			}
		}
		if got != st {
			t.Fatalf("whole: %s, in pieces of %d: %s", st, step+1, got)
		}
		if st != Complete {
			return
		}
		m := whole.Message(in, scratch)
		if len(m) != whole.Len() || m[0] != 1 {
			t.Fatalf("message of %d bytes, want %d", len(m), whole.Len())
		}
		var h Hello
		if Parse(m, &h) == nil && h.NALPN > MaxALPN {
			t.Fatal("too many protocols")
		}
	})
}
