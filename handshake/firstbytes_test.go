package handshake

import (
	"fmt"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// The first-bytes gate on a real loopback TCP pair: it waits while nothing
// or a strict prefix of a signature arrived, refuses a signature (counted as
// accept-proxy / proxy-not-trusted), lets anything else through, and never
// consumes a byte.
func TestFirstBytesGate(t *testing.T) {
	type part struct {
		bytes string
		want  Result
		code  conn.Code
	}
	wait := func(b string) part { return part{b, WantRead, conn.CodeNone} }
	hold := func(b string) part { return part{b, WantRead, conn.CodeHandshakeTimeout} } // a prefix: a bounded wait
	pass := func(b string) part { return part{b, Done, conn.CodeNone} }
	refuse := func(b string) part { return part{b, Fail, conn.CodeProxyNotTrusted} }
	for _, c := range []struct {
		name  string
		parts []part
		fin   bool // the client shuts its write side after the parts
	}{
		{name: "nothing yet", parts: []part{wait("")}},
		{name: "payload", parts: []part{pass("GET / HTTP/1.0\r\n\r\n")}},
		{name: "one byte of payload", parts: []part{pass("G")}},
		{name: "v1 prefix, then payload", parts: []part{hold("P"), hold("RO"), pass("XIMA")}},
		{name: "v1 prefix, then the rest", parts: []part{hold("PRO"), refuse("XY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")}},
		{name: "v1 signature", parts: []part{refuse("PROXY")}},
		{name: "v2 prefix", parts: []part{hold("\r\n\r\n\x00\r\nQU")}},
		{name: "v2 signature", parts: []part{hold("\r\n\r\n\x00\r\nQU"), refuse("IT\n\x21\x11\x00\x0c")}},
		{name: "v2 prefix, then payload", parts: []part{hold("\r\n\r\n"), pass("GET")}},
		{name: "closed empty", parts: []part{pass("")}, fin: true},
		// A prefix then the end of input is no header: no more can come.
		{name: "closed after a prefix", parts: []part{pass("PRO")}, fin: true},
	} {
		t.Run(c.name, func(t *testing.T) {
			pr := newPair(t, "tcp 127.0.0.1:80 -> 127.0.0.1:81 accept-proxy=10.0.0.0/8", "127.0.0.1:5000")
			if r, code := pr.run(); r != Done || !pr.p.Gated(pr.st) {
				t.Fatalf("incoming chain %v %v, gated %v", r, code, pr.p.Gated(pr.st))
			}
			sent := ""
			for i, p := range c.parts {
				if p.bytes != "" {
					pr.send([]byte(p.bytes))
					sent += p.bytes
				}
				if c.fin && i == len(c.parts)-1 {
					unix.Shutdown(pr.client, unix.SHUT_WR)
					testpeer.Delivered(t, pr.client)
				}
				ended := c.fin && i == len(c.parts)-1 // as the session says from the event's RDHUP
				r, code := pr.p.RunGate(&pr.in, ended)
				expect(t, fmt.Sprintf("after %q", sent), r, code, p.want, p.code)
			}
			refused := pr.p.Stats().Refused["accept-proxy"]["proxy-not-trusted"]
			if last := c.parts[len(c.parts)-1]; (last.want == Fail) != (refused == 1) || refused > 1 {
				t.Errorf("refused counter %d", refused)
			}
			if sent != "" {
				if got := pr.rest(len(sent) + 10); got != sent {
					t.Errorf("the gate consumed bytes: left %q of %q", got, sent)
				}
			}
		})
	}
}

// A trusted source's conn is not gated: its header was parsed by accept-proxy.
func TestTrustedNotGated(t *testing.T) {
	pr := newPair(t, "tcp 127.0.0.1:80 -> 127.0.0.1:81 accept-proxy=127.0.0.0/8", "127.0.0.1:5000")
	pr.send(v1("192.0.2.9:1234", "198.51.100.2:443"))
	r, code := pr.run()
	expect(t, "trusted", r, code, Done, conn.CodeNone)
	if pr.p.Gated(pr.st) {
		t.Error("a trusted source is gated")
	}
}

// The gate runs on the session's events: a run borrows its State from the
// pool and allocates nothing.
func TestGateAllocatesNothing(t *testing.T) {
	pr := newPair(t, "tcp 127.0.0.1:80 -> 127.0.0.1:81 accept-proxy=10.0.0.0/8", "127.0.0.1:5000")
	pr.send([]byte("PRO"))
	pr.p.RunGate(&pr.in, false) // warm the pool
	if n := testing.AllocsPerRun(100, func() { pr.p.RunGate(&pr.in, false) }); n != 0 {
		t.Errorf("RunGate allocates %v times a run", n)
	}
}
