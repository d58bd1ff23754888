package daemon

// This file holds what the daemon says to systemd and takes from it: the
// notify protocol (sd_notify(3): READY=1 once serving, RELOADING=1 with
// MONOTONIC_USEC and READY=1 around a reload, STOPPING=1, MAINPID= for the
// successor of an upgrade, WATCHDOG=1 every half of WATCHDOG_USEC) and
// socket activation (sd_listen_fds(3): LISTEN_PID, LISTEN_FDS,
// LISTEN_FDNAMES). Both are a few lines of a stable protocol, written here
// rather than taken from github.com/coreos/go-systemd: that module is not
// among this build's dependencies, and the daemon needs one datagram write
// and one environment parse, no D-Bus.

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// notifier sends sd_notify messages to $NOTIFY_SOCKET; with none set, it
// does nothing. Safe for concurrent use.
type notifier struct {
	mu   sync.Mutex
	addr *net.UnixAddr // nil: not under systemd
	conn *net.UnixConn
	log  *zap.Logger
}

// newNotifier reads $NOTIFY_SOCKET (a path, or "@name" for the abstract
// namespace). The variable stays set: a successor of an upgrade speaks to
// the same manager.
func newNotifier(log *zap.Logger) *notifier {
	n := &notifier{log: log}
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return n
	}
	if path[0] == '@' {
		path = "\x00" + path[1:]
	}
	n.addr = &net.UnixAddr{Name: path, Net: "unixgram"}
	return n
}

// enabled reports whether a notify socket is set.
func (n *notifier) enabled() bool { return n != nil && n.addr != nil }

// send sends one message, its lines "KEY=VALUE". A failure is logged, once
// per message: systemd's view is not worth stopping for.
func (n *notifier) send(lines ...string) {
	if !n.enabled() {
		return
	}
	msg := strings.Join(lines, "\n")
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.conn == nil {
		c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Net: "unixgram"}) // unbound: autobind
		if err != nil {
			n.log.Warn("systemd notify: socket", zap.Error(err))
			return
		}
		n.conn = c
	}
	if _, err := n.conn.WriteToUnix([]byte(msg), n.addr); err != nil {
		n.log.Warn("systemd notify", zap.String("message", msg), zap.Error(err))
	}
}

func (n *notifier) close() {
	if n == nil {
		return
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.conn != nil {
		n.conn.Close()
		n.conn = nil
	}
}

// Notify messages.
const (
	notifyReady     = "READY=1"
	notifyReloading = "RELOADING=1"
	notifyStopping  = "STOPPING=1"
	notifyWatchdog  = "WATCHDOG=1"
)

// monotonicUsec is MONOTONIC_USEC=, which RELOADING=1 must carry: the
// CLOCK_MONOTONIC time in microseconds.
func monotonicUsec() string {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return "MONOTONIC_USEC=" + strconv.FormatInt(ts.Sec*1e6+ts.Nsec/1e3, 10)
}

// mainPID is MAINPID=pid.
func mainPID(pid int) string { return "MAINPID=" + strconv.Itoa(pid) }

// watchdogInterval is how often to send WATCHDOG=1: half of
// $WATCHDOG_USEC, when it is set and $WATCHDOG_PID, if set, is this
// process; else 0. A successor of an upgrade gets WATCHDOG_USEC without
// WATCHDOG_PID (successorEnv): it pings once it is the main process.
func watchdogInterval() time.Duration {
	usec, pid := os.Getenv("WATCHDOG_USEC"), os.Getenv("WATCHDOG_PID")
	if usec == "" {
		return 0
	}
	if pid != "" && pid != strconv.Itoa(os.Getpid()) {
		return 0
	}
	n, err := strconv.ParseInt(usec, 10, 64)
	if err != nil || n <= 0 {
		return 0
	}
	return time.Duration(n) * time.Microsecond / 2
}

// watchdog sends WATCHDOG=1 every interval until stop closes.
func (n *notifier) watchdog(every time.Duration, stop <-chan struct{}) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			n.send(notifyWatchdog)
		case <-stop:
			return
		}
	}
}

// activated is a socket systemd passed (socket activation): its fd (3 and
// up) and its name (LISTEN_FDNAMES; "ctl" is the control socket).
type activated struct {
	fd   int
	name string
}

// maxListenFDs bounds LISTEN_FDS.
const maxListenFDs = 1024

// listenFDs reads the sockets systemd passed (parseListenFDs). The
// variables are unset, so that no child takes them for its own; the fds
// are made close-on-exec. None passed: nil, nil.
func listenFDs() ([]activated, error) {
	pid, nfds, names := os.Getenv("LISTEN_PID"), os.Getenv("LISTEN_FDS"), os.Getenv("LISTEN_FDNAMES")
	os.Unsetenv("LISTEN_PID")
	os.Unsetenv("LISTEN_FDS")
	os.Unsetenv("LISTEN_FDNAMES")
	out, err := parseListenFDs(pid, nfds, names, os.Getpid())
	for _, a := range out {
		unix.CloseOnExec(a.fd)
	}
	return out, err
}

// parseListenFDs parses LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES as
// sd_listen_fds_with_names(3) does, for the process self: LISTEN_PID must
// be self (else the sockets are another process's, a parent's leftover:
// nil, nil), LISTEN_FDS says how many (from fd 3; unset or 0: nil, nil),
// LISTEN_FDNAMES, when set, names each (":"-separated, as many as there
// are fds). Two sockets named "ctl" are an error: one control socket. It
// touches no fd.
func parseListenFDs(pid, nfds, names string, self int) ([]activated, error) {
	if nfds == "" {
		return nil, nil
	}
	if p, err := strconv.Atoi(pid); err != nil || p != self {
		return nil, nil
	}
	n, err := strconv.Atoi(nfds)
	if err != nil || n < 0 || n > maxListenFDs {
		return nil, fmt.Errorf("socket activation: LISTEN_FDS=%q: want 0 to %d", nfds, maxListenFDs)
	}
	if n == 0 {
		return nil, nil
	}
	var nameList []string
	if names != "" {
		nameList = strings.Split(names, ":")
		if len(nameList) != n {
			return nil, fmt.Errorf("socket activation: LISTEN_FDNAMES=%q names %d sockets, LISTEN_FDS=%d", names, len(nameList), n)
		}
	}
	out := make([]activated, n)
	ctls := 0
	for i := range out {
		out[i].fd = 3 + i
		if i < len(nameList) {
			out[i].name = nameList[i]
		}
		if out[i].name == fdCtl {
			if ctls++; ctls > 1 {
				return nil, fmt.Errorf("socket activation: LISTEN_FDNAMES=%q names more than one socket %q", names, fdCtl)
			}
		}
	}
	return out, nil
}
