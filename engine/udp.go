package engine

import (
	"net/netip"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/internal/rawsys"
)

// UDP forwarding. A udp rule's listening socket is unconnected and owned by
// one loop. The first datagram from a client source opens a flow: a socket
// connected to a backend of the listener's pool (so the kernel demultiplexes
// the replies), polled by the same loop. The backend is chosen as for a tcp
// session (balance=, passive health): a backend whose socket cannot connect,
// or whose flow the kernel reports unreachable, is skipped by new flows for
// balance.DownFor; a reply brings it back up. Every datagram is forwarded as
// one datagram, never merged or split; one that cannot be sent at once (full
// socket buffer) is dropped and counted, as a router would. A flow ends after
// timeout.idle without a datagram either way, or when the target reports it
// unreachable.
const (
	DefaultUDPIdleTimeout = 60 * time.Second
	udpEvents             = unix.EPOLLIN // level-triggered: batches may stop before EAGAIN
	udpBatch              = 64           // datagrams per wake-up per socket
	maxDatagram           = 65535
)

// udpState is the part of a Listener that only udp rules have. It is touched
// by the owning loop only, except the counters.
type udpState struct {
	loop     *Loop
	flows    map[netip.AddrPort]*flow
	maxFlows int

	FlowsOpened   atomic.Uint64
	FlowsExpired  atomic.Uint64
	FlowsActive   atomic.Int64
	DatagramsUp   atomic.Uint64 // client to target, forwarded
	DatagramsDown atomic.Uint64 // target to client, forwarded
	Dropped       atomic.Uint64 // not forwarded: flow table full, no fd, full socket buffer
}

// flow is one client source of a udp rule and its socket to the target.
type flow struct {
	ln      *Listener
	fd      int
	cli     netip.AddrPort
	tmr     timer
	start   int64
	active  int64 // loop clock of the last datagram either way
	backend uint8 // index in ln's pool of the target; counted on it (Acquire) while the flow lives
	heard   bool  // a reply came from the target: the pool was told it is up
}

var _ handler = (*flow)(nil)
var _ expirer = (*flow)(nil)

// udpScratch is a loop's buffer for one datagram: each datagram is forwarded
// before the next is read, so one per loop is enough.
type udpScratch struct {
	buf [maxDatagram]byte
}

// handleUDP forwards up to udpBatch datagrams from clients to their flows.
func (ln *Listener) handleUDP(l *Loop) {
	u := ln.udp
	buf := l.udp.buf[:]
	for i := 0; i < udpBatch; i++ {
		n, src, err := rawsys.Recvfrom(ln.fd, buf, 0)
		if err != nil {
			if err != unix.EAGAIN {
				ln.warnOnce(l, err)
			}
			return
		}
		f := u.flows[src]
		if f == nil {
			if f = ln.openFlow(l, src); f == nil {
				u.Dropped.Add(1)
				continue
			}
		}
		f.active = l.now
		if _, err := rawsys.Write(f.fd, buf[:n]); err != nil {
			u.Dropped.Add(1)
			if err != unix.EAGAIN && err != unix.ENOBUFS {
				f.fail(l, err) // the target is unreachable (an earlier ICMP error)
			}
			continue
		}
		u.DatagramsUp.Add(1)
	}
}

// openFlow creates the flow of a new client source, its backend picked by
// the pool (the first that connects, up ones first), or returns nil when the
// table is full or no socket can be had (the datagram is then dropped).
func (ln *Listener) openFlow(l *Loop, src netip.AddrPort) *flow {
	u := ln.udp
	if len(u.flows) >= u.maxFlows {
		return nil
	}
	pool := ln.pool
	first := pool.Start(src.Addr(), l.now)
	for tried := uint64(0); ; {
		i := pool.Next(first, tried, l.now)
		if i < 0 {
			return nil // every backend failed its connect
		}
		if tried != 0 {
			ln.ctr.retry()
		}
		tried |= 1 << i
		target := pool.Target(i)
		fd, err := ln.targetPif.socket(family(target.Addr()), unix.SOCK_DGRAM)
		if err != nil {
			ln.warnOnce(l, err) // out of fds: no backend would do better
			return nil
		}
		if err := rawsys.Connect(fd, target); err != nil {
			rawsys.Close(fd)
			l.connectError(ln)
			ln.backendFailed(l, i)
			continue // no route, say: the next backend
		}
		f := &flow{ln: ln, fd: fd, cli: src, backend: uint8(i), start: l.now, active: l.now}
		f.tmr.owner = f
		if err := l.register(fd, udpEvents, f); err != nil {
			rawsys.Close(fd)
			return nil
		}
		pool.Acquire(i)
		u.flows[src] = f
		u.FlowsOpened.Add(1)
		u.FlowsActive.Add(1)
		l.arm(&f.tmr, ln.udpIdle())
		return f
	}
}

// backendFailed marks backend i of ln's pool down, telling watchers on a
// transition.
func (ln *Listener) backendFailed(l *Loop, i int) {
	if ln.pool.Failed(i, l.now) {
		l.healthChanged(ln, i, false)
	}
}

// unreachable reports whether err, from a flow's socket, is the kernel's
// report of an ICMP error from the target's side: port, host or network
// unreachable. Passive health then marks the backend down, as a refused tcp
// connect does.
func unreachable(err error) bool {
	switch err {
	case unix.ECONNREFUSED, unix.EHOSTUNREACH, unix.ENETUNREACH:
		return true
	}
	return false
}

func (ln *Listener) udpIdle() time.Duration {
	if d := ln.rule.IdleTimeout; d > 0 {
		return d
	}
	return DefaultUDPIdleTimeout
}

// handle forwards up to udpBatch replies from the target to the client.
func (f *flow) handle(l *Loop, _ int, _ uint32) {
	u := f.ln.udp
	buf := l.udp.buf[:]
	for i := 0; i < udpBatch; i++ {
		n, err := rawsys.Read(f.fd, buf)
		if err != nil {
			if err != unix.EAGAIN {
				f.fail(l, err) // ECONNREFUSED: the target port is closed
			}
			return
		}
		if !f.heard {
			f.heard = true
			if f.ln.pool.Connected(int(f.backend)) {
				l.healthChanged(f.ln, int(f.backend), true)
			}
		}
		f.active = l.now
		if _, err := rawsys.Sendto(f.ln.fd, buf[:n], 0, f.cli); err != nil {
			u.Dropped.Add(1)
			continue
		}
		u.DatagramsDown.Add(1)
	}
}

// fail ends the flow after its socket reported err; an unreachable target
// is marked down in the pool, so new flows skip it.
func (f *flow) fail(l *Loop, err error) {
	if unreachable(err) {
		f.ln.backendFailed(l, int(f.backend))
	}
	f.close(l)
}

func (f *flow) expire(l *Loop) {
	deadline := f.active + int64(f.ln.udpIdle())
	if l.now < deadline {
		l.wheel.add(&f.tmr, (deadline+int64(tick)-1)/int64(tick))
		return
	}
	f.ln.udp.FlowsExpired.Add(1)
	f.close(l)
}

// close ends the flow: its socket closed, its entry gone. Safe to call once.
func (f *flow) close(l *Loop) {
	if f.fd < 0 {
		return
	}
	l.wheel.del(&f.tmr)
	l.forget(f.fd)
	rawsys.Close(f.fd)
	f.fd = -1
	f.ln.pool.Release(int(f.backend))
	delete(f.ln.udp.flows, f.cli)
	f.ln.udp.FlowsActive.Add(-1)
	if ce := l.log.Check(zap.DebugLevel, "udp flow"); ce != nil {
		ce.Write(zap.Stringer("listen", f.ln.addr), zap.Stringer("src", f.cli), zap.Stringer("target", f.ln.pool.Target(int(f.backend))),
			zap.Duration("duration", time.Duration(l.now-f.start)))
	}
}

// closeFlows ends every flow of ln; run on ln's loop before ln's socket is
// closed, since flows send their replies through it.
func (ln *Listener) closeFlows(l *Loop) {
	for _, f := range ln.udp.flows {
		f.close(l)
	}
}
