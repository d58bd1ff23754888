package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/sluice-proxy/sluice/ctl"
	"github.com/sluice-proxy/sluice/rules"
	"github.com/sluice-proxy/sluice/state"
)

// `sluice ctl -s A -s B … apply|add|del`: one transaction across instances
// (ctl.Multi; docs/ctl-protocol.md, "One transaction across instances").
// Each instance's table is read and changed on its own; the output is one
// bind summary per instance, then the overall outcome, one line per
// instance; --json prints the same as one JSON object (README.md).

// distinct refuses a socket given twice: the second connection would find
// the first one's writer slot taken.
func distinct(socks []string) error {
	seen := make(map[string]bool, len(socks))
	for _, s := range socks {
		if seen[s] {
			return usagef("-s %s given twice", s)
		}
		seen[s] = true
	}
	return nil
}

// transactMulti is transact across x.socks.
func (x *ctlCmd) transactMulti(verb string, build func(*ctl.Table) ([]*rules.Rule, error), refused func(*ctl.Table, *ctl.Error) error) error {
	opt := ctl.MultiOptions{
		Options: ctl.Options{Name: "sluice ctl", Timeout: x.timeout},
		Force:   x.force,
		DryRun:  x.dryRun,
		Between: x.between,
	}
	// Each member's new table, for the dry run's diff (members are built
	// at once, each on its own goroutine).
	var mu sync.Mutex
	built := map[string][]string{}
	res, err := ctl.Multi(context.Background(), x.socks, opt, func(m *ctl.Member) ([]*rules.Rule, error) {
		rs, err := build(m.Base)
		if err == nil {
			mu.Lock()
			built[m.Path] = state.Lines(rs)
			mu.Unlock()
		}
		return rs, err
	})
	if err != nil {
		return usageError{err}
	}
	err = multiError(verb, res, refused)
	if x.json {
		if jerr := x.printMultiJSON(verb, res, err); jerr != nil {
			return jerr
		}
		return err
	}
	x.printMulti(res, built)
	return err
}

// printMulti prints each instance's bind summary (or, in a dry run, its
// validation and what would change, as diff prints it: built holds each
// instance's new table), then the overall outcome and one line per
// instance.
func (x *ctlCmd) printMulti(res *ctl.MultiResult, built map[string][]string) {
	for _, m := range res.Members {
		switch {
		case m.Summary != nil:
			fmt.Fprintf(x.out, "== %s (generation %d)\n", m.Path, m.Base.Generation)
			x.printSummary(m.Summary)
		case m.Loaded != nil && x.dryRun && m.Err == nil:
			ld := m.Loaded
			fmt.Fprintf(x.out, "== %s: %s\n", m.Path, dryRunLine(ld))
			fmt.Fprint(x.out, state.DiffLines(m.Base.Lines, built[m.Path]).Format())
		}
	}
	fmt.Fprintln(x.out, multiHeadline(res, x.dryRun))
	for _, m := range res.Members {
		fmt.Fprintln(x.out, "  "+m.Report())
	}
}

// multiHeadline is the overall outcome in one line.
func multiHeadline(res *ctl.MultiResult, dryRun bool) string {
	n := len(res.Members)
	var bad []string
	for _, m := range res.Members {
		if m.Summary != nil && !m.Summary.OK {
			bad = append(bad, m.Path)
		}
	}
	failed := res.Failed()
	var paths []string
	for _, m := range failed {
		paths = append(paths, fmt.Sprintf("%s failed at %s", m.Path, m.Failed))
	}
	switch {
	case res.Outcome == ctl.OutcomePartial:
		committed := 0
		for _, m := range res.Members {
			if m.Outcome == ctl.OutcomeCommitted {
				committed++
			}
		}
		return fmt.Sprintf("PARTIAL: %s; committed on %d of %s: they may now disagree", strings.Join(paths, "; "), committed, count(n, "instance"))
	case res.Outcome == ctl.OutcomeCommitted && res.Forced:
		return fmt.Sprintf("verdict bad on %d of %s, committed anyway (--force) on %s", len(bad), count(n, "instance"), allOf(n))
	case res.Outcome == ctl.OutcomeCommitted:
		return fmt.Sprintf("verdict good on %s %s: committed on %s", allOf(n), plural(n, "instance"), allOf(n))
	case len(failed) > 0 && res.Outcome == ctl.OutcomeUnchanged:
		return fmt.Sprintf("%s: nothing changed on any instance", strings.Join(paths, "; "))
	case len(failed) > 0:
		return fmt.Sprintf("%s: no instance committed; every one that applied rolled back", strings.Join(paths, "; "))
	case dryRun:
		return fmt.Sprintf("valid on %s %s; nothing changed (--dry-run)", allOf(n), plural(n, "instance"))
	}
	return fmt.Sprintf("verdict bad on %d of %s (%s): rolled back on %s", len(bad), count(n, "instance"), strings.Join(bad, ", "), allOf(n))
}

// multiError is what the transaction means for the exit code: nil (0) when
// committed everywhere or validated everywhere in a dry run; 1 when any
// instance failed for a runtime or protocol reason, or the outcome is
// partial; 4 when an instance was busy; 2 when an instance refused the
// table (its errors at the user's lines, naming the instance); 3 when every
// instance applied and a bad verdict rolled them all back.
func multiError(verb string, res *ctl.MultiResult, refused func(*ctl.Table, *ctl.Error) error) error {
	failed := res.Failed()
	if res.Outcome == ctl.OutcomePartial {
		var committed, not []string
		for _, m := range res.Members {
			if m.Outcome == ctl.OutcomeCommitted {
				committed = append(committed, m.Path)
			} else {
				not = append(not, fmt.Sprintf("%s (%s)", m.Path, m.Outcome))
			}
		}
		why := make([]string, len(failed))
		for i, m := range failed {
			why[i] = fmt.Sprintf("%s failed at %s: %v", m.Path, m.Failed, m.Err)
		}
		return &exitError{exitRuntime, fmt.Errorf("%s: %s; PARTIAL: committed on %s, not on %s",
			verb, strings.Join(why, "; "), strings.Join(committed, ", "), strings.Join(not, ", "))}
	}
	if len(failed) == 0 {
		if res.Outcome != ctl.OutcomeRolledBack {
			return nil
		}
		var where []string
		ports := 0
		for _, m := range res.Members {
			if m.Summary == nil {
				continue
			}
			n := 0
			for _, r := range m.Summary.Rules {
				n += r.Failed
			}
			if n > 0 {
				where = append(where, m.Path)
			}
			ports += n
		}
		return &exitError{exitRollback, fmt.Errorf("%s: %s failed to bind on %s: rolled back on %s %s",
			verb, count(ports, "listen port"), strings.Join(where, ", "), allOf(len(res.Members)), plural(len(res.Members), "instance"))}
	}
	var (
		list                  rules.ErrorList
		usage, busy, failures []string
	)
	for _, m := range failed {
		var e *ctl.Error
		var u usageError
		isErr := errors.As(m.Err, &e)
		switch {
		case isErr && e.Code == ctl.CodeBusy:
			busy = append(busy, fmt.Sprintf("%s: %v", m.Path, m.Err))
		case isErr && m.Failed == ctl.StepLoad && (e.Code == ctl.CodeInvalidRule || e.Code == ctl.CodeInvalidTable || e.Code == ctl.CodeUnknownPif):
			mapped := refused(m.Base, e)
			var l rules.ErrorList
			if errors.As(mapped, &l) {
				for _, le := range l {
					c := *le
					c.Msg += " (instance " + m.Path + ")"
					list = append(list, &c)
				}
			} else {
				usage = append(usage, fmt.Sprintf("%s: %v", m.Path, mapped))
			}
		case errors.As(m.Err, &u):
			usage = append(usage, fmt.Sprintf("%s: %v", m.Path, m.Err))
		default:
			failures = append(failures, fmt.Sprintf("%s failed at %s: %v", m.Path, m.Failed, m.Err))
		}
	}
	tail := "nothing changed on any instance"
	if res.Outcome != ctl.OutcomeUnchanged {
		tail = "no instance committed; every one that applied rolled back"
	}
	switch {
	case len(failures) > 0:
		return &exitError{exitRuntime, fmt.Errorf("%s: %s: %s", verb, strings.Join(failures, "; "), tail)}
	case len(busy) > 0:
		return &exitError{exitBusy, fmt.Errorf("%s: %s: %s", verb, strings.Join(busy, "; "), tail)}
	case len(usage) == 0:
		return list // FILE:LINE: message (instance PATH)
	}
	for _, e := range list {
		usage = append(usage, e.Error())
	}
	return usagef("%s: %s: %s", verb, strings.Join(usage, "; "), tail)
}

// The JSON shape of --json; README.md documents it.
type (
	multiJSON struct {
		Verb      string       `json:"verb"`
		Outcome   ctl.Outcome  `json:"outcome"`
		Verdict   bool         `json:"verdict"`
		Forced    bool         `json:"forced"`
		DryRun    bool         `json:"dry_run"`
		StoppedAt *ctl.Step    `json:"stopped_at"`
		Exit      int          `json:"exit"`
		Error     *string      `json:"error"`
		Members   []memberJSON `json:"members"`
	}
	memberJSON struct {
		Socket         string       `json:"socket"`
		Outcome        ctl.Outcome  `json:"outcome"`
		Reached        *ctl.Step    `json:"reached"`
		FailedAt       *ctl.Step    `json:"failed_at"`
		Error          *string      `json:"error"`
		Code           *string      `json:"code"`
		BaseGeneration *uint64      `json:"base_generation"`
		Generation     *uint64      `json:"generation"`
		Loaded         *loadedJSON  `json:"loaded"`
		Summary        *summaryJSON `json:"summary"`
		Restored       *summaryJSON `json:"restored"`
		Timings        []timingJSON `json:"timings"`
	}
	loadedJSON struct {
		Generation uint64 `json:"generation"`
		Rules      int    `json:"rules"`
		Ports      int    `json:"ports"`
		Kept       int    `json:"kept"`
		Added      int    `json:"added"`
		Removed    int    `json:"removed"`
	}
	summaryJSON struct {
		Generation uint64     `json:"generation"`
		Verdict    bool       `json:"verdict"`
		Kept       int        `json:"kept"`
		Added      int        `json:"added"`
		Removed    int        `json:"removed"`
		Rules      []ruleJSON `json:"rules"`
	}
	ruleJSON struct {
		Rule      string     `json:"rule"`
		Listen    string     `json:"listen"`
		Weak      bool       `json:"weak"`
		Requested int        `json:"requested"`
		Bound     int        `json:"bound"`
		Failed    int        `json:"failed"`
		Ports     []portJSON `json:"ports"`
	}
	portJSON struct {
		Port  uint16 `json:"port"`
		Errno uint32 `json:"errno"`
		Error string `json:"error"`
	}
	timingJSON struct {
		Step ctl.Step `json:"step"`
		Ms   float64  `json:"ms"`
	}
)

func (x *ctlCmd) printMultiJSON(verb string, res *ctl.MultiResult, err error) error {
	out := multiJSON{Verb: verb, Outcome: res.Outcome, Verdict: res.Verdict, Forced: res.Forced, DryRun: x.dryRun,
		Exit: ctlExitCode(err), Members: make([]memberJSON, len(res.Members))}
	if res.Stopped != 0 {
		out.StoppedAt = &res.Stopped
	}
	if err != nil {
		s := err.Error()
		out.Error = &s
	}
	for i, m := range res.Members {
		j := memberJSON{Socket: m.Path, Outcome: m.Outcome,
			Summary: summaryOf(m.Summary), Restored: summaryOf(m.Restored), Timings: []timingJSON{}}
		if m.Reached != 0 {
			j.Reached = &m.Reached
		}
		if m.Err != nil {
			j.FailedAt = &m.Failed
			s := m.Err.Error()
			j.Error = &s
			if c := ctl.CodeOf(m.Err); c != 0 {
				name := c.String()
				j.Code = &name
			}
		}
		if ld := m.Loaded; ld != nil {
			j.Loaded = &loadedJSON{Generation: ld.Generation, Rules: ld.Rules, Ports: ld.Ports, Kept: ld.Kept, Added: ld.Added, Removed: ld.Removed}
		}
		if m.Base != nil {
			j.BaseGeneration = &m.Base.Generation
		}
		switch m.Outcome {
		case ctl.OutcomeCommitted:
			j.Generation = &m.Gen
		case ctl.OutcomeUnchanged, ctl.OutcomeRolledBack:
			j.Generation = j.BaseGeneration
		}
		for _, t := range m.Timings {
			j.Timings = append(j.Timings, timingJSON{Step: t.Step, Ms: float64(t.Took.Microseconds()) / 1000})
		}
		out.Members[i] = j
	}
	enc := json.NewEncoder(x.out)
	enc.SetIndent("", "  ")
	enc.SetEscapeHTML(false)
	return enc.Encode(out)
}

func summaryOf(s *ctl.Summary) *summaryJSON {
	if s == nil {
		return nil
	}
	j := &summaryJSON{Generation: s.Generation, Verdict: s.OK, Kept: s.Kept, Added: s.Added, Removed: s.Removed,
		Rules: make([]ruleJSON, len(s.Rules))}
	for i, r := range s.Rules {
		rj := ruleJSON{Rule: r.Rule, Listen: r.Listen, Weak: r.Weak, Requested: r.Requested, Bound: r.Bound,
			Failed: r.Failed, Ports: make([]portJSON, len(r.Ports))}
		for k, p := range r.Ports {
			rj.Ports[k] = portJSON{Port: p.Port, Errno: uint32(p.Errno), Error: p.Msg}
		}
		j.Rules[i] = rj
	}
	return j
}
