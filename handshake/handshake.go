// Package handshake owns the Handler interface and the handlers that run on a
// conn before its session starts. A conn carries an ordered chain; the event
// loop runs the first handler, and the handler's Result says what happens
// next. Incoming chains run in this order: monitor, health, accept-proxy,
// rules, (tls), session. No handler blocks; none has its own goroutine.
//
// The engine runs an empty chain today; the handlers land with the PROXY
// protocol and health work.
package handshake

import "github.com/sluice-proxy/sluice/conn"

// Result is what a handler asks of the loop.
type Result uint8

const (
	Done      Result = iota // finished: removed from the chain, the next one runs
	WantRead                // call again when the conn is readable
	WantWrite               // call again when the conn is writable
	Fail                    // close the conn; the code says why
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
	}
	return "invalid"
}

// Handler advances one handshake step on c.
//
// Return convention: (Done, CodeNone) when finished; (WantRead|WantWrite,
// CodeNone) to be called again on readiness; (Fail, code) to close the conn,
// code saying why. A handler never blocks and must not keep c after Fail.
type Handler interface {
	Handshake(c *conn.Conn) (Result, conn.Code)
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(c *conn.Conn) (Result, conn.Code)

func (f HandlerFunc) Handshake(c *conn.Conn) (Result, conn.Code) { return f(c) }

var _ Handler = HandlerFunc(nil)

// Chain is an ordered list of handlers.
type Chain []Handler

// Run runs the chain on c from handler i. It returns the index of the
// handler that must be called again and its Result (WantRead or WantWrite),
// (len(ch), Done) when every handler is done, or (i, Fail) with the code.
func (ch Chain) Run(c *conn.Conn, i int) (int, Result, conn.Code) {
	for ; i < len(ch); i++ {
		r, code := ch[i].Handshake(c)
		if r != Done {
			return i, r, code
		}
	}
	return i, Done, conn.CodeNone
}
