package rules

import "testing"

// Every outcome has its name, distinct from the others: an outcome added
// without one fails here.
func TestTxnOutcomeNames(t *testing.T) {
	seen := map[string]TxnOutcome{}
	for o := range TxnOutcomeCount {
		n := o.String()
		if n == "" {
			t.Errorf("outcome %d has no name", o)
		}
		if p, dup := seen[n]; dup {
			t.Errorf("outcomes %d and %d are both %q", p, o, n)
		}
		seen[n] = o
	}
	for _, c := range []struct {
		o    TxnOutcome
		want string
	}{
		{TxnCommitted, "committed"},
		{TxnRolledBack, "rolled_back"},
		{TxnFailed, "failed"},
		{TxnOutcomeCount, "outcome-3"},
	} {
		if got := c.o.String(); got != c.want {
			t.Errorf("%d: %q, want %q", c.o, got, c.want)
		}
	}
}
