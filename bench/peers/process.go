package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// proc is a process the harness started, pinned to one CPU by taskset (which
// execs it: the pid is the program's own). Its output goes to a log file in
// the run's temporary directory, except stdout when the harness reads it.
type proc struct {
	name    string
	cmd     *exec.Cmd
	stdin   io.WriteCloser // nil unless asked for
	stdout  *bufio.Reader  // nil unless asked for
	stdoutR *os.File       // the pipe under stdout
	logPath string
	done    chan struct{} // closed when the process has been waited for
	err     error         // its exit, valid once done is closed
}

// startOpts says how to start a process.
type startOpts struct {
	cpus   string   // taskset's list of CPUs to pin to ("1", "0,1"), or "" for none
	env    []string // added to the harness's environment
	stdin  bool     // keep a pipe to its stdin (closing it ends a role)
	stdout bool     // read its stdout instead of logging it
}

// start runs argv pinned to o.cpus. Every process started is stopped by
// h.cleanup if not before.
func (h *harness) start(name string, o startOpts, argv ...string) (*proc, error) {
	if o.cpus != "" {
		argv = append([]string{"taskset", "-c", o.cpus}, argv...)
	}
	h.mu.Lock()
	h.seq++
	logPath := filepath.Join(h.dir, fmt.Sprintf("%03d-%s.log", h.seq, name))
	h.mu.Unlock()
	lf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer lf.Close() // the child has its own copy
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), o.env...)
	cmd.Stderr = lf
	p := &proc{name: name, cmd: cmd, logPath: logPath, done: make(chan struct{})}
	// Our own pipe rather than cmd.StdoutPipe: Wait closes that one as soon
	// as the process exits, which may lose output not yet read.
	var stdoutW *os.File
	if o.stdout {
		r, w, err := os.Pipe()
		if err != nil {
			return nil, err
		}
		cmd.Stdout, stdoutW = w, w
		p.stdout = bufio.NewReader(r)
		p.stdoutR = r
	} else {
		cmd.Stdout = lf
	}
	if o.stdin {
		w, err := cmd.StdinPipe()
		if err != nil {
			return nil, err
		}
		p.stdin = w
	}
	// Its own process group, so a Ctrl-C at the terminal reaches the
	// harness only, which then stops what it started in order.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	err = cmd.Start()
	if stdoutW != nil {
		stdoutW.Close() // the child has its copy; EOF comes when it exits
	}
	if err != nil {
		if p.stdoutR != nil {
			p.stdoutR.Close()
		}
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	h.mu.Lock()
	h.procs = append(h.procs, p)
	h.mu.Unlock()
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	if p.stdoutR != nil {
		// Close our end once the process has ended and a reader had the
		// chance to drain it (runTool reads to EOF first).
		go func() {
			<-p.done
			time.Sleep(time.Second)
			p.stdoutR.Close()
		}()
	}
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// logTail returns the end of the process's log, for error messages.
func (p *proc) logTail() string {
	b, _ := os.ReadFile(p.logPath)
	s := strings.TrimSpace(string(b))
	if len(s) > 600 {
		s = "…" + s[len(s)-600:]
	}
	return s
}

// line reads one line of the process's stdout within limit.
func (p *proc) line(limit time.Duration) (string, error) {
	type res struct {
		s   string
		err error
	}
	ch := make(chan res, 1)
	go func() {
		s, err := p.stdout.ReadString('\n')
		ch <- res{strings.TrimSpace(s), err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			return "", fmt.Errorf("%s: %v (log: %s)", p.name, r.err, p.logTail())
		}
		return r.s, nil
	case <-time.After(limit):
		return "", fmt.Errorf("%s: no output within %v (log: %s)", p.name, limit, p.logTail())
	}
}

// stop ends the process and its descendants: stdin closed (roles end on
// it), SIGTERM to the process, and after grace SIGKILL to it and to every
// descendant still there. Only pids of this process tree are signalled.
func (p *proc) stop(grace time.Duration) {
	if p.exited() {
		return
	}
	kids := tree(p.pid())[1:]
	if p.stdin != nil {
		p.stdin.Close()
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		p.cmd.Process.Kill()
		<-p.done
	}
	// Children that outlived their parent (socat's forks, an nginx worker)
	// are re-parented: kill those that are still the ones we saw.
	for _, pid := range kids {
		if st, err := readStat(pid); err == nil && (st.ppid == p.pid() || st.ppid == 1 || inList(kids, st.ppid)) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

func inList(l []int, v int) bool {
	for _, x := range l {
		if x == v {
			return true
		}
	}
	return false
}

// waitListening waits until a socket listens on 127.0.0.1:port, failing
// early if p exits.
func waitListening(p *proc, port int, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for !listening(port) {
		if p != nil && p.exited() {
			return fmt.Errorf("%s exited before listening: %v (log: %s)", p.name, p.err, p.logTail())
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: nothing listens on port %d after %v (log: %s)", p.name, port, limit, p.logTail())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

// cpuList is taskset's list of the distinct CPUs given, in order; negative
// ones are left out ("" for none: not pinned).
func cpuList(cpus ...int) string {
	var l []string
	for _, c := range cpus {
		if s := strconv.Itoa(c); c >= 0 && !inStrings(l, s) {
			l = append(l, s)
		}
	}
	return strings.Join(l, ",")
}

// freePort returns a port of host (an IPv4 address) that was free a moment
// ago.
func freePort(host string) (int, error) {
	ln, err := net.Listen("tcp4", host+":0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// runTool runs a load tool pinned to cpu, with env added, to completion,
// killed after limit, and returns its stdout.
func (h *harness) runTool(name string, cpu int, env []string, limit time.Duration, argv ...string) (string, error) {
	p, err := h.start(name, startOpts{cpus: cpuList(cpu), env: env, stdout: true}, argv...)
	if err != nil {
		return "", err
	}
	var out strings.Builder
	copied := make(chan struct{})
	go func() {
		io.Copy(&out, p.stdout)
		close(copied)
	}()
	select {
	case <-p.done:
	case <-time.After(limit):
		p.stop(time.Second)
		<-copied
		return out.String(), fmt.Errorf("%s: killed after %v", name, limit)
	}
	<-copied
	if p.err != nil {
		// wrk and iperf3 may print figures even when they fail; the
		// caller decides what to keep.
		return out.String(), fmt.Errorf("%s: %v (log: %s)", name, p.err, p.logTail())
	}
	return out.String(), nil
}

// raiseNoFile sets this process's soft open-files limit to its hard one,
// which the processes it starts inherit, and returns it (-1: unknown).
func raiseNoFile() int64 {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return -1
	}
	raised := l
	raised.Cur = l.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised); err == nil {
		l = raised
	}
	return int64(l.Cur)
}

// noFile is the soft open-files limit, or -1.
func noFile() int64 {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return -1
	}
	return int64(l.Cur)
}
