package observe

import (
	"testing"
	"time"
)

func TestHubNeverBlocksAndCutsTheFull(t *testing.T) {
	var h Hub
	if h.Watched(GroupRules) {
		t.Fatal("an empty hub watches nothing")
	}
	slow := h.Subscribe(GroupRules, 2)
	other := h.Subscribe(GroupHealth, 10)
	if !h.Watched(GroupRules) || !h.Watched(GroupHealth) || h.Watched(GroupSessions) {
		t.Fatal("Watched does not follow the subscribers")
	}
	for i := 0; i < 5; i++ { // returns although nobody reads
		h.Publish(Event{Group: GroupRules, Type: "x"})
	}
	select {
	case <-slow.Overflowed():
	default:
		t.Fatal("a subscriber whose queue overflowed is not cut off")
	}
	if len(slow.Events()) != 2 {
		t.Fatalf("queue holds %d events, want the 2 before the overflow", len(slow.Events()))
	}
	if h.Watched(GroupRules) {
		t.Fatal("a cut-off subscriber still counts as watching")
	}
	h.Publish(Event{Group: GroupHealth, Type: "down"})
	if ev := <-other.Events(); ev.Type != "down" || ev.Time.IsZero() {
		t.Fatalf("event %+v", ev)
	}
	select {
	case <-other.Overflowed():
		t.Fatal("a subscriber with room was cut off")
	default:
	}
	other.Close()
	if h.Watched(GroupHealth) {
		t.Fatal("a closed subscriber still counts as watching")
	}
}

func TestLimiter(t *testing.T) {
	l := NewLimiter(3)
	now := time.Unix(1000, 0)
	for i := 0; i < 3; i++ {
		if ok, _ := l.Allow(now); !ok {
			t.Fatalf("event %d refused within the burst", i)
		}
	}
	for i := 0; i < 4; i++ {
		if ok, _ := l.Allow(now); ok {
			t.Fatal("event beyond the rate allowed")
		}
	}
	ok, suppressed := l.Allow(now.Add(time.Second))
	if !ok || suppressed != 4 {
		t.Fatalf("after a second: ok %v suppressed %d, want true 4", ok, suppressed)
	}
}

func TestTableFollower(t *testing.T) {
	var f TableFollower
	if err := f.Next("applied", 2, false); err == nil {
		t.Fatal("an event before the state is accepted")
	}
	steps := []struct {
		typ     string
		gen     uint64
		pending bool
	}{{TypeState, 1, false}, {"applied", 2, false}, {"rolled-back", 1, false}, {"applied", 2, false}, {"committed", 2, false}}
	for _, s := range steps {
		if err := f.Next(s.typ, s.gen, s.pending); err != nil {
			t.Fatal(err)
		}
	}
	if f.Gen != 2 || f.Pending || f.Events != 4 {
		t.Fatalf("follower %+v", f)
	}
	for _, bad := range []struct {
		typ string
		gen uint64
	}{{"committed", 3}, {"applied", 4}, {"rolled-back", 2}} {
		g := f
		if err := g.Next(bad.typ, bad.gen, false); err == nil {
			t.Errorf("%s %d at generation 2 (nothing pending) is accepted", bad.typ, bad.gen)
		}
	}
	g := TableFollower{}
	_ = g.Next(TypeState, 5, true) // joined while an apply was pending
	if err := g.Next("committed", 6, false); err != nil {
		t.Fatal(err)
	}
}
