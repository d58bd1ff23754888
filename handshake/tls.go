package handshake

import (
	"github.com/sluice-proxy/sluice/tlsconf"
)

// The tls stage: a route with tls.cert terminates TLS. It runs after the
// route is chosen (the sni stage picks the route, and so the certificate,
// from the hello), so the engine starts it from the session step of the
// chosen route's policy, not from the front's incoming chain: the hello's
// bytes the sni stage read go to the TLS server handshake (TakeHello), not
// to the backend (no replay on a terminating route). The handshake itself
// is the client conn's data layer's accept (conn.TLS). The outgoing tls
// (tls.backend) is the backend conn's data layer's connect, once connected
// and after send-proxy's header.

// SetTLS gives the policy its rule's loaded TLS (nil: none). Call it before
// the policy serves a conn.
func (p *Policy) SetTLS(l *tlsconf.Loaded) { p.tls = l }

// TLS returns the rule's loaded TLS, or nil.
func (p *Policy) TLS() *tlsconf.Loaded { return p.tls }

// Terminates reports whether the policy's conns get a TLS server handshake.
func (p *Policy) Terminates() bool { return p.tls != nil && p.tls.Server != nil }

// Originates reports whether the policy's backend conns are TLS.
func (p *Policy) Originates() bool { return p.tls != nil && p.tls.Client != nil }

// TakeHello returns the bytes the sni stage read and did not write to a
// backend (nil when none), and forgets them: the TLS server handshake reads
// them first. The slice is valid until st is given back.
func (st *State) TakeHello() []byte {
	s := &st.sni
	if s.buf == nil || s.sent >= s.n {
		return nil
	}
	b := (*s.buf)[s.sent:s.n]
	s.sent = s.n
	return b
}

// TLSDigest is the digest of the rule's TLS files as the engine's listener
// signature writes it ("" when none): a changed file is a changed rule.
func (p *Policy) TLSDigest() string {
	if p == nil || p.tls == nil {
		return ""
	}
	return " #tls:" + p.tls.Digest
}
