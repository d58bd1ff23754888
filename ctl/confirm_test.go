package ctl

import (
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/ctl/ctltest"
	"github.com/sluice-proxy/sluice/rules"
)

// stateEngine is the in-memory engine with the daemon's hooks: a history,
// a reload, and a confirm watcher.
type stateEngine struct {
	*ctltest.Engine
	history  []string
	noState  bool
	reload   func(Who) (*Reload, error)
	deadline atomic.Int64 // the last ConfirmPending's, Unix ms; 0: ended
	recorded atomic.Int32
}

var (
	_ Historian      = (*stateEngine)(nil)
	_ Reloader       = (*stateEngine)(nil)
	_ ConfirmWatcher = (*stateEngine)(nil)
	_ CommitRecorder = (*stateEngine)(nil)
)

func (e *stateEngine) History(n int) ([]string, error) {
	if e.noState {
		return nil, ErrNoState
	}
	h := e.history
	if len(h) > n {
		h = h[len(h)-n:]
	}
	return h, nil
}

func (e *stateEngine) Reload(w Who) (*Reload, error) { return e.reload(w) }

func (e *stateEngine) ConfirmPending(gen uint64, deadline time.Time) {
	if deadline.IsZero() {
		e.deadline.Store(0)
		return
	}
	e.deadline.Store(deadline.UnixMilli())
}

func (e *stateEngine) Committed(Commit) { e.recorded.Add(1) }

func dialHistory(t *testing.T, path string) *Client {
	t.Helper()
	c := mustDial(t, ctxT(t), path, Options{})
	if err := c.Hello(ctxT(t), IntentHistory); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Pifs(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	return c
}

func TestHistory(t *testing.T) {
	eng := &stateEngine{Engine: ctltest.New(3, nil), history: []string{`{"generation":1}`, `{"generation":2}`, `{"generation":3}`}}
	_, path := startServer(t, eng, nil)
	for _, tc := range []struct {
		n    int
		want int
	}{{0, 3}, {2, 2}, {5, 3}} {
		c := dialHistory(t, path)
		got, err := c.History(ctxT(t), tc.n)
		c.Close()
		if err != nil || len(got) != tc.want || got[len(got)-1] != `{"generation":3}` {
			t.Fatalf("History(%d) = %q, %v", tc.n, got, err)
		}
	}
	// An entry too long for a frame comes without its lines.
	long := `{"generation":4,"added":["` + strings.Repeat("x", maxHistoryText) + `"],"removed":["a","b"]}`
	eng.history = append(eng.history, long)
	c := dialHistory(t, path)
	got, err := c.History(ctxT(t), 1)
	c.Close()
	if err != nil || len(got) != 1 || got[0] != `{"generation":4,"omitted":{"added":1,"changed":0,"removed":2}}` {
		t.Fatalf("a long entry: %.200q, %v", got, err)
	}
	// No state dir: a clear error.
	eng.noState = true
	c = dialHistory(t, path)
	_, err = c.History(ctxT(t), 0)
	c.Close()
	if e := wantCode(t, err, CodeNoState); !strings.Contains(e.Msg, "--state") {
		t.Fatalf("no state: %v", e)
	}
	// A bare engine has no history either.
	_, path = startServer(t, ctltest.New(1, nil), nil)
	c = dialHistory(t, path)
	_, err = c.History(ctxT(t), 0)
	c.Close()
	wantCode(t, err, CodeNoState)
}

func TestReloadIntent(t *testing.T) {
	eng := &stateEngine{Engine: ctltest.New(3, nil, mustRules(t, oldRule)...)}
	_, path := startServer(t, eng, nil)
	reload := func() (*ReloadResult, error) {
		c := mustDial(t, ctxT(t), path, Options{})
		defer c.Close()
		if err := c.Hello(ctxT(t), IntentReload); err != nil {
			return nil, err
		}
		return c.Reload(ctxT(t))
	}
	eng.reload = func(w Who) (*Reload, error) {
		if w.UID != 0 && w.PID == 0 {
			t.Errorf("who %v", w)
		}
		return &Reload{Outcome: ReloadUnchanged, Generation: 3, Restart: []string{"loops changed"}}, nil
	}
	r, err := reload()
	if err != nil || r.Outcome != ReloadUnchanged || r.Generation != 3 || r.Summary != nil || len(r.Restart) != 1 {
		t.Fatalf("unchanged: %+v, %v", r, err)
	}
	sum := &rules.Summary{Generation: 3, Rules: []rules.RuleResult{{Rule: oldRule, Listen: "tcp 0.0.0.0:8080", Requested: 1,
		Failed: []rules.PortError{{Port: 8080, Errno: 98, Msg: "address already in use"}}}}}
	eng.reload = func(Who) (*Reload, error) {
		return &Reload{Outcome: ReloadRolledBack, Generation: 3, Summary: sum}, nil
	}
	r, err = reload()
	if err != nil || r.Outcome != ReloadRolledBack || r.Summary == nil || r.Summary.OK || len(r.Summary.Failures()) != 1 {
		t.Fatalf("rolled back: %+v, %v", r, err)
	}
	eng.reload = func(Who) (*Reload, error) {
		return nil, &Error{Code: CodeInvalidTable, Index: -1, Msg: "f.yaml:3: bad"}
	}
	_, err = reload()
	wantCode(t, err, CodeInvalidTable)
	// A bare engine reloads nothing.
	_, path = startServer(t, ctltest.New(1, nil), nil)
	_, err = reload()
	wantCode(t, err, CodeNoReload)
}

// leave applies newRule with confirm and leaves it pending.
func leave(t *testing.T, path string, confirm time.Duration) *Pending {
	t.Helper()
	c, tb := dialWrite(t, path, Options{})
	defer c.Close()
	if _, err := c.Load(ctxT(t), tb.Generation, mustRules(t, newRule)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Apply(ctxT(t), confirm); err != nil {
		t.Fatal(err)
	}
	p, err := c.Leave(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func endPendingBy(t *testing.T, path string, commit bool) (uint64, *Summary, error) {
	t.Helper()
	intent := IntentRollback
	if commit {
		intent = IntentConfirm
	}
	c := mustDial(t, ctxT(t), path, Options{})
	defer c.Close()
	if err := c.Hello(ctxT(t), intent); err != nil {
		return 0, nil, err
	}
	if commit {
		g, err := c.Confirm(ctxT(t))
		return g, nil, err
	}
	s, err := c.RolledBack(ctxT(t))
	return 0, s, err
}

func mustStatus(t *testing.T, path string) *Status {
	t.Helper()
	st, err := QueryStatus(ctxT(t), path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// A commit-confirmed apply outlives its connection: busy meanwhile (with
// the time left), shown in STATUS, then confirmed or rolled back from
// another connection, or rolled back at its deadline or by Close.
func TestConfirmLater(t *testing.T) {
	t.Run("confirm", func(t *testing.T) {
		eng := &stateEngine{Engine: ctltest.New(3, nil, mustRules(t, oldRule)...)}
		s, path := startServer(t, eng, nil)
		p := leave(t, path, time.Minute)
		if p.Generation != 4 || p.Left <= 50*time.Second || p.Left > time.Minute {
			t.Fatalf("pending %+v", p)
		}
		if !eng.Pending() || eng.deadline.Load() == 0 || eng.recorded.Load() != 0 {
			t.Fatal("the apply is not pending, or not shown, or recorded too soon")
		}
		c := mustDial(t, ctxT(t), path, Options{})
		err := c.Hello(ctxT(t), IntentWrite)
		c.Close()
		if e := wantCode(t, err, CodeBusy); !strings.Contains(e.Msg, "generation 4") || !strings.Contains(e.Msg, "rolls back by itself in") {
			t.Fatalf("busy: %q", e.Msg)
		}
		if _, err := s.Hold(); CodeOf(err) != CodeBusy {
			t.Fatalf("Hold: %v", err)
		}
		if st := mustStatus(t, path); st.ConfirmGen != 4 || st.ConfirmLeft <= 50*time.Second || !st.Writer {
			t.Fatalf("status %+v", st)
		}
		gen, _, err := endPendingBy(t, path, true)
		if err != nil || gen != 4 {
			t.Fatalf("confirm: %d, %v", gen, err)
		}
		wantLines(t, eng.Engine, newRule)
		if eng.Pending() || eng.deadline.Load() != 0 || eng.recorded.Load() != 1 {
			t.Fatal("after confirm: still pending, or shown, or not recorded")
		}
		if st := mustStatus(t, path); st.ConfirmGen != 0 || st.Writer {
			t.Fatalf("status after %+v", st)
		}
		if _, _, err := endPendingBy(t, path, true); CodeOf(err) != CodeNoPending {
			t.Fatalf("a second confirm: %v", err)
		}
		if o := eng.Outcomes(); len(o) != 1 || o[0] != TxnCommitted {
			t.Fatalf("outcomes %v", o)
		}
		waitIdle(t, s)
	})
	t.Run("rollback", func(t *testing.T) {
		eng := &stateEngine{Engine: ctltest.New(3, nil, mustRules(t, oldRule)...)}
		_, path := startServer(t, eng, nil)
		leave(t, path, time.Minute)
		_, sum, err := endPendingBy(t, path, false)
		if err != nil || sum.Generation != 3 {
			t.Fatalf("rollback: %+v, %v", sum, err)
		}
		wantLines(t, eng.Engine, oldRule)
		if o := eng.Outcomes(); len(o) != 1 || o[0] != TxnRolledBack {
			t.Fatalf("outcomes %v", o)
		}
		// The slot is free again.
		c, _ := dialWrite(t, path, Options{})
		c.Close()
	})
	t.Run("deadline", func(t *testing.T) {
		eng := &stateEngine{Engine: ctltest.New(3, nil, mustRules(t, oldRule)...)}
		_, path := startServer(t, eng, nil)
		leave(t, path, 300*time.Millisecond)
		waitFor(t, "the rollback at the deadline", func() bool { return !eng.Pending() })
		wantLines(t, eng.Engine, oldRule)
		waitFor(t, "the slot freed", func() bool { return !mustStatus(t, path).Writer })
		if eng.deadline.Load() != 0 {
			t.Fatal("still shown as pending")
		}
	})
	t.Run("close", func(t *testing.T) {
		eng := &stateEngine{Engine: ctltest.New(3, nil, mustRules(t, oldRule)...)}
		s, path := startServer(t, eng, nil)
		leave(t, path, time.Minute)
		if err := s.Close(); err != nil && !errors.Is(err, errClosing) {
			t.Log(err)
		}
		if eng.Pending() {
			t.Fatal("Close returned with the apply pending")
		}
		wantLines(t, eng.Engine, oldRule)
	})
	t.Run("nothing pending", func(t *testing.T) {
		_, path := startServer(t, ctltest.New(1, nil), nil)
		if _, _, err := endPendingBy(t, path, false); CodeOf(err) != CodeNoPending {
			t.Fatalf("rollback: %v", err)
		}
	})
}
