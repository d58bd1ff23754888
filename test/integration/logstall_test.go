package integration

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// The daemon's stderr is a pipe nobody reads (a stuck journald): once the
// pipe is full every log write would block, and with it the event loop that
// logs a session's end. Sessions must go on flowing, and the lines that did
// not fit are counted in log_dropped (sluice_log_dropped_total).
func TestFaultLogStall(t *testing.T) {
	b := hashBackend(t)
	port := freePort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	runDir, err := os.MkdirTemp("", "slrun")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(runDir) })
	pr, pw, err := os.Pipe() // never read
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	sock := filepath.Join(runDir, "ctl.sock")
	cmd := exec.Command(sluiceBin, "forward", addr, b.Addr(), "--log-level", "debug", "--loops", "1", "--ctl", sock)
	cmd.Env = append(os.Environ(), "XDG_RUNTIME_DIR="+runDir)
	cmd.Stderr, cmd.Stdout = pw, pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the daemon did not listen")
		}
		time.Sleep(20 * time.Millisecond)
	}

	// Each session logs at its start and end (debug and info): far more
	// than the 64 KiB pipe and the writer's 1 MiB buffer.
	const sessions = 6000
	t0 := time.Now()
	for i := 0; i < sessions; i++ {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			t.Fatalf("session %d: %v", i, err)
		}
		c.SetDeadline(time.Now().Add(2 * time.Second))
		err = testpeer.Exchange(c, 100, 100, uint64(i))
		c.Close()
		if err != nil {
			t.Fatalf("session %d of %d, %v in, with stderr unread: %v", i, sessions, time.Since(t0).Round(time.Millisecond), err)
		}
	}
	took := time.Since(t0)
	out, err := exec.Command(sluiceBin, "ctl", "-s", sock, "stats").CombinedOutput()
	if err != nil {
		t.Fatalf("ctl stats: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`(?m)^\s*"?log_dropped"?\s*[:= ]\s*(\d+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("no log_dropped in ctl stats:\n%s", out)
	}
	dropped, _ := strconv.Atoi(string(m[1]))
	t.Logf("%d sessions in %v with stderr never read: %d log lines dropped", sessions, took.Round(time.Millisecond), dropped)
	if dropped == 0 {
		t.Errorf("no log line dropped although stderr was never read")
	}
}
