package integration

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// Hostile clients the other tests do not cover: floods of distinct sources
// against rate=, sources that hammer, connections that never read, storms of
// client resets. Each runs in a peer process of its own (its fds, its CPU),
// bounded in count and in time.

const (
	hostileKindEnv = "SLUICE_IT_HOSTILE"      // flood | hammer | noread | rststorm
	hostileForEnv  = "SLUICE_IT_HOSTILE_FOR"  // how long it runs (a Go duration)
	hostileSrcEnv  = "SLUICE_IT_HOSTILE_SRC"  // second octet of its 127.X.0.0/16 sources
	hostileDownEnv = "SLUICE_IT_HOSTILE_DOWN" // noread: bytes each conn asks for (0: without end)
)

// hostileStats are a hostile peer's counts.
type hostileStats struct {
	Kind         string
	Done         bool     // its count or its time is spent; noread: every conn is open
	Attempts     int64    // conns tried
	Passed       int64    // served whole (flood, hammer), reset as planned (rststorm), held (noread)
	Refused      int64    // reset before a byte came back: refused by the daemon
	Failed       int64    // anything else: a lost or changed byte, a hang, a FIN for a refusal
	DialReset    int64    // flood, rststorm, noread: reset before the dial returned, for no reason (finding 1)
	Errors       []string // the first few failures
	Sources      int64    // distinct source addresses used
	MaxPerSource int64    // hammer: most conns one source got served
	Seconds      float64  // time spent
}

// hostileSrc returns source address i of the 127.base.0.0/16 block... and
// beyond: i spills into the next second octets, so a flood may use millions.
func hostileSrc(base, i int) net.IP {
	return net.IPv4(127, byte(base+i>>16), byte(i>>8), byte(i))
}

func init() {
	peerRoles["hostile"] = func() (string, func() any, func(), error) {
		h := &hostile{target: os.Getenv(peerTargetEnv), kind: os.Getenv(hostileKindEnv), stop: make(chan struct{})}
		var err error
		if h.count, err = strconv.Atoi(os.Getenv(peerCountEnv)); err != nil || h.count <= 0 {
			return "", nil, nil, fmt.Errorf("count %q", os.Getenv(peerCountEnv))
		}
		if h.dur, err = time.ParseDuration(os.Getenv(hostileForEnv)); err != nil {
			return "", nil, nil, fmt.Errorf("%s: %v", hostileForEnv, err)
		}
		if h.src, err = strconv.Atoi(os.Getenv(hostileSrcEnv)); err != nil || h.src < 1 || h.src > 250 {
			return "", nil, nil, fmt.Errorf("%s %q", hostileSrcEnv, os.Getenv(hostileSrcEnv))
		}
		h.down, _ = strconv.ParseInt(os.Getenv(hostileDownEnv), 10, 64)
		if h.down <= 0 {
			h.down = 1 << 50
		}
		if err := h.start(); err != nil {
			return "", nil, nil, err
		}
		return h.kind, h.snapshot, h.close, nil
	}
}

type hostile struct {
	target, kind string
	count, src   int
	down         int64
	dur          time.Duration
	began        time.Time
	stop         chan struct{}
	wg           sync.WaitGroup

	mu    sync.Mutex
	st    hostileStats
	per   map[int]int64 // hammer: conns served per source
	held  []*net.TCPConn
	next  atomic.Int64
	ended time.Time
}

func (h *hostile) fail(format string, a ...any) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.st.Failed++
	if len(h.st.Errors) < 8 {
		h.st.Errors = append(h.st.Errors, fmt.Sprintf(format, a...))
	}
}

func (h *hostile) count1(f *int64) {
	h.mu.Lock()
	*f++
	h.mu.Unlock()
}

func (h *hostile) snapshot() any {
	h.mu.Lock()
	defer h.mu.Unlock()
	s := h.st
	s.Kind = h.kind
	s.Errors = append([]string(nil), s.Errors...)
	end := h.ended
	if end.IsZero() {
		end = time.Now()
	}
	s.Seconds = end.Sub(h.began).Seconds()
	for _, n := range h.per {
		s.MaxPerSource = max(s.MaxPerSource, n)
	}
	if h.kind != "hammer" {
		s.Sources = s.Attempts
	}
	return s
}

// more hands out the next conn number while count and time last.
func (h *hostile) more() (int, bool) {
	if time.Since(h.began) > h.dur {
		return 0, false
	}
	select {
	case <-h.stop:
		return 0, false
	default:
	}
	i := int(h.next.Add(1) - 1)
	return i, i < h.count
}

// dial connects from src, counting the attempt, with a receive buffer of
// rcvbuf bytes when > 0. It returns nil when no conn came of it: a reset
// before the dial returned (the kernel completed the handshake, the daemon
// accepted and reset) is a refusal for a hammering source, and finding 1 of
// docs/reliability.md for any other; other errors are failures.
func (h *hostile) dial(src net.IP, rcvbuf int) *net.TCPConn {
	h.count1(&h.st.Attempts)
	dl := net.Dialer{Timeout: 10 * time.Second, LocalAddr: &net.TCPAddr{IP: src}}
	if rcvbuf > 0 {
		dl.Control = func(_, _ string, rc syscall.RawConn) error {
			rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, rcvbuf) })
			return nil
		}
	}
	c, err := dl.Dial("tcp", h.target)
	switch {
	case errors.Is(err, syscall.ECONNRESET) && h.kind == "hammer":
		h.count1(&h.st.Refused)
	case errors.Is(err, syscall.ECONNRESET):
		h.count1(&h.st.DialReset)
	case err != nil:
		h.fail("dial from %v: %v", src, err)
	default:
		return c.(*net.TCPConn)
	}
	return nil
}

// zero runs an exchange of no payload from src: served (true), refused by
// the daemon (a reset before any byte back), or failed.
func (h *hostile) zero(src net.IP, seed uint64) (served bool) {
	c := h.dial(src, 0)
	if c == nil {
		return false
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	p := testpeer.Plan{Seed: seed}
	r := p.Client(c, testpeer.Options{})
	switch {
	case r.Complete:
		h.count1(&h.st.Passed)
		return true
	case r.GotReset && r.Received == 0 && r.Corrupt == nil && r.Err == nil:
		h.count1(&h.st.Refused)
	default:
		h.fail("from %v: %v", src, r.Check(p, testpeer.ClientSide))
	}
	return false
}

func (h *hostile) start() error {
	h.began = time.Now()
	h.per = map[int]int64{}
	workers := 32
	var work func(w int)
	switch h.kind {
	case "flood": // each conn from a new source, a zero exchange
		work = func(int) {
			for i, ok := h.more(); ok; i, ok = h.more() {
				h.zero(hostileSrc(h.src, i), uint64(i))
			}
		}
	case "hammer": // 8 sources, each as fast as it can
		const sources = 8
		work = func(w int) {
			src := w % sources
			for i, ok := h.more(); ok; i, ok = h.more() {
				if h.zero(hostileSrc(h.src, src), uint64(i)) {
					h.mu.Lock()
					h.per[src]++
					h.mu.Unlock()
				}
			}
		}
		workers, h.st.Sources = 2*sources, sources
	case "rststorm": // each conn from a new source, reset mid-stream by the client
		work = func(w int) {
			rng := rand.New(rand.NewPCG(uint64(w), uint64(time.Now().UnixNano())))
			for i, ok := h.more(); ok; i, ok = h.more() {
				c := h.dial(hostileSrc(h.src, i), 0)
				if c == nil {
					continue
				}
				c.SetDeadline(time.Now().Add(20 * time.Second))
				p := testpeer.Plan{Seed: uint64(i), Up: testpeer.LogUniform(rng, 64<<10), Down: testpeer.LogUniform(rng, 64<<10),
					Order: testpeer.Order(rng.IntN(3)), Fault: testpeer.ClientReset}
				p.At = rng.Int64N(p.Up + 32)
				if err := p.Client(c, testpeer.Options{}).Check(p, testpeer.ClientSide); err != nil {
					h.fail("%v: %v", p, err)
				} else {
					h.count1(&h.st.Passed)
				}
			}
		}
	case "noread": // each conn asks for a download ($SLUICE_IT_HOSTILE_DOWN, or without end) and never reads
		work = func(int) {
			for i, ok := h.more(); ok; i, ok = h.more() {
				// A small receive window keeps what the kernel buffers for
				// the test itself small; the daemon's side is what is
				// measured.
				c := h.dial(hostileSrc(h.src, i), 16<<10)
				if c == nil {
					continue
				}
				p := testpeer.Plan{Seed: uint64(i), Down: h.down, Fault: testpeer.ClientReset, At: 0}
				if _, err := c.Write(p.Marshal()); err != nil {
					h.fail("plan: %v", err)
					c.Close()
					continue
				}
				h.mu.Lock()
				h.held = append(h.held, c)
				h.st.Passed++
				h.mu.Unlock()
			}
		}
		h.dur = 24 * time.Hour // opens all count conns; holds them until closed
	default:
		return fmt.Errorf("hostile kind %q", h.kind)
	}
	for w := 0; w < workers; w++ {
		h.wg.Add(1)
		go func() { defer h.wg.Done(); work(w) }()
	}
	go func() {
		h.wg.Wait()
		h.mu.Lock()
		h.st.Done, h.ended = true, time.Now()
		h.mu.Unlock()
	}()
	return nil
}

func (h *hostile) close() {
	close(h.stop)
	h.wg.Wait()
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, c := range h.held {
		c.SetLinger(0) // unread bytes: a reset, as a client that gives up
		c.Close()
	}
}

// hostilePeer starts a hostile peer of kind against target: at most count
// conns, for at most d, from sources in 127.src.0.0/16 onwards.
func hostilePeer(t *testing.T, kind, target string, count int, d time.Duration, src int) *peer {
	t.Helper()
	return noreadPeer(t, kind, target, count, d, src, 0)
}

// noreadPeer is hostilePeer with the size of the download a "noread" conn
// asks for (0: without end).
func noreadPeer(t *testing.T, kind, target string, count int, d time.Duration, src int, down int64) *peer {
	t.Helper()
	t.Setenv(hostileDownEnv, strconv.FormatInt(down, 10))
	t.Setenv(hostileKindEnv, kind)
	t.Setenv(peerTargetEnv, target)
	t.Setenv(peerCountEnv, strconv.Itoa(count))
	t.Setenv(hostileForEnv, d.String())
	t.Setenv(hostileSrcEnv, strconv.Itoa(src))
	return startPeer(t, "hostile")
}

func hostileOf(t testing.TB, p *peer) hostileStats {
	t.Helper()
	var s hostileStats
	p.stats(t, &s)
	return s
}

// waitHostile waits until the peer's work is done (bounded by limit) and
// returns its counts.
func waitHostile(t *testing.T, p *peer, limit time.Duration) hostileStats {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		s := hostileOf(t, p)
		if s.Done {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("hostile peer %s not done after %v: %+v", s.Kind, limit, s)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// The daemon under each hostile load, one rule with rate=10/s: a flood of
// distinct sources (each within its rate: none refused) while 8 sources
// hammer (refused past their rate, every refusal a reset, counted exactly);
// hundreds of clients that ask for an endless download and never read (the
// daemon's memory stays bounded: back-pressure); a storm of client resets
// mid-stream. Meanwhile a well-behaved client moves 32 MiB each way per
// session, checked, and its throughput is measured against its unloaded
// figure; the assertion is only a generous floor (10 %), the figure is
// logged. After each load the daemon holds nothing more than before.
func TestHostileClients(t *testing.T) {
	const rate = 10
	soak := soakFor(t) > 0
	d3 := 2 * time.Second
	// A never-reading client ties up tens of MiB of kernel memory on the
	// daemon's sockets (logged below); the counts and sizes keep the whole
	// test far from the host's tcp_mem pressure, on a machine others share.
	const endlessN, noreadDown = 2, 512 << 10
	floodN, noreadN, stormN := 20000, 200, 20000
	if soak {
		// Past the rate table's 65 536 sources, if the flood is fast
		// enough: the least recently seen are forgotten, the hammering
		// ones never.
		d3, floodN, noreadN, stormN = soakFor(t)/4, 1<<22, 300, 1<<22
	}
	be := chaosPeer(t, "")
	d := startConfig(t, forwardOpts{}, []string{"loops: 2"}, fmt.Sprintf("tcp {listen} -> %s rate=%d/s", be.Addr, rate))
	addr := d.listens[0]
	var seed atomic.Uint64
	const size = 16 << 20
	// Well-behaved: at most 4 sessions a second from its own source, well
	// within the rate.
	var goodSessions atomic.Int64
	measure := func(stop <-chan struct{}) (float64, error) {
		tick := time.NewTicker(250 * time.Millisecond)
		defer tick.Stop()
		var sum float64
		n := 0
		for n < 1000 {
			v, err := goodClient(addr, size, &seed, nil, 1)
			goodSessions.Add(1)
			if err != nil {
				return 0, err
			}
			sum += v
			n++
			select {
			case <-stop:
				return sum / float64(n), nil
			case <-tick.C:
			}
		}
		return sum / float64(n), nil
	}
	once := make(chan struct{})
	close(once)
	measure(once) // warm-up
	base := d.idle(t, d.snapshot(t), 10*time.Second)
	var unloaded float64
	for i := 0; i < 3; i++ {
		v, err := measure(once)
		if err != nil {
			t.Fatal(err)
		}
		unloaded += v / 3
	}
	d.idle(t, base, 10*time.Second) // the last session counted before the first scenario
	t.Logf("well-behaved client unloaded: %.0f MiB/s each way (%d MiB sessions, checked); daemon %v", unloaded, size>>20, base)

	type scenario struct {
		name  string
		peers func() []*peer
		check func(before, after map[string]float64, st []hostileStats, good int64)
	}
	src := 10 // second octet of the next peer's sources
	nextSrc := func(n int) int {
		s := src
		src += n>>16 + 1
		if src > 240 {
			src = 10
		}
		return s
	}
	var rssPeak int64
	var heldPipes float64
	endlessDone := 0 // endless never-reading sessions ended in this scenario
	scenarios := []scenario{
		{"flood of distinct sources + 8 hammering sources", func() []*peer {
			return []*peer{
				hostilePeer(t, "flood", addr, floodN, d3, nextSrc(floodN)),
				hostilePeer(t, "hammer", addr, 1<<30, d3, nextSrc(8)),
			}
		}, func(before, after map[string]float64, st []hostileStats, good int64) {
			flood, hammer := st[0], st[1]
			dialResets(t, flood.DialReset, "flood clients reset at dial")
			if flood.Refused != 0 || flood.Failed != 0 || flood.Passed+flood.DialReset != flood.Attempts {
				t.Errorf("flood: %d of %d served, %d refused, %d failed (each source is within its rate): %v",
					flood.Passed, flood.Attempts, flood.Refused, flood.Failed, flood.Errors)
			}
			// The sliding window: at most rate in any second, so at most
			// rate x (seconds + 1) per source.
			if bound := int64(rate * (hammer.Seconds + 1)); hammer.MaxPerSource > bound || hammer.Refused == 0 || hammer.Failed != 0 {
				t.Errorf("hammer: %d attempts, %d served (at most %d from one source, bound %d), %d refused, %d failed: %v",
					hammer.Attempts, hammer.Passed, hammer.MaxPerSource, bound, hammer.Refused, hammer.Failed, hammer.Errors)
			}
			delta := endedDelta(before, after)
			want := map[string]float64{"rate-limited": float64(hammer.Refused + flood.Refused), "done": float64(flood.Passed + hammer.Passed + good)}
			if flood.DialReset > 0 {
				want["client-reset"] = float64(flood.DialReset)
			}
			if fmt.Sprint(delta) != fmt.Sprint(want) {
				t.Errorf("the daemon counted sessions ended %v; the clients saw %v", delta, want)
			}
			t.Logf("flood: %d conns from %d distinct sources in %.1fs (%.0f/s), all served; hammer: %d conns from 8 sources (%.0f/s), %d served (at most %d per source in %.1fs, rate %d/s), %d refused by reset",
				flood.Attempts, flood.Sources, flood.Seconds, float64(flood.Attempts)/flood.Seconds,
				hammer.Attempts, float64(hammer.Attempts)/hammer.Seconds, hammer.Passed, hammer.MaxPerSource, hammer.Seconds, rate, hammer.Refused)
		}},
		{fmt.Sprintf("%d clients that never read", noreadN), func() []*peer {
			// In the soak, first what one never-reading client ties up in
			// the kernel: a few endless downloads, until nothing moves.
			if soak {
				e := noreadPeer(t, "noread", addr, endlessN, d3, nextSrc(endlessN), 0)
				waitHostile(t, e, 30*time.Second)
				q := queuedSteady(t, addr, be.Addr, "the endless downloads to fill every buffer on their way")
				kernelPer := float64(q.toClients+q.fromBackend) / endlessN
				t.Logf("noread: %d endless downloads never read: the daemon's sockets hold %.1f MiB each in the kernel (%.1f MiB unsent to the client, %.1f MiB unread from the backend); its RSS %d MiB",
					endlessN, kernelPer/(1<<20), float64(q.toClients)/endlessN/(1<<20), float64(q.fromBackend)/endlessN/(1<<20), procStatus(t, d.cmd.Process.Pid, "VmRSS")>>20)
				e.stdin.Close()
				e.cmd.Wait()
				d.idle(t, base, 30*time.Second)
				endlessDone += endlessN
			}
			// Then many, each asking for more than the daemon may hold of
			// it: without back-pressure the daemon would read it all.
			p := noreadPeer(t, "noread", addr, noreadN, d3, nextSrc(noreadN), noreadDown)
			held := waitHostile(t, p, 30*time.Second).Passed
			queuedSteady(t, addr, be.Addr, "the never-reading sessions to fill every buffer on their way")
			if n := d.mustScrape(t)["sluice_sessions"]; n != float64(held) {
				t.Errorf("the daemon holds %v sessions, want the %d never-reading ones", n, held)
			}
			return []*peer{p}
		}, func(before, after map[string]float64, st []hostileStats, good int64) {
			dialResets(t, st[0].DialReset, "never-reading clients reset at dial")
			if st[0].Passed+st[0].DialReset != int64(noreadN) || st[0].Failed != 0 {
				t.Errorf("noread: %d of %d held, %d failed: %v", st[0].Passed, noreadN, st[0].Failed, st[0].Errors)
			}
			// One 16 KiB buffer per direction per session at most (a pipe's
			// bytes are the kernel's), plus the runtime's slack; reading
			// what each asked for would take noreadDown each.
			bound := 32<<20 + int64(noreadN)*32<<10
			t.Logf("noread: %d sessions held, %d MiB asked for in all: daemon RSS %d MiB at baseline, peak %d MiB (%+d KiB, %.0f B per session; bound %d MiB), %v pipes open while held",
				noreadN, int64(noreadN)*noreadDown>>20, base.rss>>20, rssPeak>>20, (rssPeak-base.rss)>>10, float64(rssPeak-base.rss)/float64(noreadN), bound>>20, heldPipes)
			if rssPeak-base.rss > bound {
				t.Errorf("daemon RSS grew %d MiB with %d never-reading clients; bound %d MiB", (rssPeak-base.rss)>>20, noreadN, bound>>20)
			}
			want := map[string]float64{"client-reset": float64(noreadN + endlessDone), "done": float64(good)}
			endlessDone = 0
			if delta := endedDelta(before, after); fmt.Sprint(delta) != fmt.Sprint(want) {
				t.Errorf("the daemon counted sessions ended %v, want %v (the never-reading clients give up with a reset)", delta, want)
			}
		}},
		{"storm of client resets", func() []*peer {
			return []*peer{hostilePeer(t, "rststorm", addr, stormN, d3, nextSrc(stormN))}
		}, func(before, after map[string]float64, st []hostileStats, good int64) {
			s := st[0]
			dialResets(t, s.DialReset, "storm clients reset at dial, before their own reset")
			if s.Failed != 0 || s.Passed+s.DialReset != s.Attempts {
				t.Errorf("rststorm: %d of %d reset as planned, %d failed: %v", s.Passed, s.Attempts, s.Failed, s.Errors)
			}
			want := map[string]float64{"client-reset": float64(s.Passed + s.DialReset), "done": float64(good)}
			if delta := endedDelta(before, after); fmt.Sprint(delta) != fmt.Sprint(want) {
				t.Errorf("the daemon counted sessions ended %v, want %v", delta, want)
			}
			t.Logf("rststorm: %d conns reset mid-stream by their clients in %.1fs (%.0f/s), each from its own source",
				s.Attempts, s.Seconds, float64(s.Attempts)/s.Seconds)
		}},
	}
	// runScenario runs one scenario with the well-behaved client beside it,
	// checks it, and returns the client's fraction of its unloaded
	// throughput.
	runScenario := func(round int, sc scenario) float64 {
		scBegan := time.Now()
		before := d.mustScrape(t)
		goodSessions.Store(0)
		rssPeak = base.rss
		cpu := cpuMeter(t, map[string]int{"daemon": d.cmd.Process.Pid, "backend": be.cmd.Process.Pid, "test": os.Getpid()})
		peers := sc.peers()
		for i, p := range peers {
			cpu.add(t, fmt.Sprintf("hostile%d", i), p.cmd.Process.Pid)
		}
		// The well-behaved client runs while the hostile peers do.
		stop := make(chan struct{})
		got := make(chan float64, 1)
		errc := make(chan error, 1)
		go func() {
			v, err := measure(stop)
			errc <- err
			got <- v
		}()
		pid := d.cmd.Process.Pid
		var st []hostileStats
		for _, p := range peers {
			if p.Addr == "noread" {
				// It holds its conns until told: measure for the time of a round.
				for end := time.Now().Add(d3); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
					rssPeak = max(rssPeak, procStatus(t, pid, "VmRSS"))
				}
				st = append(st, hostileOf(t, p))
				heldPipes = d.mustScrape(t)["sluice_pipes_open"]
				continue
			}
			st = append(st, waitHostile(t, p, d3+time.Minute))
		}
		close(stop)
		if err := <-errc; err != nil {
			t.Errorf("%s: %v", sc.name, err)
		}
		loaded := <-got
		shares := cpu.shares(t)
		for _, p := range peers {
			p.stdin.Close()
			p.cmd.Wait()
		}
		after := d.idle(t, base, 30*time.Second)
		frac := loaded / unloaded
		t.Logf("round %d, %s (%v): well-behaved client %.0f MiB/s, %.0f%% of unloaded (%d sessions); CPU %s; daemon after: %v",
			round, sc.name, time.Since(scBegan).Round(time.Millisecond), loaded, 100*frac, goodSessions.Load(), shares, after)
		sc.check(before, after.m, st, goodSessions.Load())
		return frac
	}
	rounds(t, 100, func(round int) {
		for _, sc := range scenarios {
			// A throughput under the floor is measured once more: the
			// machine is shared, and others' load can starve every process
			// of this test at once (the CPU shares logged show it).
			for attempt := 0; attempt < 2; attempt++ {
				frac := runScenario(round, sc)
				if frac >= 0.10 {
					break
				}
				if attempt == 1 {
					t.Errorf("%s: the well-behaved client got %.0f%% of its unloaded %.0f MiB/s, twice (floor 10%%)", sc.name, 100*frac, unloaded)
					break
				}
				t.Logf("%s: the well-behaved client got %.0f%% of its unloaded throughput, under the 10%% floor; measuring again", sc.name, 100*frac)
			}
		}
	})
	if err := d.stop(10 * time.Second); err != nil {
		t.Errorf("stop: %v (want exit 0)\n%s", err, tail(d.stderr.String(), 3000))
	}
}

// cpuMeter measures the CPU time of named processes over an interval.
type cpuMeterT struct {
	began time.Time
	pids  map[string]int
	start map[string]int64
}

func cpuMeter(t testing.TB, pids map[string]int) *cpuMeterT {
	m := &cpuMeterT{began: time.Now(), pids: map[string]int{}, start: map[string]int64{}}
	for name, pid := range pids {
		m.add(t, name, pid)
	}
	return m
}

func (m *cpuMeterT) add(t testing.TB, name string, pid int) {
	m.pids[name], m.start[name] = pid, cpuTicks(t, pid)
}

// shares returns each process's CPU use since it was added, in percent of
// one core, sorted by name.
func (m *cpuMeterT) shares(t testing.TB) string {
	secs := time.Since(m.began).Seconds()
	var names []string
	for name := range m.pids {
		names = append(names, name)
	}
	sort.Strings(names)
	var b strings.Builder
	for _, name := range names {
		used := float64(cpuTicks(t, m.pids[name])-m.start[name]) / clockTicks
		fmt.Fprintf(&b, "%s %.0f%% ", name, 100*used/secs)
	}
	return strings.TrimSpace(b.String())
}

// queuedSteady waits until the daemon's queues have not moved by more than
// 64 KiB for 1.5 s (at most a minute) and returns them.
func queuedSteady(t testing.TB, listen, backend, what string) daemonQueues {
	t.Helper()
	q := queued(t, listen, backend)
	still := time.Now()
	for deadline := time.Now().Add(time.Minute); time.Since(still) < 1500*time.Millisecond; {
		if time.Now().After(deadline) {
			t.Fatalf("waited a minute for %s (last %+v)", what, q)
		}
		time.Sleep(100 * time.Millisecond)
		q2 := queued(t, listen, backend)
		if abs(q2.toClients-q.toClients)+abs(q2.fromBackend-q.fromBackend) > 64<<10 {
			q, still = q2, time.Now()
		}
	}
	return q
}

func abs(x int64) int64 {
	if x < 0 {
		return -x
	}
	return x
}

// daemonQueues are the bytes waiting in the kernel on a daemon's sockets.
type daemonQueues struct {
	toClients   int64 // sent by the daemon to its clients, not yet taken
	fromBackend int64 // arrived from the backend, not yet read by the daemon
}

// queued sums the send queues of the sockets the daemon accepted on listen
// and the receive queues of those it opened to backend: what the kernel
// holds for it. It asks ss(8), which filters in the kernel: /proc/net/tcp
// lists every TIME_WAIT socket of the host (100 000 on a busy one).
func queued(t testing.TB, listen, backend string) daemonQueues {
	t.Helper()
	port := func(s string) uint16 {
		ap, err := netip.ParseAddrPort(s)
		if err != nil {
			t.Fatalf("queued: %q: %v", s, err)
		}
		return ap.Port()
	}
	lp, bp := port(listen), port(backend)
	out, err := exec.Command("ss", "-tnH", "state", "established", fmt.Sprintf("( sport = :%d or dport = :%d )", lp, bp)).Output()
	if err != nil {
		t.Fatalf("ss: %v", err)
	}
	var q daemonQueues
	for _, line := range strings.Split(string(out), "\n") {
		// Recv-Q Send-Q Local:Port Peer:Port
		f := strings.Fields(line)
		if len(f) < 4 {
			continue
		}
		rx, _ := strconv.ParseInt(f[0], 10, 64)
		tx, _ := strconv.ParseInt(f[1], 10, 64)
		local, err1 := netip.ParseAddrPort(f[2])
		peer, err2 := netip.ParseAddrPort(f[3])
		switch {
		case err1 != nil || err2 != nil:
		case local.Port() == lp:
			q.toClients += tx
		case peer.Port() == bp:
			q.fromBackend += rx
		}
	}
	return q
}
