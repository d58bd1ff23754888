package ctl

// This file holds the server's part of a daemon's stop: Drain, after which
// the socket serves the read-only intents (status, pifs, list,
// list-pending, sessions, stats, history, watch) until Close, so an
// operator can see what holds the stop up, and refuses the intents that
// change the daemon (write, reload, confirm, rollback, upgrade) with
// ERROR draining; and Described, what STATUS says of the process.

import (
	"time"

	"go.uber.org/zap"
)

// Described is implemented by an Engine that knows the daemon it runs in:
// STATUS carries its version (as `sluice version` prints it) and start
// time from version 6. Without it STATUS says no version, and the
// server's own start.
type Described interface {
	Described() (version string, started time.Time)
}

// Drain makes the server read-only until Close: the connections whose
// intent changes the daemon are ended (an open transaction rolls back, its
// client told "shutting-down"), as is a pending commit-confirmed apply
// (rolled back), and from now on such an intent is refused with
// CodeDraining; the read-only intents are served on, and STATUS says
// StateDraining with the time left until deadline. Drain returns once the
// ended connections are gone, so the engine they rolled back through may
// then stop. A second call only moves the deadline.
func (s *Server) Drain(deadline time.Time) {
	s.mu.Lock()
	first := !s.draining
	s.draining, s.drainBy = true, deadline
	var ending []chan struct{}
	for cc := range s.conns {
		if cc.intent.changes() {
			cc.shutdown()
			ending = append(ending, cc.done)
		}
	}
	s.mu.Unlock()
	if !first {
		return
	}
	s.log.Info("control socket read-only while the daemon drains", zap.Time("deadline", deadline), zap.Int("ended", len(ending)))
	s.closePending()
	for _, done := range ending {
		<-done
	}
}

// drainState is the server's RunState and, draining, the time left until
// the deadline.
func (s *Server) drainState() (RunState, time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.draining {
		return StateServing, 0
	}
	return StateDraining, max(time.Until(s.drainBy), 0)
}

// drainingError is the refusal of intent while the daemon drains.
func (s *Server) drainingError(intent Intent) *Error {
	return errorf(CodeDraining, "the daemon is draining its sessions before it exits (%s left): %s is refused; status, sessions, stats, list and watch are served",
		max(time.Until(s.drainBy), 0).Round(100*time.Millisecond), intent)
}

// isDraining reports whether Drain was called.
func (s *Server) isDraining() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.draining
}
