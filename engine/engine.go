// Package engine owns the event loops (one goroutine per loop, epoll,
// eventfd wake-ups, a timer wheel), the listeners and their accept, outgoing
// connects, and the sessions that join a client to a backend through two
// channels. There is no goroutine per connection.
package engine

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/balance"
	"github.com/sluice-proxy/sluice/channel"
	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/handshake"
	"github.com/sluice-proxy/sluice/observe"
	"github.com/sluice-proxy/sluice/rules"
)

// Config sets up an Engine. Zero values take the defaults.
type Config struct {
	Loops    int // event loops; 0 = one per CPU
	BufSize  int // channel buffer size (default 16 KiB)
	PipeSize int // splice pipe size asked of the kernel (default 256 KiB)
	MaxPipes int // pipes for the whole process (default: 1/8 of the fd limit, within the user's pipe allowance); <0 disables splice
	MaxFlows int // udp flows of the whole process (default: 1/4 of the fd limit, at most 16384)
	Budget   int // bytes one pump of a direction moves before the session waits its turn (default channel.DefaultBudget); <0: no bound
	// BusyPoll is how long a loop keeps polling without blocking after its
	// last event (0, the default: it blocks at once). See Loop.run.
	BusyPoll time.Duration
	Log      *zap.Logger // nil = no logs
	// RefusalLog is the least time between two info lines of one rule's
	// refused connections (refusals.go); 0 = DefaultRefusalLog.
	RefusalLog time.Duration
}

// Engine runs the loops and the listeners. Its methods are safe for
// concurrent use.
type Engine struct {
	cfg    Config
	base   time.Time
	budget *channel.PipeBudget
	flows  flowBudget // udp flows of every listener (udp.go)
	loops  []*Loop
	log    *zap.Logger

	// amu serializes the writers of the table: Apply, Commit, Rollback,
	// Listen, the resolver's pool refresh, SetGeneration, AddPif and
	// Shutdown's table steps. It is taken before mu, and held across binds
	// and loop syncs, which mu is not (table.go): a reader takes mu alone.
	// The fields below are mu's; a writer holds amu too, so a value it
	// read under mu stays true until it writes it.
	amu  sync.Mutex
	tlsc tlsCounters // TLS handshakes (tls.go)

	mu        sync.Mutex
	listeners []*Listener
	stopping  []*Listener     // closed by Shutdown, their sessions still draining: still counted by Stats and Totals (statListeners)
	rules     []*rules.Rule   // the active table, in order
	gen       uint64          // the active table's generation
	pending   *pendingApply   // an apply not yet committed or rolled back
	confirmBy time.Time       // a commit-confirmed apply rolls back by itself then; zero: none (events.go)
	pifs      map[string]*pif // named pifs; the host pif is nil
	pifOrder  []*pif          // named pifs in the order added
	started   bool
	stopped   bool          // Shutdown began: no apply, no listener
	halted    bool          // Shutdown told the loops to stop: nothing more is posted to them for a reader (SessionList)
	nextLoop  atomic.Uint32 // round-robin owner for udp listeners

	active        atomic.Int64 // live sessions
	handshaking   atomic.Int64 // of those, conns still in their incoming handshake chain
	draining      atomic.Bool  // Shutdown began: health replies say down, no new session starts
	connectErrors atomic.Uint64
	endCodes      [32]atomic.Uint64 // sessions ended, by conn.Code
	ctr           engineCounters    // table operations and transactions (counters.go)
	hub           observe.Hub       // events for ctl watch (events.go)
	sessLimit     *observe.Limiter  // bounds the session events a second
	chk           engineChecks      // active health checks (checks.go)
	names         engineNames       // target host names (names.go)
	inh           engineInherit     // sockets offered by a predecessor or systemd (inherit.go)
}

// New creates the loops; Start runs them.
func New(cfg Config) (*Engine, error) {
	if cfg.Loops <= 0 {
		cfg.Loops = runtime.NumCPU()
	}
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	var rl unix.Rlimit
	tableSize := 1 << 16
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err == nil && rl.Cur < uint64(tableSize) {
		tableSize = int(rl.Cur)
	}
	if cfg.MaxPipes >= 0 {
		cfg.MaxPipes = channel.MaxPipes(cfg.MaxPipes, tableSize, cmp.Or(cfg.PipeSize, channel.DefaultPipeSize))
	}
	if cfg.MaxFlows <= 0 {
		cfg.MaxFlows = min(tableSize/4, 16384)
	}
	if cfg.RefusalLog <= 0 {
		cfg.RefusalLog = DefaultRefusalLog
	}
	e := &Engine{cfg: cfg, base: time.Now(), log: cfg.Log, sessLimit: observe.NewLimiter(SessionEventRate)}
	e.flows.max = int64(cfg.MaxFlows)
	if cfg.MaxPipes > 0 {
		e.budget = channel.NewPipeBudget(cfg.MaxPipes)
	}
	for i := 0; i < cfg.Loops; i++ {
		l, err := newLoop(e, i, tableSize)
		if err != nil {
			for _, l := range e.loops {
				unix.Close(l.epfd)
				unix.Close(l.wakefd)
			}
			return nil, err
		}
		e.loops = append(e.loops, l)
	}
	return e, nil
}

// Start runs the loops. It raises GOMAXPROCS to at least the loops + 1.
func (e *Engine) Start() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.started {
		return
	}
	e.started = true
	// A loop asleep in epoll_wait is in a system call: sysmon takes its P
	// away, and on waking the loop needs an idle P to go on. With GOMAXPROCS
	// equal to the loops (GOMAXPROCS follows the CPU affinity, so one pinned
	// CPU means one P) that P is often busy with the ctl server, a timer or
	// the GC, and the loop waits for it: one spare P halved the round-trip
	// cost in bench/RESULTS.md. Raised only, never lowered.
	if want := len(e.loops) + 1; runtime.GOMAXPROCS(0) < want {
		e.log.Debug("raising GOMAXPROCS so a waking loop finds an idle P",
			zap.Int("from", runtime.GOMAXPROCS(0)), zap.Int("to", want))
		runtime.GOMAXPROCS(want)
	}
	for _, l := range e.loops {
		go l.run()
	}
}

// onLoops runs fn on every loop and waits until all have run it; a loop
// that has stopped is skipped.
func (e *Engine) onLoops(fn func(*Loop)) {
	var wg sync.WaitGroup
	wg.Add(len(e.loops))
	for _, l := range e.loops {
		if !l.post(func(l *Loop) { fn(l); wg.Done() }) {
			wg.Done()
		}
	}
	wg.Wait()
}

// firstErr keeps the first error reported by the loops of an onLoops call,
// which report concurrently.
type firstErr struct {
	mu  sync.Mutex
	err error
}

func (f *firstErr) set(err error) {
	f.mu.Lock()
	if f.err == nil {
		f.err = err
	}
	f.mu.Unlock()
}

func (f *firstErr) get() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.err
}

// ErrStopped is returned for work asked of an engine that has stopped.
var ErrStopped = errors.New("engine stopped")

// AddPif makes the network namespace at netnsPath (/run/netns/NAME,
// /proc/PID/ns/net, ...) available to rules as pif name. The namespace is
// entered once, by a thread kept for the pif; it must be added before a rule
// names it. "host" is the daemon's own namespace and is always there.
func (e *Engine) AddPif(name, netnsPath string) error {
	if name == "" || name == rules.HostPif {
		return fmt.Errorf("pif %q: the host pif is built in", name)
	}
	e.amu.Lock()
	defer e.amu.Unlock()
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.stopped {
		return ErrStopped
	}
	if _, dup := e.pifs[name]; dup {
		return fmt.Errorf("pif %s: added twice", name)
	}
	p, err := openPif(name, netnsPath)
	if err != nil {
		return err
	}
	if e.pifs == nil {
		e.pifs = map[string]*pif{}
	}
	e.pifs[name] = p
	e.pifOrder = append(e.pifOrder, p)
	return nil
}

// pif returns the pif of a rule's name for it ("" is the host, nil).
// Called with e.mu held.
func (e *Engine) pif(name string) (*pif, error) {
	if name == "" {
		return nil, nil
	}
	if p, ok := e.pifs[name]; ok {
		return p, nil
	}
	return nil, fmt.Errorf("unknown pif %q", name)
}

// livePif is pif for a rule about to be bound: the pif must also still be
// the namespace it was entered as (pif.alive).
func (e *Engine) livePif(name string) (*pif, error) {
	p, err := e.pif(name)
	if err == nil {
		err = p.alive()
	}
	return p, err
}

// Listen binds every port of a rule and starts serving it: a tcp rule's
// listeners are polled by every loop, each udp listener by one loop (spread
// round robin). Either every port is bound and serving, or none is and the
// error names the first port that failed ("port 8080: bind: address already
// in use").
func (e *Engine) Listen(r *rules.Rule) ([]*Listener, error) {
	if r.Proto != rules.TCP && r.Proto != rules.UDP {
		return nil, fmt.Errorf("%s: unknown protocol", r.Proto)
	}
	if len(r.Targets) == 0 && (r.Proto != rules.TCP || r.Health == rules.HealthNone) {
		return nil, fmt.Errorf("rule %q has no target and no health reply", r.String())
	}
	if err := e.resolveRules([]*rules.Rule{r}); err != nil {
		return nil, err
	}
	tlsBy, _, err := loadTLS([]*rules.Rule{r})
	if err != nil {
		return nil, err
	}
	e.amu.Lock()
	defer e.amu.Unlock()
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.started || e.stopped {
		return nil, ErrStopped
	}
	e.startResolver([]*rules.Rule{r})
	lp, err := e.livePif(r.ListenPif)
	if err != nil {
		return nil, err
	}
	if _, err := e.livePif(r.TargetPif); err != nil {
		return nil, err
	}
	g := []*rules.Rule{r}
	pols := groupPolicies(g)
	pols[0].SetTLS(tlsBy[r])
	ctrs := make([]*RuleCounters, 1)
	var lns []*Listener
	for i, key := range r.ListenKeys() {
		fd, bound, err := listenSocket(lp, r.Proto, netipAddrPort(key.Addr, key.Port))
		if err != nil {
			for _, ln := range lns {
				unix.Close(ln.fd)
			}
			return nil, fmt.Errorf("port %d: %w", key.Port, err)
		}
		lns = append(lns, e.newGroupListener(g, i, fd, bound, lp, pols, ctrs, nil))
		e.attachGroupChecks(lns[len(lns)-1], nil)
	}
	if err := e.registerListeners(lns); err != nil {
		e.closeListeners(lns)
		e.pruneChecks()
		return nil, err
	}
	e.startChecks()
	e.listeners = append(e.listeners, lns...)
	e.rules = append(e.rules, r)
	return lns, nil
}

// groupPolicies builds the handshake policies of a key's routes g (a group
// of rules.RouteGroups): one rule that does not route has its plain policy.
func groupPolicies(g []*rules.Rule) []*handshake.Policy {
	if len(g) == 1 && !g[0].IsRoute() {
		return []*handshake.Policy{handshake.NewPolicy(g[0], 0)}
	}
	return handshake.NewRoutePolicies(g, 0)
}

// newGroupListener makes the listener of port i of the routes g on socket
// fd: for a key that routes, the front listener (g[0]'s) holding one
// listener per route, all on fd. pols are groupPolicies(g); ctrs[j] is made
// for route j on first use, shared by the group's ports. Called with e.mu
// held (the pifs were checked).
func (e *Engine) newGroupListener(g []*rules.Rule, i, fd int, bound netip.AddrPort, lp *pif, pols []*handshake.Policy, ctrs []*RuleCounters, owner *Loop) *Listener {
	var front *Listener
	for j, r := range g {
		tp, _ := e.pif(r.TargetPif)
		ln := e.newListener(r, i, fd, bound, lp, tp, pols[j], e.countersFor(&ctrs[j], r), owner)
		if j == 0 {
			front = ln
			if r.Proto == rules.TCP {
				setDeferAccept(fd, deferAccept(g, pols[0]))
			}
		}
		if len(g) > 1 || r.IsRoute() {
			ln.route = true
			front.routes = append(front.routes, ln)
		}
	}
	return front
}

// newListener makes the listener of port i of rule r on socket fd. A udp
// listener gets its owner loop: owner if given (a socket that moves keeps
// its loop, which holds its flows), else the next loop round robin.
func (e *Engine) newListener(r *rules.Rule, i, fd int, bound netip.AddrPort, lp, tp *pif, pol *handshake.Policy, ctr *RuleCounters, owner *Loop) *Listener {
	// Port i's key, made directly: r.ListenKeys()[i] would build the whole
	// list for every port, quadratic in a range's length.
	key := rules.Key{Pif: r.ListenPif, Proto: r.Proto, Addr: r.ListenAddr, Port: r.ListenPorts.First + uint16(i)}
	ln := &Listener{e: e, fd: fd, addr: bound, key: key, rule: r, listenPif: lp, targetPif: tp,
		policy: pol, ctr: ctr, pool: balance.New(r.Balance, e.targetsFor(r, i))}
	if r.Proto == rules.TCP {
		setSockBuf(fd, r.SockBuf) // accepted sockets inherit it; a kept socket takes its new rule's
	}
	if r.Proto == rules.UDP {
		if owner == nil {
			owner = e.loops[int(e.nextLoop.Add(1)-1)%len(e.loops)]
		}
		ln.udp = &udpState{loop: owner, flows: map[flowKey]*flow{}}
	}
	return ln
}

// registerListeners starts polling lns: a tcp listener on every loop, a udp
// one on its owner loop. It returns the first epoll error, naming the port.
func (e *Engine) registerListeners(lns []*Listener) error {
	var regErr firstErr
	e.onLoops(func(l *Loop) {
		for _, ln := range lns {
			if err := l.registerListener(ln); err != nil {
				regErr.set(fmt.Errorf("port %d: epoll_ctl: %w", ln.addr.Port(), err))
			}
		}
	})
	return regErr.get()
}

// closeListeners stops polling lns on every loop, then closes them. Called
// with e.mu held.
func (e *Engine) closeListeners(lns []*Listener) {
	for _, ln := range lns {
		ln.closed.Store(true)
	}
	e.onLoops(func(l *Loop) {
		for _, ln := range lns {
			l.unregister(ln.fd)
			if ln.udp != nil && ln.udp.loop == l {
				ln.closeFlows(l)
			}
		}
	})
	for _, ln := range lns {
		unix.Close(ln.fd)
	}
}

// Listeners returns the listeners currently open.
func (e *Engine) Listeners() []*Listener {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]*Listener(nil), e.listeners...)
}

// statListeners are the listeners whose counters Stats and Totals read:
// the table's, and while the engine drains those Shutdown closed, whose
// sessions are still live (ctl stats during a stop). Called with e.mu held.
func (e *Engine) statListeners() []*Listener {
	if len(e.stopping) == 0 {
		return e.listeners
	}
	return append(append(make([]*Listener, 0, len(e.listeners)+len(e.stopping)), e.listeners...), e.stopping...)
}

// Shutdown stops accepting, lets live sessions finish until ctx is done, then
// aborts the rest and stops the loops. It returns ctx.Err() when sessions had
// to be aborted, nil when all ended by themselves.
func (e *Engine) Shutdown(ctx context.Context) error {
	e.amu.Lock() // an apply under way ends first; held for the table steps only
	e.mu.Lock()
	if e.stopped || !e.started {
		e.stopped = true
		e.closePifs()
		e.mu.Unlock()
		e.amu.Unlock()
		return nil
	}
	// Draining: health replies say down (503) from now on, and no new
	// session starts. Listeners of rules that answer health probes stay open
	// until the drain ends, so balancers see the 503 and steer away while
	// live sessions finish; the others close at once (a refused connect is
	// their signal).
	e.draining.Store(true)
	e.stopChecks(e.allChecks())
	if p := e.pending; p != nil {
		// An apply awaiting its commit: its paused sockets are in no
		// table; close them with the rest.
		e.closeListeners(p.paused)
		e.pending = nil
	}
	var keep, stop []*Listener
	for _, ln := range e.listeners {
		if ln.rule.Health != rules.HealthNone && ln.udp == nil {
			keep = append(keep, ln)
		} else {
			stop = append(stop, ln)
		}
	}
	e.closeListeners(stop)
	e.listeners = keep
	e.stopping = stop
	e.stopped = true
	e.mu.Unlock()
	e.amu.Unlock()

	var err error
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	// Conns still in their handshake (probes being answered, headers being
	// read) are not waited for: none of them can start a session any more.
	for e.active.Load()-e.handshaking.Load() > 0 && err == nil {
		select {
		case <-ctx.Done():
			err = ctx.Err()
		case <-t.C:
		}
	}
	e.amu.Lock()
	e.mu.Lock()
	e.closeListeners(keep)
	e.listeners = nil
	e.mu.Unlock()
	e.amu.Unlock()
	e.logRuleStats(keep, stop)
	e.mu.Lock()
	e.halted = true // after a SessionList under way, before the loops stop
	e.mu.Unlock()
	for _, l := range e.loops {
		l.mu.Lock()
		l.stop = true
		l.mu.Unlock()
		l.wake()
	}
	for _, l := range e.loops {
		<-l.done
	}
	e.stopResolver()
	e.amu.Lock()
	e.mu.Lock()
	e.closePifs()
	e.mu.Unlock()
	e.amu.Unlock()
	return err
}

// closePifs ends the pifs' threads. Called with e.mu held.
func (e *Engine) closePifs() {
	for name, p := range e.pifs {
		p.close()
		delete(e.pifs, name)
	}
	e.pifOrder = nil
}

// Log returns the engine's logger.
func (e *Engine) Log() *zap.Logger { return e.log }

// Draining reports whether Shutdown has begun.
func (e *Engine) Draining() bool { return e.draining.Load() }

// logRuleStats logs each rule's handshake counters once, as the engine
// stops: the final tally of what was accepted, refused and why. The
// listeners given are sockets' (a routed key's front): each of its routes
// is logged.
func (e *Engine) logRuleStats(lnss ...[]*Listener) {
	seen := map[*handshake.Policy]bool{}
	log := func(ln *Listener) {
		if ln.policy == nil || seen[ln.policy] || ln.udp != nil {
			return
		}
		seen[ln.policy] = true
		e.log.Info("rule counters", zap.String("rule", ln.rule.String()), zap.Object("counters", stopCounters(ln.policy.Stats())))
	}
	for _, lns := range lnss {
		for _, ln := range lns {
			log(ln)
			for _, rl := range ln.routes {
				log(rl)
			}
		}
	}
}

// ended counts a finished session by its code.
func (e *Engine) ended(c conn.Code) {
	if int(c) < len(e.endCodes) {
		e.endCodes[c].Add(1)
	}
}

// Stats is a snapshot of the engine's counters.
type Stats struct {
	Loops         int
	Sessions      int64             // live
	Ended         map[string]uint64 // by end code name
	ConnectErrors uint64
	Pools         channel.Stats // summed over loops
	PipesOpen     int64         // whole process
	PipesDenied   int64         // a pipe wanted, the budget said no

	UDPFlows           int64  // live udp flows
	UDPFlowsOpened     uint64 // udp flows opened, since start
	UDPFlowsExpired    uint64 // udp flows ended by timeout.idle (after a reply)
	UDPFlowsUnanswered uint64 // udp flows ended without ever a reply, after the unanswered life
	UDPFlowsDenied     uint64 // new sources' flows refused: the process's flow budget was spent
	UDPDatagramsUp     uint64 // client to target, forwarded
	UDPDatagramsDown   uint64 // target to client, forwarded
	UDPDropped         uint64 // datagrams not forwarded (flow budget spent, no fd, buffer full)

	// From counters.go:
	FDs      int         // fds open in the process (/proc/self/fd); -1 if unreadable
	Draining bool        // Shutdown began
	Rules    []RuleStats // the table's rules in order (while an apply is pending, the applied table)
	Table    TableStats  // generation, table operations, transactions
	TLS      TLSStats    // client side handshakes of terminating routes (tls.go)
	Pifs     []PifStat   // the named pifs, in the order added
}

// PifStat is a named pif as Stats sees it.
type PifStat struct {
	Name string
	Gone string // why its path no longer names the namespace entered (pif.alive); "": it does
}

// Stats returns the engine's counters. It allocates; call it from the
// control side, never the data path.
func (e *Engine) Stats() Stats {
	s := Stats{Loops: len(e.loops), Sessions: e.active.Load(), Ended: conn.CountsByName(e.endCodes[:]),
		ConnectErrors: e.connectErrors.Load()}
	for _, l := range e.loops {
		p := l.pools.Stats()
		s.Pools.BuffersInUse += p.BuffersInUse
		s.Pools.BuffersFree += p.BuffersFree
		s.Pools.PipesInUse += p.PipesInUse
		s.Pools.PipesFree += p.PipesFree
	}
	if e.budget != nil {
		s.PipesOpen, s.PipesDenied = e.budget.Open(), e.budget.Denied()
	}
	s.UDPFlowsDenied = e.flows.denied.Load()
	for _, ln := range e.Listeners() {
		if u := ln.udp; u != nil {
			s.UDPFlows += u.FlowsActive.Load()
			s.UDPFlowsOpened += u.FlowsOpened.Load()
			s.UDPFlowsExpired += u.FlowsExpired.Load()
			s.UDPFlowsUnanswered += u.FlowsUnanswered.Load()
			s.UDPDatagramsUp += u.DatagramsUp.Load()
			s.UDPDatagramsDown += u.DatagramsDown.Load()
			s.UDPDropped += u.Dropped.Load()
		}
	}
	e.counterStats(&s)
	s.TLS = e.tlsc.stats()
	s.Pifs = e.pifStats()
	return s
}

// pifStats is every named pif and whether it is still the namespace it was
// entered as: one open and fstat of its path each.
func (e *Engine) pifStats() []PifStat {
	e.mu.Lock()
	pifs := slices.Clone(e.pifOrder)
	e.mu.Unlock()
	out := make([]PifStat, len(pifs))
	for i, p := range pifs {
		out[i].Name = p.name
		if err := p.alive(); err != nil {
			out[i].Gone = err.Error()
		}
	}
	return out
}

// stopCounters is the stop line's tally of a rule in the log's words
// (snake_case; refusals "refused.STEP.REASON" and ends "ended.CODE" as ctl
// stats names them), zeros left out but accepted: a rule that saw nothing
// logs {"accepted": 0}, which an empty object would leave to be guessed.
func stopCounters(s handshake.Stats) zapcore.ObjectMarshalerFunc {
	return func(enc zapcore.ObjectEncoder) error {
		for _, c := range []struct {
			name string
			n    uint64
		}{
			{"accepted", s.Accepted}, {"passed", s.Passed}, {"monitor_hits", s.MonitorHits},
			{"health_ok", s.HealthUp}, {"health_fail", s.HealthDown},
			{"proxy_v1", s.ProxyV1}, {"proxy_v2", s.ProxyV2}, {"proxy_local", s.ProxyLocal}, {"proxy_untrusted", s.ProxyUntrusted},
			{"rate_refused", s.RateRefused}, {"max_conn_refused", s.MaxConnRefused},
			{"sent_proxy_v1", s.SentV1}, {"sent_proxy_v2", s.SentV2},
			{"rate_sources", uint64(s.RateSources)}, {"max_conn_in_use", uint64(max(s.MaxConnInUse, 0))},
		} {
			if c.n != 0 || c.name == "accepted" {
				enc.AddUint64(c.name, c.n)
			}
		}
		for _, step := range slices.Sorted(maps.Keys(s.Refused)) {
			for _, code := range slices.Sorted(maps.Keys(s.Refused[step])) {
				if n := s.Refused[step][code]; n != 0 {
					enc.AddUint64("refused."+step+"."+code, n)
				}
			}
		}
		for _, code := range slices.Sorted(maps.Keys(s.Ended)) {
			if n := s.Ended[code]; n != 0 {
				enc.AddUint64("ended."+code, n)
			}
		}
		return nil
	}
}
