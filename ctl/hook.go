package ctl

import (
	"fmt"
	"io"
)

// Fault injection. A client that dies mid-transaction leaves the server
// between two steps: after one of its messages has arrived and before the
// server's answer has been read. The library's calls send a message and
// read its answer in one go (Load is steps 5 and 6, Apply 7 and 8), so a
// test that wants to vanish at the seam needs the hook below. Vanishing
// after a step the server sends is just a Close after the call that read it.

// OnSent is a test hook: fn runs once c has sent, whole and flushed, a
// message of type t — MsgClientHello, MsgLoad, MsgApply, MsgCommit or
// MsgRollback — and before c reads the server's answer to it. If fn returns
// an error, c closes its connection at once, as a client that vanished
// there would, and the call that sent the message fails with an error
// wrapping fn's. If fn blocks, c is held at that point (a test then kills
// the process, and the kernel closes the socket); if it returns nil, c goes
// on as usual.
//
// Call it right after Dial, before any other call; fn runs at most once.
func (c *Client) OnSent(t MsgType, fn func() error) error {
	switch t {
	case MsgClientHello, MsgLoad, MsgApply, MsgCommit, MsgRollback:
	default:
		return fmt.Errorf("ctl: OnSent(%s): not a message a client sends", t)
	}
	if c.step != stepDialed || c.err != nil || c.w.onFrame != nil {
		return fmt.Errorf("ctl: OnSent after the transaction started, or twice")
	}
	h := &sentHook{r: c.r.r, c: c, fn: fn}
	// The frame being queued is in c.w's buffer when onFrame runs: its type
	// is byte 3 of the header. A message is sent whole (and flushed) before
	// the client reads anything, so the first read after a frame of type t
	// is the seam.
	c.w.onFrame = func() {
		if MsgType(c.w.b[3]) == t {
			h.sent = true
		}
	}
	c.r.r = h
	return nil
}

// sentHook is the client's frame source while OnSent is armed.
type sentHook struct {
	r    io.Reader
	c    *Client
	fn   func() error
	sent bool // a frame of the awaited type was queued
	ran  bool
}

func (h *sentHook) Read(p []byte) (int, error) {
	if h.sent && !h.ran {
		h.ran = true
		if err := h.fn(); err != nil {
			h.c.conn.Close()
			return 0, fmt.Errorf("the client vanished after sending (test hook): %w", err)
		}
	}
	return h.r.Read(p)
}
