package integration

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// The daemon under a tiny open-files limit, flooded with three times more
// clients than it has fds for: accept pauses (the excess waits in the kernel's
// accept queue, nobody is dropped, the daemon does not spin), sessions
// established before the flood keep moving bytes exactly, freed fds resume
// accepting, and once the flood is gone new clients are served again.
//
// A session takes two fds, so whether the last free fd is taken by an accept
// or by a backend socket depends on the parity of the free fds; both parities
// are run.
func TestEMFILEBackoff(t *testing.T) {
	const limit = 48
	for _, nofile := range []int{limit, limit + 1} {
		t.Run("nofile="+strconv.Itoa(nofile), func(t *testing.T) { emfileFlood(t, nofile) })
	}
}

func emfileFlood(t *testing.T, nofile int) {
	const (
		pre    = 3       // sessions established before the flood
		flood  = 144     // three times the fds the daemon has
		volume = 1 << 20 // bytes each way per exchange
		settle = 10 * time.Second
	)
	b := hashBackend(t)
	// A long connect timeout: a client accepted while no fd is left for its
	// backend may wait for one, and must not be let go for waiting.
	d := startForwardWith(t, forwardOpts{nofile: nofile}, b.Addr(), "timeout.connect=1m", "--loops", "2")
	pid := d.cmd.Process.Pid
	if got := openFilesLimit(t, pid); got != nofile {
		t.Fatalf("daemon's open-files limit is %d, want %d", got, nofile)
	}

	// Sessions up before the flood: the backend holds their conns.
	pres := make([]net.Conn, pre)
	for i := range pres {
		c, err := net.Dial("tcp", d.Addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		pres[i] = c
	}
	waitFor(t, settle, "the sessions made before the flood to reach the backend", func() bool {
		return b.Conns() == pre
	})
	free := nofile - fdsBelow(t, pid, nofile)
	t.Logf("daemon has %d free fds before the flood", free)

	var mu sync.Mutex
	var floods []net.Conn
	defer func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range floods {
			c.Close()
		}
	}()
	for i := 0; i < flood; i++ {
		// The kernel completes the handshake into the accept queue whether
		// or not the daemon accepts, so every dial must succeed.
		c, err := net.DialTimeout("tcp", d.Addr, 5*time.Second)
		if err != nil {
			t.Fatalf("flood client %d: %v", i, err)
		}
		mu.Lock()
		floods = append(floods, c)
		mu.Unlock()
	}

	// Out of fds: the sessions stop growing and the rest of the flood waits
	// in the accept queue.
	var queued, sessions int
	waitSteady(t, settle, "the daemon to run out of fds", func() (int, int) {
		queued, sessions = acceptQueue(t, d.Addr), b.Conns()
		return queued, sessions
	})
	kinds := fdKinds(t, pid)
	t.Logf("out of fds: %d sessions (%d flood), %d clients in the accept queue, daemon fds %v",
		sessions, sessions-pre, queued, kinds)
	if queued == 0 {
		t.Fatalf("accept queue empty with %d flood clients and %d sessions: the daemon drained the flood instead of pausing\n%s",
			flood, sessions, d.stderr.String())
	}

	// Paused, not spinning: a second of CPU time while the flood waits, and
	// not one accept in that second.
	cpu0, t0 := cpuTicks(t, pid), time.Now()
	time.Sleep(time.Second)
	cpu1, elapsed := cpuTicks(t, pid), time.Since(t0)
	share := float64(cpu1-cpu0) / clockTicks / elapsed.Seconds()
	t.Logf("daemon CPU while paused: %.1f%% of one core over %v", 100*share, elapsed.Round(time.Millisecond))
	if share > 0.5 {
		t.Errorf("daemon used %.0f%% of a core while out of fds: the listener spins", 100*share)
	}
	if q := acceptQueue(t, d.Addr); q != queued {
		t.Errorf("accept queue went from %d to %d while the daemon had no fd to spare", queued, q)
	}
	if !strings.Contains(d.stderr.String(), "too many open files") {
		t.Errorf("the daemon did not report running out of fds; log:\n%s", d.stderr.String())
	}
	// No client was accepted and then dropped: every flood conn is still
	// open, waiting either in the queue or on a silent session.
	mu.Lock()
	for i, c := range floods {
		c.SetReadDeadline(time.Now().Add(time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); !isTimeout(err) {
			t.Errorf("flood client %d: %v; want it kept waiting", i, err)
		}
	}
	mu.Unlock()

	// The sessions made before the flood still work, byte for byte, while
	// the daemon has no fd to spare (splice=auto cannot get a pipe either).
	var wg sync.WaitGroup
	for i, c := range pres {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.SetDeadline(time.Now().Add(30 * time.Second))
			if err := testpeer.Exchange(c, volume, volume, uint64(100+i)); err != nil {
				t.Errorf("session %d made before the flood: %v", i, err)
			}
		}()
	}
	wg.Wait()

	// Those sessions ended and freed their fds: accepting resumes by itself
	// and takes queued clients, with no new connection arriving.
	waitFor(t, settle, "the daemon to accept queued clients with the freed fds", func() bool {
		return acceptQueue(t, d.Addr) < queued
	})

	// The flood leaves; every client it left in the queue is taken and let
	// go, and new clients are served again.
	mu.Lock()
	for _, c := range floods {
		c.Close()
	}
	floods = nil
	mu.Unlock()
	waitFor(t, settle, "the daemon to drain the closed flood", func() bool {
		return acceptQueue(t, d.Addr) == 0 && b.Conns() == 0
	})
	for i := 0; i < 4; i++ {
		c, err := net.Dial("tcp", d.Addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(30 * time.Second))
		if err := testpeer.Exchange(c, volume, volume, uint64(200+i)); err != nil {
			t.Errorf("new session %d after the flood: %v", i, err)
		}
		c.Close()
	}
	if err := d.stop(5 * time.Second); err != nil {
		t.Errorf("stop: %v\n%s", err, d.stderr.String())
	}
}

// clockTicks is USER_HZ, the unit of utime and stime in /proc/PID/stat; it is
// 100 on every Linux architecture Go supports.
const clockTicks = 100

// cpuTicks returns a process's user + system CPU time in clock ticks.
func cpuTicks(t testing.TB, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	// The command name may hold spaces; fields are counted after its ')'.
	// utime and stime are fields 14 and 15; the state, field 3, comes first.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	utime, err1 := strconv.ParseInt(f[14-3], 10, 64)
	stime, err2 := strconv.ParseInt(f[15-3], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		t.Fatalf("/proc/%d/stat: %v", pid, err)
	}
	return utime + stime
}

// fdsBelow counts a process's open fds numbered below limit: those that
// count against an open-files limit lowered after they were inherited.
func fdsBelow(t testing.TB, pid, limit int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if fd, err := strconv.Atoi(e.Name()); err == nil && fd < limit {
			n++
		}
	}
	return n
}

// openFilesLimit returns a process's soft open-files limit.
func openFilesLimit(t testing.TB, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "Max open files"); ok {
			n, err := strconv.Atoi(strings.Fields(rest)[0])
			if err != nil {
				t.Fatalf("/proc/%d/limits: %q", pid, line)
			}
			return n
		}
	}
	t.Fatalf("no open-files limit in /proc/%d/limits", pid)
	return 0
}

// acceptQueue returns how many connections wait in the accept queue of the
// IPv4 listener on addr: for a listening socket, /proc/net/tcp's rx_queue is
// the accept queue's length.
func acceptQueue(t testing.TB, addr string) int {
	t.Helper()
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || !ap.Addr().Is4() {
		t.Fatalf("acceptQueue %q: want an IPv4 address and port", addr)
	}
	// The address is printed as the in-memory (network order) word read in
	// host order.
	a4 := ap.Addr().As4()
	local := fmt.Sprintf("%08X:%04X", binary.NativeEndian.Uint32(a4[:]), ap.Port())
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		// sl local rem st tx_queue:rx_queue ...; state 0A is LISTEN.
		if len(f) < 5 || f[1] != local || f[3] != "0A" {
			continue
		}
		_, rx, _ := strings.Cut(f[4], ":")
		n, err := strconv.ParseInt(rx, 16, 64)
		if err != nil {
			t.Fatalf("/proc/net/tcp: %q", line)
		}
		return int(n)
	}
	t.Fatalf("no listener on %s in /proc/net/tcp", addr)
	return 0
}

// waitFor polls cond every 20 ms until it holds, or fails the test after
// limit.
func waitFor(t testing.TB, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(limit); !cond(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("waited %v for %s", limit, what)
		}
	}
}

// waitSteady polls sample every 50 ms until it returns the same pair five
// times running, or fails the test after limit.
func waitSteady(t testing.TB, limit time.Duration, what string, sample func() (int, int)) {
	t.Helper()
	a, b := sample()
	same := 0
	for deadline := time.Now().Add(limit); same < 5; {
		if time.Now().After(deadline) {
			t.Fatalf("waited %v for %s (last %d, %d)", limit, what, a, b)
		}
		time.Sleep(50 * time.Millisecond)
		a2, b2 := sample()
		if a2 == a && b2 == b {
			same++
		} else {
			a, b, same = a2, b2, 0
		}
	}
}

// isTimeout reports whether err is a deadline passing.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
