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
	// first is a lower bound of the tick of the first slot at or after cur
	// that holds a timer, valid while first >= cur: add lowers it, del
	// leaves it (a lower bound stays one), advance passing it invalidates
	// it and the next call of next scans again.
	first int64
}

func (w *wheel) init(now int64) {
	for i := range w.slots {
		s := &w.slots[i]
		s.next, s.prev = s, s
	}
	w.cur = now
	w.first = now - 1
}

// next returns the tick the loop must wake at: the first tick at or after
// cur whose slot holds a timer (due then, or on a later turn of the wheel:
// the wake then only moves cur on), or -1 when no timer is armed. The loop
// sleeps until it instead of waking every tick: an idle loop with sessions
// whose timeouts are minutes away sleeps a turn of the wheel at a time. A
// scan walks at most one turn of slots, and only when the last answer has
// been passed.
func (w *wheel) next() int64 {
	if w.count == 0 {
		return -1
	}
	if w.first >= w.cur {
		return w.first
	}
	for d := int64(0); d < wheelSlots; d++ {
		if s := &w.slots[(w.cur+d)&(wheelSlots-1)]; s.next != s {
			w.first = w.cur + d
			return w.first
		}
	}
	return w.cur // unreachable while count > 0
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
	// The slot's tick in the current turn (when itself for a timer within
	// one turn; earlier for one further away, which is then a lower bound).
	if slot := w.cur + (when-w.cur)&(wheelSlots-1); w.first >= w.cur && slot < w.first {
		w.first = slot
	}
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
