package handshake

import (
	"sync/atomic"

	"github.com/sluice-proxy/sluice/conn"
)

// codeSlots bounds the end codes counted per rule; conn codes are small and
// only ever added, so this leaves room.
const codeSlots = 32

// Counters are one rule's handshake counters. Every field is an atomic: the
// loops update them without a lock or an allocation; Stats reads them.
type Counters struct {
	Accepted       atomic.Uint64 // conns that entered the incoming chain
	Passed         atomic.Uint64 // conns that passed it to the session step
	Routed         atomic.Uint64 // a route's: conns the sni stage sent to it (the engine counts them)
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
		Refused:      map[string]map[string]uint64{},
	}
	if p.router != nil {
		// A route's connections are those routed to it: the key's incoming
		// chain is its first route's, whose refusals (no-route, bad hellos)
		// stay counted there by step.
		s.Accepted, s.Passed = c.Routed.Load(), c.Routed.Load()
	}
	if p.rate != nil {
		s.RateSources = p.rate.Len()
	}
	for k := range c.refused {
		if m := conn.CountsByName(c.refused[k][:]); len(m) > 0 {
			s.Refused[Kind(k).String()] = m
		}
	}
	s.Ended = conn.CountsByName(c.ended[:])
	return s
}
