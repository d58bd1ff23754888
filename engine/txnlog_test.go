package engine

import (
	"net"
	"strconv"
	"strings"
	"testing"

	"github.com/sluice-proxy/sluice/rules"
)

// Applies, commits and rollbacks are counted and kept, newest first, with
// their summaries; the rules of a pending apply show their bind state.
func TestTableRecords(t *testing.T) {
	e := newEngine(t)
	b := backend(t)
	ports := freePorts(t, 2)
	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	a := "tcp 127.0.0.1:" + strconv.Itoa(ports[0]) + " -> " + b.Addr()
	bad := "tcp " + held.Addr().String() + " -> " + b.Addr()
	c := "tcp 127.0.0.1:" + strconv.Itoa(ports[1]) + " -> " + b.Addr()
	applyCommit(t, e, a)
	sum, err := e.Apply(parseAll(t, a, bad, c))
	if err != nil {
		t.Fatal(err)
	}
	if sum.OK() {
		t.Fatal("an apply binding a held port passed")
	}
	st := e.Stats()
	if !st.Table.Pending || len(st.Rules) != 3 {
		t.Fatalf("pending apply: %+v", st.Table)
	}
	if l := st.Rules[0].Listeners; len(l) != 1 || l[0].State != ListenerListening {
		t.Errorf("kept rule: %+v", st.Rules[0])
	}
	if r := st.Rules[1]; len(r.Listeners) != 0 || len(r.Failed) != 1 || !strings.Contains(r.Failed[0].Msg, "address already in use") {
		t.Errorf("failed rule: %+v", r)
	}
	if l := st.Rules[2].Listeners; len(l) != 1 || l[0].State != ListenerPending {
		t.Errorf("added rule: %+v", st.Rules[2])
	}
	if _, err := e.Rollback(); err != nil {
		t.Fatal(err)
	}
	e.Transactions().RolledBack.Add(1) // as the control server would

	st = e.Stats()
	tb := st.Table
	if tb.Pending || tb.Generation != 1 || tb.Applies != 2 || tb.Commits != 1 || tb.Rollbacks != 1 || tb.ApplyTime.Count() != 2 {
		t.Errorf("table %+v", tb)
	}
	if tb.RolledBack != 1 || tb.Committed != 0 || tb.Failed != 0 {
		t.Errorf("transactions %+v", tb)
	}
	var ops []string
	for _, r := range tb.Recent {
		ops = append(ops, r.Op.String())
	}
	if strings.Join(ops, ",") != "rollback,apply,commit,apply" {
		t.Fatalf("recent %v", ops)
	}
	if s := tb.Recent[1].Summary; s == nil || s.OK() || len(s.Failures()) != 1 || tb.Recent[1].Generation != 2 {
		t.Errorf("failed apply's record %+v", tb.Recent[1])
	}
	if tb.Recent[2].Summary != nil || tb.Recent[2].Generation != 1 || !tb.Recent[3].Summary.OK() {
		t.Errorf("commit %+v, first apply %+v", tb.Recent[2], tb.Recent[3])
	}
	if len(st.Rules) != 1 || st.Rules[0].Line != a || len(st.Rules[0].Failed) != 0 || len(e.ctr.bindFailed) != 0 {
		t.Errorf("after rollback: %+v, bind failures kept %v", st.Rules, e.ctr.bindFailed)
	}

	for i := 0; i < 10; i++ {
		if _, err := e.Apply(parseAll(t, a)); err != nil {
			t.Fatal(err)
		}
		if _, err := e.Rollback(); err != nil {
			t.Fatal(err)
		}
	}
	if tb := e.Stats().Table; len(tb.Recent) != recentTxns || tb.Recent[0].Op != OpRollback || tb.Recent[1].Op != OpApply || tb.Rollbacks != 11 {
		t.Errorf("after 24 operations: %d kept, newest %s, %d rollbacks", len(tb.Recent), tb.Recent[0].Op, tb.Rollbacks)
	}
}

// Every table operation has its name, distinct from the others: an
// operation added without one fails here.
func TestTxnOpNames(t *testing.T) {
	seen := map[string]TxnOp{}
	for op := range txnOpCount {
		n := op.String()
		if n == "" {
			t.Errorf("op %d has no name", op)
		}
		if p, dup := seen[n]; dup {
			t.Errorf("ops %d and %d are both %q", p, op, n)
		}
		seen[n] = op
	}
	for _, c := range []struct {
		op   TxnOp
		want string
	}{{OpApply, "apply"}, {OpCommit, "commit"}, {OpRollback, "rollback"}, {txnOpCount, "op-3"}} {
		if got := c.op.String(); got != c.want {
			t.Errorf("%d: %q, want %q", c.op, got, c.want)
		}
	}
}

// TxnEnded counts each outcome in its own counter; one out of the list
// counts as failed.
func TestTxnEnded(t *testing.T) {
	for _, c := range []struct {
		o                             rules.TxnOutcome
		committed, rolledBack, failed uint64
	}{
		{rules.TxnCommitted, 1, 0, 0},
		{rules.TxnRolledBack, 0, 1, 0},
		{rules.TxnFailed, 0, 0, 1},
		{rules.TxnOutcomeCount, 0, 0, 1},
	} {
		var e Engine
		e.TxnEnded(c.o)
		tc := e.Transactions()
		if got := [3]uint64{tc.Committed.Load(), tc.RolledBack.Load(), tc.Failed.Load()}; got != [3]uint64{c.committed, c.rolledBack, c.failed} {
			t.Errorf("%v: committed, rolled back, failed %v", c.o, got)
		}
	}
}
