package ctl

import (
	"slices"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/ctl/ctltest"
)

// Issue 15, item 10: a writer may not hold the writer slot by trickling its
// load. An empty LOAD chunk that is not the last is refused at once.
func TestLoadEmptyChunkRefused(t *testing.T) {
	eng := ctltest.New(1, nil, mustRules(t, oldRule)...)
	s, path := startServer(t, eng, func(c *config) { c.ioTimeout = 300 * time.Millisecond })
	r := dialRaw(t, path, true)
	gen := r.hello(2, IntentWrite)
	r.openChunk(gen, 0) // no line, not the last: carries nothing
	r.expectError(CodeEmptyChunk)
	waitIdle(t, s)
	// A chunk with lines, then an empty last one, is still a load.
	c, tb := dialWrite(t, path, Options{})
	if _, err := c.Load(ctxT(t), tb.Generation, mustRules(t, oldRule, newRule)); err != nil {
		t.Fatal(err)
	}
	c.Close()
}

// Item 10: chunks that each arrive within the I/O timeout cannot stretch
// a load past its own deadline.
func TestLoadDeadline(t *testing.T) {
	eng := ctltest.New(1, nil, mustRules(t, oldRule)...)
	const io, whole = 300 * time.Millisecond, time.Second
	s, path := startServer(t, eng, func(c *config) { c.ioTimeout = io; c.loadTimeout = whole })
	r := dialRaw(t, path, true)
	gen := r.hello(2, IntentWrite)
	start := time.Now()
	go func() {
		// One new rule a chunk, each well inside the I/O timeout, until
		// the server cuts the load off (or 4096 rules, minutes later).
		for i := 0; i < 4000; i++ {
			line := "tcp 0.0.0.0:" + itoa(20000+i) + " -> 127.0.0.1:80"
			if err := r.tryChunk(gen, 0, line); err != nil {
				return
			}
			time.Sleep(io / 3)
		}
	}()
	e := r.expectError(CodeTimeout)
	took := time.Since(start)
	if took < whole-50*time.Millisecond || took > whole+2*time.Second {
		t.Fatalf("load cut off after %s (%v), want about %s", took, e, whole)
	}
	waitIdle(t, s)
	c, _ := dialWrite(t, path, Options{}) // the slot is free
	c.Close()
	t.Logf("a load trickled one chunk every %s was cut off after %s: %v", io/3, took.Round(time.Millisecond), e)
}

// Item 11: watchers are long-lived and do not count against max-clients;
// with as many watchers as max-clients a writer and a reader still get in.
func TestWatchersDoNotLockOutWriter(t *testing.T) {
	eng := ctltest.New(1, nil, mustRules(t, oldRule)...)
	const n = 4
	s, path := startServer(t, eng, func(c *config) { c.maxClients = n; c.maxWatchers = n })
	for i := 0; i < n; i++ {
		dialWatch(t, path, "rules")
	}
	if h := s.hello.Limits; h.MaxWatchers != n || h.MaxClients != n {
		t.Fatalf("the hello advertises max-clients %d, max-watchers %d", h.MaxClients, h.MaxWatchers)
	}
	ctx := ctxT(t)
	st := mustDial(t, ctx, path, Options{})
	defer st.Close()
	if err := st.Hello(ctx, IntentStatus); err != nil {
		t.Fatalf("a reader beside %d watchers: %v", n, err)
	}
	c, err := Dial(ctx, path, Options{})
	if err != nil {
		t.Fatalf("a writer beside %d watchers: %v", n, err)
	}
	defer c.Close()
	if err := c.Hello(ctx, IntentWrite); err != nil {
		t.Fatalf("a writer beside %d watchers: %v", n, err)
	}
	// Watchers have their own bound: one more is refused at its hello.
	x := mustDial(t, ctx, path, Options{})
	defer x.Close()
	wantCode(t, x.Hello(ctx, IntentWatch), CodeTooManyClients)
}

// Item 11: the slot kept past max-clients is a writer's: with max-clients
// connections open, a writer still gets in, a reader does not.
func TestWriterSlotPastMaxClients(t *testing.T) {
	eng := ctltest.New(1, nil, mustRules(t, oldRule)...)
	const n = 3
	s, path := startServer(t, eng, func(c *config) { c.maxClients = n })
	for i := 0; i < n; i++ {
		dialRaw(t, path, true) // before their hellos: readers or writers to be
	}
	ctx := ctxT(t)
	r := mustDial(t, ctx, path, Options{})
	wantCode(t, r.Hello(ctx, IntentStatus), CodeTooManyClients)
	r.Close()
	waitFor(t, "the refused reader to be gone", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return len(s.conns) == n
	})
	c, _ := dialWrite(t, path, Options{})
	c.Close()
}

// Item 12: between apply and commit, list shows the committed table under
// its generation, not the applied one under the old generation.
func TestListDuringPendingApply(t *testing.T) {
	eng := ctltest.New(1, nil, mustRules(t, oldRule)...)
	_, path := startServer(t, eng, nil)
	ctx := ctxT(t)
	w, tb := dialWrite(t, path, Options{})
	if _, err := w.Load(ctx, tb.Generation, mustRules(t, oldRule, newRule)); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Apply(ctx, 0); err != nil {
		t.Fatal(err)
	}
	_, l := dialTable(t, path, Options{}, IntentList)
	if l.Generation != 1 || !slices.Equal(l.Lines, []string{oldRule}) {
		t.Fatalf("list during a pending apply: generation %d %q, want the committed table: generation 1 [%q]", l.Generation, l.Lines, oldRule)
	}
	// status says so: the committed table, and apart the pending one.
	st := readStatus(t, path)
	if st.Generation != 1 || st.Rules != 1 || st.PendingGen != 2 || st.PendingRules != 2 || st.PendingPorts != 2 {
		t.Fatalf("status during a pending apply: %+v", st)
	}
	// list-pending asks for the applied table, under the generation it
	// gets if committed.
	_, p := dialTable(t, path, Options{}, IntentListPending)
	if p.Generation != 2 || !slices.Equal(p.Lines, []string{oldRule, newRule}) {
		t.Fatalf("list-pending: generation %d %q", p.Generation, p.Lines)
	}
	// A version 3 client reads STATUS as before.
	if st := statusV(t, path, Version3); st.Generation != 1 || st.PendingGen != 0 {
		t.Fatalf("status in version 3: %+v", st)
	}
	if _, err := w.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if st := readStatus(t, path); st.Generation != 2 || st.Rules != 2 || st.PendingGen != 0 {
		t.Fatalf("status after the commit: %+v", st)
	}
	x := mustDial(t, ctx, path, Options{})
	defer x.Close()
	wantCode(t, x.Hello(ctx, IntentListPending), CodeNoPending)
	_, l = dialTable(t, path, Options{}, IntentList)
	if l.Generation != 2 || !slices.Equal(l.Lines, []string{oldRule, newRule}) {
		t.Fatalf("list after the commit: generation %d %q", l.Generation, l.Lines)
	}
}

// Item 12 with commit-confirmed: a transaction left pending by LEAVE is an
// apply that awaits its commit; list shows the committed table until the
// confirm.
func TestListDuringPendingConfirm(t *testing.T) {
	eng := ctltest.New(1, nil, mustRules(t, oldRule)...)
	_, path := startServer(t, eng, nil)
	ctx := ctxT(t)
	w, tb := dialWrite(t, path, Options{})
	if _, err := w.Load(ctx, tb.Generation, mustRules(t, newRule)); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Apply(ctx, time.Minute); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Leave(ctx); err != nil {
		t.Fatal(err)
	}
	w.Close()
	_, l := dialTable(t, path, Options{}, IntentList)
	if l.Generation != 1 || !slices.Equal(l.Lines, []string{oldRule}) {
		t.Fatalf("list during a pending confirm: generation %d %q", l.Generation, l.Lines)
	}
	st := readStatus(t, path)
	if st.PendingGen != 2 || st.ConfirmGen != 2 || st.PendingRules != 1 {
		t.Fatalf("status during a pending confirm: %+v", st)
	}
	c := mustDial(t, ctx, path, Options{})
	defer c.Close()
	if err := c.Hello(ctx, IntentConfirm); err != nil {
		t.Fatal(err)
	}
	_, l = dialTable(t, path, Options{}, IntentList)
	if l.Generation != 2 || !slices.Equal(l.Lines, []string{newRule}) {
		t.Fatalf("list after the confirm: generation %d %q", l.Generation, l.Lines)
	}
}

func readStatus(t *testing.T, path string) *Status { return statusV(t, path, 0) }

func statusV(t *testing.T, path string, ver uint8) *Status {
	t.Helper()
	ctx := ctxT(t)
	c := mustDial(t, ctx, path, Options{Version: ver})
	defer c.Close()
	if err := c.Hello(ctx, IntentStatus); err != nil {
		t.Fatal(err)
	}
	st, err := c.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return st
}
