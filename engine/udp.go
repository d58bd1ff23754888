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
//
// Flows are bounded for the whole process (Config.MaxFlows, a flowBudget),
// not per listener: each holds an fd, and the fds are shared with the tcp
// sessions, whose listeners pause on EMFILE. A flow whose target has not
// replied yet lives min(timeout.idle, unansweredLife) after its client's
// last datagram: a spoofed-source flood, whose replies go nowhere, then
// holds its fds for seconds, not for timeout.idle. A one-way protocol
// (syslog, statsd) keeps its flow while its client sends more often than
// that; a quieter one opens a new flow, to the backend the pool picks.
//
// On a wildcard listener (0.0.0.0, [::]) the socket asks for IP_PKTINFO /
// IPV6_RECVPKTINFO: each datagram says the local address it was sent to, a
// flow is a client source and that address, and its replies are sent from
// it (sendmsg with the source set). Without it the kernel would pick the
// reply's source by route, and on a host with several addresses a client
// that sent to one would hear from another and drop the reply.
const (
	DefaultUDPIdleTimeout = 60 * time.Second
	udpEvents             = unix.EPOLLIN // level-triggered: batches may stop before EAGAIN
	udpBatch              = 64           // datagrams per wake-up per socket
	maxDatagram           = 65535
)

// unansweredLife bounds the life of a flow that never got a reply, after
// its client's last datagram. A variable so that tests can wait less.
var unansweredLife = 5 * time.Second

// flowBudget bounds the udp flows of the process (Config.MaxFlows). Safe for
// concurrent use: listeners on every loop take from it.
type flowBudget struct {
	max    int64
	open   atomic.Int64
	denied atomic.Uint64 // a new source's flow refused: the budget was spent
}

// take reports whether one more flow may open, counting it if so.
func (b *flowBudget) take() bool {
	if b.open.Add(1) > b.max {
		b.open.Add(-1)
		b.denied.Add(1)
		return false
	}
	return true
}

func (b *flowBudget) give() { b.open.Add(-1) }

// flowKey is what a flow is found by: its client's address and, on a
// wildcard listener, the local address the client sent to (else zero).
type flowKey struct {
	cli   netip.AddrPort
	local netip.Addr
}

// udpState is the part of a Listener that only udp rules have. It is touched
// by the owning loop only, except the counters.
type udpState struct {
	loop  *Loop
	flows map[flowKey]*flow

	FlowsOpened     atomic.Uint64
	FlowsExpired    atomic.Uint64 // ended by timeout.idle after a reply
	FlowsUnanswered atomic.Uint64 // ended by unansweredLife: no reply ever came
	FlowsActive     atomic.Int64
	DatagramsUp     atomic.Uint64 // client to target, forwarded
	DatagramsDown   atomic.Uint64 // target to client, forwarded
	Dropped         atomic.Uint64 // not forwarded: flow budget spent, no fd, full socket buffer
}

// flow is one client source of a udp rule and its socket to the target.
type flow struct {
	ln      *Listener
	fd      int
	key     flowKey // key.local: the address replies leave from (zero: the kernel chooses)
	ifindex int32   // the interface the client's datagrams came in on (wildcard listeners)
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
		n, src, dst, ifindex, err := rawsys.RecvFromTo(ln.fd, buf)
		if err != nil {
			if err != unix.EAGAIN {
				ln.warnOnce(l, err)
			}
			return
		}
		key := flowKey{src, dst}
		f := u.flows[key]
		if f == nil {
			if f = ln.openFlow(l, key, int32(ifindex)); f == nil {
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
// process's flow budget is spent or no socket can be had (the datagram is
// then dropped).
func (ln *Listener) openFlow(l *Loop, key flowKey, ifindex int32) *flow {
	if !l.e.flows.take() {
		return nil
	}
	if f := ln.dialFlow(l, key, ifindex); f != nil {
		return f
	}
	l.e.flows.give()
	return nil
}

// dialFlow is openFlow once the budget said yes: nil when no backend could
// be had.
func (ln *Listener) dialFlow(l *Loop, key flowKey, ifindex int32) *flow {
	u := ln.udp
	pool := ln.pool
	first := pool.Start(key.cli.Addr(), l.now)
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
		f := &flow{ln: ln, fd: fd, key: key, ifindex: ifindex, backend: uint8(i), start: l.now, active: l.now}
		f.tmr.owner = f
		if err := l.register(fd, udpEvents, f); err != nil {
			rawsys.Close(fd)
			return nil
		}
		pool.Acquire(i)
		u.flows[key] = f
		u.FlowsOpened.Add(1)
		u.FlowsActive.Add(1)
		l.arm(&f.tmr, f.life())
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

// life is how long the flow lives after its last datagram: timeout.idle
// once its target replied, at most unansweredLife before.
func (f *flow) life() time.Duration {
	if f.heard {
		return f.ln.udpIdle()
	}
	return min(f.ln.udpIdle(), unansweredLife)
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
		if _, err := rawsys.SendFromTo(f.ln.fd, buf[:n], f.key.local, int(f.ifindex), f.key.cli); err != nil {
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
	deadline := f.active + int64(f.life())
	if l.now < deadline {
		l.wheel.add(&f.tmr, (deadline+int64(tick)-1)/int64(tick))
		return
	}
	if f.heard {
		f.ln.udp.FlowsExpired.Add(1)
	} else {
		f.ln.udp.FlowsUnanswered.Add(1)
	}
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
	delete(f.ln.udp.flows, f.key)
	f.ln.udp.FlowsActive.Add(-1)
	l.e.flows.give()
	if ce := l.log.Check(zap.DebugLevel, "udp flow"); ce != nil {
		ce.Write(zap.Stringer("listen", f.ln.addr), zap.Stringer("src", f.key.cli), zap.Stringer("target", f.ln.pool.Target(int(f.backend))),
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
