package ctl

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/rules"
)

// One transaction across several instances (docs/ctl-protocol.md, "One
// transaction across instances"). BIND 10 msgq's one-to-many paradigm: the
// caller holds one Member per instance, each with its own connection, its
// own state and its own error; a step is one call per live member, and its
// answer is recorded on that member only. Nothing is broadcast, and no
// answer is ever matched against a list of members taken earlier.
//
//	hello → list → load (validate) ─┬─ dry run: close all, nothing changed
//	                                └─ apply → every verdict good (or Force)?
//	                                     ├─ no: rollback on all
//	                                     └─ check → commit, one member after another
//
// Every step but commit runs on all live members at once, one goroutine per
// member, each call bounded by Options.Timeout. A member that fails a step
// (an error, a disconnect, no answer in time) stops the transaction there:
// before apply every connection is closed and nothing has changed; from
// apply on, every member that applied is rolled back, and the failed one,
// whose connection is dropped, rolls back by the protocol's own rule (a
// disconnect between APPLY and COMMIT is a rollback on that server).

// Step is a step of a transaction across instances, as one member goes
// through it.
type Step uint8

const (
	StepHello    Step = iota + 1 // connect, server hello, client hello with intent write: the writer slot is held
	StepList                     // pifs and the active table
	StepLoad                     // the member's new table built from its own, loaded and validated
	StepApply                    // apply and the bind summary
	StepCheck                    // before any commit: the transaction is still open and the daemon answers
	StepCommit                   // commit, one member after another
	StepRollback                 // rollback of every member that applied
	stepCount                    // not a step: one past the last, for the test that names them all
)

var stepText = [...]string{"", "hello", "list", "load", "apply", "check", "commit", "rollback"}

func (s Step) String() string {
	if int(s) < len(stepText) && s != 0 {
		return stepText[s]
	}
	return fmt.Sprintf("step-%d", s)
}

// MarshalText names the step in JSON.
func (s Step) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// Outcome is what a transaction left on a member, as far as the client
// knows, or (MultiResult.Outcome) on all of them.
type Outcome uint8

const (
	// OutcomePending: the member is still in the transaction (seen only
	// from MultiOptions.Between).
	OutcomePending Outcome = iota
	// OutcomeUnchanged: the transaction ended on this member before its
	// apply took effect — the connection was closed before APPLY (the
	// daemon discards the shadow), or the daemon refused the APPLY. Its old
	// table is active.
	OutcomeUnchanged
	// OutcomeCommitted: the daemon answered COMMITTED.
	OutcomeCommitted
	// OutcomeRolledBack: the table was applied and the daemon rolled it
	// back and said so (the rollback's SUMMARY, or an ERROR after the apply:
	// commit-failed, confirm-timeout, shutting-down).
	OutcomeRolledBack
	// OutcomeReleased: APPLY was sent and the connection was dropped
	// without a COMMIT (no answer in time, a disconnect, a failed check).
	// By the protocol the daemon rolls back (a dead daemon has nothing to
	// roll back: restarted, it serves its last committed table — its state
	// dir's, or without one its configured table); the client has no answer
	// that confirms it.
	OutcomeReleased
	// OutcomeInDoubt: COMMIT was sent and not answered (or the daemon said
	// its rollback failed): the new table may be active. The daemon's
	// generation tells: Summary.Generation means committed.
	OutcomeInDoubt
	// OutcomePartial, for the whole transaction only: some members
	// committed and others did not, or one is in doubt.
	OutcomePartial
	outcomeCount // not an outcome: one past the last, for the test that names them all
)

var outcomeText = [...]string{"pending", "unchanged", "committed", "rolled-back", "released", "in-doubt", "partial"}

func (o Outcome) String() string {
	if int(o) < len(outcomeText) {
		return outcomeText[o]
	}
	return fmt.Sprintf("outcome-%d", o)
}

// MarshalText names the outcome in JSON.
func (o Outcome) MarshalText() ([]byte, error) { return []byte(o.String()), nil }

// Decision is what a writing transaction does once its bind summaries are
// in. It is the one rule for every writer: the one-socket `sluice ctl`, a
// transaction across instances (Multi) and the daemon's initial table.
type Decision uint8

const (
	DecideCommit   Decision = iota + 1 // every verdict good: commit
	DecideForce                        // a verdict bad, committed anyway (--force)
	DecideRollback                     // a verdict bad: roll back
	decisionEnd                        // past the last: the names test stops here
)

var decisionText = [...]string{"", "commit", "force", "rollback"}

func (d Decision) String() string {
	if int(d) < len(decisionText) && d != 0 {
		return decisionText[d]
	}
	return fmt.Sprintf("decision-%d", d)
}

// Commits reports whether the transaction goes on to its commit.
func (d Decision) Commits() bool { return d == DecideCommit || d == DecideForce }

// Decide returns what a transaction whose verdict (every bind summary OK)
// is verdict does: commit when good, else commit anyway when force, else
// roll back. A dry run never gets here: it ends after the load.
func Decide(verdict, force bool) Decision {
	switch {
	case verdict:
		return DecideCommit
	case force:
		return DecideForce
	}
	return DecideRollback
}

// Timing is how long one member took over one step.
type Timing struct {
	Step Step
	Took time.Duration
}

// Member is one instance of a transaction across instances: its own
// connection and everything it answered. Only the goroutine running the
// member's current step touches it; read it after Multi returns.
type Member struct {
	Index int    // position in the paths given to Multi
	Path  string // the control socket

	Outcome Outcome
	Reached Step  // the last step this member completed
	Failed  Step  // the step it failed at; 0 = none
	Err     error // why it failed

	Base     *Table   // the active table read at StepList, and its generation
	Loaded   *Loaded  // the validation of its new table
	Summary  *Summary // the bind summary of its apply
	Restored *Summary // after a rollback: the restored table's summary
	Gen      uint64   // after a commit: the new generation
	Timings  []Timing // one per step the member took part in

	c *Client
}

// Report describes the member's end in one line: "PATH: committed
// generation 4", "PATH: FAILED at check: …; not committed: …".
func (m *Member) Report() string {
	var b strings.Builder
	b.WriteString(m.Path)
	b.WriteString(": ")
	if m.Err != nil {
		fmt.Fprintf(&b, "FAILED at %s", m.Failed)
		if m.Failed == StepCheck {
			b.WriteString(" (after apply, before any commit)")
		}
		fmt.Fprintf(&b, ": %v; ", m.Err)
	}
	switch m.Outcome {
	case OutcomeCommitted:
		fmt.Fprintf(&b, "committed generation %d", m.Gen)
	case OutcomeRolledBack:
		b.WriteString("rolled back")
		if m.Restored != nil {
			fmt.Fprintf(&b, "; generation %d is still active", m.Restored.Generation)
		} else {
			b.WriteString(" by the daemon, which said so")
		}
	case OutcomeUnchanged:
		b.WriteString("nothing changed")
		if m.Base != nil {
			fmt.Fprintf(&b, "; generation %d is still active", m.Base.Generation)
		}
	case OutcomeReleased:
		b.WriteString("not committed: the connection was dropped after APPLY, so the daemon rolls back by itself (a dead one, restarted, serves its last committed table)")
	case OutcomeInDoubt:
		b.WriteString("IN DOUBT: the new table may be active")
		if m.Summary != nil && m.Base != nil {
			fmt.Fprintf(&b, " (sluice ctl -s %s status: generation %d = committed, %d = not)", m.Path, m.Summary.Generation, m.Base.Generation)
		}
	default:
		b.WriteString(m.Outcome.String())
	}
	return b.String()
}

// MultiOptions set up a transaction across instances.
type MultiOptions struct {
	// Options of each member's connection; Timeout bounds each member's
	// part of each step (0 = DefaultTimeout).
	Options
	// Confirm is the confirm timeout each APPLY asks for: a member that
	// sees no COMMIT within it rolls back by itself. 0 = (2 + members) ×
	// Timeout, at most MaxConfirm: room for the check and for every commit,
	// which run one after another.
	Confirm time.Duration
	// Force commits even when a verdict is bad.
	Force bool
	// DryRun stops after the load: every member validated its table,
	// nothing changed anywhere.
	DryRun bool
	// Between, when set, is called on Multi's goroutine before each step
	// starts, while no call to any member is in flight. It is for progress
	// reports and for tests that stop or kill a member at an exact point of
	// the transaction (before StepCheck: after every apply, before any
	// commit). It must not touch the members' connections.
	Between func(next Step)
}

// MultiResult is a transaction across instances, member by member.
type MultiResult struct {
	Members []*Member // in the order of the paths
	Outcome Outcome   // for all: unchanged, committed, rolled-back or partial
	Verdict bool      // every member applied and every verdict was good
	Forced  bool      // committed although a verdict was bad (Force)
	// Stopped is the step where the transaction stopped short: the first
	// step a member failed, or StepApply when a verdict was bad; 0 when it
	// ran to its end (committed everywhere, or a dry run).
	Stopped Step
}

// Failed returns the members that failed, in order.
func (r *MultiResult) Failed() []*Member {
	var out []*Member
	for _, m := range r.Members {
		if m.Err != nil {
			out = append(out, m)
		}
	}
	return out
}

// Multi runs one writing transaction across the instances at paths. build
// makes each member's new table from that member's own active table
// (m.Base); it is called concurrently, once per member. Multi returns an
// error only for bad arguments; what happened is in the result, whose
// members are closed.
func Multi(ctx context.Context, paths []string, opt MultiOptions, build func(m *Member) ([]*rules.Rule, error)) (*MultiResult, error) {
	if len(paths) == 0 {
		return nil, errors.New("ctl: a transaction across instances needs at least one control socket")
	}
	if build == nil {
		return nil, errors.New("ctl: no table builder")
	}
	seen := make(map[string]bool, len(paths))
	for _, p := range paths {
		if seen[p] {
			return nil, fmt.Errorf("ctl: control socket %s given twice", p)
		}
		seen[p] = true
	}
	if opt.Timeout <= 0 {
		opt.Timeout = DefaultTimeout
	}
	if opt.Confirm == 0 {
		opt.Confirm = min(MaxConfirm, time.Duration(2+len(paths))*opt.Timeout)
	}
	if opt.Confirm < 0 || opt.Confirm > MaxConfirm {
		return nil, fmt.Errorf("ctl: confirm timeout %s: want more than 0 and at most %s", opt.Confirm, MaxConfirm)
	}
	res := &MultiResult{Members: make([]*Member, len(paths))}
	for i, p := range paths {
		res.Members[i] = &Member{Index: i, Path: p}
	}
	r := &multi{opt: opt, res: res}
	r.run(ctx, build)
	r.end()
	return res, nil
}

type multi struct {
	opt MultiOptions
	res *MultiResult
}

func (r *multi) run(ctx context.Context, build func(*Member) ([]*rules.Rule, error)) {
	all := r.res.Members
	if !r.step(ctx, StepHello, all, r.hello) ||
		!r.step(ctx, StepList, all, r.list) ||
		!r.step(ctx, StepLoad, all, func(ctx context.Context, m *Member) error {
			rs, err := build(m)
			if err != nil {
				return err
			}
			m.Loaded, err = m.c.Load(ctx, m.Base.Generation, rs)
			return err
		}) {
		return // end closes every connection: nothing changed
	}
	if r.opt.DryRun {
		return
	}
	if !r.step(ctx, StepApply, all, r.apply) {
		r.rollback(ctx)
		return
	}
	r.res.Verdict = true
	for _, m := range all {
		r.res.Verdict = r.res.Verdict && m.Summary.OK
	}
	d := Decide(r.res.Verdict, r.opt.Force)
	if !d.Commits() {
		r.res.Stopped = StepApply
		r.rollback(ctx)
		return
	}
	if !r.step(ctx, StepCheck, all, r.check) {
		r.rollback(ctx)
		return
	}
	r.res.Forced = d == DecideForce
	r.commit(ctx)
}

// step runs fn on every live member at once, each in its own goroutine
// with its own deadline, and records each member's answer on that member.
// It reports whether every one succeeded; the first step with a failure
// is the transaction's Stopped.
func (r *multi) step(ctx context.Context, s Step, ms []*Member, fn func(context.Context, *Member) error) bool {
	live := liveMembers(ms)
	if len(live) == 0 {
		return true
	}
	if r.opt.Between != nil {
		r.opt.Between(s)
	}
	var wg sync.WaitGroup
	for _, m := range live {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.call(ctx, s, m, fn)
		}()
	}
	wg.Wait()
	ok := true
	for _, m := range live {
		ok = ok && m.Err == nil
	}
	if !ok && r.res.Stopped == 0 {
		r.res.Stopped = s
	}
	return ok
}

// call runs one member's part of step s, bounded by the timeout, and
// records the time it took, the step reached or the failure and what it
// left on the member.
func (r *multi) call(ctx context.Context, s Step, m *Member, fn func(context.Context, *Member) error) {
	cctx, cancel := context.WithTimeout(ctx, r.opt.Timeout)
	defer cancel()
	start := time.Now()
	err := fn(cctx, m)
	m.Timings = append(m.Timings, Timing{Step: s, Took: time.Since(start)})
	if err == nil {
		m.Reached = s
		return
	}
	m.Failed, m.Err = s, err
	m.Outcome = failedOutcome(s, err)
	if m.c != nil {
		m.c.Close() // after APPLY: the daemon rolls back by itself
	}
}

// failedOutcome is what a failure at step s leaves on the member.
func failedOutcome(s Step, err error) Outcome {
	code := CodeOf(err)
	switch s {
	case StepHello, StepList, StepLoad:
		return OutcomeUnchanged
	case StepApply:
		switch code {
		case 0:
			return OutcomeReleased // APPLY may have been read: the disconnect rolls it back
		case CodeInternal:
			return OutcomeRolledBack
		}
		return OutcomeUnchanged // the daemon refused the APPLY
	case StepCommit:
		if code == 0 {
			return OutcomeInDoubt
		}
		return OutcomeRolledBack // every ERROR after an apply follows a rollback
	case StepRollback:
		switch code {
		case 0:
			return OutcomeReleased // ROLLBACK or a disconnect: both roll back
		case CodeRollbackFailed:
			return OutcomeInDoubt
		}
		return OutcomeRolledBack
	}
	if code != 0 {
		return OutcomeRolledBack
	}
	return OutcomeReleased
}

func liveMembers(ms []*Member) []*Member {
	var live []*Member
	for _, m := range ms {
		if m.Err == nil && m.Outcome == OutcomePending {
			live = append(live, m)
		}
	}
	return live
}

func (r *multi) hello(ctx context.Context, m *Member) error {
	c, err := Dial(ctx, m.Path, r.opt.Options)
	if err != nil {
		return err
	}
	m.c = c
	if !c.Server().Has(FeatureTxn) {
		return fmt.Errorf("ctl: the daemon does not serve transactions (feature %q missing)", FeatureTxn)
	}
	return c.Hello(ctx, IntentWrite)
}

func (r *multi) list(ctx context.Context, m *Member) error {
	if _, err := m.c.Pifs(ctx); err != nil {
		return err
	}
	t, err := m.c.List(ctx)
	if err != nil {
		return err
	}
	m.Base = t
	return nil
}

func (r *multi) apply(ctx context.Context, m *Member) error {
	s, err := m.c.Apply(ctx, r.opt.Confirm)
	if err != nil {
		return err
	}
	m.Summary = s
	return nil
}

// check is the last step before any commit. The transaction's own
// connection must still be open with nothing sent (a daemon speaks there
// before COMMIT only to say it rolled back); and the daemon must answer a
// status request on a second connection within the timeout and report a
// writing transaction open on the generation this one was built on. A member
// that died or hung after its apply is found here, while every member can
// still roll back.
func (r *multi) check(ctx context.Context, m *Member) error {
	if err := m.c.idle(); err != nil {
		return err
	}
	opt := r.opt.Options
	opt.Name = "sluice ctl (check)"
	st, err := QueryStatus(ctx, m.Path, opt)
	if err != nil {
		// %v: the probe's error codes are not this transaction's.
		return fmt.Errorf("ctl: the daemon did not answer a status request: %v", err)
	}
	switch {
	case !st.Writer:
		return errors.New("ctl: the daemon holds no writing transaction: this one has ended")
	case st.Generation != m.Base.Generation:
		return fmt.Errorf("ctl: the daemon is at generation %d, the transaction was built on %d", st.Generation, m.Base.Generation)
	}
	return nil
}

// idle checks, without waiting, that the server has neither closed the
// connection nor sent anything since the bind summary. Anything it sent
// (an ERROR) is read and returned.
func (c *Client) idle() error {
	if c.err != nil {
		return c.err
	}
	if c.step != stepApplied {
		return fmt.Errorf("ctl: idle check at %q, want %q", stepNames[c.step], stepNames[stepApplied])
	}
	fail := func(err error) error {
		c.err = err
		c.conn.Close()
		return err
	}
	if c.buf.Buffered() == 0 {
		sc, ok := c.conn.(syscall.Conn)
		if !ok {
			return fail(errors.New("ctl: the connection cannot be checked"))
		}
		raw, err := sc.SyscallConn()
		if err != nil {
			return fail(fmt.Errorf("ctl: %s: %w", c.path, err))
		}
		var n int
		var perr error
		if err := raw.Read(func(fd uintptr) bool {
			var b [1]byte
			n, _, perr = unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
			return true // never wait for readiness
		}); err != nil {
			return fail(fmt.Errorf("ctl: %s: %w", c.path, err))
		}
		switch {
		case errors.Is(perr, unix.EAGAIN):
			return nil // open, and silent, as it should be
		case perr != nil:
			return fail(fmt.Errorf("ctl: %s: %w", c.path, perr))
		case n == 0:
			return fail(fmt.Errorf("ctl: %s: the server closed the connection", c.path))
		}
	}
	// The server spoke: its frame is here or arriving; read it in time.
	_ = c.conn.SetReadDeadline(time.Now().Add(c.opt.Timeout))
	f, err := c.r.read()
	switch {
	case err != nil:
		return fail(c.readFailed(err))
	case f.typ == MsgError:
		return fail(c.serverError(f))
	}
	return fail(errorf(CodeUnexpected, "the server sent %s before the commit", f.typ))
}

// commit commits the members one after another, in order: a failure stops
// there, and every member not yet committed is rolled back. Committing in
// turn bounds the harm of a member that fails at its commit to the members
// committed before it (none, when the first one fails).
func (r *multi) commit(ctx context.Context) {
	if r.opt.Between != nil {
		r.opt.Between(StepCommit)
	}
	for _, m := range liveMembers(r.res.Members) {
		r.call(ctx, StepCommit, m, func(ctx context.Context, m *Member) error {
			gen, err := m.c.Commit(ctx)
			if err != nil {
				return err
			}
			m.Gen, m.Outcome = gen, OutcomeCommitted
			return nil
		})
		if m.Err != nil {
			r.res.Stopped = StepCommit
			r.rollback(ctx)
			return
		}
	}
}

// rollback rolls back every live member that applied, at once.
func (r *multi) rollback(ctx context.Context) {
	var applied []*Member
	for _, m := range liveMembers(r.res.Members) {
		if m.Summary != nil {
			applied = append(applied, m)
		}
	}
	r.step(ctx, StepRollback, applied, func(ctx context.Context, m *Member) error {
		s, err := m.c.Rollback(ctx)
		if err != nil {
			return err
		}
		m.Restored, m.Outcome = s, OutcomeRolledBack
		return nil
	})
}

// end closes every connection and settles the outcomes: a member still
// pending never applied (its connection closes before APPLY) or, having
// applied, is dropped without a commit.
func (r *multi) end() {
	var committed, unchanged, doubt int
	for _, m := range r.res.Members {
		if m.c != nil {
			m.c.Close()
		}
		if m.Outcome == OutcomePending {
			m.Outcome = OutcomeUnchanged
			if m.Summary != nil {
				m.Outcome = OutcomeReleased
			}
		}
		switch m.Outcome {
		case OutcomeCommitted:
			committed++
		case OutcomeUnchanged:
			unchanged++
		case OutcomeInDoubt:
			doubt++
		}
	}
	n := len(r.res.Members)
	switch {
	case committed == n:
		r.res.Outcome = OutcomeCommitted
	case unchanged == n:
		r.res.Outcome = OutcomeUnchanged
	case committed == 0 && doubt == 0:
		r.res.Outcome = OutcomeRolledBack
	default:
		r.res.Outcome = OutcomePartial
	}
}
