package integration

// The control transaction against the real daemon: `sluice run -c FILE`
// serving its default control socket, driven by `sluice ctl` processes and
// by the ctl client library, with real listening sockets checked by
// connecting to them and in /proc/net/tcp.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/ctl"
	"github.com/sluice-proxy/sluice/internal/testpeer"
	"github.com/sluice-proxy/sluice/rules"
)

// liveDaemon is a `sluice run -c` daemon driven through its control socket.
// Its helpers report to t: a subtest sets it to itself, and back after.
type liveDaemon struct {
	*daemon
	t    *testing.T
	sock string // the control socket
}

// startLive runs `sluice run -c` on a configuration with the table's rules
// and waits until its ports listen and its control socket answers.
func startLive(t *testing.T, tb liveTable) *liveDaemon {
	t.Helper()
	var cfg strings.Builder
	cfg.WriteString("log: {level: warn}\nrules:\n")
	for _, l := range tb.lines {
		fmt.Fprintf(&cfg, "  - %s\n", l)
	}
	d := &liveDaemon{daemon: startDaemon(t, forwardOpts{}, "run", "-c", writeFile(t, "live.yaml", cfg.String())), t: t}
	d.sock = d.Ctl
	for p := range tb.via {
		d.waitListening(fmt.Sprintf("127.0.0.1:%d", p))
	}
	d.waitCtl()
	return d
}

// waitCtl waits until the control socket answers (it is served once the
// table is applied); the test fails if sluice exits first.
func (d *liveDaemon) waitCtl() {
	t := d.t
	t.Helper()
	waitFor(t, 10*time.Second, "the control socket", func() bool {
		select {
		case err := <-d.exited:
			d.exited <- err
			t.Fatalf("sluice exited: %v\n%s", err, d.stderr.String())
		default:
		}
		_, err := d.tryStatus()
		return err == nil
	})
}

func ctlCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 10*time.Second)
}

func (d *liveDaemon) tryStatus() (*ctl.Status, error) {
	ctx, cancel := ctlCtx()
	defer cancel()
	return ctl.QueryStatus(ctx, d.sock, ctl.Options{Name: "it-status"})
}

func (d *liveDaemon) status() *ctl.Status {
	d.t.Helper()
	st, err := d.tryStatus()
	if err != nil {
		d.t.Fatalf("ctl status: %v\n%s", err, tail(d.stderr.String(), 3000))
	}
	return st
}

// waitNoWriter waits until no writing transaction is open: a vanished
// client's transaction has been wound down (rolled back, or its commit
// done).
func (d *liveDaemon) waitNoWriter() {
	d.t.Helper()
	waitFor(d.t, 10*time.Second, "the writer slot to be free", func() bool { return !d.status().Writer })
}

// write opens a writing transaction and reads pifs and the table. A busy
// answer — a vanished client's transaction still winding down — is retried
// for up to 5 s.
func (d *liveDaemon) write(ctx context.Context) (*ctl.Client, *ctl.Table) {
	d.t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		c, err := ctl.Dial(ctx, d.sock, ctl.Options{Name: "it-write"})
		if err != nil {
			d.t.Fatal(err)
		}
		err = c.Hello(ctx, ctl.IntentWrite)
		if ctl.CodeOf(err) == ctl.CodeBusy && time.Now().Before(deadline) {
			c.Close()
			continue
		}
		if err != nil {
			c.Close()
			d.t.Fatal(err)
		}
		if _, err := c.Pifs(ctx); err != nil {
			c.Close()
			d.t.Fatal(err)
		}
		tb, err := c.List(ctx)
		if err != nil {
			c.Close()
			d.t.Fatal(err)
		}
		return c, tb
	}
}

// apply replaces the table with tb's rules in one transaction through the
// client library and commits it; the verdict must be good. It returns the
// summary and the committed generation.
func (d *liveDaemon) apply(tb liveTable) (*ctl.Summary, uint64) {
	d.t.Helper()
	ctx, cancel := ctlCtx()
	defer cancel()
	c, cur := d.write(ctx)
	defer c.Close()
	if _, err := c.Load(ctx, cur.Generation, tb.rules(d.t)); err != nil {
		d.t.Fatalf("load: %v", err)
	}
	sum, err := c.Apply(ctx, 0)
	if err != nil {
		d.t.Fatalf("apply: %v", err)
	}
	if !sum.OK {
		d.t.Fatalf("apply: verdict bad: %q", sum.Failures())
	}
	gen, err := c.Commit(ctx)
	if err != nil {
		d.t.Fatalf("commit: %v", err)
	}
	if gen != cur.Generation+1 {
		d.t.Fatalf("committed generation %d on generation %d", gen, cur.Generation)
	}
	return sum, gen
}

// cli runs `sluice ctl -s SOCKET ARGS...` to its end.
func (d *liveDaemon) cli(args ...string) (code int, stdout, stderr string) {
	d.t.Helper()
	return runSluice(d.t, append([]string{"ctl", "-s", d.sock}, args...)...)
}

// list runs `sluice ctl list` and returns the generation and the rule lines
// it printed.
func (d *liveDaemon) list() (uint64, []string) {
	d.t.Helper()
	code, out, errs := d.cli("list")
	if code != 0 {
		d.t.Fatalf("sluice ctl list: exit %d\n%s%s", code, out, errs)
	}
	ls := lines(out)
	g, ok := strings.CutPrefix(ls[0], "# generation ")
	gen, err := strconv.ParseUint(g, 10, 64)
	if !ok || err != nil {
		d.t.Fatalf("sluice ctl list: first line %q, want # generation N", ls[0])
	}
	return gen, ls[1:]
}

// listening returns the loopback TCP ports the daemon holds in LISTEN
// state: the /proc/net/tcp entries in state 0A whose socket inode is one of
// the daemon's fds (procListens).
func (d *liveDaemon) listening() map[int]bool {
	d.t.Helper()
	ports := map[int]bool{}
	for p := range d.listenInodes() {
		ports[p] = true
	}
	return ports
}

// listenInodes returns the socket inode of each loopback TCP port the
// daemon holds in LISTEN state: a socket kept across a change keeps its
// inode.
func (d *liveDaemon) listenInodes() map[int]string {
	d.t.Helper()
	inodes := socketInodes(d.t, d.cmd.Process.Pid)
	ports := map[int]string{}
	for _, name := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		for _, l := range procListens(d.t, name) {
			if !inodes[l.inode] {
				continue
			}
			addr, port, _ := strings.Cut(l.local, ":")
			if addr != "0100007F" {
				d.t.Fatalf("the daemon listens on %s, not 127.0.0.1 (%s)", l.local, name)
			}
			p, err := strconv.ParseUint(port, 16, 16)
			if err != nil {
				d.t.Fatalf("%s: %q: %v", name, l.local, err)
			}
			ports[int(p)] = l.inode
		}
	}
	return ports
}

// procListen is a socket in LISTEN state from a /proc/net/tcp table: its
// local address as the kernel writes it (hex "ADDR:PORT") and its inode.
type procListen struct{ local, inode string }

// procListens reads the LISTEN entries of a /proc net/tcp or net/tcp6 table.
// The kernel lists its listening sockets first (the listening hash, then the
// established one), so reading stops at the first entry in another state:
// the rest, tens of thousands of TIME_WAIT entries while other tests run, is
// never generated.
func procListens(t testing.TB, name string) []procListen {
	t.Helper()
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []procListen
	sc := bufio.NewScanner(f)
	sc.Scan() // the header
	for sc.Scan() {
		// sl local rem st tx:rx tr:when retrnsmt uid timeout inode
		fs := strings.Fields(sc.Text())
		if len(fs) < 10 || fs[3] != "0A" {
			break
		}
		out = append(out, procListen{local: fs[1], inode: fs[9]})
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return out
}

// liveTable is a rule table as a test means it: canonical rule lines, and
// for each port the daemon must listen on, the backend its rule forwards
// to.
type liveTable struct {
	lines []string
	via   map[int]*testpeer.Backend
}

// tcpRule is one rule of a liveTable: ports lo to hi on 127.0.0.1 to b.
type tcpRule struct {
	lo, hi int
	b      *testpeer.Backend
	opts   string
}

func tableOf(t *testing.T, rs ...tcpRule) liveTable {
	t.Helper()
	tb := liveTable{via: map[int]*testpeer.Backend{}}
	for _, r := range rs {
		line := fmt.Sprintf("tcp 127.0.0.1:%d -> %s %s", r.lo, r.b.Addr(), r.opts)
		if r.hi > r.lo {
			line = fmt.Sprintf("tcp 127.0.0.1:%d-%d -> %s %s", r.lo, r.hi, r.b.Addr(), r.opts)
		}
		p, err := rules.Parse(line)
		if err != nil {
			t.Fatalf("%q: %v", line, err)
		}
		tb.lines = append(tb.lines, p.String())
		for port := r.lo; port <= max(r.lo, r.hi); port++ {
			tb.via[port] = r.b
		}
	}
	return tb
}

func (tb liveTable) rules(t testing.TB) []*rules.Rule {
	t.Helper()
	rs := make([]*rules.Rule, len(tb.lines))
	for i, l := range tb.lines {
		r, err := rules.Parse(l)
		if err != nil {
			t.Fatal(err)
		}
		rs[i] = r
	}
	return rs
}

// file writes the table as a rules file for `sluice ctl apply`.
func (tb liveTable) file(t *testing.T, name string) string {
	t.Helper()
	return writeFile(t, name, "# written by "+t.Name()+"\n"+strings.Join(tb.lines, "\n")+"\n")
}

func (tb liveTable) ports() []int {
	var ps []int
	for p := range tb.via {
		ps = append(ps, p)
	}
	slices.Sort(ps)
	return ps
}

// checkActive checks that want, exactly, is the active table at generation
// gen: `sluice ctl list` prints its lines; the daemon's LISTEN sockets in
// /proc/net/tcp are its ports, no more, no less; each of its ports forwards
// to its rule's backend, byte-exact; and every port of the other tables that
// want does not have is refused. Ports in skip (held by another process)
// are not dialed.
func (d *liveDaemon) checkActive(want liveTable, gen uint64, others []liveTable, skip ...int) {
	t := d.t
	t.Helper()
	g, got := d.list()
	if g != gen || !slices.Equal(got, want.lines) {
		t.Fatalf("sluice ctl list: generation %d, rules\n  %s\nwant generation %d, rules\n  %s",
			g, strings.Join(got, "\n  "), gen, strings.Join(want.lines, "\n  "))
	}
	ln := d.listening()
	var lnPorts []int
	for p := range ln {
		lnPorts = append(lnPorts, p)
	}
	slices.Sort(lnPorts)
	if !slices.Equal(lnPorts, want.ports()) {
		t.Fatalf("/proc/net/tcp: the daemon listens on %v, want %v", lnPorts, want.ports())
	}
	for _, p := range want.ports() {
		if slices.Contains(skip, p) {
			continue
		}
		b := want.via[p]
		before := b.Served.Load()
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", p), 5*time.Second)
		if err != nil {
			t.Fatalf("port %d of the active table: %v", p, err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		err = testpeer.Exchange(c, 2<<10, 2<<10, rand.Uint64())
		c.Close()
		if err != nil {
			t.Fatalf("port %d of the active table: %v", p, err)
		}
		// The backend counts an exchange just after it sent the trailer.
		waitFor(t, 5*time.Second, fmt.Sprintf("port %d's exchange at backend %s", p, b.Addr()), func() bool {
			return b.Served.Load() == before+1
		})
	}
	for _, o := range others {
		for _, p := range o.ports() {
			if want.via[p] != nil || slices.Contains(skip, p) {
				continue
			}
			c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", p), 5*time.Second)
			if err == nil {
				c.Close()
				t.Fatalf("port %d, not in the active table, accepted a connection", p)
			}
			if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Fatalf("port %d, not in the active table: %v, want connection refused", p, err)
			}
		}
	}
}

// pacedSession is a testpeer exchange whose upload goes one chunk per
// token, so that it stays open mid-stream for as long as a test hands out
// tokens; once released, the rest flows and the exchange is checked
// byte for byte.
type pacedSession struct {
	tokens  chan struct{}
	release func()
	done    chan error
}

const pacedChunk = 1 << 10

// startPaced opens a session through addr with an upload of chunks chunks;
// the header and the first chunk go at once.
func startPaced(t *testing.T, addr string, chunks int, seed uint64) *pacedSession {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	tc := c.(*net.TCPConn)
	tc.SetDeadline(time.Now().Add(2 * time.Minute))
	ps := &pacedSession{tokens: make(chan struct{}, chunks+2), done: make(chan error, 1)}
	var once sync.Once
	ps.release = func() { once.Do(func() { close(ps.tokens) }) }
	ps.tokens <- struct{}{}
	ps.tokens <- struct{}{}
	go func() {
		ps.done <- testpeer.Exchange(&pacedConn{TCPConn: tc, tokens: ps.tokens}, int64(chunks*pacedChunk), 256<<10, seed)
		tc.Close()
	}()
	t.Cleanup(func() { ps.release(); tc.Close() })
	return ps
}

// step lets one more chunk go.
func (ps *pacedSession) step() { ps.tokens <- struct{}{} }

// finish lets the rest go and returns the exchange's verdict.
func (ps *pacedSession) finish() error {
	ps.release()
	select {
	case err := <-ps.done:
		return err
	case <-time.After(30 * time.Second):
		return errors.New("the session did not end within 30 s of its release")
	}
}

// pacedConn writes pacedChunk bytes per token (the first write, the
// exchange's 16-byte header, takes one too).
type pacedConn struct {
	*net.TCPConn
	tokens chan struct{}
}

func (p *pacedConn) Write(b []byte) (int, error) {
	n := 0
	for len(b) > 0 {
		select {
		case <-p.tokens:
		case <-time.After(time.Minute):
			return n, errors.New("paced session: no token for a minute")
		}
		k := min(len(b), pacedChunk)
		w, err := p.TCPConn.Write(b[:k])
		n += w
		if err != nil {
			return n, err
		}
		b = b[k:]
	}
	return n, nil
}

// connTally counts a client loop's connections and how they failed.
type connTally struct {
	ok, refused, reset, other atomic.Int64
	mu                        sync.Mutex
	first                     []string
}

func (c *connTally) fail(err error) {
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		c.refused.Add(1)
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE), isReset(err):
		c.reset.Add(1)
	default:
		c.other.Add(1)
	}
	c.mu.Lock()
	if len(c.first) < 5 {
		c.first = append(c.first, err.Error())
	}
	c.mu.Unlock()
}

func (c *connTally) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return fmt.Sprintf("%d ok, %d refused, %d reset, %d other failures %q",
		c.ok.Load(), c.refused.Load(), c.reset.Load(), c.other.Load(), c.first)
}

// hammer connects to addr up to max times in a row, until stop is closed,
// and runs use on each connection (nil: closes it at once), counting in
// tally how each went.
func hammer(wg *sync.WaitGroup, addr string, max int, stop <-chan struct{}, tally *connTally, use func(c net.Conn, i int) error) {
	defer wg.Done()
	for i := 0; i < max; i++ {
		select {
		case <-stop:
			return
		default:
		}
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			tally.fail(err)
			continue
		}
		if use != nil {
			c.SetDeadline(time.Now().Add(10 * time.Second))
			err = use(c, i)
		}
		c.Close()
		if err != nil {
			tally.fail(err)
			continue
		}
		tally.ok.Add(1)
	}
}

// Continuity: while one client connects and closes in a tight loop on a
// port whose rule never changes, and another runs small exchanges on it,
// 100 transactions (one in five a `sluice ctl apply` process, the others
// through the client library) change the other rules: a target, a port
// range removed and added, a port added and removed. No connection to the
// unchanged port is refused or reset, and a session on it that was opened
// before the first apply and paced to need a token after each one finishes
// byte-exact after the last.
func TestCtlContinuity(t *testing.T) {
	const applies = 100
	b1, b2 := hashBackend(t), hashBackend(t)
	base := freeRange(t, 5)
	same, x, y, z := base, base+1, base+2, base+4
	even := tableOf(t, tcpRule{lo: same, b: b1}, tcpRule{lo: x, b: b1}, tcpRule{lo: y, hi: y + 1, b: b1})
	odd := tableOf(t, tcpRule{lo: same, b: b1}, tcpRule{lo: x, b: b2}, tcpRule{lo: z, b: b2, opts: "splice=off"})
	tables := [2]liveTable{odd, even}
	files := [2]string{odd.file(t, "odd.rules"), even.file(t, "even.rules")}
	d := startLive(t, even)
	gen0 := d.status().Generation
	addr := fmt.Sprintf("127.0.0.1:%d", same)

	session := startPaced(t, addr, applies+2, 7)
	waitFor(t, 5*time.Second, "the long session to reach its backend", func() bool { return b1.Conns() == 1 })

	// Bounded in count (and by the applies' own bound in time).
	const maxKnocks, maxExchanges = 30000, 5000
	var knocks, exchanges connTally
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go hammer(&wg, addr, maxKnocks, stop, &knocks, nil)
	go hammer(&wg, addr, maxExchanges, stop, &exchanges, func(c net.Conn, i int) error {
		return testpeer.Exchange(c, int64(1+i%300), 64, uint64(i))
	})
	stopLoops := sync.OnceFunc(func() { close(stop); wg.Wait() })
	t.Cleanup(stopLoops)

	start := time.Now()
	deadline := start.Add(90 * time.Second)
	cliApplies := 0
	for i := range applies {
		if time.Now().After(deadline) {
			t.Fatalf("only %d applies in %v", i, time.Since(start))
		}
		want := tables[i%2]
		gen := gen0 + uint64(i) + 1
		if i%5 == 4 {
			cliApplies++
			code, out, errs := d.cli("apply", files[i%2])
			if code != 0 || !strings.Contains(out, fmt.Sprintf("verdict good: committed generation %d", gen)) {
				t.Fatalf("apply %d: sluice ctl apply: exit %d\n%s%s", i, code, out, errs)
			}
		} else {
			sum, g := d.apply(want)
			// The unchanged rule's socket and x's move; y's range or z
			// is bound anew and the other paused.
			added, removed := 1, 2
			if i%2 == 1 {
				added, removed = 2, 1
			}
			if g != gen || sum.Kept != 2 || sum.Added != added || sum.Removed != removed {
				t.Fatalf("apply %d: generation %d, kept %d added %d removed %d; want %d, 2, %d, %d",
					i, g, sum.Kept, sum.Added, sum.Removed, gen, added, removed)
			}
		}
		session.step()
	}
	took := time.Since(start)
	during := knocks.ok.Load() + exchanges.ok.Load()
	stopLoops()
	if err := session.finish(); err != nil {
		t.Fatalf("the long session across %d applies: %v\n%s", applies, err, tail(d.stderr.String(), 3000))
	}
	t.Logf("%d applies (%d by `sluice ctl apply`) in %v; meanwhile on the unchanged port: connect+close %v; exchanges %v",
		applies, cliApplies, took.Round(time.Millisecond), &knocks, &exchanges)
	if knocks.refused.Load()+knocks.reset.Load()+knocks.other.Load() != 0 ||
		exchanges.refused.Load()+exchanges.reset.Load()+exchanges.other.Load() != 0 {
		t.Fatalf("connections to the unchanged port failed: connect+close %v; exchanges %v\n%s", &knocks, &exchanges, tail(d.stderr.String(), 3000))
	}
	if during < applies {
		t.Fatalf("only %d connections during %d applies: the loops did not overlap them", during, applies)
	}
	if f := b1.Failures.Load() + b2.Failures.Load(); f != 0 {
		t.Fatalf("%d backend exchanges failed: %v %v", f, b1.LastErr.Load(), b2.LastErr.Load())
	}
	d.checkActive(tables[(applies-1)%2], gen0+applies, tables[:])
}

// Bind conflict: a port another process holds makes the verdict bad, the
// CLI prints the contract's line, rolls back and exits 3, and the old table
// is still the active one, serving; a weak rule whose range binds at least
// one port is committed (exit 0) with the failure reported, while a weak
// rule that binds nothing still fails.
func TestCtlBindConflict(t *testing.T) {
	b := hashBackend(t)
	base := freeRange(t, 4)
	a, q, held := base, base+1, base+2
	holder, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", held))
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close()
	old := tableOf(t, tcpRule{lo: a, b: b})
	d := startLive(t, old)
	gen0 := d.status().Generation
	top := d.t
	defer func() { d.t = top }()
	inUse := fmt.Sprintf("tcp 127.0.0.1:%d: port %d: address already in use", held, held)

	t.Run("strict", func(t *testing.T) {
		d.t = t
		bad := tableOf(t, tcpRule{lo: a, b: b}, tcpRule{lo: q, b: b}, tcpRule{lo: held, b: b})
		code, out, errs := d.cli("apply", bad.file(t, "bad.rules"))
		if code != 3 || !slices.Contains(lines(out), inUse) ||
			!strings.Contains(out, fmt.Sprintf("rolled back; generation %d is still active", gen0)) {
			t.Fatalf("sluice ctl apply: exit %d, want 3 and the line %q\n%s%s", code, inUse, out, errs)
		}
		// q was bound by the apply and closed by the rollback.
		d.checkActive(old, gen0, []liveTable{bad}, held)
	})
	t.Run("weak binds nothing", func(t *testing.T) {
		d.t = t
		bad := tableOf(t, tcpRule{lo: a, b: b}, tcpRule{lo: held, b: b, opts: "weak"})
		code, out, errs := d.cli("apply", bad.file(t, "weak1.rules"))
		if code != 3 || !slices.Contains(lines(out), inUse) {
			t.Fatalf("sluice ctl apply: exit %d, want 3 and the line %q\n%s%s", code, inUse, out, errs)
		}
		d.checkActive(old, gen0, []liveTable{bad}, held)
	})
	t.Run("weak", func(t *testing.T) {
		d.t = t
		weak := tableOf(t, tcpRule{lo: a, b: b}, tcpRule{lo: held, hi: held + 1, b: b, opts: "weak"})
		delete(weak.via, held) // only held+1 binds
		code, out, errs := d.cli("apply", weak.file(t, "weak2.rules"))
		rangeInUse := fmt.Sprintf("tcp 127.0.0.1:%d-%d: port %d: address already in use", held, held+1, held)
		if code != 0 || !slices.Contains(lines(out), rangeInUse) || !strings.Contains(out, "(weak: ignored)") ||
			!strings.Contains(out, fmt.Sprintf("committed generation %d", gen0+1)) {
			t.Fatalf("sluice ctl apply: exit %d, want 0 and the line %q\n%s%s", code, rangeInUse, out, errs)
		}
		d.checkActive(weak, gen0+1, []liveTable{old}, held)
	})
}

// vanishStep is a point of a writing transaction where its client vanishes.
type vanishStep struct {
	name   string
	calls  int         // library calls after Dial: Hello, Pifs, List, Load, Apply, Commit or Rollback
	sent   ctl.MsgType // vanish once this message is sent, before its answer is read; 0: after the last call returned
	commit bool        // the seventh call commits (else it rolls back)
}

// committed says whether the new table stands after the client vanished:
// only once COMMIT has reached the server.
func (s vanishStep) committed() bool { return s.sent == ctl.MsgCommit }

var vanishSteps = []vanishStep{
	{name: "1-hello-read"},
	{name: "2-client-hello-sent", calls: 1, sent: ctl.MsgClientHello},
	{name: "3-pifs-read", calls: 2},
	{name: "4-rules-read", calls: 3},
	{name: "5-load-sent", calls: 4, sent: ctl.MsgLoad},
	{name: "6-loaded-read", calls: 4},
	{name: "7-apply-sent", calls: 5, sent: ctl.MsgApply},
	{name: "8-summary-read", calls: 5},
	{name: "9-commit-sent", calls: 6, sent: ctl.MsgCommit, commit: true},
	{name: "9-rollback-sent", calls: 6, sent: ctl.MsgRollback},
}

// errVanish is what a test's hook returns to make the client vanish.
var errVanish = errors.New("vanish")

// vanishAt runs a writing transaction that replaces the table with rs up to
// step s, and there calls at: at the seam of a message sent through the
// ctl.Client.OnSent hook, else once the step's call returned. It returns
// the first error.
func vanishAt(sock string, s vanishStep, rs []*rules.Rule, at func() error) error {
	ctx, cancel := ctlCtx()
	defer cancel()
	c, err := ctl.Dial(ctx, sock, ctl.Options{Name: "it-vanish"})
	if err != nil {
		return err
	}
	defer c.Close()
	if s.sent != 0 {
		if err := c.OnSent(s.sent, at); err != nil {
			return err
		}
	}
	var gen uint64
	calls := []func() error{
		func() error { return c.Hello(ctx, ctl.IntentWrite) },
		func() error { _, err := c.Pifs(ctx); return err },
		func() error {
			tb, err := c.List(ctx)
			if err == nil {
				gen = tb.Generation
			}
			return err
		},
		func() error { _, err := c.Load(ctx, gen, rs); return err },
		func() error {
			sum, err := c.Apply(ctx, 0)
			if err == nil && !sum.OK {
				err = fmt.Errorf("verdict bad: %q", sum.Failures())
			}
			return err
		},
		func() error {
			if s.commit {
				_, err := c.Commit(ctx)
				return err
			}
			_, err := c.Rollback(ctx)
			return err
		},
	}
	for _, call := range calls[:s.calls] {
		if err := call(); err != nil {
			return err
		}
	}
	if s.sent != 0 {
		return fmt.Errorf("the step's call returned without sending %s", s.sent)
	}
	return at()
}

// The helper process of TestCtlVanish's killed clients: this test binary
// re-run with vanishEnv set to a vanishJob. It runs the transaction to the
// step, prints "at STEP", and waits there to be killed (it gives up when
// its stdin closes, or after a minute).
const vanishEnv = "SLUICE_IT_CTL_VANISH"

type vanishJob struct {
	Sock  string
	Step  string
	Lines []string
}

func init() {
	if v := os.Getenv(vanishEnv); v != "" {
		os.Exit(vanishHelper(v))
	}
}

func vanishHelper(v string) int {
	var job vanishJob
	if err := json.Unmarshal([]byte(v), &job); err != nil {
		fmt.Println("error:", err)
		return 1
	}
	i := slices.IndexFunc(vanishSteps, func(s vanishStep) bool { return s.name == job.Step })
	if i < 0 {
		fmt.Println("error: no step", job.Step)
		return 1
	}
	rs := make([]*rules.Rule, len(job.Lines))
	for k, l := range job.Lines {
		r, err := rules.Parse(l)
		if err != nil {
			fmt.Println("error:", err)
			return 1
		}
		rs[k] = r
	}
	err := vanishAt(job.Sock, vanishSteps[i], rs, func() error {
		fmt.Println("at", job.Step)
		gone := make(chan struct{})
		go func() { bufio.NewReader(os.Stdin).ReadString('\n'); close(gone) }()
		select {
		case <-gone:
		case <-time.After(time.Minute):
		}
		return errors.New("not killed")
	})
	fmt.Println("error:", err)
	return 1
}

// killAt runs the helper process to step s and kills it there, by its pid.
func killAt(t *testing.T, sock string, s vanishStep, tb liveTable) {
	t.Helper()
	job, _ := json.Marshal(vanishJob{Sock: sock, Step: s.name, Lines: tb.lines})
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), vanishEnv+"="+string(job))
	cmd.Stderr = os.Stderr
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer stdin.Close()
	line := make(chan string, 1)
	go func() {
		l, _ := bufio.NewReader(stdout).ReadString('\n')
		line <- strings.TrimSpace(l)
	}()
	select {
	case l := <-line:
		if l != "at "+s.name {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("helper: %q, want %q", l, "at "+s.name)
		}
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("helper did not reach step %s in 10 s", s.name)
	}
	if err := syscall.Kill(cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	err := cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("helper: %v, want killed", err)
	}
}

// Fault injection with the real engine: a writing transaction's client
// vanishes after each step in turn — its socket closed, or its process
// killed — and afterwards the active table is exactly the old one (before
// COMMIT reached the daemon) or exactly the new one (after), by `sluice ctl
// list`, by the daemon's LISTEN sockets in /proc/net/tcp, and by connecting
// to every port of both tables: the kept port, the one whose target
// changed (which backend answers), the removed one and the added range.
func TestCtlVanish(t *testing.T) {
	b1, b2 := hashBackend(t), hashBackend(t)
	base := freeRange(t, 5)
	a, bp, c, dp := base, base+1, base+2, base+3
	old := tableOf(t, tcpRule{lo: a, b: b1}, tcpRule{lo: bp, b: b1}, tcpRule{lo: c, b: b1})
	next := tableOf(t, tcpRule{lo: a, b: b1}, tcpRule{lo: bp, b: b2}, tcpRule{lo: dp, hi: dp + 1, b: b2})
	both := []liveTable{old, next}
	d := startLive(t, old)
	top := d.t
	for _, mode := range []string{"close", "kill"} {
		for _, s := range vanishSteps {
			t.Run(mode+"/"+s.name, func(t *testing.T) {
				d.t = t
				defer func() { d.t = top }()
				d.waitNoWriter() // the previous client's session may still be ending
				gen := d.status().Generation
				if mode == "close" {
					err := vanishAt(d.sock, s, next.rules(t), func() error { return errVanish })
					if !errors.Is(err, errVanish) {
						t.Fatalf("the client did not vanish at %s: %v", s.name, err)
					}
				} else {
					killAt(t, d.sock, s, next)
				}
				d.waitNoWriter()
				if s.committed() {
					d.checkActive(next, gen+1, both)
					d.apply(old) // back to the old table for the next step
					return
				}
				d.checkActive(old, gen, both)
			})
		}
	}
	if f := b1.Failures.Load() + b2.Failures.Load(); f != 0 {
		t.Fatalf("%d backend exchanges failed: %v %v", f, b1.LastErr.Load(), b2.LastErr.Load())
	}
}

// A second writer is told busy at once (the CLI exits 4 without waiting)
// while readers are served beside the open transaction; a load built on a
// generation that is no longer active is refused. Sessions established
// before an apply keep running across it, across the rollback, and across
// a later commit — on the kept port, on the port whose rule changed, and on
// the port whose rule was removed.
func TestCtlBusyAndSessions(t *testing.T) {
	b1, b2 := hashBackend(t), hashBackend(t)
	base := freeRange(t, 4)
	a, bp, c, dp := base, base+1, base+2, base+3
	old := tableOf(t, tcpRule{lo: a, b: b1}, tcpRule{lo: bp, b: b1}, tcpRule{lo: c, b: b1})
	next := tableOf(t, tcpRule{lo: a, b: b1}, tcpRule{lo: bp, b: b2, opts: "splice=off"}, tcpRule{lo: dp, b: b2})
	both := []liveTable{old, next}
	nextFile := next.file(t, "next.rules")
	d := startLive(t, old)
	gen0 := d.status().Generation

	var sessions []*pacedSession
	for i, p := range []int{a, bp, c} {
		// Four steps below; the upload needs two more chunks than those, so
		// each session is still mid-stream after the last one.
		sessions = append(sessions, startPaced(t, fmt.Sprintf("127.0.0.1:%d", p), 4+2, uint64(100+i)))
	}
	waitFor(t, 5*time.Second, "the sessions to reach their backend", func() bool { return b1.Conns() == 3 })
	step := func() {
		for _, s := range sessions {
			s.step()
		}
	}

	// A writer applies the new table and holds the transaction open.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	w, cur := d.write(ctx)
	defer w.Close()
	if cur.Generation != gen0 {
		t.Fatalf("generation %d, want %d", cur.Generation, gen0)
	}
	if _, err := w.Load(ctx, cur.Generation, next.rules(t)); err != nil {
		t.Fatal(err)
	}
	sum, err := w.Apply(ctx, 20*time.Second)
	if err != nil || !sum.OK {
		t.Fatalf("apply: %+v, %v", sum, err)
	}
	step()
	// Pending: the removed port is paused (out of LISTEN), the added one
	// listens.
	if got, want := d.listening(), next.via; len(got) != len(want) || !got[a] || !got[bp] || !got[dp] {
		t.Fatalf("pending apply: the daemon listens on %v, want %v", got, next.ports())
	}

	// A second writer, by the CLI and by the library: busy, at once.
	started := time.Now()
	code, out, errs := d.cli("apply", nextFile)
	if took := time.Since(started); code != 4 || !strings.Contains(errs, "busy") || took > 3*time.Second {
		t.Fatalf("sluice ctl apply during a transaction: exit %d after %v, want 4 at once\n%s%s", code, took, out, errs)
	}
	func() {
		c2, err := ctl.Dial(ctx, d.sock, ctl.Options{Name: "it-second"})
		if err != nil {
			t.Fatal(err)
		}
		defer c2.Close()
		if err := c2.Hello(ctx, ctl.IntentWrite); ctl.CodeOf(err) != ctl.CodeBusy {
			t.Fatalf("second writer: %v, want busy", err)
		}
	}()
	// Readers, several at once, beside the writer.
	var wg sync.WaitGroup
	readerErrs := make(chan string, 8)
	for range 4 {
		wg.Add(2)
		go func() {
			defer wg.Done()
			code, out, errs := runSluice(t, "ctl", "-s", d.sock, "status")
			if code != 0 || !strings.Contains(out, "a transaction is open") {
				readerErrs <- fmt.Sprintf("status: exit %d\n%s%s", code, out, errs)
			}
		}()
		go func() {
			defer wg.Done()
			code, out, errs := runSluice(t, "ctl", "-s", d.sock, "list")
			if code != 0 || !strings.HasPrefix(out, fmt.Sprintf("# generation %d\n", gen0)) {
				readerErrs <- fmt.Sprintf("list: exit %d\n%s%s", code, out, errs)
			}
		}()
	}
	wg.Wait()
	close(readerErrs)
	for e := range readerErrs {
		t.Error("reader during the transaction:", e)
	}
	if st := d.status(); !st.Writer || st.Sessions < 3 {
		t.Fatalf("status during the transaction: %+v, want a writer and 3 sessions at least", st)
	}
	step()

	// Rollback: the old table is back, its removed port listens again.
	rsum, err := w.Rollback(ctx)
	if err != nil || !rsum.OK || rsum.Generation != gen0 {
		t.Fatalf("rollback: %+v, %v", rsum, err)
	}
	w.Close()
	step()
	d.checkActive(old, gen0, both)

	// A reader's generation goes stale with the next commit.
	stale, _ := d.list()
	code, out, errs = d.cli("apply", nextFile)
	if code != 0 {
		t.Fatalf("sluice ctl apply: exit %d\n%s%s", code, out, errs)
	}
	step()
	d.checkActive(next, gen0+1, both)
	w2, _ := d.write(ctx)
	defer w2.Close()
	if _, err := w2.Load(ctx, stale, old.rules(t)); ctl.CodeOf(err) != ctl.CodeStaleGeneration {
		t.Fatalf("load on generation %d after a commit: %v, want stale-generation", stale, err)
	}

	for i, s := range sessions {
		if err := s.finish(); err != nil {
			t.Errorf("session %d across apply, rollback and commit: %v", i, err)
		}
	}
	if f := b1.Failures.Load() + b2.Failures.Load(); f != 0 {
		t.Fatalf("%d backend exchanges failed: %v %v", f, b1.LastErr.Load(), b2.LastErr.Load())
	}
}
