package integration

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"regexp"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// The rate table past its 65 536 sources (issue 15, "Also cover"): a rule
// with rate=5/s; clients bound to 70 000 distinct source addresses of
// 127.0.0.0/8 (127.1.0.0 on), one connection each, while four sources
// (127.255.0.x) hammer at about 50 attempts a second each. Every flood
// source gets its first connection served (the backend's byte); the
// hammering ones, touched at every attempt, are never forgotten, so they
// stay at their rate for the whole flood; the table holds at most 65 536
// sources (the rule's counters as the daemon logs them at its stop); the
// daemon's memory stays bounded. Its long form (make soak) repeats the flood.
func TestRateTablePastSize(t *testing.T) {
	const sources, rate, workers = 70000, 5, 24
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := testpeer.ServeFunc(ln, func(c net.Conn) error { _, err := c.Write([]byte{'x'}); return err })
	t.Cleanup(b.Close)
	port := freePort(t)
	config := func(level string) string {
		return fmt.Sprintf("loops: 2\nlog: {level: %s}\nrules:\n  - tcp 127.0.0.1:%d -> %s rate=%d/s\n", level, port, b.Addr(), rate)
	}
	file := writeFile(t, "rate.yaml", config("warn")) // not a line per session
	d := startRunCtl(t, forwardOpts{}, file)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	d.waitListening(addr)

	// served dials from src and reports whether the backend's byte came
	// (a rate-limited connection is closed before any).
	served := func(src netip.Addr) (bool, error) {
		dl := net.Dialer{LocalAddr: &net.TCPAddr{IP: src.AsSlice()}, Timeout: 5 * time.Second}
		c, err := dl.Dial("tcp", addr)
		if err != nil {
			return false, err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		var one [1]byte
		n, _ := io.ReadFull(c, one[:])
		return n == 1, nil
	}
	rss0 := procStatus(t, d.cmd.Process.Pid, "VmRSS")
	n := rounds(t, 10, func(round int) {
		var next, refused, failed atomic.Int64
		stop := make(chan struct{})
		hammered := make([]int, 4)
		var hw sync.WaitGroup
		for h := range hammered {
			hw.Add(1)
			go func() {
				defer hw.Done()
				src := netip.AddrFrom4([4]byte{127, 255, byte(round), byte(h + 1)})
				for tick := time.NewTicker(20 * time.Millisecond); ; {
					select {
					case <-stop:
						tick.Stop()
						return
					case <-tick.C:
					}
					if ok, err := served(src); err == nil && ok {
						hammered[h]++
					}
				}
			}()
		}
		start := time.Now()
		var wg sync.WaitGroup
		for range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					i := next.Add(1) - 1
					if i >= sources {
						return
					}
					j := int(i) + round*sources // a new source every round
					src := netip.AddrFrom4([4]byte{127, byte(1 + j>>16), byte(j >> 8), byte(j)})
					ok, err := served(src)
					switch {
					case err != nil:
						if failed.Add(1) <= 3 {
							t.Errorf("source %s: %v", src, err)
						}
					case !ok:
						if refused.Add(1) <= 3 {
							t.Errorf("source %s, new, refused its first connection", src)
						}
					}
				}
			}()
		}
		wg.Wait()
		took := time.Since(start)
		close(stop)
		hw.Wait()
		// At rate=5/s over the flood (the sliding window may let a
		// second's worth through at each end).
		most := int(float64(rate)*took.Seconds()) + 2*rate
		for h, n := range hammered {
			if n > most || n == 0 { // (refused attempts count: a hammer stays near 0 past its first second)
				t.Errorf("hammering source %d: %d connections served in %s, want 1 to %d", h+1, n, took.Round(time.Millisecond), most)
			}
		}
		t.Logf("round %d: %d sources in %s (%.0f/s), %d refused, %d failed; hammering sources served %v (at most %d)",
			round, sources, took.Round(time.Millisecond), sources/took.Seconds(), refused.Load(), failed.Load(), hammered, most)
	})
	rss1 := procStatus(t, d.cmd.Process.Pid, "VmRSS")
	// The rule's counters are logged at info when the daemon stops: raise
	// the level live (a reload; the table is unchanged, so kept).
	if err := os.WriteFile(file, []byte(config("info")), 0o644); err != nil {
		t.Fatal(err)
	}
	if code, out, errs := d.cli("reload"); code != 0 {
		t.Fatalf("ctl reload: exit %d\n%s%s", code, out, errs)
	}
	if err := d.stop(10 * time.Second); err != nil {
		t.Fatalf("stop: %v\n%s", err, d.stderr.String())
	}
	m := regexp.MustCompile(`"rate_sources": ?(\d+)`).FindStringSubmatch(d.stderr.String())
	if m == nil {
		t.Fatalf("no rate_sources in the daemon's counters:\n%s", d.stderr.String())
	}
	if held, _ := strconv.Atoi(m[1]); held != 65536 {
		t.Errorf("the rate table holds %d sources after %d, want its bound, 65536", held, n*sources)
	}
	t.Logf("%d rounds; table at %s sources; RSS %d → %d KiB", n, m[1], rss0>>10, rss1>>10)
}
