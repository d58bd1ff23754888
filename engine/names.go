package engine

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/sluice-proxy/sluice/observe"
	"github.com/sluice-proxy/sluice/rules"
)

// Backends by name. A rule's target may name a host (rules.Target.Host);
// every address of the name is a backend of the pool. Names are resolved
// with Go's resolver on the caller's goroutine when a table is applied
// (Apply and Listen fail, changing nothing, when a new name does not
// resolve: that is the load-time check), and again every resolve= by one
// goroutine of the engine (resolver), never on a loop. When a name's
// addresses change, each listener of a rule naming it gets a new Listener
// on the same socket with the new pool, handed over on every loop as a
// changed rule's is (syncLoops): the listening socket is never touched,
// live sessions finish on the pool they started with, and checks go on for
// addresses that stay. A name that stops resolving keeps its last addresses
// and says so (a log line, a health event), once per failure spell.

const (
	resolveTimeout = 5 * time.Second
	resolveTick    = time.Second // resolve= is at least 1s
)

// nameState is what the engine knows of one host name.
type nameState struct {
	addrs   []netip.Addr // never changed in place: replaced whole
	next    time.Time    // when to resolve it again
	failing bool         // the last resolution failed: addrs are the last known
	dirty   bool         // addrs changed and the pools do not have them yet
}

// engineNames is the engine's part of names. mu guards byHost and is never
// held across a lookup or with e.mu wanted after it (e.mu first, then mu).
type engineNames struct {
	mu     sync.Mutex
	byHost map[string]*nameState
	stop   chan struct{} // nil until the resolver runs
	done   chan struct{}
	lookup func(ctx context.Context, host string) ([]netip.Addr, error)
}

func defaultLookup(ctx context.Context, host string) ([]netip.Addr, error) {
	return net.DefaultResolver.LookupNetIP(ctx, "ip", host)
}

// resolve looks host up, bounded by resolveTimeout: its addresses, sorted
// and without duplicates, or an error (no address is an error too).
func (n *engineNames) resolve(host string) ([]netip.Addr, error) {
	ctx, cancel := context.WithTimeout(context.Background(), resolveTimeout)
	defer cancel()
	lookup := n.lookup
	if lookup == nil {
		lookup = defaultLookup
	}
	addrs, err := lookup(ctx, host)
	if err != nil {
		return nil, err
	}
	out := make([]netip.Addr, 0, len(addrs))
	for _, a := range addrs {
		a = a.Unmap().WithZone("")
		if !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	slices.SortFunc(out, func(a, b netip.Addr) int { return a.Compare(b) })
	if len(out) == 0 {
		return nil, fmt.Errorf("lookup %s: no address", host)
	}
	return out, nil
}

// Resolve resolves the host names of rs the engine does not know yet, on
// the caller's goroutine: a table being loaded (ctl's step 5, the daemon's
// start). It returns (-1, nil) when every name resolves, else the index of
// the first rule with a name that does not, and why ("target web: lookup
// web: no such host"); then the TLS files of rs (CheckTLS). Names known already are not looked up again here:
// the resolver goroutine keeps them fresh.
func (e *Engine) Resolve(rs []*rules.Rule) (int, error) {
	for i, r := range rs {
		for _, host := range r.Hosts() {
			n := &e.names
			n.mu.Lock()
			_, known := n.byHost[host]
			n.mu.Unlock()
			if known {
				continue
			}
			addrs, err := n.resolve(host)
			if err != nil {
				return i, fmt.Errorf("target %s: %w", host, err)
			}
			n.mu.Lock()
			if n.byHost == nil {
				n.byHost = map[string]*nameState{}
			}
			if _, raced := n.byHost[host]; !raced {
				n.byHost[host] = &nameState{addrs: addrs, next: time.Now().Add(r.ResolveEvery())}
			}
			n.mu.Unlock()
		}
	}
	return e.CheckTLS(rs)
}

// resolveRules is Resolve with an error naming the rule ("tcp 0.0.0.0:80 ->
// web:80: target web: lookup web: no such host"), for Apply and Listen.
func (e *Engine) resolveRules(rs []*rules.Rule) error {
	if i, err := e.Resolve(rs); err != nil {
		return fmt.Errorf("%s: %w", rs[i], err)
	}
	return nil
}

// addrsOf returns host's known addresses (nil when unknown).
func (e *Engine) addrsOf(host string) []netip.Addr {
	n := &e.names
	n.mu.Lock()
	defer n.mu.Unlock()
	if s := n.byHost[host]; s != nil {
		return s.addrs
	}
	return nil
}

// targetsFor is port i's pool of rule r, names expanded to their addresses.
func (e *Engine) targetsFor(r *rules.Rule, i int) []netip.AddrPort {
	return r.TargetForAddrs(i, e.addrsOf)
}

// startResolver runs the resolver once a rule names a host. Called with
// e.mu held, the engine started and not stopped.
func (e *Engine) startResolver(rs []*rules.Rule) {
	if e.names.stop != nil {
		return
	}
	for _, r := range rs {
		if len(r.Hosts()) > 0 {
			e.names.stop, e.names.done = make(chan struct{}), make(chan struct{})
			go e.resolver(e.names.stop, e.names.done)
			return
		}
	}
}

// stopResolver ends the resolver and waits for it. Called without e.mu.
func (e *Engine) stopResolver() {
	e.mu.Lock()
	stop, done := e.names.stop, e.names.done
	e.mu.Unlock()
	if stop == nil {
		return
	}
	close(stop)
	<-done
}

// resolver resolves names again when their resolve= interval is due, and
// moves changed addresses into the pools.
func (e *Engine) resolver(stop, done chan struct{}) {
	defer close(done)
	t := time.NewTicker(resolveTick)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		e.resolveDue(time.Now())
	}
}

// resolveDue resolves every name whose interval is due at now, then brings
// the pools up to date.
func (e *Engine) resolveDue(now time.Time) {
	e.mu.Lock()
	every := map[string]time.Duration{} // each name's shortest interval; 0: never again
	for _, r := range e.rules {
		for _, h := range r.Hosts() {
			if d, ok := every[h]; !ok || (r.ResolveEvery() > 0 && (d == 0 || r.ResolveEvery() < d)) {
				every[h] = r.ResolveEvery()
			}
		}
	}
	pending := e.pending != nil
	e.mu.Unlock()
	n := &e.names
	var due []string
	n.mu.Lock()
	for h, s := range n.byHost {
		d, named := every[h]
		switch {
		case !named && !pending:
			delete(n.byHost, h) // no rule names it any more
		case named && d > 0 && !now.Before(s.next):
			s.next = now.Add(d)
			due = append(due, h)
		}
	}
	n.mu.Unlock()
	for _, h := range due {
		addrs, err := n.resolve(h)
		n.mu.Lock()
		s := n.byHost[h]
		if s == nil {
			n.mu.Unlock()
			continue
		}
		kept := s.addrs
		if err != nil {
			first := !s.failing
			s.failing = true
			n.mu.Unlock()
			if first {
				e.nameFailed(h, kept, err)
			}
			continue
		}
		s.failing = false
		if !slices.Equal(s.addrs, addrs) {
			s.addrs, s.dirty = addrs, true
		}
		n.mu.Unlock()
	}
	e.amu.Lock() // refreshPools writes the table: not beside an apply
	defer e.amu.Unlock()
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.stopped || e.pending != nil {
		return // after the commit or rollback, the next tick
	}
	changed := map[string][]netip.Addr{}
	n.mu.Lock()
	for h, s := range n.byHost {
		if s.dirty {
			s.dirty = false
			changed[h] = s.addrs
		}
	}
	n.mu.Unlock()
	if len(changed) > 0 {
		e.refreshPools(changed)
	}
}

// nameFailed says a name stopped resolving and its last addresses stay.
func (e *Engine) nameFailed(host string, kept []netip.Addr, err error) {
	e.log.Warn("name does not resolve; keeping its last addresses", zap.String("name", host),
		zap.Stringers("addresses", kept), zap.Error(err))
	if e.hub.Watched(observe.GroupHealth) {
		e.hub.Publish(observe.Event{Group: observe.GroupHealth, Type: "resolve-failed", Time: time.Now(), Fields: []observe.Field{
			f("name", host), f("kept", addrStrings(kept)), f("error", err.Error())}})
	}
}

func addrStrings(as []netip.Addr) []string {
	out := make([]string, len(as))
	for i, a := range as {
		out[i] = a.String()
	}
	return out
}

// refreshPools gives every listener of a rule naming a changed host the
// pool of its current addresses: a new Listener on the same socket, handed
// over on every loop. Checks go on for backends that stay; those of
// backends gone stop. Called with e.mu held and no apply pending.
func (e *Engine) refreshPools(changed map[string][]netip.Addr) {
	for h, addrs := range changed {
		e.log.Info("name resolved to new addresses; pools follow", zap.String("name", h), zap.Stringers("addresses", addrs))
		if e.hub.Watched(observe.GroupHealth) {
			e.hub.Publish(observe.Event{Group: observe.GroupHealth, Type: "resolved", Time: time.Now(), Fields: []observe.Field{
				f("name", h), f("addresses", addrStrings(addrs))}})
		}
	}
	swap := map[*Listener]*Listener{}
	touched := map[*rules.Rule]bool{}
	for idx, ln := range e.listeners {
		i := 0
		if ln.key.Port != 0 {
			i = int(ln.key.Port - ln.rule.ListenPorts.First)
		}
		group := ln.routes
		if group == nil {
			group = []*Listener{ln}
		}
		stale := false
		for _, rl := range group {
			if namesAny(rl.rule, changed) && !samePool(e.targetsFor(rl.rule, i), rl) {
				stale = true
				touched[rl.rule] = true
			}
		}
		if !stale {
			continue
		}
		nl := e.repooled(ln, i)
		swap[ln] = nl
		e.listeners[idx] = nl
	}
	if len(swap) == 0 {
		return
	}
	if err := e.syncLoops(nil, nil, swap); err != nil {
		e.log.Warn("moving pools to new addresses", zap.Error(err))
	}
	e.startChecks()
	for r := range touched {
		e.dropGoneCheckers(r)
	}
}

// repooled returns a listener of port i like ln (same socket, rules,
// policies, counters) whose pool holds the current addresses of its
// targets; a routed key's front gets every route repooled alike. Checks
// carry over for the addresses that stay. Called with e.mu held.
func (e *Engine) repooled(ln *Listener, i int) *Listener {
	one := func(rl *Listener) *Listener {
		nl := e.newListener(rl.rule, i, rl.fd, rl.addr, rl.listenPif, rl.targetPif, rl.policy, rl.ctr, ownerOf(rl))
		if rl.udp != nil {
			nl.udp.flows = rl.udp.flows
		}
		nl.Accepted.Store(rl.Accepted.Load())
		nl.Paused.Store(rl.Paused.Load())
		e.attachChecks(nl, rl)
		return nl
	}
	front := one(ln)
	if ln.routes != nil {
		front.routes = []*Listener{front}
		for _, rl := range ln.routes[1:] {
			front.routes = append(front.routes, one(rl))
		}
	}
	return front
}

func namesAny(r *rules.Rule, hosts map[string][]netip.Addr) bool {
	for _, t := range r.Targets {
		if _, ok := hosts[t.Host]; ok && t.Host != "" {
			return true
		}
	}
	return false
}

func samePool(ts []netip.AddrPort, ln *Listener) bool {
	if len(ts) != ln.pool.Len() {
		return false
	}
	for i, t := range ts {
		if ln.pool.Target(i) != t {
			return false
		}
	}
	return true
}
