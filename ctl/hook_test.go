package ctl

import (
	"errors"
	"testing"

	"github.com/sluice-proxy/sluice/ctl/ctltest"
)

// OnSent stops a client at the seam after each message it sends: the
// server got the message (an apply is rolled back, a commit stands) and the
// call that sent it fails with the hook's error. A hook that returns nil
// lets the transaction go on; OnSent refuses a message clients do not send,
// and a second arming.
func TestOnSent(t *testing.T) {
	errGone := errors.New("gone")
	for _, tc := range []struct {
		typ       MsgType
		committed bool
	}{{MsgClientHello, false}, {MsgLoad, false}, {MsgApply, false}, {MsgCommit, true}, {MsgRollback, false}} {
		t.Run(tc.typ.String(), func(t *testing.T) {
			eng := ctltest.New(1, nil, mustRules(t, oldRule)...)
			s, path := startServer(t, eng, nil)
			ctx := ctxT(t)
			ran := 0
			c := dialOnSent(t, path, tc.typ, func() error { ran++; return errGone })
			if err := c.OnSent(tc.typ, func() error { return nil }); err == nil {
				t.Fatal("OnSent armed twice")
			}
			_, err := c.Replace(ctx, mustRules(t, oldRule, newRule), tc.typ != MsgCommit)
			if !errors.Is(err, errGone) || ran != 1 {
				t.Fatalf("transaction: %v (hook ran %d times), want the hook's error", err, ran)
			}
			waitIdle(t, s)
			applies, commits, rollbacks := eng.Counts()
			switch {
			case tc.committed:
				wantLines(t, eng, oldRule, newRule)
				if commits != 1 {
					t.Fatalf("%d commits", commits)
				}
			case tc.typ == MsgApply || tc.typ == MsgRollback:
				wantLines(t, eng, oldRule)
				if applies != 1 || rollbacks != 1 {
					t.Fatalf("applies %d rollbacks %d", applies, rollbacks)
				}
			default:
				wantLines(t, eng, oldRule)
				if applies != 0 {
					t.Fatalf("%d applies", applies)
				}
			}
		})
	}

	t.Run("nil goes on", func(t *testing.T) {
		eng := ctltest.New(1, nil, mustRules(t, oldRule)...)
		_, path := startServer(t, eng, nil)
		ctx := ctxT(t)
		ran := 0
		c := dialOnSent(t, path, MsgLoad, func() error { ran++; return nil })
		if err := c.Hello(ctx, IntentWrite); err != nil {
			t.Fatal(err)
		}
		c.Pifs(ctx)
		tb, err := c.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Load(ctx, tb.Generation, mustRules(t, newRule)); err != nil || ran != 1 {
			t.Fatalf("load: %v, hook ran %d times", err, ran)
		}
		if _, err := c.Apply(ctx, 0); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Commit(ctx); err != nil || ran != 1 {
			t.Fatalf("commit: %v, hook ran %d times", err, ran)
		}
		wantLines(t, eng, newRule)
	})

	t.Run("refused", func(t *testing.T) {
		_, path := startServer(t, ctltest.New(1, nil), nil)
		ctx := ctxT(t)
		c := mustDial(t, ctx, path, Options{})
		defer c.Close()
		if err := c.OnSent(MsgSummary, func() error { return nil }); err == nil {
			t.Fatal("OnSent accepted a message the server sends")
		}
		if err := c.Hello(ctx, IntentList); err != nil {
			t.Fatal(err)
		}
		if err := c.OnSent(MsgLoad, func() error { return nil }); err == nil {
			t.Fatal("OnSent accepted after the hello")
		}
	})
}

// dialOnSent dials path and arms OnSent(typ, fn).
func dialOnSent(t *testing.T, path string, typ MsgType, fn func() error) *Client {
	t.Helper()
	c, err := Dial(ctxT(t), path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.OnSent(typ, fn); err != nil {
		t.Fatal(err)
	}
	return c
}
