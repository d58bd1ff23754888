package engine

import (
	"math"
	"sync/atomic"

	"github.com/sluice-proxy/sluice/rules"
)

// Counters for metrics and the status page. They are read at scrape time
// (Stats); the data path only adds to them, and what it pays is:
//
//   - per event that moves bytes: up to three atomic adds on the rule's shard
//     of the loop that runs the session. Only that loop writes its shard (one
//     cache line per loop), so the adds never contend and nothing locks;
//   - per session: an atomic add at its start and a few at its end, where its
//     handshake, connect and total durations are each observed once in a
//     fixed-bucket histogram (a scan of at most 16 bounds, two atomic adds);
//   - nothing allocates.
//
// Building with the tag sluice_nocounters compiles these adds out (not the
// handshake policy's counters, nor the engine-wide ones that predate them),
// so the cost can be measured: see bench/RESULTS.md.

// cacheLine is the size a loop's shard is padded to.
const cacheLine = 64

// ruleShard is one loop's part of a rule's data-path counters.
type ruleShard struct {
	live      atomic.Int64  // sessions of the rule on this loop, from accept to end
	bytesUp   atomic.Uint64 // client to backend
	bytesDown atomic.Uint64 // backend to client
	spliced   atomic.Uint64 // of both, moved through a pipe (the rest went through a buffer)
	_         [cacheLine - 32]byte
}

// RuleCounters are the engine's counters of one rule, shared by its ports.
// A rule that a table change keeps unchanged keeps its counters; a changed
// rule starts new ones (its sessions still running count in the old ones,
// which Stats no longer shows).
type RuleCounters struct {
	name   string      // the rule's listen part, pif included, and its routing words: its label
	shards []ruleShard // by loop id

	connectErrors atomic.Uint64 // backend connects that failed (each try)
	retries       atomic.Uint64 // connects to a further backend of the pool after a failure
	terms         [whoCount][phaseCount]atomic.Uint64
	refusals      refusalLog // the rule's refusal lines (refusals.go); kept with sluice_nocounters

	handshake Histogram // accept to the end of the incoming chain, sessions that passed it
	connect   Histogram // end of the chain to backend connected (retries included)
	session   Histogram // accept to end, sessions that passed the chain
	hello     Histogram // bytes the sni stage read of conns that chose this route (routes only)
}

// countersFor returns *c, made for rule r on first use.
func (e *Engine) countersFor(c **RuleCounters, r *rules.Rule) *RuleCounters {
	if *c == nil {
		*c = e.newRuleCounters(r)
	}
	return *c
}

func (e *Engine) newRuleCounters(r *rules.Rule) *RuleCounters {
	return &RuleCounters{name: r.RouteString(), shards: make([]ruleShard, len(e.loops)),
		session: Histogram{bounds: durationBounds[:]}, hello: Histogram{bounds: helloBounds[:], bytes: true}}
}

// ruleName is the name of ln's rule in metrics and logs: its listen part,
// pif included ("tcp 0.0.0.0:8080"); a port-0 rule is named by the port it
// got, so two such rules do not share a name.
func (ln *Listener) ruleName() string {
	if ln.key.Port == 0 {
		return rules.Key{Pif: ln.key.Pif, Proto: ln.key.Proto, Addr: ln.key.Addr, Port: ln.addr.Port()}.String()
	}
	return ln.ctr.name
}

// routed counts a conn whose hello of n bytes chose this route.
func (c *RuleCounters) routed(n int) {
	if CountersEnabled {
		c.hello.observe(uint64(n))
	}
}

// moveLive moves a live session of loop l from c to the counters of the
// route the sni stage chose.
func (c *RuleCounters) moveLive(l *Loop, to *RuleCounters) {
	if CountersEnabled && c != to {
		c.shards[l.id].live.Add(-1)
		to.shards[l.id].live.Add(1)
	}
}

// begin counts a new session of the rule on loop l.
func (c *RuleCounters) begin(l *Loop) {
	if CountersEnabled {
		c.shards[l.id].live.Add(1)
	}
}

// moved counts bytes a session of the rule moved on loop l: up client to
// backend, down backend to client, spliced of both through a pipe.
func (c *RuleCounters) moved(l *Loop, up, down int, spliced uint64) {
	if !CountersEnabled {
		return
	}
	sh := &c.shards[l.id]
	if up > 0 {
		sh.bytesUp.Add(uint64(up))
	}
	if down > 0 {
		sh.bytesDown.Add(uint64(down))
	}
	if spliced > 0 {
		sh.spliced.Add(spliced)
	}
}

// retry counts a connect to a further backend after a failed one.
func (c *RuleCounters) retry() {
	if CountersEnabled {
		c.retries.Add(1)
	}
}

// connectError counts a failed backend connect of a rule, engine-wide and
// on the rule.
func (l *Loop) connectError(ln *Listener) {
	l.e.connectErrors.Add(1)
	if CountersEnabled {
		ln.ctr.connectErrors.Add(1)
	}
}

// ended counts the end of a session of the rule on loop l: its termination
// code and, once it passed the incoming chain, its durations.
func (c *RuleCounters) ended(l *Loop, s *session, t Term) {
	if !CountersEnabled {
		return
	}
	c.shards[l.id].live.Add(-1)
	c.terms[t.who][t.phase].Add(1)
	if s.flags&sfPassed == 0 {
		return
	}
	c.handshake.observe(uint64(s.hsUs))
	if s.flags&sfConnected != 0 {
		c.connect.observe(uint64(s.connUs - min(s.hsUs, s.connUs)))
	}
	if d := l.now - s.start; d > 0 {
		c.session.observe(uint64(d) / 1000)
	}
}

// sinceUs returns the microseconds from start to now (loop clock, ns),
// within a uint32 (71 minutes; longer is clamped).
func sinceUs(now, start int64) uint32 {
	d := (now - start) / 1000
	switch {
	case d <= 0:
		return 0
	case d > math.MaxUint32:
		return math.MaxUint32
	}
	return uint32(d)
}
