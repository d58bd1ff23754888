package ctl

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"time"

	"github.com/sluice-proxy/sluice/rules"
)

// DefaultTimeout bounds a client call whose context has no deadline.
const DefaultTimeout = 30 * time.Second

// Options set up a client connection. The zero value asks for the newest
// version with a 30 s bound per call.
type Options struct {
	Name    string        // sent in the client hello, for the server's logs
	Version uint8         // the highest version to ask for; 0 = MaxVersion
	Timeout time.Duration // bound of a call whose context has no deadline; 0 = DefaultTimeout
}

// Client is one connection to a control socket: one transaction. Its
// methods follow the protocol's steps and must be called in order:
//
//	Dial (1) → Hello (2) → Status
//	                     → Pifs (3) [→ List (4) [→ Load (5, 6) [→ Apply (7, 8) → Commit | Rollback (9, 10)]]]
//
// Every call is bounded by its context, or by Options.Timeout when the
// context has no deadline. After an error the client is unusable: Close it.
// A Client is not safe for concurrent use; clients of several instances may
// be driven in lock-step from one goroutine or several.
type Client struct {
	path   string
	conn   net.Conn
	opt    Options
	r      frameReader
	buf    *bufio.Reader // r's buffer, whatever wraps it (hook.go)
	w      frameWriter
	server ServerHello
	ver    uint8
	intent Intent
	step   step
	next   *frame // the server's answer to the hello, kept for Status or Pifs
	pifs   []Pif
	order  []int // load order → the caller's index, for the errors of Load
	err    error
}

type step uint8

const (
	stepDialed step = iota
	stepHello
	stepPifs
	stepListed
	stepLoaded
	stepApplied
	stepDone
	stepWatching // WATCH sent: events follow
)

var stepNames = [...]string{"dialed", "hello", "pifs", "listed", "loaded", "applied", "done", "watching"}

// ErrClosed is returned by calls on a client whose connection ended.
var ErrClosed = errors.New("ctl: connection closed")

// Dial connects to the control socket at path and reads the server hello
// (step 1).
func Dial(ctx context.Context, path string, opt Options) (*Client, error) {
	if opt.Version == 0 {
		opt.Version = MaxVersion
	}
	if opt.Timeout <= 0 {
		opt.Timeout = DefaultTimeout
	}
	if opt.Name == "" {
		opt.Name = "sluice-ctl"
	}
	var d net.Dialer
	dctx, cancel := withDefault(ctx, opt.Timeout)
	defer cancel()
	conn, err := d.DialContext(dctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("ctl: %w", err)
	}
	c := &Client{path: path, conn: conn, opt: opt, ver: Version1}
	c.buf = bufio.NewReaderSize(conn, 64<<10)
	c.r.r = c.buf
	c.w.w = bufio.NewWriterSize(conn, 64<<10)
	err = c.call(ctx, stepDialed, func() error {
		f, err := c.expect(MsgHello)
		if err != nil {
			return err
		}
		h, err := decodeHello(f)
		if err != nil {
			return err
		}
		c.server = *h
		return nil
	})
	if err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

// QueryStatus dials the control socket at path, asks STATUS and hangs up:
// the one-shot read that monitoring scripts and tests need. It returns the
// status or the first error (dial, hello, status).
func QueryStatus(ctx context.Context, path string, opt Options) (*Status, error) {
	c, err := Dial(ctx, path, opt)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if err := c.Hello(ctx, IntentStatus); err != nil {
		return nil, err
	}
	return c.Status(ctx)
}

// Server returns the server hello: software, limits, features.
func (c *Client) Server() ServerHello { return c.server }

// Version returns the agreed protocol version: 1 until Hello has had its
// answer.
func (c *Client) Version() uint8 { return c.ver }

// Close ends the connection. Before Apply nothing has changed; after Apply
// and before Commit the server rolls back.
//
// A writer whose transaction has not ended (no Commit or Rollback answer)
// half-closes first and waits, at most Options.Timeout, for the server to
// close its end: by then the server has rolled back what was applied and
// freed the writer slot, so a transaction begun after Close returns (the
// next `sluice ctl` command of a script) is not told busy by this one.
func (c *Client) Close() error {
	if c.err == nil {
		c.err = ErrClosed
		if c.intent == IntentWrite && c.step < stepDone {
			c.awaitServerClose()
		}
	}
	return c.conn.Close()
}

// awaitServerClose half-closes the connection and reads, discarding, until
// the server closes its end or Options.Timeout passes.
func (c *Client) awaitServerClose() {
	cw, ok := c.conn.(interface{ CloseWrite() error })
	if !ok || cw.CloseWrite() != nil {
		return
	}
	_ = c.conn.SetReadDeadline(time.Now().Add(c.opt.Timeout))
	_, _ = io.Copy(io.Discard, c.buf)
}

// Hello says what the connection is for and asks for the upgrade to
// Options.Version (step 2). It reads the server's first answer, so a busy
// writer or a refused peer is known here, and so is the agreed version —
// without waiting for any timeout.
func (c *Client) Hello(ctx context.Context, intent Intent) error {
	return c.call(ctx, stepDialed, func() error {
		if !intent.Known() {
			return fmt.Errorf("ctl: unknown intent %d", intent)
		}
		if err := c.send(func() error {
			return c.w.writeClientHello(&ClientHello{Want: c.opt.Version, Intent: intent, Name: c.opt.Name})
		}); err != nil {
			return err
		}
		f, err := c.r.read()
		if err != nil {
			return c.readFailed(err)
		}
		if f.typ == MsgError {
			return c.serverError(f)
		}
		if f.ver < Version1 || f.ver > c.opt.Version {
			return errorf(CodeBadVersion, "the server answered in version %d; this client asked for at most %d", f.ver, c.opt.Version)
		}
		c.ver = f.ver
		c.intent = intent
		want := MsgPifs
		switch intent {
		case IntentStatus:
			want = MsgStatus
		case IntentStats:
			want = MsgStats
		case IntentReload: // SUMMARY, unless nothing was applied
			want = MsgReloaded
			if f.typ == MsgSummary {
				want = MsgSummary
			}
		case IntentConfirm:
			want = MsgCommitted
		case IntentRollback:
			want = MsgSummary
		}
		if f.typ != want {
			return errorf(CodeUnexpected, "the server answered the hello with %s, want %s", f.typ, want)
		}
		c.next = &frame{ver: f.ver, typ: f.typ, payload: slices.Clone(f.payload)}
		c.step = stepHello
		return nil
	})
}

// Status returns the daemon's status; the connection must have said
// IntentStatus.
func (c *Client) Status(ctx context.Context) (*Status, error) {
	var st *Status
	err := c.call(ctx, stepHello, func() error {
		if c.intent != IntentStatus {
			return fmt.Errorf("ctl: Status on a connection for %s", c.intent)
		}
		var err error
		st, err = decodeStatus(*c.next)
		c.next = nil
		c.step = stepDone
		return err
	})
	return st, err
}

// Pifs returns the daemon's pifs (step 3), host first.
func (c *Client) Pifs(ctx context.Context) ([]Pif, error) {
	err := c.call(ctx, stepHello, func() error {
		if c.intent == IntentStatus || c.intent == IntentStats {
			return fmt.Errorf("ctl: Pifs on a connection for %s", c.intent)
		}
		pifs, err := decodePifs(*c.next)
		c.next = nil
		if err != nil {
			return err
		}
		for i, p := range pifs {
			if p.Index != i {
				return errorf(CodeBadValue, "PIFS lists index %d at position %d", p.Index, i)
			}
		}
		if len(pifs) == 0 || pifs[0].Name != rules.HostPif {
			return errorf(CodeBadValue, "PIFS does not start with %q", rules.HostPif)
		}
		c.pifs = pifs
		c.step = stepPifs
		if c.intent == IntentPifs {
			c.step = stepDone
		}
		return nil
	})
	return slices.Clone(c.pifs), err
}

// Table is the active table as step 4 sends it.
type Table struct {
	Generation uint64
	Lines      []string // canonical rule lines, one pif at a time
}

// Rules parses the table's lines.
func (t *Table) Rules() ([]*rules.Rule, error) {
	rs := make([]*rules.Rule, len(t.Lines))
	for i, l := range t.Lines {
		r, err := rules.Parse(l)
		if err != nil {
			return nil, fmt.Errorf("ctl: the server listed a rule that does not parse: %q: %w", l, err)
		}
		rs[i] = r
	}
	return rs, nil
}

// List returns the active table and its generation (step 4).
func (c *Client) List(ctx context.Context) (*Table, error) {
	t := &Table{}
	err := c.call(ctx, stepPifs, func() error {
		first := true
		prev := uint16(0)
		for {
			f, err := c.expect(MsgRules)
			if err != nil {
				return err
			}
			ch, err := decodeTableChunk(f)
			if err != nil {
				return err
			}
			switch {
			case first:
				t.Generation = ch.gen
			case ch.gen != t.Generation:
				return errorf(CodeBadValue, "RULES chunk on generation %d after %d", ch.gen, t.Generation)
			case ch.pif < prev:
				return errorf(CodeBadValue, "RULES chunk for pif %d after pif %d", ch.pif, prev)
			}
			if int(ch.pif) >= len(c.pifs) {
				return errorf(CodeUnknownPif, "RULES chunk for pif %d, PIFS listed %d", ch.pif, len(c.pifs))
			}
			if len(t.Lines)+len(ch.lines) > rules.MaxRules {
				return errorf(CodeTooLarge, "the server listed more than %d rules", rules.MaxRules)
			}
			first, prev = false, ch.pif
			t.Lines = append(t.Lines, ch.lines...)
			if ch.last {
				break
			}
		}
		c.step = stepListed
		if c.intent == IntentList || c.intent == IntentListPending {
			c.step = stepDone
		}
		return nil
	})
	return t, err
}

// Load sends the new table, built on generation base (the one List gave),
// and returns the server's validation (steps 5 and 6). Rules are sent one
// pif at a time; an *Error naming a rule has its Index in rs's order.
func (c *Client) Load(ctx context.Context, base uint64, rs []*rules.Rule) (*Loaded, error) {
	var ld *Loaded
	err := c.call(ctx, stepListed, func() error {
		if c.intent != IntentWrite {
			return fmt.Errorf("ctl: Load on a connection for %s", c.intent)
		}
		index := make(map[string]uint16, len(c.pifs))
		for _, p := range c.pifs {
			index[rules.ModelPif(p.Name)] = uint16(p.Index)
		}
		lines := make([]tableLine, len(rs))
		c.order = make([]int, len(rs))
		for i, r := range rs {
			pi, ok := index[r.ListenPif]
			if !ok {
				return &Error{Code: CodeUnknownPif, Index: i, Rule: r.String(), Msg: fmt.Sprintf("pif %q: the daemon has no such pif", r.ListenPif)}
			}
			lines[i] = tableLine{pif: pi, line: r.String()}
			c.order[i] = i
		}
		// One pif at a time; order within a pif kept.
		slices.SortStableFunc(c.order, func(a, b int) int { return int(lines[a].pif) - int(lines[b].pif) })
		sorted := make([]tableLine, len(lines))
		for k, i := range c.order {
			sorted[k] = lines[i]
		}
		if err := c.send(func() error { return c.w.writeTable(c.ver, MsgLoad, base, sorted) }); err != nil {
			return c.inCallerOrder(err)
		}
		f, err := c.expect(MsgLoaded)
		if err != nil {
			return c.inCallerOrder(err)
		}
		if ld, err = decodeLoaded(f); err != nil {
			return err
		}
		c.step = stepLoaded
		return nil
	})
	return ld, err
}

// Apply swaps the tables and syncs sockets (step 7) and returns the bind
// summary (step 8). confirm is the confirm timeout: with no Commit within
// it the server rolls back by itself; 0 asks for the server's default.
func (c *Client) Apply(ctx context.Context, confirm time.Duration) (*Summary, error) {
	var s *Summary
	err := c.call(ctx, stepLoaded, func() error {
		if confirm < 0 {
			return fmt.Errorf("ctl: negative confirm timeout %s", confirm)
		}
		ms := confirm.Milliseconds()
		if confirm > 0 && ms == 0 {
			ms = 1
		}
		if ms > 0xffffffff {
			return fmt.Errorf("ctl: confirm timeout %s does not fit the protocol", confirm)
		}
		if err := c.send(func() error { return c.w.writeApply(c.ver, uint32(ms)) }); err != nil {
			return err
		}
		var err error
		if s, err = c.readSummary(); err != nil {
			return err
		}
		c.step = stepApplied
		return nil
	})
	return s, err
}

// Commit makes the applied table the active one (step 9) and returns its
// generation.
func (c *Client) Commit(ctx context.Context) (uint64, error) {
	var gen uint64
	err := c.call(ctx, stepApplied, func() error {
		if err := c.send(func() error { return c.w.writeEmpty(c.ver, MsgCommit) }); err != nil {
			return err
		}
		f, err := c.expect(MsgCommitted)
		if err != nil {
			return err
		}
		if gen, err = decodeCommitted(f); err != nil {
			return err
		}
		c.step = stepDone
		return nil
	})
	return gen, err
}

// Rollback restores the table that was active before Apply (step 9) and
// returns the summary of the restored table.
func (c *Client) Rollback(ctx context.Context) (*Summary, error) {
	var s *Summary
	err := c.call(ctx, stepApplied, func() error {
		if err := c.send(func() error { return c.w.writeEmpty(c.ver, MsgRollback) }); err != nil {
			return err
		}
		var err error
		if s, err = c.readSummary(); err != nil {
			return err
		}
		c.step = stepDone
		return nil
	})
	return s, err
}

// inCallerOrder turns the load-order Index of a server error into the
// index in the rules Load was given.
func (c *Client) inCallerOrder(err error) error {
	var e *Error
	if errors.As(err, &e) && e.Index >= 0 && e.Index < len(c.order) {
		e.Index = c.order[e.Index]
	}
	return err
}

func (c *Client) readSummary() (*Summary, error) { return c.readSummaryFrom(nil) }

// readSummaryFrom reads a SUMMARY whose first frame, when not nil, was
// read already (the answer to a hello).
func (c *Client) readSummaryFrom(first *frame) (*Summary, error) {
	s := &Summary{Detail: c.ver >= Version2}
	var head *summaryChunk
	for {
		var f frame
		var err error
		if first != nil {
			f, first = *first, nil
		} else if f, err = c.expect(MsgSummary); err != nil {
			return nil, err
		}
		ch, err := decodeSummaryChunk(f)
		if err != nil {
			return nil, err
		}
		if head == nil {
			head = ch
			s.Generation, s.OK, s.Kept, s.Added, s.Removed = ch.gen, ch.ok, ch.kept, ch.added, ch.removed
			s.Rules = make([]RuleResult, 0, min(ch.total, rules.MaxRules))
		} else if ch.gen != head.gen || ch.ok != head.ok || ch.kept != head.kept || ch.added != head.added ||
			ch.removed != head.removed || ch.total != head.total {
			return nil, errorf(CodeBadValue, "SUMMARY chunks disagree on their fixed fields")
		}
		if len(s.Rules)+len(ch.results) > head.total {
			return nil, errorf(CodeBadValue, "SUMMARY has more results than the %d it announced", head.total)
		}
		s.Rules = append(s.Rules, ch.results...)
		if ch.last {
			break
		}
	}
	if len(s.Rules) != head.total {
		return nil, errorf(CodeBadValue, "SUMMARY announced %d results and carried %d", head.total, len(s.Rules))
	}
	return s, nil
}

// call runs one step: it checks the order, bounds the I/O by ctx (or the
// default timeout) and makes any error stick.
func (c *Client) call(ctx context.Context, want step, fn func() error) error {
	if c.err != nil {
		return c.err
	}
	if c.step != want {
		return fmt.Errorf("ctl: call out of order: the transaction is at %q, this call needs %q", stepNames[c.step], stepNames[want])
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	dl, hasDeadline := ctx.Deadline()
	if !hasDeadline {
		dl = time.Now().Add(c.opt.Timeout)
	}
	_ = c.conn.SetDeadline(dl)
	stop := context.AfterFunc(ctx, func() { _ = c.conn.SetDeadline(time.Unix(1, 0)) })
	err := fn()
	stop()
	if err != nil {
		switch {
		case errors.As(err, new(*Error)):
		case ctx.Err() != nil:
			err = fmt.Errorf("ctl: %w (%v)", ctx.Err(), err)
		case errors.Is(err, os.ErrDeadlineExceeded) && hasDeadline:
			// The conn's deadline is ctx's and fired first.
			err = fmt.Errorf("ctl: %w (%v)", context.DeadlineExceeded, err)
		case errors.Is(err, os.ErrDeadlineExceeded):
			err = fmt.Errorf("ctl: no answer within %s: %w", c.opt.Timeout, err)
		}
		c.err = err
		c.conn.Close()
	}
	return err
}

// expect reads the next frame: typ, or an ERROR returned as *Error.
func (c *Client) expect(typ MsgType) (frame, error) {
	f, err := c.r.read()
	if err != nil {
		return frame{}, c.readFailed(err)
	}
	if f.typ == MsgError {
		return frame{}, c.serverError(f)
	}
	if f.ver != c.ver {
		return frame{}, errorf(CodeBadVersion, "%s frame in version %d, the connection speaks %d", f.typ, f.ver, c.ver)
	}
	if f.typ != typ {
		return frame{}, errorf(CodeUnexpected, "the server sent %s, want %s", f.typ, typ)
	}
	return f, nil
}

func (c *Client) serverError(f frame) error {
	e, err := decodeError(f)
	if err != nil {
		return err
	}
	return e
}

func (c *Client) readFailed(err error) error {
	if errors.Is(err, io.EOF) {
		return fmt.Errorf("ctl: %s: the server closed the connection", c.path)
	}
	return fmt.Errorf("ctl: %s: %w", c.path, err)
}

// send encodes a message with write and sends it. An encoding error is
// returned as is (the message may be partly queued: the caller's error
// closes the connection). A failed write is explained: the server may have
// sent an ERROR and closed (a load refused half-way), and that error is
// the one to report.
func (c *Client) send(write func() error) error {
	if err := write(); err != nil {
		return err
	}
	if err := c.w.flush(); err != nil {
		if f, rerr := c.r.read(); rerr == nil && f.typ == MsgError {
			return c.serverError(f)
		}
		return fmt.Errorf("ctl: %s: %w", c.path, err)
	}
	return nil
}

func withDefault(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, d)
}
