package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/ctl"
	"github.com/sluice-proxy/sluice/engine"
	"github.com/sluice-proxy/sluice/rules"
	"github.com/sluice-proxy/sluice/state"
)

const ctlSynopsis = `sluice ctl [-s SOCKET]... [-c CONFIG] VERB
  status [--json]         version, pid, uptime, state (serving, draining), features,
                          generation, rule and session counts
  pifs                    the daemon's pifs
  list [--pending]        the committed table as canonical rule lines (--pending: the applied one awaiting its commit)
  apply FILE [--dry-run] [--force] [--timeout DUR] [--json] [--confirm DUR]
                          replace the table in one transaction; --confirm leaves it
                          pending: rolled back after DUR unless confirmed
  add RULE | del RULE     add or remove one rule (one quoted argument; del also takes
                          the rule's name, its listen key: 'tcp 0.0.0.0:8080')
  diff FILE               what apply FILE would change: "- line", "~ old" / "  new",
                          "+ line"; exit 0 none, 1 some, 2 invalid file (or no daemon)
  watch [GROUP...] [--count N]
                          events as JSON lines: the current state first, then
                          each change (groups: rules, binds, health, sessions)
  sessions [--rule KEY] [--json]
                          live sessions, oldest first (at most 10000)
  stats [--json]          the engine's counters
  history [-n N] [--json] the last commits kept in the daemon's state dir
  reload                  re-read the configuration file and apply its rules (as SIGHUP);
                          exit as apply: 0, 2 invalid file, 3 rolled back, 4 busy
  confirm | rollback      commit now, or roll back now, a pending --confirm transaction
  upgrade [--binary PATH] [--timeout DUR]
                          replace the daemon by PATH (default: its own executable) on
                          the same sockets, no connection refused; exit 3 when the new
                          process was not ready within DUR (30s) and was stopped
  rollout FILE --etcd URL --prefix P [--instances ID,...] [--batch N] [--timeout DUR]
                          a fleet following etcd: the table assigned batch by batch;
                          halted and reverted on the first failure (exit 3)
  fleet --etcd URL --prefix P
                          each instance's version, generation, outcome and age
apply, add and del take -s several times: one transaction across all those
instances, committed only if every one of them can commit.`

// exitError carries the contract's exit code for an error.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

// errSilent ends a command with its exit code and no message: the output
// said it all (diff's differences).
var errSilent = errors.New("(no message)")

// stringList is a flag that may be given several times.
type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

// ctlCmd is one run of `sluice ctl`.
type ctlCmd struct {
	sock    string
	socks   []string // several -s: a transaction across instances (ctl_multi.go)
	timeout time.Duration
	dryRun  bool
	force   bool
	json    bool
	rule    string        // sessions: only this rule's listen key
	count   int           // watch: stop after this many events
	n       int           // history: the last N commits
	confirm time.Duration // apply, add, del: leave the commit pending for this long (commit-confirmed)
	pending bool          // list: the applied table that awaits its commit
	binary  string        // upgrade: the new binary ("" = the daemon's own)
	out     io.Writer
	// between is ctl.MultiOptions.Between: tests stop or kill an instance
	// at an exact step of a transaction across instances.
	between func(ctl.Step)
}

// runCtl runs `sluice ctl ARGS` and returns its exit code: 0 ok; 1 runtime
// or protocol error; 2 bad usage or a table that does not validate; 3
// applied but rolled back; 4 another writer holds the control socket.
func runCtl(args []string, stdout, stderr io.Writer) int {
	return runCtlWith(args, stdout, stderr, nil)
}

// runCtlWith is runCtl with a hook called before each step of a
// transaction across instances (ctl.MultiOptions.Between).
func runCtlWith(args []string, stdout, stderr io.Writer, between func(ctl.Step)) int {
	err := cmdCtl(args, stdout, stderr, between)
	if err == nil {
		return exitOK
	}
	var list rules.ErrorList
	if errors.Is(err, errSilent) {
		return ctlExitCode(err)
	}
	if errors.As(err, &list) { // FILE:LINE: message, one per line
		for _, e := range list {
			fmt.Fprintln(stderr, e)
		}
	} else {
		fmt.Fprintln(stderr, "sluice: ctl:", err)
	}
	return ctlExitCode(err)
}

// ctlExitCode is the contract's exit code for what cmdCtl returned.
func ctlExitCode(err error) int {
	if err == nil {
		return exitOK
	}
	var (
		list rules.ErrorList
		x    *exitError
		u    usageError
	)
	switch {
	case errors.As(err, &list):
		return exitUsage
	case errors.As(err, &x):
		return x.code
	case errors.As(err, &u):
		return exitUsage
	}
	switch ctl.CodeOf(err) {
	case ctl.CodeBusy:
		return exitBusy
	case ctl.CodeInvalidRule, ctl.CodeInvalidTable, ctl.CodeUnknownPif:
		return exitUsage
	}
	return exitRuntime
}

func cmdCtl(args []string, stdout, stderr io.Writer, between func(ctl.Step)) error {
	if isFleetVerb(args) { // etcd, not a control socket (ctl_fleet.go)
		return cmdFleet(args, stdout, stderr)
	}
	var socks stringList
	var cfgFile string
	x := &ctlCmd{out: stdout, between: between}
	fs := newFlagSet("ctl", ctlSynopsis)
	fs.SetOutput(stderr)
	fs.Var(&socks, "s", "the control socket (default: ctl.socket of -c, else $XDG_RUNTIME_DIR/sluice/ctl.sock, else /run/sluice/ctl.sock)")
	fs.StringVar(&cfgFile, "c", "", "a configuration file whose ctl.socket to use")
	fs.BoolVar(&x.dryRun, "dry-run", false, "apply, add, del: validate on the daemon, change nothing (binds are not tried)")
	fs.BoolVar(&x.pending, "pending", false, "list: the applied table that awaits its commit, not the committed one")
	fs.BoolVar(&x.force, "force", false, "apply, add, del: commit even when the bind summary's verdict is bad")
	fs.DurationVar(&x.timeout, "timeout", ctl.DefaultConfirm, "bound of each answer of the daemon, and the confirm timeout of a write: without a commit in time the daemon rolls back by itself (with several -s: (2 + instances) × DUR, at most 10m)")
	fs.BoolVar(&x.json, "json", false, "apply, add, del: print the outcome as one JSON object, instance by instance; status, pifs, list, sessions, stats: print JSON")
	fs.StringVar(&x.rule, "rule", "", "sessions: only the sessions of the rule with this listen key (\"tcp 0.0.0.0:8080\")")
	fs.IntVar(&x.count, "count", 0, "watch: exit after this many events (0: until interrupted)")
	fs.IntVar(&x.n, "n", 0, "history: the last N commits (0: every one kept, at most 1000)")
	fs.StringVar(&x.binary, "binary", "", "upgrade: the new binary (default: the daemon's own executable, the path it was started from)")
	fs.DurationVar(&x.confirm, "confirm", 0, "apply, add, del: leave the commit pending after the command exits; the daemon rolls back by itself after `DUR` unless sluice ctl confirm (at most 10m)")
	pos, help, err := parseCommand(fs, args)
	if help || err != nil {
		return err
	}
	if len(pos) == 0 {
		return usagef("want a verb: status, pifs, list, apply FILE, diff FILE, add RULE, del RULE, watch, sessions, stats, history, reload, confirm, rollback, upgrade")
	}
	verb, rest := pos[0], pos[1:]
	if x.binary != "" && verb != "upgrade" {
		return usagef("%s: --binary is for upgrade", verb)
	}
	switch verb {
	case "watch", "sessions", "stats", "history", "reload", "confirm", "rollback", "upgrade": // one instance, no table of the caller's
		if x.timeout <= 0 || x.timeout > ctl.MaxConfirm {
			return usagef("--timeout %s: want more than 0 and at most %s", x.timeout, ctl.MaxConfirm)
		}
		if len(socks) > 1 {
			return usagef("-s given %d times: %s is for one instance; several are for apply, add and del", len(socks), verb)
		}
		if x.sock, err = ctlSocket(socks, cfgFile); err != nil {
			return err
		}
		switch verb {
		case "watch", "sessions", "stats":
			if x.n != 0 || x.confirm != 0 {
				return usagef("%s: -n is for history, --confirm for apply, add and del", verb)
			}
			return x.observeVerb(verb, rest)
		}
		return x.stateVerb(verb, rest)
	}
	if x.n != 0 {
		return usagef("%s: -n is for history", verb)
	}
	if x.rule != "" || x.count != 0 {
		return usagef("%s: --rule is for sessions, --count for watch", verb)
	}
	if x.pending && verb != "list" {
		return usagef("%s: --pending is for list", verb)
	}
	want := map[string]int{"status": 0, "pifs": 0, "list": 0, "apply": 1, "add": 1, "del": 1, "diff": 1}
	n, ok := want[verb]
	switch {
	case !ok:
		return usagef("unknown verb %q: want status, pifs, list, apply, diff, add, del, watch, sessions, stats, history, reload, confirm or rollback", verb)
	case len(rest) != n && n == 0:
		return usagef("%s: unexpected argument %q", verb, rest[0])
	case len(rest) != n && (verb == "apply" || verb == "diff"):
		return usagef("%s: want one rules FILE, got %d arguments", verb, len(rest))
	case verb == "diff" && (x.dryRun || x.force || x.json || len(socks) > 1):
		return usagef("diff: --dry-run, --force, --json and several -s are for apply, add and del")
	case len(rest) != n:
		return usagef("%s: want one rule line as one argument (quote it: '%s tcp 0.0.0.0:8443 -> 127.0.0.1:443'), got %d arguments", verb, verb, len(rest))
	case n == 0 && (x.dryRun || x.force):
		return usagef("%s: --dry-run and --force are for apply, add and del", verb)
	case x.timeout <= 0 || x.timeout > ctl.MaxConfirm:
		return usagef("--timeout %s: want more than 0 and at most %s", x.timeout, ctl.MaxConfirm)
	case x.confirm < 0 || x.confirm > ctl.MaxConfirm:
		return usagef("--confirm %s: want more than 0 and at most %s", x.confirm, ctl.MaxConfirm)
	case x.confirm != 0 && (n == 0 || verb == "diff" || x.dryRun || x.json || len(socks) > 1):
		return usagef("--confirm: for apply, add and del on one instance, without --dry-run and --json")
	case len(socks) > 1 && n == 0:
		return usagef("-s given %d times: %s reads one instance; several are for apply, add and del", len(socks), verb)
	}
	switch {
	case len(socks) > 1: // a transaction across instances
		if err := distinct(socks); err != nil {
			return err
		}
		x.socks = socks
	default:
		if x.sock, err = ctlSocket(socks, cfgFile); err != nil {
			return err
		}
		if x.json && n > 0 { // one instance, reported as a transaction across one
			x.socks = []string{x.sock}
		}
	}
	switch verb {
	case "status":
		return x.status()
	case "pifs":
		return x.pifs()
	case "list":
		return x.list()
	case "apply":
		return x.apply(rest[0])
	case "diff":
		return x.diff(rest[0])
	case "add":
		return x.add(rest[0])
	}
	return x.del(rest[0])
}

// ctlSocket is -s, else ctl.socket of the config given with -c, else the
// default socket.
func ctlSocket(socks []string, cfgFile string) (string, error) {
	if len(socks) == 1 {
		return socks[0], nil
	}
	if cfgFile != "" {
		c, err := loadConfig(cfgFile)
		if err != nil {
			return "", err
		}
		return c.CtlSocket(), nil
	}
	return config.DefaultCtlSocket(), nil
}

func (x *ctlCmd) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), x.timeout)
}

// open dials the socket and says the intent (a writer checks that the
// daemon serves transactions).
func (x *ctlCmd) open(intent ctl.Intent) (*ctl.Client, error) {
	feature := ""
	if intent == ctl.IntentWrite {
		feature = ctl.FeatureTxn
	}
	return x.openFeatureHello(intent, feature)
}

// readTable opens a connection for intent (list or write) and reads the
// pifs and the active table (steps 1 to 4).
func (x *ctlCmd) readTable(intent ctl.Intent) (*ctl.Client, *ctl.Table, error) {
	c, err := x.open(intent)
	if err != nil {
		return nil, nil, err
	}
	ctx, cancel := x.ctx()
	defer cancel()
	if _, err := c.Pifs(ctx); err != nil {
		c.Close()
		return nil, nil, err
	}
	t, err := c.List(ctx)
	if err != nil {
		c.Close()
		return nil, nil, err
	}
	return c, t, nil
}

func (x *ctlCmd) status() error {
	c, err := x.open(ctl.IntentStatus)
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := x.ctx()
	defer cancel()
	st, err := c.Status(ctx)
	if err != nil {
		return err
	}
	h := c.Server()
	writer := "none"
	switch {
	case st.ConfirmGen != 0:
		writer = fmt.Sprintf("a commit-confirmed transaction is pending: generation %d rolls back in %s unless confirmed",
			st.ConfirmGen, st.ConfirmLeft.Round(100*time.Millisecond))
	case st.Writer:
		writer = "a transaction is open"
	}
	if x.json {
		return json.NewEncoder(x.out).Encode(statusJSON(x.sock, c, st))
	}
	tw := tabwriter.NewWriter(x.out, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "socket\t%s\n", x.sock)
	fmt.Fprintf(tw, "software\t%s\n", h.Software)
	if st.State != 0 { // STATUS carries the process from version 6
		fmt.Fprintf(tw, "version\t%s\n", dash(st.Version))
		fmt.Fprintf(tw, "pid\t%d\n", st.PID)
		fmt.Fprintf(tw, "uptime\t%s (since %s)\n", st.Uptime.Truncate(time.Second), st.Started.UTC().Format(time.RFC3339))
		fmt.Fprintf(tw, "state\t%s\n", runState(st))
	}
	fmt.Fprintf(tw, "protocol\tversion %d\n", c.Version())
	fmt.Fprintf(tw, "features\t%s\n", strings.Join(h.Features, ", "))
	if boot := max(st.BootID, h.Limits.BootID); boot != 0 { // STATUS carries it from version 3
		fmt.Fprintf(tw, "boot id\t%016x\n", boot)
	}
	fmt.Fprintf(tw, "generation\t%d\n", st.Generation)
	fmt.Fprintf(tw, "rules\t%d\n", st.Rules)
	fmt.Fprintf(tw, "ports\t%d\n", st.Ports)
	pending := "none"
	if st.PendingGen != 0 { // STATUS carries it from version 4
		pending = fmt.Sprintf("generation %d applied, not committed: %s, %s (sluice ctl list --pending)",
			st.PendingGen, count(st.PendingRules, "rule"), count(st.PendingPorts, "listen port"))
	}
	fmt.Fprintf(tw, "pending\t%s\n", pending)
	fmt.Fprintf(tw, "sessions\t%d\n", st.Sessions)
	fmt.Fprintf(tw, "pifs\t%d\n", st.Pifs)
	fmt.Fprintf(tw, "writer\t%s\n", writer)
	if h.Has(ctl.FeatureStats) {
		c.Close() // one connection at a time against max-clients
		if err := x.storeStatus(tw); err != nil {
			return err
		}
	}
	return tw.Flush()
}

// storeStatus prints the fleet store's lines of ctl status, read from ctl
// stats' store.* counters (a second request: STATUS has no store fields);
// nothing when the daemon follows no store.
func (x *ctlCmd) storeStatus(tw io.Writer) error {
	cs, err := x.counters()
	if err != nil {
		return err
	}
	var st engine.StoreStats
	for _, s := range cs {
		switch {
		case s.Name == engine.StatStoreConnected:
			st.Enabled, st.Connected = true, s.Value == 1
		case s.Name == engine.StatStoreLastApply:
			st.LastApply = s.Value
		case s.Name == engine.StatStoreErrors:
			st.Errors = uint64(s.Value)
		case strings.HasPrefix(s.Name, engine.StatStoreVersion):
			st.Version = strings.TrimPrefix(s.Name, engine.StatStoreVersion)
		}
	}
	if !st.Enabled {
		return nil
	}
	conn := "etcd connected"
	if !st.Connected {
		conn = "etcd unreachable: the active table keeps serving, retrying"
	}
	last := "never"
	if st.LastApply != 0 {
		t := time.Unix(st.LastApply, 0)
		last = fmt.Sprintf("%s (%s ago)", t.UTC().Format(time.RFC3339), time.Since(t).Truncate(time.Second))
	}
	fmt.Fprintf(tw, "store\t%s\n", conn)
	fmt.Fprintf(tw, "store version\t%s\n", dash(st.Version))
	fmt.Fprintf(tw, "store last apply\t%s\n", last)
	fmt.Fprintf(tw, "store errors\t%d\n", st.Errors)
	return nil
}

func (x *ctlCmd) pifs() error {
	c, err := x.open(ctl.IntentPifs)
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := x.ctx()
	defer cancel()
	pifs, err := c.Pifs(ctx)
	if err != nil {
		return err
	}
	if x.json {
		out := make([]map[string]any, len(pifs))
		for i, p := range pifs {
			out[i] = map[string]any{"index": p.Index, "name": p.Name}
		}
		return json.NewEncoder(x.out).Encode(out)
	}
	fmt.Fprintln(x.out, "INDEX\tPIF")
	for _, p := range pifs {
		fmt.Fprintf(x.out, "%d\t%s\n", p.Index, p.Name)
	}
	return nil
}

// statusJSON is ctl status --json: the lines of the table as one object,
// numbers as numbers; the fields a STATUS of the server's version does
// not carry are left out. "started" is RFC 3339, UTC, milliseconds, as
// the logs write time.
func statusJSON(sock string, c *ctl.Client, st *ctl.Status) map[string]any {
	h := c.Server()
	m := map[string]any{"socket": sock, "software": h.Software, "protocol": c.Version(), "features": h.Features,
		"generation": st.Generation, "rules": st.Rules, "ports": st.Ports, "sessions": st.Sessions, "pifs": st.Pifs,
		"writer": st.Writer}
	if boot := max(st.BootID, h.Limits.BootID); boot != 0 {
		m["boot_id"] = fmt.Sprintf("%016x", boot)
	}
	if st.ConfirmGen != 0 {
		m["confirm"] = map[string]any{"generation": st.ConfirmGen, "left_ms": st.ConfirmLeft.Milliseconds()}
	}
	if st.PendingGen != 0 {
		m["pending"] = map[string]any{"generation": st.PendingGen, "rules": st.PendingRules, "ports": st.PendingPorts}
	}
	if st.State != 0 { // version 6
		m["version"], m["pid"], m["state"] = st.Version, st.PID, st.State.String()
		m["started"] = st.Started.UTC().Format("2006-01-02T15:04:05.000Z07:00")
		m["uptime_ms"] = st.Uptime.Milliseconds()
		if st.State == ctl.StateDraining {
			m["drain_left_ms"] = st.DrainLeft.Milliseconds()
		}
	}
	return m
}

// runState is ctl status's state line: "serving", or "draining" with the
// time left until the drain deadline closes the sessions left.
func runState(st *ctl.Status) string {
	if st.State != ctl.StateDraining {
		return st.State.String()
	}
	return fmt.Sprintf("draining: stopping, %s left of the drain deadline; table changes refused (sluice ctl sessions: what is still open)",
		st.DrainLeft.Round(time.Second))
}

// list prints the committed table as a rules file: a comment with the
// generation, then one canonical line a rule; a comment says when an
// applied table awaits its commit. With --pending it prints that table,
// under the generation it gets if committed (none pending: no-pending).
func (x *ctlCmd) list() error {
	intent := ctl.IntentList
	if x.pending {
		intent = ctl.IntentListPending
	}
	c, t, err := x.readTable(intent)
	if err != nil {
		return err
	}
	defer c.Close()
	if x.json {
		m := map[string]any{"generation": t.Generation, "pending": x.pending, "rules": t.Lines}
		if !x.pending {
			if g := x.pendingGen(t.Generation); g != 0 {
				m["pending_generation"] = g
			}
		}
		if t.Lines == nil {
			m["rules"] = []string{}
		}
		return json.NewEncoder(x.out).Encode(m)
	}
	if x.pending {
		fmt.Fprintf(x.out, "# generation %d (pending: applied, not committed)\n", t.Generation)
	} else {
		fmt.Fprintf(x.out, "# generation %d\n", t.Generation)
		if g := x.pendingGen(t.Generation); g != 0 {
			fmt.Fprintf(x.out, "# pending: generation %d is applied, not committed (sluice ctl list --pending prints it)\n", g)
		}
	}
	for _, l := range t.Lines {
		fmt.Fprintln(x.out, l)
	}
	return nil
}

// pendingGen asks the daemon whether an applied table awaits its commit on
// top of generation gen, and returns the generation it would get (0: none,
// or the daemon cannot say: a STATUS before version 4, an error).
func (x *ctlCmd) pendingGen(gen uint64) uint64 {
	c, err := x.open(ctl.IntentStatus)
	if err != nil {
		return 0
	}
	defer c.Close()
	ctx, cancel := x.ctx()
	defer cancel()
	st, err := c.Status(ctx)
	if err != nil || st.Generation != gen {
		return 0
	}
	return st.PendingGen
}

// write runs a writing transaction: on one instance, or across several
// (with several -s, or --json) — ctl_multi.go.
func (x *ctlCmd) write(verb string, build func(*ctl.Table) ([]*rules.Rule, error), refused func(*ctl.Table, *ctl.Error) error) error {
	if x.socks != nil {
		return x.transactMulti(verb, build, refused)
	}
	return x.transact(verb, build, refused)
}

// apply replaces the table with the rules of file, parsed here first so
// that every error names the user's line.
func (x *ctlCmd) apply(file string) error {
	src, err := config.ReadFile(file)
	if err != nil {
		return usageError{err}
	}
	entries, err := rules.ParseFile(file, src)
	if err != nil {
		return err // rules.ErrorList: FILE:LINE: message
	}
	rs := rules.RulesOf(entries)
	return x.write("apply", func(*ctl.Table) ([]*rules.Rule, error) { return slices.Clone(rs), nil },
		func(_ *ctl.Table, e *ctl.Error) error {
			if e.Index < 0 || e.Index >= len(entries) {
				return usageError{fmt.Errorf("apply %s: %w", file, e)}
			}
			return rules.ErrorList{{File: file, Line: entries[e.Index].Line, Msg: e.Msg}}
		})
}

// diff prints what `apply FILE` would change in the active table: "- line"
// removed, "~ old" / "  new" changed, "+ line" added. It exits 0 when
// nothing would change, 1 when something would (as diff(1)), 2 when the
// file does not validate. It reads the table as a reader: never busy.
func (x *ctlCmd) diff(file string) error {
	src, err := config.ReadFile(file)
	if err != nil {
		return usageError{err}
	}
	entries, err := rules.ParseFile(file, src)
	if err != nil {
		return err
	}
	if errs := rules.CheckEntries(file, entries); len(errs) > 0 {
		return errs
	}
	c, t, err := x.readTable(ctl.IntentList)
	if err != nil { // trouble is 2, as diff(1) has it: 1 means "differences"
		return &exitError{exitUsage, err}
	}
	c.Close()
	ch := state.DiffLines(t.Lines, state.Lines(rules.RulesOf(entries)))
	if ch.Empty() {
		return nil
	}
	fmt.Fprint(x.out, ch.Format())
	return &exitError{exitRuntime, errSilent}
}

// add appends one rule to the active table, in one transaction.
func (x *ctlCmd) add(line string) error {
	r, err := rules.Parse(line)
	if err != nil {
		return usagef("add: %v", err)
	}
	return x.write("add", func(t *ctl.Table) ([]*rules.Rule, error) {
		rs, err := t.Rules()
		if err != nil {
			return nil, err
		}
		return append(rs, r), nil
	}, func(t *ctl.Table, e *ctl.Error) error {
		if e.Index == len(t.Lines) {
			return usagef("add %q: %s", r.String(), e.Msg)
		}
		return usagef("add %q: %w", r.String(), e)
	})
}

// del removes one rule, in one transaction: the rule whose canonical line is
// line's, or, when line is not a whole rule, the rule whose name (its
// listen key or listen part, with its sni=/alpn= words for a route: the
// name sessions, stats and the metrics use) is line's.
func (x *ctlCmd) del(line string) error {
	var match func(r *rules.Rule) bool
	what := ""
	if r, err := rules.Parse(line); err == nil {
		canon := r.String()
		match = func(r *rules.Rule) bool { return r.String() == canon }
		what = canon
	} else if name, nerr := rules.ParseName(line); nerr == nil {
		match = func(r *rules.Rule) bool { return r.RouteString() == name }
		what = name
	} else {
		return usagef("del: %v (nor is it a rule's name: %v)", err, nerr)
	}
	return x.write("del", func(t *ctl.Table) ([]*rules.Rule, error) {
		rs, err := t.Rules()
		if err != nil {
			return nil, err
		}
		if i := slices.IndexFunc(rs, match); i >= 0 {
			return append(rs[:i:i], rs[i+1:]...), nil
		}
		return nil, usagef("del: no rule %q in the active table (generation %d)", what, t.Generation)
	}, func(_ *ctl.Table, e *ctl.Error) error { return usagef("del %q: %w", what, e) })
}

// dryRunLine is what --dry-run says of a load: the table is valid, what an
// apply would do with its ports, and that no bind was tried (a port in use
// shows only at the real apply).
func dryRunLine(ld *ctl.Loaded) string {
	return fmt.Sprintf("valid: %s, %s; applying would keep %d, add %d and remove %d listen ports (generation %d; nothing changed: binds are not tried, so a port in use fails only at the real apply)",
		count(ld.Rules, "rule"), count(ld.Ports, "listen port"), ld.Kept, ld.Added, ld.Removed, ld.Generation)
}

// transact runs one writing transaction: read the table, build the new one,
// load, and unless --dry-run apply, print the bind summary, and commit if
// the verdict is good (or --force), else roll back (exit 3). refused says
// how a load refused for a rule (invalid-rule, invalid-table, unknown-pif)
// is reported.
func (x *ctlCmd) transact(verb string, build func(*ctl.Table) ([]*rules.Rule, error), refused func(*ctl.Table, *ctl.Error) error) error {
	c, t, err := x.readTable(ctl.IntentWrite)
	if err != nil {
		return err
	}
	defer c.Close()
	rs, err := build(t)
	if err != nil {
		return err
	}
	ctx, cancel := x.ctx()
	defer cancel()
	ld, err := c.Load(ctx, t.Generation, rs)
	if err != nil {
		var e *ctl.Error
		if errors.As(err, &e) {
			switch e.Code {
			case ctl.CodeInvalidRule, ctl.CodeInvalidTable, ctl.CodeUnknownPif:
				return refused(t, e)
			}
		}
		return err
	}
	if x.dryRun {
		fmt.Fprint(x.out, state.DiffLines(t.Lines, state.Lines(rs)).Format())
		fmt.Fprintln(x.out, dryRunLine(ld))
		return nil
	}
	cancel()
	ctx, cancel = x.ctx()
	defer cancel()
	confirm := x.timeout
	if x.confirm > 0 {
		confirm = x.confirm
	}
	sum, err := c.Apply(ctx, confirm)
	if err != nil {
		return err
	}
	x.printSummary(sum)
	cancel()
	ctx, cancel = x.ctx()
	defer cancel()
	if d := ctl.Decide(sum.OK, x.force); d.Commits() && x.confirm > 0 {
		p, err := c.Leave(ctx)
		if err != nil {
			return err
		}
		fmt.Fprintf(x.out, "applied, pending: generation %d rolls back by itself in %s unless confirmed (sluice ctl confirm; sluice ctl rollback ends it now)\n",
			p.Generation, p.Left.Round(time.Second))
		return nil
	} else if d.Commits() {
		gen, err := c.Commit(ctx)
		if err != nil {
			return err
		}
		how := "verdict good"
		if d == ctl.DecideForce {
			how = "verdict bad, committed anyway (--force)"
		}
		fmt.Fprintf(x.out, "%s: committed generation %d (listen ports: %d kept, %d added, %d removed)\n", how, gen, sum.Kept, sum.Added, sum.Removed)
		return nil
	}
	rsum, err := c.Rollback(ctx)
	if err != nil {
		return err
	}
	fmt.Fprintf(x.out, "verdict bad: rolled back; generation %d is still active\n", rsum.Generation)
	failed := 0
	for _, r := range sum.Rules {
		failed += r.Failed
	}
	return &exitError{exitRollback, fmt.Errorf("%s: %s failed to bind: rolled back", verb, count(failed, "listen port"))}
}

// printSummary prints the bind summary: a table of the rules, then each
// failure as "tcp 0.0.0.0:8080: port 8080: address already in use".
func (x *ctlCmd) printSummary(s *ctl.Summary) {
	tw := tabwriter.NewWriter(x.out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "RULE\tREQUESTED\tBOUND\tFAILED")
	for _, r := range s.Rules {
		mark := ""
		if r.Failed > 0 && r.Weak && r.Bound > 0 {
			mark = "  (weak: ignored)"
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d%s\n", r.Rule, r.Requested, r.Bound, r.Failed, mark)
	}
	tw.Flush()
	for _, f := range s.Failures() {
		fmt.Fprintln(x.out, f)
	}
}
