package ctl

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/ctl/ctltest"
	"github.com/sluice-proxy/sluice/internal/testpeer"
	"github.com/sluice-proxy/sluice/rules"
)

const (
	oldRule = "tcp 0.0.0.0:8080 -> 127.0.0.1:80"
	newRule = "tcp 0.0.0.0:9090 -> 127.0.0.1:90"
)

// Status, pifs and list answer what the engine holds.
func TestReadOnly(t *testing.T) {
	eng := ctltest.New(3, []string{"ns1"}, mustRules(t, "tcp ns1/10.0.0.1:80 -> 127.0.0.1:80", oldRule, "udp [::]:53-54 -> [::1]:53")...)
	eng.SetSessions(5)
	_, path := startServer(t, eng, nil)
	ctx := ctxT(t)

	c := mustDial(t, ctx, path, Options{})
	defer c.Close()
	if h := c.Server(); h.Software != "sluice" || !h.Has(FeatureTxn) || h.Limits.MaxRules != rules.MaxRules || h.Limits.IOTimeout != IOTimeout {
		t.Fatalf("hello %+v", h)
	}
	if err := c.Hello(ctx, IntentStatus); err != nil {
		t.Fatal(err)
	}
	st, err := c.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// A bare server (no Described engine) says no version, and its own start.
	if st.PID != os.Getpid() || st.Version != "" || st.State != StateServing || st.Started.IsZero() || st.Uptime < 0 || st.Uptime > time.Minute {
		t.Fatalf("status: the process %+v", st)
	}
	st.PID, st.Started, st.Uptime, st.State = 0, time.Time{}, 0, 0
	if *st != (Status{Generation: 3, Rules: 3, Ports: 4, Sessions: 5, Pifs: 2}) || c.Version() != MaxVersion {
		t.Fatalf("status %+v, version %d", st, c.Version())
	}

	c, err = Dial(ctx, path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Hello(ctx, IntentPifs); err != nil {
		t.Fatal(err)
	}
	pifs, err := c.Pifs(ctx)
	if err != nil || len(pifs) != 2 || pifs[0] != (Pif{0, "host"}) || pifs[1] != (Pif{1, "ns1"}) {
		t.Fatalf("pifs %v, %v", pifs, err)
	}
	if _, err := c.List(ctx); err == nil {
		t.Fatal("List on a pifs connection worked")
	}

	c, tb := dialTable(t, path, Options{}, IntentList)
	// One pif at a time: host first, then ns1.
	want := []string{oldRule, "udp [::]:53-54 -> [::1]:53", "tcp ns1/10.0.0.1:80 -> 127.0.0.1:80"}
	if tb.Generation != 3 || strings.Join(tb.Lines, "\n") != strings.Join(want, "\n") {
		t.Fatalf("list gen %d %q", tb.Generation, tb.Lines)
	}
	if _, err := c.Load(ctx, 3, nil); err == nil {
		t.Fatal("Load on a list connection worked")
	}
}

// A whole transaction, committed: steps 1 to 10 through the library.
func TestTransactionCommit(t *testing.T) {
	eng := ctltest.New(1, nil, mustRules(t, oldRule)...)
	s, path := startServer(t, eng, nil)
	c, tb := dialWrite(t, path, Options{})
	ctx := ctxT(t)
	if tb.Generation != 1 || len(tb.Lines) != 1 || tb.Lines[0] != oldRule {
		t.Fatalf("table %+v", tb)
	}
	ld, err := c.Load(ctx, tb.Generation, mustRules(t, oldRule, newRule))
	if err != nil {
		t.Fatal(err)
	}
	if *ld != (Loaded{Generation: 1, Rules: 2, Ports: 2, Kept: 1, Added: 1}) {
		t.Fatalf("loaded %+v", ld)
	}
	if a, _, _ := eng.Counts(); a != 0 {
		t.Fatal("load touched the engine")
	}
	sum, err := c.Apply(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	if !sum.OK || sum.Generation != 2 || sum.Kept != 1 || sum.Added != 1 || len(sum.Rules) != 2 || sum.Rules[1].Rule != newRule || sum.Rules[1].Bound != 1 || len(sum.Failures()) != 0 {
		t.Fatalf("summary %+v", sum)
	}
	if !eng.Pending() {
		t.Fatal("not pending after apply")
	}
	gen, err := c.Commit(ctx)
	if err != nil || gen != 2 {
		t.Fatalf("commit: %d, %v", gen, err)
	}
	wantLines(t, eng, oldRule, newRule)
	if _, err := c.Commit(ctx); err == nil {
		t.Fatal("a second commit on a finished transaction worked")
	}
	waitIdle(t, s)
	if st := s.Stats(); st.Committed != 1 || st.RolledBack != 0 {
		t.Fatalf("stats %+v", st)
	}
	wantTxnOutcomes(t, eng, TxnCommitted)
}

// wantTxnOutcomes checks the transaction outcomes the engine heard, in order.
func wantTxnOutcomes(t *testing.T, eng *ctltest.Engine, want ...rules.TxnOutcome) {
	t.Helper()
	if got := eng.Outcomes(); !slices.Equal(got, want) {
		t.Fatalf("transaction outcomes %q, want %q", got, want)
	}
}

// A bad verdict, rolled back: the summary names the port and its errno,
// the rollback's summary describes the restored table.
func TestTransactionRollback(t *testing.T) {
	eng := ctltest.New(1, nil, mustRules(t, oldRule)...)
	eng.FailPort(9090, syscall.EADDRINUSE)
	s, path := startServer(t, eng, nil)
	c, tb := dialWrite(t, path, Options{})
	ctx := ctxT(t)
	if _, err := c.Load(ctx, tb.Generation, mustRules(t, newRule)); err != nil {
		t.Fatal(err)
	}
	sum, err := c.Apply(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := sum.Failures()
	if sum.OK || len(f) != 1 || f[0] != "tcp 0.0.0.0:9090: port 9090: address already in use" || sum.Rules[0].Ports[0].Errno != syscall.EADDRINUSE {
		t.Fatalf("summary %+v, failures %q", sum, f)
	}
	rs, err := c.Rollback(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !rs.OK || rs.Generation != 1 || len(rs.Rules) != 1 || rs.Rules[0].Rule != oldRule {
		t.Fatalf("rollback summary %+v", rs)
	}
	wantLines(t, eng, oldRule)
	waitIdle(t, s)
	if st := s.Stats(); st.RolledBack != 1 || st.Committed != 0 {
		t.Fatalf("stats %+v", st)
	}
	wantTxnOutcomes(t, eng, TxnRolledBack)
	// A weak rule that binds a port of its range is a good verdict, its
	// failures reported all the same.
	c, tb = dialWrite(t, path, Options{})
	if _, err := c.Load(ctx, tb.Generation, mustRules(t, "tcp 0.0.0.0:9089-9090 -> 127.0.0.1:90 weak")); err != nil {
		t.Fatal(err)
	}
	sum, err = c.Apply(ctx, 0)
	if err != nil || !sum.OK || len(sum.Failures()) != 1 || sum.Rules[0].Bound != 1 {
		t.Fatalf("weak: %+v, %v", sum, err)
	}
}

// txnSteps are the steps of a committed transaction, one client action
// each, as a raw client does them.
func txnSteps() []struct {
	name string
	do   func(r *raw)
} {
	return []struct {
		name string
		do   func(r *raw)
	}{
		{"1 server hello read", func(r *raw) { r.expect(MsgHello) }},
		{"2 client hello sent", func(r *raw) {
			r.do(func(fw *frameWriter) error { return fw.writeClientHello(&ClientHello{Want: 2, Intent: IntentWrite}) })
		}},
		{"3 pifs read", func(r *raw) { r.ver = r.expect(MsgPifs).ver }},
		{"4 rules read", func(r *raw) { r.expect(MsgRules) }},
		{"5 first load chunk sent", func(r *raw) { r.openChunk(1, 0, oldRule) }},
		{"5 last load chunk sent", func(r *raw) {
			r.do(func(fw *frameWriter) error { return fw.writeTable(r.ver, MsgLoad, 1, []tableLine{{0, newRule}}) })
		}},
		{"6 loaded read", func(r *raw) { r.expect(MsgLoaded) }},
		{"7 apply sent", func(r *raw) { r.do(func(fw *frameWriter) error { return fw.writeApply(r.ver, 0) }) }},
		{"8 summary read", func(r *raw) { r.expect(MsgSummary) }},
		{"9 commit sent", func(r *raw) { r.do(func(fw *frameWriter) error { return fw.writeEmpty(r.ver, MsgCommit) }) }},
		{"9 committed read", func(r *raw) { r.expect(MsgCommitted) }},
		{"10 close read", func(r *raw) { r.expectClosed() }},
	}
}

// checkAfterStep checks the engine once the client vanished after step k
// (1-based in txnSteps): before APPLY nothing changed; between APPLY and
// COMMIT the server rolled back; after COMMIT the new table stands. The
// writer slot is free again.
func checkAfterStep(t *testing.T, s *Server, eng *ctltest.Engine, path string, k int) {
	t.Helper()
	waitIdle(t, s)
	applies, commits, rollbacks := eng.Counts()
	switch {
	case k <= 7: // before APPLY: the shadow is discarded
		wantLines(t, eng, oldRule)
		if applies != 0 {
			t.Fatalf("%d applies", applies)
		}
	case k <= 9: // applied, not committed: rolled back
		wantLines(t, eng, oldRule)
		if applies != 1 || rollbacks != 1 || commits != 0 {
			t.Fatalf("applies %d commits %d rollbacks %d", applies, commits, rollbacks)
		}
	default: // COMMIT was read: it stands
		wantLines(t, eng, oldRule, newRule)
		if commits != 1 || rollbacks != 0 || eng.Generation() != 2 {
			t.Fatalf("commits %d rollbacks %d gen %d", commits, rollbacks, eng.Generation())
		}
	}
	if eng.Pending() {
		t.Fatal("an apply is still pending")
	}
	c, _ := dialWrite(t, path, Options{})
	c.Close()
}

// The client closes its socket after each step in turn.
func TestDisconnectAfterEachStep(t *testing.T) {
	steps := txnSteps()
	for k := 1; k <= len(steps); k++ {
		t.Run(steps[k-1].name, func(t *testing.T) {
			eng := ctltest.New(1, nil, mustRules(t, oldRule)...)
			s, path := startServer(t, eng, nil)
			r := dialRaw(t, path, false)
			for _, st := range steps[:k] {
				st.do(r)
			}
			r.conn.Close()
			checkAfterStep(t, s, eng, path, k)
		})
	}
}

const killHelperEnv = "SLUICE_CTL_KILL_HELPER"

// The client process is killed (SIGKILL) after each step in turn: the
// kernel closes its socket, and the server ends up as after a close.
func TestKilledAfterEachStep(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	steps := txnSteps()
	for k := 1; k <= len(steps); k++ {
		t.Run(steps[k-1].name, func(t *testing.T) {
			eng := ctltest.New(1, nil, mustRules(t, oldRule)...)
			s, path := startServer(t, eng, nil)
			cmd := exec.Command(exe, "-test.run=^TestKillHelper$")
			cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s:%d", killHelperEnv, path, k))
			out, err := cmd.CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ProcessState.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
				t.Fatalf("helper: %v, want killed\n%s", err, out)
			}
			checkAfterStep(t, s, eng, path, k)
		})
	}
}

// TestKillHelper is the client of TestKilledAfterEachStep: it does the
// first k steps and kills itself.
func TestKillHelper(t *testing.T) {
	v := os.Getenv(killHelperEnv)
	if v == "" {
		t.Skip("run by TestKilledAfterEachStep")
	}
	path, ks, _ := strings.Cut(v, ":")
	k, err := strconv.Atoi(ks)
	if err != nil {
		t.Fatal(err)
	}
	r := dialRaw(t, path, false)
	for _, st := range txnSteps()[:k] {
		st.do(r)
	}
	_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
	time.Sleep(time.Minute)
}

// A second writer is told busy at once, never left waiting; readers are
// served beside the writer; once the writer is gone the slot is free.
func TestBusyWriter(t *testing.T) {
	eng := ctltest.New(1, nil, mustRules(t, oldRule)...)
	s, path := startServer(t, eng, nil)
	ctx := ctxT(t)
	a, _ := dialWrite(t, path, Options{})

	b, err := Dial(ctx, path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err = b.Hello(ctx, IntentWrite)
	wantCode(t, err, CodeBusy)
	if d := time.Since(start); d > time.Second {
		t.Fatalf("busy took %s", d)
	}
	b.Close()

	r, err := Dial(ctx, path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Hello(ctx, IntentStatus); err != nil {
		t.Fatal(err)
	}
	if st, err := r.Status(ctx); err != nil || !st.Writer {
		t.Fatalf("status beside a writer: %+v, %v", st, err)
	}
	r.Close()
	if l, tb := dialTable(t, path, Options{}, IntentList); len(tb.Lines) != 1 {
		t.Fatalf("list beside a writer: %+v", tb)
	} else {
		l.Close()
	}

	a.Close()
	waitIdle(t, s)
	c, _ := dialWrite(t, path, Options{})
	c.Close()
	if n := s.Stats().Errors["busy"]; n != 1 {
		t.Fatalf("busy counted %d times", n)
	}
}

// A writer's Close returns once the server has let go of the transaction:
// the next writer, right after, is never told busy by it, whether it ended
// before a load, after a load, or after an apply (rolled back by then).
func TestCloseFreesWriterSlot(t *testing.T) {
	eng := ctltest.New(1, nil, mustRules(t, oldRule)...)
	_, path := startServer(t, eng, nil)
	ctx := ctxT(t)
	stages := []struct {
		name string
		run  func(c *Client, tb *Table) error
	}{
		{"listed", func(*Client, *Table) error { return nil }},
		{"loaded", func(c *Client, tb *Table) error {
			_, err := c.Load(ctx, tb.Generation, mustRules(t, newRule))
			return err
		}},
		{"applied", func(c *Client, tb *Table) error {
			if _, err := c.Load(ctx, tb.Generation, mustRules(t, newRule)); err != nil {
				return err
			}
			_, err := c.Apply(ctx, 0)
			return err
		}},
	}
	for _, st := range stages {
		// Repeated: without the wait in Close, the next hello races the
		// server's noticing the close, and loses some of the time.
		for i := range 50 {
			c, tb := dialWrite(t, path, Options{})
			if err := st.run(c, tb); err != nil {
				t.Fatalf("%s: %v", st.name, err)
			}
			c.Close()
			next := mustDial(t, ctx, path, Options{})
			if err := next.Hello(ctx, IntentWrite); err != nil {
				t.Fatalf("%s, round %d: the next writer: %v", st.name, i, err)
			}
			next.Close()
			wantLines(t, eng, oldRule)
		}
	}
}

// A load built on a table another writer has since replaced is refused,
// and nothing changes.
func TestStaleGeneration(t *testing.T) {
	eng := ctltest.New(1, nil, mustRules(t, oldRule)...)
	s, path := startServer(t, eng, nil)
	ctx := ctxT(t)
	// A reader's view: generation 1.
	_, old := dialTable(t, path, Options{}, IntentList)
	if old.Generation != 1 {
		t.Fatalf("list: %+v", old)
	}
	// Another writer commits generation 2.
	w, tb := dialWrite(t, path, Options{})
	if _, err := w.Load(ctx, tb.Generation, mustRules(t, newRule)); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Apply(ctx, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	waitIdle(t, s)
	// A load on generation 1 is stale.
	c, _ := dialWrite(t, path, Options{})
	_, err := c.Load(ctx, old.Generation, mustRules(t, oldRule))
	e := wantCode(t, err, CodeStaleGeneration)
	if !strings.Contains(e.Msg, "generation 1") || !strings.Contains(e.Msg, "is 2") {
		t.Fatalf("message %q", e.Msg)
	}
	wantLines(t, eng, newRule)
	if a, _, _ := eng.Counts(); a != 1 {
		t.Fatalf("%d applies", a)
	}
	c.Close()
	waitIdle(t, s)
	wantTxnOutcomes(t, eng, TxnCommitted, TxnFailed)
}

// An applied table without a commit within the confirm timeout is rolled
// back by the server itself; a timeout over the bound is refused.
func TestConfirmTimeout(t *testing.T) {
	eng := ctltest.New(1, nil, mustRules(t, oldRule)...)
	s, path := startServer(t, eng, nil)
	ctx := ctxT(t)
	c, tb := dialWrite(t, path, Options{})
	if _, err := c.Load(ctx, tb.Generation, mustRules(t, newRule)); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := c.Apply(ctx, 200*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the rollback", func() bool { _, _, rb := eng.Counts(); return rb == 1 })
	if d := time.Since(start); d < 200*time.Millisecond {
		t.Fatalf("rolled back after %s, before the confirm timeout", d)
	}
	wantLines(t, eng, oldRule)
	_, err := c.Commit(ctx)
	wantCode(t, err, CodeConfirmTimeout)
	waitIdle(t, s)

	c, tb = dialWrite(t, path, Options{})
	if _, err := c.Load(ctx, tb.Generation, mustRules(t, newRule)); err != nil {
		t.Fatal(err)
	}
	_, err = c.Apply(ctx, MaxConfirm+time.Second)
	wantCode(t, err, CodeBadValue)
	if a, _, _ := eng.Counts(); a != 1 {
		t.Fatal("an apply with a confirm timeout over the bound reached the engine")
	}
}

// Frames that are too large, malformed, of the wrong version or at the
// wrong step get their code; the connection is closed, the engine is
// untouched, and the server goes on serving.
func TestBadFrames(t *testing.T) {
	hello := func(ver uint8, want uint8, intent Intent) []byte {
		return withPayload(ver, MsgClientHello, []byte{want, byte(intent), 0, 0})
	}
	cases := []struct {
		name  string
		write bool // get the writer slot first (hello, pifs, rules)
		send  []byte
		code  Code
	}{
		{"frame over the bound", false, header(1, MsgClientHello, MaxPayload+1), CodeTooLarge},
		{"bad magic", false, []byte("GET / HTTP/1.1\r\n\r\n"), CodeBadFrame},
		{"unknown type", false, header(1, 0x42, 0), CodeBadFrame},
		{"hello payload short", false, withPayload(1, MsgClientHello, []byte{2}), CodeBadFrame},
		{"hello name over its bound", false, withPayload(1, MsgClientHello, append([]byte{2, 4, 0, 200}, make([]byte, 200)...)), CodeTooLarge},
		{"hello in version 2", false, hello(2, 2, IntentStatus), CodeBadVersion},
		{"want 0", false, hello(1, 0, IntentStatus), CodeBadValue},
		{"unknown intent", false, hello(1, 2, 99), CodeBadValue},
		{"commit before hello", false, withPayload(1, MsgCommit, nil), CodeUnexpected},
		{"commit before load", true, withPayload(2, MsgCommit, nil), CodeUnexpected},
		{"version 1 frame on a version 2 connection", true, withPayload(1, MsgCommit, nil), CodeBadVersion},
		{"load over the bound", true, header(2, MsgLoad, MaxPayload+1), CodeTooLarge},
		{"load chunk short", true, withPayload(2, MsgLoad, []byte{0, 0, 0}), CodeBadFrame},
	}
	eng := ctltest.New(1, nil, mustRules(t, oldRule)...)
	s, path := startServer(t, eng, nil)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := dialRaw(t, path, true)
			if c.write {
				r.hello(2, IntentWrite)
			}
			r.send(c.send)
			r.expectError(c.code)
			waitIdle(t, s)
		})
	}
	if a, _, _ := eng.Counts(); a != 0 {
		t.Fatal("a bad frame reached the engine")
	}
	// Still serving.
	c, tb := dialWrite(t, path, Options{})
	if len(tb.Lines) != 1 {
		t.Fatal(tb)
	}
	c.Close()
}

// Load errors name the rule by index (in the caller's order) and text; no
// socket is touched.
func TestLoadErrors(t *testing.T) {
	eng := ctltest.New(1, []string{"ns1"}, mustRules(t, oldRule)...)
	_, path := startServer(t, eng, nil)
	rawCases := []struct {
		name  string
		lines []tableLine
		gen   uint64
		code  Code
		index int
		want  string
	}{
		{"rule that does not parse", []tableLine{{0, oldRule}, {0, "tcp nonsense"}}, 1, CodeInvalidRule, 1, "nonsense"},
		{"rule sent under another pif", []tableLine{{0, "tcp ns1/0.0.0.0:80 -> 127.0.0.1:80"}}, 1, CodeUnknownPif, 0, `listens in pif "ns1"`},
		{"pif index the daemon lacks", []tableLine{{2, "tcp 0.0.0.0:80 -> 127.0.0.1:80"}}, 1, CodeUnknownPif, -1, "pif index 2"},
		{"target pif the daemon lacks", []tableLine{{0, "tcp 0.0.0.0:80 -> nsX/127.0.0.1:80"}}, 1, CodeUnknownPif, 0, `"nsX"`},
		{"listen keys that collide", []tableLine{{0, oldRule}, {0, "tcp 0.0.0.0:8080 -> 127.0.0.1:81 weak"}}, 1, CodeInvalidTable, 1, "8080"},
		{"stale base", []tableLine{{0, oldRule}}, 0, CodeStaleGeneration, -1, "generation 0"},
	}
	for _, c := range rawCases {
		t.Run(c.name, func(t *testing.T) {
			r := dialRaw(t, path, true)
			r.hello(2, IntentWrite)
			r.do(func(fw *frameWriter) error { return fw.writeTable(2, MsgLoad, c.gen, c.lines) })
			e := r.expectError(c.code)
			if e.Index != c.index || !strings.Contains(e.Msg, c.want) {
				t.Fatalf("error %v, want index %d and %q", e, c.index, c.want)
			}
			if c.index >= 0 && e.Rule != c.lines[c.index].line {
				t.Fatalf("error names rule %q, want %q", e.Rule, c.lines[c.index].line)
			}
		})
	}
	t.Run("too many rules", func(t *testing.T) {
		r := dialRaw(t, path, true)
		r.hello(2, IntentWrite)
		lines := make([]tableLine, rules.MaxRules+1)
		for i := range lines {
			lines[i] = tableLine{0, fmt.Sprintf("tcp 10.0.%d.%d:80 -> 127.0.0.1:80", i/256, i%256)}
		}
		_ = r.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
		_ = r.fw.writeTable(2, MsgLoad, 1, lines) // the server may close before it has all
		_ = r.fw.flush()
		r.expectError(CodeTooLarge)
	})
	t.Run("chunks on different generations", func(t *testing.T) {
		r := dialRaw(t, path, true)
		r.hello(2, IntentWrite)
		r.openChunk(1, 0, oldRule) // a chunk but the last carries a line
		r.do(func(fw *frameWriter) error { return fw.writeTable(2, MsgLoad, 5, nil) })
		r.expectError(CodeBadValue)
	})
	t.Run("pifs out of order", func(t *testing.T) {
		r := dialRaw(t, path, true)
		r.hello(2, IntentWrite)
		r.openChunk(1, 1, "tcp ns1/0.0.0.0:80 -> 127.0.0.1:80")
		r.do(func(fw *frameWriter) error { return fw.writeTable(2, MsgLoad, 1, nil) })
		r.expectError(CodeBadValue)
	})
	t.Run("library: index in the caller's order", func(t *testing.T) {
		c, tb := dialWrite(t, path, Options{})
		// Sent host first: load order is 1, 2, 0; the collision is load
		// index 1, the caller's 2.
		_, err := c.Load(ctxT(t), tb.Generation, mustRules(t, "tcp ns1/0.0.0.0:80 -> 127.0.0.1:80", oldRule, "tcp 0.0.0.0:8080 -> 127.0.0.1:81"))
		if e := wantCode(t, err, CodeInvalidTable); e.Index != 2 {
			t.Fatalf("index %d, want 2", e.Index)
		}
	})
	t.Run("library: unknown listen pif", func(t *testing.T) {
		c, tb := dialWrite(t, path, Options{})
		_, err := c.Load(ctxT(t), tb.Generation, mustRules(t, oldRule, "tcp nsY/0.0.0.0:80 -> 127.0.0.1:80"))
		if e := wantCode(t, err, CodeUnknownPif); e.Index != 1 {
			t.Fatalf("index %d, want 1", e.Index)
		}
	})
	if a, _, _ := eng.Counts(); a != 0 {
		t.Fatal("a refused load reached the engine")
	}
}

// A silent client, and one that sends a byte at a time too slowly, are
// cut off by the read deadline; the writer slot is freed. A byte at a time
// within the deadline is fine.
func TestSlowClients(t *testing.T) {
	eng := ctltest.New(1, nil, mustRules(t, oldRule)...)
	const io = 300 * time.Millisecond
	s, path := startServer(t, eng, func(c *config) { c.ioTimeout = io })

	t.Run("silent", func(t *testing.T) {
		r := dialRaw(t, path, true)
		start := time.Now()
		r.expectError(CodeTimeout)
		// The server's deadline starts at its accept, a moment before
		// this clock does: allow a few ms early.
		if d := time.Since(start); d < io-20*time.Millisecond || d > io+2*time.Second {
			t.Fatalf("cut off after %s", d)
		}
	})
	t.Run("one byte at a time, too slowly", func(t *testing.T) {
		r := dialRaw(t, path, true)
		start := time.Now()
		b := withPayload(1, MsgClientHello, []byte{2, 4, 0, 0})
		for _, x := range b {
			if _, err := r.conn.Write([]byte{x}); err != nil {
				break // cut off
			}
			time.Sleep(io / 3)
		}
		r.expectError(CodeTimeout)
		if d := time.Since(start); d > io+2*time.Second {
			t.Fatalf("cut off after %s", d)
		}
	})
	t.Run("writer trickling its load", func(t *testing.T) {
		r := dialRaw(t, path, true)
		r.hello(2, IntentWrite)
		if !s.writer.Load() {
			t.Fatal("no writer slot taken")
		}
		buf := encodeFrames(t, func(fw *frameWriter) error { return fw.writeTable(2, MsgLoad, 1, []tableLine{{0, newRule}}) })
		for _, x := range buf {
			if _, err := r.conn.Write([]byte{x}); err != nil {
				break
			}
			time.Sleep(io / 3)
			if !s.writer.Load() {
				break
			}
		}
		r.expectError(CodeTimeout)
		waitIdle(t, s)
		c, _ := dialWrite(t, path, Options{})
		c.Close()
	})
	t.Run("one byte at a time within the deadline", func(t *testing.T) {
		// A roomy deadline of its own: this proves fragments are put
		// together, not how fast a loaded machine runs them.
		eng := ctltest.New(1, nil, mustRules(t, oldRule)...)
		_, path := startServer(t, eng, func(c *config) { c.ioTimeout = 10 * time.Second })
		r := dialRaw(t, path, true)
		slow := func(b []byte) {
			for _, x := range b {
				r.send([]byte{x})
				time.Sleep(time.Millisecond)
			}
		}
		slow(withPayload(1, MsgClientHello, []byte{2, 4, 0, 0}))
		r.expect(MsgPifs)
		r.expect(MsgRules)
		slow(encodeFrames(t, func(fw *frameWriter) error {
			return fw.writeTable(2, MsgLoad, 1, []tableLine{{0, oldRule}, {0, newRule}})
		}))
		r.expect(MsgLoaded)
		slow(encodeFrames(t, func(fw *frameWriter) error { return fw.writeApply(2, 0) }))
		r.expect(MsgSummary)
		slow(encodeFrames(t, func(fw *frameWriter) error { return fw.writeEmpty(2, MsgCommit) }))
		r.expect(MsgCommitted)
		r.expectClosed()
		wantLines(t, eng, oldRule, newRule)
	})
}

// A writer that stops reading while the server sends it a large table is
// dropped by the write deadline; the slot is freed and the next writer gets
// the whole table, chunked over several frames, and can load it back.
func TestClientStopsReading(t *testing.T) {
	cidrs := make([]string, 200)
	for i := range cidrs {
		cidrs[i] = fmt.Sprintf("10.%d.%d.0/24", i/256, i%256)
	}
	allow := " allow=" + strings.Join(cidrs, ",")
	var big []*rules.Rule
	for i := 0; i < 400; i++ { // ~3 KB a line: ~1.2 MB, several socket buffers and two frames
		big = append(big, mustRules(t, fmt.Sprintf("tcp 10.1.%d.%d:80 -> 127.0.0.1:80%s", i/256, i%256, allow))...)
	}
	want := make([]string, len(big))
	for i, r := range big {
		want[i] = r.String()
	}
	eng := ctltest.New(1, nil, big...)
	// Long enough for the second writer below to format and send 1.2 MB
	// under -race on a loaded machine between RULES and LOAD (2 s was not,
	// at a load of 13 on 2 CPUs).
	const io = 3 * time.Second // under waitIdle's 5 s
	s, path := startServer(t, eng, func(c *config) { c.ioTimeout = io })
	r := dialRaw(t, path, true)
	r.do(func(fw *frameWriter) error { return fw.writeClientHello(&ClientHello{Want: 2, Intent: IntentWrite}) })
	waitFor(t, "the writer slot", s.writer.Load)
	waitIdle(t, s) // dropped, not waited for
	if n := s.Stats().Errors["timeout"]; n != 1 {
		t.Fatalf("timeouts counted: %d", n)
	}
	c, tb := dialWrite(t, path, Options{})
	if len(tb.Lines) != len(big) {
		t.Fatalf("listed %d of %d rules", len(tb.Lines), len(big))
	}
	for i, l := range tb.Lines {
		if l != want[i] {
			t.Fatalf("line %d differs", i)
		}
	}
	// The server waits io-timeout for the load: send what we have at once.
	ctx := ctxT(t)
	if _, err := c.Load(ctx, tb.Generation, big); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Apply(ctx, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if got := eng.Lines(); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatal("the table did not survive the round trip")
	}
}

// The service upgrade, both ways: the agreed version is the lower of the
// two, the client learns it without a timeout, version 2 carries the
// per-port detail and version 1 only the counts.
func TestUpgrade(t *testing.T) {
	for _, sv := range []uint8{Version1, Version2} {
		for _, cv := range []uint8{Version1, Version2} {
			t.Run(fmt.Sprintf("client v%d server v%d", cv, sv), func(t *testing.T) {
				eng := ctltest.New(1, nil, mustRules(t, oldRule)...)
				eng.FailPort(9090, syscall.EADDRINUSE)
				_, path := startServer(t, eng, func(c *config) { c.maxVersion = sv })
				start := time.Now()
				c, tb := dialWrite(t, path, Options{Version: cv})
				if d := time.Since(start); d > time.Second {
					t.Fatalf("hello took %s", d)
				}
				agreed := min(cv, sv)
				if c.Version() != agreed {
					t.Fatalf("version %d, want %d", c.Version(), agreed)
				}
				ctx := ctxT(t)
				if _, err := c.Load(ctx, tb.Generation, mustRules(t, oldRule, newRule)); err != nil {
					t.Fatal(err)
				}
				sum, err := c.Apply(ctx, 0)
				if err != nil {
					t.Fatal(err)
				}
				f := sum.Failures()
				if sum.OK || len(f) != 1 || sum.Rules[1].Failed != 1 {
					t.Fatalf("summary %+v", sum)
				}
				if agreed == Version2 {
					if !sum.Detail || f[0] != "tcp 0.0.0.0:9090: port 9090: address already in use" {
						t.Fatalf("v2 failures %q", f)
					}
				} else if sum.Detail || sum.Rules[1].Ports != nil || !strings.Contains(f[0], "1 of 1 ports failed") {
					t.Fatalf("v1 failures %q, detail %v", f, sum.Detail)
				}
				if _, err := c.Rollback(ctx); err != nil {
					t.Fatal(err)
				}
				wantLines(t, eng, oldRule)
			})
		}
	}
	t.Run("a future client asking for v6 gets v5", func(t *testing.T) {
		eng := ctltest.New(1, nil)
		_, path := startServer(t, eng, nil)
		r := dialRaw(t, path, true)
		r.do(func(fw *frameWriter) error {
			return fw.writeClientHello(&ClientHello{Want: MaxVersion + 1, Intent: IntentStatus})
		})
		if f := r.expect(MsgStatus); f.ver != MaxVersion {
			t.Fatalf("answered in v%d", f.ver)
		}
	})
}

// Closing the server rolls back an open transaction before Close returns
// and tells its client; the socket file goes away.
func TestCloseRollsBack(t *testing.T) {
	eng := ctltest.New(1, nil, mustRules(t, oldRule)...)
	s, path := startServer(t, eng, nil)
	c, tb := dialWrite(t, path, Options{})
	ctx := ctxT(t)
	if _, err := c.Load(ctx, tb.Generation, mustRules(t, newRule)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Apply(ctx, 0); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, _, rb := eng.Counts(); rb != 1 || eng.Pending() {
		t.Fatal("Close returned before the rollback")
	}
	wantLines(t, eng, oldRule)
	_, err := c.Commit(ctx)
	wantCode(t, err, CodeShuttingDown)
	if _, err := net.Dial("unix", path); err == nil {
		t.Fatal("the socket still accepts")
	}
}

// The context ends the server through Serve's ctx.
func TestServeContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	path := shortDir(t) + "/ctl.sock"
	s, err := Serve(ctx, path, ctltest.New(1, nil), nil)
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	waitFor(t, "the socket to close", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.closed
	})
	_ = s.Close()
	if _, err := net.Dial("unix", path); err == nil {
		t.Fatal("the socket still accepts")
	}
}

// An apply the engine refuses is apply-failed, and nothing changed.
func TestApplyFailed(t *testing.T) {
	eng := ctltest.New(1, nil, mustRules(t, oldRule)...)
	_, path := startServer(t, eng, nil)
	c, tb := dialWrite(t, path, Options{})
	ctx := ctxT(t)
	if _, err := c.Load(ctx, tb.Generation, mustRules(t, newRule)); err != nil {
		t.Fatal(err)
	}
	eng.Stop()
	_, err := c.Apply(ctx, 0)
	wantCode(t, err, CodeApplyFailed)
	wantLines(t, eng, oldRule)
}

// More connections than max-clients: the next one is told so at once.
func TestTooManyClients(t *testing.T) {
	eng := ctltest.New(1, nil)
	s, path := startServer(t, eng, func(c *config) { c.maxClients = 2 })
	dialRaw(t, path, true)
	dialRaw(t, path, true)
	dialRaw(t, path, true) // the slot kept for a writer (admit)
	_, err := Dial(ctxT(t), path, Options{})
	wantCode(t, err, CodeTooManyClients)
	if n := s.Stats().Errors["too-many-clients"]; n != 1 {
		t.Fatalf("counted %d", n)
	}
}

// Every client call is bounded by its context: a server that never
// answers costs the caller its deadline, not more.
func TestClientDeadline(t *testing.T) {
	dir := shortDir(t)
	ln, err := net.Listen("unix", dir+"/mute.sock")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	testpeer.Mute(ln)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = Dial(ctx, dir+"/mute.sock", Options{})
	if err == nil || time.Since(start) > 2*time.Second || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("dial a mute server: %v after %s", err, time.Since(start))
	}
	// Cancellation, not only deadlines.
	ctx, cancel = context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	start = time.Now()
	_, err = Dial(ctx, dir+"/mute.sock", Options{Timeout: time.Minute})
	if err == nil || time.Since(start) > 2*time.Second || !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled dial: %v after %s", err, time.Since(start))
	}
	// Out of order calls are refused without I/O.
	eng := ctltest.New(1, nil)
	_, path := startServer(t, eng, nil)
	c, err := Dial(ctxT(t), path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Commit(ctxT(t)); err == nil || !strings.Contains(err.Error(), "out of order") {
		t.Fatalf("commit before hello: %v", err)
	}
}
