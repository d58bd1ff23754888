package integration

import (
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// EMFILE during a load of live sessions (issue 15, "Also cover"): the
// daemon's open-files limit fits about 25 sessions, and 60 clients run
// checked exchanges of random sizes (up to 256 KiB each way) back to back,
// so it is out of fds over and over while sessions move bytes: accepts
// pause, backend dials wait for an fd (timeout.connect=1m), pipes are
// denied. Every exchange completes exactly (none reset, none cut, none
// refused), the daemon says it ran out of fds, and when the load stops it
// is idle, holds no more fds than before, and serves new clients. The
// long form (make soak) runs the load for its share of SLUICE_SOAK.
func TestEMFILEUnderLoad(t *testing.T) {
	const nofile, clients, most = 64, 60, 256 << 10
	b := hashBackend(t)
	d := startForwardWith(t, forwardOpts{nofile: nofile}, b.Addr(), "timeout.connect=1m", "--loops", "2")
	pid := d.cmd.Process.Pid
	if got := openFilesLimit(t, pid); got != nofile {
		t.Fatalf("daemon's open-files limit is %d, want %d", got, nofile)
	}
	before, sockets := fdsBelow(t, pid, nofile), fdKinds(t, pid)["socket"]
	load := 5 * time.Second
	if s := soakFor(t); s > load {
		load = s
	}
	var done, failed atomic.Int64
	var bytes atomic.Int64
	deadline := time.Now().Add(load)
	var wg sync.WaitGroup
	for w := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			for i := uint64(0); time.Now().Before(deadline); i++ {
				up, down := testpeer.LogUniform(rng, most), testpeer.LogUniform(rng, most)
				c, err := net.DialTimeout("tcp", d.Addr, 10*time.Second)
				if err == nil {
					c.SetDeadline(time.Now().Add(60 * time.Second))
					err = testpeer.Exchange(c, up, down, uint64(w)<<32|i)
					c.Close()
				}
				if err != nil {
					if failed.Add(1) <= 5 {
						t.Errorf("client %d exchange %d (%d up, %d down): %v", w, i, up, down, err)
					}
					continue
				}
				done.Add(1)
				bytes.Add(up + down)
			}
		}()
	}
	// Out of fds while the load runs.
	waitFor(t, load, "the daemon to run out of fds", func() bool {
		return strings.Contains(d.stderr.String(), "too many open files")
	})
	peak := fdsBelow(t, pid, nofile)
	wg.Wait()
	// Idle: no session socket left (free pipes may stay pooled).
	waitFor(t, 10*time.Second, "the daemon to hold no session socket after the load", func() bool {
		return b.Conns() == 0 && fdKinds(t, pid)["socket"] == sockets
	})
	after := fdKinds(t, pid)
	for i := range 4 {
		c, err := net.DialTimeout("tcp", d.Addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(30 * time.Second))
		if err := testpeer.Exchange(c, 1<<20, 1<<20, uint64(900+i)); err != nil {
			t.Errorf("new session %d after the load: %v", i, err)
		}
		c.Close()
	}
	if err := d.stop(5 * time.Second); err != nil {
		t.Errorf("stop: %v\n%s", err, d.stderr.String())
	}
	if f := b.Failures.Load(); f != 0 {
		t.Errorf("%d exchanges failed at the backend", f)
	}
	t.Logf("%s of load: %d exchanges (%d MiB) checked, %d failed; fds %d before, %d at a sample (limit %d), after %v",
		load.Round(time.Millisecond), done.Load(), bytes.Load()>>20, failed.Load(), before, peak, nofile, after)
}
