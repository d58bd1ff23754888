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
	var applying atomic.Bool
	applying.Store(true)
	done := make(chan time.Duration)
	go func() {
		start := time.Now()
		sum, err := e.Apply(rs)
		took := time.Since(start)
		applying.Store(false)
		if err != nil {
			t.Error(err)
		} else if sum.Added < 9000 {
			t.Errorf("bound %d ports of 10000: %v", sum.Added, sum.Failures()[:3])
		}
		done <- took
	}()
	time.Sleep(10 * time.Millisecond) // the apply is under way
	var worst [4]time.Duration        // Stats, Generation+Rules, Watch, Totals
	calls := 0
	for applying.Load() {
		for i, read := range []func(){
			func() { _ = e.Stats() },
			func() { _, _ = e.Generation(), e.Rules() },
			func() { sub, _ := e.Watch(observe.GroupRules, 16); sub.Close() },
			func() { _ = e.Totals() },
		} {
			t0 := time.Now()
			read()
			worst[i] = max(worst[i], time.Since(t0))
		}
		calls++
		time.Sleep(time.Millisecond)
	}
	took := <-done
	t.Logf("apply of 10000 ports took %s; during it %d rounds of reads, the slowest: Stats %s, Generation+Rules %s, Watch %s, Totals %s",
		took.Round(time.Millisecond), calls, worst[0].Round(time.Microsecond), worst[1].Round(time.Microsecond),
		worst[2].Round(time.Microsecond), worst[3].Round(time.Microsecond))
	if _, err := e.Rollback(); err != nil {
		t.Fatal(err)
	}
	// Generous: a read may wait for the swap itself, never for the binds.
	for i, name := range []string{"Stats", "Generation+Rules", "Watch", "Totals"} {
		if worst[i] > took/4 {
			t.Errorf("%s waited %s during an apply of %s: it waits for the binds", name, worst[i], took)
		}
	}
}
