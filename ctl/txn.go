package ctl

// This file holds the writing transaction (intent write, steps 3 to 10 of
// docs/ctl-protocol.md): the writer slot, the load into the shadow table,
// apply, the bind summary, commit or rollback under the confirm timeout;
// and TxnObserver, which hears how each one ended.
//
// The writer slot is Server.writer: at most one writeTxn holds it. It is taken
// before step 3 (a second writer is told busy, never made to wait) and
// freed once the engine has no pending apply: right after the commit or the
// asked-for rollback, before their answer is sent, or else when run
// returns.
//
// Invariant, step by step: what a disconnect (or any error: a timeout, a
// protocol error, the server closing) at each step leaves behind.
//
//	3, 4  PIFS, RULES sent       nothing changed: no shadow yet
//	5     LOAD read, checked     shadow discarded, nothing changed
//	6     LOADED sent            shadow discarded, nothing changed
//	7     APPLY read             a close here is the dry run: shadow discarded, nothing changed;
//	                             a bad confirm timeout or a refused Engine.Apply: nothing changed
//	      Engine.Apply done      pending: from here every way out but a commit rolls back
//	8     SUMMARY sent           rolled back
//	9     COMMIT/ROLLBACK read   rolled back; past the confirm timeout: rolled back, ERROR confirm-timeout;
//	                             a failed Engine.Commit: rolled back, ERROR commit-failed
//	10    COMMITTED sent         the commit stands (pending cleared before the answer)
//	      rollback's SUMMARY     the rollback stands
//
// pending is true exactly while the engine holds this transaction's apply;
// run's deferred rollback is what makes "every way out rolls back" hold,
// and it runs before the TxnObserver call and the slot's release, so an
// observer and the next writer both see the engine with no pending apply.
// The observer hears TxnFailed for a transaction that ended above the
// Engine.Apply row (and for one whose Engine.Rollback failed), TxnRolledBack
// or TxnCommitted below it.

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/rules"
)

// TxnObserver is implemented by an Engine that wants to hear how each
// writing transaction ended (for its metrics): exactly one call per
// transaction that held the writer slot, with TxnCommitted, TxnRolledBack
// (applied, then rolled back for any reason) or TxnFailed (ended before an
// apply: invalid table, stale generation, protocol error, disconnect).
type TxnObserver interface {
	TxnEnded(outcome rules.TxnOutcome)
}

// Outcomes given to TxnObserver.TxnEnded.
const (
	TxnCommitted  = rules.TxnCommitted
	TxnRolledBack = rules.TxnRolledBack
	TxnFailed     = rules.TxnFailed
)

// writeTxn is one writing transaction, on the connection of intent write.
type writeTxn struct {
	cc       *ctlConn
	pending  bool     // applied, neither committed nor rolled back
	detached bool     // left pending past the connection (LEAVE): the server's now (confirm.go)
	failed   []string // the apply's failed ports, for the rollback's log line
}

// run runs the writing transaction, steps 3 to 10 (see the file's comment
// for what each step's failure leaves behind). Its error is the
// connection's to report (ctlConn.finish); nil after the answer of step 10
// is sent, or after a close at step 7.
func (tx *writeTxn) run() error {
	cc, s := tx.cc, tx.cc.s
	if !s.writer.CompareAndSwap(false, true) {
		return s.busy()
	}
	// The slot is freed once the engine has no pending apply, before the
	// last answer (COMMITTED, or the rollback's SUMMARY) is sent: a client
	// that has its answer may start the next transaction at once, and is
	// never told busy by the one it just finished.
	release := sync.OnceFunc(func() { s.writer.Store(false) })
	defer func() {
		if !tx.detached { // a pending commit-confirmed apply keeps the slot
			release()
		}
	}()
	// How the transaction ended, for an engine that counts it: registered
	// first, so it runs after the deferred rollback of a pending apply. A
	// detached one is counted when it ends (confirm.go).
	committedBefore, rolledBackBefore := s.committed.Load(), s.rolledBack.Load()
	defer func() {
		switch {
		case tx.detached:
		case s.committed.Load() != committedBefore:
			s.observe(TxnCommitted)
		case s.rolledBack.Load() != rolledBackBefore:
			s.observe(TxnRolledBack)
		default:
			s.observe(TxnFailed)
		}
	}()
	// 3, 4.
	pifs, _, err := cc.listTable(false)
	if err != nil {
		return err
	}
	// 5, 6.
	rs, err := tx.load(pifs)
	if err != nil {
		if errors.Is(err, io.EOF) {
			cc.log.Info("control client left during the load: shadow discarded, nothing changed")
		}
		return err
	}
	ld := &Loaded{Generation: s.eng.Generation(), Rules: len(rs), Ports: rules.ListenPortCount(rs)}
	old := s.eng.Rules()
	d := rules.TableDiff(old, rs)
	ld.Kept, ld.Added, ld.Removed = len(d.Kept), len(d.Added), len(d.Removed)
	if err := cc.send(func() error { return cc.w.writeLoaded(cc.ver, ld) }); err != nil {
		return err
	}
	// 7.
	f, err := cc.readNext()
	if errors.Is(err, io.EOF) {
		cc.log.Info("control client closed after validation: shadow discarded, nothing changed", zap.Int("rules", len(rs)))
		return nil
	}
	if err != nil {
		return err
	}
	if f.typ != MsgApply {
		return errorf(CodeUnexpected, "%s where APPLY (or a close) was expected", f.typ)
	}
	ms, err := decodeApply(f)
	if err != nil {
		return err
	}
	confirm := time.Duration(ms) * time.Millisecond
	if ms == 0 {
		confirm = s.cfg.defaultConfirm
	}
	if confirm > s.cfg.maxConfirm {
		return errorf(CodeBadValue, "confirm timeout %s, at most %s allowed", confirm, s.cfg.maxConfirm)
	}
	sum, err := s.eng.Apply(rs)
	if err != nil {
		return errorf(CodeApplyFailed, "%v", err)
	}
	applied := time.Now()
	tx.pending = true
	defer func() {
		if tx.pending {
			tx.rollback("the transaction ended before a commit")
		}
	}()
	if sum == nil {
		return errorf(CodeInternal, "the engine applied the table but gave no summary: rolled back")
	}
	tx.failed = failedPorts(sum)
	fields := []zap.Field{zap.Uint64("generation", sum.Generation), zap.Bool("verdict", sum.OK()),
		zap.Int("kept", sum.Kept), zap.Int("added", sum.Added), zap.Int("removed", sum.Removed), zap.Duration("confirm", confirm)}
	if len(tx.failed) > 0 {
		fields = append(fields, zap.Strings("failed", tx.failed))
	}
	cc.log.Info("table applied, waiting for commit", fields...)
	// 8.
	if err := cc.send(func() error { return cc.w.writeSummary(cc.ver, summaryFrom(sum)) }); err != nil {
		return err
	}
	// 9.
	f, err = cc.read(applied.Add(confirm))
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) && !cc.isClosing() {
			tx.rollback("confirm timeout")
			return errorf(CodeConfirmTimeout, "no commit within the confirm timeout of %s: rolled back", confirm)
		}
		return err
	}
	switch f.typ {
	case MsgCommit:
		if err := decodeEmpty(f); err != nil {
			return err
		}
		gen, err := s.commit(cc.log, old, rs, cc.who)
		if err != nil {
			return errorf(CodeCommitFailed, "%v (rolled back)", err)
		}
		tx.pending = false
		release()
		// 10.
		return cc.send(func() error { return cc.w.writeCommitted(cc.ver, gen) })
	case MsgRollback:
		if err := decodeEmpty(f); err != nil {
			return err
		}
		rsum, err := tx.rollback("asked by the client")
		if err != nil {
			return errorf(CodeRollbackFailed, "%v", err)
		}
		release()
		// 10.
		return cc.send(func() error { return cc.w.writeSummary(cc.ver, summaryFrom(rsum)) })
	case MsgLeave:
		if err := decodeEmpty(f); err != nil {
			return err
		}
		p := &pendingTxn{gen: sum.Generation, old: old, new: rs, who: cc.who, deadline: applied.Add(confirm)}
		if time.Until(p.deadline) <= 0 {
			tx.rollback("confirm timeout")
			return errorf(CodeConfirmTimeout, "no commit within the confirm timeout of %s: rolled back", confirm)
		}
		if !s.leave(p) {
			tx.rollback("the daemon is stopping")
			return errClosing
		}
		tx.pending, tx.detached = false, true
		return cc.send(func() error {
			return cc.w.writePending(cc.ver, &Pending{Generation: p.gen, Left: time.Until(p.deadline)})
		})
	}
	return errorf(CodeUnexpected, "%s where COMMIT, ROLLBACK or LEAVE was expected", f.typ)
}

// observe tells an engine that counts transactions how one ended.
func (s *Server) observe(o rules.TxnOutcome) {
	if ob, ok := s.eng.(TxnObserver); ok {
		ob.TxnEnded(o)
	}
}

// commit commits the engine's pending apply of new over old, counts and
// logs it, and has it recorded (CommitRecorder) as who's: the record is
// made before the caller answers COMMITTED. A failed Engine.Commit leaves
// the apply pending: the caller rolls back.
func (s *Server) commit(log *zap.Logger, old, new []*rules.Rule, who Who) (uint64, error) {
	gen, err := s.eng.Commit()
	if err != nil {
		return 0, err
	}
	s.committed.Add(1)
	log.Info("table committed", zap.Uint64("generation", gen))
	if r, ok := s.eng.(CommitRecorder); ok {
		r.Committed(Commit{Generation: gen, Old: old, New: new, Who: who})
	}
	return gen, nil
}

// rollback undoes the pending apply; why is for the log. It returns the
// summary of the restored table, or the engine's error (logged here).
func (tx *writeTxn) rollback(why string) (*rules.Summary, error) {
	tx.pending = false
	if len(tx.failed) > 0 {
		return tx.cc.s.rollback(tx.cc.log, why, zap.Strings("failed", tx.failed))
	}
	return tx.cc.s.rollback(tx.cc.log, why)
}

// failedPorts lists the ports an apply could not bind, each as the
// contract's line with the errno's name: "tcp 0.0.0.0:8080: port 8080:
// address already in use (EADDRINUSE)"; nil when none failed.
func failedPorts(sum *rules.Summary) []string {
	out, i := sum.Failures(), 0 // its lines in the order of the loop below
	for _, r := range sum.Rules {
		for _, f := range r.Failed {
			if name := unix.ErrnoName(f.Errno); f.Errno != 0 && name != "" {
				out[i] += " (" + name + ")"
			}
			i++
		}
	}
	return out
}

// rollback undoes the engine's pending apply; why and fields are for the
// log. It returns the summary of the restored table, or the engine's error
// (logged here).
func (s *Server) rollback(log *zap.Logger, why string, fields ...zap.Field) (*rules.Summary, error) {
	sum, err := s.eng.Rollback()
	if err == nil && sum == nil {
		err = errors.New("the engine rolled back but gave no summary")
	}
	if err != nil {
		log.Error("rollback failed", zap.String("why", why), zap.Error(err))
		return nil, err
	}
	s.rolledBack.Add(1)
	log.Info("table rolled back", append([]zap.Field{zap.String("why", why), zap.Uint64("generation", sum.Generation)}, fields...)...)
	return sum, nil
}

// load reads LOAD chunks into the shadow table (step 5): every line parsed,
// every pif checked, then the whole table validated. No socket is touched.
// The load is bounded: in time, by cfg.loadTimeout from its first read (a
// timeout), and in chunks, since every chunk but the last carries a line
// (empty-chunk) and the lines are at most max-rules (too-large).
func (tx *writeTxn) load(pifs []Pif) ([]*rules.Rule, error) {
	cc, s := tx.cc, tx.cc.s
	known := make(map[string]bool, len(pifs))
	for _, p := range pifs {
		known[rules.ModelPif(p.Name)] = true
	}
	var rs []*rules.Rule
	var texts []string
	var base uint64
	prevPif := -1
	// The whole load has a deadline of its own: each chunk arriving within
	// the I/O timeout cannot keep the writer slot for longer.
	whole := time.Now().Add(s.cfg.loadTimeout)
	for {
		f, err := cc.read(earliest(time.Now().Add(s.cfg.ioTimeout), whole))
		if errors.Is(err, os.ErrDeadlineExceeded) && !cc.isClosing() && !time.Now().Before(whole) {
			return nil, errorf(CodeTimeout, "the load did not end within %s (%d rules in): shadow discarded", s.cfg.loadTimeout, len(rs))
		}
		if err != nil {
			return nil, err
		}
		if f.typ != MsgLoad {
			return nil, errorf(CodeUnexpected, "%s where LOAD was expected", f.typ)
		}
		c, err := decodeTableChunk(f)
		if err != nil {
			return nil, err
		}
		if prevPif < 0 {
			if gen := s.eng.Generation(); c.gen != gen {
				return nil, errorf(CodeStaleGeneration, "the table was built on generation %d; the active one is %d", c.gen, gen)
			}
			base = c.gen
		} else if c.gen != base {
			return nil, errorf(CodeBadValue, "LOAD chunk on generation %d after chunks on %d", c.gen, base)
		}
		if int(c.pif) >= len(pifs) {
			return nil, errorf(CodeUnknownPif, "pif index %d: the daemon has %d pifs (0 to %d)", c.pif, len(pifs), len(pifs)-1)
		}
		if int(c.pif) < prevPif {
			return nil, errorf(CodeBadValue, "LOAD chunk for pif %d after pif %d: one pif at a time, in order", c.pif, prevPif)
		}
		if len(c.lines) == 0 && !c.last {
			// It carries nothing: refused, so that a load is at most
			// max-rules chunks and the last.
			return nil, errorf(CodeEmptyChunk, "a LOAD chunk with no line that is not the last (%d rules in)", len(rs))
		}
		prevPif = int(c.pif)
		if len(rs)+len(c.lines) > rules.MaxRules {
			return nil, errorf(CodeTooLarge, "more than %d rules loaded, at most %d allowed", len(rs)+len(c.lines), rules.MaxRules)
		}
		pifName := rules.ModelPif(pifs[c.pif].Name)
		for _, line := range c.lines {
			idx := len(rs)
			r, err := rules.Parse(line)
			if err != nil {
				return nil, &Error{Code: CodeInvalidRule, Index: idx, Rule: line, Msg: err.Error()}
			}
			if r.ListenPif != pifName {
				return nil, &Error{Code: CodeUnknownPif, Index: idx, Rule: line,
					Msg: fmt.Sprintf("the rule listens in pif %q but was sent under pif %d (%q)", rules.PifName(r.ListenPif), c.pif, pifs[c.pif].Name)}
			}
			if !known[r.TargetPif] {
				return nil, &Error{Code: CodeUnknownPif, Index: idx, Rule: line, Msg: fmt.Sprintf("target pif %q: the daemon has no such pif", r.TargetPif)}
			}
			rs = append(rs, r)
			texts = append(texts, line)
		}
		if c.last {
			break
		}
	}
	// Messages name the other rule of a collision by its text: the client's
	// numbering (file lines) is not ours.
	if errs := rules.ValidateTable(rs, func(i int) string { return strconv.Quote(texts[i]) }); len(errs) > 0 {
		e := &Error{Code: CodeInvalidTable, Index: -1, Msg: errs[0].Msg}
		if i := errs[0].Index; i >= 0 && i < len(rs) {
			e.Index, e.Rule = i, texts[i]
		}
		if len(errs) > 1 {
			e.Msg += fmt.Sprintf(" (and %d more problems)", len(errs)-1)
		}
		return nil, e
	}
	if res, ok := s.eng.(Resolver); ok {
		if i, err := res.Resolve(rs); err != nil {
			return nil, &Error{Code: CodeInvalidRule, Index: i, Rule: texts[i], Msg: err.Error()}
		}
	}
	return rs, nil
}

// earliest returns the earlier of two times.
func earliest(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}
