package engine

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/balance"
	"github.com/sluice-proxy/sluice/ctl"
	"github.com/sluice-proxy/sluice/observe"
	"github.com/sluice-proxy/sluice/rules"
)

var _ interface {
	Watch(observe.Group, int) (*observe.Sub, []observe.Event)
	SessionList(string, int) observe.Sessions
	Counters() []observe.Counter
} = (*Engine)(nil)

// ctlServe serves e on a control socket in a fresh short directory.
func ctlServe(t *testing.T, e *Engine) string {
	t.Helper()
	dir := shortTempDir(t)
	s, err := ctl.Serve(context.Background(), filepath.Join(dir, "ctl.sock"), e, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s.Path()
}

func shortTempDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "eng")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func ctlCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// ctlOpen dials path and says intent; for every intent but stats it reads
// the pifs too.
func ctlOpen(t *testing.T, path string, intent ctl.Intent) *ctl.Client {
	t.Helper()
	ctx := ctlCtx(t)
	c, err := ctl.Dial(ctx, path, ctl.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.Hello(ctx, intent); err != nil {
		t.Fatal(err)
	}
	if intent != ctl.IntentStats {
		if _, err := c.Pifs(ctx); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

func ctlWatch(t *testing.T, path string, groups ...string) *ctl.Client {
	t.Helper()
	c := ctlOpen(t, path, ctl.IntentWatch)
	if err := c.Watch(ctlCtx(t), groups); err != nil {
		t.Fatal(err)
	}
	return c
}

// ctlTxn runs one writing transaction to lines, committed or rolled back.
func ctlTxn(path string, lines []string, rollback bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := ctl.Dial(ctx, path, ctl.Options{})
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

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func nextEvent(t *testing.T, c *ctl.Client) (*ctl.Event, map[string]any) {
	t.Helper()
	ev, err := c.NextEvent(ctlCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]any{}
	if err := json.Unmarshal(ev.Data, &m); err != nil {
		t.Fatal(err)
	}
	return ev, m
}

// Against the real engine: watchers that join while transactions commit and
// roll back in a loop see their state, then every change in order, with no
// gap and no repeat in the generations.
func TestWatchRacesRealTransactions(t *testing.T) {
	e, err := New(Config{Loops: 2})
	if err != nil {
		t.Fatal(err)
	}
	e.Start()
	t.Cleanup(func() { e.Shutdown(context.Background()) })
	path := ctlServe(t, e)
	a := "tcp 127.0.0.1:" + strconv.Itoa(freePort(t)) + " -> 127.0.0.1:1"
	b := "tcp 127.0.0.1:" + strconv.Itoa(freePort(t)) + " -> 127.0.0.1:2"
	const rounds = 30
	var wg sync.WaitGroup
	progress := make(chan int, rounds)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; i < rounds; i++ {
			lines := []string{a}
			if i%2 == 0 {
				lines = append(lines, b)
			}
			if err := ctlTxn(path, lines, i%3 == 2); err != nil {
				t.Errorf("round %d: %v", i, err)
				return
			}
			progress <- i
		}
	}()
	var watchers []*ctl.Client
	for joined := 0; joined < rounds; joined += 6 {
		for len(progress) < joined {
			time.Sleep(time.Millisecond)
		}
		watchers = append(watchers, ctlWatch(t, path, "rules"))
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	final := e.Generation()
	if want := uint64(rounds - rounds/3); final != want {
		t.Fatalf("generation %d after %d commits", final, want)
	}
	for i, c := range watchers {
		var f observe.TableFollower
		for !f.Started || f.Gen != final || f.Pending {
			ev, m := nextEvent(t, c)
			gen, _ := ev.Uint("generation")
			pending, _ := m["pending"].(bool)
			if err := f.Next(ev.Type, gen, pending); err != nil {
				t.Fatalf("watcher %d: %v", i, err)
			}
		}
		t.Logf("watcher %d: %d events after its state", i, f.Events)
	}
}

// A live session through the real engine: ctl sessions lists it with the
// bytes each way, ctl stats counts it, and watch sees its start and end
// and the backend's health going down and up.
func TestCtlSessionsStatsAndHealth(t *testing.T) {
	port := freePort(t)
	target := "127.0.0.1:" + strconv.Itoa(port)
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+target, Config{})
	path := ctlServe(t, e)
	w := ctlWatch(t, path, "health", "sessions")
	ev, m := nextEvent(t, w)
	if ev.Group != "health" || ev.Type != "state" || m["backend"] != target || m["up"] != true {
		t.Fatalf("first event %s/%s %s, want the backend's health state", ev.Group, ev.Type, ev.Data)
	}
	// Nobody listens on the target yet: the connect is refused, the backend
	// goes down.
	c0, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, c0)
	c0.Close()
	ev, m = nextEvent(t, w)
	if ev.Group != "health" || ev.Type != "down" || m["backend"] != target {
		t.Fatalf("event %s/%s %s, want health down", ev.Group, ev.Type, ev.Data)
	}
	// A backend that takes 1000 bytes and answers 3000.
	ln, err := net.Listen("tcp", target)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	release := make(chan struct{})
	go func() {
		s, err := ln.Accept()
		if err != nil {
			return
		}
		defer s.Close()
		if _, err := io.ReadFull(s, make([]byte, 1000)); err != nil {
			return
		}
		s.Write(make([]byte, 3000))
		<-release
	}()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write(make([]byte, 1000)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 3000)); err != nil {
		t.Fatal(err)
	}
	// Every backend down, the engine tries it anyway: it connects, it is up.
	ev, m = nextEvent(t, w)
	if ev.Group != "health" || ev.Type != "up" || m["backend"] != target {
		t.Fatalf("event %s/%s %s, want health up", ev.Group, ev.Type, ev.Data)
	}
	ev, m = nextEvent(t, w)
	if ev.Group != "sessions" || ev.Type != "start" || m["source"] != c.LocalAddr().String() || m["backend"] != target {
		t.Fatalf("event %s/%s %s, want the session's start", ev.Group, ev.Type, ev.Data)
	}
	rule := m["rule"].(string)
	if !strings.HasPrefix(rule, "tcp 127.0.0.1:") || !strings.HasSuffix(addr, rule[len("tcp 127.0.0.1"):]) {
		t.Fatalf("rule %q for listener %s", rule, addr)
	}

	sc := ctlOpen(t, path, ctl.IntentSessions)
	l, err := sc.Sessions(ctlCtx(t), rule, 0)
	if err != nil {
		t.Fatal(err)
	}
	if l.Total != 1 || len(l.Sessions) != 1 {
		t.Fatalf("sessions of %s: %+v", rule, l)
	}
	s := l.Sessions[0]
	want := observe.Session{Rule: rule, Source: netip.MustParseAddrPort(c.LocalAddr().String()), Target: netip.MustParseAddrPort(target),
		State: "forwarding", Up: 1000, Down: 3000, Age: s.Age}
	// Age travels in whole milliseconds: a session younger than 1 ms is 0.
	if s != want || s.Age < 0 || s.Age > time.Minute {
		t.Fatalf("session %+v, want %+v", s, want)
	}
	other := ctlOpen(t, path, ctl.IntentSessions)
	if l, err := other.Sessions(ctlCtx(t), "tcp 127.0.0.1:1", 0); err != nil || l.Total != 0 {
		t.Fatalf("sessions of another rule: %+v %v", l, err)
	}

	st := ctlOpen(t, path, ctl.IntentStats)
	cs, err := st.Stats(ctlCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]int64{}
	for _, c := range cs {
		got[c.Name] = c.Value
	}
	if got["sessions"] != 1 || got["loops"] != 2 {
		t.Fatalf("stats: sessions %d loops %d", got["sessions"], got["loops"])
	}
	if CountersEnabled && (got["rule."+rule+".bytes_in"] != 1000 || got["rule."+rule+".bytes_out"] != 3000) {
		t.Fatalf("stats of %s: in %d out %d", rule, got["rule."+rule+".bytes_in"], got["rule."+rule+".bytes_out"])
	}

	close(release) // the backend closes; the client follows
	c.Close()
	ev, m = nextEvent(t, w)
	if ev.Group != "sessions" || ev.Type != "end" || m["up"] != float64(1000) || m["down"] != float64(3000) {
		t.Fatalf("event %s/%s %s, want the session's end with its bytes", ev.Group, ev.Type, ev.Data)
	}
	waitIdle(t, e)
}

// With nobody watching, the engine's would-be events cost no allocation;
// with a watcher, they are published (and session events rate-bounded).
func TestEventsUnwatchedAllocateNothing(t *testing.T) {
	e := &Engine{loops: make([]*Loop, 1), sessLimit: observe.NewLimiter(3)}
	r, _ := rules.Parse("tcp 127.0.0.1:80 -> 127.0.0.1:81")
	ln := &Listener{ctr: e.newRuleCounters(r), key: r.ListenKeys()[0], rule: r, pool: balance.New(r.Balance, r.TargetFor(0))}
	l := &Loop{e: e}
	s := &session{ln: ln}
	allocs := testing.AllocsPerRun(1000, func() {
		l.sessionEvent(s, "start", 0)
		l.healthChanged(ln, 0, false)
	})
	if allocs != 0 {
		t.Errorf("%v allocations per unwatched event", allocs)
	}
	sub := e.hub.Subscribe(observe.GroupSessions|observe.GroupHealth, 100)
	defer sub.Close()
	l.healthChanged(ln, 0, false)
	for i := 0; i < 10; i++ {
		l.sessionEvent(s, "start", 0)
	}
	if got := len(sub.Events()); got != 1+3 {
		t.Fatalf("%d events queued, want 1 health and 3 sessions (the limiter's burst)", got)
	}
}
