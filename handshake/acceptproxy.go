package handshake

import (
	"net/netip"

	"github.com/pires/go-proxyproto"
	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/internal/rawsys"
	"github.com/sluice-proxy/sluice/rules"
)

// acceptProxy reads a PROXY v1 or v2 header from a trusted source and makes
// the addresses it carries the conn's own. It peeks (MSG_PEEK) until the
// header is complete, parses it with go-proxyproto, then consumes exactly its
// bytes, so the stream after it stays in the kernel for splice.
type acceptProxy struct {
	trusted []netip.Prefix // empty: every source must send a header
	c       *Counters
}

var _ Handler = (*acceptProxy)(nil)

// newAcceptProxy returns the accept-proxy step of r, or nil when r has no
// accept-proxy.
func newAcceptProxy(r *rules.Rule, p *Policy) Handler {
	if !r.AcceptProxy {
		return nil
	}
	return &acceptProxy{trusted: r.Trusted, c: &p.C}
}

func (a *acceptProxy) Handshake(st *State) (Result, conn.Code) {
	c := st.In
	if len(a.trusted) > 0 && !containsAddr(a.trusted, c.Src.Addr()) {
		// A plain client: its bytes are payload, never parsed as a header.
		st.flags |= Untrusted
		a.c.ProxyUntrusted.Add(1)
		return Done, conn.CodeNone
	}
	c.SetOp(conn.OpAcceptProxy, conn.StepStarted)
	fd := c.FD()
	n, err := rawsys.Recv(fd, st.peek[:], unix.MSG_PEEK)
	switch {
	case err == unix.EAGAIN:
		if st.flags&PeerClosed != 0 {
			return Fail, conn.CodeProxyTruncated
		}
		return WantRead, conn.CodeNone
	case err != nil:
		return Fail, conn.CodeClientReset
	case n == 0:
		return Fail, conn.CodeProxyTruncated // closed before any byte
	}
	hl, err := HeaderLen(st.peek[:n])
	switch err {
	case ErrNoHeader:
		return Fail, conn.CodeProxyMissing
	case ErrTooLong:
		return Fail, conn.CodeProxyOversized
	}
	if hl > 0 && hl <= n {
		return a.take(st, fd, st.peek[:hl])
	}
	if hl > n && n == len(st.peek) {
		// Longer than the inline buffer: peek it whole once the kernel holds it.
		avail, err := unix.IoctlGetInt(fd, unix.SIOCINQ)
		if err == nil && avail >= hl {
			buf := bigPool.Get().(*[maxHeaderLen]byte)
			defer bigPool.Put(buf)
			if m, err := rawsys.Recv(fd, buf[:hl], unix.MSG_PEEK); err == nil && m == hl {
				return a.take(st, fd, buf[:hl])
			}
		}
	}
	if st.flags&PeerClosed != 0 {
		return Fail, conn.CodeProxyTruncated // the client's FIN came before the header's end
	}
	return WantRead, conn.CodeNone
}

// take parses the complete header hdr (peeked, still in the kernel), then
// consumes exactly its bytes and applies it to the conn.
func (a *acceptProxy) take(st *State, fd int, hdr []byte) (Result, conn.Code) {
	h, err := ParseHeader(hdr)
	if err != nil {
		return Fail, conn.CodeProxyBad
	}
	var tlvs []proxyproto.TLV
	if h.Version == 2 {
		all, err := h.TLVs()
		if err != nil {
			return Fail, conn.CodeProxyBad
		}
		for _, t := range all {
			if keptTLV(t.Type) {
				tlvs = append(tlvs, t)
			}
		}
	}
	if n, err := rawsys.Recv(fd, hdr, 0); err != nil {
		return Fail, conn.CodeClientReset
	} else if n != len(hdr) {
		return Fail, conn.CodeProxyTruncated // cannot happen: the bytes were peeked
	}
	st.Version, st.TLVs = h.Version, tlvs
	if src, dst, ok := headerAddrs(h); ok {
		st.In.Src, st.In.Dst = src, dst
		st.flags |= Proxied
	} else {
		// LOCAL (the balancer's own health check) or an address family we
		// cannot use: the spec says to keep the real endpoints.
		st.flags |= Local
		a.c.ProxyLocal.Add(1)
	}
	if h.Version == 1 {
		a.c.ProxyV1.Add(1)
	} else {
		a.c.ProxyV2.Add(1)
	}
	st.In.SetOp(conn.OpAcceptProxy, conn.StepDone)
	return Done, conn.CodeNone
}
