package ctl

import (
	"os"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/ctl/ctltest"
)

// descEngine says which daemon it runs in.
type descEngine struct {
	*ctltest.Engine
	started time.Time
}

var _ Described = (*descEngine)(nil)

func (e *descEngine) Described() (string, time.Time) { return "v1.2.3 (rev 0123456789ab)", e.started }

// STATUS in version 6 carries the daemon's version, pid, start and uptime
// and its state; an older client reads STATUS exactly as before: the same
// fields, none of version 6's (nor of 4 and 3, below their version).
func TestStatusProcess(t *testing.T) {
	started := time.Now().Add(-90 * time.Minute)
	eng := &descEngine{Engine: ctltest.New(4, nil, mustRules(t, oldRule)...), started: started}
	eng.SetSessions(2)
	_, path := startServer(t, eng, nil)
	st := readStatus(t, path)
	if st.Version != "v1.2.3 (rev 0123456789ab)" || st.PID != os.Getpid() || st.State != StateServing || st.DrainLeft != 0 {
		t.Fatalf("status in version %d: %+v", MaxVersion, st)
	}
	if !st.Started.Equal(started.Truncate(time.Millisecond)) {
		t.Errorf("started %s, want %s", st.Started, started)
	}
	if st.Uptime < 90*time.Minute || st.Uptime > 91*time.Minute {
		t.Errorf("uptime %s, want 90m and a little", st.Uptime)
	}
	base := *st
	base.Version, base.PID, base.Started, base.Uptime, base.State = "", 0, time.Time{}, 0, 0
	for _, v := range []uint8{Version5, Version4, Version3, Version2, Version1} {
		want := base
		if v < Version4 {
			want.PendingGen, want.PendingRules, want.PendingPorts = 0, 0, 0
		}
		if v < Version3 {
			want.BootID, want.ConfirmGen, want.ConfirmLeft = 0, 0, 0
		}
		if got := statusV(t, path, v); *got != want {
			t.Errorf("status in version %d: %+v, want %+v", v, got, want)
		}
	}
}

// Drain: the writer's open transaction, or a pending commit-confirmed one,
// is rolled back while the engine still runs; from then on status, pifs,
// list, list-pending, sessions, stats and watch are served (status says
// draining and the time left), a watcher opened before stays open, and
// every intent that changes the daemon is refused with draining, as is
// the daemon's own Hold (its reload); Close then ends the watcher with
// shutting-down.
func TestDrain(t *testing.T) {
	for _, confirmLater := range []bool{false, true} {
		name := "open transaction"
		if confirmLater {
			name = "commit-confirmed pending"
		}
		t.Run(name, func(t *testing.T) {
			eng := ctltest.New(1, nil, mustRules(t, oldRule)...)
			s, path := startServer(t, eng, nil)
			ctx := ctxT(t)
			watcher := mustDial(t, ctx, path, Options{})
			defer watcher.Close()
			if err := watcher.Hello(ctx, IntentWatch); err != nil {
				t.Fatal(err)
			}
			if _, err := watcher.Pifs(ctx); err != nil {
				t.Fatal(err)
			}
			if err := watcher.Watch(ctx, []string{"rules"}); err != nil {
				t.Fatal(err)
			}
			if ev, err := watcher.NextEvent(ctx); err != nil || ev.Type != "state" {
				t.Fatalf("watch state: %+v, %v", ev, err)
			}
			w, tb := dialWrite(t, path, Options{})
			defer w.Close()
			if _, err := w.Load(ctx, tb.Generation, mustRules(t, oldRule, newRule)); err != nil {
				t.Fatal(err)
			}
			if _, err := w.Apply(ctx, time.Minute); err != nil {
				t.Fatal(err)
			}
			if confirmLater {
				if _, err := w.Leave(ctx); err != nil {
					t.Fatal(err)
				}
			}
			if ev, err := watcher.NextEvent(ctx); err != nil || ev.Type != "applied" {
				t.Fatalf("watch: %+v, %v", ev, err)
			}
			s.Drain(time.Now().Add(time.Minute))
			if eng.Pending() {
				t.Fatal("an apply is still pending after Drain returned")
			}
			if _, _, rb := eng.Counts(); rb != 1 {
				t.Fatalf("%d rollbacks, want 1", rb)
			}
			if !confirmLater {
				_, err := w.Commit(ctx)
				wantCode(t, err, CodeShuttingDown)
			}
			if ev, err := watcher.NextEvent(ctx); err != nil || ev.Type != "rolled-back" {
				t.Fatalf("watch during the drain: %+v, %v", ev, err)
			}

			st := readStatus(t, path)
			if st.State != StateDraining || st.DrainLeft < 50*time.Second || st.DrainLeft > time.Minute || st.Writer ||
				st.ConfirmGen != 0 || st.PendingGen != 0 || st.Generation != 1 {
				t.Fatalf("status while draining: %+v", st)
			}
			if _, l := dialTable(t, path, Options{}, IntentList); l.Generation != 1 || len(l.Lines) != 1 {
				t.Fatalf("list while draining: %+v", l)
			}
			x := mustDial(t, ctx, path, Options{})
			wantCode(t, x.Hello(ctx, IntentListPending), CodeNoPending)
			x.Close()
			sc := mustDial(t, ctx, path, Options{})
			if err := sc.Hello(ctx, IntentSessions); err != nil {
				t.Fatal(err)
			}
			if _, err := sc.Pifs(ctx); err != nil {
				t.Fatal(err)
			}
			if _, err := sc.Sessions(ctx, "", 0); err != nil {
				t.Fatalf("sessions while draining: %v", err)
			}
			sc.Close()
			stc := mustDial(t, ctx, path, Options{})
			if err := stc.Hello(ctx, IntentStats); err != nil {
				t.Fatal(err)
			}
			if _, err := stc.Stats(ctx); err != nil {
				t.Fatalf("stats while draining: %v", err)
			}
			stc.Close()
			late := mustDial(t, ctx, path, Options{})
			defer late.Close()
			if err := late.Hello(ctx, IntentWatch); err != nil {
				t.Fatalf("a watcher while draining: %v", err)
			}

			for _, intent := range []Intent{IntentWrite, IntentReload, IntentConfirm, IntentRollback, IntentUpgrade} {
				c := mustDial(t, ctx, path, Options{})
				wantCode(t, c.Hello(ctx, intent), CodeDraining)
				c.Close()
			}
			_, err := s.Hold()
			wantCode(t, err, CodeDraining)

			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			_, err = watcher.NextEvent(ctx)
			wantCode(t, err, CodeShuttingDown)
		})
	}
}
