// Package observe carries what the engine shows the control side beyond its
// table: events for watchers (ctl watch), published without ever blocking
// the publisher, and the plain records of live sessions and counters that
// ctl sessions and ctl stats print. It imports nothing of sluice's: the
// engine publishes, ctl subscribes, neither knows the other.
package observe

import (
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Group is a set of event groups, one bit each.
type Group uint8

const (
	GroupRules    Group = 1 << iota // a table applied, committed, rolled back
	GroupBinds                      // ports that failed to bind in an apply
	GroupHealth                     // a backend's passive health went down or up
	GroupSessions                   // sessions started and ended (rate-bounded)
	AllGroups     = GroupRules | GroupBinds | GroupHealth | GroupSessions
)

var groupNames = [...]string{"rules", "binds", "health", "sessions"}

// ParseGroup returns the group named s.
func ParseGroup(s string) (Group, bool) {
	for i, n := range groupNames {
		if n == s {
			return Group(1) << i, true
		}
	}
	return 0, false
}

// String names the groups of g, comma separated.
func (g Group) String() string {
	var out []string
	for i, n := range groupNames {
		if g&(Group(1)<<i) != 0 {
			out = append(out, n)
		}
	}
	return strings.Join(out, ",")
}

// Names lists every group name, in bit order.
func Names() []string { return groupNames[:] }

// Field is one named value of an event: a string, a bool or an integer.
type Field struct {
	Key   string
	Value any
}

// Event is one thing that happened, or (Type "state") one piece of the
// current state a watcher is sent right after it subscribed.
type Event struct {
	Group  Group // exactly one bit
	Type   string
	Time   time.Time
	Fields []Field
}

// TypeState is the type of the events that make up the current state.
const TypeState = "state"

// Hub fans events out to subscribers. Publish never blocks: each
// subscriber has a bounded queue, and one whose queue is full is cut off
// (Sub.Overflowed) rather than waited for. The zero Hub is ready to use.
type Hub struct {
	watched atomic.Uint32 // the union of the live subscribers' groups
	mu      sync.Mutex
	subs    map[*Sub]struct{}
}

// Sub is one subscription.
type Sub struct {
	h      *Hub
	groups Group
	ch     chan Event
	over   chan struct{} // closed when the queue overflowed: the sub is cut off
	once   sync.Once
}

// Watched reports whether anyone subscribes to a group of g: one atomic
// load, so a publisher tests it before it builds an event nobody wants.
func (h *Hub) Watched(g Group) bool { return Group(h.watched.Load())&g != 0 }

// Subscribe adds a subscriber to groups with a queue of n events.
func (h *Hub) Subscribe(groups Group, n int) *Sub {
	s := &Sub{h: h, groups: groups, ch: make(chan Event, max(n, 1)), over: make(chan struct{})}
	h.mu.Lock()
	if h.subs == nil {
		h.subs = map[*Sub]struct{}{}
	}
	h.subs[s] = struct{}{}
	h.recompute()
	h.mu.Unlock()
	return s
}

// recompute sets watched from the subscribers. Called with h.mu held.
func (h *Hub) recompute() {
	var g Group
	for s := range h.subs {
		g |= s.groups
	}
	h.watched.Store(uint32(g))
}

// Publish queues ev for every subscriber of its group. It never blocks; a
// subscriber whose queue is full is removed and told so.
func (h *Hub) Publish(ev Event) {
	if !h.Watched(ev.Group) {
		return
	}
	if ev.Time.IsZero() {
		ev.Time = time.Now()
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for s := range h.subs {
		if s.groups&ev.Group == 0 {
			continue
		}
		select {
		case s.ch <- ev:
		default:
			delete(h.subs, s)
			h.recompute()
			s.once.Do(func() { close(s.over) })
		}
	}
}

// Events is the subscriber's queue.
func (s *Sub) Events() <-chan Event { return s.ch }

// Overflowed is closed once the subscriber's queue was full when an event
// came: it missed that event and gets no more.
func (s *Sub) Overflowed() <-chan struct{} { return s.over }

// Groups is what the subscriber asked for.
func (s *Sub) Groups() Group { return s.groups }

// Close ends the subscription.
func (s *Sub) Close() {
	s.h.mu.Lock()
	delete(s.h.subs, s)
	s.h.recompute()
	s.h.mu.Unlock()
}

// Limiter bounds a flood of events to about rate a second (a token bucket
// of rate tokens) and counts what it suppressed, so a watcher can be told.
// Safe for concurrent use; only consulted when someone watches.
type Limiter struct {
	mu         sync.Mutex
	rate       float64
	tokens     float64
	last       time.Time
	suppressed uint64
}

// NewLimiter returns a limiter of rate events a second.
func NewLimiter(rate int) *Limiter { return &Limiter{rate: float64(rate), tokens: float64(rate)} }

// Allow reports whether one more event may go out now, and how many were
// suppressed since the last one that went out.
func (l *Limiter) Allow(now time.Time) (ok bool, suppressed uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.last.IsZero() {
		l.tokens = min(l.rate, l.tokens+now.Sub(l.last).Seconds()*l.rate)
	}
	l.last = now
	if l.tokens < 1 {
		l.suppressed++
		return false, 0
	}
	l.tokens--
	s := l.suppressed
	l.suppressed = 0
	return true, s
}

// Session is one live session as ctl sessions shows it.
type Session struct {
	Rule   string         // the rule's listen key, "tcp 0.0.0.0:8080"
	Source netip.AddrPort // the client, as seen after PROXY
	Peer   netip.AddrPort // the connecting peer when a PROXY header replaced it; zero otherwise
	Target netip.AddrPort // the backend; zero while not yet chosen
	State  string         // handshake, connecting, send-proxy, forwarding, ...
	Age    time.Duration
	Up     uint64 // bytes client → backend
	Down   uint64 // bytes backend → client
	Splice bool   // bytes moved through a pipe (splice) rather than a buffer
	SNI    string // a routed session's hello: server name ("" when none)
	ALPN   string // and ALPN protocol, the one that chose the route or the first offered
	// A terminated session's TLS, once its handshake is done ("" else):
	// Go's names, "TLS 1.3", "TLS_AES_128_GCM_SHA256" (ctl version 5).
	TLSVersion, TLSCipher string
	TLSResumed            bool
}

// Sessions is a bounded listing of live sessions.
type Sessions struct {
	List  []Session
	Total int // sessions that matched; more than len(List) when truncated
}

// Counter is one named engine counter for ctl stats.
type Counter struct {
	Name  string
	Value int64
}
