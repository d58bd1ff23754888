package daemon

// This file holds the start's table decision with a state dir, the record
// of every commit in it, and the engine as the control socket sees it.

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/ctl"
	"github.com/sluice-proxy/sluice/engine"
	"github.com/sluice-proxy/sluice/rules"
	"github.com/sluice-proxy/sluice/state"
)

// ctlEngine is the engine as the control socket drives it: every commit is
// recorded in the state dir before it is acknowledged, and the hello
// carries the boot id.
type ctlEngine struct {
	*engine.Engine
	d *Daemon
}

var (
	_ ctl.Engine         = ctlEngine{}
	_ ctl.TxnObserver    = ctlEngine{}
	_ ctl.CommitRecorder = ctlEngine{}
	_ ctl.Booted         = ctlEngine{}
	_ ctl.Described      = ctlEngine{}
)

func (c ctlEngine) Committed(x ctl.Commit) {
	c.d.record(x.Generation, x.Old, x.New, state.Who{UID: x.Who.UID, PID: x.Who.PID, Name: x.Who.Name})
}

func (c ctlEngine) BootID() uint64 { return c.d.bootID }

// Described is what ctl status says of the process: Options.Version and
// the start (ctl.Described).
func (c ctlEngine) Described() (string, time.Time) { return c.d.opt.Version, c.d.started }

// BootID is this run's id: random, never 0, new at every start.
func (d *Daemon) BootID() uint64 { return d.bootID }

func newBootID() uint64 {
	var b [8]byte
	for {
		_, _ = rand.Read(b[:]) // never fails on Linux (crypto/rand's contract)
		if id := binary.BigEndian.Uint64(b[:]); id != 0 {
			return id
		}
	}
}

// startTable installs the first table. Without a state dir it is the
// configuration's, as generation 1. With one, state.Decide chooses:
//
//	first     no saved table: the configuration's rules, generation 1, saved
//	resume    the configuration's rules are the ones the saved table grew from:
//	          the saved table, under its own generation ("resuming generation N saved at T")
//	file-wins they changed since: the configuration's rules, the next generation;
//	          the saved table kept as table.rules.prev (a warning)
//	fresh     --fresh: the configuration's rules, the next generation
//
// A saved table that cannot be read or parsed stops the start (its path,
// its error, and the hint --fresh); with --fresh it is kept as
// table.rules.prev and the generations start again from 1. The saved table
// changes only once the new one is committed: a start that fails leaves it
// as it was.
func (d *Daemon) startTable() error {
	c, e, log := d.c, d.e, d.log
	if err := resolveNames(c, e); err != nil {
		return err
	}
	cfgRules := c.RuleList()
	fromFile := func(i int) string { return at(c, c.Rules[i].Line) }
	d.digest = state.Digest(cfgRules)
	if d.opt.StateDir == "" {
		log.Info("no state dir: committed tables are not kept across restarts (set state.dir, or --state DIR)")
		_, err := applyTable(e, cfgRules, fromFile)
		return err
	}
	st, err := state.Open(d.opt.StateDir)
	if err != nil {
		return err
	}
	d.st = st
	saved, err := st.Load()
	if err != nil {
		if !d.opt.Fresh {
			return fmt.Errorf("state: %w (start with --fresh to take the configuration's rules; the file is then kept as %s)", err, state.PrevFile)
		}
		log.Warn("--fresh: the saved table does not parse; starting from the configuration's rules", zap.Error(err))
		if err := st.KeepPrev(); err != nil {
			return err
		}
		saved = nil
	}
	dec := state.Decide(saved, d.digest, d.opt.Fresh)
	if dec == state.Resume {
		rs, err := saved.Rules()
		if err != nil { // Parse checked every line: not reached
			return fmt.Errorf("state: %s: %w", st.TablePath(), err)
		}
		if saved.Generation > 0 {
			if err := e.SetGeneration(saved.Generation - 1); err != nil {
				return err
			}
		}
		if _, err := applyTable(e, rs, func(int) string { return st.TablePath() + ": " }); err != nil {
			return err
		}
		log.Info(fmt.Sprintf("resuming generation %d saved at %s", saved.Generation, saved.Time.Format(time.RFC3339)),
			zap.String("state", st.TablePath()), zap.Int("rules", len(rs)), zap.Stringer("by", saved.Who))
		return nil
	}
	var old []*rules.Rule
	if saved != nil {
		if err := e.SetGeneration(saved.Generation); err != nil {
			return err
		}
		old, _ = saved.Rules()
	}
	gen, err := applyTable(e, cfgRules, fromFile)
	if err != nil {
		return err
	}
	switch dec {
	case state.FileWins:
		// The table is committed and its ports accept: a failed write is
		// the record's kind of failure (logged), not the start's.
		if err := st.SavePrev(saved); err != nil {
			log.Error("the saved table could not be kept as "+state.PrevFile, zap.Error(err))
		}
		log.Warn("the configuration's rules changed since the saved table: the file wins; the saved table is kept",
			zap.Uint64("saved_generation", saved.Generation), zap.String("kept", st.Path()+"/"+state.PrevFile), zap.Uint64("generation", gen))
	case state.Fresh:
		log.Info("--fresh: starting from the configuration's rules", zap.Uint64("saved_generation", saved.Generation), zap.Uint64("generation", gen))
	default:
		log.Info("no saved table: starting from the configuration's rules", zap.String("state", st.Path()), zap.Uint64("generation", gen))
	}
	d.record(gen, old, cfgRules, state.Self("start"))
	return nil
}

// record writes a commit to the state dir (none: nothing to do). A failed
// write is logged: the commit stands, but would be lost at a restart.
func (d *Daemon) record(gen uint64, old, new []*rules.Rule, who state.Who) {
	if d.st == nil {
		return
	}
	d.recMu.Lock()
	defer d.recMu.Unlock()
	t := &state.Table{Header: state.Header{Generation: gen, Time: time.Now(), Who: who, Digest: d.digest}, Lines: state.Lines(new)}
	if err := d.st.Commit(t, state.Lines(old)); err != nil {
		d.log.Error("the commit is not saved: a restart would lose it", zap.Uint64("generation", gen), zap.Error(err))
	}
}

// resolveNames resolves the host names of c's rules (their backends by
// name): one that does not resolve is a validation error at its line, as
// a bad rule is ("FILE:LINE: tcp 0.0.0.0:80 -> web:80: target web: lookup
// web: no such host"; exit 2). A saved table resumed at start is resolved by
// its apply.
func resolveNames(c *config.Config, e *engine.Engine) error {
	rs := c.RuleList()
	i, err := e.Resolve(rs)
	if err == nil {
		return nil
	}
	return rules.ErrorList{{File: c.File, Line: c.Rules[i].Line, Msg: fmt.Sprintf("%s: %v", rs[i], err)}}
}
