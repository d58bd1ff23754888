package daemon

// This file holds the reload (SIGHUP, `sluice ctl reload`): the
// configuration file read again and its rules applied in one transaction,
// and the history the control socket serves from the state dir.

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/ctl"
	"github.com/sluice-proxy/sluice/rules"
	"github.com/sluice-proxy/sluice/state"
)

var (
	_ ctl.Historian = ctlEngine{}
	_ ctl.Reloader  = ctlEngine{}
)

// History serves intent history from the state dir.
func (c ctlEngine) History(n int) ([]string, error) {
	if c.d.st == nil {
		return nil, ctl.ErrNoState
	}
	return c.d.st.HistoryLines(n)
}

// Reload serves intent reload.
func (c ctlEngine) Reload(who ctl.Who) (*ctl.Reload, error) {
	return c.d.Reload(state.Who{UID: who.UID, PID: who.PID, Name: who.Name})
}

// Reload reads the configuration file again (Options.Reload) and applies
// its rules in one transaction, under the control socket's writer slot:
// committed on a good verdict (and saved to the state dir, under the new
// file's digest), else rolled back — the old table keeps serving, its
// sockets untouched. log.level changes at once (Options.Level); the keys
// read only at start (loops, ctl.socket, pifs, metrics.listen, state.dir,
// log.format) are reported as needing a restart, in the result and the
// log. Its error is a *ctl.Error: no-reload (no file), invalid-table (the
// file does not load: every FILE:LINE: message line), busy, apply-failed.
func (d *Daemon) Reload(who state.Who) (*ctl.Reload, error) {
	log := d.log.With(zap.Stringer("by", who))
	d.notify.send(notifyReloading, monotonicUsec()) // systemd: reloading until READY=1
	defer d.notify.send(notifyReady)
	if d.opt.Reload == nil {
		return nil, &ctl.Error{Code: ctl.CodeNoReload, Index: -1, Msg: "this daemon has no configuration file to reload (sluice forward)"}
	}
	nc, err := d.opt.Reload()
	if err == nil {
		err = d.checkPifs(nc)
	}
	if err == nil {
		err = resolveNames(nc, d.e)
	}
	if err != nil {
		log.Error("reload: the configuration file is not applied; the active table keeps serving", zap.Error(err))
		return nil, &ctl.Error{Code: ctl.CodeInvalidTable, Index: -1, Msg: errText(err)}
	}
	restart := restartKeys(d.c, nc)
	for _, k := range restart {
		log.Warn("reload: " + k)
	}
	if d.opt.Level != nil && nc.Log.Level != d.opt.Level.Level().String() {
		if lvl, err := zapcore.ParseLevel(nc.Log.Level); err == nil {
			log.Info("reload: log level changed", zap.String("from", d.opt.Level.Level().String()), zap.String("to", nc.Log.Level))
			d.opt.Level.SetLevel(lvl)
		}
	}
	d.recMu.Lock()
	d.drain = nc.Drain
	d.recMu.Unlock()
	res, err := d.transact(nc.RuleList(), who, log, "reload", state.Digest(nc.RuleList()))
	if res != nil {
		res.Restart = restart
	}
	return res, err
}

// transact runs one transaction on rs under the control socket's writer
// slot (ctl.Server.Hold: busy while a ctl writer or a pending confirm holds
// it), as `ctl apply` does: apply, ctl.Decide, commit or roll back, the
// commit recorded in the state dir. The reload and the store's assignments
// (store.go) share it. what names the caller in the log; digest, when not
// "", is the configuration digest the new table grows from (a reload's
// file), else the table keeps the one it has. Its error is a *ctl.Error
// (busy, apply-failed, rollback-failed, commit-failed); otherwise the
// result says unchanged, committed or rolled back.
func (d *Daemon) transact(rs []*rules.Rule, who state.Who, log *zap.Logger, what, digest string) (*ctl.Reload, error) {
	if d.ctl != nil {
		release, err := d.ctl.Hold()
		if err != nil {
			log.Warn(what+": not applied", zap.Error(err))
			return nil, err
		}
		defer release()
	}
	e := d.e
	old := e.Rules()
	if slices.Equal(state.Lines(rs), state.Lines(old)) {
		gen := e.Generation()
		log.Info(what+": the rules are the active table; nothing to apply", zap.Uint64("generation", gen))
		return &ctl.Reload{Outcome: ctl.ReloadUnchanged, Generation: gen}, nil
	}
	sum, err := e.Apply(rs)
	if err != nil {
		log.Error(what+": the engine refused the apply; nothing changed", zap.Error(err))
		return nil, &ctl.Error{Code: ctl.CodeApplyFailed, Index: -1, Msg: err.Error()}
	}
	failures := sum.Failures()
	if !ctl.Decide(sum.OK(), false).Commits() {
		if _, err := e.Rollback(); err != nil {
			e.TxnEnded(rules.TxnFailed)
			log.Error(what+": rollback failed", zap.Error(err))
			return nil, &ctl.Error{Code: ctl.CodeRollbackFailed, Index: -1, Msg: err.Error()}
		}
		e.TxnEnded(rules.TxnRolledBack)
		log.Error(what+": verdict bad, rolled back; the old table keeps serving", zap.Uint64("generation", e.Generation()),
			zap.Strings("failures", failures))
		return &ctl.Reload{Outcome: ctl.ReloadRolledBack, Generation: e.Generation(), Summary: sum}, nil
	}
	gen, err := e.Commit()
	if err != nil {
		_, _ = e.Rollback()
		e.TxnEnded(rules.TxnRolledBack)
		log.Error(what+": commit failed, rolled back", zap.Error(err))
		return nil, &ctl.Error{Code: ctl.CodeCommitFailed, Index: -1, Msg: err.Error() + " (rolled back)"}
	}
	e.TxnEnded(rules.TxnCommitted)
	if digest != "" {
		d.recMu.Lock()
		d.digest = digest
		d.recMu.Unlock()
	}
	d.record(gen, old, rs, who)
	for _, f := range failures {
		log.Warn(what+": weak rule: port not bound", zap.String("failure", f))
	}
	log.Info(what+": committed", zap.Uint64("generation", gen), zap.Int("rules", len(rs)),
		zap.Int("kept", sum.Kept), zap.Int("added", sum.Added), zap.Int("removed", sum.Removed))
	return &ctl.Reload{Outcome: ctl.ReloadCommitted, Generation: gen, Summary: sum}, nil
}

// checkPifs refuses a file whose rules use a pif the daemon does not run:
// a pif is added only at start.
func (d *Daemon) checkPifs(nc *config.Config) error {
	have := map[string]bool{"": true}
	for _, p := range d.e.Pifs() {
		have[p] = true
	}
	var errs rules.ErrorList
	for _, en := range nc.Rules {
		for _, p := range []string{en.Rule.ListenPif, en.Rule.TargetPif} {
			if !have[p] {
				errs = append(errs, &rules.Error{File: nc.File, Line: en.Line,
					Msg: fmt.Sprintf("pif %s is not running: a new pif needs a restart", p)})
				break
			}
		}
	}
	if len(errs) > 0 {
		return errs
	}
	return nil
}

// errText is an error as lines: a rules.ErrorList one FILE:LINE: message a
// line.
func errText(err error) string {
	var list rules.ErrorList
	if errors.As(err, &list) {
		lines := make([]string, len(list))
		for i, e := range list {
			lines[i] = e.Error()
		}
		return strings.Join(lines, "\n")
	}
	return err.Error()
}

// restartKeys lists what changed between the running configuration (the
// start's) and nc among the keys read only at start.
func restartKeys(c, nc *config.Config) []string {
	var out []string
	say := func(key string, from, to any) {
		out = append(out, fmt.Sprintf("%s changed in the file (%v -> %v): needs a restart", key, from, to))
	}
	if c.Loops != nc.Loops {
		say("loops", c.Loops, nc.Loops)
	}
	if c.BusyPoll != nc.BusyPoll {
		say("busy-poll", c.BusyPoll, nc.BusyPoll)
	}
	if c.CtlSocket() != nc.CtlSocket() {
		say("ctl.socket", c.CtlSocket(), nc.CtlSocket())
	}
	if c.Metrics.Listen != nc.Metrics.Listen {
		say("metrics.listen", addrOrNone(c.Metrics.Listen.String(), c.Metrics.Listen.IsValid()),
			addrOrNone(nc.Metrics.Listen.String(), nc.Metrics.Listen.IsValid()))
	}
	if c.State.Dir != nc.State.Dir {
		say("state.dir", orNone(c.State.Dir), orNone(nc.State.Dir))
	}
	if c.Log.Format != nc.Log.Format {
		say("log.format", c.Log.Format, nc.Log.Format)
	}
	if pifText(c) != pifText(nc) {
		say("pifs", orNone(pifText(c)), orNone(pifText(nc)))
	}
	return out
}

func pifText(c *config.Config) string {
	var b []string
	for _, p := range c.Pifs {
		b = append(b, p.Name+"="+p.Netns)
	}
	return strings.Join(b, ",")
}

func orNone(s string) string { return addrOrNone(s, s != "") }

func addrOrNone(s string, ok bool) string {
	if !ok {
		return "none"
	}
	return s
}
