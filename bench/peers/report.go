package main

import (
	"fmt"
	"math"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"time"
)

// sample is one measurement of one peer in one scenario and repetition.
type sample struct {
	v   map[string]float64
	err string
	ran bool // false: the peer did not run in this repetition
}

func (s sample) ok() bool { return s.ran && s.err == "" }

func (s sample) get(k string) (float64, bool) {
	if !s.ok() {
		return 0, false
	}
	v, ok := s.v[k]
	return v, ok
}

// brief is the progress line of a sample.
func (s sample) brief(sc scenario) string {
	if s.err != "" {
		return "FAILED: " + s.err
	}
	var b strings.Builder
	switch sc.kind {
	case kindThroughput:
		fmt.Fprintf(&b, "%s %s", fmtNum(s.v[mValue]), sc.unit)
		if _, ok := s.v[mP99]; ok {
			fmt.Fprintf(&b, ", p50 %s ms, p99 %s ms", fmtNum(s.v[mP50]), fmtNum(s.v[mP99]))
		}
	case kindIdle:
		fmt.Fprintf(&b, "%s B per session, %.0f held, %.0f processes", fmtNum(s.v[mPSS]), s.v[mHeld], s.v[mProcs])
	case kindRTT:
		fmt.Fprintf(&b, "p50 %s µs, p99 %s µs", fmtNum(s.v[mP50]), fmtNum(s.v[mP99]))
	}
	if busy, ok := s.v[mBusy]; ok {
		fmt.Fprintf(&b, ", proxy CPU %.0f %%", 100*busy)
	}
	if other, ok := s.v[mOther]; ok {
		fmt.Fprintf(&b, ", others on its CPU %.0f %%", 100*other)
	}
	if load, ok := s.v[mLoad]; ok {
		fmt.Fprintf(&b, ", load CPU %.0f %%", 100*load)
	}
	return b.String()
}

// results are the samples of a run and what the report says about the run.
type results struct {
	h          *harness
	start, end time.Time
	loadMin    float64
	loadMax    float64
	samples    map[string]map[string][]sample // scenario, peer, repetition
	notes      []string
}

func newResults(h *harness) *results {
	return &results{h: h, start: time.Now(), loadMin: math.Inf(1), loadMax: math.Inf(-1),
		samples: map[string]map[string][]sample{}}
}

func (r *results) loadSample() {
	if l := loadAvg(); l >= 0 {
		r.loadMin, r.loadMax = math.Min(r.loadMin, l), math.Max(r.loadMax, l)
	}
}

func (r *results) add(scen, peer string, rep int, s sample) {
	s.ran = true
	m := r.samples[scen]
	if m == nil {
		m = map[string][]sample{}
		r.samples[scen] = m
	}
	for len(m[peer]) <= rep {
		m[peer] = append(m[peer], sample{})
	}
	m[peer][rep] = s
}

// rawSample is one sample as --json writes it.
type rawSample struct {
	Scenario, Peer string
	Rep            int
	Values         map[string]float64 `json:",omitempty"`
	Err            string             `json:",omitempty"`
}

// raw is every sample, for --json.
func (r *results) raw() []rawSample {
	var out []rawSample
	for _, sc := range r.h.opt.scenarios {
		for _, p := range r.h.opt.peers {
			for rep, s := range r.samples[sc.name][p.name] {
				if s.ran {
					out = append(out, rawSample{sc.name, p.name, rep + 1, s.v, s.err})
				}
			}
		}
	}
	return out
}

// stat is the median and spread of one figure over the repetitions.
type stat struct {
	med, lo, hi float64
	n           int
}

func statOf(xs []float64) (stat, bool) {
	if len(xs) == 0 {
		return stat{}, false
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	med := s[len(s)/2]
	if len(s)%2 == 0 {
		med = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return stat{med: med, lo: s[0], hi: s[len(s)-1], n: len(s)}, true
}

func (r *results) reps(scen, peer string) []sample { return r.samples[scen][peer] }

// series returns one figure per repetition of a peer: f of its sample, and
// of direct's sample in the same repetition (nil when direct did not run).
func (r *results) series(scen, peer string, f func(s, direct sample) (float64, bool)) []float64 {
	var out []float64
	direct := r.reps(scen, "direct")
	for rep, s := range r.reps(scen, peer) {
		var d sample
		if rep < len(direct) {
			d = direct[rep]
		}
		if v, ok := f(s, d); ok && !math.IsNaN(v) && !math.IsInf(v, 0) {
			out = append(out, v)
		}
	}
	return out
}

func key(k string) func(s, _ sample) (float64, bool) {
	return func(s, _ sample) (float64, bool) { return s.get(k) }
}

// perCore is throughput ÷ the proxy's busy fraction, per repetition.
func perCore(s, _ sample) (float64, bool) {
	v, ok1 := s.get(mValue)
	b, ok2 := s.get(mBusy)
	if !ok1 || !ok2 || b <= 0 {
		return 0, false
	}
	return v / b, true
}

// added is a latency minus direct's in the same repetition.
func added(k string) func(s, d sample) (float64, bool) {
	return func(s, d sample) (float64, bool) {
		v, ok1 := s.get(k)
		dv, ok2 := d.get(k)
		return v - dv, ok1 && ok2
	}
}

func (r *results) stat(scen, peer string, f func(s, d sample) (float64, bool)) (stat, bool) {
	return statOf(r.series(scen, peer, f))
}

// Formatting.

func fmtNum(v float64) string {
	a := math.Abs(v)
	switch {
	case a >= 10000:
		s := fmt.Sprintf("%.0f", a)
		var b strings.Builder
		for i, c := range s {
			if i > 0 && (len(s)-i)%3 == 0 {
				b.WriteByte(' ')
			}
			b.WriteRune(c)
		}
		if v < 0 {
			return "−" + b.String()
		}
		return b.String()
	case a >= 100:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}

func fmtStat(s stat, ok bool) string {
	if !ok {
		return "–"
	}
	if s.n == 1 || s.lo == s.hi {
		return fmtNum(s.med)
	}
	return fmt.Sprintf("%s (%s–%s)", fmtNum(s.med), fmtNum(s.lo), fmtNum(s.hi))
}

// fmtInt is fmtStat for counts.
func fmtInt(s stat, ok bool) string {
	if !ok {
		return "–"
	}
	if s.lo == s.hi {
		return fmt.Sprintf("%.0f", s.med)
	}
	return fmt.Sprintf("%.0f (%.0f–%.0f)", s.med, s.lo, s.hi)
}

func fmtPct(s stat, ok bool) string {
	if !ok {
		return "–"
	}
	return fmt.Sprintf("%.0f %%", 100*s.med)
}

func fmtRatio(a stat, aok bool, b stat, bok bool) string {
	if !aok || !bok || b.med == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f×", a.med/b.med)
}

// failures says how many repetitions of a peer failed, and the first error.
func (r *results) failures(scen, peer string) (int, string) {
	n, first := 0, ""
	for _, s := range r.reps(scen, peer) {
		if s.ran && s.err != "" {
			n++
			if first == "" {
				first = s.err
			}
		}
	}
	return n, first
}

const (
	sectionBegin = "<!-- bench/peers:begin: written by `go run ./bench/peers` (make bench); each run rewrites the text between these markers -->"
	sectionEnd   = "<!-- bench/peers:end -->"
)

// markdown is the report's section of RESULTS.md.
func (r *results) markdown() string {
	h := r.h
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("%s\n\n## Side by side with other proxies (`bench/peers`)\n\n", sectionBegin)
	w("Run: **%s–%s UTC** (%s), `--reps %d --duration %v --rtt-duration %v --idle-sessions %d`.\n",
		r.start.UTC().Format("Mon Jan 2 2006, 15:04"), r.end.UTC().Format("15:04"),
		r.end.Sub(r.start).Round(time.Minute), h.opt.reps, h.opt.duration, min(h.opt.rttDuration, h.opt.duration), h.opt.idleSessions)
	w("Scenarios: %s. Peers: %s.\n\n",
		names(h.opt.scenarios, func(s scenario) string { return s.name }),
		names(h.opt.peers, func(p peer) string { return p.name }))
	w("- Machine: %s; %d CPUs; Linux %s; %s.\n", cpuModel(), runtime.NumCPU(), osRelease(), runtime.Version())
	w("- Tools: %s.\n", strings.Join(toolVersions(h), "; "))
	if r.loadMin <= r.loadMax {
		w("- Load average (1 min): %.2f before the run; %.2f–%.2f between measurements on %d CPUs, which includes the benchmark's own processes (about 2 while a measurement runs; far more while socat forks a process per idle session). ",
			h.loadAtStart, r.loadMin, r.loadMax, runtime.NumCPU())
		w("Other users' work on the proxy's CPU during each measurement is in the *others on proxy CPU* column; absolute figures are noisy, compare peers as ratios within this run.\n")
	}
	w("- Pinning (taskset): the proxy under test on CPU %d; load tools and backends on CPU %d (rtt-local: the proxy on CPU %d too; loops2-rps, loops2-cps: the proxy on CPUs %s, sharing the load's).\n",
		h.opt.proxyCPU, h.opt.loadCPU, h.opt.loadCPU, cpuList(h.opt.proxyCPU, h.opt.loadCPU))
	if n := noFile(); n > 0 {
		w("- Open files: every process started has a soft limit of %d (the hard one).\n", n)
	}
	w("\n")
	w("Method: in every repetition each peer runs once, in the order listed, freshly started and stopped after its run (A B C … A B C …). ")
	w("Figures are medians over the repetitions, with the spread (min–max) in parentheses. ")
	w("*Proxy CPU* is the CPU time of the proxy's processes (utime+stime of the process and its descendants, reaped children included, from `/proc/PID/stat`) ÷ wall time; ")
	w("*per proxy core* is throughput ÷ that busy fraction, per repetition, then the median: the fair figure when the load CPU saturates. ")
	w("*Others on proxy CPU* is the proxy CPU's busy fraction (`/proc/stat`) less the proxy's own: other users' work competing with it. ")
	w("*Load CPU* is CPU %d's busy fraction from `/proc/stat` (every process on it, ours or not). ", h.opt.loadCPU)
	w("Ratios are ratios of medians (× HAProxy: against `haproxy`, no splicing; × direct: against no proxy). ")
	w("Bulk: `iperf3 -c … -t SECS -P 1|4 -J` to `iperf3 -s`, received bits. ")
	w("rps and cps: `wrk -t1 -c50 -d SECS --latency` to nginx (one worker) returning 1 KiB from memory; cps adds `-H 'Connection: close'`. ")
	w("*TIME_WAIT at start* is the `tw` count of `/proc/net/sockstat` when the measurement began: when the sockets toward one destination approach the ephemeral port range (about 28 000 ports here), each connect there searches longer for a free port, a cost charged to whoever connects, the proxy included. ")
	w("sni: a Go crypto/tls client (its default post-quantum hello, no resumption), 50 connections in flight, each a full handshake for `bench.example.com`, `GET /` and the reply, to nginx (one worker, self-signed ECDSA P-256 certificate, `ssl_protocols TLSv1.2 TLSv1.3` (1.22's default lacks 1.3), session cache and tickets off: the client negotiates TLS 1.3); each peer routes that name to it and a decoy name elsewhere without terminating TLS: HAProxy `tcp-request inspect-delay` + `req.ssl_sni` + `use_backend`, nginx stream `ssl_preread` + `map`, sluice two routes `sni=` on one listen key (`run -c`, `--loops 1`); p50/p99 are per connection. ")
	w("sni-replay: sni's byte flow at a rate that saturates the proxy: one exchange of sni's kind (Go's default post-quantum hello for `bench.example.com`, a Go TLS 1.3 server with the same kind of certificate and no tickets, `GET /` and the reply) is recorded once in memory as its four flights (hello; the server's flight; Finished and request; reply and close_notify), then a Go client and a Go backend on the load CPU replay them, each flight sent when the one before has arrived whole and byte for byte as recorded, the backend closing after the last as nginx does; the peers route as in sni. ")
	w("tls-hs, tls-hs-resume, tls-bulk: each peer terminates TLS with the same self-signed ECDSA P-256 certificate, TLS 1.3 only, X25519, `TLS_AES_128_GCM_SHA256` where settable (HAProxy `bind … ssl crt … ssl-min-ver TLSv1.3 ciphersuites … curves X25519`, nginx stream `ssl_protocols TLSv1.3` + `ssl_conf_command Ciphersuites` + `ssl_ecdh_curve X25519`, sluice `tls.cert= tls.key= tls.min=1.3`), plaintext to a Go backend; the Go client pins TLS 1.3 and X25519. tls-hs: 50 connections in flight, each a full handshake, one byte echoed, closed; tls-hs-resume: the same with each worker's session cache (tickets); tls-bulk: one connection writing 64 KiB records for the duration to a discarding backend, bits written. ")
	w("cps-any: cps with every proxy listening on the wildcard (HAProxy `bind 0.0.0.0:PORT`, nginx `listen 0.0.0.0:PORT`, socat `TCP4-LISTEN:PORT` without `bind=`, gocopy on `0.0.0.0:PORT`, sluice `forward 0.0.0.0:PORT …`), wrk still connecting to 127.0.0.1: a proxy that needs a connection's local address must now ask the kernel for it (`getsockname`) on every connection; direct is cps's. ")
	w("rps-1k: rps with `wrk -t1 -c1000`; every process started has the hard open-files limit as its soft one (HAProxy `maxconn 9700`, nginx stream `worker_connections 19800` and `worker_rlimit_nofile 20000`, the nginx backend `worker_connections 10000`). ")
	w("proxy-rps, proxy-cps: the rps and cps loads pass a PROXY front first: HAProxy on CPU %d, one thread, `server … send-proxy-v2`, started afresh with each peer and the same for all, which writes a v2 header on each connection to the peer; the peer reads it and sends a header on to the nginx backend, whose `listen … proxy_protocol` requires one on every connection (a connection without one, or with the front's header left in its payload, fails or gets a 400: both are counted in *errors*). HAProxy `bind … accept-proxy` + `server … send-proxy-v2`; nginx stream `listen … proxy_protocol` + `proxy_protocol on`, which writes v1 (nginx 1.22 writes no v2: a text line of about 45 bytes instead of v2's 28, else the same work); sluice `accept-proxy send-proxy=v2`; direct is the front straight to the backend; socat and gocopy do not speak the PROXY protocol and do not run. Each request crosses three connections (load, front, peer, backend) and the front's work is on the load CPU, so *per proxy core* is the figure to compare. ", h.opt.loadCPU)
	w("loops2-rps, loops2-cps: rps and cps with two threads in every proxy: HAProxy `nbthread 2`, nginx stream `worker_processes 2` (master and both workers counted), sluice `--loops 2`, gocopy with GOMAXPROCS 2 (Go's default on two CPUs), each sharing its listener its own default way, pinned to CPUs %s, while wrk and the backend stay on CPU %d; socat (a process per session, no count of threads) does not run. The load competes with the proxy for CPU %d, so *proxy CPU* may pass 100 %%, *per proxy core* is throughput ÷ the proxy's total CPU (both CPUs summed), *others on proxy CPU* cannot be told apart (–) and *load CPU* includes the proxy's share of CPU %d: compare the peers with each other in these rows, not with the one-CPU rows of rps and cps. ",
		cpuList(h.opt.proxyCPU, h.opt.loadCPU), h.opt.loadCPU, h.opt.loadCPU, h.opt.loadCPU)
	w("idle: after 50 warm-up sessions, a client process opens the sessions 64 at a time, one byte each way, to a Go echo backend; the figure is the growth of the peer's PSS (`/proc/PID/smaps_rollup`, all its processes summed) ÷ sessions held, one second after the last opened. ")
	w("rtt: one session, 64 bytes there and back on blocking sockets, client and echo on CPU %d; *added* is the peer's latency minus direct's in the same repetition; *proxy CPU per round trip* is the proxy's CPU time ÷ round trips.\n\n", h.opt.loadCPU)
	w("Peers:\n\n")
	for _, p := range h.opt.peers {
		w("- `%s`: %s\n", p.name, p.desc)
	}
	w("\n")

	r.goals(&b)
	for _, sc := range h.opt.scenarios {
		w("### %s\n\n", sc.title)
		switch sc.kind {
		case kindThroughput:
			r.throughputTable(&b, sc)
		case kindIdle:
			r.idleTable(&b, sc)
		case kindRTT:
			r.rttTable(&b, sc)
		}
		w("\n")
		var skipped []string
		for _, p := range h.opt.peers {
			if why := skipReason(sc, p); why != "" {
				skipped = append(skipped, fmt.Sprintf("`%s` (%s)", p.name, why))
			}
		}
		if len(skipped) > 0 {
			w("Not run: %s.\n\n", strings.Join(skipped, "; "))
		}
	}
	var notes []string
	notes = append(notes, r.notes...)
	for _, sc := range h.opt.scenarios {
		for _, p := range h.opt.peers {
			if n, first := r.failures(sc.name, p.name); n > 0 {
				notes = append(notes, fmt.Sprintf("%s, %s: %d of %d repetitions failed; first: %s", sc.name, p.name, n, len(r.reps(sc.name, p.name)), oneLine(first)))
			}
		}
	}
	if len(notes) > 0 {
		w("Notes from the run:\n\n")
		for _, n := range notes {
			w("- %s\n", n)
		}
		w("\n")
	}
	w("%s\n", sectionEnd)
	return b.String()
}

func oneLine(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 300 {
		s = s[:300] + "…"
	}
	return s
}

func (r *results) peerNames(scen string) []string {
	var out []string
	for _, p := range r.h.opt.peers {
		if len(r.reps(scen, p.name)) > 0 {
			out = append(out, p.name)
		}
	}
	return out
}

func (r *results) throughputTable(b *strings.Builder, sc scenario) {
	w := func(format string, args ...any) { fmt.Fprintf(b, format, args...) }
	wrk := sc.latency // latencies and errors
	w("| peer | %s | proxy CPU | %s per proxy core | others on proxy CPU | load CPU |", sc.unit, sc.unit)
	if wrk {
		w(" p50 ms | p99 ms | errors | TIME_WAIT at start |")
	}
	w(" × HAProxy | × HAProxy per core | × direct |\n")
	w("|---|---|---|---|---|---|")
	if wrk {
		w("---|---|---|---|")
	}
	w("---|---|---|\n")
	hv, hok := r.stat(sc.name, "haproxy", key(mValue))
	hc, hcok := r.stat(sc.name, "haproxy", perCore)
	dv, dok := r.stat(sc.name, "direct", key(mValue))
	for _, p := range r.peerNames(sc.name) {
		v, vok := r.stat(sc.name, p, key(mValue))
		busy, bok := r.stat(sc.name, p, key(mBusy))
		pc, pcok := r.stat(sc.name, p, perCore)
		load, lok := r.stat(sc.name, p, key(mLoad))
		other, ook := r.stat(sc.name, p, key(mOther))
		w("| %s | %s | %s | %s | %s | %s |", p, fmtStat(v, vok), fmtPct(busy, bok), fmtStat(pc, pcok), fmtPct(other, ook), fmtPct(load, lok))
		if wrk {
			p50, ok50 := r.stat(sc.name, p, key(mP50))
			p99, ok99 := r.stat(sc.name, p, key(mP99))
			errs := 0.0
			for _, x := range r.series(sc.name, p, key(mErrors)) {
				errs += x
			}
			tw, twok := r.stat(sc.name, p, key(mTW))
			w(" %s | %s | %.0f | %s |", fmtStat(p50, ok50), fmtStat(p99, ok99), errs, fmtInt(tw, twok))
		}
		w(" %s | %s | %s |\n", fmtRatio(v, vok, hv, hok), fmtRatio(pc, pcok, hc, hcok), fmtRatio(v, vok, dv, dok))
	}
}

func (r *results) idleTable(b *strings.Builder, sc scenario) {
	w := func(format string, args ...any) { fmt.Fprintf(b, format, args...) }
	w("| peer | sessions held | processes | PSS per idle session, bytes | × HAProxy |\n|---|---|---|---|---|\n")
	hv, hok := r.stat(sc.name, "haproxy", key(mPSS))
	for _, p := range r.peerNames(sc.name) {
		v, vok := r.stat(sc.name, p, key(mPSS))
		held, heldok := r.stat(sc.name, p, key(mHeld))
		procs, pok := r.stat(sc.name, p, key(mProcs))
		w("| %s | %s | %s | %s | %s |\n", p, fmtInt(held, heldok), fmtInt(procs, pok), fmtStat(v, vok), fmtRatio(v, vok, hv, hok))
	}
}

func (r *results) rttTable(b *strings.Builder, sc scenario) {
	w := func(format string, args ...any) { fmt.Fprintf(b, format, args...) }
	w("| peer | p50 µs | p99 µs | added p50 µs | added p99 µs | proxy CPU µs per round trip | × HAProxy (added p50) |\n|---|---|---|---|---|---|---|\n")
	ha, haok := r.stat(sc.name, "haproxy", added(mP50))
	for _, p := range r.peerNames(sc.name) {
		p50, ok50 := r.stat(sc.name, p, key(mP50))
		p99, ok99 := r.stat(sc.name, p, key(mP99))
		a50, oka50 := r.stat(sc.name, p, added(mP50))
		a99, oka99 := r.stat(sc.name, p, added(mP99))
		cpu, okcpu := r.stat(sc.name, p, key(mCPUus))
		if p == "direct" {
			oka50, oka99 = false, false
		}
		w("| %s | %s | %s | %s | %s | %s | %s |\n", p, fmtStat(p50, ok50), fmtStat(p99, ok99),
			fmtStat(a50, oka50), fmtStat(a99, oka99), fmtStat(cpu, okcpu), fmtRatio(a50, oka50, ha, haok))
	}
}

// goal is one row of the summary against issue 9's goals.
type goal struct {
	scen, figure string
	f            func(s, d sample) (float64, bool)
	lower        bool // lower is better
}

var goals = []goal{
	{"bulk1", "Gbit/s", key(mValue), false},
	{"bulk1", "Gbit/s per proxy core", perCore, false},
	{"bulk4", "Gbit/s", key(mValue), false},
	{"bulk4", "Gbit/s per proxy core", perCore, false},
	{"rps", "req/s per proxy core", perCore, false},
	{"rps", "p99 ms", key(mP99), true},
	{"cps", "conn/s", key(mValue), false},
	{"cps", "conn/s per proxy core", perCore, false},
	{"sni", "routed conn/s per proxy core", perCore, false},
	{"sni-replay", "routed conn/s per proxy core, replayed flights", perCore, false},
	{"tls-hs", "TLS handshakes/s per proxy core", perCore, false},
	{"tls-hs-resume", "resumed TLS handshakes/s per proxy core", perCore, false},
	{"tls-bulk", "TLS Gbit/s per proxy core", perCore, false},
	{"idle", "PSS bytes per idle session", key(mPSS), true},
	{"rtt-local", "added p50 µs, proxy on the load CPU", added(mP50), true},
	{"rtt", "added p50 µs, proxy cross-CPU", added(mP50), true},
}

// goals writes, per goal of issue 9, the best peer other than sluice (and
// direct), and sluice against it.
func (r *results) goals(b *strings.Builder) {
	w := func(format string, args ...any) { fmt.Fprintf(b, format, args...) }
	rows := 0
	for _, g := range goals {
		if r.samples[g.scen] == nil {
			continue
		}
		if rows == 0 {
			w("### Against the goals of issue 9 (sluice ahead of every peer)\n\n")
			w("| scenario | figure | best other peer | its figure | haproxy | sluice | sluice splice=on | sluice ÷ best | |\n|---|---|---|---|---|---|---|---|---|\n")
		}
		rows++
		best, bestName, bestOK := stat{}, "", false
		for _, p := range r.peerNames(g.scen) {
			if p == "direct" || strings.HasPrefix(p, "sluice") {
				continue
			}
			s, ok := r.stat(g.scen, p, g.f)
			if !ok {
				continue
			}
			if !bestOK || (g.lower && s.med < best.med) || (!g.lower && s.med > best.med) {
				best, bestName, bestOK = s, p, true
			}
		}
		hs, hok := r.stat(g.scen, "haproxy", g.f)
		ss, sok := r.stat(g.scen, "sluice", g.f)
		sp, spok := r.stat(g.scen, "sluice-splice", g.f)
		verdict := "–"
		if bestOK && sok {
			ahead := ss.med > best.med
			if g.lower {
				ahead = ss.med < best.med
			}
			verdict = "behind"
			if ahead {
				verdict = "ahead"
			}
			if ss.lo <= best.hi && best.lo <= ss.hi {
				verdict += " (ranges overlap)"
			}
		}
		if g.scen == "idle" && sok {
			if ss.med <= 2048 {
				verdict += "; ≤ 2 048 B goal met"
			} else {
				verdict += "; ≤ 2 048 B goal missed"
			}
		}
		name := bestName
		if !bestOK {
			name = "–"
		}
		w("| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", g.scen, g.figure, name, fmtStat(best, bestOK),
			fmtStat(hs, hok), fmtStat(ss, sok), fmtStat(sp, spok), fmtRatio(ss, sok, best, bestOK), verdict)
	}
	if rows > 0 {
		w("\n")
	}
}

// writeSection replaces the bench/peers section of path (between the
// markers) with section, or appends it; the rest of the file is kept.
func writeSection(path, section string) error {
	old, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	s := string(old)
	i := strings.Index(s, sectionBegin)
	j := strings.Index(s, sectionEnd)
	switch {
	case i >= 0 && j > i:
		s = s[:i] + strings.TrimSuffix(section, "\n") + s[j+len(sectionEnd):]
	case len(s) == 0:
		s = section
	default:
		s = strings.TrimRight(s, "\n") + "\n\n" + section
	}
	return os.WriteFile(path, []byte(s), 0o644)
}

func cpuModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
			return "`" + strings.TrimSpace(v) + "`"
		}
	}
	return runtime.GOARCH
}

func osRelease() string {
	b, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return strings.TrimSpace(string(b))
}

var versionRE = regexp.MustCompile(`\d+\.\d+`)

// toolVersions names the version of every tool the run used.
func toolVersions(h *harness) []string {
	var out []string
	for _, t := range [][]string{{"haproxy", "-v"}, {"nginx", "-v"}, {"socat", "-V"}, {"iperf3", "-v"}, {"wrk", "-v"}} {
		if !inStrings(tools(h.opt), t[0]) {
			continue
		}
		b, _ := exec.Command(t[0], t[1]).CombinedOutput()
		line := t[0] + " (version unknown)"
		for _, l := range strings.Split(string(b), "\n") {
			if l = strings.TrimSpace(l); versionRE.MatchString(l) && !strings.HasPrefix(l, "-") {
				line = l
				break
			}
		}
		if len(line) > 70 {
			line = line[:70]
		}
		out = append(out, line)
	}
	return out
}
