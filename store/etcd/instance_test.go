package etcd

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/sluice-proxy/sluice/internal/etcdtest"
	"github.com/sluice-proxy/sluice/rules"
	"github.com/sluice-proxy/sluice/state"
)

// tableApplier is an Applier that commits every table at once: the
// instance loop's side of the store tested, or measured, without an
// engine (the engine's transaction has its own tests and benchmark).
type tableApplier struct {
	mu      sync.Mutex
	lines   []string
	gen     uint64
	applied []string // the files applied, in order
	delay   time.Duration
}

var _ Applier = (*tableApplier)(nil)

func (a *tableApplier) ApplyTable(file string, entries []rules.Entry) Result {
	if a.delay > 0 {
		time.Sleep(a.delay)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.lines = state.Lines(rules.RulesOf(entries))
	a.gen++
	a.applied = append(a.applied, file)
	return Result{Outcome: OutcomeCommitted, Generation: a.gen, Verdict: "good", Summary: &Summary{}}
}

func (a *tableApplier) Active() ([]string, uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.lines, a.gen
}

func (a *tableApplier) last() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.applied) == 0 {
		return ""
	}
	return a.applied[len(a.applied)-1]
}

func etcdClient(tb testing.TB, url string) *clientv3.Client {
	tb.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{url}, DialTimeout: 5 * time.Second})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { cli.Close() })
	return cli
}

func waitUntil(tb testing.TB, limit time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("%s: not within %s", what, limit)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A compaction past the revision the instance's watch starts from: the
// watch is refused as compacted, the instance reads the keys again (the
// assignment written in the gap is applied, its event long compacted
// away), and a later assignment still reaches it through the new watch.
func TestInstanceSurvivesCompaction(t *testing.T) {
	srv := etcdtest.Start(t)
	cli := etcdClient(t, srv.URL)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	keys := Keys{"/sluice/compact"}
	put := func(k, v string) int64 {
		t.Helper()
		r, err := cli.Put(ctx, k, v)
		if err != nil {
			t.Fatal(err)
		}
		return r.Header.Revision
	}
	for i, v := range []string{"v1", "v2", "v3"} {
		put(keys.Table(v), fmt.Sprintf("tcp 127.0.0.1:%d -> 127.0.0.1:9\n", 20001+i))
	}
	put(keys.Assign("a"), "v1")

	app := &tableApplier{}
	core, logs := observer.New(zap.InfoLevel)
	in, err := NewInstance(InstanceConfig{Conn: Conn{Endpoints: []string{srv.URL}}, Prefix: keys.Prefix, Instance: "a", TTL: 2 * time.Second, Log: zap.New(core)}, app)
	if err != nil {
		t.Fatal(err)
	}
	// Once, between the first get and its watch: the assignment moves to
	// v2, other keys move on, and etcd compacts past them all.
	var once sync.Once
	compacted := make(chan int64, 1)
	in.afterGet = func() {
		once.Do(func() {
			put(keys.Assign("a"), "v2")
			for i := range 5 {
				put(keys.Assign("other"), fmt.Sprint("x", i))
			}
			rev := put(keys.Prefix+"/unrelated", "y")
			if _, err := cli.Compact(ctx, rev); err != nil {
				t.Error(err)
			}
			compacted <- rev
		})
	}
	rctx, rcancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); in.Run(rctx) }()
	defer func() { rcancel(); <-done }()

	rev := <-compacted
	waitUntil(t, 10*time.Second, "v2, assigned in the compacted gap, applied", func() bool { return app.last() == keys.Table("v2") })
	if in.Stats().Errors == 0 {
		t.Errorf("the compaction was not counted: %+v", in.Stats())
	}
	if r := put(keys.Assign("a"), "v3"); r <= rev {
		t.Fatalf("revision %d after the compaction at %d", r, rev)
	}
	waitUntil(t, 10*time.Second, "v3, assigned after the compaction, applied", func() bool { return app.last() == keys.Table("v3") })
	if st := in.Stats(); !st.Connected || st.Version != "v3" {
		t.Errorf("stats: %+v", st)
	}
	app.mu.Lock()
	if len(app.applied) != 3 {
		t.Errorf("applied %v, want v1, v2, v3 once each", app.applied)
	}
	app.mu.Unlock()
	if n := logs.FilterMessageSnippet("compacted").Len(); n != 1 {
		t.Errorf("%d logs of the compaction, want 1: %v", n, logs.All())
	}
	resp, err := cli.Get(ctx, keys.Status("a"))
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("status: %v %v", resp, err)
	}
}
