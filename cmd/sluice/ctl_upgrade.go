package main

import (
	"context"
	"fmt"
	"time"

	"github.com/sluice-proxy/sluice/ctl"
)

// upgradeSlack is how much longer than its --timeout the command waits for
// the daemon's answer: a successor that failed is stopped (SIGTERM, then
// SIGKILL after 3s) before the answer.
const upgradeSlack = 15 * time.Second

// upgrade asks the daemon to start its successor (--binary, default its
// own executable) on the same sockets and waits for the outcome: 0 the
// successor serves, the old process drains; 3 the successor was not ready
// within --timeout, or exited, and was stopped (its last log lines
// printed; the old process serves on); 4 an upgrade is under way, the
// process an earlier one replaced still drains, or a writer holds the
// socket; 1 otherwise.
func (x *ctlCmd) upgrade() error {
	c, err := x.openFeatureHello(ctl.IntentUpgrade, ctl.FeatureUpgrade)
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), x.timeout+upgradeSlack)
	defer cancel()
	if _, err := c.Pifs(ctx); err != nil {
		return fmt.Errorf("%s: %w", x.sock, err)
	}
	u, err := c.Upgrade(ctx, x.binary, x.timeout)
	switch ctl.CodeOf(err) {
	case ctl.CodeUpgradeFailed:
		return &exitError{exitRollback, fmt.Errorf("upgrade failed: %w", err)}
	case ctl.CodeUpgrading:
		return &exitError{exitBusy, fmt.Errorf("upgrade refused: %w", err)}
	}
	if err != nil {
		return fmt.Errorf("%s: %w", x.sock, err)
	}
	fmt.Fprintf(x.out, "upgraded: pid %d serves generation %d on the same sockets; pid %d drains its live sessions and exits\n",
		u.NewPID, u.Generation, u.OldPID)
	return nil
}
