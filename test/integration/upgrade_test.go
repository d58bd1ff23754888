package integration

// The upgrade (`sluice ctl upgrade`) and systemd: no connection refused or
// reset across 20 upgrades in a row, a long session across one, the same
// listening inodes, the control socket answering throughout; a failing new
// binary stopped, the old one serving on; the notify messages on a notify
// socket the test owns; sockets by activation that sluice never binds.

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/internal/testpeer"
)

var upgradedRe = regexp.MustCompile(`upgraded: pid (\d+) serves generation (\d+) on the same sockets; pid (\d+) drains`)

// upgrade runs `sluice ctl upgrade ARGS` on sock and returns the new pid,
// retrying while the process the last upgrade replaced still drains (exit
// 4, "upgrading"): that refusal is the contract, not a failure.
func upgrade(t *testing.T, sock string, args ...string) int {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		code, out, errs := runSluice(t, append([]string{"ctl", "-s", sock, "upgrade"}, args...)...)
		if code == 4 && strings.Contains(errs, "still drains") && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
			continue
		}
		m := upgradedRe.FindStringSubmatch(out)
		if code != 0 || m == nil {
			t.Fatalf("ctl upgrade: exit %d\n%s\n%s", code, out, errs)
		}
		pid, _ := strconv.Atoi(m[1])
		return pid
	}
}

// alive reports whether pid runs (a zombie does not).
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	_, rest, _ := strings.Cut(string(b), ") ")
	return !strings.HasPrefix(rest, "Z")
}

// killAtEnd stops pid (a successor: not the test's child) at the end of the
// test: SIGTERM, then SIGKILL.
func killAtEnd(t *testing.T, pid *atomic.Int64) {
	t.Cleanup(func() {
		p := int(pid.Load())
		if p == 0 || !alive(p) {
			return
		}
		_ = syscall.Kill(p, syscall.SIGTERM)
		for deadline := time.Now().Add(5 * time.Second); alive(p) && time.Now().Before(deadline); {
			time.Sleep(20 * time.Millisecond)
		}
		if alive(p) {
			_ = syscall.Kill(p, syscall.SIGKILL)
		}
	})
}

// holds reports whether pid has the socket of inode open.
func holds(t *testing.T, pid int, inode string) bool {
	return socketInodes(t, pid)[inode]
}

// upgradable is a `sluice run -c` daemon of one rule to a byte-checking
// backend, its current process (the successor after an upgrade) stopped
// at the end of the test.
type upgradable struct {
	*liveDaemon
	addr  string
	port  int
	inode string       // the listening socket's
	cur   atomic.Int64 // the pid serving now
}

func startUpgradable(t *testing.T) *upgradable {
	t.Helper()
	b, err := testpeer.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	port := freePort(t)
	u := &upgradable{liveDaemon: startLive(t, tableOf(t, tcpRule{lo: port, hi: port, b: b})), port: port,
		addr: fmt.Sprintf("127.0.0.1:%d", port)}
	u.cur.Store(int64(u.cmd.Process.Pid))
	killAtEnd(t, &u.cur)
	u.inode = listenInodes(t, u.cmd.Process.Pid, port)[port]
	return u
}

// 20 upgrades in a row under a connect loop: every connection gets its
// bytes back, none is refused or reset; a long byte-checked session that
// spans the first upgrade completes in the old process; the listening
// socket is the same inode in every process; the control socket answers
// throughout.
func TestUpgradeLosesNothing(t *testing.T) {
	d := startUpgradable(t)
	addr, port, inode, cur := d.addr, d.port, d.inode, &d.cur

	long := startPaced(t, addr, 64, 7)
	long.step()

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var conns, connFails, ctlOK, ctlFails atomic.Int64
	var failMu sync.Mutex
	var failures []string
	fail := func(format string, a ...any) {
		failMu.Lock()
		if len(failures) < 10 {
			failures = append(failures, fmt.Sprintf(format, a...))
		}
		failMu.Unlock()
	}
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				c, err := net.DialTimeout("tcp", addr, 5*time.Second)
				if err == nil {
					c.SetDeadline(time.Now().Add(20 * time.Second))
					err = testpeer.Exchange(c, 2048, 2048, uint64(1000*w+i))
					c.Close()
				}
				conns.Add(1)
				if err != nil {
					connFails.Add(1)
					fail("connection %d/%d: %v", w, i, err)
				}
			}
		}(w)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
			if _, err := d.tryStatus(); err != nil {
				// busy is allowed by the contract; a refused connect is not.
				ctlFails.Add(1)
				fail("ctl status: %v", err)
			} else {
				ctlOK.Add(1)
			}
		}
	}()

	first := int(cur.Load())
	for i := 0; i < 20; i++ {
		pid := upgrade(t, d.sock)
		cur.Store(int64(pid))
		if got := listenInodes(t, pid, port)[port]; got != inode {
			t.Errorf("upgrade %d: port %d listens on inode %s, was %s", i+1, port, got, inode)
		}
		if !holds(t, pid, inode) {
			t.Errorf("upgrade %d: pid %d does not hold the listening socket %s", i+1, pid, inode)
		}
		if i == 0 {
			// The long session was accepted by the first process: it
			// finishes there, every byte checked, after the hand-over.
			for k := 0; k < 8; k++ {
				long.step()
			}
			if err := long.finish(); err != nil {
				t.Errorf("the session spanning the upgrade: %v", err)
			}
			waitFor(t, 15*time.Second, "the first process to exit once drained", func() bool { return !alive(first) })
		}
		time.Sleep(30 * time.Millisecond) // let the loops reach the new process
	}
	close(stop)
	wg.Wait()
	t.Logf("%d connections, %d ctl status answered across 20 upgrades", conns.Load(), ctlOK.Load())
	if connFails.Load() > 0 || ctlFails.Load() > 0 {
		t.Fatalf("%d of %d connections and %d ctl status failed:\n%s\n%s", connFails.Load(), conns.Load(), ctlFails.Load(),
			strings.Join(failures, "\n"), tail(d.stderr.String(), 4000))
	}
	if conns.Load() < 20 {
		t.Fatalf("only %d connections made", conns.Load())
	}
	if st := d.status(); st.Generation != 1 || st.Rules != 1 {
		t.Fatalf("after 20 upgrades: generation %d, %d rules; want 1, 1", st.Generation, st.Rules)
	}
}

// A new binary that exits at once, or hangs without becoming ready, is
// stopped: exit 3 with its last log lines, and the old process serves on
// the same socket; a good upgrade works after both.
func TestUpgradeFailingBinary(t *testing.T) {
	d := startUpgradable(t)
	addr, port, inode, cur := d.addr, d.port, d.inode, &d.cur
	pid := d.cmd.Process.Pid
	dir := t.TempDir()
	exits := filepath.Join(dir, "exits")
	hangs := filepath.Join(dir, "hangs")
	os.WriteFile(exits, []byte("#!/bin/sh\necho 'new binary: cannot start, exit 9' >&2\nexit 9\n"), 0o755)
	os.WriteFile(hangs, []byte("#!/bin/sh\necho 'new binary: thinking forever' >&2\nexec sleep 120\n"), 0o755)

	exchange := func(what string) {
		t.Helper()
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err == nil {
			c.SetDeadline(time.Now().Add(10 * time.Second))
			err = testpeer.Exchange(c, 4096, 4096, 3)
			c.Close()
		}
		if err != nil {
			t.Fatalf("%s: a session through the old process: %v", what, err)
		}
	}
	for _, tc := range []struct {
		bin, timeout, want, log string
	}{
		{exits, "5s", "exited before it was ready (exit status 9)", "new binary: cannot start, exit 9"},
		{hangs, "1s", "was not ready within 1s", "new binary: thinking forever"},
	} {
		start := time.Now()
		code, out, errs := runSluice(t, "ctl", "-s", d.sock, "upgrade", "--binary", tc.bin, "--timeout", tc.timeout)
		if code != 3 || !strings.Contains(errs, tc.want) || !strings.Contains(errs, tc.log) {
			t.Fatalf("%s: exit %d, want 3 with %q and its log line %q\n%s\n%s", filepath.Base(tc.bin), code, tc.want, tc.log, out, errs)
		}
		t.Logf("%s: exit 3 after %v", filepath.Base(tc.bin), time.Since(start).Round(time.Millisecond))
		if !alive(pid) || !holds(t, pid, inode) || listenInodes(t, pid, port)[port] != inode {
			t.Fatalf("%s: the old process does not serve its socket any more", filepath.Base(tc.bin))
		}
		exchange(filepath.Base(tc.bin))
		if st := d.status(); st.Writer {
			t.Fatalf("%s: the writer slot is still held after the failed upgrade", filepath.Base(tc.bin))
		}
	}
	n := upgrade(t, d.sock)
	cur.Store(int64(n))
	if !holds(t, n, inode) {
		t.Fatalf("the good upgrade's process does not hold the socket")
	}
	exchange("after a good upgrade")
}

// notifySocket is a notify socket the test owns: each datagram with its
// sender's pid (SCM_CREDENTIALS).
type notifySocket struct {
	path string
	fd   int
}

type notifyMsg struct {
	pid  int
	text string
}

func newNotifySocket(t *testing.T) *notifySocket {
	t.Helper()
	dir, err := os.MkdirTemp("", "slnfy")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "notify")
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PASSCRED, 1); err != nil {
		t.Fatal(err)
	}
	return &notifySocket{path: path, fd: fd}
}

// next reads the next message that is not WATCHDOG=1 (those are counted
// by sender in dogs), within limit.
func (n *notifySocket) next(t *testing.T, limit time.Duration, dogs map[int]int) notifyMsg {
	t.Helper()
	deadline := time.Now().Add(limit)
	buf, oob := make([]byte, 4096), make([]byte, 256)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			t.Fatalf("no notify message within %v", limit)
		}
		tv := unix.NsecToTimeval(left.Nanoseconds())
		unix.SetsockoptTimeval(n.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		nb, noob, _, _, err := unix.Recvmsg(n.fd, buf, oob, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		m := notifyMsg{text: string(buf[:nb])}
		if cms, err := unix.ParseSocketControlMessage(oob[:noob]); err == nil {
			for _, cm := range cms {
				if cred, err := unix.ParseUnixCredentials(&cm); err == nil {
					m.pid = int(cred.Pid)
				}
			}
		}
		if m.text == "WATCHDOG=1" {
			dogs[m.pid]++
			continue
		}
		return m
	}
}

// The notify protocol on a real notify socket: READY=1 from the daemon;
// RELOADING=1 with MONOTONIC_USEC, then READY=1, around a reload;
// MAINPID=new from the old process, then READY=1 from the new one, at an
// upgrade; STOPPING=1 at the stop; WATCHDOG=1 from each process while it
// is the main one.
func TestSystemdNotify(t *testing.T) {
	ns := newNotifySocket(t)
	t.Setenv("NOTIFY_SOCKET", ns.path)
	t.Setenv("WATCHDOG_USEC", "200000")
	d := startUpgradable(t)
	old, cur := d.cmd.Process.Pid, &d.cur
	dogs := map[int]int{}
	expect := func(pid int, prefix string) notifyMsg {
		t.Helper()
		m := ns.next(t, 10*time.Second, dogs)
		if m.pid != pid || !strings.HasPrefix(m.text, prefix) {
			t.Fatalf("notify: got %q from pid %d, want %q from pid %d", m.text, m.pid, prefix, pid)
		}
		return m
	}
	expect(old, "READY=1")
	if code, out, errs := runSluice(t, "ctl", "-s", d.sock, "reload"); code != 0 {
		t.Fatalf("reload: exit %d\n%s\n%s", code, out, errs)
	}
	m := expect(old, "RELOADING=1\nMONOTONIC_USEC=")
	if us, err := strconv.ParseInt(strings.TrimPrefix(m.text, "RELOADING=1\nMONOTONIC_USEC="), 10, 64); err != nil || us <= 0 {
		t.Fatalf("RELOADING=1 with MONOTONIC_USEC %q", m.text)
	}
	expect(old, "READY=1")
	time.Sleep(300 * time.Millisecond) // a watchdog ping or two from the old process
	n := upgrade(t, d.sock)
	cur.Store(int64(n))
	expect(old, fmt.Sprintf("MAINPID=%d", n))
	expect(n, "READY=1")
	time.Sleep(300 * time.Millisecond)
	waitFor(t, 10*time.Second, "the old process to exit", func() bool { return !alive(old) })
	syscall.Kill(n, syscall.SIGTERM)
	expect(n, "STOPPING=1")
	if dogs[old] == 0 || dogs[n] == 0 {
		t.Fatalf("WATCHDOG=1 by sender: %v; want some from %d and from %d", dogs, old, n)
	}
}

// Socket activation: sluice serves a listening socket and a control socket
// the test opened and passed as systemd does (LISTEN_PID, LISTEN_FDS,
// LISTEN_FDNAMES); it binds nothing for them: the port's inode is the
// test's socket's.
func TestSocketActivation(t *testing.T) {
	b, err := testpeer.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	dir, err := os.MkdirTemp("", "slact")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	os.Chmod(dir, 0o700)
	sock := filepath.Join(dir, "ctl.sock")
	cl, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	lf, _ := ln.(*net.TCPListener).File()
	cf, _ := cl.File()
	var st unix.Stat_t
	unix.Fstat(int(lf.Fd()), &st)
	inode := strconv.FormatUint(st.Ino, 10)
	cfg := writeFile(t, "act.yaml", fmt.Sprintf("log: {level: info}\nctl: {socket: %s}\nrules:\n  - tcp 127.0.0.1:%d -> %s\n",
		filepath.Join(dir, "unused", "ctl.sock"), port, b.Addr()))
	// LISTEN_PID is the daemon's pid: the shell's, which execs sluice.
	cmd := exec.Command("/bin/sh", "-c", `LISTEN_PID=$$ exec "$0" "$@"`, sluiceBin, "run", "-c", cfg)
	cmd.Env = append(os.Environ(), "LISTEN_FDS=2", "LISTEN_FDNAMES=web:ctl")
	cmd.ExtraFiles = []*os.File{lf, cf}
	logs := &strings.Builder{}
	var logMu sync.Mutex
	pr, pw, _ := os.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	lf.Close()
	cf.Close()
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := pr.Read(buf)
			logMu.Lock()
			logs.Write(buf[:n])
			logMu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
	}()
	logText := func() string { logMu.Lock(); defer logMu.Unlock(); return logs.String() }
	ld := &liveDaemon{daemon: &daemon{t: t, cmd: cmd, stderr: &logBuffer{}, exited: make(chan error, 1), done: make(chan struct{})}, t: t, sock: sock}
	waitFor(t, 10*time.Second, "the activated control socket to answer", func() bool { _, err := ld.tryStatus(); return err == nil })
	if got := listenInodes(t, cmd.Process.Pid, port)[port]; got != inode {
		t.Fatalf("port %d listens on inode %s, the test's socket is %s: sluice bound its own\n%s", port, got, inode, logText())
	}
	if !holds(t, cmd.Process.Pid, inode) {
		t.Fatalf("sluice does not hold the activated socket\n%s", logText())
	}
	c, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
	if err == nil {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		err = testpeer.Exchange(c, 8192, 8192, 5)
		c.Close()
	}
	if err != nil {
		t.Fatalf("a session through the activated socket: %v\n%s", err, logText())
	}
	if _, err := os.Stat(filepath.Join(dir, "unused")); err == nil {
		t.Fatalf("sluice made the configured ctl.socket's directory although systemd passed the control socket")
	}
	if !strings.Contains(logText(), "socket activation") {
		t.Fatalf("no log line of the activated socket:\n%s", logText())
	}
}
