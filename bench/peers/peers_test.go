package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// The test binary serves the harness's roles too, as the command does.
func TestMain(m *testing.M) {
	if role := os.Getenv(roleEnv); role != "" {
		os.Exit(runRole(role, os.Args[1:]))
	}
	os.Exit(m.Run())
}

// A short run of the harness itself: one repetition of the round-trip
// scenario against direct and sluice, which needs no Debian package but
// taskset. It checks that the harness runs and reports, never how fast
// anything is.
func TestSmokeRTT(t *testing.T) {
	smoke(t, "rtt,rtt-local", "direct,sluice", "300ms", "### rtt:", "### rtt-local:", "| sluice |", "| direct |")
}

// A short run of the sni scenario: every peer that routes by TLS name, in
// its configuration, reaching the TLS backend.
func TestSmokeSNI(t *testing.T) {
	for _, tool := range []string{"haproxy", "nginx"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("no %s (make bench-deps)", tool)
		}
	}
	smokeServed(t, "sni,sni-replay", "direct,haproxy,nginx,nginx-hc,sluice", "1s", "### sni:", "### sni-replay:", "| sluice |", "| haproxy |", "| nginx |", "| nginx-hc |", "routed conn/s per proxy core")
}

// smoke runs the harness once, briefly, and checks the report has want and
// no failure. It checks that the harness runs and reports, never how fast
// anything is.
func smoke(t *testing.T, scenarios, peers, duration string, want ...string) {
	t.Helper()
	smokeRun(t, scenarios, peers, duration, want...)
}

// smokeServed runs smoke and checks that every peer that runs a scenario
// served: a sample with a positive figure and no error, neither its own nor
// the load's (wrk's socket errors and non-2xx replies).
func smokeServed(t *testing.T, scenarios, peers, duration string, want ...string) {
	t.Helper()
	samples := smokeRun(t, scenarios, peers, duration, want...)
	got := map[string]rawSample{}
	for _, s := range samples {
		got[s.Scenario+" "+s.Peer] = s
	}
	for _, sn := range splitList(scenarios) {
		sc, _ := scenarioByName(sn)
		for _, pn := range splitList(peers) {
			p, _ := peerByName(pn)
			s, ran := got[sn+" "+pn]
			switch why := skipReason(sc, p); {
			case why != "" && ran:
				t.Errorf("%s, %s: ran, though skipped (%s)", sn, pn, why)
			case why != "":
			case !ran:
				t.Errorf("%s, %s: no sample", sn, pn)
			case s.Err != "" || s.Values[mValue] <= 0 || s.Values[mErrors] != 0:
				t.Errorf("%s, %s: did not serve cleanly: %s %v", sn, pn, s.Err, s.Values)
			}
		}
	}
}

// smokeRun runs the harness once with --json and returns its samples.
func smokeRun(t *testing.T, scenarios, peers, duration string, want ...string) []rawSample {
	t.Helper()
	if testing.Short() {
		t.Skip("builds sluice and runs processes")
	}
	if _, err := exec.LookPath("taskset"); err != nil {
		t.Skip("no taskset")
	}
	out := filepath.Join(t.TempDir(), "RESULTS.md")
	if err := os.WriteFile(out, []byte("# kept\n\nearlier text\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	jsonOut := filepath.Join(t.TempDir(), "samples.json")
	args := []string{"--scenarios", scenarios, "--peers", peers, "--reps", "1",
		"--duration", duration, "--out", out, "--json", jsonOut}
	if runtime.NumCPU() < 2 {
		args = append(args, "--proxy-cpu", "0")
	}
	var stdout, stderr bytes.Buffer
	if code := runMain(args, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d\n%s", code, stderr.String())
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	got := string(b)
	for _, w := range append([]string{"# kept\n\nearlier text\n", sectionBegin, sectionEnd}, want...) {
		if !strings.Contains(got, w) {
			t.Errorf("report lacks %q:\n%s", w, got)
		}
	}
	if strings.Contains(got, "FAILED") || strings.Contains(got, "repetitions failed") {
		t.Errorf("a run failed:\n%s\n%s", got, stderr.String())
	}
	var samples []rawSample
	if b, err := os.ReadFile(jsonOut); err != nil {
		t.Fatal(err)
	} else if err := json.Unmarshal(b, &samples); err != nil {
		t.Fatalf("--json: %v", err)
	}
	if t.Failed() {
		t.Logf("progress:\n%s", stderr.String())
	}
	return samples
}

func TestParseWrk(t *testing.T) {
	out := `Running 2s test @ http://127.0.0.1:40000/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.05ms  302.11us   9.87ms   91.20%
    Req/Sec    48.10k     2.01k   50.30k    80.00%
  Latency Distribution
     50%  987.00us
     75%    1.10ms
     90%    1.30ms
     99%    2.50ms
  95712 requests in 2.00s, 117.48MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 2
Requests/sec:  47856.12
Transfer/sec:     58.74MB
`
	r, err := parseWrk(out)
	if err != nil {
		t.Fatal(err)
	}
	if r.rps != 47856.12 || r.p50 != 0.987 || r.p99 != 2.5 || r.errors != 6 {
		t.Errorf("got %+v", r)
	}
	if _, err := parseWrk("unable to connect"); err == nil {
		t.Error("no error on output without figures")
	}
}

func TestParseIperf3(t *testing.T) {
	bps, err := parseIperf3(`{"start":{},"end":{"sum_sent":{"bits_per_second":2e10},"sum_received":{"bits_per_second":1.5e10}}}`)
	if err != nil || bps != 1.5e10 {
		t.Errorf("got %v, %v", bps, err)
	}
	if _, err := parseIperf3(`{"start":{},"end":{},"error":"unable to connect to server"}`); err == nil {
		t.Error("no error on an iperf3 error")
	}
}

func TestStatAndSection(t *testing.T) {
	s, ok := statOf([]float64{3, 1, 2, 10})
	if !ok || s.med != 2.5 || s.lo != 1 || s.hi != 10 || s.n != 4 {
		t.Errorf("statOf: %+v", s)
	}
	if _, ok := statOf(nil); ok {
		t.Error("statOf(nil) ok")
	}
	if got := fmtNum(13456.7); got != "13 457" {
		t.Errorf("fmtNum = %q", got)
	}
	path := filepath.Join(t.TempDir(), "r.md")
	os.WriteFile(path, []byte("a\n"+sectionBegin+"\nold\n"+sectionEnd+"\nb\n"), 0o644)
	if err := writeSection(path, sectionBegin+"\nnew\n"+sectionEnd+"\n"); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	if want := "a\n" + sectionBegin + "\nnew\n" + sectionEnd + "\nb\n"; string(b) != want {
		t.Errorf("got %q, want %q", b, want)
	}
}

func TestParseTimeWait(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
	}{
		{"sockets: used 120\nTCP: inuse 5 orphan 0 tw 28369 alloc 9 mem 1\nUDP: inuse 1 mem 0\n", 28369},
		{"TCP: inuse 5 orphan 0 tw 0 alloc 9 mem 1\n", 0},
		{"TCP: inuse 5 orphan 0 alloc 9\n", -1},
		{"", -1},
	} {
		if got := parseTimeWait(tc.in); got != tc.want {
			t.Errorf("parseTimeWait(%q) = %d, want %d", tc.in, got, tc.want)
		}
	}
}

// A short run of the TLS termination scenarios: every peer that terminates
// TLS, in its configuration, reaching the backend (and resuming, for
// tls-hs-resume).
func TestSmokeTLSTerm(t *testing.T) {
	for _, tool := range []string{"haproxy", "nginx"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("no %s (make bench-deps)", tool)
		}
	}
	smoke(t, "tls-hs,tls-hs-resume,tls-bulk", "haproxy,nginx,sluice", "1s", "### tls-hs:", "### tls-hs-resume:", "### tls-bulk:",
		"| sluice |", "| haproxy |", "| nginx |", "TLS handshakes/s per proxy core")
}

// needTools skips the test without the programs the peers need.
func needTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("no %s (make bench-deps)", tool)
		}
	}
}

// Issue 22's scenarios, each briefly against every peer that can run it:
// each serves without an error, and those that cannot are named with why.
func TestSmokeCPSAny(t *testing.T) {
	needTools(t, "haproxy", "nginx", "wrk", "socat")
	smokeServed(t, "cps-any", "direct,haproxy,nginx,nginx-hc,socat,gocopy,sluice", "1s", "### cps-any:", "| sluice |", "| gocopy |", "| socat |", "| nginx-hc |")
}

// 3 s: socat forks a process per connection, and 1 000 forks on a loaded
// CPU can take more than a second before its first reply.
func TestSmokeRPS1K(t *testing.T) {
	needTools(t, "haproxy", "nginx", "wrk", "socat")
	smokeServed(t, "rps-1k", "direct,haproxy,nginx,socat,gocopy,sluice", "3s", "### rps-1k:", "| sluice |", "| socat |")
}

func TestSmokeProxy(t *testing.T) {
	needTools(t, "haproxy", "nginx", "wrk")
	smokeServed(t, "proxy-rps,proxy-cps", "direct,haproxy,haproxy-splice,nginx,socat,gocopy,sluice,sluice-splice", "1s",
		"### proxy-rps:", "### proxy-cps:", "| sluice-splice |", "| haproxy |", "| nginx |",
		"`socat` (does not speak the PROXY protocol); `gocopy` (does not speak the PROXY protocol)")
}

func TestSmokeLoops2(t *testing.T) {
	needTools(t, "haproxy", "nginx", "wrk")
	smokeServed(t, "loops2-rps,loops2-cps", "direct,haproxy,nginx,socat,gocopy,sluice", "1s",
		"### loops2-rps:", "### loops2-cps:", "| sluice |", "| gocopy |", "`socat` (forks a process per session")
}

func TestCPUList(t *testing.T) {
	for _, tc := range []struct {
		in   []int
		want string
	}{
		{[]int{1}, "1"},
		{[]int{1, 0}, "1,0"},
		{[]int{0, 0}, "0"},
		{[]int{-1}, ""},
		{nil, ""},
	} {
		if got := cpuList(tc.in...); got != tc.want {
			t.Errorf("cpuList(%v) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// Every scenario is in exactly one of the default and opt-in lists, and
// every opt-in one is named in the -h text.
func TestScenarioLists(t *testing.T) {
	if d, o := len(defaultScenarios()), len(optInScenarios()); d+o != len(allScenarios) || o == 0 {
		t.Errorf("%d default + %d opt-in scenarios of %d", d, o, len(allScenarios))
	}
	var help bytes.Buffer
	parseFlags([]string{"-h"}, &help)
	for _, s := range optInScenarios() {
		if !strings.Contains(help.String(), s.name) {
			t.Errorf("-h does not name %s:\n%s", s.name, help.String())
		}
	}
}
