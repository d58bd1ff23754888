package daemon

// This file holds the upgrade (`sluice ctl upgrade`): the daemon starts
// its successor — a new binary, or its own — with its own arguments and
// hands it every listening socket, the control socket and the committed
// table, by fd inheritance: exec.Cmd.ExtraFiles, and one environment
// variable naming each fd (SLUICE_UPGRADE_FDS=sync=3,stderr=4,table=5,
// ctl=6,tcp/host/127.0.0.1:8080=7,...). Inheritance rather than
// SCM_RIGHTS: the fds are in the new process before its first
// instruction, so no message can be lost, cut or wait on a peer, and
// nothing of the old process has to keep serving a socketpair.
//
// The hand-over, in order:
//
//  1. old: the writer slot is held (no table change until the end); the
//     successor started with its stderr a pipe the old one reads (its
//     last lines are the error if it fails) and a socketpair (sync);
//  2. new: the table applied on exactly the inherited sockets (same
//     inodes: no bind, no close, so no accept queue lost), the control
//     socket served from its inherited fd with the writer slot held; both
//     processes accept now, on the same sockets;
//  3. new: "ready PID" on sync;
//  4. old: stops accepting — its fds of the shared sockets closed, never
//     shut down (engine.Release) —, the control socket no longer accepted
//     on, metrics closed, MAINPID=new to systemd, "go" on sync;
//  5. new: the writer slot released, its stderr the real one, metrics
//     served, READY=1; it watches sync: its EOF is the old one's exit;
//  6. old: its upgrade client answered, live sessions drained (the drain
//     deadline), exit. Its udp flows ended at step 4.
//
// A successor that is not ready within the timeout, or exits, is stopped
// (SIGTERM, then SIGKILL): the old one never stopped accepting. A second
// upgrade while one is under way, or while the process an upgrade
// replaced still drains, is refused (upgrading).

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/ctl"
	"github.com/sluice-proxy/sluice/engine"
	"github.com/sluice-proxy/sluice/rules"
	"github.com/sluice-proxy/sluice/state"
)

var _ ctl.Upgrader = ctlEngine{}

// Upgrade serves intent upgrade.
func (c ctlEngine) Upgrade(who ctl.Who, binary string, timeout time.Duration) (*ctl.Upgraded, func(), error) {
	return c.d.Upgrade(state.Who{UID: who.UID, PID: who.PID, Name: who.Name}, binary, timeout)
}

// The environment of a successor.
const (
	envUpgradeFDs  = "SLUICE_UPGRADE_FDS"  // NAME=FD,...: what each inherited fd is
	envUpgradeFrom = "SLUICE_UPGRADE_FROM" // the predecessor's pid
)

// The names of the inherited fds that are not listening sockets (those are
// named by their listen key, keyName).
const (
	fdSync   = "sync"   // the socketpair: "ready PID" up, "go" down, EOF at the old one's exit
	fdStderr = "stderr" // the old process's own stderr: the new one's once it serves
	fdTable  = "table"  // a memfd: the committed table as table.rules holds it
	fdCtl    = "ctl"    // the control socket's listening fd
)

const (
	stopGrace    = 3 * time.Second  // a failed successor's SIGTERM, then SIGKILL
	goWait       = 30 * time.Second // a successor waits this long for "go", then serves anyway
	tailBytes    = 16 << 10         // of a successor's stderr kept for the error
	tailErrBytes = 800              // of it in the ERROR (its message holds 1 KiB)
)

// upgradeState is the daemon's side of upgrades.
type upgradeState struct {
	mu       sync.Mutex
	running  bool      // an upgrade is under way, or done (this process drains)
	since    time.Time // of the running one
	predPID  int       // the process this one replaced, until it exits; 0: none
	upgraded chan struct{}
	once     sync.Once
}

// begin takes the upgrade slot; its error is the *ctl.Error upgrading.
func (u *upgradeState) begin(drain time.Duration) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.running {
		return &ctl.Error{Code: ctl.CodeUpgrading, Index: -1,
			Msg: fmt.Sprintf("an upgrade is under way (started %s ago); wait for its outcome", time.Since(u.since).Round(time.Millisecond))}
	}
	if u.predPID != 0 {
		return &ctl.Error{Code: ctl.CodeUpgrading, Index: -1,
			Msg: fmt.Sprintf("the process this one replaced (pid %d) still drains its sessions (for at most %s); upgrade again once it has exited", u.predPID, drain)}
	}
	u.running, u.since = true, time.Now()
	return nil
}

func (u *upgradeState) end() {
	u.mu.Lock()
	u.running = false
	u.mu.Unlock()
}

// done says the upgrade succeeded: Run stops.
func (u *upgradeState) done() { u.once.Do(func() { close(u.upgraded) }) }

// isDone reports whether an upgrade succeeded: this process is on its way
// out.
func (u *upgradeState) isDone() bool {
	select {
	case <-u.upgraded:
		return true
	default:
		return false
	}
}

func (u *upgradeState) setPred(pid int) {
	u.mu.Lock()
	u.predPID = pid
	u.mu.Unlock()
}

// Upgrade starts binary ("" = the daemon's own executable, the path it
// was started from) as this daemon's successor and hands it the sockets
// (see the file's comment); it returns once the successor serves and this
// process has stopped accepting, done to be called once the client is
// answered (the daemon then drains and exits). timeout 0 is
// ctl.DefaultUpgradeTimeout. Its error is a *ctl.Error: upgrading, busy,
// upgrade-failed (the successor was stopped; this process serves on,
// having never stopped accepting; the message ends with its last log
// lines).
func (d *Daemon) Upgrade(who state.Who, binary string, timeout time.Duration) (*ctl.Upgraded, func(), error) {
	log := d.log.With(zap.Stringer("by", who))
	if timeout <= 0 {
		timeout = ctl.DefaultUpgradeTimeout
	}
	if binary == "" {
		binary = d.exe
	}
	d.recMu.Lock()
	drain := d.drain
	d.recMu.Unlock()
	if err := d.up.begin(drain); err != nil {
		log.Warn("upgrade refused", zap.Error(err))
		return nil, nil, err
	}
	if d.ctl == nil { // not reached: the request came through it
		d.up.end()
		return nil, nil, &ctl.Error{Code: ctl.CodeUpgradeFailed, Index: -1, Msg: "no control socket"}
	}
	release, err := d.ctl.Hold()
	if err != nil {
		d.up.end()
		log.Warn("upgrade refused: a writer holds the control socket", zap.Error(err))
		return nil, nil, err
	}
	fail := func(msg string) (*ctl.Upgraded, func(), error) {
		release()
		d.up.end()
		return nil, nil, &ctl.Error{Code: ctl.CodeUpgradeFailed, Index: -1, Msg: msg}
	}
	gen := d.e.Generation()
	log.Info("upgrade: starting the successor", zap.String("binary", binary), zap.Strings("args", d.opt.Args),
		zap.Uint64("generation", gen), zap.Duration("timeout", timeout))
	s, err := d.startSuccessor(binary)
	if err != nil {
		log.Error("upgrade: the successor did not start; this process serves on", zap.Error(err))
		return fail(fmt.Sprintf("starting %s: %v; this process serves on", binary, err))
	}
	pid, err := s.waitReady(timeout)
	if err != nil {
		s.stop()
		tail := s.tailText()
		log.Error("upgrade failed: the successor was stopped; this process serves on, it never stopped accepting",
			zap.Int("pid", s.cmd.Process.Pid), zap.Error(err))
		msg := fmt.Sprintf("the new process (%s, pid %d) %v; it was stopped, and this one (pid %d) serves on: nothing was closed",
			binary, s.cmd.Process.Pid, err, os.Getpid())
		if tail != "" {
			msg += "\nits last log lines:\n" + tailFit(tail, tailErrBytes)
		}
		return fail(msg)
	}
	// The successor serves the same table on the same sockets: stop
	// accepting here. From now on this process only drains, and follows no
	// store: the successor's instance loop applies the next assignment.
	d.stopStore()
	d.e.Release()
	d.ctl.StopAccepting()
	d.closeMetrics()
	d.notify.send(mainPID(pid))
	s.sendGo()
	d.upSync = s.sync // kept open until exit: its EOF tells the successor we are gone
	log.Info("upgrade: the new process serves; this one no longer accepts and drains its live sessions",
		zap.Int("new_pid", pid), zap.Int64("sessions", d.e.Sessions()), zap.Duration("deadline", drain))
	return &ctl.Upgraded{OldPID: uint32(os.Getpid()), NewPID: uint32(pid), Generation: gen}, d.up.done, nil
}

// successor is a started successor process, seen from the old one.
type successor struct {
	cmd      *exec.Cmd
	sync     *os.File // our end of the socketpair
	exited   chan struct{}
	waitErr  error // set before exited closes
	tail     tailBuf
	tailDone chan struct{} // its stderr pipe reached EOF
}

// startSuccessor starts binary with the daemon's arguments and the fds of
// the hand-over.
func (d *Daemon) startSuccessor(binary string) (*successor, error) {
	var files []*os.File // the successor's fds 3, 4, ...: ours to close after the start
	var names []string
	closeAll := func() {
		for _, f := range files {
			if f != os.Stderr {
				f.Close()
			}
		}
	}
	add := func(name string, f *os.File) {
		names = append(names, name+"="+strconv.Itoa(3+len(files)))
		files = append(files, f)
	}
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socketpair: %w", err)
	}
	if err := unix.SetNonblock(pair[0], true); err != nil { // ours: read with a deadline
		unix.Close(pair[0])
		unix.Close(pair[1])
		return nil, err
	}
	ours := os.NewFile(uintptr(pair[0]), "upgrade-sync")
	add(fdSync, os.NewFile(uintptr(pair[1]), "upgrade-sync-child"))
	add(fdStderr, os.Stderr)
	fail := func(err error) (*successor, error) {
		ours.Close()
		closeAll()
		return nil, err
	}
	table, err := d.tableFile()
	if err != nil {
		return fail(err)
	}
	add(fdTable, table)
	cf, err := d.ctl.ListenerFile()
	if err != nil {
		return fail(err)
	}
	add(fdCtl, cf)
	lfs, err := d.e.ListenFiles()
	if err != nil {
		return fail(err)
	}
	for _, lf := range lfs {
		add(keyName(lf.Key), lf.File)
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		return fail(err)
	}
	cmd := exec.Command(binary, d.opt.Args...)
	cmd.Env = append(successorEnv(os.Environ()), envUpgradeFDs+"="+strings.Join(names, ","), envUpgradeFrom+"="+strconv.Itoa(os.Getpid()))
	cmd.ExtraFiles = files
	cmd.Stdout = os.Stdout
	cmd.Stderr = pw
	err = cmd.Start()
	closeAll()
	pw.Close()
	if err != nil {
		ours.Close()
		pr.Close()
		return nil, err
	}
	s := &successor{cmd: cmd, sync: ours, exited: make(chan struct{}), tailDone: make(chan struct{})}
	go func() {
		s.waitErr = cmd.Wait()
		close(s.exited)
	}()
	go s.copyTail(pr)
	return s, nil
}

// successorEnv is env without what is this process's alone: systemd's
// socket activation and watchdog pid, an earlier hand-over's fds.
func successorEnv(env []string) []string {
	out := make([]string, 0, len(env)+2)
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_PID", envUpgradeFDs, envUpgradeFrom:
			continue
		}
		out = append(out, kv)
	}
	return out
}

// tableFile is the committed table as table.rules holds it, in a memfd:
// the successor reads it whatever its size, and the writer never blocks.
// The writer slot is held: the generation and the rules are one table.
func (d *Daemon) tableFile() (*os.File, error) {
	d.recMu.Lock()
	digest := d.digest
	d.recMu.Unlock()
	t := &state.Table{Header: state.Header{Generation: d.e.Generation(), Time: time.Now(), Who: state.Self("upgrade"), Digest: digest},
		Lines: state.Lines(d.e.Rules())}
	fd, err := unix.MemfdCreate("sluice-table", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("memfd_create: %w", err)
	}
	f := os.NewFile(uintptr(fd), "sluice-table")
	if _, err := f.Write(state.Format(t)); err != nil {
		f.Close()
		return nil, fmt.Errorf("writing the table: %w", err)
	}
	return f, nil
}

// waitReady waits for "ready PID" on sync, the successor's exit, or the
// timeout. It returns the successor's pid, or why it is not ready.
func (s *successor) waitReady(timeout time.Duration) (int, error) {
	_ = s.sync.SetReadDeadline(time.Now().Add(timeout))
	line, err := bufio.NewReader(s.sync).ReadString('\n')
	_ = s.sync.SetReadDeadline(time.Time{})
	if err == nil {
		pid, perr := strconv.Atoi(strings.TrimPrefix(strings.TrimSpace(line), "ready "))
		if perr != nil || !strings.HasPrefix(line, "ready ") {
			return 0, fmt.Errorf("said %q, not \"ready PID\"", strings.TrimSpace(line))
		}
		return pid, nil
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return 0, fmt.Errorf("was not ready within %s", timeout)
	}
	// EOF: it exited (or closed its end); say how it exited.
	select {
	case <-s.exited:
		return 0, fmt.Errorf("exited before it was ready (%v)", exitText(s.waitErr))
	case <-time.After(stopGrace):
		return 0, fmt.Errorf("closed its hand-over socket before it was ready (%v)", err)
	}
}

func exitText(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}

// stop stops a successor that failed: SIGTERM, SIGKILL after stopGrace;
// it returns once the process has exited and its stderr is read.
func (s *successor) stop() {
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(stopGrace):
		_ = s.cmd.Process.Kill()
		<-s.exited
	}
	s.sync.Close()
	select { // its stderr ends with it, unless a child of its own holds it
	case <-s.tailDone:
	case <-time.After(time.Second):
	}
}

func (s *successor) sendGo() { _, _ = s.sync.Write([]byte("go\n")) }

// copyTail copies the successor's stderr to ours, keeping its tail, until
// EOF: its exit, or the moment it takes the real stderr (step 5).
func (s *successor) copyTail(r *os.File) {
	defer close(s.tailDone)
	defer r.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			_, _ = os.Stderr.Write(buf[:n])
			s.tail.add(buf[:n])
		}
		if err != nil {
			return
		}
	}
}

func (s *successor) tailText() string { return s.tail.text() }

// tailBuf keeps the last tailBytes written to it.
type tailBuf struct {
	mu sync.Mutex
	b  []byte
}

func (t *tailBuf) add(p []byte) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > tailBytes {
		t.b = append(t.b[:0], t.b[len(t.b)-tailBytes:]...)
	}
}

func (t *tailBuf) text() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return strings.TrimRight(string(t.b), "\n")
}

// tailFit is the last whole lines of s that fit in n bytes (at least the
// end of the last line).
func tailFit(s string, n int) string {
	if len(s) <= n {
		return s
	}
	s = s[len(s)-n:]
	if i := strings.IndexByte(s, '\n'); i >= 0 && i < len(s)-1 {
		s = s[i+1:]
	}
	return s
}

// keyName is a listen key as SLUICE_UPGRADE_FDS names it:
// "tcp/host/127.0.0.1:8080", "udp/ns1/[::]:53".
func keyName(k rules.Key) string {
	return k.Proto.String() + "/" + rules.PifName(k.Pif) + "/" + netip.AddrPortFrom(k.Addr, k.Port).String()
}

// parseKeyName is keyName's inverse; its error says what is wrong with s.
func parseKeyName(s string) (rules.Key, error) {
	parts := strings.SplitN(s, "/", 3)
	if len(parts) != 3 {
		return rules.Key{}, fmt.Errorf("%q: want PROTO/PIF/ADDR:PORT", s)
	}
	var k rules.Key
	switch parts[0] {
	case "tcp":
		k.Proto = rules.TCP
	case "udp":
		k.Proto = rules.UDP
	default:
		return rules.Key{}, fmt.Errorf("%q: protocol %q", s, parts[0])
	}
	if parts[1] != rules.HostPif {
		if err := rules.CheckPifName(parts[1]); err != nil {
			return rules.Key{}, fmt.Errorf("%q: %w", s, err)
		}
	}
	ap, err := netip.ParseAddrPort(parts[2])
	if err != nil {
		return rules.Key{}, fmt.Errorf("%q: %w", s, err)
	}
	k.Pif, k.Addr, k.Port = rules.ModelPif(parts[1]), ap.Addr(), ap.Port()
	return k, nil
}

// handover is what a predecessor handed this process.
type handover struct {
	from    int      // its pid
	sync    *os.File // our end of its socketpair
	stderr  *os.File // its stderr: ours once we serve
	table   *state.Table
	ctl     *os.File          // the control socket's listening fd; nil: none
	listen  map[rules.Key]int // the listening sockets by key
	release func()            // frees our writer slot, held until "go"
}

// handoverFDs is SLUICE_UPGRADE_FDS and SLUICE_UPGRADE_FROM parsed: each
// inherited fd by what it is. Invariants: every fd is 3 or more and named
// once; sync and table are set; from is a pid.
type handoverFDs struct {
	from                     int
	sync, stderr, table, ctl int // 0: not handed
	listen                   map[rules.Key]int
}

// maxHandedFD bounds an inherited fd's number: far above any fd table a
// predecessor had, far below what could wrap.
const maxHandedFD = 1 << 24

// parseHandover parses the values of SLUICE_UPGRADE_FDS (spec) and
// SLUICE_UPGRADE_FROM (from); it touches no fd. Its error names the
// variable and the item that is wrong.
func parseHandover(spec, from string) (*handoverFDs, error) {
	h := &handoverFDs{listen: map[rules.Key]int{}}
	pid, err := strconv.Atoi(from)
	if err != nil || pid <= 0 {
		return nil, fmt.Errorf("upgrade: %s=%q: want the predecessor's pid", envUpgradeFrom, from)
	}
	h.from = pid
	seen := map[int]string{}
	for _, item := range strings.Split(spec, ",") {
		name, fdText, ok := strings.Cut(item, "=")
		fd, err := strconv.Atoi(fdText)
		if !ok || name == "" || err != nil || fd < 3 || fd > maxHandedFD {
			return nil, fmt.Errorf("upgrade: %s: %q: want NAME=FD, FD from 3", envUpgradeFDs, item)
		}
		if other, dup := seen[fd]; dup {
			return nil, fmt.Errorf("upgrade: %s: fd %d named both %q and %q", envUpgradeFDs, fd, other, name)
		}
		seen[fd] = name
		slot := (*int)(nil)
		switch name {
		case fdSync:
			slot = &h.sync
		case fdStderr:
			slot = &h.stderr
		case fdTable:
			slot = &h.table
		case fdCtl:
			slot = &h.ctl
		default:
			k, err := parseKeyName(name)
			if err != nil {
				return nil, fmt.Errorf("upgrade: %s: %w", envUpgradeFDs, err)
			}
			if _, dup := h.listen[k]; dup {
				return nil, fmt.Errorf("upgrade: %s: %s named twice", envUpgradeFDs, name)
			}
			h.listen[k] = fd
			continue
		}
		if *slot != 0 {
			return nil, fmt.Errorf("upgrade: %s: %s named twice", envUpgradeFDs, name)
		}
		*slot = fd
	}
	if h.sync == 0 || h.table == 0 {
		return nil, fmt.Errorf("upgrade: %s names no sync or no table fd", envUpgradeFDs)
	}
	return h, nil
}

// readHandover reads the environment of a successor; not one: nil, nil.
// The variables are unset, so that no child of ours takes them.
func readHandover() (*handover, error) {
	spec, from := os.Getenv(envUpgradeFDs), os.Getenv(envUpgradeFrom)
	os.Unsetenv(envUpgradeFDs)
	os.Unsetenv(envUpgradeFrom)
	if spec == "" {
		return nil, nil
	}
	fds, err := parseHandover(spec, from)
	if err != nil {
		return nil, err
	}
	for fd, what := range fds.all() {
		// An fd the predecessor did not hand is not ours to take.
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
			return nil, fmt.Errorf("upgrade: %s: fd %d (%s): %w", envUpgradeFDs, fd, what, err)
		}
		unix.CloseOnExec(fd)
	}
	h := &handover{from: fds.from, listen: fds.listen}
	if err := unix.SetNonblock(fds.sync, true); err != nil { // read with a deadline
		return nil, fmt.Errorf("upgrade: sync fd %d: %w", fds.sync, err)
	}
	h.sync = os.NewFile(uintptr(fds.sync), "upgrade-sync")
	if fds.stderr != 0 {
		h.stderr = os.NewFile(uintptr(fds.stderr), "stderr")
	}
	if fds.ctl != 0 {
		h.ctl = os.NewFile(uintptr(fds.ctl), "ctl")
	}
	f := os.NewFile(uintptr(fds.table), "sluice-table") // closed by f alone: its finalizer would close a reused number
	b, err := io.ReadAll(io.NewSectionReader(f, 0, state.MaxTableSize))
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("upgrade: reading the predecessor's table: %w", err)
	}
	if h.table, err = state.Parse(b); err != nil {
		return nil, fmt.Errorf("upgrade: the predecessor's table: %w", err)
	}
	return h, nil
}

// all is every handed fd, with what it is.
func (h *handoverFDs) all() map[int]string {
	m := map[int]string{h.sync: fdSync, h.table: fdTable}
	if h.stderr != 0 {
		m[h.stderr] = fdStderr
	}
	if h.ctl != 0 {
		m[h.ctl] = fdCtl
	}
	for k, fd := range h.listen {
		m[fd] = keyName(k)
	}
	return m
}

// handedTable is the successor's first table: the predecessor's, under its
// generation, on its sockets; nothing is written to the state dir (its
// table is this one already).
func (d *Daemon) handedTable() error {
	t, e := d.handed.table, d.e
	rs, err := t.Rules()
	if err != nil {
		return fmt.Errorf("upgrade: the predecessor's table: %w", err)
	}
	d.digest = t.Digest
	if d.opt.StateDir != "" {
		st, err := state.Open(d.opt.StateDir)
		if err != nil {
			return err
		}
		d.st = st
	}
	if t.Generation > 0 {
		if err := e.SetGeneration(t.Generation - 1); err != nil {
			return err
		}
	}
	if _, err := applyTable(e, rs, func(int) string { return "the predecessor's table: " }); err != nil {
		return err
	}
	d.log.Info(fmt.Sprintf("upgrade: serving generation %d of pid %d on its sockets", t.Generation, d.handed.from),
		zap.Int("rules", len(rs)), zap.Int("listening", len(d.e.Listeners())))
	return nil
}

// takeOver is the successor's end of the hand-over, once it serves: "ready
// PID" to the predecessor, its "go" awaited (at most goWait; its exit will
// do), then the writer slot freed, the real stderr taken, the metrics
// served, and the predecessor watched until it exits.
func (d *Daemon) takeOver() {
	h := d.handed
	if _, err := fmt.Fprintf(h.sync, "ready %d\n", os.Getpid()); err != nil {
		d.log.Warn("upgrade: telling the predecessor we are ready", zap.Error(err))
	}
	_ = h.sync.SetReadDeadline(time.Now().Add(goWait))
	r := bufio.NewReader(h.sync)
	line, err := r.ReadString('\n')
	_ = h.sync.SetReadDeadline(time.Time{})
	if err != nil || strings.TrimSpace(line) != "go" {
		d.log.Warn("upgrade: no go from the predecessor; serving anyway", zap.String("said", strings.TrimSpace(line)), zap.Error(err))
	}
	if h.release != nil {
		h.release()
	}
	if h.stderr != nil {
		// Our log lines went through the predecessor's pipe until now.
		_ = unix.Dup3(int(h.stderr.Fd()), 2, 0)
		h.stderr.Close()
	}
	if err := d.startMetricsPhase(); err != nil {
		d.log.Error("upgrade: metrics not served", zap.Error(err))
	}
	d.up.setPred(h.from)
	go func() {
		_, _ = io.Copy(io.Discard, r) // until EOF: the predecessor's exit
		h.sync.Close()
		d.up.setPred(0)
		d.log.Info("upgrade: the predecessor has exited", zap.Int("pid", h.from))
	}()
}

// offerSockets offers the engine the sockets a predecessor or systemd
// handed this process; a control socket among them is kept for PhaseCtl.
func (d *Daemon) offerSockets() error {
	if h := d.handed; h != nil {
		for k, fd := range h.listen {
			if err := d.e.Inherit(k, fd); err != nil {
				return fmt.Errorf("upgrade: socket %s: %w", keyName(k), err)
			}
			delete(h.listen, k)
		}
	}
	for _, a := range d.activated {
		if a.name == fdCtl {
			d.actCtl = os.NewFile(uintptr(a.fd), "ctl")
			continue
		}
		k, err := engine.SocketKey(a.fd) // of the host pif: systemd's own namespace
		if err == nil {
			err = d.e.Inherit(k, a.fd)
		}
		if err != nil {
			return fmt.Errorf("socket activation: fd %d (%s): %w", a.fd, orNone(a.name), err)
		}
		d.log.Info("socket activation: a socket from systemd", zap.String("key", k.String()), zap.String("name", a.name))
	}
	return nil
}

// drainHanded waits, after an upgrade, until every live session of this
// process ended — those still in their handshake too: a stop refuses them,
// but they were accepted and are owed their session — or ctx ends. The
// control connections being served get a moment to end by themselves.
func (d *Daemon) drainHanded(ctx context.Context) {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	ctlWait := time.Now().Add(time.Second)
	for d.e.Sessions() > 0 || (d.ctl != nil && d.ctl.Conns() > 0 && time.Now().Before(ctlWait)) {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
