package ctltest

import (
	"slices"
	"time"

	"github.com/sluice-proxy/sluice/observe"
	"github.com/sluice-proxy/sluice/rules"
)

// The in-memory engine publishes rules and binds events as the real one
// does (engine/events.go): under its lock, so Watch's state and the events
// that follow join with no gap and no overlap.

func (e *Engine) state(typ string, gen uint64) observe.Event {
	return observe.Event{Group: observe.GroupRules, Type: typ, Time: time.Now(), Fields: []observe.Field{
		{Key: "generation", Value: gen}, {Key: "rules", Value: len(e.active)}, {Key: "ports", Value: rules.ListenPortCount(e.active)}, {Key: "pending", Value: e.pending}}}
}

// publish sends a rules event. Called with e.mu held.
func (e *Engine) publish(typ string, gen uint64) {
	if e.hub.Watched(observe.GroupRules) {
		e.hub.Publish(e.state(typ, gen))
	}
}

// publishApplied sends the apply's rules event and its bind failures.
// Called with e.mu held.
func (e *Engine) publishApplied(s *rules.Summary) {
	if e.hub.Watched(observe.GroupRules) {
		ev := e.state("applied", s.Generation)
		ev.Fields = append(ev.Fields, observe.Field{Key: "verdict", Value: s.OK()})
		e.hub.Publish(ev)
	}
	for _, r := range s.Rules {
		for _, p := range r.Failed {
			e.hub.Publish(observe.Event{Group: observe.GroupBinds, Type: "bind-failed", Fields: []observe.Field{
				{Key: "generation", Value: s.Generation}, {Key: "listen", Value: r.Listen}, {Key: "port", Value: p.Port},
				{Key: "errno", Value: int(p.Errno)}, {Key: "error", Value: p.Msg}}})
		}
	}
}

// Watch subscribes, then returns the table's state (ctl.Engine).
func (e *Engine) Watch(groups observe.Group, n int) (*observe.Sub, []observe.Event) {
	e.mu.Lock()
	defer e.mu.Unlock()
	sub := e.hub.Subscribe(groups, n)
	var st []observe.Event
	if groups&(observe.GroupRules|observe.GroupBinds) != 0 {
		st = append(st, e.state(observe.TypeState, e.gen))
	}
	return sub, st
}

// Watched reports whether a watcher subscribes to a group of g.
func (e *Engine) Watched(g observe.Group) bool { return e.hub.Watched(g) }

// Publish sends any event to the watchers, as the engine's loops would.
func (e *Engine) Publish(ev observe.Event) { e.hub.Publish(ev) }

// SetSessionList sets the live sessions SessionList reports.
func (e *Engine) SetSessionList(ss []observe.Session) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.live = slices.Clone(ss)
}

// SessionList returns the sessions of rule ("" = all), at most max.
func (e *Engine) SessionList(rule string, max int) observe.Sessions {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out observe.Sessions
	for _, s := range e.live {
		if rule != "" && s.Rule != rule {
			continue
		}
		out.Total++
		if len(out.List) < max {
			out.List = append(out.List, s)
		}
	}
	return out
}

// SetCounters sets what Counters reports.
func (e *Engine) SetCounters(cs []observe.Counter) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.counters = slices.Clone(cs)
}

// Counters returns the counters SetCounters set.
func (e *Engine) Counters() []observe.Counter {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.counters)
}
