// Command peers runs sluice side by side with other proxies — HAProxy (with
// and without splice-auto), nginx stream, socat, a plain io.Copy Go proxy —
// and with no proxy at all, on the same loopback scenarios, and writes a
// table of medians, spreads and ratios to bench/RESULTS.md (issue 9).
//
//	go run ./bench/peers [--reps N] [--duration D] [--scenarios list] [--peers list] [--out FILE]
//
// Peers run one after the other within each repetition (A B C … A B C …),
// each freshly started; the proxy under test is pinned to one CPU and every
// load tool and backend to the other (taskset). All traffic stays on
// 127.0.0.1; every process started is stopped by its pid; temporary files
// live in one temporary directory, removed at the end. `make bench-deps`
// installs the peers from Debian's packages.
//
// Speed is measured and reported here, never asserted.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	if role := os.Getenv(roleEnv); role != "" {
		os.Exit(runRole(role, os.Args[1:]))
	}
	os.Exit(runMain(os.Args[1:], os.Stdout, os.Stderr))
}

type options struct {
	reps         int
	duration     time.Duration
	rttDuration  time.Duration
	scenarios    []scenario
	peers        []peer
	out          string
	jsonOut      string
	idleSessions int
	proxyCPU     int
	loadCPU      int
	sluice       string
	sluiceB      string
	keep         bool
}

// harness is one run: its options, temporary directory, and every process
// it started.
type harness struct {
	opt    options
	dir    string
	root   string // the module's root
	self   string // this binary, for the roles
	sluice string // the sluice binary
	gocopy string // the integration tests' binary (the gocopy peer role)
	log    io.Writer

	loadAtStart float64 // 1-minute load average before the harness did anything

	mu    sync.Mutex
	seq   int
	procs []*proc
	notes []string
}

func (h *harness) notef(format string, args ...any) {
	s := fmt.Sprintf(format, args...)
	fmt.Fprintln(h.log, "note:", s)
	h.mu.Lock()
	h.notes = append(h.notes, s)
	h.mu.Unlock()
}

// secs rounds a duration to whole seconds, at least one (iperf3 and wrk
// count in seconds).
func (h *harness) secs(d time.Duration) int {
	return max(1, int(d.Round(time.Second)/time.Second))
}

// cleanup stops every process still running, newest first, and removes the
// temporary directory unless asked to keep it.
func (h *harness) cleanup() {
	h.mu.Lock()
	procs := h.procs
	h.procs = nil
	h.mu.Unlock()
	for i := len(procs) - 1; i >= 0; i-- {
		procs[i].stop(3 * time.Second)
	}
	if h.dir != "" {
		if h.opt.keep {
			fmt.Fprintln(h.log, "kept", h.dir)
		} else {
			os.RemoveAll(h.dir)
		}
	}
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	fs := flag.NewFlagSet("peers", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o options
	var scen, peers string
	fs.IntVar(&o.reps, "reps", 3, "repetitions; within each, every peer runs once, in order")
	fs.DurationVar(&o.duration, "duration", 10*time.Second, "length of each bulk, rps and cps run (whole seconds)")
	fs.DurationVar(&o.rttDuration, "rtt-duration", 5*time.Second, "length of each rtt run (at most --duration)")
	scenName := func(s scenario) string { return s.name }
	fs.StringVar(&scen, "scenarios", names(defaultScenarios(), scenName),
		"comma-separated scenarios; not in the default list, run only when named (issue 22's; about 60 % more time together): "+names(optInScenarios(), scenName))
	fs.StringVar(&peers, "peers", defaultPeers(), "comma-separated peers (also, run only when named: sluice-b with --sluice-b; sluice-busy and haproxy-busy, busy-polling)")
	fs.StringVar(&o.out, "out", "bench/RESULTS.md", "file whose bench/peers section is (re)written; relative to the module root; - for stdout only")
	fs.StringVar(&o.jsonOut, "json", "", "also write every sample as JSON to this file")
	fs.IntVar(&o.idleSessions, "idle-sessions", 9500, "idle sessions per peer (socat is held to 2000: a process each)")
	fs.IntVar(&o.proxyCPU, "proxy-cpu", 1, "CPU the proxy under test is pinned to")
	fs.IntVar(&o.loadCPU, "load-cpu", 0, "CPU the load tools and backends are pinned to")
	fs.StringVar(&o.sluice, "sluice", "", "a sluice binary to use instead of building ./cmd/sluice")
	fs.StringVar(&o.sluiceB, "sluice-b", "", "a second sluice binary, run as peer sluice-b (a before/after comparison in one run)")
	fs.BoolVar(&o.keep, "keep", false, "keep the temporary directory (configurations, logs)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	switch {
	case o.reps < 1 || o.reps > 50:
		return o, fmt.Errorf("--reps %d: want 1 to 50", o.reps)
	case o.duration < 100*time.Millisecond || o.duration > 10*time.Minute:
		return o, fmt.Errorf("--duration %v: want 100ms to 10m", o.duration)
	case o.rttDuration < 100*time.Millisecond:
		return o, fmt.Errorf("--rtt-duration %v: want at least 100ms", o.rttDuration)
	case o.idleSessions < 1 || o.idleSessions > 9500:
		// 9 500 sessions are 19 000 fds in a one-process proxy, within
		// the 20 000 per process here.
		return o, fmt.Errorf("--idle-sessions %d: want 1 to 9500", o.idleSessions)
	}
	n := runtime.NumCPU()
	if o.proxyCPU < 0 || o.proxyCPU >= n || o.loadCPU < 0 || o.loadCPU >= n {
		return o, fmt.Errorf("--proxy-cpu %d, --load-cpu %d: this machine has CPUs 0 to %d", o.proxyCPU, o.loadCPU, n-1)
	}
	for _, s := range splitList(scen) {
		sc, ok := scenarioByName(s)
		if !ok {
			return o, fmt.Errorf("unknown scenario %q (have %s)", s, names(allScenarios, func(s scenario) string { return s.name }))
		}
		o.scenarios = append(o.scenarios, sc)
	}
	for _, s := range splitList(peers) {
		p, ok := peerByName(s)
		if !ok {
			return o, fmt.Errorf("unknown peer %q (have %s)", s, names(allPeers, func(p peer) string { return p.name }))
		}
		o.peers = append(o.peers, p)
	}
	for _, p := range o.peers {
		if p.name == "sluice-b" && o.sluiceB == "" {
			return o, errors.New("peer sluice-b needs --sluice-b BINARY")
		}
	}
	if len(o.scenarios) == 0 || len(o.peers) == 0 {
		return o, errors.New("no scenario or no peer")
	}
	return o, nil
}

func defaultPeers() string {
	var l []string
	for _, p := range allPeers {
		if !p.optIn {
			l = append(l, p.name)
		}
	}
	return strings.Join(l, ",")
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func names[T any](l []T, name func(T) string) string {
	s := make([]string, len(l))
	for i, x := range l {
		s[i] = name(x)
	}
	return strings.Join(s, ",")
}

// tools returns the programs the chosen scenarios and peers need.
func tools(o options) []string {
	need := []string{"taskset"}
	for _, s := range o.scenarios {
		switch s.name {
		case "bulk1", "bulk4":
			need = append(need, "iperf3")
		case "rps", "cps", "cps-any", "rps-1k", "loops2-rps", "loops2-cps":
			need = append(need, "wrk", "nginx")
		case "proxy-rps", "proxy-cps":
			need = append(need, "wrk", "nginx", "haproxy") // HAProxy is the PROXY front
		case "sni":
			need = append(need, "nginx")
		}
	}
	for _, p := range o.peers {
		switch p.name {
		case "haproxy", "haproxy-splice":
			need = append(need, "haproxy")
		case "nginx", "nginx-hc":
			need = append(need, "nginx")
		case "socat":
			need = append(need, "socat")
		}
	}
	return need
}

func runMain(args []string, stdout, stderr io.Writer) int {
	opt, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "peers:", err)
		return 2
	}
	h := &harness{opt: opt, log: stderr, loadAtStart: loadAvg()}
	if err := h.setup(); err != nil {
		fmt.Fprintln(stderr, "peers:", err)
		h.cleanup()
		return 1
	}
	// Ctrl-C or SIGTERM: stop what was started, by pid, then leave.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sig)
	go func() {
		if _, ok := <-sig; ok {
			fmt.Fprintln(stderr, "peers: interrupted; stopping what was started")
			h.cleanup()
			os.Exit(130)
		}
	}()
	res := h.run()
	h.cleanup()

	section := res.markdown()
	if opt.jsonOut != "" {
		if b, err := json.MarshalIndent(res.raw(), "", "  "); err == nil {
			os.WriteFile(h.resolve(opt.jsonOut), b, 0o644)
		}
	}
	if opt.out == "-" {
		fmt.Fprint(stdout, section)
		return 0
	}
	path := h.resolve(opt.out)
	if err := writeSection(path, section); err != nil {
		fmt.Fprintln(stderr, "peers:", err)
		fmt.Fprint(stdout, section)
		return 1
	}
	fmt.Fprint(stdout, section)
	fmt.Fprintln(stderr, "peers: wrote", path)
	return 0
}

// resolve makes a relative path relative to the module root.
func (h *harness) resolve(p string) string {
	if filepath.IsAbs(p) || h.root == "" {
		return p
	}
	return filepath.Join(h.root, p)
}

// setup checks the tools, makes the temporary directory and builds sluice
// and the gocopy peer as needed.
func (h *harness) setup() error {
	var missing []string
	for _, t := range tools(h.opt) {
		if _, err := exec.LookPath(t); err != nil && !inStrings(missing, t) {
			missing = append(missing, t)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing %s: run `make bench-deps` (Debian packages)", strings.Join(missing, ", "))
	}
	// Every process started gets the hard open-files limit as its soft
	// one: wrk with 1 000 connections (rps-1k) and a proxy holding two fds
	// per connection need more than a soft limit of 1 024. (Go raises its
	// own soft limit but starts children with the one it was given, unless
	// the program sets it, as here.)
	if n := raiseNoFile(); n >= 0 && n < 4096 {
		for _, s := range h.opt.scenarios {
			if s.name == "rps-1k" {
				h.notef("rps-1k: the open-files limit is %d per process; 1 000 connections need about 2 100 in a proxy", n)
			}
		}
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	h.self = self
	gomod, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return fmt.Errorf("go env GOMOD: %v", err)
	}
	h.root = filepath.Dir(strings.TrimSpace(string(gomod)))
	if h.dir, err = os.MkdirTemp("", "sluice-bench-"); err != nil {
		return err
	}
	needSluice, needGoCopy := false, false
	for _, p := range h.opt.peers {
		needSluice = needSluice || strings.HasPrefix(p.name, "sluice")
		needGoCopy = needGoCopy || p.name == "gocopy"
	}
	if needSluice {
		h.sluice = h.opt.sluice
		if h.sluice == "" {
			h.sluice = filepath.Join(h.dir, "sluice")
			if err := h.goCmd("build", "-o", h.sluice, "./cmd/sluice"); err != nil {
				return err
			}
		}
	}
	if needGoCopy {
		// The plain Go proxy is a peer role of the integration tests'
		// binary: reused as it is, not copied here.
		h.gocopy = filepath.Join(h.dir, "integration.test")
		if err := h.goCmd("test", "-c", "-o", h.gocopy, "./test/integration"); err != nil {
			return err
		}
	}
	return nil
}

func (h *harness) goCmd(args ...string) error {
	cmd := exec.Command("go", args...)
	cmd.Dir = h.root
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, out.String())
	}
	return nil
}

func inStrings(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

// run measures every scenario: its backend started once, then for each
// repetition every peer in order, each freshly started and stopped.
func (h *harness) run() *results {
	res := newResults(h)
	for _, sc := range h.opt.scenarios {
		res.loadSample()
		backend, bp, err := sc.backend(h)
		if err != nil {
			h.notef("%s: backend: %v", sc.name, err)
			continue
		}
		for rep := 0; rep < h.opt.reps; rep++ {
			for _, p := range h.opt.peers {
				if skipReason(sc, p) != "" {
					continue // the report says why
				}
				s := h.once(sc, p, backend)
				res.add(sc.name, p.name, rep, s)
				fmt.Fprintf(h.log, "[%s %d/%d] %-14s %s\n", sc.name, rep+1, h.opt.reps, p.name, s.brief(sc))
				res.loadSample()
			}
		}
		bp.stop(3 * time.Second)
	}
	res.end = time.Now()
	h.mu.Lock()
	res.notes = append(res.notes, h.notes...)
	h.mu.Unlock()
	return res
}

// once starts peer p to the backend (and the PROXY front to p, when the
// scenario has one), lets it settle, measures, stops it.
func (h *harness) once(sc scenario, p peer, backend string) sample {
	cpu := h.opt.proxyCPU
	if sc.local {
		cpu = h.opt.loadCPU
	}
	cpus := cpuList(cpu)
	if sc.variant.threads > 1 {
		// Both CPUs: the proxy's threads share the load's CPU.
		cpus, cpu = cpuList(h.opt.proxyCPU, h.opt.loadCPU), -1
	}
	var addr string
	var px *proc
	var err error
	if sc.route != nil {
		addr, px, err = sc.route(h, p, backend, cpu)
	} else {
		addr, px, err = p.start(h, spec{target: backend, cpus: cpus, variant: sc.variant})
	}
	if err != nil {
		return sample{err: err.Error()}
	}
	var front *proc
	if sc.front {
		if addr, front, err = h.startProxyFront(addr); err != nil {
			if px != nil {
				px.stop(5 * time.Second)
			}
			return sample{err: "PROXY front: " + err.Error()}
		}
	}
	time.Sleep(300 * time.Millisecond)
	v, err := sc.measure(h, target{peer: p, addr: addr, px: px, cpu: cpu, backend: backend})
	if front != nil {
		if front.exited() && err == nil {
			err = fmt.Errorf("the PROXY front exited during the run: %v (log: %s)", front.err, front.logTail())
		}
		front.stop(5 * time.Second)
	}
	if px != nil {
		if px.exited() && err == nil {
			err = fmt.Errorf("%s exited during the run: %v (log: %s)", p.name, px.err, px.logTail())
		}
		px.stop(5 * time.Second)
	}
	time.Sleep(300 * time.Millisecond) // let the kernel finish with the closed sockets
	if err != nil {
		return sample{v: v, err: err.Error()}
	}
	return sample{v: v}
}
