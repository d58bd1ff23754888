package main

// The verbs of the daemon's durable state: history, reload, and the end of
// a commit-confirmed transaction (confirm, rollback).

import (
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/sluice-proxy/sluice/ctl"
	"github.com/sluice-proxy/sluice/state"
)

// stateVerb runs history, reload, confirm or rollback on the socket of x.
func (x *ctlCmd) stateVerb(verb string, rest []string) error {
	switch {
	case len(rest) > 0:
		return usagef("%s: unexpected argument %q", verb, rest[0])
	case x.dryRun || x.force || x.rule != "" || x.count != 0 || x.confirm != 0:
		return usagef("%s: --dry-run, --force, --rule, --count and --confirm are not for %s", verb, verb)
	case verb != "history" && (x.n != 0 || x.json):
		return usagef("%s: -n and --json are for history", verb)
	case x.n < 0 || x.n > ctl.MaxHistory:
		return usagef("-n %d: want 1 to %d (0: every commit kept)", x.n, ctl.MaxHistory)
	}
	switch verb {
	case "history":
		return x.history()
	case "reload":
		return x.reload()
	case "upgrade":
		return x.upgrade()
	}
	return x.endPending(verb == "confirm")
}

// historyEntry is one commit as HISTORY carries it: history.jsonl's line,
// or that line without its rule lines when it was too long for a frame.
type historyEntry struct {
	state.Entry
	Omitted map[string]int `json:"omitted,omitempty"`
}

// history prints the last commits, oldest first: a line per commit
// (generation, time, who), then its changes as diff prints them; --json:
// each commit as the JSON object the state dir keeps.
func (x *ctlCmd) history() error {
	c, err := x.openFeature(ctl.IntentHistory, ctl.FeatureHistory)
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := x.ctx()
	defer cancel()
	lines, err := c.History(ctx, x.n)
	if err != nil {
		return fmt.Errorf("%s: %w", x.sock, err)
	}
	for _, l := range lines {
		if x.json {
			fmt.Fprintln(x.out, l)
			continue
		}
		var e historyEntry
		if err := json.Unmarshal([]byte(l), &e); err != nil {
			return fmt.Errorf("%s: a history entry that is not JSON: %w", x.sock, err)
		}
		fmt.Fprintf(x.out, "generation %d  %s  by %s\n", e.Generation, e.Time.UTC().Format(time.RFC3339), e.Who)
		if len(e.Omitted) > 0 {
			fmt.Fprintf(x.out, "  (lines omitted: %d added, %d removed, %d changed)\n", e.Omitted["added"], e.Omitted["removed"], e.Omitted["changed"])
			continue
		}
		if e.Changes.Empty() {
			fmt.Fprintln(x.out, "  (no change)")
		}
		for _, d := range strings.SplitAfter(strings.TrimSuffix(e.Changes.Format(), "\n"), "\n") {
			if d != "" {
				fmt.Fprint(x.out, "  "+strings.TrimSuffix(d, "\n")+"\n")
			}
		}
	}
	return nil
}

// reload asks the daemon to re-read its configuration file and apply its
// rules in one transaction; it exits as apply does: 0 committed (or
// nothing to change), 2 the file is invalid, 3 rolled back, 4 busy. Keys
// that changed in the file but need a restart are printed either way.
func (x *ctlCmd) reload() error {
	c, err := x.openFeatureHello(ctl.IntentReload, ctl.FeatureReload)
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := x.ctx()
	defer cancel()
	r, err := c.Reload(ctx)
	if err != nil {
		return fmt.Errorf("%s: %w", x.sock, err)
	}
	if r.Summary != nil {
		x.printSummary(r.Summary)
	}
	for _, k := range r.Restart {
		fmt.Fprintln(x.out, k)
	}
	switch r.Outcome {
	case ctl.ReloadUnchanged:
		fmt.Fprintf(x.out, "reloaded: the file's rules are the active table (generation %d); nothing applied\n", r.Generation)
	case ctl.ReloadCommitted:
		fmt.Fprintf(x.out, "reloaded: verdict good: committed generation %d (listen ports: %d kept, %d added, %d removed)\n",
			r.Generation, r.Summary.Kept, r.Summary.Added, r.Summary.Removed)
	default:
		fmt.Fprintf(x.out, "reload: verdict bad: rolled back; generation %d is still active\n", r.Generation)
		return &exitError{exitRollback, fmt.Errorf("reload: %s failed to bind: rolled back", count(len(r.Summary.Failures()), "listen port"))}
	}
	return nil
}

// endPending commits (confirm) or rolls back the pending commit-confirmed
// transaction.
func (x *ctlCmd) endPending(commit bool) error {
	intent := ctl.IntentRollback
	if commit {
		intent = ctl.IntentConfirm
	}
	c, err := x.openFeatureHello(intent, ctl.FeatureConfirmLater)
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := x.ctx()
	defer cancel()
	if commit {
		gen, err := c.Confirm(ctx)
		if err != nil {
			return fmt.Errorf("%s: %w", x.sock, err)
		}
		fmt.Fprintf(x.out, "confirmed: committed generation %d\n", gen)
		return nil
	}
	sum, err := c.RolledBack(ctx)
	if err != nil {
		return fmt.Errorf("%s: %w", x.sock, err)
	}
	fmt.Fprintf(x.out, "rolled back: generation %d is active\n", sum.Generation)
	return nil
}

// openFeatureHello dials, checks the feature (unless ""), and says the
// intent; the hello reads the intent's first answer (for reload, confirm
// and rollback, the whole of it).
func (x *ctlCmd) openFeatureHello(intent ctl.Intent, feature string) (*ctl.Client, error) {
	ctx, cancel := x.ctx()
	defer cancel()
	c, err := ctl.Dial(ctx, x.sock, ctl.Options{Name: "sluice ctl", Timeout: x.timeout})
	if err != nil {
		return nil, fmt.Errorf("cannot reach the daemon at %s: %w", x.sock, err)
	}
	if feature != "" && !c.Server().Has(feature) {
		c.Close()
		return nil, fmt.Errorf("the daemon at %s does not serve %s (feature %q missing)", x.sock, intent, feature)
	}
	if err := c.Hello(ctx, intent); err != nil {
		c.Close()
		return nil, fmt.Errorf("%s: %w", x.sock, err)
	}
	return c, nil
}
