package engine

import (
	"errors"
	"fmt"
	"slices"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/handshake"
	"github.com/sluice-proxy/sluice/rules"
)

// The live table change. Apply swaps the active table for a new one and
// syncs the sockets by listen key:
//
//   - a key in both tables keeps its socket: never closed, never re-bound.
//     If its rule is unchanged the listener stays as it is; if the rule
//     changed, a new Listener takes over the same fd on every loop, while
//     live sessions keep the old Listener, and so the rule they started with;
//   - a key only in the new table is bound here, on the caller's goroutine,
//     so every errno is tied to its rule and port in the summary;
//   - a key only in the old table is paused: no longer polled and, for tcp,
//     shutdown(SHUT_RD), which takes the socket out of LISTEN while it stays
//     bound (new SYNs are refused). Commit closes it; Rollback listen()s
//     again, so a rollback never has to bind.
//
// Apply leaves the change pending: Commit makes it final, Rollback undoes it.
// Only one apply is pending at a time.
//
// Locking: Apply, Commit and Rollback hold Engine.amu from start to end, so
// they (and every other writer of the table) run one at a time; they take
// Engine.mu only to read the table, to attach checks and to swap. Binds,
// closes and the loop syncs run outside it, so Stats (a scrape), status,
// list and a watch subscription wait for a swap, never for the sockets.
// A reader sees the table of before an operation until its swap, and the
// one after from then on; the events of the rules group are published in
// the swap's critical section, which keeps a watcher's state and events
// joined. The syscalls and loop work of an apply
// are proportional to the difference between the tables; matching the keys
// is one hash lookup per listen key.
//
// A paused socket stays bound until commit, so a new table cannot take a
// port that a removed rule held under another address of the same family
// (0.0.0.0:80 replaced by 127.0.0.1:80): the bind fails with "address
// already in use". Such a change takes two transactions: remove, then add.

// ErrPending is returned by Apply while an earlier apply awaits Commit or
// Rollback, and by Commit and Rollback when none is pending.
var (
	ErrPending   = errors.New("an applied table awaits commit or rollback")
	ErrNoPending = errors.New("no applied table awaits commit or rollback")
)

// pendingApply is what Commit or Rollback needs of an apply.
type pendingApply struct {
	oldRules     []*rules.Rule
	oldListeners []*Listener
	added        []*Listener             // bound by the apply
	swapped      map[*Listener]*Listener // kept key, changed rule: old -> new, same fd
	paused       []*Listener             // removed keys
}

// Generation returns the active table's generation: 0 at start, one more at
// each commit.
func (e *Engine) Generation() uint64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.gen
}

// Rules returns the active table, in order.
func (e *Engine) Rules() []*rules.Rule {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]*rules.Rule(nil), e.rules...)
}

// Tables returns, as one read, the committed table and its generation and,
// while an apply awaits Commit or Rollback, the applied table (pending
// true): the one the sockets serve, which gets generation gen+1 if
// committed. The committed table is the pending apply's old rules.
func (e *Engine) Tables() (gen uint64, committed, applied []*rules.Rule, pending bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if p := e.pending; p != nil {
		return e.gen, slices.Clone(p.oldRules), slices.Clone(e.rules), true
	}
	return e.gen, slices.Clone(e.rules), nil, false
}

// Pifs returns the named pifs in the order they were added; the host pif
// (index 0 in the control protocol) is not listed.
func (e *Engine) Pifs() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	names := make([]string, 0, len(e.pifs))
	for _, p := range e.pifOrder {
		names = append(names, p.name)
	}
	return names
}

// Sessions returns the number of live sessions.
func (e *Engine) Sessions() int64 { return e.active.Load() }

// Apply replaces the active table with rs and syncs the listening sockets
// (see above). The rules must be valid, alone and as a table; pifs must
// exist. It returns the summary of what was bound and what failed; the
// change stays pending until Commit or Rollback, whatever the verdict.
// Errors: ErrPending, ErrStopped, an unknown pif, or a target's host name
// that does not resolve (names.go) (nothing changed then).
func (e *Engine) Apply(rs []*rules.Rule) (*rules.Summary, error) {
	start := time.Now()
	if err := e.resolveRules(rs); err != nil {
		return nil, err
	}
	// Read again at every apply: a replaced certificate is a changed rule.
	tlsBy, ti, err := loadTLS(rs)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", rs[ti], err)
	}
	// The binds and the loop sync run under amu alone: readers (Stats,
	// status, list, Watch) take e.mu, which is held only to read the table
	// here, to attach checks, and for the swap at the end.
	e.amu.Lock()
	defer e.amu.Unlock()
	e.mu.Lock()
	cur, gen, err := e.applyStart(rs)
	e.mu.Unlock()
	if err != nil {
		return nil, err
	}
	byKey := make(map[rules.Key]*Listener, len(cur.listeners))
	for _, ln := range cur.listeners {
		if ln.key.Port != 0 {
			byKey[ln.key] = ln
		}
	}
	p := &pendingApply{oldRules: cur.rules, oldListeners: cur.listeners, swapped: map[*Listener]*Listener{}}
	sum := &rules.Summary{Generation: gen + 1}
	type attach struct{ ln, old *Listener } // checks to attach, under e.mu, before the listener serves
	var attaches []attach
	var next []*Listener
	canon := map[*rules.Rule]string{} // rules' canonical lines, each made once
	line := func(r *rules.Rule) string {
		if c, ok := canon[r]; ok {
			return c
		}
		canon[r] = r.String()
		return canon[r]
	}
	sum.Rules = make([]rules.RuleResult, len(rs))
	resOf := make(map[*rules.Rule]*rules.RuleResult, len(rs))
	for i, r := range rs {
		sum.Rules[i] = rules.NewResult(r)
		resOf[r] = &sum.Rules[i]
	}
	// A key's routes (rules with the same listen part) share its socket and
	// its listener; a rule that routes nothing is a group of one.
	for _, g := range rules.RouteGroups(rs) {
		r := g[0]
		lp, _ := e.pif(r.ListenPif)
		// The group's policies and counters are made with its first new
		// listener: a kept, unchanged group keeps its own, and costs nothing.
		var pols []*handshake.Policy
		policies := func() []*handshake.Policy {
			if pols == nil {
				pols = groupPolicies(g)
				for j, r := range g {
					pols[j].SetTLS(tlsBy[r])
				}
			}
			return pols
		}
		ctrs := make([]*RuleCounters, len(g))
		sig := groupSignature(g, func(r *rules.Rule) string { return line(r) + tlsDigest(tlsBy, r) })
		for i, key := range r.ListenKeys() {
			if old := byKey[key]; old != nil {
				delete(byKey, key) // each socket moves to one group only
				ln := old
				if old.signature(line) != sig {
					ln = e.newGroupListener(g, i, old.fd, old.addr, lp, policies(), ctrs, ownerOf(old))
					attaches = append(attaches, attach{ln, old})
					if old.udp != nil {
						// Live flows keep their rule and target, as tcp
						// sessions do; sharing the table keeps them found
						// and closed with the socket.
						ln.udp.flows = old.udp.flows
					}
					p.swapped[old] = ln
				}
				next = append(next, ln)
				for _, gr := range g {
					resOf[gr].Bound++
				}
				sum.Kept++
				continue
			}
			fd, bound, err := e.openSocket(lp, r.Proto, key) // an inherited socket, else a new one (inherit.go)
			if err != nil {
				for _, gr := range g {
					resOf[gr].Failed = append(resOf[gr].Failed, portError(key.Port, err))
				}
				continue
			}
			ln := e.newGroupListener(g, i, fd, bound, lp, policies(), ctrs, nil)
			attaches = append(attaches, attach{ln, nil})
			p.added = append(p.added, ln)
			next = append(next, ln)
			for _, gr := range g {
				resOf[gr].Bound++
			}
			sum.Added++
		}
	}
	for _, ln := range cur.listeners { // what no new rule took is paused
		if ln.key.Port == 0 || byKey[ln.key] == ln {
			p.paused = append(p.paused, ln)
		}
	}
	sum.Removed = len(p.paused)
	for _, ln := range p.paused {
		ln.closed.Store(true) // an EMFILE-paused loop must not resume it
	}
	if len(attaches) > 0 {
		e.mu.Lock()
		for _, a := range attaches {
			e.attachGroupChecks(a.ln, a.old)
		}
		e.mu.Unlock()
	}
	// Until the swap below, readers see the old table, not pending, while
	// the loops already serve the new one: a read is from before the
	// apply or after it, never from half of it.
	regErr := e.syncLoops(p.paused, p.added, p.swapped)
	for _, ln := range p.paused {
		if ln.udp == nil {
			// Out of LISTEN, still bound. Only now that no loop polls it:
			// the shutdown wakes the socket's pollers, and a loop would
			// take that for an accept failure (EINVAL). Errors are
			// ignored: the socket is no longer polled either way.
			_ = unix.Shutdown(ln.fd, unix.SHUT_RD)
		}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.startChecks()
	e.rules, e.listeners, e.pending = rs, next, p
	if regErr != nil {
		// Polling a new socket failed (ENOMEM, say): report it as that
		// port's failure, so the verdict is bad and the caller rolls back.
		sum.Rules = append(sum.Rules, rules.RuleResult{Rule: "(engine)", Listen: "(engine)", Failed: []rules.PortError{portError(0, regErr)}})
	}
	e.noteApply(start, rs, sum)
	e.publishApplied(sum)
	return sum, nil
}

// tableNow is the table an apply starts from.
type tableNow struct {
	rules     []*rules.Rule
	listeners []*Listener
}

// applyStart checks that rs may be applied now and returns the table it
// replaces and its generation. Called with amu and e.mu held.
func (e *Engine) applyStart(rs []*rules.Rule) (tableNow, uint64, error) {
	if !e.started || e.stopped {
		return tableNow{}, 0, ErrStopped
	}
	e.startResolver(rs)
	if e.pending != nil {
		return tableNow{}, 0, ErrPending
	}
	var current map[string]bool // the committed table's lines, made only when a pif is gone
	for _, r := range rs {
		for _, name := range [...]string{r.ListenPif, r.TargetPif} {
			p, err := e.pif(name)
			if err == nil {
				err = p.alive()
				if err != nil {
					// A rule kept as it is goes on in the namespace the
					// pif still holds (its sockets are there): a warning.
					// One to bind there anew would be reachable by no one.
					if current == nil {
						current = map[string]bool{}
						for _, c := range e.rules {
							current[c.String()] = true
						}
					}
					if current[r.String()] {
						e.log.Warn("a kept rule's pif namespace is gone; its sockets stay in the namespace the daemon holds",
							zap.Stringer("rule", r), zap.Error(err))
						err = nil
					}
				}
			}
			if err != nil {
				return tableNow{}, 0, fmt.Errorf("%s: %w", r, err)
			}
		}
	}
	return tableNow{rules: e.rules, listeners: e.listeners}, e.gen, nil
}

// ownerOf returns the loop that owns a udp listener's flows (nil for tcp).
func ownerOf(ln *Listener) *Loop {
	if ln.udp == nil {
		return nil
	}
	return ln.udp.loop
}

// portError describes a failed bind for the summary.
func portError(port uint16, err error) rules.PortError {
	pe := rules.PortError{Port: port, Msg: err.Error()}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		pe.Errno = errno
		pe.Msg = errno.Error()
	}
	return pe
}

// syncLoops makes every loop poll the new state at once: stop polling what
// is paused, poll what was added, and hand the fds of swapped listeners to
// their new Listener (also in a loop's list of listeners paused for lack of
// fds). It returns the first error of registering an added listener.
func (e *Engine) syncLoops(stop, start []*Listener, swap map[*Listener]*Listener) error {
	var regErr firstErr // every loop may report at once
	e.onLoops(func(l *Loop) {
		for _, ln := range stop {
			if ln.udp == nil || ln.udp.loop == l {
				l.unregister(ln.fd)
			}
		}
		for _, ln := range start {
			if err := l.registerListener(ln); err != nil {
				regErr.set(fmt.Errorf("port %d: epoll_ctl: %w", ln.addr.Port(), err))
			}
		}
		for old, ln := range swap {
			if l.table[old.fd] == handler(old) {
				l.table[old.fd] = ln
			}
		}
		for i, ln := range l.paused {
			if n, ok := swap[ln]; ok {
				l.paused[i] = n
			}
		}
	})
	return regErr.get()
}

// Commit makes the pending apply final: paused sockets are closed, the old
// table is dropped. It returns the new generation.
func (e *Engine) Commit() (uint64, error) {
	start := time.Now()
	e.amu.Lock()
	defer e.amu.Unlock()
	e.mu.Lock()
	p := e.pending
	e.mu.Unlock()
	if p == nil {
		return e.Generation(), ErrNoPending
	}
	// The paused sockets are in no table readers see: closed under amu
	// alone.
	e.closeListeners(p.paused)
	e.mu.Lock()
	defer e.mu.Unlock()
	e.pending = nil
	e.pruneChecks()
	e.gen++
	e.noteEnd(OpCommit, start, nil)
	e.publishTable("committed")
	return e.gen, nil
}

// Rollback undoes the pending apply: sockets it bound are closed, swapped
// ones go back to their old listeners, paused ones listen again. It returns
// the summary of the restored table: a paused socket that cannot listen
// again (rare: the kernel refused listen(2)) is reported as failed.
func (e *Engine) Rollback() (*rules.Summary, error) {
	start := time.Now()
	e.amu.Lock()
	defer e.amu.Unlock()
	e.mu.Lock()
	p := e.pending
	e.mu.Unlock()
	if p == nil {
		return nil, ErrNoPending
	}
	// The sockets' work under amu alone; readers see the applied table,
	// pending, until the swap back below.
	e.closeListeners(p.added)
	back := make(map[*Listener]*Listener, len(p.swapped))
	for old, ln := range p.swapped {
		back[ln] = old
	}
	failed := map[*Listener]error{}
	var resume []*Listener
	for _, ln := range p.paused {
		if ln.udp == nil {
			if err := unix.Listen(ln.fd, backlog); err != nil {
				failed[ln] = err
				continue
			}
		}
		ln.closed.Store(false)
		resume = append(resume, ln)
	}
	regErr := e.syncLoops(nil, resume, back)
	e.mu.Lock()
	defer e.mu.Unlock()
	e.pending = nil
	e.rules, e.listeners = p.oldRules, p.oldListeners
	e.pruneChecks()
	sum := &rules.Summary{Generation: e.gen, Removed: len(p.added)}
	byRule := map[*rules.Rule]*rules.RuleResult{}
	for _, r := range e.rules {
		sum.Rules = append(sum.Rules, rules.NewResult(r))
	}
	for i, r := range e.rules {
		byRule[r] = &sum.Rules[i]
	}
	for _, ln := range e.listeners {
		rls := ln.routes
		if rls == nil {
			rls = []*Listener{ln}
		}
		for _, rl := range rls {
			res := byRule[rl.rule]
			if res == nil {
				continue // a listener added by Listen outside the table
			}
			if err := failed[ln]; err != nil {
				res.Failed = append(res.Failed, portError(ln.addr.Port(), fmt.Errorf("listen again: %w", err)))
				continue
			}
			res.Bound++
		}
	}
	sum.Kept = len(e.listeners) - len(failed)
	e.noteEnd(OpRollback, start, sum)
	e.publishTable("rolled-back")
	if regErr != nil {
		return sum, regErr
	}
	return sum, nil
}
