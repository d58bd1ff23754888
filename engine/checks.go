package engine

import (
	"net/netip"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/balance"
	"github.com/sluice-proxy/sluice/check"
	"github.com/sluice-proxy/sluice/rules"
)

// Active health checks on the event loops. A rule with check= has one
// checker per backend address (every port of a range whose pools share a
// backend shares its checker and its balance.Health); each checker belongs
// to one loop, is a handler of its fd there like a session, and uses one
// timer for both its next start and its timeout. There is no goroutine per
// check. A rule's checks start spread over the interval (check.Offset) and
// each keeps its cadence from its own start, so they stay spread.
//
// Fds are bounded: a checker has at most one check in flight (rules
// validates check.timeout <= check.interval), and a loop runs at most
// maxChecksInFlight at once; a check that finds the loop at its bound waits
// checkBusyRetry and tries again.
//
// Life: a rule's checks (ruleChecks, by canonical line in e.chk.byLine) are made
// when a listener of the rule is, by Listen or Apply; a kept rule (same
// line) keeps them; a changed rule's checkers start from the state the old
// rule's had for the same backend (attachChecks' seed). Commit and Rollback
// stop the checks of rules no longer in the table (pruneChecks).

const (
	maxChecksInFlight = 1024
	checkBusyRetry    = 50 * time.Millisecond
)

// ruleChecks is the active checks of one rule.
type ruleChecks struct {
	line    string
	name    string // the rule's name in events and logs (its listen part)
	spec    rules.Check
	tp      *pif
	byAddr  map[netip.AddrPort]*checker
	list    []*checker
	latency Histogram // check latencies of every backend (successes and failures)

	noResource atomic.Uint64 // checks not started: no fd
}

// engineChecks is the engine's part of the checks. Fields are e.mu's, but
// inFlight: element i is loop i's alone.
type engineChecks struct {
	byLine   map[string]*ruleChecks
	rule     *rules.Rule // attachChecks' last rule and its checks
	rc       *ruleChecks
	inFlight []int // checks in flight, by loop
	next     int   // the loop of the next checker, round robin
}

// checker checks one backend. Its fields past the constant ones are its
// loop's alone.
type checker struct {
	rc     *ruleChecks
	loop   *Loop
	target netip.AddrPort // the backend, as pools and stats name it
	addr   netip.AddrPort // where checks go (check.port)
	req    []byte         // check=http: the request
	health balance.Health

	tmr     timer
	probe   check.Probe
	began   int64 // engine clock of the check in flight's start, or the last one's
	stopped bool
}

var _ handler = (*checker)(nil)
var _ expirer = (*checker)(nil)

// checksFor returns the checks of r (line: its canonical line; name: its
// name in events and logs), made if the table has none for that line yet. Called with e.mu held.
func (e *Engine) checksFor(r *rules.Rule, line, name string, tp *pif) *ruleChecks {
	if rc := e.chk.byLine[line]; rc != nil {
		return rc
	}
	if e.chk.byLine == nil {
		e.chk.byLine = map[string]*ruleChecks{}
	}
	rc := &ruleChecks{line: line, name: name, spec: r.Check.Effective(), tp: tp, byAddr: map[netip.AddrPort]*checker{}}
	e.chk.byLine[line] = rc
	return rc
}

// attachGroupChecks is attachChecks for every route of front's key (front
// alone when the key does not route); a route starts from the state of the
// old key's route with the same match, else of old's own pool.
func (e *Engine) attachGroupChecks(front, old *Listener) {
	if front.routes == nil {
		e.attachChecks(front, old)
		return
	}
	for _, rl := range front.routes {
		prev := old
		if old != nil {
			for _, orl := range old.routes {
				if orl.rule.RouteString() == rl.rule.RouteString() {
					prev = orl
				}
			}
		}
		e.attachChecks(rl, prev)
	}
}

// attachChecks gives every backend of ln's pool its checker's health, made
// for backends not yet checked by the rule; old is the listener ln takes
// the socket of (nil if none): a backend its pool checked too starts from
// that state. Called with e.mu held, before ln serves.
func (e *Engine) attachChecks(ln *Listener, old *Listener) {
	r := ln.rule
	if r.Check.Kind == rules.CheckNone || ln.pool.Len() == 0 {
		return
	}
	if e.chk.rule != r {
		// Ports of one rule come in a row: one canonical line per rule.
		e.chk.rule, e.chk.rc = r, e.checksFor(r, r.String(), ln.ruleName(), ln.targetPif)
	}
	rc := e.chk.rc
	for i := 0; i < ln.pool.Len(); i++ {
		t := ln.pool.Target(i)
		c := rc.byAddr[t]
		if c == nil {
			c = &checker{rc: rc, target: t, addr: check.Addr(rc.spec, t)}
			c.tmr.owner = c
			if rc.spec.Kind == rules.CheckHTTP {
				c.req = check.Request(rc.spec.Path, e.hostOf(r, t))
			}
			if old != nil {
				for j := 0; j < old.pool.Len(); j++ {
					if h := old.pool.Check(j); h != nil && old.pool.Target(j) == t {
						c.health.CopyFrom(h)
						break
					}
				}
			}
			rc.byAddr[t] = c
			rc.list = append(rc.list, c)
		}
		ln.pool.SetCheck(i, &c.health)
	}
}

// hostOf names backend t of r as an HTTP check's Host says it: the target's
// host name when t is one of its addresses, else the address.
func (e *Engine) hostOf(r *rules.Rule, t netip.AddrPort) string {
	for _, tg := range r.Targets {
		if tg.Host != "" && t.Port() >= tg.Ports.First && t.Port() <= tg.Ports.Last && slices.Contains(e.addrsOf(tg.Host), t.Addr()) {
			return tg.Host + ":" + strconv.Itoa(int(t.Port()))
		}
	}
	return t.String()
}

// startChecks starts the checkers made since the last call (a new rule's,
// or a name's new address), each rule's new ones spread over its interval,
// all of them over the loops. Called with e.mu held.
func (e *Engine) startChecks() {
	e.chk.rule, e.chk.rc = nil, nil
	if e.chk.inFlight == nil {
		e.chk.inFlight = make([]int, len(e.loops))
	}
	type start struct {
		c      *checker
		offset time.Duration
	}
	var todo []start
	for _, rc := range e.chk.byLine {
		var fresh []*checker
		for _, c := range rc.list {
			if c.loop == nil {
				fresh = append(fresh, c)
			}
		}
		for k, c := range fresh {
			c.loop = e.loops[e.chk.next%len(e.loops)]
			e.chk.next++
			todo = append(todo, start{c, check.Offset(k, len(fresh), rc.spec.Interval)})
		}
	}
	if len(todo) == 0 {
		return
	}
	e.onLoops(func(l *Loop) {
		for _, s := range todo {
			if s.c.loop == l {
				l.arm(&s.c.tmr, s.offset)
			}
		}
	})
}

// pruneChecks stops the checks of rules the active table no longer has.
// Called with e.mu held.
func (e *Engine) pruneChecks() {
	keep := map[string]bool{}
	for _, r := range e.rules {
		if r.Check.Kind != rules.CheckNone {
			keep[r.String()] = true
		}
	}
	var stop []*ruleChecks
	for line, rc := range e.chk.byLine {
		if !keep[line] {
			stop = append(stop, rc)
			delete(e.chk.byLine, line)
		}
	}
	e.stopChecks(stop)
}

// stopChecks ends the checks of rcs on their loops: timers disarmed, checks
// in flight closed. Called with e.mu held.
func (e *Engine) stopChecks(rcs []*ruleChecks) {
	if len(rcs) == 0 {
		return
	}
	e.onLoops(func(l *Loop) {
		for _, rc := range rcs {
			for _, c := range rc.list {
				if c.loop == l {
					c.stop(l)
				}
			}
		}
	})
}

func (c *checker) stop(l *Loop) {
	c.stopped = true
	l.wheel.del(&c.tmr)
	if fd := c.probe.FD(); fd >= 0 {
		l.forget(fd)
		c.probe.Close()
		l.e.chk.inFlight[l.id]--
	}
}

// expire starts a check when none is in flight, else ends the one in
// flight at its timeout.
func (c *checker) expire(l *Loop) {
	if c.stopped {
		return
	}
	if fd := c.probe.FD(); fd >= 0 {
		l.forget(fd)
		c.probe.Close()
		c.done(l, balance.ResultTimeout, &check.ReasonTimeout)
		return
	}
	c.start(l)
}

// start begins a check on loop l, or puts it off when the loop has its
// bound of checks in flight or no fd is to be had.
func (c *checker) start(l *Loop) {
	spec := &c.rc.spec
	if l.e.chk.inFlight[l.id] >= maxChecksInFlight {
		l.arm(&c.tmr, checkBusyRetry)
		return
	}
	fd, err := c.rc.tp.socket(family(c.addr.Addr()), unix.SOCK_STREAM)
	if err != nil {
		// Our shortage, not the backend's failure: no result, try later.
		c.began = l.now
		c.rc.noResource.Add(1)
		l.arm(&c.tmr, spec.Interval)
		return
	}
	if err := l.register(fd, check.Events, c); err != nil {
		unix.Close(fd)
		c.began = l.now
		l.arm(&c.tmr, spec.Interval)
		return
	}
	c.began = l.now
	l.e.chk.inFlight[l.id]++
	l.arm(&c.tmr, spec.Timeout)
	if done, res, reason := c.probe.Start(fd, c.addr, spec.Kind, c.req); done {
		l.forget(fd) // closed by the probe; nothing else ran on this loop in between
		c.done(l, res, reason)
	}
}

func (c *checker) handle(l *Loop, fd int, ev uint32) {
	if done, res, reason := c.probe.Event(ev); done {
		l.forget(fd)
		c.done(l, res, reason)
	}
}

// done records a check's result and arms the next one, an interval after
// this one began.
func (c *checker) done(l *Loop, res balance.Result, reason *string) {
	l.e.chk.inFlight[l.id]--
	rc := c.rc
	lat := time.Duration(l.now - c.began)
	rc.latency.observe(uint64(lat / time.Microsecond))
	if c.health.Record(res, lat, l.now, reason, rc.spec.Rise, rc.spec.Fall) {
		l.checkChanged(c, reason)
	}
	l.wheel.add(&c.tmr, (c.began+int64(rc.spec.Interval)+int64(tick)-1)/int64(tick))
}

// checkChanged logs and publishes a backend's transition by its checks.
func (l *Loop) checkChanged(c *checker, reason *string) {
	up := !c.health.Down()
	why := ""
	if reason != nil {
		why = *reason
	}
	l.log.Info("backend health changed", zap.String("rule", c.rc.name), zap.Stringer("backend", c.target),
		zap.Bool("up", up), zap.String("by", "check"), zap.String("reason", why))
	l.e.publishHealth(c.rc.name, c.target, up, "check", why)
}

// allChecks lists every rule's checks. Called with e.mu held.
func (e *Engine) allChecks() []*ruleChecks {
	out := make([]*ruleChecks, 0, len(e.chk.byLine))
	for _, rc := range e.chk.byLine {
		out = append(out, rc)
	}
	return out
}

// checkStats fills the check fields of a checked rule's stats: each
// backend once, and the checks' latency. Called with e.mu held.
func (e *Engine) checkStats(rs *RuleStats) {
	rc := e.chk.byLine[rs.Line]
	if rc == nil {
		return
	}
	rs.CheckTime = rc.latency.Snapshot()
	seen := make(map[netip.AddrPort]bool, len(rc.list))
	for _, b := range rs.Backends {
		if b.Checked && !seen[b.Target] {
			seen[b.Target] = true
			rs.Checked = append(rs.Checked, b)
		}
	}
}

// dropGoneCheckers stops the checkers of r's backends that no pool of r's
// listeners has any more (a name's address that went away). Called with
// e.mu held.
func (e *Engine) dropGoneCheckers(r *rules.Rule) {
	rc := e.chk.byLine[r.String()]
	if rc == nil {
		return
	}
	alive := map[netip.AddrPort]bool{}
	for _, ln := range e.listeners {
		if ln.rule == r {
			for i := 0; i < ln.pool.Len(); i++ {
				alive[ln.pool.Target(i)] = true
			}
		}
	}
	var gone []*checker
	keep := rc.list[:0]
	for _, c := range rc.list {
		if alive[c.target] {
			keep = append(keep, c)
		} else {
			gone = append(gone, c)
			delete(rc.byAddr, c.target)
		}
	}
	rc.list = keep
	if len(gone) == 0 {
		return
	}
	e.onLoops(func(l *Loop) {
		for _, c := range gone {
			if c.loop == l {
				c.stop(l)
			}
		}
	})
}
