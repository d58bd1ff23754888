package engine

// This file holds listening sockets the engine did not bind: sockets
// inherited from the process this one replaces (an upgrade) or handed by
// systemd (socket activation), each offered for one listen key. Apply
// takes an offered socket for its key instead of binding one (openSocket),
// so the socket — its inode, its accept queue — is the same one the
// clients already connect to. And the way out: ListenFiles hands this
// engine's sockets to a successor, Release stops accepting on them
// without touching the sockets themselves.
//
// Invariant: an offered fd is in exactly one place — e.inh.fds until an
// Apply takes it, then a Listener's fd. CloseInherited closes what no Apply
// took.

import (
	"fmt"
	"net/netip"
	"os"
	"sort"

	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/internal/rawsys"
	"github.com/sluice-proxy/sluice/rules"
)

// engineInherit is the sockets offered to the engine by listen key.
type engineInherit struct {
	fds map[rules.Key]int
}

// SocketKey returns the listen key of a listening socket of the host pif
// (a socket systemd passed): its protocol from SO_TYPE, its address from
// getsockname. A socket that is neither a listening tcp socket nor a bound
// udp one is an error.
func SocketKey(fd int) (rules.Key, error) {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return rules.Key{}, fmt.Errorf("fd %d: SO_TYPE: %w", fd, err)
	}
	k := rules.Key{}
	switch typ {
	case unix.SOCK_STREAM:
		k.Proto = rules.TCP
	case unix.SOCK_DGRAM:
		k.Proto = rules.UDP
	default:
		return rules.Key{}, fmt.Errorf("fd %d: socket type %d: neither tcp nor udp", fd, typ)
	}
	ap, err := rawsys.Getsockname(fd)
	if err != nil {
		return rules.Key{}, fmt.Errorf("fd %d: getsockname: %w", fd, err)
	}
	if ap.Port() == 0 {
		return rules.Key{}, fmt.Errorf("fd %d: not bound to a port", fd)
	}
	k.Addr, k.Port = ap.Addr().Unmap(), ap.Port()
	return k, nil
}

// Inherit offers fd as the socket of listen key k: the next Apply whose
// table has k uses it instead of binding (a tcp socket not yet listening
// is made to listen). The engine owns fd from then on, taken or not. It
// checks that the socket is what k says (type, address, port) and makes it
// non-blocking and close-on-exec; on an error fd is left to the caller.
func (e *Engine) Inherit(k rules.Key, fd int) error {
	got, err := SocketKey(fd)
	if err != nil {
		return err
	}
	if got.Proto != k.Proto || got.Port != k.Port || got.Addr != k.Addr.Unmap() {
		return fmt.Errorf("fd %d is %s, not %s", fd, got, k)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		return fmt.Errorf("fd %d: O_NONBLOCK: %w", fd, err)
	}
	unix.CloseOnExec(fd)
	e.amu.Lock() // a table writer: before e.mu, as Apply
	defer e.amu.Unlock()
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.inh.fds == nil {
		e.inh.fds = map[rules.Key]int{}
	}
	if old, ok := e.inh.fds[k]; ok {
		unix.Close(old) // the last offer wins: one socket per key
	}
	e.inh.fds[k] = fd
	return nil
}

// CloseInherited closes the offered sockets no Apply took, and returns
// their keys, sorted (for a log line).
func (e *Engine) CloseInherited() []string {
	e.amu.Lock() // a table writer: before e.mu, as Apply
	defer e.amu.Unlock()
	e.mu.Lock()
	defer e.mu.Unlock()
	var keys []string
	for k, fd := range e.inh.fds {
		unix.Close(fd)
		keys = append(keys, k.String())
	}
	e.inh.fds = nil
	sort.Strings(keys)
	return keys
}

// openSocket is Apply's socket for key: the one offered for it, if any
// (taken: never offered again), else a new one of pif p bound by
// listenSocket. It returns what listenSocket returns. Called with e.amu
// held (Apply binds outside e.mu; Inherit and Release take e.amu too).
func (e *Engine) openSocket(p *pif, proto rules.Proto, key rules.Key) (int, netip.AddrPort, error) {
	addr := netipAddrPort(key.Addr, key.Port)
	fd, ok := e.inh.fds[key]
	if !ok || key.Port == 0 {
		return listenSocket(p, proto, addr)
	}
	delete(e.inh.fds, key)
	if proto == rules.TCP {
		// systemd may pass a socket bound but not listening; listen(2) on
		// a listening one only sets the backlog again.
		if err := unix.Listen(fd, backlog); err != nil {
			unix.Close(fd)
			return -1, addr, fmt.Errorf("listen (inherited socket): %w", err)
		}
		_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	}
	return fd, addr, nil
}

// ListenFile is one listening socket handed to a successor: a duplicate of
// the engine's fd (the caller closes it), and its listen key.
type ListenFile struct {
	Key  rules.Key
	File *os.File
}

// ListenFiles duplicates every listening socket of the active table, and
// every offered one no Apply took, with its listen key, for a successor
// process. A key of port 0 (any free port) is left out: it has no identity
// a successor's table could name. The caller closes the files. It fails
// while an apply is pending (its sockets are not the committed table's).
func (e *Engine) ListenFiles() ([]ListenFile, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.pending != nil {
		return nil, ErrPending
	}
	if e.stopped {
		return nil, ErrStopped
	}
	var out []ListenFile
	add := func(k rules.Key, fd int) error {
		nfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 3)
		if err != nil {
			return fmt.Errorf("dup %s: %w", k, err)
		}
		out = append(out, ListenFile{Key: k, File: os.NewFile(uintptr(nfd), k.String())})
		return nil
	}
	for _, ln := range e.listeners {
		if ln.key.Port == 0 {
			continue
		}
		if err := add(ln.key, ln.fd); err != nil {
			closeListenFiles(out)
			return nil, err
		}
	}
	for k, fd := range e.inh.fds {
		if err := add(k, fd); err != nil {
			closeListenFiles(out)
			return nil, err
		}
	}
	return out, nil
}

func closeListenFiles(fs []ListenFile) {
	for _, f := range fs {
		f.File.Close()
	}
}

// Release stops accepting: no loop polls a listening socket any more, and
// this process's fds of them are closed — close(2), never shutdown(2),
// which would take a socket shared with a successor out of LISTEN for both
// (the pause of Apply does that, and must never run on a hand-over). The
// successor's copies keep the sockets, their accept queues and their
// bound ports. Live sessions go on; udp flows end here (their replies
// went out through the listening socket). Shutdown then drains what is
// left.
func (e *Engine) Release() {
	e.amu.Lock() // a table writer: before e.mu, as Apply
	defer e.amu.Unlock()
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.stopped {
		return
	}
	e.closeListeners(e.listeners)
	e.listeners = nil
	for k, fd := range e.inh.fds {
		unix.Close(fd)
		delete(e.inh.fds, k)
	}
}
