package ctl

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/ctl/ctltest"
	"github.com/sluice-proxy/sluice/rules"
)

// multiFleet is n in-memory instances, each with its own table and
// generation: instance i holds "tcp 0.0.0.0:(8000+i) -> 127.0.0.1:80" at
// generation 10*i+1.
type multiFleet struct {
	engs  []*ctltest.Engine
	srvs  []*Server
	paths []string
}

func newMultiFleet(t *testing.T, n int) *multiFleet {
	t.Helper()
	f := &multiFleet{}
	for i := range n {
		eng := ctltest.New(uint64(10*i+1), []string{"ns1"}, mustRules(t, fleetRule(i))...)
		s, path := startServer(t, eng, nil)
		f.engs, f.srvs, f.paths = append(f.engs, eng), append(f.srvs, s), append(f.paths, path)
	}
	return f
}

func fleetRule(i int) string {
	return "tcp 0.0.0.0:" + strconv.Itoa(8000+i) + " -> 127.0.0.1:80"
}

// appendRule builds each member's table as its own plus line.
func appendRule(t *testing.T, line string) func(m *Member) ([]*rules.Rule, error) {
	r := mustRules(t, line)[0]
	return func(m *Member) ([]*rules.Rule, error) {
		rs, err := m.Base.Rules()
		return append(rs, r), err
	}
}

const addedRule = "tcp 0.0.0.0:9090 -> 127.0.0.1:90"

func runMulti(t *testing.T, paths []string, opt MultiOptions, build func(*Member) ([]*rules.Rule, error)) *MultiResult {
	t.Helper()
	if opt.Timeout == 0 {
		opt.Timeout = 5 * time.Second
	}
	res, err := Multi(ctxT(t), paths, opt, build)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Members) != len(paths) {
		t.Fatalf("%d members for %d paths", len(res.Members), len(paths))
	}
	for i, m := range res.Members {
		if m.Index != i || m.Path != paths[i] {
			t.Fatalf("member %d is %d %s", i, m.Index, m.Path)
		}
	}
	return res
}

// wantCounts checks an engine's applies, commits, rollbacks and that nothing
// is left pending.
func wantCounts(t *testing.T, name string, eng *ctltest.Engine, applies, commits, rollbacks int) {
	t.Helper()
	a, c, r := eng.Counts()
	if a != applies || c != commits || r != rollbacks {
		t.Errorf("%s: applies %d commits %d rollbacks %d, want %d %d %d", name, a, c, r, applies, commits, rollbacks)
	}
	if eng.Pending() {
		t.Errorf("%s: an apply is left pending", name)
	}
}

func wantOutcomes(t *testing.T, res *MultiResult, want ...Outcome) {
	t.Helper()
	for i, m := range res.Members {
		if m.Outcome != want[i] {
			t.Errorf("member %d: outcome %s, want %s (%s)", i, m.Outcome, want[i], m.Report())
		}
	}
}

// Every member's table is changed on its own, and each commits its own
// generation.
func TestMultiCommit(t *testing.T) {
	f := newMultiFleet(t, 3)
	var steps []Step
	res := runMulti(t, f.paths, MultiOptions{Between: func(s Step) { steps = append(steps, s) }}, appendRule(t, addedRule))
	if res.Outcome != OutcomeCommitted || !res.Verdict || res.Forced || res.Stopped != 0 || len(res.Failed()) != 0 {
		t.Fatalf("outcome %s verdict %v forced %v stopped %s failed %d", res.Outcome, res.Verdict, res.Forced, res.Stopped, len(res.Failed()))
	}
	if want := []Step{StepHello, StepList, StepLoad, StepApply, StepCheck, StepCommit}; !slices.Equal(steps, want) {
		t.Errorf("steps %v, want %v", steps, want)
	}
	for i, m := range res.Members {
		wantLines(t, f.engs[i], fleetRule(i), addedRule)
		wantCounts(t, m.Path, f.engs[i], 1, 1, 0)
		if m.Gen != uint64(10*i+2) || m.Base.Generation != uint64(10*i+1) || m.Reached != StepCommit {
			t.Errorf("member %d: gen %d base %d reached %s", i, m.Gen, m.Base.Generation, m.Reached)
		}
		if len(m.Timings) != 6 || m.Timings[5].Step != StepCommit {
			t.Errorf("member %d: timings %v", i, m.Timings)
		}
		if !strings.Contains(m.Report(), "committed generation "+strconv.Itoa(10*i+2)) {
			t.Errorf("report %q", m.Report())
		}
	}
	for _, s := range f.srvs {
		waitIdle(t, s)
	}
}

// One bad verdict rolls back every member; Force commits anyway.
func TestMultiVerdict(t *testing.T) {
	t.Run("bad verdict: rolled back on all", func(t *testing.T) {
		f := newMultiFleet(t, 2)
		f.engs[1].FailPort(9090, syscall.EADDRINUSE)
		res := runMulti(t, f.paths, MultiOptions{}, appendRule(t, addedRule))
		if res.Outcome != OutcomeRolledBack || res.Verdict || res.Stopped != StepApply || len(res.Failed()) != 0 {
			t.Fatalf("outcome %s verdict %v stopped %s failed %d", res.Outcome, res.Verdict, res.Stopped, len(res.Failed()))
		}
		wantOutcomes(t, res, OutcomeRolledBack, OutcomeRolledBack)
		for i, m := range res.Members {
			wantLines(t, f.engs[i], fleetRule(i))
			wantCounts(t, m.Path, f.engs[i], 1, 0, 1)
			if m.Restored == nil || m.Restored.Generation != uint64(10*i+1) {
				t.Errorf("member %d: restored %+v", i, m.Restored)
			}
		}
		if !res.Members[0].Summary.OK || res.Members[1].Summary.OK {
			t.Error("the verdicts are not each member's own")
		}
		if got := res.Members[1].Summary.Failures(); len(got) != 1 || !strings.Contains(got[0], "port 9090: address already in use") {
			t.Errorf("failures %q", got)
		}
	})
	t.Run("forced", func(t *testing.T) {
		f := newMultiFleet(t, 2)
		f.engs[0].FailPort(9090, syscall.EADDRINUSE)
		res := runMulti(t, f.paths, MultiOptions{Force: true}, appendRule(t, addedRule))
		if res.Outcome != OutcomeCommitted || res.Verdict || !res.Forced {
			t.Fatalf("outcome %s verdict %v forced %v", res.Outcome, res.Verdict, res.Forced)
		}
		for i := range res.Members {
			wantLines(t, f.engs[i], fleetRule(i), addedRule)
		}
	})
}

// A failure before apply closes every connection: nothing changed anywhere,
// and every writer slot is free again.
func TestMultiBeforeApply(t *testing.T) {
	cases := []struct {
		name  string
		setup func(t *testing.T, f *multiFleet) // makes member 1 fail
		step  Step
		code  Code
		msg   string
	}{
		{"unknown pif on one", func(t *testing.T, f *multiFleet) {
			// Member 1 has no pif ns1.
			eng := ctltest.New(11, nil, mustRules(t, fleetRule(1))...)
			s, path := startServer(t, eng, nil)
			f.engs[1], f.srvs[1], f.paths[1] = eng, s, path
		}, StepLoad, CodeUnknownPif, "ns1"},
		{"busy", func(t *testing.T, f *multiFleet) {
			dialWrite(t, f.paths[1], Options{})
		}, StepHello, CodeBusy, "busy"},
		{"no daemon", func(t *testing.T, f *multiFleet) {
			f.paths[1] = filepath.Join(shortDir(t), "none.sock")
		}, StepHello, 0, "no such file"},
		{"stale generation", func(t *testing.T, f *multiFleet) {
			// Nothing to set up: the builder lies about the base (below).
		}, StepLoad, CodeStaleGeneration, "generation"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newMultiFleet(t, 2)
			c.setup(t, f)
			add := appendRule(t, "tcp ns1/10.0.0.1:80 -> 127.0.0.1:80")
			build := add
			if c.code == CodeStaleGeneration {
				build = func(m *Member) ([]*rules.Rule, error) {
					if m.Index == 1 {
						m.Base.Generation-- // as a table read on an earlier connection
					}
					return add(m)
				}
			}
			res := runMulti(t, f.paths, MultiOptions{}, build)
			if res.Outcome != OutcomeUnchanged || res.Stopped != c.step {
				t.Fatalf("outcome %s stopped %s", res.Outcome, res.Stopped)
			}
			wantOutcomes(t, res, OutcomeUnchanged, OutcomeUnchanged)
			m := res.Members[1]
			if m.Failed != c.step || CodeOf(m.Err) != c.code || !strings.Contains(m.Err.Error(), c.msg) {
				t.Fatalf("member 1: failed at %s: %v; want %s, code %s, %q", m.Failed, m.Err, c.step, c.code, c.msg)
			}
			if res.Members[0].Err != nil {
				t.Fatalf("member 0 failed: %v", res.Members[0].Err)
			}
			if !strings.Contains(m.Report(), "FAILED at "+c.step.String()) || !strings.Contains(m.Report(), "nothing changed") {
				t.Errorf("report %q", m.Report())
			}
			wantCounts(t, "member 0", f.engs[0], 0, 0, 0)
			waitIdle(t, f.srvs[0])
			dialWrite(t, f.paths[0], Options{}) // the writer slot is free
		})
	}
}

// A dry run validates everywhere and changes nothing.
func TestMultiDryRun(t *testing.T) {
	f := newMultiFleet(t, 2)
	res := runMulti(t, f.paths, MultiOptions{DryRun: true}, appendRule(t, addedRule))
	if res.Outcome != OutcomeUnchanged || res.Stopped != 0 || len(res.Failed()) != 0 {
		t.Fatalf("outcome %s stopped %s", res.Outcome, res.Stopped)
	}
	for i, m := range res.Members {
		if m.Loaded == nil || m.Loaded.Rules != 2 || m.Loaded.Added != 1 || m.Loaded.Kept != 1 || m.Reached != StepLoad {
			t.Errorf("member %d: loaded %+v reached %s", i, m.Loaded, m.Reached)
		}
		wantCounts(t, m.Path, f.engs[i], 0, 0, 0)
	}
}

// silentSocket listens at path and holds every connection without a byte:
// a daemon that stopped answering.
func silentSocket(t *testing.T, path string) {
	t.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
}

// A member that never answers its hello is given up within the timeout.
func TestMultiSilentAtHello(t *testing.T) {
	f := newMultiFleet(t, 1)
	silent := filepath.Join(shortDir(t), "silent.sock")
	silentSocket(t, silent)
	start := time.Now()
	res := runMulti(t, []string{f.paths[0], silent}, MultiOptions{Options: Options{Timeout: 300 * time.Millisecond}}, appendRule(t, addedRule))
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("took %s with a 300ms timeout", d)
	}
	m := res.Members[1]
	if res.Outcome != OutcomeUnchanged || m.Failed != StepHello || !errors.Is(m.Err, context.DeadlineExceeded) {
		t.Fatalf("outcome %s, member 1 failed at %s: %v", res.Outcome, m.Failed, m.Err)
	}
	wantCounts(t, "member 0", f.engs[0], 0, 0, 0)
}

// After every apply and before any commit, a member goes away or stops
// answering: the check finds it, every other member rolls back, and the
// lost one rolls back by itself (its connection is dropped).
func TestMultiLostBeforeCommit(t *testing.T) {
	t.Run("gone", func(t *testing.T) {
		f := newMultiFleet(t, 2)
		res := runMulti(t, f.paths, MultiOptions{Between: func(s Step) {
			if s == StepCheck {
				f.srvs[1].Close() // rolls back its transaction, says shutting-down
			}
		}}, appendRule(t, addedRule))
		if res.Outcome != OutcomeRolledBack || res.Stopped != StepCheck {
			t.Fatalf("outcome %s stopped %s", res.Outcome, res.Stopped)
		}
		m := res.Members[1]
		if m.Failed != StepCheck || CodeOf(m.Err) != CodeShuttingDown {
			t.Fatalf("member 1 failed at %s: %v", m.Failed, m.Err)
		}
		wantOutcomes(t, res, OutcomeRolledBack, OutcomeRolledBack)
		if !strings.Contains(m.Report(), "FAILED at check (after apply, before any commit)") {
			t.Errorf("report %q", m.Report())
		}
		for i := range res.Members {
			wantLines(t, f.engs[i], fleetRule(i))
			wantCounts(t, "member "+strconv.Itoa(i), f.engs[i], 1, 0, 1)
		}
	})
	t.Run("hung", func(t *testing.T) {
		f := newMultiFleet(t, 2)
		const timeout = 400 * time.Millisecond
		start := time.Now()
		res := runMulti(t, f.paths, MultiOptions{Options: Options{Timeout: timeout}, Between: func(s Step) {
			if s == StepCheck { // the daemon at path 1 stops answering
				if err := os.Remove(f.paths[1]); err != nil {
					t.Error(err)
				}
				silentSocket(t, f.paths[1])
			}
		}}, appendRule(t, addedRule))
		if d := time.Since(start); d > timeout+3*time.Second {
			t.Fatalf("took %s with a %s timeout", d, timeout)
		}
		m := res.Members[1]
		if res.Outcome != OutcomeRolledBack || m.Failed != StepCheck || !strings.Contains(m.Err.Error(), "did not answer a status request") {
			t.Fatalf("outcome %s, member 1 failed at %s: %v", res.Outcome, m.Failed, m.Err)
		}
		wantOutcomes(t, res, OutcomeRolledBack, OutcomeReleased)
		if !strings.Contains(m.Report(), "rolls back by itself") {
			t.Errorf("report %q", m.Report())
		}
		// The dropped connection rolled the lost member back.
		waitIdle(t, f.srvs[1])
		for i := range res.Members {
			wantLines(t, f.engs[i], fleetRule(i))
			wantCounts(t, "member "+strconv.Itoa(i), f.engs[i], 1, 0, 1)
		}
	})
}

// The window two-phase commit cannot close: a member fails at its own
// commit. Members commit one after another in order, so those before it
// stay committed (partial) and those after it roll back.
func TestMultiCommitFails(t *testing.T) {
	t.Run("the last one", func(t *testing.T) {
		f := newMultiFleet(t, 3)
		res := runMulti(t, f.paths, MultiOptions{Between: func(s Step) {
			if s == StepCommit {
				f.srvs[2].Close()
			}
		}}, appendRule(t, addedRule))
		if res.Outcome != OutcomePartial || res.Stopped != StepCommit {
			t.Fatalf("outcome %s stopped %s", res.Outcome, res.Stopped)
		}
		wantOutcomes(t, res, OutcomeCommitted, OutcomeCommitted, OutcomeRolledBack)
		if m := res.Members[2]; m.Failed != StepCommit || CodeOf(m.Err) != CodeShuttingDown {
			t.Fatalf("member 2 failed at %s: %v", m.Failed, m.Err)
		}
		wantLines(t, f.engs[0], fleetRule(0), addedRule)
		wantLines(t, f.engs[1], fleetRule(1), addedRule)
		wantLines(t, f.engs[2], fleetRule(2))
	})
	t.Run("the first one", func(t *testing.T) {
		f := newMultiFleet(t, 2)
		res := runMulti(t, f.paths, MultiOptions{Between: func(s Step) {
			if s == StepCommit {
				f.srvs[0].Close()
			}
		}}, appendRule(t, addedRule))
		if res.Outcome != OutcomeRolledBack || res.Stopped != StepCommit {
			t.Fatalf("outcome %s stopped %s", res.Outcome, res.Stopped)
		}
		wantOutcomes(t, res, OutcomeRolledBack, OutcomeRolledBack)
		if res.Members[1].Restored == nil || res.Members[1].Err != nil {
			t.Fatalf("member 1: %s", res.Members[1].Report())
		}
		for i := range res.Members {
			wantLines(t, f.engs[i], fleetRule(i))
			wantCounts(t, "member "+strconv.Itoa(i), f.engs[i], 1, 0, 1)
		}
	})
}

func TestMultiArguments(t *testing.T) {
	build := func(*Member) ([]*rules.Rule, error) { return nil, nil }
	for _, c := range []struct {
		paths []string
		opt   MultiOptions
		build func(*Member) ([]*rules.Rule, error)
		want  string
	}{
		{nil, MultiOptions{}, build, "at least one"},
		{[]string{"/a", "/b", "/a"}, MultiOptions{}, build, "/a given twice"},
		{[]string{"/a"}, MultiOptions{}, nil, "builder"},
		{[]string{"/a"}, MultiOptions{Confirm: time.Hour}, build, "confirm timeout"},
	} {
		if _, err := Multi(context.Background(), c.paths, c.opt, c.build); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Multi(%q): %v, want %q", c.paths, err, c.want)
		}
	}
}

// Decide is the one commit-or-rollback rule of every writer.
func TestDecide(t *testing.T) {
	for _, tc := range []struct {
		verdict, force bool
		want           Decision
		commits        bool
	}{
		{true, false, DecideCommit, true},
		{true, true, DecideCommit, true}, // --force changes nothing when the verdict is good
		{false, true, DecideForce, true},
		{false, false, DecideRollback, false},
	} {
		d := Decide(tc.verdict, tc.force)
		if d != tc.want || d.Commits() != tc.commits {
			t.Errorf("Decide(verdict %v, force %v) = %s (commits %v), want %s (commits %v)", tc.verdict, tc.force, d, d.Commits(), tc.want, tc.commits)
		}
	}
	if Decision(0).Commits() {
		t.Error("the zero Decision commits")
	}
}

// Every Decision has its own name; one without falls back to "decision-N".
func TestDecisionNames(t *testing.T) {
	seen := map[string]bool{}
	for d := DecideCommit; d < decisionEnd; d++ {
		name := d.String()
		if strings.HasPrefix(name, "decision-") || seen[name] {
			t.Errorf("decision %d: name %q missing or repeated", d, name)
		}
		seen[name] = true
	}
	if got := decisionEnd.String(); got != "decision-"+strconv.Itoa(int(decisionEnd)) {
		t.Errorf("a decision past the names: %q", got)
	}
}

func TestStepAndOutcomeNames(t *testing.T) {
	steps := map[string]bool{}
	for s := StepHello; s < stepCount; s++ {
		if n := s.String(); strings.HasPrefix(n, "step-") || steps[n] {
			t.Errorf("step %d has no name of its own: %q", s, n)
		}
		steps[s.String()] = true
	}
	outcomes := map[string]bool{}
	for o := OutcomePending; o < outcomeCount; o++ {
		if n := o.String(); strings.HasPrefix(n, "outcome-") || outcomes[n] {
			t.Errorf("outcome %d has no name of its own: %q", o, n)
		}
		outcomes[o.String()] = true
	}
}
