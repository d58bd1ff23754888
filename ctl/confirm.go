package ctl

// This file holds commit-confirmed: a writing transaction that, at step 9,
// sends LEAVE instead of COMMIT leaves its apply pending past its
// connection. The server keeps it (Server.pending) and keeps the writer
// slot for it; it ends in exactly one of four ways, each taking it from
// Server.pending under pmu, so that only one of them acts:
//
//	intent confirm      committed now (recorded as the applier's commit); COMMITTED
//	intent rollback     rolled back now; the restored table's SUMMARY
//	the deadline        rolled back by the server's timer
//	Server.Close        rolled back before the server returns (a daemon stop)
//
// Meanwhile every other writer (and Hold) is told busy, with the pending
// transaction's generation, author and time left; STATUS (version 3)
// carries the time left. The slot is freed once the engine has no pending
// apply, as for any transaction.

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/sluice-proxy/sluice/rules"
)

// ConfirmWatcher is implemented by an Engine that shows a pending
// commit-confirmed apply (metrics, watch events): ConfirmPending is called
// when one is left pending, with the generation it gets if confirmed and
// its deadline, and again with the zero time once it ended.
type ConfirmWatcher interface {
	ConfirmPending(gen uint64, deadline time.Time)
}

// pendingTxn is a commit-confirmed apply left pending past its connection.
type pendingTxn struct {
	gen      uint64 // the generation it gets if confirmed
	old, new []*rules.Rule
	who      Who
	deadline time.Time
	timer    *time.Timer
}

// Pending is the server's answer to LEAVE.
type Pending struct {
	Generation uint64        // the generation the table gets if confirmed
	Left       time.Duration // until the server rolls back by itself
}

func (w Who) String() string {
	return fmt.Sprintf("uid %d pid %d %s", w.UID, w.PID, strconv.Quote(w.Name))
}

func (fw *frameWriter) writePending(ver uint8, p *Pending) error {
	fw.start(ver, MsgPending)
	fw.u64(p.Generation)
	fw.u64(uint64(max(p.Left, 0) / time.Millisecond))
	return fw.finish()
}

func decodePending(f frame) (*Pending, error) {
	d := newDec(f)
	p := &Pending{Generation: d.u64("generation")}
	ms := d.u64("left-ms")
	p.Left = time.Duration(min(ms, uint64(MaxConfirm/time.Millisecond))) * time.Millisecond
	return p, d.end()
}

// busy is the error a writer gets while the slot is held: it names a
// pending commit-confirmed transaction and its time left.
func (s *Server) busy() *Error {
	s.pmu.Lock()
	p := s.pending
	s.pmu.Unlock()
	if p == nil {
		return errorf(CodeBusy, "another writing transaction holds the control socket")
	}
	return errorf(CodeBusy, "a commit-confirmed transaction is pending (generation %d, applied by %s): it rolls back by itself in %s unless confirmed (sluice ctl confirm; sluice ctl rollback ends it now)",
		p.gen, p.who, time.Until(p.deadline).Round(100*time.Millisecond))
}

// pendingLeft is the pending commit-confirmed transaction's generation and
// time left; 0, 0 when none.
func (s *Server) pendingLeft() (uint64, time.Duration) {
	s.pmu.Lock()
	defer s.pmu.Unlock()
	if s.pending == nil {
		return 0, 0
	}
	return s.pending.gen, max(time.Until(s.pending.deadline), time.Millisecond)
}

// leave keeps the writing transaction's apply pending until deadline: the
// writer slot stays held (the caller does not free it) and a timer rolls
// back at the deadline. It reports false, leaving nothing, once the server
// is closing or draining: the caller rolls back. (s.mu is held across the check and
// the hand-over, so Close either sees the pending transaction or is seen.)
func (s *Server) leave(p *pendingTxn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.draining {
		return false
	}
	s.pmu.Lock()
	s.pending = p
	p.timer = time.AfterFunc(time.Until(p.deadline), func() {
		if s.takePending(p) {
			s.endTaken(p, false, "the confirm deadline passed")
		}
	})
	s.pmu.Unlock()
	s.log.Info("commit-confirmed: the apply stays pending", zap.Uint64("generation", p.gen), zap.Stringer("by", p.who),
		zap.Time("deadline", p.deadline))
	if w, ok := s.eng.(ConfirmWatcher); ok {
		w.ConfirmPending(p.gen, p.deadline)
	}
	return true
}

// takePending takes p from the server if it is still the pending one; it
// reports whether the caller now ends it (endTaken, which Close waits for
// through s.ending).
func (s *Server) takePending(p *pendingTxn) bool {
	s.pmu.Lock()
	defer s.pmu.Unlock()
	if s.pending == nil || s.pending != p {
		return false
	}
	s.pending.timer.Stop()
	s.pending = nil
	s.ending.Add(1)
	return true
}

// endTaken commits (commit) or rolls back a taken pending transaction, and
// frees the writer slot. It returns the new generation or the restored
// table's summary.
func (s *Server) endTaken(p *pendingTxn, commit bool, why string) (uint64, *rules.Summary, error) {
	defer s.ending.Done()
	defer s.writer.Store(false)
	defer func() {
		if w, ok := s.eng.(ConfirmWatcher); ok {
			w.ConfirmPending(p.gen, time.Time{})
		}
	}()
	log := s.log.With(zap.Stringer("by", p.who), zap.String("why", why))
	if commit {
		gen, err := s.commit(log, p.old, p.new, p.who)
		if err == nil {
			s.observe(TxnCommitted)
			return gen, nil, nil
		}
		log.Error("confirm: the commit failed; rolling back", zap.Error(err))
		if _, rerr := s.rollback(log, "the commit failed"); rerr != nil {
			s.observe(TxnFailed)
		} else {
			s.observe(TxnRolledBack)
		}
		return 0, nil, errorf(CodeCommitFailed, "%v (rolled back)", err)
	}
	sum, err := s.rollback(log, why)
	if err != nil {
		s.observe(TxnFailed)
		return 0, nil, errorf(CodeRollbackFailed, "%v", err)
	}
	s.observe(TxnRolledBack)
	return 0, sum, nil
}

// closePending rolls back a pending commit-confirmed transaction, if any,
// as the server closes, and waits for one that its deadline or a confirm
// is ending already.
func (s *Server) closePending() {
	s.pmu.Lock()
	p := s.pending
	s.pmu.Unlock()
	if p != nil && s.takePending(p) {
		_, _, _ = s.endTaken(p, false, "the daemon is stopping")
	}
	s.ending.Wait()
}

// endPending serves intents confirm (commit) and rollback.
func (s *Server) endPending(cc *ctlConn, commit bool) error {
	s.pmu.Lock()
	p := s.pending
	s.pmu.Unlock()
	if p == nil || !s.takePending(p) {
		return errorf(CodeNoPending, "no commit-confirmed transaction is pending")
	}
	why := "rolled back by " + cc.who.String()
	if commit {
		why = "confirmed by " + cc.who.String()
	}
	gen, sum, err := s.endTaken(p, commit, why)
	if err != nil {
		return err
	}
	if commit {
		return cc.send(func() error { return cc.w.writeCommitted(cc.ver, gen) })
	}
	return cc.send(func() error { return cc.w.writeSummary(cc.ver, summaryFrom(sum)) })
}

// --- client ---

// Leave sends LEAVE in place of Commit (step 9): the applied table stays
// pending after the connection closes, until `confirm`, `rollback` or the
// confirm timeout Apply asked for. The server must list
// FeatureConfirmLater.
func (c *Client) Leave(ctx context.Context) (*Pending, error) {
	var p *Pending
	err := c.call(ctx, stepApplied, func() error {
		if err := c.send(func() error { return c.w.writeEmpty(c.ver, MsgLeave) }); err != nil {
			return err
		}
		f, err := c.expect(MsgPending)
		if err != nil {
			return err
		}
		if p, err = decodePending(f); err != nil {
			return err
		}
		c.step = stepDone
		return nil
	})
	return p, err
}

// Confirm reads the answer of intent confirm: the generation committed.
func (c *Client) Confirm(ctx context.Context) (uint64, error) {
	var gen uint64
	err := c.call(ctx, stepHello, func() error {
		if c.intent != IntentConfirm {
			return fmt.Errorf("ctl: Confirm on a connection for %s", c.intent)
		}
		var err error
		gen, err = decodeCommitted(*c.next)
		c.next, c.step = nil, stepDone
		return err
	})
	return gen, err
}

// RolledBack reads the answer of intent rollback: the restored table's
// summary.
func (c *Client) RolledBack(ctx context.Context) (*Summary, error) {
	var s *Summary
	err := c.call(ctx, stepHello, func() error {
		if c.intent != IntentRollback {
			return fmt.Errorf("ctl: RolledBack on a connection for %s", c.intent)
		}
		f := *c.next
		c.next = nil
		var err error
		if s, err = c.readSummaryFrom(&f); err != nil {
			return err
		}
		c.step = stepDone
		return nil
	})
	return s, err
}
