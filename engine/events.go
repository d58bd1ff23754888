package engine

import (
	"net/netip"
	"time"

	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/observe"
	"github.com/sluice-proxy/sluice/rules"
)

// Events for ctl watch. The engine publishes into its hub (observe.Hub):
// publishing never blocks, and every publisher first asks hub.Watched, one
// atomic load, so a group nobody watches costs no event and no allocation
// on the data path.
//
// rules events are published with e.mu held, as are the table changes they
// describe; Watch subscribes and takes the table's state under the same
// lock, so a watcher sees every change after its state, none twice, none
// missed.

// SessionEventRate bounds the session events (start and end together) a
// second, whatever the traffic; an event that goes out after some were
// suppressed says how many ("suppressed").
const SessionEventRate = 200

// maxBindEvents bounds the bind-failed events of one apply; the last one
// says how many more failed.
const maxBindEvents = 100

// maxHealthState bounds the backends listed in a watcher's initial state.
const maxHealthState = 1000

func f(k string, v any) observe.Field { return observe.Field{Key: k, Value: v} }

// tableState describes the active table. Called with e.mu held.
func (e *Engine) tableState(typ string) observe.Event {
	return observe.Event{Group: observe.GroupRules, Type: typ, Time: time.Now(), Fields: []observe.Field{
		f("generation", e.gen), f("rules", len(e.rules)), f("ports", rules.ListenPortCount(e.rules)), f("pending", e.pending != nil)}}
}

// Watch subscribes to groups with a queue of n events, then returns the
// current state: the table (generation, rule and port counts, whether an
// apply is pending) for rules or binds, every backend's passive health for
// health. Table changes are serialized with the subscription, so the state
// and the events that follow join with no gap and no overlap; a health
// transition that races the state may be both in it and in an event.
func (e *Engine) Watch(groups observe.Group, n int) (*observe.Sub, []observe.Event) {
	e.mu.Lock()
	sub := e.hub.Subscribe(groups, n)
	var state []observe.Event
	if groups&(observe.GroupRules|observe.GroupBinds) != 0 {
		state = append(state, e.tableState(observe.TypeState))
	}
	lns := append([]*Listener(nil), e.listeners...)
	e.mu.Unlock()
	if groups&observe.GroupHealth != 0 {
		now := int64(time.Since(e.base))
		seen := map[*Listener]bool{}
		for _, ln := range lns {
			if ln.pool == nil || seen[ln] || len(state) > maxHealthState {
				continue
			}
			seen[ln] = true
			for _, b := range ln.pool.Stats(now) {
				fs := []observe.Field{f("rule", ln.ruleName()), f("backend", b.Target.String()), f("up", b.Up), f("failures", b.Failures)}
				if b.Checked {
					fs = append(fs, f("check_up", b.Check.Up), f("check", b.Check.Last.String()))
				}
				state = append(state, observe.Event{Group: observe.GroupHealth, Type: observe.TypeState, Time: time.Now(), Fields: fs})
			}
		}
	}
	return sub, state
}

// publishApplied tells watchers of an apply, and of the ports it could not
// bind. Called with e.mu held.
func (e *Engine) publishApplied(sum *rules.Summary) {
	if e.hub.Watched(observe.GroupRules) {
		ev := e.tableState("applied")
		ev.Fields[0] = f("generation", sum.Generation)
		ev.Fields = append(ev.Fields, f("verdict", sum.OK()), f("kept", sum.Kept), f("added", sum.Added), f("removed", sum.Removed))
		e.hub.Publish(ev)
	}
	if !e.hub.Watched(observe.GroupBinds) {
		return
	}
	n, more := 0, 0
	for _, r := range sum.Rules {
		for _, p := range r.Failed {
			if n == maxBindEvents {
				more++
				continue
			}
			n++
			e.hub.Publish(observe.Event{Group: observe.GroupBinds, Type: "bind-failed", Fields: []observe.Field{
				f("generation", sum.Generation), f("rule", r.Rule), f("listen", r.Listen), f("weak", r.Weak),
				f("port", p.Port), f("errno", int(p.Errno)), f("error", p.Msg)}})
		}
	}
	if more > 0 {
		e.hub.Publish(observe.Event{Group: observe.GroupBinds, Type: "bind-failed-more", Fields: []observe.Field{
			f("generation", sum.Generation), f("more", more)}})
	}
}

// ConfirmPending records that the pending apply was left pending past its
// control connection (commit-confirmed) until deadline, for metrics, and
// tells watchers (rules, "confirm-pending": the generation it gets if
// confirmed, deadline_ms, left_ms); the zero deadline says it ended (its
// committed or rolled-back event follows or came first).
func (e *Engine) ConfirmPending(gen uint64, deadline time.Time) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.confirmBy = deadline
	if deadline.IsZero() || !e.hub.Watched(observe.GroupRules) {
		return
	}
	ev := e.tableState("confirm-pending")
	ev.Fields[0] = f("generation", gen)
	ev.Fields = append(ev.Fields, f("deadline_ms", deadline.UnixMilli()), f("left_ms", time.Until(deadline).Milliseconds()))
	e.hub.Publish(ev)
}

// publishTable tells watchers the table was committed or rolled back.
// Called with e.mu held.
func (e *Engine) publishTable(typ string) {
	if e.hub.Watched(observe.GroupRules) {
		e.hub.Publish(e.tableState(typ))
	}
}

// healthChanged tells watchers backend i of ln's pool went down or up. Only
// transitions are published (balance.Pool.Failed and Connected say which
// calls are).
func (l *Loop) healthChanged(ln *Listener, i int, up bool) {
	l.e.publishHealth(ln.ruleName(), ln.pool.Target(i), up, "passive", "")
}

// publishHealth tells watchers a backend of rule went up or down, by
// "passive" health or "check"s (reason: why the last check failed, or "").
func (e *Engine) publishHealth(rule string, backend netip.AddrPort, up bool, by, reason string) {
	h := &e.hub
	if !h.Watched(observe.GroupHealth) {
		return
	}
	typ := "down"
	if up {
		typ = "up"
	}
	fs := []observe.Field{f("rule", rule), f("backend", backend.String()), f("by", by)}
	if reason != "" {
		fs = append(fs, f("reason", reason))
	}
	h.Publish(observe.Event{Group: observe.GroupHealth, Type: typ, Time: time.Now(), Fields: fs})
}

// sessionEvent tells watchers a session started forwarding or ended,
// within SessionEventRate.
func (l *Loop) sessionEvent(s *session, typ string, code conn.Code) {
	e := l.e
	if !e.hub.Watched(observe.GroupSessions) {
		return
	}
	now := time.Now()
	ok, suppressed := e.sessLimit.Allow(now)
	if !ok {
		return
	}
	fs := []observe.Field{f("rule", s.ln.ruleName()), f("source", s.cli.Src.String()), f("backend", s.srv.Dst.String())}
	if o := s.origSrc(); o.IsValid() {
		fs = append(fs, f("peer", o.String()))
	}
	if sni, alpn := s.seen(); sni != "" || alpn != "" {
		if sni != "" {
			fs = append(fs, f("sni", sni))
		}
		if alpn != "" {
			fs = append(fs, f("alpn", alpn))
		}
	}
	if typ == "end" {
		fs = append(fs, f("code", code.String()), f("up", s.up.Bytes), f("down", s.down.Bytes),
			f("age_ms", time.Duration(int64(time.Since(l.base))-s.start).Milliseconds()))
	}
	if suppressed > 0 {
		fs = append(fs, f("suppressed", suppressed))
	}
	e.hub.Publish(observe.Event{Group: observe.GroupSessions, Type: typ, Time: now, Fields: fs})
}
