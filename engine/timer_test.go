package engine

import "testing"

type nopExpirer struct{ fired *int }

func (n nopExpirer) expire(*Loop) { *n.fired++ }

// wheel.next: the loop sleeps to the first tick whose slot holds a timer,
// never past a timer that is due, and rescans once that tick is passed.
func TestWheelNext(t *testing.T) {
	var w wheel
	w.init(100)
	if got := w.next(); got != -1 {
		t.Fatalf("empty wheel: next %d, want -1", got)
	}
	fired := 0
	var a, b, c, far timer
	for _, tm := range []*timer{&a, &b, &c, &far} {
		tm.owner = nopExpirer{&fired}
	}
	w.add(&a, 150)
	if got := w.next(); got != 150 {
		t.Fatalf("one timer at 150: next %d", got)
	}
	w.add(&b, 120) // earlier: lowers the answer without a scan
	if got := w.next(); got != 120 {
		t.Fatalf("after adding 120: next %d", got)
	}
	w.add(&far, 100+wheelSlots+5) // next turn: its slot comes at 105 of this one
	if got := w.next(); got != 105 {
		t.Fatalf("a timer a turn away: next %d, want its slot's tick 105", got)
	}
	w.advance(nil, 105) // wakes, fires nothing (far is for the next turn)
	if fired != 0 || !far.armed() {
		t.Fatalf("advance to 105 fired %d, far armed %v", fired, far.armed())
	}
	if got := w.next(); got != 120 {
		t.Fatalf("after passing 105: next %d, want 120", got)
	}
	w.del(&b) // a lower bound stays valid: an early wake, then a rescan
	if got := w.next(); got != 120 {
		t.Fatalf("after del(120): next %d, want the bound 120", got)
	}
	w.advance(nil, 120)
	if got := w.next(); got != 150 {
		t.Fatalf("after passing 120: next %d, want 150", got)
	}
	w.add(&c, 90) // in the past: due at once
	if got := w.next(); got != 121 {
		t.Fatalf("a timer in the past: next %d, want cur 121", got)
	}
	w.advance(nil, 150)
	if fired != 2 || a.armed() || c.armed() {
		t.Fatalf("advance to 150: fired %d", fired)
	}
	if got := w.next(); got != 100+wheelSlots+5 {
		t.Fatalf("only far left: next %d, want %d", got, 100+wheelSlots+5)
	}
	w.del(&far)
	if got := w.next(); got != -1 {
		t.Fatalf("emptied: next %d, want -1", got)
	}
}
