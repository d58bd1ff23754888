// Package integration runs the sluice binary as a user would, as a separate
// process, against real sockets on loopback. Heavy peers (thousands of
// connections) run in further processes, since each process may hold at most
// 20 000 fds here.
package integration

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var sluiceBin string

func TestMain(m *testing.M) {
	if role := os.Getenv(peerRoleEnv); role != "" {
		os.Exit(runPeer(role))
	}
	dir, err := os.MkdirTemp("", "sluice-it-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	sluiceBin = filepath.Join(dir, "sluice")
	build := exec.Command("go", "build", "-o", sluiceBin, "github.com/sluice-proxy/sluice/cmd/sluice")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building sluice:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// daemon is a sluice process started by a test.
type daemon struct {
	t      testing.TB
	cmd    *exec.Cmd
	Addr   string // the listen address
	Ctl    string // the default control socket of a `run -c` daemon without ctl.socket
	stderr *logBuffer
	exited chan error    // the exit, once: a reader that takes it puts it back
	done   chan struct{} // closed at the exit (after the log is read to its end); then err holds it
	err    error
}

// freePort returns a loopback port that was free a moment ago.
func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// logBuffer collects a process's output; safe for the reader goroutine and
// the test at once.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) WriteString(s string) {
	l.mu.Lock()
	l.b.WriteString(s)
	l.mu.Unlock()
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// startForward runs `sluice forward 127.0.0.1:PORT TARGET OPTIONS... FLAGS...`
// and waits until it accepts connections. The process is stopped (SIGTERM,
// then SIGKILL) at the end of the test.
func startForward(t testing.TB, target string, extra ...string) *daemon {
	t.Helper()
	return startForwardWith(t, forwardOpts{}, target, extra...)
}

// forwardOpts changes how startForwardWith runs the daemon.
type forwardOpts struct {
	// nofile, when > 0, is the daemon's open-files limit, soft and hard: the
	// Go runtime raises the soft limit to the hard one, so both are set. The
	// daemon runs under prlimit(1), which execs it: the pid stays sluice's.
	nofile int
	// prog, when set, is run instead of sluice: a third-party peer (haproxy,
	// nginx) a test drives like the daemon, output collected, stopped by PID.
	prog string
	// prefix, when set, is a command that execs the daemon's command line
	// in place, so the pid stays the daemon's: `ip netns exec NAME` runs it
	// inside a network namespace.
	prefix []string
}

// startForwardWith is startForward with options.
func startForwardWith(t testing.TB, o forwardOpts, target string, extra ...string) *daemon {
	t.Helper()
	port := freePort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	args := append([]string{"forward", addr, target, "--log-level", "warn"}, extra...)
	d := startDaemon(t, o, args...)
	d.Addr = addr
	d.waitListening(addr)
	return d
}

// startDaemon runs sluice with args, its stdout and stderr collected in
// d.stderr, and returns at once. The process is stopped (SIGTERM, then
// SIGKILL) at the end of the test.
func startDaemon(t testing.TB, o forwardOpts, args ...string) *daemon {
	t.Helper()
	bin := sluiceBin
	if o.prog != "" {
		bin = o.prog
	}
	cmd := exec.Command(bin, args...)
	if o.nofile > 0 {
		cmd = exec.Command("prlimit", fmt.Sprintf("--nofile=%d:%d", o.nofile, o.nofile), "--", sluiceBin)
		cmd.Args = append(cmd.Args, args...)
	}
	if len(o.prefix) > 0 {
		cmd = exec.Command(o.prefix[0], append(o.prefix[1:len(o.prefix):len(o.prefix)], cmd.Args...)...)
	}
	// Each daemon gets its own runtime directory, so the default control
	// socket ($XDG_RUNTIME_DIR/sluice/ctl.sock) never collides with another
	// test's or a real daemon's.
	// (A short path: a unix socket's path is at most 107 bytes.)
	runDir, err := os.MkdirTemp("", "slrun")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(runDir) })
	cmd.Env = append(os.Environ(), "XDG_RUNTIME_DIR="+runDir)
	d := &daemon{t: t, cmd: cmd, stderr: &logBuffer{}, exited: make(chan error, 1), done: make(chan struct{}),
		Ctl: filepath.Join(runDir, "sluice", "ctl.sock")}
	pr, pw, _ := os.Pipe()
	cmd.Stderr = pw
	cmd.Stdout = pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	logDone := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			d.stderr.WriteString(sc.Text() + "\n")
		}
		close(logDone)
	}()
	go func() { err := cmd.Wait(); <-logDone; d.err = err; close(d.done); d.exited <- err }()
	t.Cleanup(func() { d.stop(5 * time.Second) })
	return d
}

// waitListening waits until the daemon holds a TCP socket listening on addr
// (127.0.0.1:PORT); the test fails if sluice exits first or 10 s pass. It
// reads /proc instead of connecting: a probe connection would be a session,
// reaching the rule's backend and blurring the counts of the test's own.
func (d *daemon) waitListening(addr string) {
	t := d.t
	t.Helper()
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || !ap.Addr().Is4() {
		t.Fatalf("waitListening(%q): want an IPv4 ADDR:PORT (%v)", addr, err)
	}
	a4 := ap.Addr().As4()
	// /proc/net/tcp writes the address as one 32-bit word in host order.
	local := fmt.Sprintf("%08X:%04X", binary.LittleEndian.Uint32(a4[:]), ap.Port())
	pid := d.cmd.Process.Pid
	deadline := time.Now().Add(10 * time.Second)
	for {
		mine := socketInodes(t, pid)
		for _, l := range procListens(t, fmt.Sprintf("/proc/%d/net/tcp", pid)) {
			if l.local == local && mine[l.inode] {
				return
			}
		}
		select {
		case err := <-d.exited:
			d.exited <- err
			t.Fatalf("sluice exited before listening: %v\n%s", err, d.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("sluice did not listen on %s\n%s", addr, d.stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop sends SIGTERM and waits up to grace for a clean exit (then SIGKILL).
// It returns the exit error (nil for status 0).
func (d *daemon) stop(grace time.Duration) error {
	// Exited already? done says so whoever took the value of exited;
	// cmd.ProcessState would race with the Wait that writes it.
	select {
	case <-d.done:
		return nil
	default:
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
		return d.err
	case <-time.After(grace):
		d.cmd.Process.Kill()
		<-d.done
		return fmt.Errorf("did not stop within %v after SIGTERM: %v", grace, d.err)
	}
}

// procStatus reads a "Name:  value kB" field of /proc/PID/status in bytes.
func procStatus(t testing.TB, pid int, field string) int64 {
	t.Helper()
	return procField(t, pid, "status", field)
}

// procField reads a "Name:  value kB" field of /proc/PID/FILE (status,
// smaps_rollup) in bytes.
func procField(t testing.TB, pid int, file, field string) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/%s", pid, file))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, field+":") {
			f := strings.Fields(line)
			n, _ := strconv.ParseInt(f[1], 10, 64)
			if len(f) > 2 && f[2] == "kB" {
				n *= 1024
			}
			return n
		}
	}
	t.Fatalf("no %s in /proc/%d/%s", field, pid, file)
	return 0
}

// fdLinks returns what a process's open fds point to ("socket:[123]",
// "pipe:[45]", "/dev/null"...); an fd closed while it is read is left out.
func fdLinks(t testing.TB, pid int) []string {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var links []string
	for _, e := range ents {
		if l, err := os.Readlink(filepath.Join(dir, e.Name())); err == nil {
			links = append(links, l)
		}
	}
	return links
}

// socketInodes returns the inodes of a process's open sockets, as /proc/net
// tables write them.
func socketInodes(t testing.TB, pid int) map[string]bool {
	t.Helper()
	inodes := map[string]bool{}
	for _, l := range fdLinks(t, pid) {
		if ino, ok := strings.CutPrefix(l, "socket:["); ok {
			inodes[strings.TrimSuffix(ino, "]")] = true
		}
	}
	return inodes
}

// fdKinds counts a process's open fds by kind: "socket", "pipe", "anon_inode", "other".
func fdKinds(t testing.TB, pid int) map[string]int {
	t.Helper()
	kinds := map[string]int{}
	for _, l := range fdLinks(t, pid) {
		switch {
		case strings.HasPrefix(l, "socket:"):
			kinds["socket"]++
		case strings.HasPrefix(l, "pipe:"):
			kinds["pipe"]++
		case strings.HasPrefix(l, "anon_inode:"):
			kinds["anon_inode"]++
		default:
			kinds["other"]++
		}
	}
	return kinds
}
