// Package handshake owns the Handler interface and the handlers that run on a
// conn before its session starts. A conn carries an ordered chain; the event
// loop runs the first handler, and the handler's Result says what happens
// next. No handler blocks; none has its own goroutine.
//
// A rule's chains are built once, by NewPolicy, in a fixed order:
//
//	incoming: monitor, health, accept-proxy, rules   (then the engine's session step)
//	outgoing: send-proxy
//
// monitor runs first so a balancer's probe from a monitor network gets its
// reply before any PROXY parsing; rules run after accept-proxy so they judge
// the client address the header carries. The per-conn state of a chain is a
// State, taken from a pool when the conn is accepted and given back when the
// session starts forwarding: an established session keeps none of it.
package handshake

import "github.com/sluice-proxy/sluice/conn"

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
// CodeNone) to be called again on readiness; (Fail, code) to close the conn,
// code saying why; (Close, code) when the conn has been fully served (a
// health reply). A handler never blocks and must not keep st after it
// returns Fail or Close.
type Handler interface {
	Handshake(st *State) (Result, conn.Code)
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(st *State) (Result, conn.Code)

func (f HandlerFunc) Handshake(st *State) (Result, conn.Code) { return f(st) }

var _ Handler = HandlerFunc(nil)

// Chain is an ordered list of handlers.
type Chain []Handler

// Run runs the chain on st from handler i. It returns the index of the
// handler that must be called again and its Result (WantRead or WantWrite),
// (len(ch), Done, CodeNone) when every handler is done, or (i, Fail|Close,
// code) for the handler that ended the conn.
func (ch Chain) Run(st *State, i int) (int, Result, conn.Code) {
	for ; i < len(ch); i++ {
		r, code := ch[i].Handshake(st)
		if r != Done {
			return i, r, code
		}
	}
	return i, Done, conn.CodeNone
}
