package handshake

import (
	"net/netip"
	"sync/atomic"
	"syscall"
	"unsafe"

	"github.com/pires/go-proxyproto"
	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/limits"
)

// Health replies. A probe gets its reply at once, without its request being
// parsed (HAProxy's "mode health" does the same): balancers only look at the
// status line or the first bytes.
var (
	httpUp   = []byte("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nOK\n")
	httpDown = []byte("HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: close\r\n\r\nDOWN\n")
	tcpUp    = []byte("OK\n")
	tcpDown  = []byte("DOWN\n")
)

// maxDrain bounds what a health conn reads (and drops) after its reply while
// it waits for the client to close.
const maxDrain = 64 << 10

// containsAddr reports whether a lies in one of ps.
func containsAddr(ps []netip.Prefix, a netip.Addr) bool {
	a = a.Unmap()
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// recv is recvfrom(2) without a source address, so a peek never allocates.
// It returns the bytes read (0 at end of stream) or the errno.
func recv(fd int, p []byte, flags int) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for {
		n, _, e := unix.Syscall6(unix.SYS_RECVFROM, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)), uintptr(flags), 0, 0)
		if e == 0 {
			return int(n), nil
		}
		if e != syscall.EINTR {
			return 0, e
		}
	}
}

// flush writes st.out from st.off to fd without blocking.
//
// Return convention: (Done, CodeNone) when every byte is written;
// (WantWrite, CodeNone) when the socket is full (st.off says how far it got);
// (Fail, failCode) when the write failed.
func (st *State) flush(fd int, failCode conn.Code) (Result, conn.Code) {
	for int(st.off) < len(st.out) {
		n, err := unix.Write(fd, st.out[st.off:])
		switch {
		case err == nil:
			st.off += uint32(n)
		case err == unix.EINTR:
		case err == unix.EAGAIN:
			return WantWrite, conn.CodeNone
		default:
			return Fail, failCode
		}
	}
	return Done, conn.CodeNone
}

// monitor turns a conn from a monitor network into a health reply, judged on
// the socket's own source before any PROXY parsing.
type monitor struct {
	nets []netip.Prefix
	c    *Counters
}

var _ Handler = (*monitor)(nil)

func (m *monitor) Handshake(st *State) (Result, conn.Code) {
	if containsAddr(m.nets, st.In.Src.Addr()) {
		st.flags |= Health
		m.c.MonitorHits.Add(1)
	}
	return Done, conn.CodeNone
}

// health writes the last chunk of a probe's answer, shuts the write side, and
// reads until the client closes, so that closing never resets a reply the
// client has not read yet. A rule with no target answers every conn (always).
type health struct {
	always   bool
	up, down []byte
	c        *Counters
}

var _ Handler = (*health)(nil)

func (h *health) Handshake(st *State) (Result, conn.Code) {
	if !h.always && st.flags&Health == 0 {
		return Done, conn.CodeNone
	}
	st.flags |= Health
	fd := st.In.FD()
	if st.flags&Replied == 0 {
		if st.out == nil {
			st.out = h.up
			if st.flags&Failing != 0 {
				st.out = h.down
				h.c.HealthDown.Add(1)
			} else {
				h.c.HealthUp.Add(1)
			}
		}
		if r, code := st.flush(fd, conn.CodeClientReset); r != Done {
			return r, code
		}
		_ = st.In.ShutW() // a failure here means the client is gone; the drain below sees it
		st.flags |= Replied
		st.out, st.off = nil, 0
	}
	for st.off < maxDrain {
		n, err := unix.Read(fd, st.peek[:])
		switch {
		case err == nil && n > 0:
			st.off += uint32(n)
		case err == nil:
			return Close, conn.CodeHealth // the client closed: served
		case err == unix.EINTR:
		case err == unix.EAGAIN:
			return WantRead, conn.CodeNone
		default:
			return Close, conn.CodeHealth // a reset after the reply is a client's way to close
		}
	}
	return Close, conn.CodeHealth
}

// acceptProxy reads a PROXY v1 or v2 header from a trusted source and makes
// the addresses it carries the conn's own. It peeks (MSG_PEEK) until the
// header is complete, parses it with go-proxyproto, then consumes exactly its
// bytes, so the stream after it stays in the kernel for splice.
type acceptProxy struct {
	trusted []netip.Prefix // empty: every source must send a header
	c       *Counters
}

var _ Handler = (*acceptProxy)(nil)

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
	n, err := recv(fd, st.peek[:], unix.MSG_PEEK)
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
			if m, err := recv(fd, buf[:hl], unix.MSG_PEEK); err == nil && m == hl {
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
	if n, err := recv(fd, hdr, 0); err != nil {
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

// connRules applies allow/deny, the per-source rate and the rule's maxconn,
// on the client address (the one a PROXY header carried, if any). deny wins
// over allow.
type connRules struct {
	allow, deny []netip.Prefix
	rate        *limits.RateTable // nil: no rate limit
	maxConn     int64             // 0: unlimited
	inUse       *atomic.Int64     // the rule's conns holding a maxconn slot
	c           *Counters
}

var _ Handler = (*connRules)(nil)

func (r *connRules) Handshake(st *State) (Result, conn.Code) {
	src := st.In.Src.Addr()
	if len(r.allow) > 0 && !containsAddr(r.allow, src) || containsAddr(r.deny, src) {
		return Fail, conn.CodeDenied
	}
	if r.rate != nil && !r.rate.Allow(src, st.Now) {
		r.c.RateRefused.Add(1)
		return Fail, conn.CodeRateLimited
	}
	if r.maxConn > 0 {
		if r.inUse.Add(1) > r.maxConn {
			r.inUse.Add(-1)
			r.c.MaxConnRefused.Add(1)
			return Fail, conn.CodeRateLimited
		}
		st.flags |= MaxConn
	}
	return Done, conn.CodeNone
}

// sendProxy writes a PROXY header to the backend before any payload: the
// client's addresses (after accept-proxy) and the kept TLVs (v2).
type sendProxy struct {
	version uint8
	c       *Counters
}

var _ Handler = (*sendProxy)(nil)

func (s *sendProxy) Handshake(st *State) (Result, conn.Code) {
	c := st.Out
	if c.Op(conn.OpSendProxy) != conn.StepStarted {
		b, err := formatHeader(s.version, st.In.Src, st.In.Dst, st.TLVs)
		if err != nil {
			return Fail, conn.CodeResource
		}
		st.out, st.off = b, 0
		c.SetOp(conn.OpSendProxy, conn.StepStarted)
	}
	if r, code := st.flush(c.FD(), conn.CodeServerReset); r != Done {
		return r, code
	}
	st.out, st.off = nil, 0
	c.SetOp(conn.OpSendProxy, conn.StepDone)
	if s.version == 1 {
		s.c.SentV1.Add(1)
	} else {
		s.c.SentV2.Add(1)
	}
	return Done, conn.CodeNone
}
