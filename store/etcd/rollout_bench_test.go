package etcd

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/etcdtest"
	"github.com/sluice-proxy/sluice/rules"
)

// stampApplier is a tableApplier that records when each apply ran: where
// a rollout's time goes, from the operator's write to the last status.
type stampApplier struct {
	tableApplier
	stamps *stamps
}

type stamps struct {
	mu sync.Mutex
	at []time.Time
}

func (s *stamps) take() []time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	at := s.at
	s.at = nil
	return at
}

func (a *stampApplier) ApplyTable(file string, entries []rules.Entry) Result {
	r := a.tableApplier.ApplyTable(file, entries)
	a.stamps.mu.Lock()
	a.stamps.at = append(a.stamps.at, time.Now())
	a.stamps.mu.Unlock()
	return r
}

// BenchmarkRollout is the rollout time against fleet size: N instance
// loops run in-process against one real etcd (each its own client, lease
// and watch, as N daemons would have), an applier that commits at once
// (the engine's transaction is bench/apply_bench_test.go's), a rollout of
// the default batches (one, then the rest). Reported beside ns/op:
//   - first-ms: from the rollout's start to the first instance's apply (the
//     operator's read, the table and plan stored, the first assignment, its
//     watch event, the table's get);
//   - batch1-ms: from the first apply to the second batch's first (the
//     first status put, its watch event at the operator, the plan's
//     update, the second batch's assignment read and written, its watch
//     event, the table's get);
//   - spread-ms: from the first apply of the second batch to its last (the
//     watch fan-out of one transaction's N-1 assignments and N-1 table
//     gets);
//   - tail-ms: from the last apply to the rollout's return (N-1 status
//     puts under their leases, their watch events at the operator, the
//     plan's update and release);
//   - rtt-ms: one etcd put, for scale.
func BenchmarkRollout(b *testing.B) {
	srv := etcdtest.Start(b)
	for _, n := range []int{1, 10, 50, 100, 200} {
		b.Run(fmt.Sprintf("instances=%d", n), func(b *testing.B) { benchRollout(b, srv, n) })
	}
}

// benchRuns makes each run's prefix and tables new: a run's instances
// start without an assignment, and no two rollouts store the same table in
// the same second (one VERSION).
var benchRuns atomic.Int64

func benchRollout(b *testing.B, srv *etcdtest.Server, n int) {
	conn := Conn{Endpoints: []string{srv.URL}}
	run := benchRuns.Add(1)
	prefix := fmt.Sprintf("/sluice/bench%d", run)
	st := &stamps{}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("i%03d", i)
		in, err := NewInstance(InstanceConfig{Conn: conn, Prefix: prefix, Instance: ids[i]}, &stampApplier{stamps: st})
		if err != nil {
			b.Fatal(err)
		}
		wg.Add(1)
		go func() { defer wg.Done(); in.Run(ctx) }()
	}
	f, err := OpenFleet(conn, prefix)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	waitUntil(b, 60*time.Second, "every instance's status", func() bool {
		v, err := f.Read(ctx)
		if err != nil {
			return false
		}
		k := 0
		for _, m := range v.Members {
			if m.Status != nil {
				k++
			}
		}
		return k == n
	})
	var first, batch1, spread, tail, rtt time.Duration
	st.take()
	b.ResetTimer()
	for i := range b.N {
		table := []byte(fmt.Sprintf("tcp 127.0.0.1:%d -> 127.0.0.1:%d\n", 10000+i%50000, 1+run%60000))
		start := time.Now()
		rep, err := f.Rollout(ctx, table, RolloutOptions{Instances: ids, Timeout: 60 * time.Second, Holder: "bench"})
		end := time.Now()
		if err != nil || rep.Outcome != RolloutCommitted {
			b.Fatalf("rollout %d: %v %+v", i, err, rep)
		}
		at := st.take()
		slices.SortFunc(at, func(x, y time.Time) int { return x.Compare(y) })
		if len(at) != n {
			b.Fatalf("%d applies, want %d", len(at), n)
		}
		first += at[0].Sub(start)
		if n > 1 {
			batch1 += at[1].Sub(at[0])
			spread += at[n-1].Sub(at[1])
		}
		tail += end.Sub(at[n-1])
		b.StopTimer()
		t0 := time.Now()
		if _, err := f.cli.Put(ctx, prefix+"/bench-rtt", "x"); err != nil {
			b.Fatal(err)
		}
		rtt += time.Since(t0)
		b.StartTimer()
	}
	ms := func(d time.Duration) float64 { return float64(d) / float64(b.N) / 1e6 }
	b.ReportMetric(ms(first), "first-ms")
	b.ReportMetric(ms(batch1), "batch1-ms")
	b.ReportMetric(ms(spread), "spread-ms")
	b.ReportMetric(ms(tail), "tail-ms")
	b.ReportMetric(ms(rtt), "rtt-ms")
}
