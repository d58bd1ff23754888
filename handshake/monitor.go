package handshake

import (
	"net/netip"

	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/rules"
)

// monitor turns a conn from a monitor network into a health reply, judged on
// the socket's own source before any PROXY parsing.
type monitor struct {
	nets []netip.Prefix
	c    *Counters
}

var _ Handler = (*monitor)(nil)

// newMonitor returns the monitor step of r, or nil when r has no monitor=.
func newMonitor(r *rules.Rule, p *Policy) Handler {
	if len(r.Monitor) == 0 {
		return nil
	}
	return &monitor{nets: r.Monitor, c: &p.C}
}

func (m *monitor) Handshake(st *State) (Result, conn.Code) {
	if containsAddr(m.nets, st.In.Src.Addr()) {
		st.flags |= Health
		m.c.MonitorHits.Add(1)
	}
	return Done, conn.CodeNone
}
