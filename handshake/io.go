package handshake

import (
	"net/netip"

	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/internal/rawsys"
)

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

// flush writes st.out from st.off to fd without blocking.
//
// Return convention: (Done, CodeNone) when every byte is written;
// (WantWrite, CodeNone) when the socket is full (st.off says how far it got);
// (Fail, failCode) when the write failed.
func (st *State) flush(fd int, failCode conn.Code) (Result, conn.Code) {
	for int(st.off) < len(st.out) {
		n, err := rawsys.Send(fd, st.out[st.off:])
		switch {
		case err == nil:
			st.off += uint32(n)
		case err == unix.EAGAIN:
			return WantWrite, conn.CodeNone
		default:
			return Fail, failCode
		}
	}
	return Done, conn.CodeNone
}
