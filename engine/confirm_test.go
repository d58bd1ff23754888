package engine

import (
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/ctl"
	"github.com/sluice-proxy/sluice/observe"
)

var _ ctl.ConfirmWatcher = (*Engine)(nil)

// A pending commit-confirmed apply shows in the stats (its deadline) and
// to watchers of rules (confirm-pending); its end clears the deadline.
func TestConfirmPending(t *testing.T) {
	e := newEngine(t)
	sub, _ := e.Watch(observe.GroupRules, 16)
	defer sub.Close()
	deadline := time.Now().Add(time.Minute)
	e.ConfirmPending(5, deadline)
	if got := e.Stats().Table.ConfirmDeadline; got != deadline.Unix() {
		t.Fatalf("deadline %d, want %d", got, deadline.Unix())
	}
	select {
	case ev := <-sub.Events():
		if ev.Type != "confirm-pending" || ev.Fields[0].Value != uint64(5) {
			t.Fatalf("event %+v", ev)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no confirm-pending event")
	}
	e.ConfirmPending(5, time.Time{})
	if got := e.Stats().Table.ConfirmDeadline; got != 0 {
		t.Fatalf("deadline %d after the end", got)
	}
}
