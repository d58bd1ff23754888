// Package handshake owns the Handler interface and the handlers that run on a
// conn before its bytes are forwarded. A conn carries an ordered chain of
// steps; the event loop runs the first handler, and the handler's Result says
// what happens next. No handler blocks; none has its own goroutine.
//
// A rule's chains are built once, by NewPolicy, from the orders in policy.go
// (inOrder, outOrder, gateOrder); a step the rule does not ask for is left
// out:
//
//	incoming: monitor, health, accept-proxy, rules, sni   (then the engine's session step)
//	outgoing: send-proxy, sni (the hello's bytes)         (once the backend is connected)
//	gate:     first-bytes (counted as accept-proxy)  (once forwarding, until done)
//
// monitor runs first so a balancer's probe from a monitor network gets its
// reply before any PROXY parsing; rules run after accept-proxy so they judge
// the client address the header carries. The gate checks the client's first
// bytes while the backend's already flow: a source accept-proxy did not trust
// may connect without a header, but may not send one.
//
// The per-conn state of the incoming and outgoing chains is a State, taken
// from a pool when the conn is accepted and given back when the session
// starts forwarding: an established session keeps none of it. The gate runs
// on a State borrowed for each run, so its handlers only peek.
//
// Adding a stage: a file with the handler and its constructor (a newX(r, p)
// returning nil when rule r does not ask for the stage), and one line in the
// order of its chain; a stage that needs its own counter label also gets a
// Kind below.
package handshake

import (
	"strconv"

	"github.com/sluice-proxy/sluice/conn"
)

// Result is what a handler asks of the loop.
type Result uint8

const (
	Done      Result = iota // finished: removed from the chain, the next one runs
	WantRead                // call again when the conn is readable
	WantWrite               // call again when the conn is writable
	Fail                    // close the conn; the code says why (counted as refused)
	Close                   // the conn's work is complete (a health reply): close it, the code says what it was
)

func (r Result) String() string {
	switch r {
	case Done:
		return "done"
	case WantRead:
		return "want-read"
	case WantWrite:
		return "want-write"
	case Fail:
		return "fail"
	case Close:
		return "close"
	}
	return "invalid"
}

// Handler advances one handshake step of the conn whose state is st.
//
// Return convention: (Done, CodeNone) when finished; (WantRead|WantWrite,
// CodeNone) to be called again on readiness (a gate handler holding bytes
// that may not wait long returns (WantRead, code): see Policy.RunGate);
// (Fail, code) to close the conn,
// code saying why; (Close, code) when the conn has been fully served (a
// health reply). A handler never blocks and must not keep st after it
// returns.
type Handler interface {
	Handshake(st *State) (Result, conn.Code)
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(st *State) (Result, conn.Code)

func (f HandlerFunc) Handshake(st *State) (Result, conn.Code) { return f(st) }

var _ Handler = HandlerFunc(nil)

// Kind names a step of the chains: it is the step label of the per-rule
// refusal counters, so the names are part of the metrics. Append only: the
// values index the counters.
type Kind uint8

const (
	KindMonitor     Kind = iota // 0
	KindHealth                  // 1
	KindAcceptProxy             // 2: accept-proxy and the first-bytes gate
	KindRules                   // 3
	KindSession                 // 4: the engine's session step: backend choice and connect
	KindSendProxy               // 5
	KindSNI                     // 6: the ClientHello read and the route choice, and its bytes replayed to the backend
	kindCount
)

var kindNames = [kindCount]string{
	KindMonitor:     "monitor",
	KindHealth:      "health",
	KindAcceptProxy: "accept-proxy",
	KindRules:       "rules",
	KindSession:     "session",
	KindSendProxy:   "send-proxy",
	KindSNI:         "sni",
}

func (k Kind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return "kind-" + strconv.Itoa(int(k))
}

// Step is one step of a chain: its handler and the kind its refusals and
// timeouts are counted under.
type Step struct {
	Kind Kind
	H    Handler
}

// Chain is an ordered list of steps.
type Chain []Step

// Run runs the chain on st from step i. It returns the index of the step
// that must be called again and its Result (WantRead or WantWrite),
// (len(ch), Done, CodeNone) when every step is done, or (i, Fail|Close,
// code) for the step that ended the conn.
func (ch Chain) Run(st *State, i int) (int, Result, conn.Code) {
	for ; i < len(ch); i++ {
		r, code := ch[i].H.Handshake(st)
		if r != Done {
			return i, r, code
		}
	}
	return i, Done, conn.CodeNone
}

// Kinds lists the kinds of the chain's steps, in order.
func (ch Chain) Kinds() []Kind {
	ks := make([]Kind, len(ch))
	for i, s := range ch {
		ks[i] = s.Kind
	}
	return ks
}
