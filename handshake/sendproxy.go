package handshake

import (
	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/rules"
)

// sendProxy writes a PROXY header to the backend before any payload: the
// client's addresses (after accept-proxy) and the kept TLVs (v2).
type sendProxy struct {
	version uint8
	c       *Counters
}

var _ Handler = (*sendProxy)(nil)

// newSendProxy returns the send-proxy step of r, or nil when r has no
// send-proxy=.
func newSendProxy(r *rules.Rule, p *Policy) Handler {
	if r.SendProxy == rules.ProxyNone {
		return nil
	}
	return &sendProxy{version: uint8(r.SendProxy), c: &p.C}
}

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
