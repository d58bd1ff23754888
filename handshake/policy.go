package handshake

import (
	"sync/atomic"
	"time"

	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/limits"
	"github.com/sluice-proxy/sluice/rules"
	"github.com/sluice-proxy/sluice/tlsconf"
)

// DefaultTimeout bounds a conn's whole incoming chain when the rule has no
// timeout.handshake.
const DefaultTimeout = 5 * time.Second

// DefaultRateTableSize is how many sources one rule's rate table tracks at
// most; past it the least recently seen source is forgotten.
const DefaultRateTableSize = 1 << 16

// stage is a step as a chain's order lists it: the kind it is counted under
// and the constructor of its handler, which returns nil when rule r does not
// ask for the stage. Constructors take what the rule's conns share from p
// (the counters, the maxconn count, the rate table).
type stage struct {
	kind Kind
	ctor func(r *rules.Rule, p *Policy) Handler
}

// The chains, in order (the package doc says why this order). A new stage is
// its file and one line here.
var (
	inOrder = [...]stage{
		{KindMonitor, newMonitor},
		{KindHealth, newHealth},
		{KindAcceptProxy, newAcceptProxy},
		{KindRules, newConnRules},
		{KindSNI, newSNI},
	}
	outOrder = [...]stage{
		{KindSendProxy, newSendProxy},
		{KindSNI, newReplay}, // after the PROXY header: the bytes the sni stage read
	}
	gateOrder = [...]stage{
		{KindAcceptProxy, newFirstBytes}, // counted with accept-proxy, whose trust it enforces
	}
)

// build makes the chain of rule r from order, leaving out the stages r does
// not ask for.
func build(order []stage, r *rules.Rule, p *Policy) Chain {
	var ch Chain
	for _, s := range order {
		if h := s.ctor(r, p); h != nil {
			ch = append(ch, Step{Kind: s.kind, H: h})
		}
	}
	return ch
}

// Policy is one rule's handshake: its chains and the state they share across
// the rule's listeners and loops (the maxconn count, the per-source rate
// table, the counters). Safe for concurrent use.
type Policy struct {
	rule    *rules.Rule
	in      Chain // before the session step
	out     Chain // on the backend conn, once connected
	gate    Chain // on the client's first bytes, once forwarding (see Gated)
	timeout time.Duration
	inUse   atomic.Int64      // conns holding a maxconn slot
	rate    *limits.RateTable // nil: the rule has no rate=
	router  *rules.Router     // the key's routes (sni.go); nil: the rule does not route
	front   *Policy           // a route's: the policy of its key's first route, whose incoming chain runs; nil: itself
	tls     *tlsconf.Loaded   // the rule's TLS files (tls.go); nil: none
	C       Counters
}

// NewPolicy builds the chains of rule r. rateTableSize bounds its rate table
// (0: DefaultRateTableSize).
func NewPolicy(r *rules.Rule, rateTableSize int) *Policy {
	return newPolicy(r, rateTableSize, nil, nil)
}

// NewRoutePolicies builds the policies of the routes of one listen key (a
// valid group of rules.RouteGroups, of one rule or more). The first runs
// the incoming chain, its sni stage choosing the route (State.Route), and
// holds the key's maxconn count and rate table, as the options acting
// before routing are the listener's; every route's outgoing chain writes
// the bytes the sni stage read, and counts the sessions it got.
func NewRoutePolicies(routes []*rules.Rule, rateTableSize int) []*Policy {
	rt := rules.NewRouter(routes)
	ps := make([]*Policy, len(routes))
	for i, r := range routes {
		var front *Policy
		if i > 0 {
			front = ps[0]
		}
		ps[i] = newPolicy(r, rateTableSize, rt, front)
	}
	return ps
}

func newPolicy(r *rules.Rule, rateTableSize int, rt *rules.Router, front *Policy) *Policy {
	p := &Policy{rule: r, timeout: r.HandshakeTimeout, router: rt, front: front}
	if p.timeout <= 0 {
		p.timeout = DefaultTimeout
	}
	if r.Rate > 0 && front == nil {
		if rateTableSize <= 0 {
			rateTableSize = DefaultRateTableSize
		}
		p.rate = limits.NewRateTable(r.Rate, rateTableSize)
	}
	if front == nil {
		p.in = build(inOrder[:], r, p)
	}
	p.out = build(outOrder[:], r, p)
	p.gate = build(gateOrder[:], r, p)
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

// Gated reports whether the conn of st must pass the gate once it forwards:
// its source is outside accept-proxy's trusted list, so it may not send a
// header. Ask before giving st back.
func (p *Policy) Gated(st *State) bool { return len(p.gate) > 0 && st.flags&Untrusted != 0 }

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
		p.C.refuse(p.in[i].Kind, code)
	}
	return r, code
}

// RunOut runs the outgoing chain (send-proxy) on st once the backend conn is
// connected. Same return convention as RunIn, without Close.
func (p *Policy) RunOut(st *State) (Result, conn.Code) {
	i, r, code := p.out.Run(st, int(st.idx))
	st.idx = uint8(i)
	if r == Fail {
		p.C.refuse(p.out[i].Kind, code)
	}
	return r, code
}

// RunGate runs the gate on in, the client conn of a forwarding session Gated
// said must pass it, on the session's events until it is Done; the client's
// bytes wait meanwhile, the backend's flow. ended says the client's input
// has ended (an event carried RDHUP/HUP): bytes held then are all there will
// be. The session keeps no State once forwarding, so each run borrows one
// from the pool and starts the gate over: gate handlers only peek, and
// consume nothing.
//
// Return convention: (Done, CodeNone) once the client's bytes may flow;
// (WantRead, CodeNone) while they must wait for the client to send;
// (WantRead, code) while the gate holds bytes that must not wait past
// Timeout(): the owner ends the conn with GateExpired then; (Fail, code) to
// close the conn, refused and counted.
func (p *Policy) RunGate(in *conn.Conn, ended bool) (Result, conn.Code) {
	st := Get(in, nil)
	if ended {
		st.flags |= PeerClosed
	}
	i, r, code := p.gate.Run(st, 0)
	Put(st)
	if r == Fail {
		p.C.refuse(p.gate[i].Kind, code)
	}
	return r, code
}

// GateExpired counts a conn whose held first bytes waited past Timeout() at
// the gate (RunGate said (WantRead, code)) and returns the code it ends with.
func (p *Policy) GateExpired() conn.Code {
	p.C.refuse(p.gate[0].Kind, conn.CodeHandshakeTimeout)
	return conn.CodeHandshakeTimeout
}

// Expired says how a conn whose incoming chain ran out of time ends: a
// health conn that was answered ends as served (CodeHealth), any other as
// CodeHandshakeTimeout, counted on the step it was waiting in.
func (p *Policy) Expired(st *State) conn.Code {
	if st.flags&Replied != 0 {
		return conn.CodeHealth
	}
	k := KindSession
	if !st.outDone && int(st.idx) < len(p.in) {
		k = p.in[st.idx].Kind
	}
	p.C.refuse(k, conn.CodeHandshakeTimeout)
	return conn.CodeHandshakeTimeout
}

// Refuse counts a conn the session step closed (a draining daemon, a rule
// with no backend).
func (p *Policy) Refuse(code conn.Code) { p.C.refuse(KindSession, code) }

// ReleaseSlot gives back a maxconn slot; call it once, when a conn whose
// State had MaxConn ends.
func (p *Policy) ReleaseSlot() {
	if p.front != nil {
		p = p.front // a route's conns hold the key's slots
	}
	p.inUse.Add(-1)
}

// Ended counts a conn of the rule that ended, by its code.
func (p *Policy) Ended(code conn.Code) {
	if int(code) < codeSlots {
		p.C.ended[code].Add(1)
	}
}
