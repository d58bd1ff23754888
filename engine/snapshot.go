package engine

import (
	"sort"
	"sync"
	"time"

	"github.com/sluice-proxy/sluice/observe"
)

// MaxSessionList bounds the sessions SessionList copies, whatever the
// caller asks for.
const MaxSessionList = 10000

// SessionList copies up to max (at most MaxSessionList) live sessions whose
// rule's listen key is rule ("" = every rule), oldest first. Each loop
// copies its own sessions, on its own goroutine (onLoops): no session field
// is read from another goroutine. Total counts every match. A stopped
// engine lists nothing.
func (e *Engine) SessionList(rule string, max int) observe.Sessions {
	if max <= 0 || max > MaxSessionList {
		max = MaxSessionList
	}
	var mu sync.Mutex
	var out observe.Sessions
	// e.mu held: Shutdown cannot stop the loops while they copy (it marks
	// the engine stopped under e.mu first). A stopped engine, draining or
	// not, lists nothing.
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.started || e.stopped {
		return out
	}
	e.onLoops(func(l *Loop) {
		now := int64(time.Since(l.base))
		var mine []observe.Session
		matched := 0
		for fd, h := range l.table {
			s, ok := h.(*session)
			if !ok || s.cli.FD() != fd || s.state == stClosed {
				continue // a listener, a flow, or the session's backend fd
			}
			name := s.ln.ruleName()
			if rule != "" && name != rule {
				continue
			}
			matched++
			if len(mine) >= max {
				continue
			}
			v := observe.Session{Rule: name, Source: s.cli.Src, State: s.state.String(), Age: time.Duration(now - s.start),
				Up: s.up.Bytes, Down: s.down.Bytes, Splice: s.up.Spliced+s.down.Spliced > 0 || s.up.Piped() || s.down.Piped()}
			if s.orig != nil {
				v.Peer = *s.orig
			}
			if s.state != stHandshake {
				v.Target = s.srv.Dst
			}
			mine = append(mine, v)
		}
		mu.Lock()
		out.Total += matched
		out.List = append(out.List, mine...)
		mu.Unlock()
	})
	sort.Slice(out.List, func(i, j int) bool { return out.List[i].Age > out.List[j].Age })
	if len(out.List) > max {
		out.List = out.List[:max]
	}
	return out
}

// Counters returns Stats as named counters, for ctl stats: engine-wide
// ones, then per end code ("ended.CODE"), then per rule
// ("rule.KEY.NAME"), each group sorted.
func (e *Engine) Counters() []observe.Counter {
	s := e.Stats()
	b := func(v bool) int64 {
		if v {
			return 1
		}
		return 0
	}
	out := []observe.Counter{
		ctr("loops", int64(s.Loops)), ctr("sessions", s.Sessions), ctr("connect_errors", int64(s.ConnectErrors)),
		ctr("buffers_in_use", int64(s.Pools.BuffersInUse)), ctr("buffers_free", int64(s.Pools.BuffersFree)),
		ctr("pipes_in_use", int64(s.Pools.PipesInUse)), ctr("pipes_free", int64(s.Pools.PipesFree)),
		ctr("pipes_open", s.PipesOpen), ctr("pipes_denied", s.PipesDenied),
		ctr("udp_flows", s.UDPFlows), ctr("udp_flows_opened", int64(s.UDPFlowsOpened)), ctr("udp_flows_expired", int64(s.UDPFlowsExpired)),
		ctr("udp_datagrams_in", int64(s.UDPDatagramsUp)), ctr("udp_datagrams_out", int64(s.UDPDatagramsDown)), ctr("udp_dropped", int64(s.UDPDropped)),
		ctr("fds", int64(s.FDs)), ctr("draining", b(s.Draining)), ctr("generation", int64(s.Table.Generation)), ctr("rules", int64(len(s.Rules))),
	}
	var ended []observe.Counter
	for code, n := range s.Ended {
		ended = append(ended, observe.Counter{Name: "ended." + code, Value: int64(n)})
	}
	sort.Slice(ended, func(i, j int) bool { return ended[i].Name < ended[j].Name })
	out = append(out, ended...)
	out = append(out, tableCounters(s.Table)...)
	for _, r := range s.Rules {
		out = append(out, ruleCounters(r)...)
	}
	return out
}

// tableCounters are the table's counters of Stats.
func tableCounters(t TableStats) []observe.Counter {
	b := int64(0)
	if t.Pending {
		b = 1
	}
	return []observe.Counter{ctr("table.pending", b), ctr("table.applies", int64(t.Applies)), ctr("table.commits", int64(t.Commits)),
		ctr("table.rollbacks", int64(t.Rollbacks)), ctr("txn.committed", int64(t.Committed)), ctr("txn.rolled_back", int64(t.RolledBack)),
		ctr("txn.failed", int64(t.Failed))}
}

// ruleCounters are one rule's counters of Stats, named "rule.KEY.NAME".
func ruleCounters(r RuleStats) []observe.Counter {
	p := "rule." + r.Listen + "."
	up := int64(0)
	for _, be := range r.Backends {
		if be.Up {
			up++
		}
	}
	out := []observe.Counter{ctr(p+"sessions", r.Sessions), ctr(p+"bytes_in", int64(r.BytesUp)), ctr(p+"bytes_out", int64(r.BytesDown)),
		ctr(p+"spliced", int64(r.Spliced)), ctr(p+"connect_errors", int64(r.ConnectErrors)), ctr(p+"retries", int64(r.Retries)),
		ctr(p+"ports_bound", int64(len(r.Listeners))), ctr(p+"ports_failed", int64(len(r.Failed))),
		ctr(p+"backends", int64(len(r.Backends))), ctr(p+"backends_up", up)}
	var terms []observe.Counter
	for code, n := range r.Terms {
		terms = append(terms, observe.Counter{Name: p + "term." + code, Value: int64(n)})
	}
	sort.Slice(terms, func(i, j int) bool { return terms[i].Name < terms[j].Name })
	return append(out, terms...)
}

func ctr(name string, v int64) observe.Counter { return observe.Counter{Name: name, Value: v} }
