package main

import (
	"encoding/json"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/sluice-proxy/sluice/ctl"
	"github.com/sluice-proxy/sluice/ctl/ctltest"
)

const ruleC = "tcp 0.0.0.0:7070 -> 127.0.0.1:70"

// twoInstances serves two in-memory engines with pif ns1: a holding ruleA,
// b holding ruleB, both at generation 1.
func twoInstances(t *testing.T) (a, b *ctltest.Engine, sa, sb *ctl.Server) {
	t.Helper()
	a, sa = ctlInstance(t, []string{"ns1"}, ruleA)
	b, sb = ctlInstance(t, []string{"ns1"}, ruleB)
	return a, b, sa, sb
}

type ctlRun struct {
	code        int
	out, errout string
}

func (r ctlRun) want(t *testing.T, code int, stdout, stderr []string) {
	t.Helper()
	if r.code != code {
		t.Fatalf("exit %d, want %d\nstdout:\n%s\nstderr:\n%s", r.code, code, r.out, r.errout)
	}
	for _, w := range stdout {
		if !strings.Contains(r.out, w) {
			t.Errorf("stdout lacks %q:\n%s", w, r.out)
		}
	}
	for _, w := range stderr {
		if !strings.Contains(r.errout, w) {
			t.Errorf("stderr lacks %q:\n%s", w, r.errout)
		}
	}
}

func multiCtl(t *testing.T, between func(ctl.Step), args ...string) ctlRun {
	t.Helper()
	code, out, errs := sluiceCtlWith(t, between, args...)
	return ctlRun{code, out, errs}
}

func TestCtlMultiApply(t *testing.T) {
	file := ruleA + "\n" + ruleB + "\n"
	t.Run("good on both", func(t *testing.T) {
		a, b, sa, sb := twoInstances(t)
		r := multiCtl(t, nil, "-s", sa.Path(), "-s", sb.Path(), "apply", writeFile(t, "rules.txt", file))
		r.want(t, 0, []string{
			"== " + sa.Path() + " (generation 1)", "== " + sb.Path() + " (generation 1)", "RULE",
			"verdict good on all 2 instances: committed on all 2",
			sa.Path() + ": committed generation 2", sb.Path() + ": committed generation 2",
		}, nil)
		wantTable(t, a, ruleA, ruleB)
		wantTable(t, b, ruleA, ruleB)
	})
	t.Run("port in use on one: both roll back", func(t *testing.T) {
		a, b, sa, sb := twoInstances(t)
		a.FailPort(9090, syscall.EADDRINUSE)
		r := multiCtl(t, nil, "-s", sa.Path(), "-s", sb.Path(), "apply", writeFile(t, "rules.txt", file))
		r.want(t, 3, []string{
			"tcp 0.0.0.0:9090: port 9090: address already in use",
			"verdict bad on 1 of 2 instances (" + sa.Path() + "): rolled back on all 2",
			sa.Path() + ": rolled back; generation 1 is still active", sb.Path() + ": rolled back; generation 1 is still active",
		}, []string{"apply: 1 listen port failed to bind on " + sa.Path() + ": rolled back on all 2 instances"})
		wantTable(t, a, ruleA)
		wantTable(t, b, ruleB)
		for _, e := range []*ctltest.Engine{a, b} {
			if ap, c, rb := e.Counts(); ap != 1 || c != 0 || rb != 1 || e.Pending() {
				t.Errorf("applies %d commits %d rollbacks %d pending %v", ap, c, rb, e.Pending())
			}
		}
	})
	t.Run("forced", func(t *testing.T) {
		a, b, sa, sb := twoInstances(t)
		b.FailPort(9090, syscall.EADDRINUSE) // b's ruleB is kept: its socket moves
		a.FailPort(9090, syscall.EADDRINUSE)
		r := multiCtl(t, nil, "-s", sa.Path(), "-s", sb.Path(), "apply", "--force", writeFile(t, "rules.txt", file))
		r.want(t, 0, []string{"verdict bad on 1 of 2 instances, committed anyway (--force) on all 2"}, nil)
		wantTable(t, a, ruleA, ruleB)
		wantTable(t, b, ruleA, ruleB)
	})
	t.Run("dry run", func(t *testing.T) {
		a, b, sa, sb := twoInstances(t)
		r := multiCtl(t, nil, "-s", sa.Path(), "-s", sb.Path(), "apply", "--dry-run", writeFile(t, "rules.txt", file))
		r.want(t, 0, []string{
			"== " + sa.Path() + ": valid: 2 rules, 2 listen ports; applying would keep 1, add 1 and remove 0 listen ports",
			"valid on all 2 instances; nothing changed (--dry-run)",
		}, nil)
		// Each instance's diff, after its line: a lacks ruleB, b lacks ruleA.
		for _, w := range []struct{ path, line string }{{sa.Path(), "+ " + ruleB}, {sb.Path(), "+ " + ruleA}} {
			_, after, _ := strings.Cut(r.out, "== "+w.path+": valid")
			if next, _, _ := strings.Cut(after, "\n== "); !strings.Contains(next+"\n", "\n"+w.line+"\n") {
				t.Errorf("the dry run's diff of %s lacks %q:\n%s", w.path, w.line, r.out)
			}
		}
		wantTable(t, a, ruleA)
		wantTable(t, b, ruleB)
	})
	t.Run("a pif one instance lacks: exit 2 naming it, nothing changed", func(t *testing.T) {
		a, sa := ctlInstance(t, []string{"ns1"}, ruleA)
		b, sb := ctlInstance(t, nil, ruleB)
		f := writeFile(t, "rules.txt", ruleA+"\n\ntcp ns1/10.0.0.1:80 -> 127.0.0.1:80\n")
		r := multiCtl(t, nil, "-s", sa.Path(), "-s", sb.Path(), "apply", f)
		r.want(t, 2, []string{sb.Path() + ": FAILED at load", sa.Path() + ": nothing changed"},
			[]string{f + `:3: pif "ns1"`, "(instance " + sb.Path() + ")"})
		if strings.Contains(r.errout, "(instance "+sa.Path()+")") {
			t.Errorf("the instance that validated is blamed:\n%s", r.errout)
		}
		wantTable(t, a, ruleA)
		wantTable(t, b, ruleB)
		if ap, _, _ := a.Counts(); ap != 0 {
			t.Errorf("%d applies on the instance that validated", ap)
		}
	})
	t.Run("busy", func(t *testing.T) {
		a, _, sa, sb := twoInstances(t)
		holdWriter(t, sb.Path())
		r := multiCtl(t, nil, "-s", sa.Path(), "-s", sb.Path(), "apply", writeFile(t, "rules.txt", file))
		r.want(t, 4, []string{sb.Path() + ": FAILED at hello"}, []string{"busy", "nothing changed on any instance"})
		wantTable(t, a, ruleA)
	})
	t.Run("no daemon", func(t *testing.T) {
		a, sa := ctlServer(t, ruleA)
		none := filepath.Join(t.TempDir(), "none.sock")
		r := multiCtl(t, nil, "-s", sa, "-s", none, "apply", writeFile(t, "rules.txt", file))
		r.want(t, 1, nil, []string{none + " failed at hello", "nothing changed on any instance"})
		wantTable(t, a, ruleA)
	})
}

// Each instance's table is read and changed on its own.
func TestCtlMultiAddDel(t *testing.T) {
	a, b, sa, sb := twoInstances(t)
	s := []string{"-s", sa.Path(), "-s", sb.Path()}
	multiCtl(t, nil, append(s, "add", ruleC)...).want(t, 0, []string{"committed on all 2"}, nil)
	wantTable(t, a, ruleA, ruleC)
	wantTable(t, b, ruleB, ruleC)
	// A rule whose listen key only b's table already has: b refuses it.
	r := multiCtl(t, nil, append(s, "add", "tcp 0.0.0.0:9090 -> 127.0.0.1:91")...)
	r.want(t, 2, nil, []string{sb.Path() + ": add ", "9090"})
	if strings.Contains(r.errout, sa.Path()+": add") {
		t.Errorf("the instance that validated is blamed:\n%s", r.errout)
	}
	wantTable(t, a, ruleA, ruleC)
	wantTable(t, b, ruleB, ruleC)
	// del of a rule only a has: exit 2 naming b, nothing changed.
	multiCtl(t, nil, append(s, "del", ruleA)...).want(t, 2, nil, []string{sb.Path() + ": del: no rule"})
	wantTable(t, a, ruleA, ruleC)
	multiCtl(t, nil, append(s, "del", ruleC)...).want(t, 0, []string{"committed generation 3"}, nil)
	wantTable(t, a, ruleA)
	wantTable(t, b, ruleB)
}

// An instance lost after every apply, or at its commit: the CLI names it,
// the step, and what every instance was left with.
func TestCtlMultiLost(t *testing.T) {
	t.Run("before any commit", func(t *testing.T) {
		a, b, sa, sb := twoInstances(t)
		r := multiCtl(t, func(s ctl.Step) {
			if s == ctl.StepCheck {
				sb.Close()
			}
		}, "-s", sa.Path(), "-s", sb.Path(), "add", ruleC)
		r.want(t, 1, []string{
			sb.Path() + ": FAILED at check (after apply, before any commit)",
			sa.Path() + ": rolled back; generation 1 is still active",
		}, []string{sb.Path() + " failed at check", "no instance committed"})
		wantTable(t, a, ruleA)
		wantTable(t, b, ruleB)
	})
	t.Run("at its commit", func(t *testing.T) {
		a, b, sa, sb := twoInstances(t)
		r := multiCtl(t, func(s ctl.Step) {
			if s == ctl.StepCommit {
				sb.Close()
			}
		}, "-s", sa.Path(), "-s", sb.Path(), "add", ruleC)
		r.want(t, 1, []string{"PARTIAL: " + sb.Path() + " failed at commit; committed on 1 of 2 instances",
			sa.Path() + ": committed generation 2", sb.Path() + ": FAILED at commit"},
			[]string{"PARTIAL: committed on " + sa.Path() + ", not on " + sb.Path() + " (rolled-back)"})
		wantTable(t, a, ruleA, ruleC)
		wantTable(t, b, ruleB)
	})
}

func TestCtlMultiJSON(t *testing.T) {
	type member struct {
		Socket     string  `json:"socket"`
		Outcome    string  `json:"outcome"`
		Reached    *string `json:"reached"`
		FailedAt   *string `json:"failed_at"`
		Generation *uint64 `json:"generation"`
		Base       *uint64 `json:"base_generation"`
		Loaded     *struct {
			Rules int `json:"rules"`
			Added int `json:"added"`
		} `json:"loaded"`
		Summary *struct {
			Verdict bool `json:"verdict"`
			Rules   []struct {
				Listen string `json:"listen"`
				Failed int    `json:"failed"`
				Ports  []struct {
					Port  int    `json:"port"`
					Errno int    `json:"errno"`
					Error string `json:"error"`
				} `json:"ports"`
			} `json:"rules"`
		} `json:"summary"`
		Restored *struct {
			Generation uint64 `json:"generation"`
		} `json:"restored"`
		Timings []struct {
			Step string  `json:"step"`
			Ms   float64 `json:"ms"`
		} `json:"timings"`
	}
	type result struct {
		Verb      string   `json:"verb"`
		Outcome   string   `json:"outcome"`
		Verdict   bool     `json:"verdict"`
		StoppedAt *string  `json:"stopped_at"`
		Exit      int      `json:"exit"`
		Error     *string  `json:"error"`
		Members   []member `json:"members"`
	}
	parse := func(t *testing.T, r ctlRun) result {
		t.Helper()
		var res result
		if err := json.Unmarshal([]byte(r.out), &res); err != nil {
			t.Fatalf("stdout is not one JSON object: %v\n%s", err, r.out)
		}
		// The keys README.md documents, no more, no fewer.
		var top struct {
			Members []map[string]json.RawMessage `json:"members"`
		}
		var keys map[string]json.RawMessage
		if err := json.Unmarshal([]byte(r.out), &keys); err != nil {
			t.Fatal(err)
		}
		_ = json.Unmarshal([]byte(r.out), &top)
		wantKeys(t, keys, "verb", "outcome", "verdict", "forced", "dry_run", "stopped_at", "exit", "error", "members")
		for _, m := range top.Members {
			wantKeys(t, m, "socket", "outcome", "reached", "failed_at", "error", "code", "base_generation", "generation",
				"loaded", "summary", "restored", "timings")
		}
		if res.Exit != r.code {
			t.Errorf("JSON exit %d, process exit %d", res.Exit, r.code)
		}
		return res
	}
	t.Run("committed", func(t *testing.T) {
		_, _, sa, sb := twoInstances(t)
		r := multiCtl(t, nil, "-s", sa.Path(), "-s", sb.Path(), "--json", "add", ruleC)
		res := parse(t, r)
		if r.code != 0 || res.Verb != "add" || res.Outcome != "committed" || !res.Verdict || res.StoppedAt != nil || res.Error != nil || len(res.Members) != 2 {
			t.Fatalf("%+v\n%s", res, r.out)
		}
		for i, m := range res.Members {
			if m.Socket != []string{sa.Path(), sb.Path()}[i] || m.Outcome != "committed" || *m.Reached != "commit" || m.FailedAt != nil ||
				*m.Generation != 2 || *m.Base != 1 || m.Loaded.Rules != 2 || m.Loaded.Added != 1 || !m.Summary.Verdict {
				t.Errorf("member %d: %+v", i, m)
			}
			var steps []string
			for _, tm := range m.Timings {
				steps = append(steps, tm.Step)
			}
			if strings.Join(steps, ",") != "hello,list,load,apply,check,commit" {
				t.Errorf("member %d: timings of %v", i, steps)
			}
		}
	})
	t.Run("rolled back", func(t *testing.T) {
		_, b, sa, sb := twoInstances(t)
		b.FailPort(7070, syscall.EADDRINUSE)
		r := multiCtl(t, nil, "-s", sa.Path(), "-s", sb.Path(), "add", ruleC, "--json")
		res := parse(t, r)
		if r.code != 3 || res.Outcome != "rolled-back" || res.Verdict || res.StoppedAt == nil || *res.StoppedAt != "apply" || res.Error == nil {
			t.Fatalf("exit %d %+v\n%s", r.code, res, r.out)
		}
		m := res.Members[1]
		if m.Outcome != "rolled-back" || m.Restored == nil || m.Restored.Generation != 1 || *m.Generation != 1 {
			t.Fatalf("member 1: %+v", m)
		}
		p := m.Summary.Rules[1].Ports
		if m.Summary.Rules[1].Listen != "tcp 0.0.0.0:7070" || len(p) != 1 || p[0].Port != 7070 || p[0].Errno != 98 || p[0].Error != "address already in use" {
			t.Fatalf("member 1 summary: %+v", m.Summary)
		}
	})
	t.Run("one instance", func(t *testing.T) {
		a, sa := ctlServer(t, ruleA)
		r := multiCtl(t, nil, "-s", sa, "--json", "add", ruleC)
		if res := parse(t, r); r.code != 0 || len(res.Members) != 1 || res.Members[0].Outcome != "committed" {
			t.Fatalf("exit %d\n%s", r.code, r.out)
		}
		wantTable(t, a, ruleA, ruleC)
	})
	t.Run("failed member", func(t *testing.T) {
		_, sa := ctlServer(t, ruleA)
		none := filepath.Join(t.TempDir(), "none.sock")
		r := multiCtl(t, nil, "-s", sa, "-s", none, "--json", "add", ruleC)
		res := parse(t, r)
		if r.code != 1 || res.Outcome != "unchanged" || *res.StoppedAt != "hello" || res.Members[1].FailedAt == nil || *res.Members[1].FailedAt != "hello" {
			t.Fatalf("exit %d %+v\n%s", r.code, res, r.out)
		}
	})
}

func wantKeys(t *testing.T, obj map[string]json.RawMessage, keys ...string) {
	t.Helper()
	var got []string
	for k := range obj {
		got = append(got, k)
	}
	slices.Sort(got)
	keys = slices.Clone(keys)
	slices.Sort(keys)
	if !slices.Equal(got, keys) {
		t.Errorf("JSON keys %q, want %q", got, keys)
	}
}

func TestCtlMultiUsage(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"-s", "/a", "-s", "/a", "add", ruleC}, "-s /a given twice"},
		{[]string{"-s", "/a", "-s", "/b", "list"}, "list reads one instance"},
		{[]string{"-s", "/a", "diff", "x", "--json"}, "--json"}, // status, pifs and list take --json (TestCtlReadVerbs)
	} {
		code, _, errs := sluiceCtl(t, c.args...)
		if code != 2 || !strings.Contains(errs, c.want) {
			t.Errorf("ctl %q: exit %d, want 2 with %q\n%s", c.args, code, c.want, errs)
		}
	}
}

// holdWriter opens a writing transaction on path and keeps it open until
// the test ends.
func holdWriter(t *testing.T, path string) {
	t.Helper()
	ctx := t.Context()
	c, err := ctl.Dial(ctx, path, ctl.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.Hello(ctx, ctl.IntentWrite); err != nil {
		t.Fatal(err)
	}
}
