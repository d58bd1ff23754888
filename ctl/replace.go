package ctl

import (
	"context"

	"github.com/sluice-proxy/sluice/rules"
)

// Replace runs one whole writing transaction on a fresh client: hello,
// pifs, list, load rs on the generation just listed, apply, then commit (or,
// with rollback, roll back). It is the library's one-call form of
// `sluice ctl apply`, for programs and tests that do not need to look
// between the steps.
//
// It returns the apply's summary (the verdict is the caller's to judge: a
// bad one is committed too unless rollback is set) and the first error.
func (c *Client) Replace(ctx context.Context, rs []*rules.Rule, rollback bool) (*Summary, error) {
	if err := c.Hello(ctx, IntentWrite); err != nil {
		return nil, err
	}
	if _, err := c.Pifs(ctx); err != nil {
		return nil, err
	}
	tb, err := c.List(ctx)
	if err != nil {
		return nil, err
	}
	if _, err := c.Load(ctx, tb.Generation, rs); err != nil {
		return nil, err
	}
	sum, err := c.Apply(ctx, 0)
	if err != nil {
		return nil, err
	}
	if rollback {
		_, err = c.Rollback(ctx)
	} else {
		_, err = c.Commit(ctx)
	}
	return sum, err
}
