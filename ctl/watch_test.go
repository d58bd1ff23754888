package ctl

import (
	"context"
	"encoding/json"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/ctl/ctltest"
	"github.com/sluice-proxy/sluice/observe"
	"github.com/sluice-proxy/sluice/rules"
)

// dialWatch opens a watch on groups and returns the client.
func dialWatch(t testing.TB, path string, groups ...string) *Client {
	t.Helper()
	ctx := ctxT(t)
	c := mustDial(t, ctx, path, Options{})
	t.Cleanup(func() { c.Close() })
	if !c.Server().Has(FeatureWatch) {
		t.Fatal("the server does not advertise watch")
	}
	if err := c.Hello(ctx, IntentWatch); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Pifs(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Watch(ctx, groups); err != nil {
		t.Fatal(err)
	}
	return c
}

// follow reads rules events until the table reaches generation final with
// nothing pending, checking that each follows from the state and the
// events before it. It returns the follower.
func follow(t testing.TB, c *Client, final uint64) observe.TableFollower {
	t.Helper()
	var f observe.TableFollower
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for !f.Started || f.Gen != final || f.Pending {
		ev, err := c.NextEvent(ctx)
		if err != nil {
			t.Fatalf("after %d events at generation %d: %v", f.Events, f.Gen, err)
		}
		if ev.Group != "rules" {
			t.Fatalf("event of group %s on a rules watch", ev.Group)
		}
		gen, ok := ev.Uint("generation")
		if !ok {
			t.Fatalf("event %s without a generation: %s", ev.Type, ev.Data)
		}
		var m struct{ Pending bool }
		if err := json.Unmarshal(ev.Data, &m); err != nil {
			t.Fatal(err)
		}
		if err := f.Next(ev.Type, gen, m.Pending); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

const (
	watchRuleA = "tcp 127.0.0.1:8080 -> 127.0.0.1:80"
	watchRuleB = "tcp 127.0.0.1:9090 -> 127.0.0.1:90"
)

// txn runs one writing transaction to lines, committed or rolled back.
func txn(path string, lines []string, rollback bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, path, Options{})
	if err != nil {
		return err
	}
	defer c.Close()
	rs := make([]*rules.Rule, len(lines))
	for i, l := range lines {
		if rs[i], err = rules.Parse(l); err != nil {
			return err
		}
	}
	_, err = c.Replace(ctx, rs, rollback)
	return err
}

// Watchers that subscribe while transactions commit and roll back in a
// loop see the state and then every change, in order: the generations join
// with no gap and no repeat (observe.TableFollower checks each step).
func TestWatchRacesTransactions(t *testing.T) {
	eng := ctltest.New(1, nil, mustRules(t, watchRuleA)...)
	_, path := startServer(t, eng, nil)
	const rounds = 60
	var wg sync.WaitGroup
	started := make(chan struct{}, rounds)
	wg.Add(1)
	go func() { // the writer: through the protocol, as the CLI does
		defer wg.Done()
		for i := 0; i < rounds; i++ {
			lines := []string{watchRuleA}
			if i%2 == 0 {
				lines = append(lines, watchRuleB)
			}
			if err := txn(path, lines, i%3 == 2); err != nil {
				t.Errorf("round %d: %v", i, err)
				return
			}
			started <- struct{}{}
		}
	}()
	// Watchers join at different points of the run.
	var watchers []*Client
	for i := 0; i < rounds; i += 12 {
		for len(started) < i/2 {
			time.Sleep(time.Millisecond)
		}
		watchers = append(watchers, dialWatch(t, path, "rules"))
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	_, commits, rollbacks := eng.Counts()
	final := eng.Generation()
	if commits != rounds-rounds/3 || rollbacks != rounds/3 || final != uint64(1+commits) {
		t.Fatalf("commits %d rollbacks %d generation %d", commits, rollbacks, final)
	}
	for i, c := range watchers {
		f := follow(t, c, final)
		t.Logf("watcher %d: %d events after its state", i, f.Events)
	}
	// A watcher of a quiet daemon gets its state and nothing else.
	if f := follow(t, dialWatch(t, path, "rules"), final); f.Events != 0 {
		t.Fatalf("a watcher of an idle daemon got %d events after its state", f.Events)
	}
}

// The state arrives first; an apply and a rollback each arrive as events,
// in order; bind failures arrive on binds.
func TestWatchApplyRollback(t *testing.T) {
	eng := ctltest.New(4, nil, mustRules(t, watchRuleA)...)
	eng.FailPort(9090, 98)
	_, path := startServer(t, eng, nil)
	w := dialWatch(t, path) // every group
	// WATCH has no answer: the state event is the proof that the server
	// subscribed the watcher, so it is read before the transaction starts
	// (else a busy server may subscribe after the events were published).
	state, err := w.NextEvent(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	c, tb := dialWrite(t, path, Options{})
	if _, err := c.Load(ctxT(t), tb.Generation, mustRules(t, watchRuleA, watchRuleB)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Apply(ctxT(t), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Rollback(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	want := []struct{ group, typ, line string }{
		{"rules", "state", `{"group":"rules","type":"state",`},
		{"rules", "applied", ""},
		{"binds", "bind-failed", ""},
		{"rules", "rolled-back", ""},
	}
	for i, wnt := range want {
		ev := state
		if i > 0 {
			if ev, err = w.NextEvent(ctxT(t)); err != nil {
				t.Fatal(err)
			}
		}
		if ev.Group != wnt.group || ev.Type != wnt.typ {
			t.Fatalf("event %d: %s/%s %s, want %s/%s", i, ev.Group, ev.Type, ev.Data, wnt.group, wnt.typ)
		}
		line, err := ev.JSON()
		if err != nil {
			t.Fatal(err)
		}
		if wnt.line != "" && string(line[:len(wnt.line)]) != wnt.line {
			t.Fatalf("JSON line %s, want it to start %s", line, wnt.line)
		}
		gen, _ := ev.Uint("generation")
		wantGen := uint64(4)
		if ev.Type == "applied" || ev.Type == "bind-failed" {
			wantGen = 5
		}
		if gen != wantGen {
			t.Fatalf("%s: generation %d, want %d", ev.Type, gen, wantGen)
		}
		if ev.Type == "bind-failed" {
			if port, _ := ev.Uint("port"); port != 9090 {
				t.Fatalf("bind-failed %s, want port 9090", ev.Data)
			}
		}
	}
}

// A watcher that does not read is cut off with slow-watcher once its queue
// overflows; publishing never waits for it, and the daemon keeps serving.
func TestSlowWatcherCutOff(t *testing.T) {
	eng := ctltest.New(1, nil)
	s, path := startServer(t, eng, func(c *config) { c.watchQueue = 32 })
	w := dialWatch(t, path, "sessions")
	fast := dialWatch(t, path, "rules")
	// Far more than the socket buffers and the queue hold; Publish returns
	// although the watcher reads nothing.
	const n = 200000
	ev := observe.Event{Group: observe.GroupSessions, Type: "start", Fields: []observe.Field{
		{Key: "rule", Value: "tcp 0.0.0.0:8080"}, {Key: "source", Value: "192.0.2.1:40000"}, {Key: "backend", Value: "127.0.0.1:80"}}}
	done := make(chan struct{})
	go func() {
		for i := 0; i < n; i++ {
			eng.Publish(ev)
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("publishing blocked on a watcher that does not read")
	}
	// The daemon serves others meanwhile: a status, a transaction whose
	// events reach the watcher that reads.
	sc, err := Dial(ctxT(t), path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	if err := sc.Hello(ctxT(t), IntentStatus); err != nil {
		t.Fatal(err)
	}
	if _, err := sc.Status(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if err := txn(path, []string{watchRuleA}, false); err != nil {
		t.Fatal(err)
	}
	follow(t, fast, 2)
	// The slow watcher, reading at last: what was queued, then the reason.
	got := 0
	for {
		_, err := w.NextEvent(ctxT(t))
		if err != nil {
			e := wantCode(t, err, CodeSlowWatcher)
			t.Logf("cut off after %d events: %v", got, e)
			break
		}
		got++
	}
	if got >= n {
		t.Fatalf("the slow watcher got all %d events: it was never cut off", got)
	}
	if s.Stats().Errors["slow-watcher"] != 1 {
		t.Fatalf("server stats %+v, want one slow-watcher error", s.Stats())
	}
	// A new watcher is served as usual.
	w2 := dialWatch(t, path, "sessions")
	waitFor(t, "the new watcher to subscribe", func() bool { return eng.Watched(observe.GroupSessions) })
	eng.Publish(ev)
	if got, err := w2.NextEvent(ctxT(t)); err != nil || got.Type != "start" {
		t.Fatalf("new watcher: %v %v", got, err)
	}
}

func TestWatchUnknownGroup(t *testing.T) {
	_, path := startServer(t, ctltest.New(1, nil), nil)
	ctx := ctxT(t)
	c := mustDial(t, ctx, path, Options{})
	defer c.Close()
	if err := c.Hello(ctx, IntentWatch); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Pifs(ctx); err != nil {
		t.Fatal(err)
	}
	// Past the library's own check: the server refuses it too.
	if err := c.send(func() error { return c.w.writeWatch(c.ver, []string{"nope"}) }); err != nil {
		t.Fatal(err)
	}
	c.step = stepWatching
	_, err := c.NextEvent(ctx)
	wantCode(t, err, CodeBadValue)
}

func TestSessionsAndStats(t *testing.T) {
	eng := ctltest.New(1, nil)
	live := []observe.Session{
		{Rule: "tcp 0.0.0.0:8080", Source: netip.MustParseAddrPort("192.0.2.7:40001"), Peer: netip.MustParseAddrPort("10.0.0.1:5555"),
			Target: netip.MustParseAddrPort("127.0.0.1:80"), State: "forwarding", Age: 1500 * time.Millisecond, Up: 1000, Down: 3000, Splice: true,
			SNI: "a.example.com", TLSVersion: "TLS 1.3", TLSCipher: "TLS_AES_128_GCM_SHA256", TLSResumed: true},
		{Rule: "tcp 0.0.0.0:9090", Source: netip.MustParseAddrPort("[2001:db8::1]:4000"), State: "handshake", Age: time.Second},
		{Rule: "tcp 0.0.0.0:8080", Source: netip.MustParseAddrPort("192.0.2.8:40002"), Target: netip.MustParseAddrPort("127.0.0.1:80"), State: "forwarding", Up: 5},
	}
	eng.SetSessionList(live)
	eng.SetCounters([]observe.Counter{{Name: "sessions", Value: 3}, {Name: "rule.tcp 0.0.0.0:8080.bytes_in", Value: 1005}, {Name: "negative", Value: -2}})
	_, path := startServer(t, eng, nil)
	listV := func(ver uint8, rule string, max int) *SessionList {
		t.Helper()
		ctx := ctxT(t)
		c := mustDial(t, ctx, path, Options{Version: ver})
		defer c.Close()
		if err := c.Hello(ctx, IntentSessions); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Pifs(ctx); err != nil {
			t.Fatal(err)
		}
		l, err := c.Sessions(ctx, rule, max)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	list := func(rule string, max int) *SessionList { return listV(0, rule, max) }
	all := list("", 0)
	if all.Total != 3 || all.Truncated() || len(all.Sessions) != 3 {
		t.Fatalf("all sessions: %+v", all)
	}
	for i := range live {
		if all.Sessions[i] != live[i] {
			t.Fatalf("session %d: got %+v, want %+v", i, all.Sessions[i], live[i])
		}
	}
	// A version 4 client reads the sessions without their TLS (version 5),
	// a version 2 one without the hello's names either (version 3).
	for _, v := range []uint8{Version4, Version2} {
		got := listV(v, "", 0).Sessions[0]
		want := live[0]
		want.TLSVersion, want.TLSCipher, want.TLSResumed = "", "", false
		if v < Version3 {
			want.SNI = ""
		}
		if got != want {
			t.Errorf("version %d: got %+v, want %+v", v, got, want)
		}
	}
	one := list("tcp 0.0.0.0:8080", 1)
	if one.Total != 2 || !one.Truncated() || len(one.Sessions) != 1 || one.Sessions[0] != live[0] {
		t.Fatalf("one session of 8080: %+v", one)
	}
	ctx := ctxT(t)
	c := mustDial(t, ctx, path, Options{})
	defer c.Close()
	if err := c.Hello(ctx, IntentStats); err != nil {
		t.Fatal(err)
	}
	cs, err := c.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(cs) != 3 || cs[0] != (observe.Counter{Name: "sessions", Value: 3}) || cs[1].Value != 1005 || cs[2].Value != -2 {
		t.Fatalf("stats %+v", cs)
	}
}
