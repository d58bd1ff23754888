package engine

import (
	"net/netip"
	"sync/atomic"
	"time"
	"unsafe"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// UDP forwarding. A udp rule's listening socket is unconnected and owned by
// one loop. The first datagram from a client source opens a flow: a socket
// connected to the target (so the kernel demultiplexes the replies), polled by
// the same loop. Every datagram is forwarded as one datagram, never merged or
// split; one that cannot be sent at once (full socket buffer) is dropped and
// counted, as a router would. A flow ends after timeout.idle without a
// datagram either way, or when the target reports it unreachable.
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

	FlowsOpened  atomic.Uint64
	FlowsExpired atomic.Uint64
	FlowsActive  atomic.Int64
	DatagramsIn  atomic.Uint64 // client to target, forwarded
	DatagramsOut atomic.Uint64 // target to client, forwarded
	Dropped      atomic.Uint64 // not forwarded: flow table full, no fd, full socket buffer
}

// flow is one client source of a udp rule and its socket to the target.
type flow struct {
	ln     *Listener
	fd     int
	cli    netip.AddrPort
	cliSA  unix.Sockaddr // made once, so replies are sent without allocating
	target netip.AddrPort
	tmr    timer
	start  int64
	active int64 // loop clock of the last datagram either way
}

var _ handler = (*flow)(nil)
var _ expirer = (*flow)(nil)

// udpScratch is a loop's buffer for one datagram and its source address:
// each datagram is forwarded before the next is read, so one per loop is
// enough.
type udpScratch struct {
	buf   [maxDatagram]byte
	rsa   unix.RawSockaddrAny
	salen uint32
}

// recvfrom reads one datagram into l's scratch without allocating (unix.
// Recvfrom allocates a Sockaddr per call). It returns the length and the
// source, or the errno.
func (l *Loop) recvfrom(fd int) (int, netip.AddrPort, error) {
	s := l.udp
	for {
		s.salen = unix.SizeofSockaddrAny
		n, _, e := unix.Syscall6(unix.SYS_RECVFROM, uintptr(fd), uintptr(unsafe.Pointer(&s.buf[0])), uintptr(len(s.buf)),
			0, uintptr(unsafe.Pointer(&s.rsa)), uintptr(unsafe.Pointer(&s.salen)))
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return 0, netip.AddrPort{}, e
		}
		return int(n), rawAddrPort(&s.rsa), nil
	}
}

// rawAddrPort decodes a kernel socket address; an unknown family gives the
// zero value.
func rawAddrPort(rsa *unix.RawSockaddrAny) netip.AddrPort {
	switch rsa.Addr.Family {
	case unix.AF_INET:
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(rsa))
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), ntohs(sa.Port))
	case unix.AF_INET6:
		sa := (*unix.RawSockaddrInet6)(unsafe.Pointer(rsa))
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), ntohs(sa.Port))
	}
	return netip.AddrPort{}
}

// ntohs turns a port as the kernel stores it (network order) into a number.
func ntohs(p uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(&p))
	return uint16(b[0])<<8 | uint16(b[1])
}

// handleUDP forwards up to udpBatch datagrams from clients to their flows.
func (ln *Listener) handleUDP(l *Loop) {
	u := ln.udp
	for i := 0; i < udpBatch; i++ {
		n, src, err := l.recvfrom(ln.fd)
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
		if _, err := unix.Write(f.fd, l.udp.buf[:n]); err != nil {
			u.Dropped.Add(1)
			if err != unix.EAGAIN && err != unix.EINTR && err != unix.ENOBUFS {
				f.close(l) // the target is unreachable (an earlier ICMP error)
			}
			continue
		}
		u.DatagramsIn.Add(1)
	}
}

// openFlow creates the flow of a new client source, or returns nil when the
// table is full or no socket can be had (the datagram is then dropped).
func (ln *Listener) openFlow(l *Loop, src netip.AddrPort) *flow {
	u := ln.udp
	if len(u.flows) >= u.maxFlows {
		return nil
	}
	target := ln.targets[ln.pickTarget()]
	fd, err := ln.targetPif.socket(family(target.Addr()), unix.SOCK_DGRAM)
	if err != nil {
		ln.warnOnce(l, err)
		return nil
	}
	if err := unix.Connect(fd, sockaddr(target)); err != nil {
		unix.Close(fd)
		l.connectError(ln)
		return nil
	}
	f := &flow{ln: ln, fd: fd, cli: src, cliSA: sockaddr(src), target: target, start: l.now, active: l.now}
	f.tmr.owner = f
	if err := l.register(fd, udpEvents, f); err != nil {
		unix.Close(fd)
		return nil
	}
	u.flows[src] = f
	u.FlowsOpened.Add(1)
	u.FlowsActive.Add(1)
	l.arm(&f.tmr, ln.udpIdle())
	return f
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
	for i := 0; i < udpBatch; i++ {
		n, err := unix.Read(f.fd, l.udp.buf[:])
		if err != nil {
			switch err {
			case unix.EAGAIN:
			case unix.EINTR:
				continue
			default: // ECONNREFUSED: the target port is closed
				f.close(l)
			}
			return
		}
		f.active = l.now
		if err := unix.Sendto(f.ln.fd, l.udp.buf[:n], 0, f.cliSA); err != nil {
			u.Dropped.Add(1)
			continue
		}
		u.DatagramsOut.Add(1)
	}
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
	unix.Close(f.fd)
	f.fd = -1
	delete(f.ln.udp.flows, f.cli)
	f.ln.udp.FlowsActive.Add(-1)
	if ce := l.log.Check(zap.DebugLevel, "udp flow"); ce != nil {
		ce.Write(zap.Stringer("listen", f.ln.addr), zap.Stringer("src", f.cli), zap.Stringer("target", f.target),
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
