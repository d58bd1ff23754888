package ctl

import "github.com/sluice-proxy/sluice/rules"

// Who is the author of a writing transaction: the peer credentials of its
// connection and the name its client hello gave.
type Who struct {
	UID  uint32
	PID  int32
	Name string
}

// Commit is one committed writing transaction, as a CommitRecorder hears it.
type Commit struct {
	Generation uint64        // the new active generation
	Old, New   []*rules.Rule // the table before, and the one committed
	Who        Who
}

// CommitRecorder is implemented by an Engine that records each commit (the
// daemon's state dir). Committed runs after Engine.Commit and before
// COMMITTED is sent, on the transaction's goroutine: a client told
// "committed" knows the record was made. Its failure is the recorder's to
// log; the commit stands.
type CommitRecorder interface {
	Committed(c Commit)
}

// Booted is implemented by an Engine that knows the id of this run of the
// daemon: the server hello carries it (limit boot-id), so a client can tell
// a restart. 0 = none sent.
type Booted interface {
	BootID() uint64
}

// Hold takes the writer slot for a table change made beside the control
// socket (the daemon's reload), so that no writing transaction is between
// its load and its apply meanwhile. When a writer holds the slot it returns
// the *Error busy a writer would get (naming a pending commit-confirmed
// transaction and its time left), and while the daemon drains the *Error
// draining; otherwise release frees the slot.
func (s *Server) Hold() (release func(), err error) {
	if s.isDraining() {
		return nil, s.drainingError(IntentReload)
	}
	if !s.writer.CompareAndSwap(false, true) {
		return nil, s.busy()
	}
	return func() { s.writer.Store(false) }, nil
}
