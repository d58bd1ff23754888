package main

import (
	"cmp"
	"encoding/json"
	"fmt"
	"net"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Metric keys of a sample.
const (
	mValue  = "value"  // throughput: Gbit/s, req/s or conn/s
	mBusy   = "busy"   // the proxy's CPU time ÷ wall time (its processes, from /proc/PID/stat)
	mLoad   = "load"   // the load CPU's busy fraction (all processes, from /proc/stat)
	mP50    = "p50"    // latency: ms for wrk, µs for rtt
	mP99    = "p99"    //
	mErrors = "errors" // wrk socket errors and non-2xx replies
	mPSS    = "pss"    // idle: PSS growth per session, bytes
	mHeld   = "held"   // idle: sessions held
	mProcs  = "procs"  // idle: processes of the peer summed
	mCPUus  = "cpuus"  // rtt: the proxy's CPU µs per round trip
	mOther  = "other"  // the proxy CPU's busy fraction less the proxy's own: others' work there
	mTW     = "tw"     // TCP sockets in TIME_WAIT when the measurement began (/proc/net/sockstat)
)

type scenarioKind int

const (
	kindThroughput scenarioKind = iota
	kindIdle
	kindRTT
)

// scenario is one measurement, run against every peer in turn.
type scenario struct {
	name  string
	title string
	unit  string // of mValue
	kind  scenarioKind
	local bool // the proxy runs on the load CPU (its own cost, without a cross-CPU wake-up)
	// variant is how every peer's forward differs from the plain one
	// (wildcard listener, threads, PROXY protocol); peers that cannot do
	// it say why (peer.cannot). With threads > 1 the proxy is pinned to
	// the proxy CPU and the load CPU both.
	variant variant
	// front: the load passes the PROXY v2 front (startProxyFront) on its
	// way to each peer.
	front   bool
	latency bool // the measure gives p50, p99 and errors
	optIn   bool // not in the default list of scenarios; run only when named
	// skip says why a peer does not run this scenario ("" = it runs).
	skip    func(p peer) string
	backend func(h *harness) (string, *proc, error)
	// route, when set, starts each peer in the scenario's own
	// configuration instead of p.start (routing by TLS name).
	route   func(h *harness, p peer, target string, cpu int) (string, *proc, error)
	measure func(h *harness, t target) (map[string]float64, error)
}

var allScenarios = []scenario{
	{name: "bulk1", title: "bulk1: one iperf3 stream", unit: "Gbit/s",
		backend: func(h *harness) (string, *proc, error) { return h.startIperf3(h.opt.loadCPU) },
		measure: bulk(1)},
	{name: "bulk4", title: "bulk4: four parallel iperf3 streams", unit: "Gbit/s",
		backend: func(h *harness) (string, *proc, error) { return h.startIperf3(h.opt.loadCPU) },
		measure: bulk(4)},
	{name: "rps", title: "rps: wrk, 50 persistent connections, 1 KiB replies", unit: "req/s", latency: true,
		backend: httpBackend(false), measure: wrk(50, false)},
	{name: "cps", title: "cps: wrk, 50 connections, a new connection per request (`Connection: close`)", unit: "conn/s", latency: true,
		backend: httpBackend(false), measure: wrk(50, true)},
	{name: "idle", title: "idle: sessions held open after one byte each way", kind: kindIdle,
		skip: func(p peer) string {
			switch p.name {
			case "direct":
				return "no proxy to weigh"
			case "sluice-splice":
				return "an idle session holds no pipe: the same as sluice"
			}
			return ""
		},
		backend: func(h *harness) (string, *proc, error) { return h.startRole("echo", h.opt.loadCPU) },
		measure: idle},
	{name: "rtt", title: "rtt: 64-byte ping-pong over one session, the proxy on its own CPU (cross-CPU)", kind: kindRTT,
		backend: func(h *harness) (string, *proc, error) { return h.startRole("rttecho", h.opt.loadCPU) },
		measure: rtt},
	{name: "rtt-local", title: "rtt-local: the same with the proxy on the load CPU (its own cost)", kind: kindRTT, local: true,
		backend: func(h *harness) (string, *proc, error) { return h.startRole("rttecho", h.opt.loadCPU) },
		measure: rtt},
	sniScenario, sniReplayScenario,
	tlsTermScenarios[0], tlsTermScenarios[1], tlsTermScenarios[2],

	// Issue 22's, not in the default list (they would make the default
	// run about 60 % longer): name them with --scenarios.
	{name: "cps-any", title: "cps-any: cps with every proxy listening on the wildcard 0.0.0.0 (the load still connects to 127.0.0.1)", unit: "conn/s",
		latency: true, optIn: true, variant: variant{wildcard: true},
		backend: httpBackend(false), measure: wrk(50, true)},
	{name: "rps-1k", title: "rps-1k: rps with 1 000 persistent connections", unit: "req/s",
		latency: true, optIn: true,
		backend: httpBackend(false), measure: wrk(1000, false)},
	{name: "proxy-rps", title: "proxy-rps: rps through a PROXY v2 front; each proxy reads the header and sends one on to a backend that requires it", unit: "req/s",
		latency: true, optIn: true, variant: variant{proxy: true}, front: true,
		backend: httpBackend(true), measure: wrk(50, false)},
	{name: "proxy-cps", title: "proxy-cps: cps through the same PROXY v2 front and backend", unit: "conn/s",
		latency: true, optIn: true, variant: variant{proxy: true}, front: true,
		backend: httpBackend(true), measure: wrk(50, true)},
	{name: "loops2-rps", title: "loops2-rps: rps with two threads, workers or loops, the proxy pinned to both CPUs (the load's too)", unit: "req/s",
		latency: true, optIn: true, variant: variant{threads: 2},
		backend: httpBackend(false), measure: wrk(50, false)},
	{name: "loops2-cps", title: "loops2-cps: cps with two threads, workers or loops, the proxy pinned to both CPUs (the load's too)", unit: "conn/s",
		latency: true, optIn: true, variant: variant{threads: 2},
		backend: httpBackend(false), measure: wrk(50, true)},
}

// httpBackend starts the nginx HTTP backend of the wrk scenarios on the
// load CPU; proxyIn: it requires a PROXY header on every connection.
func httpBackend(proxyIn bool) func(h *harness) (string, *proc, error) {
	return func(h *harness) (string, *proc, error) { return h.startHTTPBackend(h.opt.loadCPU, proxyIn) }
}

// skipReason says why peer p does not run scenario sc ("" = it runs).
func skipReason(sc scenario, p peer) string {
	if sc.skip != nil {
		if why := sc.skip(p); why != "" {
			return why
		}
	}
	if p.cannot != nil {
		return p.cannot(sc.variant)
	}
	return ""
}

// defaultScenarios is the list run without --scenarios; optInScenarios the
// others.
func defaultScenarios() []scenario {
	return slices.DeleteFunc(slices.Clone(allScenarios), func(s scenario) bool { return s.optIn })
}

func optInScenarios() []scenario {
	return slices.DeleteFunc(slices.Clone(allScenarios), func(s scenario) bool { return !s.optIn })
}

// target is what a measurement runs against: a peer started to the
// scenario's backend.
type target struct {
	peer    peer
	addr    string // where the load connects
	px      *proc  // the proxy's process (nil: direct)
	cpu     int    // the CPU the proxy is pinned to; -1: several, the load CPU among them (loops2)
	backend string
}

func scenarioByName(name string) (scenario, bool) {
	for _, s := range allScenarios {
		if s.name == name {
			return s, true
		}
	}
	return scenario{}, false
}

// meter measures the CPU time of a proxy's processes, the busy time of the
// CPU it is pinned to, and the load CPU's busy time over a measurement.
type meter struct {
	h              *harness
	pid, cpu       int
	t0             time.Time
	ticks0         int64
	loadB0, loadT0 int64
	cpuB0, cpuT0   int64
	tw0            int64   // TIME_WAIT sockets at the start; -1: unknown
	ticks, wall    float64 // filled by read: proxy CPU seconds, wall seconds
}

func (h *harness) meter(t target) *meter {
	m := &meter{h: h, t0: time.Now(), cpu: t.cpu, tw0: timeWait()}
	if t.px != nil {
		m.pid = t.px.pid()
		m.ticks0 = treeTicks(m.pid)
		if m.cpu >= 0 {
			m.cpuB0, m.cpuT0 = cpuTimes(m.cpu)
		}
	}
	m.loadB0, m.loadT0 = cpuTimes(h.opt.loadCPU)
	return m
}

// read ends the measurement and records busy fractions in v.
func (m *meter) read(v map[string]float64) {
	m.wall = time.Since(m.t0).Seconds()
	if m.pid > 0 {
		m.ticks = float64(treeTicks(m.pid)-m.ticks0) / clockTicks
		v[mBusy] = m.ticks / m.wall
		// Others' work on the proxy's CPU is told apart only when the
		// proxy has a CPU of its own.
		if m.cpu >= 0 && m.cpu != m.h.opt.loadCPU {
			if b, t := cpuTimes(m.cpu); t > m.cpuT0 {
				v[mOther] = max(0, float64(b-m.cpuB0)/float64(t-m.cpuT0)-v[mBusy])
			}
		}
	}
	b, t := cpuTimes(m.h.opt.loadCPU)
	if t > m.loadT0 {
		v[mLoad] = float64(b-m.loadB0) / float64(t-m.loadT0)
	}
	if m.tw0 >= 0 {
		v[mTW] = float64(m.tw0)
	}
}

func bulk(streams int) func(*harness, target) (map[string]float64, error) {
	return func(h *harness, t target) (map[string]float64, error) {
		host, port, err := net.SplitHostPort(t.addr)
		if err != nil {
			return nil, err
		}
		secs := h.secs(h.opt.duration)
		v := map[string]float64{}
		m := h.meter(t)
		out, err := h.runTool("iperf3", h.opt.loadCPU, nil, time.Duration(secs+30)*time.Second,
			"iperf3", "-c", host, "-p", port, "-t", strconv.Itoa(secs), "-P", strconv.Itoa(streams),
			"-J", "--connect-timeout", "5000")
		m.read(v)
		bps, perr := parseIperf3(out)
		if perr != nil {
			return nil, cmp.Or(err, perr) // the tool's own error says more
		}
		v[mValue] = bps / 1e9
		return v, nil
	}
}

// parseIperf3 returns the received bits per second of an iperf3 -J report.
func parseIperf3(out string) (float64, error) {
	var r struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		return 0, fmt.Errorf("iperf3 output: %v", err)
	}
	if r.Error != "" {
		return 0, fmt.Errorf("iperf3: %s", r.Error)
	}
	if r.End.SumReceived.BitsPerSecond <= 0 {
		return 0, fmt.Errorf("iperf3: no bits received")
	}
	return r.End.SumReceived.BitsPerSecond, nil
}

// wrk runs one wrk thread with conns connections on the load CPU;
// closeEach: a new connection per request.
func wrk(conns int, closeEach bool) func(*harness, target) (map[string]float64, error) {
	return func(h *harness, t target) (map[string]float64, error) {
		secs := h.secs(h.opt.duration)
		args := []string{"wrk", "-t1", fmt.Sprintf("-c%d", conns), fmt.Sprintf("-d%ds", secs), "--latency", "--timeout", "5s"}
		if closeEach {
			args = append(args, "-H", "Connection: close")
		}
		args = append(args, "http://"+t.addr+"/")
		v := map[string]float64{}
		m := h.meter(t)
		out, err := h.runTool("wrk", h.opt.loadCPU, nil, time.Duration(secs+30)*time.Second, args...)
		m.read(v)
		r, perr := parseWrk(out)
		if perr != nil {
			return nil, cmp.Or(err, perr)
		}
		v[mValue], v[mP50], v[mP99], v[mErrors] = r.rps, r.p50, r.p99, r.errors
		return v, nil
	}
}

type wrkResult struct {
	rps, p50, p99 float64 // req/s; ms
	errors        float64
}

var (
	wrkRPS     = regexp.MustCompile(`(?m)^Requests/sec:\s+([0-9.]+)`)
	wrkPct     = regexp.MustCompile(`(?m)^\s+(50|99)%\s+([0-9.]+)(us|ms|s|m)\s*$`)
	wrkSockErr = regexp.MustCompile(`Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)`)
	wrkNon2xx  = regexp.MustCompile(`Non-2xx or 3xx responses: (\d+)`)
)

// parseWrk reads the figures of `wrk --latency` output.
func parseWrk(out string) (wrkResult, error) {
	var r wrkResult
	m := wrkRPS.FindStringSubmatch(out)
	if m == nil {
		return r, fmt.Errorf("wrk: no Requests/sec in %q", strings.TrimSpace(out))
	}
	r.rps, _ = strconv.ParseFloat(m[1], 64)
	for _, p := range wrkPct.FindAllStringSubmatch(out, -1) {
		ms, _ := strconv.ParseFloat(p[2], 64)
		switch p[3] {
		case "us":
			ms /= 1000
		case "s":
			ms *= 1000
		case "m":
			ms *= 60000
		}
		if p[1] == "50" {
			r.p50 = ms
		} else {
			r.p99 = ms
		}
	}
	if m := wrkSockErr.FindStringSubmatch(out); m != nil {
		for _, s := range m[1:] {
			n, _ := strconv.ParseFloat(s, 64)
			r.errors += n
		}
	}
	if m := wrkNon2xx.FindStringSubmatch(out); m != nil {
		n, _ := strconv.ParseFloat(m[1], 64)
		r.errors += n
	}
	return r, nil
}

// idle opens sessions from a client process on the load CPU through the
// proxy to the echo backend, and weighs the proxy's processes (PSS summed)
// before and after.
func idle(h *harness, t target) (map[string]float64, error) {
	n := h.opt.idleSessions
	if t.peer.idleCap > 0 && t.peer.idleCap < n {
		n = t.peer.idleCap
	}
	// Warm up: a few sessions with traffic, so pools and runtime have their
	// steady-state shape before the baseline.
	for i := 0; i < 50; i++ {
		c, err := pingOnce(t.addr)
		if err != nil {
			return nil, fmt.Errorf("warm-up: %v", err)
		}
		c.Close()
	}
	time.Sleep(500 * time.Millisecond)
	before, _ := treePSS(t.px.pid())
	cl, err := h.start("idleclient", startOpts{cpus: cpuList(h.opt.loadCPU), stdin: true, stdout: true,
		env: []string{roleEnv + "=idleclient"}}, h.self, t.addr, strconv.Itoa(n))
	if err != nil {
		return nil, err
	}
	defer cl.stop(5 * time.Second)
	line, err := cl.line(time.Duration(n/64+1)*6*time.Second + 30*time.Second)
	if err != nil {
		return nil, err
	}
	var r idleResult
	if err := json.Unmarshal([]byte(line), &r); err != nil {
		return nil, fmt.Errorf("idleclient: %v: %q", err, line)
	}
	time.Sleep(time.Second) // let the last events settle
	after, procs := treePSS(t.px.pid())
	if r.Held == 0 {
		return nil, fmt.Errorf("no session held: %s", r.Err)
	}
	v := map[string]float64{
		mPSS:   float64(after-before) / float64(r.Held),
		mHeld:  float64(r.Held),
		mProcs: float64(procs),
	}
	if r.Failed > 0 {
		h.notef("idle: %s held %d of %d sessions; then: %s", t.peer.name, r.Held, n, r.Err)
	}
	return v, nil
}

// rtt runs a ping-pong client on the load CPU through the proxy to the
// blocking echo backend.
func rtt(h *harness, t target) (map[string]float64, error) {
	d := min(h.opt.rttDuration, h.opt.duration)
	v := map[string]float64{}
	m := h.meter(t)
	out, err := h.runTool("rttclient", h.opt.loadCPU, []string{roleEnv + "=rttclient"}, d+30*time.Second,
		h.self, t.addr, d.String(), "64")
	m.read(v)
	if err != nil {
		return nil, err
	}
	var r rttResult
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		return nil, fmt.Errorf("rttclient: %v: %q", err, out)
	}
	if r.Err != "" {
		return nil, fmt.Errorf("rttclient: %s", r.Err)
	}
	v[mP50], v[mP99] = r.P50us, r.P99us
	if t.px != nil && r.N > 0 {
		v[mCPUus] = m.ticks * 1e6 / float64(r.N)
	}
	return v, nil
}
