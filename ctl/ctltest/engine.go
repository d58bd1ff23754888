// Package ctltest has an in-memory ctl.Engine for tests of the control
// server and of its clients: a table, a generation and an apply that is
// pending until committed or rolled back, with ports that fail to bind on
// demand. It opens no socket: it is a fake of the engine, not of the
// network.
package ctltest

import (
	"errors"
	"slices"
	"sync"
	"syscall"

	"github.com/sluice-proxy/sluice/observe"
	"github.com/sluice-proxy/sluice/rules"
)

// Engine implements ctl.Engine in memory. It is safe for concurrent use.
type Engine struct {
	mu       sync.Mutex
	pifs     []string
	gen      uint64
	active   []*rules.Rule
	old      []*rules.Rule // the table before the pending apply
	pending  bool
	stopped  bool
	fail     map[uint16]syscall.Errno
	sessions int64

	applies, commits, rollbacks int
	outcomes                    []rules.TxnOutcome // as ctl.TxnObserver reported them

	hub      observe.Hub // rules and binds events, published with mu held (events.go)
	live     []observe.Session
	counters []observe.Counter
}

// New returns an engine with named pifs (host is implicit) whose active
// table is rs at generation gen.
func New(gen uint64, pifs []string, rs ...*rules.Rule) *Engine {
	return &Engine{gen: gen, pifs: slices.Clone(pifs), active: slices.Clone(rs), fail: map[uint16]syscall.Errno{}}
}

// FailPort makes every new bind of port fail with errno, as a port another
// process holds would. A kept key's socket moves and does not fail.
func (e *Engine) FailPort(port uint16, errno syscall.Errno) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.fail[port] = errno
}

// SetSessions sets the live session count Sessions reports.
func (e *Engine) SetSessions(n int64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.sessions = n
}

// Stop makes later applies fail, as a stopped engine's do.
func (e *Engine) Stop() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.stopped = true
}

// Counts returns how many applies, commits and rollbacks were done.
func (e *Engine) Counts() (applies, commits, rollbacks int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.applies, e.commits, e.rollbacks
}

// TxnEnded records a writing transaction's outcome (ctl.TxnObserver).
func (e *Engine) TxnEnded(outcome rules.TxnOutcome) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.outcomes = append(e.outcomes, outcome)
}

// Outcomes returns the transaction outcomes reported so far, in order.
func (e *Engine) Outcomes() []rules.TxnOutcome {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.outcomes)
}

// Pending reports whether an apply waits for commit or rollback.
func (e *Engine) Pending() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.pending
}

// Lines returns the active table as canonical lines.
func (e *Engine) Lines() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]string, len(e.active))
	for i, r := range e.active {
		out[i] = r.String()
	}
	return out
}

func (e *Engine) Pifs() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.pifs)
}

func (e *Engine) Generation() uint64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.gen
}

func (e *Engine) Rules() []*rules.Rule {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.active)
}

// Tables returns the committed table and, while an apply is pending, the
// applied one (ctl.Engine).
func (e *Engine) Tables() (uint64, []*rules.Rule, []*rules.Rule, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.pending {
		return e.gen, slices.Clone(e.old), slices.Clone(e.active), true
	}
	return e.gen, slices.Clone(e.active), nil, false
}

func (e *Engine) Sessions() int64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.sessions
}

// Apply swaps to rs: kept keys move, added keys bind unless FailPort says
// otherwise, removed keys are paused.
func (e *Engine) Apply(rs []*rules.Rule) (*rules.Summary, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.stopped {
		return nil, errors.New("engine stopped")
	}
	if e.pending {
		return nil, errors.New("an apply is already pending")
	}
	d := rules.TableDiff(e.active, rs)
	kept := map[rules.Key]bool{}
	for _, k := range d.Kept {
		kept[k] = true
	}
	s := &rules.Summary{Generation: e.gen + 1, Kept: len(d.Kept), Removed: len(d.Removed)}
	for _, r := range rs {
		res := rules.NewResult(r)
		for _, k := range r.ListenKeys() {
			if errno, bad := e.fail[k.Port]; bad && !kept[k] {
				res.Failed = append(res.Failed, rules.PortError{Port: k.Port, Errno: errno, Msg: errno.Error()})
				continue
			}
			res.Bound++
			if !kept[k] {
				s.Added++
			}
		}
		s.Rules = append(s.Rules, res)
	}
	e.old, e.active, e.pending = e.active, slices.Clone(rs), true
	e.applies++
	e.publishApplied(s)
	return s, nil
}

func (e *Engine) Commit() (uint64, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.pending {
		return 0, errors.New("no apply is pending")
	}
	e.gen++
	e.old, e.pending = nil, false
	e.commits++
	e.publish("committed", e.gen)
	return e.gen, nil
}

// Rollback restores the table of before the apply; its summary has every
// port bound (paused sockets resume, nothing binds again).
func (e *Engine) Rollback() (*rules.Summary, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.pending {
		return nil, errors.New("no apply is pending")
	}
	d := rules.TableDiff(e.active, e.old)
	s := &rules.Summary{Generation: e.gen, Kept: len(d.Kept), Removed: len(d.Removed)}
	for _, r := range e.old {
		res := rules.NewResult(r)
		res.Bound = res.Requested
		s.Rules = append(s.Rules, res)
	}
	e.active, e.old, e.pending = e.old, nil, false
	e.rollbacks++
	e.publish("rolled-back", e.gen)
	return s, nil
}
