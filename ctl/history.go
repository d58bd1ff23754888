package ctl

// This file holds intent history: the last commits, read from the daemon's
// state dir through the Historian its Engine may implement. The server
// sends PIFS (the answer to the hello), reads RECENT, and answers HISTORY:
// one JSON object a commit, as history.jsonl stores it, oldest first.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
)

// Historian is implemented by an Engine whose commits are kept (the
// daemon's state dir). History returns the last n commits (n > 0), oldest
// first, each one JSON object; ErrNoState when nothing is kept.
type Historian interface {
	History(n int) ([]string, error)
}

// ErrNoState is a Historian's answer when the daemon keeps no state dir.
var ErrNoState = errors.New("the daemon keeps no state dir (set state.dir, or run it with --state DIR)")

// Bounds of intent history.
const (
	// MaxHistory is the most commits one HISTORY lists: a state dir keeps
	// no more (state.MaxHistory).
	MaxHistory = 1000
	// maxHistoryText bounds one entry's JSON: one entry fits one frame
	// with its chunk's fields. A longer one (a commit that rewrote a very
	// large table) is sent without its lines (shortEntry).
	maxHistoryText = MaxPayload - 64
)

// writeRecent writes RECENT: how many of the last commits to list.
func (fw *frameWriter) writeRecent(ver uint8, n int) error {
	fw.start(ver, MsgRecent)
	fw.count32(n, "commits")
	return fw.finish()
}

func decodeRecent(f frame) (int, error) {
	d := newDec(f)
	n := int(d.u32("commits"))
	return n, d.end()
}

// writeHistory writes HISTORY, chunked: each entry a u32 length and that
// much JSON.
func (fw *frameWriter) writeHistory(ver uint8, entries []string) error {
	c := chunker{fw: fw, ver: ver, typ: MsgHistory, head: []byte{}}
	for _, s := range entries {
		if len(s) > maxHistoryText {
			s = shortEntry(s)
		}
		if err := c.add(func(e *enc) {
			e.u32(uint32(len(s)))
			e.b = append(e.b, s...)
		}); err != nil {
			return err
		}
	}
	return c.end()
}

// shortEntry is an entry too long for a frame without its lines: its other
// fields, and "omitted" with how many lines were added, removed and
// changed.
func shortEntry(s string) string {
	var m map[string]json.RawMessage
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		return `{"omitted":"an entry too long for a frame, and not JSON"}`
	}
	omitted := map[string]int{}
	for _, k := range []string{"added", "removed", "changed"} {
		var l []json.RawMessage
		_ = json.Unmarshal(m[k], &l)
		omitted[k] = len(l)
		delete(m, k)
	}
	m["omitted"], _ = json.Marshal(omitted)
	b, _ := json.Marshal(m)
	return string(b)
}

func decodeHistoryChunk(f frame, out *[]string) (bool, error) {
	d := newDec(f)
	last := d.bool("last")
	n := d.count(int(d.u16("entry count")), maxChunkItems, 4, "entries")
	for i := 0; i < n && d.err == nil; i++ {
		l := d.u32("entry length")
		if d.err == nil && l > maxHistoryText {
			d.fail(CodeTooLarge, "an entry of %d bytes, at most %d allowed", l, maxHistoryText)
			break
		}
		if p := d.take(int(l), "entry"); d.err == nil {
			*out = append(*out, string(p))
		}
	}
	if len(*out) > MaxHistory {
		d.fail(CodeTooLarge, "HISTORY lists more than %d commits", MaxHistory)
	}
	return last, d.end()
}

// history serves intent history: PIFS, the client's RECENT, then HISTORY.
// RECENT 0 or more than MaxHistory asks for MaxHistory.
func (cc *ctlConn) history() error {
	f, err := cc.pifsThen(MsgRecent)
	if err != nil {
		return err
	}
	n, err := decodeRecent(f)
	if err != nil {
		return err
	}
	if n <= 0 || n > MaxHistory {
		n = MaxHistory
	}
	h, ok := cc.s.eng.(Historian)
	if !ok {
		return errorf(CodeNoState, "%v", ErrNoState)
	}
	entries, err := h.History(n)
	switch {
	case errors.Is(err, ErrNoState):
		return errorf(CodeNoState, "%v", err)
	case err != nil:
		return errorf(CodeInternal, "reading the history: %v", err)
	}
	return cc.send(func() error { return cc.w.writeHistory(cc.ver, entries) })
}

// History returns the last n commits (0: as many as the daemon keeps, at
// most MaxHistory), oldest first, each one JSON object, on a connection
// that said IntentHistory and read its Pifs. A daemon without a state dir
// answers an *Error with CodeNoState.
func (c *Client) History(ctx context.Context, n int) ([]string, error) {
	var out []string
	err := c.call(ctx, stepPifs, func() error {
		if c.intent != IntentHistory {
			return fmt.Errorf("ctl: History on a connection for %s", c.intent)
		}
		if n < 0 {
			return fmt.Errorf("ctl: History(%d): want 0 or more", n)
		}
		if err := c.send(func() error { return c.w.writeRecent(c.ver, n) }); err != nil {
			return err
		}
		for {
			f, err := c.expect(MsgHistory)
			if err != nil {
				return err
			}
			last, err := decodeHistoryChunk(f, &out)
			if err != nil {
				return err
			}
			if last {
				c.step = stepDone
				return nil
			}
		}
	})
	return out, err
}
