package engine

import (
	"strconv"
	"sync/atomic"
	"time"

	"github.com/sluice-proxy/sluice/rules"
)

// The transaction log: the engine's table operations (apply, commit,
// rollback), the last recentTxns of them kept for the status page, and the
// control server's count of writing transactions by outcome.

// TxnCounters count writing control transactions by how they ended. The
// engine cannot tell on its own (an Apply is one step of a transaction), so
// the control server increments exactly one of them per writing transaction,
// through Engine.Transactions(); metrics exports them as
// sluice_ctl_transactions_total{outcome=...}. The engine's own steps are
// counted by Apply, Commit and Rollback (TableStats).
type TxnCounters struct {
	Committed  atomic.Uint64 // ended by a commit
	RolledBack atomic.Uint64 // applied, then rolled back: asked for, a bad verdict, the confirm timeout, a disconnect
	Failed     atomic.Uint64 // ended before an apply: a table that did not validate, a stale generation, a protocol error, a disconnect
}

// Transactions returns the counters the control server increments, one
// outcome per writing transaction.
func (e *Engine) Transactions() *TxnCounters { return &e.ctr.txn }

// TxnEnded counts one writing transaction by its outcome: the control
// server's ctl.TxnObserver call. An outcome out of the list counts as
// failed.
func (e *Engine) TxnEnded(o rules.TxnOutcome) {
	switch o {
	case rules.TxnCommitted:
		e.ctr.txn.Committed.Add(1)
	case rules.TxnRolledBack:
		e.ctr.txn.RolledBack.Add(1)
	default:
		e.ctr.txn.Failed.Add(1)
	}
}

// TxnOp is a table operation of the engine, as TxnRecord names it.
type TxnOp uint8

const (
	OpApply TxnOp = iota
	OpCommit
	OpRollback
	txnOpCount
)

// txnOpNames are the operations' stable names: the label op of
// sluice_table_operations_total and the status page's column.
var txnOpNames = [txnOpCount]string{OpApply: "apply", OpCommit: "commit", OpRollback: "rollback"}

// String returns the operation's stable name, or "op-N" for a value out of
// the list.
func (o TxnOp) String() string {
	if o < txnOpCount {
		return txnOpNames[o]
	}
	return "op-" + strconv.Itoa(int(o))
}

// recentTxns is how many table operations Stats shows.
const recentTxns = 16

// TxnRecord is one table operation of the engine: an apply, a commit or a
// rollback.
type TxnRecord struct {
	Time       time.Time
	Op         TxnOp
	Generation uint64         // apply: the generation a commit would give; commit: the new one; rollback: the one restored
	Took       time.Duration  // the engine's own time for the step
	Summary    *rules.Summary // apply and rollback: per rule, requested / bound / failed ports; nil for commit. Read only.
}

// engineCounters are the engine's table counters; the fields below the
// atomics are guarded by Engine.mu.
type engineCounters struct {
	applies, commits, rollbacks atomic.Uint64
	applyTime                   Histogram
	txn                         TxnCounters

	recent     [recentTxns]TxnRecord // a ring; next is the slot written next
	next, n    int
	bindFailed map[*rules.Rule][]rules.PortError // the failed ports of each rule at its apply
}

// note records a table operation. Called with e.mu held.
func (e *Engine) note(op TxnOp, start time.Time, gen uint64, sum *rules.Summary) {
	c := &e.ctr
	took := time.Since(start)
	c.recent[c.next] = TxnRecord{Time: start, Op: op, Generation: gen, Took: took, Summary: sum}
	c.next = (c.next + 1) % recentTxns
	c.n = min(c.n+1, recentTxns)
	switch op {
	case OpApply:
		c.applies.Add(1)
		c.applyTime.observe(uint64(took / time.Microsecond))
	case OpCommit:
		c.commits.Add(1)
	case OpRollback:
		c.rollbacks.Add(1)
	}
}

// noteApply records an apply of rs: the operation and the ports of each
// rule that failed to bind. Called with e.mu held.
func (e *Engine) noteApply(start time.Time, rs []*rules.Rule, sum *rules.Summary) {
	if e.ctr.bindFailed == nil {
		e.ctr.bindFailed = map[*rules.Rule][]rules.PortError{}
	}
	for i, r := range rs {
		if i < len(sum.Rules) && len(sum.Rules[i].Failed) > 0 {
			e.ctr.bindFailed[r] = sum.Rules[i].Failed
		} else {
			delete(e.ctr.bindFailed, r)
		}
	}
	e.note(OpApply, start, sum.Generation, sum)
}

// noteEnd records a commit or a rollback, and forgets the bind failures of
// rules no longer in the table. Called with e.mu held.
func (e *Engine) noteEnd(op TxnOp, start time.Time, sum *rules.Summary) {
	if len(e.ctr.bindFailed) > 0 {
		in := make(map[*rules.Rule]bool, len(e.rules))
		for _, r := range e.rules {
			in[r] = true
		}
		for r := range e.ctr.bindFailed {
			if !in[r] {
				delete(e.ctr.bindFailed, r)
			}
		}
	}
	e.note(op, start, e.gen, sum)
}
