package integration

import (
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"
)

// Thousands of backends of a port range checked at check.interval=2s:
// three target ranges of one listen range, every backend a real listener.
// The daemon's CPU over three intervals and its fds (sampled every 100 ms)
// are reported and bounded: checks are spread over the interval, one in
// flight per backend at most, so the fds above the listening sockets stay
// a small fraction of the backends. SLUICE_CHECK_BACKENDS sets how many
// (default 1200 in make test; the 10 000 with
// SLUICE_CHECK_BACKENDS=10000).
func TestCheckLoadPortRange(t *testing.T) {
	total := envInt("SLUICE_CHECK_BACKENDS", 1200)
	ports := (total + 2) / 3
	if ports > 4096 {
		ports = 4096
	}
	blo := freeRange(t, ports)
	var lns []net.Listener
	for _, a := range []string{"127.0.0.1", "127.0.0.2", "127.0.0.3"} {
		for p := blo; p < blo+ports; p++ {
			ln, err := net.Listen("tcp", fmt.Sprintf("%s:%d", a, p))
			if err != nil {
				t.Fatalf("backend %s:%d: %v", a, p, err)
			}
			lns = append(lns, ln)
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					c.Close()
				}
			}()
		}
	}
	t.Cleanup(func() {
		for _, ln := range lns {
			ln.Close()
		}
	})
	lo := freeRange(t, ports) // after the backends are bound: never their ports
	rng := fmt.Sprintf("%d-%d", blo, blo+ports-1)
	mport := freePort(t)
	file := writeFile(t, "checkload.yaml", fmt.Sprintf(`loops: 2
log: {level: warn}
metrics: {listen: 127.0.0.1:%d}
rules:
  - tcp 127.0.0.1:%d-%d -> 127.0.0.1:%s,127.0.0.2:%s,127.0.0.3:%s check=tcp check.interval=2s check.timeout=1s
`, mport, lo, lo+ports-1, rng, rng, rng))
	d := startDaemon(t, forwardOpts{}, "run", "-c", file)
	d.waitListening(fmt.Sprintf("127.0.0.1:%d", lo+ports-1))
	pid := d.cmd.Process.Pid
	fdsNow := func() int {
		es, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		if err != nil {
			t.Fatal(err)
		}
		return len(es)
	}
	time.Sleep(2 * time.Second) // the first round of checks under way
	base := fdsNow()
	c0, t0 := cpuTicks(t, pid), time.Now()
	peak := 0
	for time.Since(t0) < 6*time.Second {
		if n := fdsNow(); n > peak {
			peak = n
		}
		time.Sleep(100 * time.Millisecond)
	}
	cpu := float64(cpuTicks(t, pid)-c0) / clockTicks / time.Since(t0).Seconds()
	_, metrics := httpGet(t, fmt.Sprintf("http://127.0.0.1:%d/metrics", mport))
	ok, fail, up := 0.0, 0.0, 0
	for _, l := range strings.Split(metrics, "\n") {
		var v float64
		switch {
		case strings.HasPrefix(l, "sluice_backend_checks_total{") && strings.Contains(l, `result="ok"`):
			fmt.Sscanf(l[strings.LastIndexByte(l, ' ')+1:], "%g", &v)
			ok += v
		case strings.HasPrefix(l, "sluice_backend_checks_total{") && !strings.Contains(l, `result="ok"`):
			fmt.Sscanf(l[strings.LastIndexByte(l, ' ')+1:], "%g", &v)
			fail += v
		case strings.HasPrefix(l, "sluice_backend_up{") && strings.HasSuffix(l, " 1"):
			up++
		}
	}
	backends := 3 * ports
	t.Logf("%d backends (%d ports × 3) at check.interval=2s: daemon CPU %.1f%% of a core over 6s; fds %d at the start of the window, peak %d (%d listening sockets); checks ok %.0f, failed %.0f; %d backends up",
		backends, ports, cpu*100, base, peak, ports, ok, fail, up)
	if up != backends || fail != 0 {
		t.Errorf("%d of %d backends up, %.0f failed checks", up, backends, fail)
	}
	if want := float64(backends) * 3; ok < want {
		t.Errorf("%.0f checks passed, want at least %.0f (each backend every 2s for 8s)", ok, want)
	}
	// Spread over the interval, checks in flight at once are a few per
	// millisecond; all of them at once would be a backend each.
	if extra := peak - ports; extra > backends/4 {
		t.Errorf("peak fds %d: %d above the listening sockets, want well under %d backends", peak, extra, backends)
	}
	if cpu > 0.9 {
		t.Errorf("daemon CPU %.0f%% of a core for %d checks every 2s", cpu*100, backends)
	}
}
