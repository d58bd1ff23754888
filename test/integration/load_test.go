package integration

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// The reliability suite (docs/reliability.md): load with every byte
// checked, hostile clients, faults. `make test` runs the short forms;
// `make soak` sets SLUICE_SOAK and the same tests run longer forms, in
// rounds, until their share of that time is spent.

// soakEnv is the total time of a soak run (a Go duration), shared by the
// soak tests; unset, the tests run their short forms.
const soakEnv = "SLUICE_SOAK"

// soakTests is how many tests share the soak time (SOAK_TESTS of the
// Makefile).
const soakTests = 11

// soakFor returns this test's share of the soak time, 0 for the short form.
func soakFor(t testing.TB) time.Duration {
	t.Helper()
	s := os.Getenv(soakEnv)
	if s == "" {
		return 0
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		t.Fatalf("%s=%q: want a positive Go duration (10m, 1h)", soakEnv, s)
	}
	return d / soakTests
}

// rounds runs round(i) at least once, and again while the soak share lasts
// (at most maxRounds times): every loop of the suite is bounded in count
// and in time.
func rounds(t *testing.T, maxRounds int, round func(i int)) int {
	t.Helper()
	share := soakFor(t)
	end := time.Now().Add(share)
	n := 0
	for n < maxRounds && !t.Failed() && (n == 0 || time.Now().Before(end)) {
		round(n)
		n++
	}
	if share > 0 {
		t.Logf("soak: %d rounds in %v", n, share)
	}
	return n
}

func init() {
	// A chaos backend (internal/testpeer): serves planned exchanges, resets
	// the ones whose plan says so, checks every byte. It listens on
	// $SLUICE_IT_PEER_LISTEN when set (a backend restarted on its port).
	peerRoles["chaos"] = func() (string, func() any, func(), error) {
		addr := os.Getenv(peerListenEnv)
		if addr == "" {
			addr = "127.0.0.1:0"
		}
		b, err := testpeer.ListenChaos(addr)
		if err != nil {
			return "", nil, nil, err
		}
		return b.Addr(), func() any { return b.Stats() }, b.Close, nil
	}
}

// peerListenEnv tells a peer which address to listen on.
const peerListenEnv = "SLUICE_IT_PEER_LISTEN"

// chaosPeer starts a chaos backend in a peer process (listening on addr
// when given), so that it can be killed by its pid.
func chaosPeer(t testing.TB, addr string) *peer {
	t.Helper()
	os.Setenv(peerListenEnv, addr)
	defer os.Unsetenv(peerListenEnv)
	return startPeer(t, "chaos")
}

// chaosStats returns a chaos peer's counts once it serves no conn (the
// last exchanges are counted a moment after their client is done), or
// after 10 s.
func chaosStats(t testing.TB, p *peer) testpeer.ChaosStats {
	t.Helper()
	var s testpeer.ChaosStats
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		p.stats(t, &s)
		if s.Open == 0 || time.Now().After(deadline) {
			return s
		}
	}
}

// configDaemon is `sluice run -c` on a generated file, with a metrics
// endpoint: the engine's gauges and counters are read from it.
type configDaemon struct {
	*daemon
	listens []string // one per rule, in order
	metrics string   // http://ADDR/metrics
}

// startConfig runs sluice on a file of the given top-level lines and
// rules; each "{listen}" in a rule becomes a free loopback address. The log
// level is warn unless a top line says otherwise.
func startConfig(t *testing.T, o forwardOpts, top []string, rules ...string) *configDaemon {
	t.Helper()
	metrics := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	var b strings.Builder
	fmt.Fprintf(&b, "metrics: {listen: %s}\n", metrics)
	if !slices.ContainsFunc(top, func(l string) bool { return strings.HasPrefix(l, "log:") }) {
		b.WriteString("log: {level: warn}\n")
	}
	for _, l := range top {
		b.WriteString(l + "\n")
	}
	b.WriteString("rules:\n")
	var listens []string
	for _, r := range rules {
		addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
		listens = append(listens, addr)
		fmt.Fprintf(&b, "  - %s\n", strings.ReplaceAll(r, "{listen}", addr))
	}
	file := writeFile(t, "sluice.yaml", b.String())
	d := startDaemon(t, o, "run", "-c", file)
	for _, a := range listens {
		d.waitListening(a)
	}
	d.waitListening(metrics)
	return &configDaemon{daemon: d, listens: listens, metrics: "http://" + metrics + "/metrics"}
}

var metricsClient = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

// scrape reads every sample of the metrics endpoint, keyed by name and
// labels as written (sluice_sessions_ended_total{code="1",reason="done"}).
func (d *configDaemon) scrape() (map[string]float64, error) {
	resp, err := metricsClient.Get(d.metrics)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	m := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			m[line[:i]] = v
		}
	}
	return m, sc.Err()
}

func (d *configDaemon) mustScrape(t testing.TB) map[string]float64 {
	t.Helper()
	m, err := d.scrape()
	if err != nil {
		t.Fatalf("metrics: %v\n%s", err, tail(d.stderr.String(), 3000))
	}
	return m
}

// ended is the sample of sessions ended with a code.
func ended(code int, reason string) string {
	return fmt.Sprintf(`sluice_sessions_ended_total{code="%d",reason="%s"}`, code, reason)
}

// endedDelta returns, by reason, how many more sessions ended in after than
// in before (only the reasons that moved).
func endedDelta(before, after map[string]float64) map[string]float64 {
	out := map[string]float64{}
	for k, v := range after {
		if !strings.HasPrefix(k, "sluice_sessions_ended_total{") {
			continue
		}
		if d := v - before[k]; d != 0 {
			r := k[strings.Index(k, `reason="`)+8:]
			out[r[:strings.IndexByte(r, '"')]] = d
		}
	}
	return out
}

// snapshot is the daemon's resources at one moment.
type snapshot struct {
	fds map[string]int
	rss int64
	m   map[string]float64
}

func (s snapshot) String() string {
	return fmt.Sprintf("fds %v, RSS %d KiB, sessions %v, buffers in use %v, pipes in use %v, pipes open %v",
		s.fds, s.rss>>10, s.m["sluice_sessions"], s.m[`sluice_buffers{state="in_use"}`],
		s.m[`sluice_pipes{state="in_use"}`], s.m["sluice_pipes_open"])
}

func (d *configDaemon) snapshot(t testing.TB) snapshot {
	t.Helper()
	pid := d.cmd.Process.Pid
	m := d.mustScrape(t)
	return snapshot{fds: fdKinds(t, pid), rss: procStatus(t, pid, "VmRSS"), m: m}
}

// idle waits until the daemon holds nothing for sessions: no live session,
// no buffer or pipe in use, every pipe it keeps free accounted for by its
// two fds, and exactly the sockets, event fds and other files of base (its
// listeners, its metrics endpoint; pipe fds beyond the pool's, like its
// stdout). It fails the test naming what leaked.
func (d *configDaemon) idle(t testing.TB, base snapshot, within time.Duration) snapshot {
	t.Helper()
	var s snapshot
	var why string
	for deadline := time.Now().Add(within); ; time.Sleep(100 * time.Millisecond) {
		s = d.snapshot(t)
		why = ""
		switch {
		case s.m["sluice_sessions"] != 0:
			why = "live sessions"
		case s.m[`sluice_buffers{state="in_use"}`] != 0:
			why = "buffers in use"
		case s.m[`sluice_pipes{state="in_use"}`] != 0:
			why = "pipes in use"
		case float64(s.fds["pipe"])-2*s.m["sluice_pipes_open"] != float64(base.fds["pipe"])-2*base.m["sluice_pipes_open"]:
			// Pipes beyond the pooled ones (stdout, stderr) are as at baseline.
			why = "pipe fds not all pooled pipes"
		case s.m["sluice_pipes_open"] != s.m[`sluice_pipes{state="free"}`]:
			why = "pipes open but neither in use nor free"
		case s.fds["socket"] > base.fds["socket"]:
			why = "sockets"
		case s.fds["anon_inode"] != base.fds["anon_inode"] || s.fds["other"] != base.fds["other"]:
			why = "event or other fds"
		}
		if why == "" {
			return s
		}
		if time.Now().After(deadline) {
			break
		}
	}
	t.Fatalf("the daemon did not come back to idle within %v (%s):\nnow:      %v\nbaseline: %v\n%s",
		within, why, s, base, tail(d.stderr.String(), 3000))
	return s
}

// tally counts how the client halves of many exchanges went.
type tally struct {
	mu                                    sync.Mutex
	completed, clientResets, serverResets int64
	cut                                   int64 // cut short by a clean EOF (allowed only where said)
	refused                               int64 // never connected, or reset before a byte (allowed only where said)
	bytes                                 int64
	failures                              []string
	failed                                int
	maxTook                               time.Duration
}

func (y *tally) fail(format string, a ...any) {
	y.mu.Lock()
	defer y.mu.Unlock()
	y.failed++
	if len(y.failures) < 10 {
		y.failures = append(y.failures, fmt.Sprintf(format, a...))
	}
}

// add counts r, the client half of plan p, checked against the plan.
func (y *tally) add(p testpeer.Plan, r testpeer.Result, took time.Duration) {
	if err := r.Check(p, testpeer.ClientSide); err != nil {
		y.fail("session %v: %v", p, err)
		return
	}
	y.mu.Lock()
	defer y.mu.Unlock()
	y.bytes += r.Sent + r.Received
	y.maxTook = max(y.maxTook, took)
	switch p.Fault {
	case testpeer.NoFault:
		y.completed++
	case testpeer.ClientReset:
		y.clientResets++
	case testpeer.ServerReset:
		y.serverResets++
	}
}

func (y *tally) report(t testing.TB) {
	t.Helper()
	for _, f := range y.failures {
		t.Error(f)
	}
	if y.failed > len(y.failures) {
		t.Errorf("... and %d more failed sessions", y.failed-len(y.failures))
	}
}

// checkBackend checks a chaos backend's view of the exchanges between two
// of its counts, planned none without a fault, cli and srv reset by the
// client and by the backend: every exchange without a fault whole, every
// reset it was asked for made, no more client resets seen than planned.
func checkBackend(t testing.TB, bs0, bs testpeer.ChaosStats, none, cli, srv int64) {
	t.Helper()
	if f := bs.Failures - bs0.Failures; f != 0 {
		t.Errorf("the backend saw %d exchanges go wrong: %v", f, bs.Errors)
	}
	if c := bs.Completed - bs0.Completed; c != none {
		t.Errorf("the backend completed %d exchanges, want %d", c, none)
	}
	if r := bs.ServerReset - bs0.ServerReset; r != srv {
		t.Errorf("the backend reset %d exchanges, want %d", r, srv)
	}
	if seen := bs.ClientReset - bs0.ClientReset + bs.Early - bs0.Early; seen > cli {
		t.Errorf("the backend saw %d client resets, %d were planned", seen, cli)
	}
}

// planCounts counts plans by fault.
func planCounts(plans []testpeer.Plan) (none, cli, srv int64) {
	for _, p := range plans {
		switch p.Fault {
		case testpeer.NoFault:
			none++
		case testpeer.ClientReset:
			cli++
		case testpeer.ServerReset:
			srv++
		}
	}
	return
}

// loadRun is the outcome of runPlans.
type loadRun struct {
	tally
	connected time.Duration // all sessions connected, and counted live by the daemon
	ran       time.Duration // from the gate to the last session's end
	peak      float64       // most live sessions the daemon reported
	peakRSS   int64
}

// runPlans runs one exchange per plan, to addrs round robin: every session
// is connected, and seen live by the daemon, before any of them sends a
// byte, so all run at once. Each session is bounded by limit.
func runPlans(t *testing.T, d *configDaemon, addrs []string, plans []testpeer.Plan, limit time.Duration) *loadRun {
	t.Helper()
	lr := &loadRun{}
	// Sessions left from before would blur the count.
	waitFor(t, 20*time.Second, "the daemon to have no live session", func() bool {
		m, err := d.scrape()
		return err == nil && m["sluice_sessions"] == 0
	})
	base := 0.0
	gate := make(chan struct{})
	var dialed sync.WaitGroup
	var wg sync.WaitGroup
	began := time.Now()
	for i, p := range plans {
		dialed.Add(1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.DialTimeout("tcp", addrs[i%len(addrs)], 10*time.Second)
			dialed.Done()
			if err != nil {
				lr.fail("session %v: dial: %v", p, err)
				return
			}
			<-gate
			c.SetDeadline(time.Now().Add(limit))
			t0 := time.Now()
			r := p.Client(c.(*net.TCPConn), testpeer.Options{})
			lr.add(p, r, time.Since(t0))
		}()
	}
	dialed.Wait()
	// The daemon accepts from its backlog a moment after the dials return.
	deadline := time.Now().Add(20 * time.Second)
	for {
		m, err := d.scrape()
		if err == nil && m["sluice_sessions"]-base >= float64(len(plans)-lr.failed) {
			lr.peak = m["sluice_sessions"]
			break
		}
		if time.Now().After(deadline) {
			close(gate)
			wg.Wait()
			t.Fatalf("the daemon has %v live sessions of the %d connected (%v)", m["sluice_sessions"], len(plans), err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	lr.connected = time.Since(began)
	// Sample the daemon while the sessions run.
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		pid := d.cmd.Process.Pid
		for {
			if m, err := d.scrape(); err == nil {
				lr.peak = max(lr.peak, m["sluice_sessions"])
			}
			if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid)); err == nil {
				if i := strings.Index(string(b), "VmRSS:"); i >= 0 {
					f := strings.Fields(string(b[i+6:]))
					if kb, err := strconv.ParseInt(f[0], 10, 64); err == nil {
						lr.peakRSS = max(lr.peakRSS, kb<<10)
					}
				}
			}
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	t0 := time.Now()
	close(gate)
	wg.Wait()
	lr.ran = time.Since(t0)
	close(stop)
	<-sampled
	return lr
}

// envInt returns the positive integer in the environment variable name, or
// def when it is unset or not one.
func envInt(name string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil && n > 0 {
		return n
	}
	return def
}

// Thousands of sessions at once through three rules (splice on, off, auto),
// of random sizes (0 B to 512 KiB each way; 4 MiB in the soak), in random
// half-close orders, a third of them reset at a random byte by the client
// or by the backend.
// Every byte that arrives is checked at both ends, every session that
// completes has both SHA-256 trailers matched, every reset reaches the
// other end as a reset; the daemon counts exactly as many clean ends and
// resets of each side as were planned; afterwards it holds no session,
// buffer, pipe or socket more than before, and its RSS is back within
// 24 MiB of the level after the warm-up round (in the soak, of the level
// after the first round).
func TestLoadVerified(t *testing.T) {
	n := envInt("SLUICE_LOAD_SESSIONS", 3000) // sessions at once
	maxSize := int64(512 << 10)
	if soakFor(t) > 0 {
		maxSize = 4 << 20
	}
	be := chaosPeer(t, "")
	d := startConfig(t, forwardOpts{}, []string{"loops: 2"},
		"tcp {listen} -> "+be.Addr+" splice=on",
		"tcp {listen} -> "+be.Addr+" splice=off",
		"tcp {listen} -> "+be.Addr+" splice=auto")
	pid := d.cmd.Process.Pid
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
	seed := uint64(0)
	makePlans := func(k int) []testpeer.Plan {
		plans := make([]testpeer.Plan, k)
		for i := range plans {
			seed++
			plans[i] = testpeer.RandomPlan(rng, seed, maxSize, 1.0/3)
		}
		plans[0].Up, plans[0].Down, plans[0].Fault = 0, 0, testpeer.NoFault // both ends of the range, always
		plans[1].Up, plans[1].Down, plans[1].Fault = maxSize, maxSize, testpeer.NoFault
		return plans
	}

	// Warm-up: a round a tenth the size, so the pools and the Go runtime
	// have their working shape before the baseline is taken.
	warm := runPlans(t, d, d.listens, makePlans(max(n/10, 20)), time.Minute)
	warm.report(t)
	if t.Failed() {
		t.FailNow()
	}
	base0 := d.snapshot(t)
	base := d.idle(t, base0, 10*time.Second)
	beStats0 := chaosStats(t, be)
	t.Logf("baseline after warm-up: %v", base)

	var firstAfter int64 // RSS after the first round
	rounds(t, 1000, func(round int) {
		plans := makePlans(n)
		none, cli, srv := planCounts(plans)
		before := d.mustScrape(t)
		bs0 := chaosStats(t, be)
		lr := runPlans(t, d, d.listens, plans, 2*time.Minute)
		lr.report(t)
		after := d.idle(t, base, 20*time.Second)
		bs := chaosStats(t, be)

		// The client's view: every session as planned.
		if lr.completed != none || lr.clientResets != cli || lr.serverResets != srv {
			t.Errorf("clients: %d completed, %d reset by the client, %d by the backend; planned %d, %d, %d",
				lr.completed, lr.clientResets, lr.serverResets, none, cli, srv)
		}
		checkBackend(t, bs0, bs, none, cli, srv)
		// The daemon's view: exactly as many clean ends and resets.
		delta := endedDelta(before, after.m)
		want := map[string]float64{"done": float64(none), "client-reset": float64(cli), "server-reset": float64(srv)}
		for k := range want {
			if want[k] == 0 {
				delete(want, k)
			}
		}
		if fmt.Sprint(delta) != fmt.Sprint(want) {
			t.Errorf("the daemon counted sessions ended %v, want %v", delta, want)
		}
		// Memory: back near the warm-up's level once the sessions are gone
		// (in the soak, near the first round's: a plateau, not a slope).
		// The bound leaves room for the Go runtime returning freed memory
		// lazily; one leaked buffer (16 KiB) per session would pass it.
		ref := base.rss
		if round > 0 {
			ref = firstAfter
		} else {
			firstAfter = after.rss
		}
		growth := after.rss - ref
		t.Logf("round %d: %d sessions (%d clean, %d client resets, %d backend resets), %d MiB checked, all connected in %v, ran in %v (slowest %v), peak %v live sessions; daemon RSS %d MiB at baseline, peak %d MiB, %d MiB after (%+d KiB); fds after %v; backend saw %d client resets (%d before the plan arrived)",
			round, n, none, cli, srv, lr.bytes>>20, lr.connected.Round(time.Millisecond), lr.ran.Round(time.Millisecond),
			lr.maxTook.Round(time.Millisecond), lr.peak, base.rss>>20, lr.peakRSS>>20, after.rss>>20, growth>>10, after.fds,
			bs.ClientReset-bs0.ClientReset, bs.Early-bs0.Early)
		if lr.peak < float64(n) {
			t.Errorf("at most %v sessions were live at once, want all %d", lr.peak, n)
		}
		if limit := int64(24 << 20); growth > limit {
			t.Errorf("daemon RSS %d MiB after round %d, %d MiB before: grew %d MiB (limit %d MiB)",
				after.rss>>20, round, ref>>20, growth>>20, limit>>20)
		}
	})
	st := chaosStats(t, be)
	t.Logf("backend in total: %d exchanges completed, %d reset by it, %d client resets seen (+%d before the plan), %d probes, %d MiB checked; daemon pid %d",
		st.Completed-beStats0.Completed, st.ServerReset-beStats0.ServerReset, st.ClientReset-beStats0.ClientReset,
		st.Early-beStats0.Early, st.Probes, st.Bytes>>20, pid)
	if err := d.stop(10 * time.Second); err != nil {
		t.Errorf("stop: %v (want exit 0)\n%s", err, tail(d.stderr.String(), 3000))
	}
}

// dialTCP dials addr from a loopback source address (nil: the default).
func dialTCP(src net.IP, addr string, timeout time.Duration) (*net.TCPConn, error) {
	dl := net.Dialer{Timeout: timeout}
	if src != nil {
		dl.LocalAddr = &net.TCPAddr{IP: src}
	}
	c, err := dl.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// goodClient runs checked exchanges of size bytes each way, one after the
// other, until stop closes (at least one, at most max), and returns the mean
// MiB/s of each way.
func goodClient(addr string, size int64, seed *atomic.Uint64, stop <-chan struct{}, max int) (float64, error) {
	var took time.Duration
	n := 0
	for n < max {
		c, err := dialTCP(nil, addr, 10*time.Second)
		if err != nil {
			return 0, err
		}
		c.SetDeadline(time.Now().Add(2 * time.Minute))
		p := testpeer.Plan{Seed: seed.Add(1) << 32, Up: size, Down: size}
		t0 := time.Now()
		r := p.Client(c, testpeer.Options{})
		took += time.Since(t0)
		if err := r.Check(p, testpeer.ClientSide); err != nil {
			return 0, fmt.Errorf("good client: %v", err)
		}
		n++
		select {
		case <-stop:
			return float64(n) * float64(size) / (1 << 20) / took.Seconds(), nil
		default:
		}
	}
	return float64(n) * float64(size) / (1 << 20) / took.Seconds(), nil
}

// sessionLogs returns the daemon's session log lines (json format, level
// info) of the listen address listen that ended with one of codes and were
// logged after skip bytes of its log; a test prints them when its counts do
// not match.
func (d *configDaemon) sessionLogs(skip int, listen string, codes ...string) []string {
	log := d.stderr.String()
	if skip > len(log) {
		skip = len(log)
	}
	var out []string
	for _, l := range strings.Split(log[skip:], "\n") {
		if !strings.Contains(l, `"msg":"session"`) || !strings.Contains(l, `"listen":"`+listen+`"`) {
			continue
		}
		for _, c := range codes {
			if strings.Contains(l, `"end":"`+c+`"`) {
				out = append(out, l)
				break
			}
		}
	}
	return out
}
