package engine

import (
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/observe"
)

// Issue 15, item 13: readers and scrapes do not wait for a whole apply.
// While a 10 000-port apply binds, Stats (what /metrics reads), the table's
// generation and rules (what status and list read) and a watch
// subscription each answer in a small part of the apply's time.
func TestReadersDuringLargeApply(t *testing.T) {
	e := newEngine(t)
	rs := parseAll(t,
		"tcp 127.0.93.1:40000-43999 -> 127.0.0.1:9",
		"tcp 127.0.93.1:44000-47999 -> 127.0.0.1:9",
		"tcp 127.0.93.1:48000-49999 -> 127.0.0.1:9")
	var ended atomic.Int64 // when Apply returned, engine clock; 0: not yet
	done := make(chan time.Duration)
	go func() {
		start := time.Now()
		sum, err := e.Apply(rs)
		took := time.Since(start)
		ended.Store(int64(time.Since(e.base)))
		if err != nil {
			t.Error(err)
		} else if sum.Added < 9000 {
			t.Errorf("bound %d ports of 10000: %v", sum.Added, sum.Failures()[:3])
		}
		done <- took
	}()
	time.Sleep(10 * time.Millisecond) // the apply is under way
	names := []string{"Stats", "Generation+Rules", "Watch", "Totals"}
	reads := []func(){
		func() { _ = e.Stats() },
		func() { _, _ = e.Generation(), e.Rules() },
		func() { sub, _ := e.Watch(observe.GroupRules, 16); sub.Close() },
		func() { _ = e.Totals() },
	}
	// The slowest of each read that ended while the apply still ran.
	var worst [4]time.Duration
	rounds := 0
	for ended.Load() == 0 {
		for i, read := range reads {
			t0 := time.Now()
			read()
			d := time.Since(t0)
			if end := ended.Load(); end == 0 || end > int64(time.Since(e.base)) {
				worst[i] = max(worst[i], d)
				if i == 0 {
					rounds++
				}
			}
		}
		time.Sleep(time.Millisecond)
	}
	took := <-done
	t0 := time.Now()
	_ = e.Stats()
	after := time.Since(t0)
	t.Logf("apply of 10000 ports took %s; %d Stats calls ended during it, the slowest: Stats %s, Generation+Rules %s, Watch %s, Totals %s; one Stats of the 10000-port table after it: %s",
		took.Round(time.Millisecond), rounds, worst[0].Round(time.Microsecond), worst[1].Round(time.Microsecond),
		worst[2].Round(time.Microsecond), worst[3].Round(time.Microsecond), after.Round(time.Millisecond))
	if _, err := e.Rollback(); err != nil {
		t.Fatal(err)
	}
	// Generous (the machine is shared): a read may wait for the swap, or
	// for the scheduler, never for the binds.
	if rounds < 5 {
		t.Errorf("only %d Stats calls ended during an apply of %s: they wait for it", rounds, took)
	}
	for i, name := range names {
		if worst[i] > took/2 {
			t.Errorf("%s waited %s during an apply of %s: it waits for the binds", name, worst[i], took)
		}
	}
}
