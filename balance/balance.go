// Package balance chooses a backend of a pool for a new session: round
// robin, least connections, or by source address, skipping backends that
// passive health marked down (a connect that was refused or timed out) for a
// while, and backends that active checks say are down (health.go). Safe for
// concurrent use by every loop; atomics only.
package balance

import (
	"hash/maphash"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/sluice-proxy/sluice/rules"
)

// DownFor is how long a backend that failed a connect is skipped. A skipped
// backend is still tried when every backend of the pool is down, so traffic
// itself finds the one that came back.
const DownFor = 5 * time.Second

// MaxBackends is the largest pool: tried backends are a 64-bit mask.
const MaxBackends = 64

// Pool is the backend pool of one listener.
type Pool struct {
	mode     rules.Balance
	targets  []netip.AddrPort
	backends []backend
	rr       atomic.Uint32
}

type backend struct {
	downUntil atomic.Int64 // engine clock (ns); 0 or past: up
	active    atomic.Int32 // sessions on it (leastconn)
	fails     atomic.Uint64
	check     *Health  // active checks' state (shared by the rule's pools); nil: not checked
	_         [32]byte // one cache line each: loops update neighbours concurrently
}

// New returns the pool of targets (at most MaxBackends) balanced by mode.
func New(mode rules.Balance, targets []netip.AddrPort) *Pool {
	if len(targets) > MaxBackends {
		targets = targets[:MaxBackends]
	}
	return &Pool{mode: mode, targets: targets, backends: make([]backend, len(targets))}
}

// Len returns the number of backends.
func (p *Pool) Len() int { return len(p.targets) }

// Target returns backend i's address.
func (p *Pool) Target(i int) netip.AddrPort { return p.targets[i] }

var seed = maphash.MakeSeed()

// Start returns the backend a new session from src tries first at time now
// (-1 for an empty pool): the next in turn (roundrobin), the up one with the
// fewest sessions (leastconn), or the source's hash (source). It is only a
// starting point: Next skips down backends from it.
func (p *Pool) Start(src netip.Addr, now int64) int {
	n := len(p.targets)
	switch {
	case n == 0:
		return -1
	case n == 1:
		return 0
	}
	switch p.mode {
	case rules.BalanceSource:
		return int(maphash.Comparable(seed, src.Unmap()) % uint64(n))
	case rules.BalanceLeastConn:
		off := int(p.rr.Add(1)-1) % n // ties rotate
		best, bestN := -1, int32(0)
		for k := 0; k < n; k++ {
			i := (off + k) % n
			if p.down(i, now) {
				continue
			}
			if a := p.backends[i].active.Load(); best < 0 || a < bestN {
				best, bestN = i, a
			}
		}
		if best < 0 {
			return off
		}
		return best
	}
	return int(p.rr.Add(1)-1) % n
}

// Next returns the backend to try after the ones in tried (bit i: backend i
// tried), scanning from start: the first up one, else the first one passive
// health marked down (every backend down: try anyway), or -1 when all were
// tried. A backend that checks say is down is never returned.
func (p *Pool) Next(start int, tried uint64, now int64) int {
	n := len(p.targets)
	fallback := -1
	for k := 0; k < n; k++ {
		i := (start + k) % n
		if tried&(1<<i) != 0 || p.checkDown(i) {
			continue
		}
		if !p.down(i, now) {
			return i
		}
		if fallback < 0 {
			fallback = i
		}
	}
	return fallback
}

// down reports whether backend i is down at time now, by checks or passive
// health.
func (p *Pool) down(i int, now int64) bool {
	return p.checkDown(i) || p.backends[i].downUntil.Load() > now
}

func (p *Pool) checkDown(i int) bool {
	c := p.backends[i].check
	return c != nil && c.Down()
}

// SetCheck gives backend i the active checks' state h. Call it before the
// pool is used.
func (p *Pool) SetCheck(i int, h *Health) { p.backends[i].check = h }

// NoBackend reports whether the pool is checked and every backend of it is
// down by its checks: a new session then has nowhere to go (no-backend).
func (p *Pool) NoBackend() bool {
	if len(p.targets) == 0 {
		return false
	}
	for i := range p.backends {
		if !p.checkDown(i) {
			return false
		}
	}
	return true
}

// Failed marks backend i down until now + DownFor. It reports whether this
// is a transition: the backend was up (never marked, or its mark expired).
func (p *Pool) Failed(i int, now int64) bool {
	p.backends[i].fails.Add(1)
	return p.backends[i].downUntil.Swap(now+int64(DownFor)) <= now
}

// Connected marks backend i up. It reports whether this is a transition: a
// backend marked down (its mark expired or not) came back.
func (p *Pool) Connected(i int) bool {
	if p.backends[i].downUntil.Load() != 0 {
		return p.backends[i].downUntil.Swap(0) != 0
	}
	return false
}

// Acquire and Release count the sessions on backend i (for leastconn).
func (p *Pool) Acquire(i int) { p.backends[i].active.Add(1) }
func (p *Pool) Release(i int) { p.backends[i].active.Add(-1) }

// AllDown reports whether the pool has backends and every one is marked down
// at time now; a health reply then says down.
func (p *Pool) AllDown(now int64) bool {
	if len(p.targets) == 0 {
		return false
	}
	for i := range p.backends {
		if !p.down(i, now) {
			return false
		}
	}
	return true
}

// BackendStats is one backend's state.
type BackendStats struct {
	Target   netip.AddrPort
	Up       bool // by checks and passive health
	Active   int32
	Failures uint64
	Checked  bool       // the backend has active checks; Check is theirs
	Check    CheckStats // Check.Up: up by its checks alone
}

// Stats returns every backend's state at time now.
func (p *Pool) Stats(now int64) []BackendStats {
	out := make([]BackendStats, len(p.targets))
	for i, t := range p.targets {
		b := &p.backends[i]
		out[i] = BackendStats{Target: t, Up: !p.down(i, now), Active: b.active.Load(), Failures: b.fails.Load()}
		if b.check != nil {
			out[i].Checked, out[i].Check = true, b.check.Stats()
			out[i].Check.For = time.Duration(now - out[i].Check.Since)
		}
	}
	return out
}
