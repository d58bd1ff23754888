package handshake

import (
	"strconv"
	"sync/atomic"
	"time"

	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/limits"
	"github.com/sluice-proxy/sluice/rules"
)

// DefaultTimeout bounds a conn's whole incoming chain when the rule has no
// timeout.handshake.
const DefaultTimeout = 5 * time.Second

// DefaultRateTableSize is how many sources one rule's rate table tracks at
// most; past it the least recently seen source is forgotten.
const DefaultRateTableSize = 1 << 16

// Kind names a step of the chains, for the per-handler counters.
type Kind uint8

const (
	KindMonitor     Kind = 0
	KindHealth      Kind = 1
	KindAcceptProxy Kind = 2
	KindRules       Kind = 3
	KindSession     Kind = 4 // the engine's session step: backend choice and connect
	KindSendProxy   Kind = 5
	kindCount            = 6
)

var kindNames = [kindCount]string{"monitor", "health", "accept-proxy", "rules", "session", "send-proxy"}

func (k Kind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return "kind-" + strconv.Itoa(int(k))
}

// codeSlots bounds the end codes counted per rule; conn codes are small and
// only ever added, so this leaves room.
const codeSlots = 32

// Counters are one rule's handshake counters. Every field is an atomic: the
// loops update them without a lock or an allocation; Stats reads them.
type Counters struct {
	Accepted       atomic.Uint64 // conns that entered the incoming chain
	Passed         atomic.Uint64 // conns that passed it to the session step
	MonitorHits    atomic.Uint64 // conns from a monitor network
	HealthUp       atomic.Uint64 // health replies saying up (200, "OK")
	HealthDown     atomic.Uint64 // health replies saying down (503, "DOWN")
	ProxyV1        atomic.Uint64 // PROXY v1 headers accepted
	ProxyV2        atomic.Uint64 // PROXY v2 headers accepted
	ProxyLocal     atomic.Uint64 // of those, LOCAL / UNKNOWN (real addresses kept)
	ProxyUntrusted atomic.Uint64 // conns from outside accept-proxy's list (no header expected)
	RateRefused    atomic.Uint64 // refused by rate=
	MaxConnRefused atomic.Uint64 // refused by maxconn=
	SentV1         atomic.Uint64 // PROXY v1 headers sent to backends
	SentV2         atomic.Uint64 // PROXY v2 headers sent to backends

	refused [kindCount][codeSlots]atomic.Uint64 // conns a step closed, by step and code
	ended   [codeSlots]atomic.Uint64            // conns ended, by code
}

func (c *Counters) refuse(k Kind, code conn.Code) {
	if int(code) < codeSlots {
		c.refused[k][code].Add(1)
	}
}

// Policy is one rule's handshake: its incoming and outgoing chains and the
// state they share across the rule's listeners and loops (the maxconn count,
// the per-source rate table, the counters). Safe for concurrent use.
type Policy struct {
	rule    *rules.Rule
	in      Chain
	inKinds []Kind
	out     Chain
	timeout time.Duration
	inUse   atomic.Int64 // conns holding a maxconn slot
	rate    *limits.RateTable
	C       Counters
}

// NewPolicy builds the chains of rule r. rateTableSize bounds its rate table
// (0: DefaultRateTableSize).
func NewPolicy(r *rules.Rule, rateTableSize int) *Policy {
	p := &Policy{rule: r, timeout: r.HandshakeTimeout}
	if p.timeout <= 0 {
		p.timeout = DefaultTimeout
	}
	add := func(k Kind, h Handler) {
		p.in = append(p.in, h)
		p.inKinds = append(p.inKinds, k)
	}
	if len(r.Monitor) > 0 {
		add(KindMonitor, &monitor{nets: r.Monitor, c: &p.C})
	}
	if r.Health != rules.HealthNone {
		h := &health{always: len(r.Targets) == 0, up: tcpUp, down: tcpDown, c: &p.C}
		if r.Health == rules.HealthHTTP {
			h.up, h.down = httpUp, httpDown
		}
		add(KindHealth, h)
	}
	if r.AcceptProxy {
		add(KindAcceptProxy, &acceptProxy{trusted: r.Trusted, c: &p.C})
	}
	if len(r.Allow) > 0 || len(r.Deny) > 0 || r.Rate > 0 || r.MaxConn > 0 {
		cr := &connRules{allow: r.Allow, deny: r.Deny, maxConn: int64(r.MaxConn), inUse: &p.inUse, c: &p.C}
		if r.Rate > 0 {
			if rateTableSize <= 0 {
				rateTableSize = DefaultRateTableSize
			}
			p.rate = limits.NewRateTable(r.Rate, rateTableSize)
			cr.rate = p.rate
		}
		add(KindRules, cr)
	}
	if r.SendProxy != rules.ProxyNone {
		p.out = Chain{&sendProxy{version: uint8(r.SendProxy), c: &p.C}}
	}
	return p
}

// Rule returns the rule the policy was built from.
func (p *Policy) Rule() *rules.Rule { return p.rule }

// Timeout returns the bound on a conn's incoming chain.
func (p *Policy) Timeout() time.Duration { return p.timeout }

// HasHealth reports whether the rule answers health probes, so the owner
// knows to compute Failing for new conns.
func (p *Policy) HasHealth() bool { return p.rule.Health != rules.HealthNone }

// HasOut reports whether the outgoing chain has work (send-proxy).
func (p *Policy) HasOut() bool { return len(p.out) > 0 }

// Begin counts a new conn entering the incoming chain.
func (p *Policy) Begin(st *State) {
	p.C.Accepted.Add(1)
	st.idx = 0
}

// RunIn runs the incoming chain on st from where it stopped.
//
// Return convention: (Done, CodeNone) when the conn is ready for the session
// step; (WantRead|WantWrite, CodeNone) to be run again on readiness; (Fail,
// code) to close the conn, refused and counted; (Close, code) when the conn
// was fully served (a health reply).
func (p *Policy) RunIn(st *State) (Result, conn.Code) {
	i, r, code := p.in.Run(st, int(st.idx))
	st.idx = uint8(i)
	switch r {
	case Done:
		p.C.Passed.Add(1)
		st.idx, st.off, st.out = 0, 0, nil
		st.outDone = true
	case Fail:
		p.C.refuse(p.inKinds[i], code)
	}
	return r, code
}

// RunOut runs the outgoing chain (send-proxy) on st once the backend conn is
// connected. Same return convention as RunIn, without Close.
func (p *Policy) RunOut(st *State) (Result, conn.Code) {
	i, r, code := p.out.Run(st, int(st.idx))
	st.idx = uint8(i)
	if r == Fail {
		p.C.refuse(KindSendProxy, code)
	}
	return r, code
}

// Expired says how a conn whose incoming chain ran out of time ends: a
// health conn that was answered ends as served (CodeHealth), any other as
// CodeHandshakeTimeout, counted on the step it was waiting in.
func (p *Policy) Expired(st *State) conn.Code {
	if st.flags&Replied != 0 {
		return conn.CodeHealth
	}
	k := KindSession
	if !st.outDone && int(st.idx) < len(p.inKinds) {
		k = p.inKinds[st.idx]
	}
	p.C.refuse(k, conn.CodeHandshakeTimeout)
	return conn.CodeHandshakeTimeout
}

// Refuse counts a conn the session step closed (a draining daemon, a rule
// with no backend).
func (p *Policy) Refuse(code conn.Code) { p.C.refuse(KindSession, code) }

// ReleaseSlot gives back a maxconn slot; call it once, when a conn whose
// State had MaxConn ends.
func (p *Policy) ReleaseSlot() { p.inUse.Add(-1) }

// Ended counts a conn of the rule that ended, by its code.
func (p *Policy) Ended(code conn.Code) {
	if int(code) < codeSlots {
		p.C.ended[code].Add(1)
	}
}

// Stats is a snapshot of a Policy's counters, in a form metrics can export.
type Stats struct {
	Accepted, Passed                             uint64
	MonitorHits, HealthUp, HealthDown            uint64
	ProxyV1, ProxyV2, ProxyLocal, ProxyUntrusted uint64
	RateRefused, MaxConnRefused, SentV1, SentV2  uint64
	MaxConnInUse                                 int64
	RateSources                                  int                          // sources in the rate table
	Refused                                      map[string]map[string]uint64 // by step, then by code name
	Ended                                        map[string]uint64            // by code name
}

// Stats returns a snapshot of the counters. It allocates: call it from the
// control side, never the data path.
func (p *Policy) Stats() Stats {
	c := &p.C
	s := Stats{
		Accepted: c.Accepted.Load(), Passed: c.Passed.Load(),
		MonitorHits: c.MonitorHits.Load(), HealthUp: c.HealthUp.Load(), HealthDown: c.HealthDown.Load(),
		ProxyV1: c.ProxyV1.Load(), ProxyV2: c.ProxyV2.Load(), ProxyLocal: c.ProxyLocal.Load(),
		ProxyUntrusted: c.ProxyUntrusted.Load(), RateRefused: c.RateRefused.Load(),
		MaxConnRefused: c.MaxConnRefused.Load(), SentV1: c.SentV1.Load(), SentV2: c.SentV2.Load(),
		MaxConnInUse: p.inUse.Load(),
		Refused:      map[string]map[string]uint64{}, Ended: map[string]uint64{},
	}
	if p.rate != nil {
		s.RateSources = p.rate.Len()
	}
	for k := range c.refused {
		for code := range c.refused[k] {
			if n := c.refused[k][code].Load(); n > 0 {
				m := s.Refused[Kind(k).String()]
				if m == nil {
					m = map[string]uint64{}
					s.Refused[Kind(k).String()] = m
				}
				m[conn.Code(code).String()] = n
			}
		}
	}
	for code := range c.ended {
		if n := c.ended[code].Load(); n > 0 {
			s.Ended[conn.Code(code).String()] = n
		}
	}
	return s
}
