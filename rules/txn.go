package rules

import "strconv"

// TxnOutcome is how a writing control transaction ended. The control server
// reports one per transaction (ctl.TxnObserver) and the engine counts them;
// it is declared here, below both, so that neither reaches into the other.
type TxnOutcome uint8

const (
	TxnCommitted    TxnOutcome = iota // ended by a commit
	TxnRolledBack                     // applied, then rolled back: asked for, a bad verdict, the confirm timeout, a disconnect
	TxnFailed                         // ended before an apply: a table that did not validate, a stale generation, a protocol error, a disconnect
	TxnOutcomeCount                   // the number of outcomes, for tables indexed by them
)

// txnOutcomeNames are the outcomes' stable names: the value of the label
// outcome of sluice_ctl_transactions_total and the txn.* names of ctl stats.
var txnOutcomeNames = [TxnOutcomeCount]string{
	TxnCommitted:  "committed",
	TxnRolledBack: "rolled_back",
	TxnFailed:     "failed",
}

// String returns the outcome's stable name, or "outcome-N" for a value
// outside the list.
func (o TxnOutcome) String() string {
	if o < TxnOutcomeCount {
		return txnOutcomeNames[o]
	}
	return "outcome-" + strconv.Itoa(int(o))
}
