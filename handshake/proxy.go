package handshake

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/pires/go-proxyproto"
)

// Header size limits. go-proxyproto refuses a v2 length above its
// MaxV2HeaderSize (4096); the completeness check uses the same bound so an
// oversized header is refused from its first 16 bytes, without waiting for
// (or buffering) the rest.
const (
	maxV1Len     = 107 // the spec's worst case, CRLF included
	v2PrefixLen  = 16
	maxV2Len     = 4096
	maxHeaderLen = v2PrefixLen + maxV2Len
)

var (
	sigV1 = []byte("PROXY")
	sigV2 = []byte("\r\n\r\n\x00\r\nQUIT\n")
)

// Errors of HeaderLen and ParseHeader.
var (
	ErrNoHeader = errors.New("not a PROXY protocol header")
	ErrTooLong  = errors.New("PROXY protocol header too long")
	ErrBad      = errors.New("malformed PROXY protocol header")
)

// HeaderLen says how long the PROXY header at the start of b is. go-proxyproto
// cannot tell a header cut by the network from a missing one, so this runs
// first and the parser only ever sees complete headers.
//
// Return convention: (n, nil) with n > 0 once the header's total length is
// known — the header is complete when len(b) >= n; (0, nil) when b is a
// prefix of a header and more bytes are needed to know; (0, ErrNoHeader) when
// b cannot start a header; (0, ErrTooLong) when the header exceeds the limits
// (v1: no LF within 107 bytes; v2: length field over 4096).
func HeaderLen(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	switch b[0] {
	case sigV1[0]:
		if !bytes.HasPrefix(sigV1, b[:min(len(b), len(sigV1))]) {
			return 0, ErrNoHeader
		}
		if i := bytes.IndexByte(b[:min(len(b), maxV1Len)], '\n'); i >= 0 {
			return i + 1, nil
		}
		if len(b) >= maxV1Len {
			return 0, ErrTooLong
		}
		return 0, nil
	case sigV2[0]:
		if !bytes.HasPrefix(sigV2, b[:min(len(b), len(sigV2))]) {
			return 0, ErrNoHeader
		}
		if len(b) < v2PrefixLen {
			return 0, nil
		}
		l := int(binary.BigEndian.Uint16(b[14:16]))
		if l > maxV2Len {
			return 0, ErrTooLong
		}
		return v2PrefixLen + l, nil
	}
	return 0, ErrNoHeader
}

// Sig is what the first bytes of a stream say about a PROXY header.
type Sig uint8

const (
	SigNone  Sig = iota // b cannot start a PROXY header
	SigMaybe            // b is a strict prefix of a signature: more bytes are needed to know
	SigProxy            // b starts with a whole v1 or v2 signature
)

// Signature classifies the start of b by the PROXY signatures alone; the
// header itself is never parsed. It is how a header from a source outside
// accept-proxy's trusted list is recognised and refused.
func Signature(b []byte) Sig {
	for _, sig := range [...][]byte{sigV1, sigV2} {
		switch {
		case bytes.HasPrefix(b, sig):
			return SigProxy
		case len(b) > 0 && bytes.HasPrefix(sig, b):
			return SigMaybe
		}
	}
	return SigNone
}

// ParseHeader parses b, exactly one complete header (HeaderLen(b) ==
// len(b)), with go-proxyproto. It returns the header, or an error wrapping
// ErrBad that says what the library found wrong.
func ParseHeader(b []byte) (*proxyproto.Header, error) {
	// ParseUDPDatagram is the library's parser over a byte slice: it reads a
	// header from the start of b and returns what follows.
	h, rest, err := proxyproto.ParseUDPDatagram(b)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBad, err)
	}
	if len(rest) != 0 {
		return nil, fmt.Errorf("%w: %d bytes after the header's end", ErrBad, len(rest))
	}
	return h, nil
}

// headerAddrs returns the client (source) and destination addresses a header
// carries, and false for a header without IP addresses (LOCAL, UNKNOWN,
// UNSPEC, unix), whose conn keeps its real addresses.
func headerAddrs(h *proxyproto.Header) (src, dst netip.AddrPort, ok bool) {
	if !h.Command.IsProxy() {
		return src, dst, false
	}
	s, sok := tcpOrUDP(h.SourceAddr)
	d, dok := tcpOrUDP(h.DestinationAddr)
	return s, d, sok && dok
}

func tcpOrUDP(a net.Addr) (netip.AddrPort, bool) {
	var ip net.IP
	var port int
	switch a := a.(type) {
	case *net.TCPAddr:
		ip, port = a.IP, a.Port
	case *net.UDPAddr:
		ip, port = a.IP, a.Port
	default:
		return netip.AddrPort{}, false
	}
	addr, ok := netip.AddrFromSlice(ip)
	if !ok {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(addr.Unmap(), uint16(port)), true
}

// keptTLVs are the v2 TLVs a conn keeps (and send-proxy=v2 passes on).
func keptTLV(t proxyproto.PP2Type) bool {
	switch t {
	case proxyproto.PP2_TYPE_ALPN, proxyproto.PP2_TYPE_AUTHORITY, proxyproto.PP2_TYPE_UNIQUE_ID, proxyproto.PP2_TYPE_NETNS:
		return true
	}
	return false
}

// formatHeader renders the PROXY header of version v (1 or 2) for a conn
// from src to dst, with tlvs (v2 only). Addresses the header cannot carry
// (mixed families in v1) give a LOCAL / UNKNOWN header, which every receiver
// accepts and which keeps the backend's view of the real peer. It returns
// the header bytes or an error naming what could not be formatted.
func formatHeader(v uint8, src, dst netip.AddrPort, tlvs []proxyproto.TLV) ([]byte, error) {
	h := proxyproto.HeaderProxyFromAddrs(v, net.TCPAddrFromAddrPort(src), net.TCPAddrFromAddrPort(dst))
	if v == 2 && len(tlvs) > 0 {
		if err := h.SetTLVs(tlvs); err != nil {
			return nil, fmt.Errorf("send-proxy: TLVs: %w", err)
		}
	}
	b, err := h.Format()
	if err == nil {
		return b, nil
	}
	local := &proxyproto.Header{Version: v, Command: proxyproto.LOCAL, TransportProtocol: proxyproto.UNSPEC}
	if b, lerr := local.Format(); lerr == nil {
		return b, nil
	}
	return nil, fmt.Errorf("send-proxy v%d %s -> %s: %w", v, src, dst, err)
}
