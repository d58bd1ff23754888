package bench

// Apply time of the control transaction (issue 4): a table of 1 000 rules,
// a table of 10 000 ports, and a one-rule change on top of tables of
// several sizes. Measured end to end through the ctl client library and
// server against an in-process engine (BenchmarkApplyCtl), and on the
// engine alone (BenchmarkApplyEngine: Apply + Commit, no protocol), so the
// part of the socket sync and the part of the protocol (the whole table is
// sent, parsed and validated on every transaction) can be told apart.
//
//	go test -run '^$' -bench 'Apply' -benchtime 10x ./bench/
//
// Each table listens on a loopback address of its own, picked at random in
// 127.100.0.0-127.199.255.255, on ports below the ephemeral range, so that
// it collides neither with other tests' 127.0.0.1 listeners nor with
// another run of these benchmarks; 10 000 listening sockets fit the 20 000
// fds a process may hold here.

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/ctl"
	"github.com/sluice-proxy/sluice/engine"
	"github.com/sluice-proxy/sluice/rules"
)

const applyTarget = "127.0.0.1:9" // never dialed: the benchmarks only listen

// benchAddr is a loopback address no one else is likely to listen on.
func benchAddr() string {
	return fmt.Sprintf("127.%d.%d.%d", 100+rand.IntN(100), rand.IntN(256), 1+rand.IntN(254))
}

// badVerdict fails on a bad verdict, showing the first few failures.
func badVerdict(tb testing.TB, failures []string) {
	tb.Helper()
	if len(failures) > 3 {
		failures = append(failures[:3:3], fmt.Sprintf("and %d more", len(failures)-3))
	}
	tb.Fatalf("verdict bad (is another process on these ports?): %q", failures)
}

// portRules is a table of n listen ports from addr:base, in rules of at
// most per ports each.
func portRules(tb testing.TB, addr string, base, n, per int) []*rules.Rule {
	tb.Helper()
	var rs []*rules.Rule
	for lo := base; lo < base+n; lo += per {
		hi := min(lo+per, base+n) - 1
		line := fmt.Sprintf("tcp %s:%d -> %s", addr, lo, applyTarget)
		if hi > lo {
			line = fmt.Sprintf("tcp %s:%d-%d -> %s", addr, lo, hi, applyTarget)
		}
		r, err := rules.Parse(line)
		if err != nil {
			tb.Fatal(err)
		}
		rs = append(rs, r)
	}
	return rs
}

// oneRuleChange is rs with its middle rule moved to port: one listen key
// removed, one added, every other kept.
func oneRuleChange(tb testing.TB, rs []*rules.Rule, addr string, port int) []*rules.Rule {
	tb.Helper()
	r, err := rules.Parse(fmt.Sprintf("tcp %s:%d -> %s", addr, port, applyTarget))
	if err != nil {
		tb.Fatal(err)
	}
	out := append([]*rules.Rule(nil), rs...)
	out[len(out)/2] = r
	return out
}

// applyEngine is a started engine with two loops, shut down at the end.
func applyEngine(tb testing.TB) *engine.Engine {
	tb.Helper()
	e, err := engine.New(engine.Config{Loops: 2})
	if err != nil {
		tb.Fatal(err)
	}
	e.Start()
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		e.Shutdown(ctx)
	})
	return e
}

// serveCtl serves e's control socket in a fresh directory.
func serveCtl(tb testing.TB, e *engine.Engine) string {
	tb.Helper()
	dir, err := os.MkdirTemp("", "slbench")
	if err != nil {
		tb.Fatal(err)
	}
	path := filepath.Join(dir, "ctl.sock")
	srv, err := ctl.Serve(context.Background(), path, e, nil)
	if err != nil {
		os.RemoveAll(dir)
		tb.Fatal(err)
	}
	tb.Cleanup(func() { srv.Close(); os.RemoveAll(dir) })
	return path
}

// ctlReplace replaces the table with rs in one transaction through the
// client library — dial, hello, pifs, list, load, apply, commit — and
// returns the summary; the verdict must be good.
func ctlReplace(tb testing.TB, path string, rs []*rules.Rule) *ctl.Summary {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := ctl.Dial(ctx, path, ctl.Options{Name: "bench"})
	if err != nil {
		tb.Fatal(err)
	}
	defer c.Close()
	if err := c.Hello(ctx, ctl.IntentWrite); err != nil {
		tb.Fatal(err)
	}
	if _, err := c.Pifs(ctx); err != nil {
		tb.Fatal(err)
	}
	cur, err := c.List(ctx)
	if err != nil {
		tb.Fatal(err)
	}
	if _, err := c.Load(ctx, cur.Generation, rs); err != nil {
		tb.Fatal(err)
	}
	sum, err := c.Apply(ctx, 0)
	if err != nil {
		tb.Fatal(err)
	}
	if !sum.OK {
		c.Rollback(ctx)
		badVerdict(tb, sum.Failures())
	}
	if _, err := c.Commit(ctx); err != nil {
		tb.Fatal(err)
	}
	return sum
}

// engineReplace is ctlReplace on the engine alone.
func engineReplace(tb testing.TB, e *engine.Engine, rs []*rules.Rule) *rules.Summary {
	tb.Helper()
	sum, err := e.Apply(rs)
	if err != nil {
		tb.Fatal(err)
	}
	if !sum.OK() {
		e.Rollback()
		badVerdict(tb, sum.Failures())
	}
	if _, err := e.Commit(); err != nil {
		tb.Fatal(err)
	}
	return sum
}

type applyCase struct {
	name  string
	base  int
	ports int
	per   int // ports per rule
}

var fullCases = []applyCase{
	{"rules=1000", 21000, 1000, 1},
	{"ports=10000", 20000, 10000, rules.MaxPortsPerRule},
}

var oneRuleCases = []applyCase{
	{"rules=100", 21000, 100, 1},
	{"rules=1000", 21000, 1000, 1},
	{"rules=4000", 21000, 4000, 1},
}

// benchApply measures replace(table) from an empty table (full) and
// replace(one rule moved) on top of the table (one-rule), for each case.
// The teardown of a full apply, back to the empty table, is not timed.
func benchApply(b *testing.B, replace func(testing.TB, []*rules.Rule) (added, removed int)) {
	b.Run("full", func(b *testing.B) {
		for _, tc := range fullCases {
			b.Run(tc.name, func(b *testing.B) {
				rs := portRules(b, benchAddr(), tc.base, tc.ports, tc.per)
				for b.Loop() {
					if added, _ := replace(b, rs); added != tc.ports {
						b.Fatalf("%d ports bound, want %d", added, tc.ports)
					}
					b.StopTimer()
					replace(b, nil)
					b.StartTimer()
				}
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(tc.ports), "ns/port")
			})
		}
	})
	b.Run("one-rule", func(b *testing.B) {
		for _, tc := range oneRuleCases {
			b.Run(tc.name, func(b *testing.B) {
				addr := benchAddr()
				rs := portRules(b, addr, tc.base, tc.ports, tc.per)
				replace(b, rs)
				// The middle rule moves to one of two spare ports in turn.
				alt := [2][]*rules.Rule{
					oneRuleChange(b, rs, addr, tc.base+tc.ports),
					oneRuleChange(b, rs, addr, tc.base+tc.ports+1),
				}
				i := 0
				for b.Loop() {
					if added, removed := replace(b, alt[i%2]); added != 1 || removed != 1 {
						b.Fatalf("one-rule change: %d added, %d removed, want 1 and 1", added, removed)
					}
					i++
				}
				b.StopTimer()
				replace(b, nil)
			})
		}
	})
}

// BenchmarkApplyCtl: the whole transaction through the control socket.
func BenchmarkApplyCtl(b *testing.B) {
	e := applyEngine(b)
	path := serveCtl(b, e)
	benchApply(b, func(tb testing.TB, rs []*rules.Rule) (int, int) {
		s := ctlReplace(tb, path, rs)
		return s.Added, s.Removed
	})
}

// BenchmarkApplyEngine: Engine.Apply and Commit alone.
func BenchmarkApplyEngine(b *testing.B) {
	e := applyEngine(b)
	benchApply(b, func(tb testing.TB, rs []*rules.Rule) (int, int) {
		s := engineReplace(tb, e, rs)
		return s.Added, s.Removed
	})
}
