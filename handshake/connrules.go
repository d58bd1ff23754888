package handshake

import (
	"net/netip"
	"sync/atomic"

	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/limits"
	"github.com/sluice-proxy/sluice/rules"
)

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

// newConnRules returns the rules step of r, or nil when r has none of allow=,
// deny=, rate=, maxconn=.
func newConnRules(r *rules.Rule, p *Policy) Handler {
	if len(r.Allow) == 0 && len(r.Deny) == 0 && r.Rate <= 0 && r.MaxConn <= 0 {
		return nil
	}
	return &connRules{allow: r.Allow, deny: r.Deny, rate: p.rate, maxConn: int64(r.MaxConn), inUse: &p.inUse, c: &p.C}
}

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
