package engine

import "time"

// The timer wheel: a hashed wheel of wheelSlots slots, one tick each. A timer
// lands in slot (when mod wheelSlots) and carries its absolute tick, so timers
// further away than one turn simply wait in their slot for later turns. Adding
// and removing are O(1) (intrusive doubly linked lists); each tick walks one
// slot. Per-session timers are never moved on activity: the owner checks on
// expiry whether its deadline moved and re-arms (lazy idle timeouts).
const (
	tick       = 10 * time.Millisecond
	wheelSlots = 1024 // one turn = 10.24 s
)

// expirer is the owner of a timer; Expire runs on the loop that owns it.
type expirer interface {
	expire(l *Loop)
}

// timer is embedded in its owner, so arming one never allocates.
type timer struct {
	next, prev *timer
	when       int64 // absolute tick
	owner      expirer
}

func (t *timer) armed() bool { return t.next != nil }

type wheel struct {
	slots [wheelSlots]timer // sentinels of circular lists
	cur   int64             // next tick to process
	count int
}

func (w *wheel) init(now int64) {
	for i := range w.slots {
		s := &w.slots[i]
		s.next, s.prev = s, s
	}
	w.cur = now
}

// add arms t to fire at tick when (at the earliest the next tick). An armed
// timer is moved.
func (w *wheel) add(t *timer, when int64) {
	if t.armed() {
		w.del(t)
	}
	if when < w.cur {
		when = w.cur
	}
	t.when = when
	s := &w.slots[when&(wheelSlots-1)]
	t.prev, t.next = s.prev, s
	s.prev.next = t
	s.prev = t
	w.count++
}

// del disarms t; a disarmed timer is left alone.
func (w *wheel) del(t *timer) {
	if !t.armed() {
		return
	}
	t.prev.next = t.next
	t.next.prev = t.prev
	t.next, t.prev = nil, nil
	w.count--
}

// advance fires every timer due up to and including tick now, in tick order.
// A timer re-armed by its owner during expire for a later tick is not fired
// again in this call unless due.
func (w *wheel) advance(l *Loop, now int64) {
	for ; w.cur <= now; w.cur++ {
		s := &w.slots[w.cur&(wheelSlots-1)]
		for t := s.next; t != s; {
			next := t.next
			if t.when <= w.cur {
				w.del(t)
				t.owner.expire(l)
			}
			t = next
			// expire may have removed next (closing a session disarms its
			// timers); restart the slot walk then.
			if t != s && !t.armed() {
				t = s.next
			}
		}
	}
}
