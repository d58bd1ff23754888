package engine

import (
	"encoding/binary"
	"math"
	"net/netip"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/balance"
	"github.com/sluice-proxy/sluice/handshake"
	"github.com/sluice-proxy/sluice/rules"
)

// Counters for metrics and the status page. They are read at scrape time
// (Stats); the data path only adds to them, and what it pays is:
//
//   - per event that moves bytes: up to three atomic adds on the rule's shard
//     of the loop that runs the session. Only that loop writes its shard (one
//     cache line per loop), so the adds never contend and nothing locks;
//   - per session: an atomic add at its start and a few at its end, where its
//     handshake, connect and total durations are each observed once in a
//     fixed-bucket histogram (a scan of at most 16 bounds, two atomic adds);
//   - nothing allocates.
//
// Building with the tag sluice_nocounters compiles these adds out (not the
// handshake policy's counters, nor the engine-wide ones that predate them),
// so the cost can be measured: see bench/RESULTS.md.

// cacheLine is the size a loop's shard is padded to.
const cacheLine = 64

// ruleShard is one loop's part of a rule's data-path counters.
type ruleShard struct {
	live     atomic.Int64  // sessions of the rule on this loop, from accept to end
	bytesIn  atomic.Uint64 // client to backend
	bytesOut atomic.Uint64 // backend to client
	spliced  atomic.Uint64 // of both, moved through a pipe (the rest went through a buffer)
	_        [cacheLine - 32]byte
}

// RuleCounters are the engine's counters of one rule, shared by its ports.
// A rule that a table change keeps unchanged keeps its counters; a changed
// rule starts new ones (its sessions still running count in the old ones,
// which Stats no longer shows).
type RuleCounters struct {
	name   string      // the rule's listen part, pif included: its label
	shards []ruleShard // by loop id

	connectErrors atomic.Uint64 // backend connects that failed (each try)
	retries       atomic.Uint64 // connects to a further backend of the pool after a failure
	terms         [whoCount][phaseCount]atomic.Uint64

	handshake Histogram // accept to the end of the incoming chain, sessions that passed it
	connect   Histogram // end of the chain to backend connected (retries included)
	session   Histogram // accept to end, sessions that passed the chain
}

// countersFor returns *c, made for rule r on first use.
func (e *Engine) countersFor(c **RuleCounters, r *rules.Rule) *RuleCounters {
	if *c == nil {
		*c = e.newRuleCounters(r)
	}
	return *c
}

func (e *Engine) newRuleCounters(r *rules.Rule) *RuleCounters {
	return &RuleCounters{name: r.ListenString(), shards: make([]ruleShard, len(e.loops)),
		session: Histogram{bounds: durationBounds[:]}}
}

// ruleName is the name of ln's rule in metrics and logs: its listen part,
// pif included ("tcp 0.0.0.0:8080"); a port-0 rule is named by the port it
// got, so two such rules do not share a name.
func (ln *Listener) ruleName() string {
	if ln.key.Port == 0 {
		return rules.Key{Pif: ln.key.Pif, Proto: ln.key.Proto, Addr: ln.key.Addr, Port: ln.addr.Port()}.String()
	}
	return ln.ctr.name
}

// begin counts a new session of the rule on loop l.
func (c *RuleCounters) begin(l *Loop) {
	if CountersEnabled {
		c.shards[l.id].live.Add(1)
	}
}

// moved counts bytes a session of the rule moved on loop l: up client to
// backend, down backend to client, spliced of both through a pipe.
func (c *RuleCounters) moved(l *Loop, up, down int, spliced uint64) {
	if !CountersEnabled {
		return
	}
	sh := &c.shards[l.id]
	if up > 0 {
		sh.bytesIn.Add(uint64(up))
	}
	if down > 0 {
		sh.bytesOut.Add(uint64(down))
	}
	if spliced > 0 {
		sh.spliced.Add(spliced)
	}
}

// retry counts a connect to a further backend after a failed one.
func (c *RuleCounters) retry() {
	if CountersEnabled {
		c.retries.Add(1)
	}
}

// connectError counts a failed backend connect of a rule, engine-wide and
// on the rule.
func (l *Loop) connectError(ln *Listener) {
	l.e.connectErrors.Add(1)
	if CountersEnabled {
		ln.ctr.connectErrors.Add(1)
	}
}

// ended counts the end of a session of the rule on loop l: its termination
// code and, once it passed the incoming chain, its durations.
func (c *RuleCounters) ended(l *Loop, s *session, t Term) {
	if !CountersEnabled {
		return
	}
	c.shards[l.id].live.Add(-1)
	c.terms[t.who][t.phase].Add(1)
	if s.flags&sfPassed == 0 {
		return
	}
	c.handshake.observe(uint64(s.hsUs))
	if s.flags&sfConnected != 0 {
		c.connect.observe(uint64(s.connUs - min(s.hsUs, s.connUs)))
	}
	if d := l.now - s.start; d > 0 {
		c.session.observe(uint64(d) / 1000)
	}
}

// sinceUs returns the microseconds from start to now (loop clock, ns),
// within a uint32 (71 minutes; longer is clamped).
func sinceUs(now, start int64) uint32 {
	d := (now - start) / 1000
	switch {
	case d <= 0:
		return 0
	case d > math.MaxUint32:
		return math.MaxUint32
	}
	return uint32(d)
}

// Histogram bucket upper bounds, in microseconds.
var (
	// latencyBounds: handshakes, connects, table applies (100 µs to 10 s).
	latencyBounds = [...]uint64{100, 250, 500, 1e3, 2.5e3, 5e3, 10e3, 25e3, 50e3, 100e3, 250e3, 500e3, 1e6, 2.5e6, 5e6, 10e6}
	// durationBounds: whole sessions (1 ms to a day).
	durationBounds = [...]uint64{1e3, 10e3, 100e3, 1e6, 5e6, 10e6, 30e6, 60e6, 300e6, 900e6, 3600e6, 21600e6, 86400e6}
)

const maxBuckets = len(latencyBounds)

// Histogram counts observations in fixed buckets: one atomic add for the
// bucket and one for the sum per observation, no lock, no allocation. The
// zero value has the latency buckets (100 µs to 10 s).
type Histogram struct {
	bounds []uint64                      // upper bounds in µs, ascending; nil: latencyBounds
	counts [maxBuckets + 1]atomic.Uint64 // by bucket; the last is above every bound
	sumUs  atomic.Uint64
}

func (h *Histogram) bucketBounds() []uint64 {
	if h.bounds == nil {
		return latencyBounds[:]
	}
	return h.bounds
}

// observe counts a value of us microseconds.
func (h *Histogram) observe(us uint64) {
	b := h.bucketBounds()
	i := 0
	for i < len(b) && us > b[i] {
		i++
	}
	h.counts[i].Add(1)
	h.sumUs.Add(us)
}

// Snapshot reads the histogram. Observations running meanwhile may be in the
// counts and not yet in the sum, or the other way round.
func (h *Histogram) Snapshot() HistogramSnapshot {
	b := h.bucketBounds()
	s := HistogramSnapshot{Bounds: make([]float64, len(b)), Counts: make([]uint64, len(b)+1)}
	for i, us := range b {
		s.Bounds[i] = float64(us) / 1e6
	}
	for i := range s.Counts {
		s.Counts[i] = h.counts[i].Load()
	}
	s.Sum = float64(h.sumUs.Load()) / 1e6
	return s
}

// HistogramSnapshot is a histogram's state in seconds.
type HistogramSnapshot struct {
	Bounds []float64 // bucket upper bounds (le), seconds, ascending
	Counts []uint64  // observations per bucket, not cumulative; the last is above every bound
	Sum    float64   // seconds
}

// Count returns the number of observations.
func (h HistogramSnapshot) Count() uint64 {
	var n uint64
	for _, c := range h.Counts {
		n += c
	}
	return n
}

// Transactions.

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

// TxnEnded counts one writing transaction by its outcome ("committed",
// "rolled_back", anything else is "failed"): the control server's
// ctl.TxnObserver call.
func (e *Engine) TxnEnded(outcome string) {
	switch outcome {
	case "committed":
		e.ctr.txn.Committed.Add(1)
	case "rolled_back":
		e.ctr.txn.RolledBack.Add(1)
	default:
		e.ctr.txn.Failed.Add(1)
	}
}

// Txn ops, as TxnRecord.Op names them.
const (
	OpApply    = "apply"
	OpCommit   = "commit"
	OpRollback = "rollback"
)

// recentTxns is how many table operations Stats shows.
const recentTxns = 16

// TxnRecord is one table operation of the engine: an apply, a commit or a
// rollback.
type TxnRecord struct {
	Time       time.Time
	Op         string         // OpApply, OpCommit, OpRollback
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
func (e *Engine) note(op string, start time.Time, gen uint64, sum *rules.Summary) {
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
func (e *Engine) noteEnd(op string, start time.Time, sum *rules.Summary) {
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

// Snapshots.

// Listener states, as ListenerStats.State names them.
const (
	ListenerListening = "listening" // in the active table
	ListenerPending   = "pending"   // bound by an apply that awaits its commit
)

// ListenerStats is one listening socket of a rule.
type ListenerStats struct {
	Addr     netip.AddrPort
	State    string // ListenerListening or ListenerPending
	Accepted uint64 // tcp conns accepted on this port
	Paused   uint64 // times accept paused for want of fds
}

// UDPStats are a udp rule's flow counters, summed over its ports.
type UDPStats struct {
	Flows                     int64 // live
	Opened, Expired           uint64
	DatagramsIn, DatagramsOut uint64 // client to target, target to client
	Dropped                   uint64
}

// RuleStats is one rule of the table, its sockets and its counters.
type RuleStats struct {
	Line      string // canonical rule line
	Listen    string // listen part, pif included; a port-0 rule shows the port it got
	Pif       string // the listen pif: "host" or its name
	Proto     string
	Requested int                    // ports the rule listens on
	Failed    []rules.PortError      // ports that failed to bind at its apply
	Listeners []ListenerStats        // bound ports
	Backends  []balance.BackendStats // every port's pool, in port order (passive health)

	Policy handshake.Stats // accepted, passed, refused by step and code, health replies, PROXY headers

	Sessions                     int64  // live, from accept to end
	BytesIn, BytesOut, Spliced   uint64 // in: client to backend; Spliced: of both, through pipes
	ConnectErrors, Retries       uint64
	Terms                        map[string]uint64 // sessions ended, by termination code ("SC")
	Handshake, Connect, Duration HistogramSnapshot
	UDP                          UDPStats
}

// TableStats are the rule table's counters and its recent operations.
type TableStats struct {
	Generation                    uint64
	Pending                       bool     // an apply awaits commit or rollback
	Paused                        []string // listen keys the pending apply paused (closed at commit)
	Applies, Commits, Rollbacks   uint64
	ApplyTime                     HistogramSnapshot
	Committed, RolledBack, Failed uint64      // transactions by outcome, as the control server counted them
	Recent                        []TxnRecord // newest first
}

// counterStats fills the parts of s that come from this file.
func (e *Engine) counterStats(s *Stats) {
	s.FDs = openFDs()
	s.Draining = e.draining.Load()
	now := int64(time.Since(e.base))
	e.mu.Lock()
	defer e.mu.Unlock()
	t := &s.Table
	t.Generation, t.Pending = e.gen, e.pending != nil
	t.Applies, t.Commits, t.Rollbacks = e.ctr.applies.Load(), e.ctr.commits.Load(), e.ctr.rollbacks.Load()
	t.ApplyTime = e.ctr.applyTime.Snapshot()
	t.Committed, t.RolledBack, t.Failed = e.ctr.txn.Committed.Load(), e.ctr.txn.RolledBack.Load(), e.ctr.txn.Failed.Load()
	for i := 1; i <= e.ctr.n; i++ {
		t.Recent = append(t.Recent, e.ctr.recent[(e.ctr.next-i+recentTxns)%recentTxns])
	}
	added := map[*Listener]bool{}
	if p := e.pending; p != nil {
		for _, ln := range p.added {
			added[ln] = true
		}
		for _, ln := range p.paused {
			t.Paused = append(t.Paused, ln.key.String())
		}
	}
	// A rule's listeners are found by listen key: a kept socket keeps the
	// Listener of the rule object it was first bound for (and its counters).
	// Port 0 is no identity: those are the rule's own.
	byKey := make(map[rules.Key]*Listener, len(e.listeners))
	anyPort := map[*rules.Rule][]*Listener{}
	for _, ln := range e.listeners {
		if ln.key.Port == 0 {
			anyPort[ln.rule] = append(anyPort[ln.rule], ln)
		} else {
			byKey[ln.key] = ln
		}
	}
	for _, r := range e.rules {
		rs := RuleStats{Line: r.String(), Listen: r.ListenString(), Pif: rules.PifName(r.ListenPif), Proto: r.Proto.String(),
			Requested: r.ListenPorts.Len(), Failed: e.ctr.bindFailed[r], Terms: map[string]uint64{}}
		lns := anyPort[r]
		if r.ListenPorts.First != 0 {
			for _, k := range r.ListenKeys() {
				if ln := byKey[k]; ln != nil {
					lns = append(lns, ln)
				}
			}
		}
		if len(lns) > 0 {
			rs.Listen = lns[0].ruleName()
		}
		for _, ln := range lns {
			st := ListenerListening
			if added[ln] {
				st = ListenerPending
			}
			rs.Listeners = append(rs.Listeners, ListenerStats{Addr: ln.addr, State: st, Accepted: ln.Accepted.Load(), Paused: ln.Paused.Load()})
			rs.Backends = append(rs.Backends, ln.pool.Stats(now)...)
			if u := ln.udp; u != nil {
				rs.UDP.Flows += u.FlowsActive.Load()
				rs.UDP.Opened += u.FlowsOpened.Load()
				rs.UDP.Expired += u.FlowsExpired.Load()
				rs.UDP.DatagramsIn += u.DatagramsIn.Load()
				rs.UDP.DatagramsOut += u.DatagramsOut.Load()
				rs.UDP.Dropped += u.Dropped.Load()
			}
		}
		if len(lns) > 0 {
			// Every port of a rule shares its policy and counters.
			rs.Policy = lns[0].policy.Stats()
			c := lns[0].ctr
			for i := range c.shards {
				sh := &c.shards[i]
				rs.Sessions += sh.live.Load()
				rs.BytesIn += sh.bytesIn.Load()
				rs.BytesOut += sh.bytesOut.Load()
				rs.Spliced += sh.spliced.Load()
			}
			rs.ConnectErrors, rs.Retries = c.connectErrors.Load(), c.retries.Load()
			for w := range c.terms {
				for p := range c.terms[w] {
					if n := c.terms[w][p].Load(); n > 0 {
						rs.Terms[Term{who: uint8(w), phase: uint8(p)}.String()] = n
					}
				}
			}
			rs.Handshake, rs.Connect, rs.Duration = c.handshake.Snapshot(), c.connect.Snapshot(), c.session.Snapshot()
		}
		s.Rules = append(s.Rules, rs)
	}
}

// Totals are the engine's running totals for rates, cheaper to read than
// Stats. They cover the rules of the current table only, so a table change
// can make them go down.
type Totals struct {
	Sessions  int64  // live
	Accepted  uint64 // tcp conns accepted
	BytesIn   uint64 // client to backend
	BytesOut  uint64 // backend to client
	Datagrams uint64 // udp, both ways
}

// Totals returns the running totals.
func (e *Engine) Totals() Totals {
	t := Totals{Sessions: e.active.Load()}
	e.mu.Lock()
	defer e.mu.Unlock()
	seen := map[*RuleCounters]bool{}
	for _, ln := range e.listeners {
		t.Accepted += ln.Accepted.Load()
		if u := ln.udp; u != nil {
			t.Datagrams += u.DatagramsIn.Load() + u.DatagramsOut.Load()
		}
		if c := ln.ctr; !seen[c] { // once per rule: its ports share them
			seen[c] = true
			for i := range c.shards {
				t.BytesIn += c.shards[i].bytesIn.Load()
				t.BytesOut += c.shards[i].bytesOut.Load()
			}
		}
	}
	return t
}

// openFDs counts the process's open fds, as /proc/self/fd lists them (less
// the one reading it); -1 when it cannot be read. It reads the directory in
// one buffer, without a string per entry.
func openFDs() int {
	fd, err := unix.Open("/proc/self/fd", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1
	}
	defer unix.Close(fd)
	var buf [16 << 10]byte
	n := 0
	for {
		m, err := unix.Getdents(fd, buf[:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return -1
		}
		if m <= 0 {
			break
		}
		// struct linux_dirent64: ino u64, off s64, reclen u16, type u8, name.
		for off := 0; off+19 < m; {
			reclen := int(binary.NativeEndian.Uint16(buf[off+16:]))
			if reclen == 0 {
				break
			}
			name := buf[off+19 : off+reclen]
			if !(name[0] == '.' && (name[1] == 0 || name[1] == '.' && name[2] == 0)) {
				n++
			}
			off += reclen
		}
	}
	return n - 1
}
