package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/sluice-proxy/sluice/ctl"
	"github.com/sluice-proxy/sluice/observe"
	"github.com/sluice-proxy/sluice/rules"
)

// The read verbs beyond the table: watch, sessions, stats.

// observeVerb runs watch, sessions or stats on the socket of x.
func (x *ctlCmd) observeVerb(verb string, rest []string) error {
	switch {
	case x.dryRun || x.force:
		return usagef("%s: --dry-run and --force are for apply, add and del", verb)
	case verb != "sessions" && x.rule != "":
		return usagef("%s: --rule is for sessions", verb)
	case verb != "watch" && x.count != 0:
		return usagef("%s: --count is for watch", verb)
	case verb == "watch" && x.json:
		return usagef("watch: its output is JSON lines already; --json is for sessions and stats")
	case verb != "watch" && len(rest) > 0:
		return usagef("%s: unexpected argument %q", verb, rest[0])
	case x.count < 0:
		return usagef("--count %d: want 0 (no end) or more", x.count)
	}
	for _, g := range rest {
		if _, ok := observe.ParseGroup(g); !ok {
			return usagef("watch: unknown group %q: want some of %v", g, observe.Names())
		}
	}
	switch verb {
	case "watch":
		return x.watch(rest)
	case "sessions":
		return x.sessions()
	}
	return x.stats()
}

// ruleExists returns nil when a rule of the active table is named name (its
// RouteString), a usage error "no such rule" when none is, or the error of
// reading the table.
func (x *ctlCmd) ruleExists(name string) error {
	c, t, err := x.readTable(ctl.IntentList)
	if err != nil {
		return err
	}
	c.Close()
	rs, err := t.Rules()
	if err != nil {
		return err
	}
	if !slices.ContainsFunc(rs, func(r *rules.Rule) bool { return r.RouteString() == name }) {
		return usagef("sessions --rule: no such rule %q in the active table (generation %d)", name, t.Generation)
	}
	return nil
}

// openFeature is open, for a daemon that lists feature; for intents but
// stats it reads the pifs too, the answer to the hello.
func (x *ctlCmd) openFeature(intent ctl.Intent, feature string) (*ctl.Client, error) {
	c, err := x.openFeatureHello(intent, feature)
	if err != nil {
		return nil, err
	}
	ctx, cancel := x.ctx()
	defer cancel()
	if intent != ctl.IntentStats {
		if _, err := c.Pifs(ctx); err != nil {
			c.Close()
			return nil, err
		}
	}
	return c, nil
}

// watch prints events as JSON lines: first the current state (type
// "state"), then each event as it comes, until interrupted (exit 0), after
// --count events (exit 0), or until the daemon ends the watch (exit 1).
func (x *ctlCmd) watch(groups []string) error {
	c, err := x.openFeature(ctl.IntentWatch, ctl.FeatureWatch)
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := x.ctx()
	defer cancel()
	if err := c.Watch(ctx, groups); err != nil {
		return err
	}
	sig, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	for n := 0; x.count == 0 || n < x.count; n++ {
		ev, err := c.NextEvent(sig)
		if err != nil {
			if sig.Err() != nil {
				return nil
			}
			return err
		}
		line, err := ev.JSON()
		if err != nil {
			return err
		}
		if _, err := fmt.Fprintf(x.out, "%s\n", line); err != nil {
			return err
		}
	}
	return nil
}

// sessions prints the live sessions, oldest first: a table, or with --json
// one JSON object a line. A listing cut at ctl.MaxSessions says so. A
// --rule that is not a rule's name, or names no rule of the active table,
// is "no such rule" (exit 2), not an empty listing.
func (x *ctlCmd) sessions() error {
	rule := ""
	if x.rule != "" {
		name, err := rules.ParseName(x.rule)
		if err != nil {
			return usagef("sessions --rule: no such rule: %v", err)
		}
		rule = name
	}
	c, err := x.openFeature(ctl.IntentSessions, ctl.FeatureSessions)
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := x.ctx()
	defer cancel()
	l, err := c.Sessions(ctx, rule, ctl.MaxSessions)
	if err != nil {
		return err
	}
	if rule != "" && len(l.Sessions) == 0 {
		if err := x.ruleExists(rule); err != nil {
			return err
		}
	}
	addr := func(a interface{ IsValid() bool }, s string) string {
		if !a.IsValid() {
			return "-"
		}
		return s
	}
	mode := func(splice bool) string {
		if splice {
			return "splice"
		}
		return "buffer"
	}
	if x.json {
		enc := json.NewEncoder(x.out)
		for _, s := range l.Sessions {
			if err := enc.Encode(map[string]any{"rule": s.Rule, "source": addr(s.Source, s.Source.String()),
				"peer": addr(s.Peer, s.Peer.String()), "target": addr(s.Target, s.Target.String()), "state": s.State,
				"age_ms": s.Age.Milliseconds(), "bytes_up": s.Up, "bytes_down": s.Down, "mode": mode(s.Splice),
				"sni": s.SNI, "alpn": s.ALPN, "tls_version": s.TLSVersion, "tls_cipher": s.TLSCipher, "tls_resumed": s.TLSResumed}); err != nil {
				return err
			}
		}
		if l.Truncated() {
			return enc.Encode(map[string]any{"truncated": true, "listed": len(l.Sessions), "total": l.Total})
		}
		return nil
	}
	tw := tabwriter.NewWriter(x.out, 0, 0, 2, ' ', 0)
	dash := func(s string) string {
		if s == "" {
			return "-"
		}
		return s
	}
	tlsOf := func(s *observe.Session) string {
		switch {
		case s.TLSVersion == "":
			return "-"
		case s.TLSResumed:
			return s.TLSVersion + " " + s.TLSCipher + " resumed"
		}
		return s.TLSVersion + " " + s.TLSCipher
	}
	fmt.Fprintln(tw, "RULE\tSOURCE\tPEER\tTARGET\tSTATE\tAGE\tUP\tDOWN\tMODE\tSNI\tALPN\tTLS")
	for i := range l.Sessions {
		s := &l.Sessions[i]
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\t%s\t%s\t%s\n", s.Rule, addr(s.Source, s.Source.String()),
			addr(s.Peer, s.Peer.String()), addr(s.Target, s.Target.String()), s.State, s.Age.Round(time.Millisecond), s.Up, s.Down, mode(s.Splice),
			dash(s.SNI), dash(s.ALPN), tlsOf(s))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if l.Truncated() {
		fmt.Fprintf(x.out, "# truncated: %d of %d sessions listed\n", len(l.Sessions), l.Total)
	} else {
		fmt.Fprintf(x.out, "# %s\n", count(len(l.Sessions), "session"))
	}
	return nil
}

// counters reads the engine's counters on a connection of its own.
func (x *ctlCmd) counters() ([]observe.Counter, error) {
	c, err := x.openFeature(ctl.IntentStats, ctl.FeatureStats)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	ctx, cancel := x.ctx()
	defer cancel()
	return c.Stats(ctx)
}

// stats prints the engine's counters: NAME VALUE lines, or with --json one
// JSON object of them, in the daemon's order.
func (x *ctlCmd) stats() error {
	cs, err := x.counters()
	if err != nil {
		return err
	}
	for i := range cs {
		cs[i].Name = statKey(cs[i].Name)
	}
	if x.json {
		b := []byte{'{'}
		for i, s := range cs {
			if i > 0 {
				b = append(b, ',')
			}
			b = strconv.AppendQuote(b, s.Name)
			b = append(b, ':')
			b = strconv.AppendInt(b, s.Value, 10)
		}
		b = append(b, '}', '\n')
		_, err := x.out.Write(b)
		return err
	}
	// Names to the left, values to the right, in two columns.
	nw, vw := 0, 0
	for _, s := range cs {
		nw, vw = max(nw, len(s.Name)), max(vw, len(strconv.FormatInt(s.Value, 10)))
	}
	for _, s := range cs {
		if _, err := fmt.Fprintf(x.out, "%-*s  %*d\n", nw, s.Name, vw, s.Value); err != nil {
			return err
		}
	}
	return nil
}

// statKey is a counter's name as stats prints it: one word, the blanks of
// a rule's name (its listen key, "tcp 0.0.0.0:8080", and a route's
// sni=/alpn= words) made '_': "rule.tcp_0.0.0.0:8080.bytes_in".
func statKey(name string) string { return strings.ReplaceAll(name, " ", "_") }
