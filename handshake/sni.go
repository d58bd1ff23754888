package handshake

import (
	"sync"

	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/handshake/hello"
	"github.com/sluice-proxy/sluice/internal/rawsys"
	"github.com/sluice-proxy/sluice/rules"
)

// The sni stage reads the client's TLS ClientHello and chooses the route of
// the listen key (rules.Router). The hello is read, not peeked: each byte
// is copied once into a pooled buffer and the reassembler goes on from
// where it stopped, so a hello sent one byte per segment costs linear work
// (a peek would re-read the whole growing prefix at every event), and the
// kernel's receive queue is freed as it arrives. The bytes read are written
// to the chosen backend first, unchanged, by the outgoing chain (after
// send-proxy's header), and the session then forwards and may splice.
//
// Memory: nothing held until the client's first byte arrives (the first
// read borrows the smallest buffer from its pool and gives it back at once
// when it finds nothing: one system call per readiness, no peek before
// the read), then the smallest buffer tier that holds what it sent: 2 KiB
// for most hellos (a post-quantum one is ~1.5–2 KB; a second tier for the
// larger), at most hello.MaxRaw; given back when the State is.

// helloTiers are the buffer sizes, smallest first.
var helloTiers = [...]int{2 << 10, 4 << 10, 8 << 10, 16 << 10, hello.MaxRaw}

var helloPools [len(helloTiers)]sync.Pool

func getHelloBuf(tier int) *[]byte {
	if b, ok := helloPools[tier].Get().(*[]byte); ok {
		return b
	}
	b := make([]byte, helloTiers[tier])
	return &b
}

// scratchPool holds the buffers a fragmented hello is joined in, for the
// parse only.
var scratchPool = sync.Pool{New: func() any { return new([hello.MaxMessage + 4]byte) }}

// sniState is the sni stage's part of a State.
type sniState struct {
	buf   *[]byte // pooled, of helloTiers[tier]; nil until the first byte
	tier  uint8
	n     uint32 // bytes of buf read from the client
	sent  uint32 // of those, written to the backend
	route int16  // the route chosen (Routed)
	scan  hello.Scanner
	name  string // the hello's server name, lower case (Routed; "" when none)
	proto string // the ALPN protocol that chose the route, else the first offered (Routed)
}

// release gives the buffer back.
func (s *sniState) release() {
	if s.buf != nil {
		helloPools[s.tier].Put(s.buf)
		s.buf = nil
	}
}

// Route returns the index of the route the sni stage chose among the key's
// routes (rules.RouteGroups order), or -1 when the conn was not routed (its
// key has one rule that does not route).
func (st *State) Route() int {
	if st.flags&Routed == 0 {
		return -1
	}
	return int(st.sni.route)
}

// HelloBytes returns how many bytes the sni stage read from the client.
func (st *State) HelloBytes() int { return int(st.sni.n) }

// Seen returns the hello's server name (lower case, no trailing dot) and
// ALPN protocol (the one that chose the route, else the first the client
// offered) of a routed conn; "" for what the hello did not carry. The
// strings outlive the State: a name the route lists exactly and a protocol
// the route lists or a common one are the rule's or static strings; only
// other names and protocols are copied (one allocation each).
func (st *State) Seen() (sni, alpn string) { return st.sni.name, st.sni.proto }

// sniStage is the incoming step of a routed key.
type sniStage struct {
	rt *rules.Router
}

var _ Handler = (*sniStage)(nil)

// newSNI returns the sni stage of a policy whose key routes, else nil.
func newSNI(_ *rules.Rule, p *Policy) Handler {
	if p.router == nil {
		return nil
	}
	return &sniStage{rt: p.router}
}

// Handshake reads what the client sent until the hello is complete, then
// chooses the route.
//
// Return convention: (WantRead, CodeNone) until the hello is complete;
// (Done, CodeNone) with the route set (State.Route); (Fail, code) with
// CodeNoRoute (no route matches, or not TLS and no default route),
// CodeTLSHelloOversized, CodeTLSHelloBad (malformed, or the client ended
// its stream inside the hello) or CodeClientReset (a read error).
func (h *sniStage) Handshake(st *State) (Result, conn.Code) {
	s := &st.sni
	fd := st.In.FD()
	if s.buf == nil {
		s.buf = getHelloBuf(0)
	}
	for {
		b := *s.buf
		if int(s.n) == len(b) {
			if int(s.tier) == len(helloTiers)-1 {
				return Fail, conn.CodeTLSHelloOversized
			}
			nb := getHelloBuf(int(s.tier) + 1)
			copy(*nb, b)
			helloPools[s.tier].Put(s.buf)
			s.buf, s.tier = nb, s.tier+1
			b = *nb
		}
		n, err := rawsys.Recv(fd, b[s.n:], 0)
		switch {
		case err == unix.EAGAIN:
			if s.n == 0 {
				s.release() // nothing held for a client that sent nothing yet
			}
			return WantRead, conn.CodeNone
		case err != nil:
			return Fail, conn.CodeClientReset
		case n == 0:
			if s.n == 0 {
				return h.route(st, hello.NotTLS) // an empty stream: the default route, which sees the end
			}
			if status := s.scan.Scan(b[:s.n]); status == hello.NotTLS {
				return h.route(st, status)
			}
			return Fail, conn.CodeTLSHelloBad // the stream ended inside the hello
		}
		short := n < len(b)-int(s.n) // a stream socket hands over all it holds
		s.n += uint32(n)
		if status := s.scan.Scan(b[:s.n]); status != hello.NeedMore {
			if short {
				st.Set(Drained)
			}
			return h.route(st, status)
		}
	}
}

// route ends the stage on a final scan status.
func (h *sniStage) route(st *State, status hello.Status) (Result, conn.Code) {
	s := &st.sni
	i := -1
	switch status {
	case hello.Oversized:
		return Fail, conn.CodeTLSHelloOversized
	case hello.Bad:
		return Fail, conn.CodeTLSHelloBad
	case hello.NotTLS:
		i = h.rt.Default()
	case hello.Complete:
		scratch := scratchPool.Get().(*[hello.MaxMessage + 4]byte)
		var hl hello.Hello
		err := hello.Parse(s.scan.Message((*s.buf)[:s.n], scratch[:]), &hl)
		if err == nil {
			i = h.rt.Choose(hl.ServerName, hl.Protocols())
			if i >= 0 {
				r := h.rt.Routes()[i]
				s.name, s.proto = seenName(r.SNI, hl.ServerName), seenProto(r.ALPN, hl.Protocols())
			}
		}
		scratchPool.Put(scratch)
		if err != nil {
			return Fail, conn.CodeTLSHelloBad
		}
	}
	if i < 0 {
		return Fail, conn.CodeNoRoute
	}
	s.route = int16(i)
	st.flags |= Routed
	return Done, conn.CodeNone
}

// commonProtos are the ALPN protocols Seen returns without a copy.
var commonProtos = [...]string{"h2", "http/1.1", "http/1.0", "h3", "acme-tls/1", "imap", "pop3", "smtp", "xmpp-client", "postgresql"}

// seenName returns name lower-cased without a trailing dot: the route's own
// string when it lists it exactly (names), else a copy; "" for none.
func seenName(names []string, name []byte) string {
	if n := len(name); n > 0 && name[n-1] == '.' {
		name = name[:n-1]
	}
	if len(name) == 0 {
		return ""
	}
	for _, n := range names {
		if equalFold(n, name) {
			return n
		}
	}
	low := []byte(string(name)) // one copy, lowered in place
	for i, c := range low {
		if c >= 'A' && c <= 'Z' {
			low[i] = c + 'a' - 'A'
		}
	}
	return string(low)
}

// seenProto returns the first of the route's protocols (route) the client
// offered, else the client's first protocol (a common one without a copy);
// "" when it offered none.
func seenProto(route []string, offered [][]byte) string {
	for _, p := range route {
		for _, o := range offered {
			if string(o) == p {
				return p
			}
		}
	}
	if len(offered) == 0 {
		return ""
	}
	for _, p := range commonProtos {
		if string(offered[0]) == p {
			return p
		}
	}
	return string(offered[0])
}

// equalFold reports whether b equals the lower-case ASCII s, ignoring b's
// case.
func equalFold(s string, b []byte) bool {
	if len(s) != len(b) {
		return false
	}
	for i, c := range b {
		if c >= 'A' && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != s[i] {
			return false
		}
	}
	return true
}

// replay is the outgoing step of a route: it writes the bytes the sni stage
// read to the backend, before any other byte of the client's.
type replay struct{}

var _ Handler = (*replay)(nil)

// newReplay returns the replay step of a policy whose key routes, else nil;
// none on a terminating route, whose hello goes to its TLS handshake.
func newReplay(r *rules.Rule, p *Policy) Handler {
	if p.router == nil || r.Terminates() {
		return nil
	}
	return replay{}
}

// Handshake returns (Done, CodeNone) once every byte read is written,
// (WantWrite, CodeNone) while the backend's socket is full, (Fail,
// CodeServerReset) when the write fails.
func (replay) Handshake(st *State) (Result, conn.Code) {
	s := &st.sni
	for s.sent < s.n {
		n, err := rawsys.Send(st.Out.FD(), (*s.buf)[s.sent:s.n])
		switch {
		case err == nil:
			s.sent += uint32(n)
		case err == unix.EAGAIN:
			return WantWrite, conn.CodeNone
		default:
			return Fail, conn.CodeServerReset
		}
	}
	s.release()
	return Done, conn.CodeNone
}
