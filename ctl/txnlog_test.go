package ctl

import (
	"context"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/sluice-proxy/sluice/ctl/ctltest"
)

// An apply with a bad verdict, rolled back by its client, is logged with
// the ports that failed and their errnos, at the apply and at the rollback.
func TestRollbackLogNamesFailures(t *testing.T) {
	eng := ctltest.New(1, nil, mustRules(t, "tcp 0.0.0.0:8080 -> 127.0.0.1:80")...)
	eng.FailPort(9090, syscall.EADDRINUSE)
	core, logs := observer.New(zap.InfoLevel)
	path := filepath.Join(shortDir(t), "ctl.sock")
	s, err := serve(context.Background(), path, eng, zap.New(core), testConfig())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	c, tb := dialWrite(t, path, Options{})
	ctx := ctxT(t)
	if _, err := c.Load(ctx, tb.Generation, mustRules(t, "tcp 0.0.0.0:8080 -> 127.0.0.1:80", "tcp 0.0.0.0:9090 -> 127.0.0.1:90")); err != nil {
		t.Fatal(err)
	}
	if sum, err := c.Apply(ctx, time.Minute); err != nil || sum.OK {
		t.Fatalf("apply: %+v, %v; want a bad verdict", sum, err)
	}
	if _, err := c.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	want := []string{"tcp 0.0.0.0:9090: port 9090: address already in use (EADDRINUSE)"}
	for _, msg := range []string{"table applied, waiting for commit", "table rolled back"} {
		es := logs.FilterMessage(msg).All()
		if len(es) != 1 {
			t.Fatalf("%d lines %q", len(es), msg)
		}
		got, _ := es[0].ContextMap()["failed"].([]any)
		var gs []string
		for _, g := range got {
			gs = append(gs, g.(string))
		}
		if !slices.Equal(gs, want) {
			t.Errorf("%q: failed = %q, want %q (fields %v)", msg, gs, want, es[0].ContextMap())
		}
	}
}
