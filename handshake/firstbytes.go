package handshake

import (
	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/internal/rawsys"
	"github.com/sluice-proxy/sluice/rules"
)

// firstBytes is the gate of an accept-proxy rule with a trusted list: a
// source outside the list may connect without a header, but a header from it
// is refused. It looks at the client's first bytes before any of them is
// forwarded; only the signature is compared, nothing is parsed or consumed,
// and nothing waits for a silent client: the backend's bytes flow meanwhile,
// so server-first protocols work. Only a strict prefix of a signature is
// held, and that wait is bounded (see Handshake).
type firstBytes struct{}

var _ Handler = (*firstBytes)(nil)

// newFirstBytes returns the first-bytes gate of r, or nil when no source of
// r can be untrusted (no accept-proxy, or one that trusts every source).
func newFirstBytes(r *rules.Rule, _ *Policy) Handler {
	if !r.AcceptProxy || len(r.Trusted) == 0 {
		return nil
	}
	return &firstBytes{}
}

// Handshake returns (WantRead, CodeNone) while nothing arrived yet,
// (WantRead, CodeHandshakeTimeout) while the bytes are a strict prefix of a
// signature and the client may still send more (the owner bounds that wait
// by the policy's Timeout, then ends the conn with the code),
// (Fail, CodeProxyNotTrusted) for a stream that starts with a signature, and
// (Done, CodeNone) for any other start, a prefix the client ended its input
// after (PeerClosed: no header can follow, the bytes are payload), an error
// or the end of input (the up channel reads and reports those).
func (*firstBytes) Handshake(st *State) (Result, conn.Code) {
	b := st.peek[:len(sigV2)] // the longer signature
	n, err := rawsys.Recv(st.In.FD(), b, unix.MSG_PEEK|unix.MSG_DONTWAIT)
	switch {
	case err == unix.EAGAIN:
		return WantRead, conn.CodeNone
	case err != nil || n == 0:
		return Done, conn.CodeNone
	}
	switch Signature(b[:n]) {
	case SigMaybe:
		if st.flags&PeerClosed != 0 {
			return Done, conn.CodeNone
		}
		return WantRead, conn.CodeHandshakeTimeout
	case SigProxy:
		return Fail, conn.CodeProxyNotTrusted
	}
	return Done, conn.CodeNone
}
