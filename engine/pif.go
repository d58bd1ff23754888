package engine

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/internal/netns"
	"github.com/sluice-proxy/sluice/internal/rawsys"
	"github.com/sluice-proxy/sluice/rules"
)

// A pif is a place where sockets live: the host (the daemon's own network
// namespace) or a named network namespace. A socket belongs to the namespace
// it was created in for its whole life, whichever thread later uses it; so
// only socket(2) has to run inside the namespace. Each named pif keeps one OS
// thread switched into its namespace with setns(2); it creates sockets on
// request and hands back the fds, which the ordinary event loops then poll.
//
// The host pif is the nil *pif: its sockets are created on the caller's
// thread.
type pif struct {
	name  string
	netns string    // the path it was opened from, for messages
	ident [2]uint64 // device and inode of the namespace entered (alive compares the path's)
	reqs  chan sockReq
	done  chan struct{}

	mu     sync.RWMutex // held for reading by a request in flight
	closed bool
}

type sockReq struct {
	family, typ int
	reply       chan sockReply
}

type sockReply struct {
	fd  int
	err error
}

// openPif starts the thread of a pif inside the network namespace at path
// (/run/netns/NAME, /proc/PID/ns/net, ...). It returns once the thread is
// inside the namespace, or the error that kept it out.
func openPif(name, path string) (*pif, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("pif %s: open netns: %w", name, err)
	}
	p := &pif{name: name, netns: path, reqs: make(chan sockReq), done: make(chan struct{})}
	if p.ident, err = nsIdent(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("pif %s: %w", name, err)
	}
	ready := make(chan error, 1)
	go p.run(f, ready)
	if err := <-ready; err != nil {
		return nil, fmt.Errorf("pif %s: %w", name, err)
	}
	return p, nil
}

// run is the pif's thread: locked to its OS thread inside the namespace
// while the pif lives. When the pif closes, the thread is switched back
// before the runtime may hand it to other goroutines (netns.Enter); were it
// left behind, and were it the main thread, the daemon's /proc/PID/net/*
// and ns/net would show the pif's namespace for good. (While the pif lives
// they would show it too: cmd/sluice keeps the main thread for its main
// goroutine, so a pif thread is never the main thread there.)
func (p *pif) run(f *os.File, ready chan<- error) {
	defer close(p.done)
	leave, err := netns.Enter(f)
	f.Close()
	if err != nil {
		ready <- err // "setns PATH: ...", openPif adds the pif
		return
	}
	defer leave()
	ready <- nil
	for req := range p.reqs {
		fd, err := unix.Socket(req.family, req.typ|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
		req.reply <- sockReply{fd, err}
	}
}

// nsIdent is the device and inode of an open namespace file: what makes a
// namespace itself, whatever path names it.
func nsIdent(f *os.File) ([2]uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return [2]uint64{}, fmt.Errorf("fstat %s: %w", f.Name(), err)
	}
	return [2]uint64{st.Dev, st.Ino}, nil
}

// alive returns nil when the pif's path still names the namespace its
// thread entered, else why not. A namespace deleted with `ip netns del`
// (or whose process ended) lives on while the pif's thread is inside it,
// but nothing else can reach it any more: a rule bound there would commit
// and never be reached, so a table that names it is refused instead. A path
// that now names another namespace (deleted and added again) is refused
// too: the daemon would serve the old one; restart it, or name the new one
// under another pif. The host pif is always alive.
func (p *pif) alive() error {
	if p == nil {
		return nil
	}
	f, err := os.Open(p.netns)
	if err != nil {
		return fmt.Errorf("pif %s: its namespace %s is gone (deleted after the daemon entered it): %w", p.name, p.netns, err)
	}
	defer f.Close()
	id, err := nsIdent(f)
	if err != nil {
		return fmt.Errorf("pif %s: %w", p.name, err)
	}
	if id != p.ident {
		return fmt.Errorf("pif %s: %s now names another namespace than the one the daemon entered at start (deleted and made again?): restart the daemon to enter it", p.name, p.netns)
	}
	return nil
}

// errPifClosed is returned for sockets asked of a pif that was closed.
var errPifClosed = errors.New("pif closed")

// socket returns a new non-blocking, close-on-exec socket of the pif. typ is
// unix.SOCK_STREAM or unix.SOCK_DGRAM.
//
// For a named pif it is a round trip to the pif's thread, a few
// microseconds: the caller's loop waits that long per outgoing connection
// into a namespace.
func (p *pif) socket(family, typ int) (int, error) {
	if p == nil {
		return rawsys.Socket(family, typ)
	}
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.closed {
		return -1, errPifClosed
	}
	reply := make(chan sockReply, 1)
	p.reqs <- sockReq{family, typ, reply}
	r := <-reply
	return r.fd, r.err
}

// close ends the pif's thread. Sockets already made stay usable.
func (p *pif) close() {
	if p == nil {
		return
	}
	p.mu.Lock()
	if !p.closed {
		p.closed = true
		close(p.reqs)
	}
	p.mu.Unlock()
	<-p.done
}

// String names the pif as rules write it.
func (p *pif) String() string {
	if p == nil {
		return rules.HostPif
	}
	return p.name
}
