package ctl

import (
	"testing"

	"github.com/sluice-proxy/sluice/ctl/ctltest"
)

// A transaction is over for its client once it has the answer to its
// commit or rollback: the next writer, right behind it, is never told busy
// (a script running `sluice ctl add` twice in a row must not exit 4).
func TestWriterSlotFreeAfterAnswer(t *testing.T) {
	eng := ctltest.New(1, nil, mustRules(t, oldRule)...)
	_, path := startServer(t, eng, nil)
	tables := [2][]string{{oldRule, newRule}, {oldRule}}
	for i := range 200 {
		ctx := ctxT(t)
		c := mustDial(t, ctx, path, Options{})
		if err := c.Hello(ctx, IntentWrite); err != nil {
			t.Fatalf("transaction %d, right after the previous one: %v", i, err)
		}
		c.Pifs(ctx)
		tb, err := c.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Load(ctx, tb.Generation, mustRules(t, tables[i%2]...)); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Apply(ctx, 0); err != nil {
			t.Fatal(err)
		}
		if i%3 == 2 { // a rollback ends a transaction too
			_, err = c.Rollback(ctx)
		} else {
			_, err = c.Commit(ctx)
		}
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
}
