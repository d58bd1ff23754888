package ctl

// This file holds intent reload: the daemon re-reads its configuration file
// and applies its rules as one transaction, through the Reloader its Engine
// implements. The server answers the hello with the apply's SUMMARY (none
// when the file's rules are the active ones), then RELOADED: the outcome,
// the generation, and the keys of the file that changed but need a restart.

import (
	"context"
	"fmt"
	"strconv"

	"github.com/sluice-proxy/sluice/rules"
)

// Reloader is implemented by an Engine that can re-read its configuration
// (the daemon). Reload runs the whole transaction — load and validate the
// file, take the writer slot, apply, commit on a good verdict or else roll
// back — and returns how it ended. Its error is an *Error: CodeBusy (a
// writer holds the slot), CodeInvalidTable (the file does not load or
// validate: the message has every FILE:LINE: message line), CodeNoReload
// (no file to re-read), CodeApplyFailed.
type Reloader interface {
	Reload(who Who) (*Reload, error)
}

// ReloadOutcome is how a reload ended.
type ReloadOutcome uint8

const (
	ReloadUnchanged  ReloadOutcome = 0 // the file's rules are the active table: nothing applied
	ReloadCommitted  ReloadOutcome = 1 // applied, verdict good, committed
	ReloadRolledBack ReloadOutcome = 2 // applied, verdict bad, rolled back: the old table serves
	reloadOutcomes                 = 3
)

var reloadOutcomeNames = [reloadOutcomes]string{"unchanged", "committed", "rolled-back"}

func (o ReloadOutcome) String() string {
	if int(o) < len(reloadOutcomeNames) {
		return reloadOutcomeNames[o]
	}
	return "outcome-" + strconv.Itoa(int(o))
}

// Reload is how a reload ended.
type Reload struct {
	Outcome    ReloadOutcome
	Generation uint64         // committed: the new one; else the active one
	Summary    *rules.Summary // the apply's summary; nil when unchanged (the server's side)
	// Restart lists what changed in the file but is read only at start,
	// one line each ("loops: 2 -> 4 (needs a restart)").
	Restart []string
}

// ReloadResult is a reload as the client reads it.
type ReloadResult struct {
	Outcome    ReloadOutcome
	Generation uint64
	Summary    *Summary // the apply's bind summary; nil when unchanged
	Restart    []string
}

// Bounds of RELOADED.
const (
	maxRestart     = 64
	maxRestartText = 256
)

func (fw *frameWriter) writeReloaded(ver uint8, r *Reload) error {
	fw.start(ver, MsgReloaded)
	fw.u8(uint8(r.Outcome))
	fw.u64(r.Generation)
	n := min(len(r.Restart), maxRestart)
	fw.u8(uint8(n))
	for _, s := range r.Restart[:n] {
		fw.str(truncate(s, maxRestartText), maxRestartText, "restart key")
	}
	return fw.finish()
}

func decodeReloaded(f frame) (*ReloadResult, error) {
	d := newDec(f)
	r := &ReloadResult{Outcome: ReloadOutcome(d.u8("outcome")), Generation: d.u64("generation")}
	if d.err == nil && r.Outcome >= reloadOutcomes {
		d.fail(CodeBadValue, "outcome %d", r.Outcome)
	}
	n := d.count(int(d.u8("restart count")), maxRestart, 2, "restart keys")
	for i := 0; i < n && d.err == nil; i++ {
		r.Restart = append(r.Restart, d.str(maxRestartText, "restart key"))
	}
	return r, d.end()
}

// reload serves intent reload.
func (cc *ctlConn) reload() error {
	rl, ok := cc.s.eng.(Reloader)
	if !ok {
		return errorf(CodeNoReload, "this daemon has no configuration file to reload")
	}
	r, err := rl.Reload(cc.who)
	if err != nil {
		return err
	}
	if r.Summary != nil {
		if err := cc.send(func() error { return cc.w.writeSummary(cc.ver, summaryFrom(r.Summary)) }); err != nil {
			return err
		}
	}
	return cc.send(func() error { return cc.w.writeReloaded(cc.ver, r) })
}

// Reload reads how the reload the hello asked for (IntentReload) ended:
// Hello returns once the daemon has run it.
func (c *Client) Reload(ctx context.Context) (*ReloadResult, error) {
	var out *ReloadResult
	err := c.call(ctx, stepHello, func() error {
		if c.intent != IntentReload {
			return fmt.Errorf("ctl: Reload on a connection for %s", c.intent)
		}
		f := *c.next
		c.next = nil
		var sum *Summary
		if f.typ == MsgSummary {
			var err error
			if sum, err = c.readSummaryFrom(&f); err != nil {
				return err
			}
			if f, err = c.expect(MsgReloaded); err != nil {
				return err
			}
		}
		r, err := decodeReloaded(f)
		if err != nil {
			return err
		}
		r.Summary = sum
		out = r
		c.step = stepDone
		return nil
	})
	return out, err
}
