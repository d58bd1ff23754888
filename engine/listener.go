package engine

import (
	"fmt"
	"net/netip"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/balance"
	"github.com/sluice-proxy/sluice/handshake"
	"github.com/sluice-proxy/sluice/internal/rawsys"
	"github.com/sluice-proxy/sluice/rules"
)

// A listener is polled by every loop, level-triggered and EPOLLEXCLUSIVE: the
// kernel wakes one idle loop per incoming burst, and that loop accepts into
// itself, so no accepted fd ever crosses loops.
const (
	listenerEvents = unix.EPOLLIN | unix.EPOLLEXCLUSIVE
	acceptBatch    = 32                     // accepts per wake-up, so one listener cannot starve the loop
	acceptRetry    = 100 * time.Millisecond // pause after EMFILE/ENFILE before polling again
	backlog        = 4096
)

// Listener is one listening socket: one port of a rule. A tcp listener is
// polled by every loop; a udp one by one loop, which owns its flows.
type Listener struct {
	e         *Engine
	fd        int
	addr      netip.AddrPort
	key       rules.Key // the listen key asked for (port 0: any free port)
	rule      *rules.Rule
	listenPif *pif              // where the listening socket lives (nil: host)
	targetPif *pif              // where backend sockets are made (nil: host)
	udp       *udpState         // udp rules only
	policy    *handshake.Policy // the rule's handshake chains and counters (shared by its ports)
	pool      *balance.Pool     // the backend pool for this port: balancing and passive health
	ctr       *RuleCounters     // the rule's data-path counters (shared by its ports)
	routes    []*Listener       // a routed key's front listener: one per route, itself first (same fd); nil otherwise
	route     bool              // one of a routed key's listeners (front included)

	closed   atomic.Bool
	lastWarn atomic.Int64 // engine clock of the last out-of-fds warning

	Accepted atomic.Uint64 // connections accepted on the socket (a routed key's: on its front listener)
	Routed   atomic.Uint64 // a route's: connections the sni stage sent to it
	Paused   atomic.Uint64 // times accept was paused for lack of fds
}

// Addr returns the address the listener is bound to.
func (ln *Listener) Addr() netip.AddrPort { return ln.addr }

// Rule returns the rule the listener serves.
func (ln *Listener) Rule() *rules.Rule { return ln.rule }

// Policy returns the rule's handshake policy: its counters (Stats) are the
// rule's, shared by every port of it.
func (ln *Listener) Policy() *handshake.Policy { return ln.policy }

// Pool returns the listener's backend pool (Stats shows each backend's state).
func (ln *Listener) Pool() *balance.Pool { return ln.pool }

// Routes returns the listeners of the routes of ln's key, ln first, or nil
// when the key does not route.
func (ln *Listener) Routes() []*Listener { return ln.routes }

// routeFor returns the listener of route r of ln's key (ln itself when the
// key does not route, or r is not among its routes).
func (ln *Listener) routeFor(r *rules.Rule) *Listener {
	for _, rl := range ln.routes {
		if rl.rule == r {
			return rl
		}
	}
	return ln
}

// signature is what decides whether a kept socket keeps its listener: the
// canonical lines of its rule, or of every route of its key, each with the
// digest of its TLS files (tls.go).
func (ln *Listener) signature(line func(*rules.Rule) string) string {
	if ln.routes == nil {
		return line(ln.rule) + ln.policy.TLSDigest()
	}
	sig := ""
	for _, rl := range ln.routes {
		sig += line(rl.rule) + rl.policy.TLSDigest() + "\n"
	}
	return sig
}

// groupSignature is signature for the routes g a listener would get.
func groupSignature(g []*rules.Rule, line func(*rules.Rule) string) string {
	if len(g) == 1 && !g[0].IsRoute() {
		return line(g[0])
	}
	sig := ""
	for _, r := range g {
		sig += line(r) + "\n"
	}
	return sig
}

// DefaultSockBuf is the SO_SNDBUF and SO_RCVBUF of a tcp session's sockets
// when its rule has no sockbuf= (rules.Rule.SockBuf). The kernel doubles it
// for its own bookkeeping: a client that never reads pins at most about
// twice this in sluice's socket towards it, and as much in the backend's
// socket, instead of the megabytes autotuning grows to (tcp_wmem,
// tcp_rmem). Loopback and LAN paths keep their throughput with it
// (docs/reliability.md, "Socket buffers and throughput"); a path with a larger
// bandwidth-delay product wants sockbuf=auto or a larger size.
const DefaultSockBuf = 1 << 20

// deferAccept returns the TCP_DEFER_ACCEPT seconds of the listening socket
// of the routes g (pol the first route's policy), 0 for none. A key whose
// every client must speak first — it routes by the ClientHello, or
// terminates TLS — and that gives no health reply (a monitor may connect and
// only read) is accepted only once the client's first bytes are there: the
// accept then finds the hello, with no read for EAGAIN and no wake-up for
// the bytes, and a client that connects and says nothing costs no session.
// The wait is timeout.handshake, rounded up to seconds: the kernel then
// hands the connection over anyway, and the handshake timeout runs again
// from the accept.
func deferAccept(g []*rules.Rule, pol *handshake.Policy) int {
	r := g[0]
	if r.Health != rules.HealthNone || len(r.Monitor) > 0 {
		return 0
	}
	if len(g) == 1 && !r.IsRoute() && !r.Terminates() {
		return 0
	}
	return int((pol.Timeout() + time.Second - 1) / time.Second)
}

// setDeferAccept sets TCP_DEFER_ACCEPT on a listening socket (0 clears
// it: a kept socket takes its new rule's). Best effort: without it the
// session reads the first bytes after their event, as for any rule.
func setDeferAccept(fd, secs int) {
	_ = rawsys.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, secs)
}

// noBufForce is set once SO_SNDBUFFORCE has been refused (no
// CAP_NET_ADMIN): from then on only SO_SNDBUF / SO_RCVBUF are tried, which
// the kernel caps at net.core.wmem_max / rmem_max.
var noBufForce atomic.Bool

// setSockBuf gives fd the socket buffers of sockbuf (a rules.Rule.SockBuf:
// 0 the default, rules.SockBufAuto leaves the kernel's autotuning). Set on a
// listening socket, accepted sockets inherit them; set on a backend socket
// before its connect, the window it offers follows. Best effort: a socket
// whose buffers cannot be set still works, with the kernel's.
func setSockBuf(fd, sockbuf int) {
	if sockbuf == rules.SockBufAuto {
		return
	}
	if sockbuf == 0 {
		sockbuf = DefaultSockBuf
	}
	for _, o := range [...][2]int{{unix.SO_SNDBUFFORCE, unix.SO_SNDBUF}, {unix.SO_RCVBUFFORCE, unix.SO_RCVBUF}} {
		if !noBufForce.Load() {
			if err := rawsys.SetsockoptInt(fd, unix.SOL_SOCKET, o[0], sockbuf); err == nil {
				continue
			} else if err == unix.EPERM {
				noBufForce.Store(true)
			}
		}
		_ = rawsys.SetsockoptInt(fd, unix.SOL_SOCKET, o[1], sockbuf)
	}
}

// listenSocket creates a non-blocking socket of pif p bound to addr: a
// listening one for tcp, a bound datagram socket for udp. It returns the fd,
// the bound address (port filled in when 0 was asked), or an error naming the
// failing call.
func listenSocket(p *pif, proto rules.Proto, addr netip.AddrPort) (int, netip.AddrPort, error) {
	fam := family(addr.Addr())
	typ := unix.SOCK_STREAM
	if proto == rules.UDP {
		typ = unix.SOCK_DGRAM
	}
	fd, err := p.socket(fam, typ)
	if err != nil {
		return -1, addr, fmt.Errorf("socket: %w", err)
	}
	fail := func(what string, err error) (int, netip.AddrPort, error) {
		unix.Close(fd)
		return -1, addr, fmt.Errorf("%s: %w", what, err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return fail("setsockopt SO_REUSEADDR", err)
	}
	if fam == unix.AF_INET6 {
		// [::] and 0.0.0.0 are distinct listen keys; dual-stack would make
		// them collide.
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 1); err != nil {
			return fail("setsockopt IPV6_V6ONLY", err)
		}
	}
	if typ == unix.SOCK_DGRAM && addr.Addr().IsUnspecified() {
		// A wildcard udp socket: each datagram says where it was sent,
		// and the flow's replies leave from there (udp.go).
		level, opt := unix.IPPROTO_IP, unix.IP_PKTINFO
		if fam == unix.AF_INET6 {
			level, opt = unix.IPPROTO_IPV6, unix.IPV6_RECVPKTINFO
		}
		if err := unix.SetsockoptInt(fd, level, opt, 1); err != nil {
			return fail("setsockopt PKTINFO", err)
		}
	}
	if err := rawsys.Bind(fd, addr); err != nil {
		return fail("bind", err)
	}
	if typ == unix.SOCK_STREAM {
		// Accepted sockets inherit it (Linux clones the listener's TCP
		// state): no setsockopt per accepted client.
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
			return fail("setsockopt TCP_NODELAY", err)
		}
		if err := unix.Listen(fd, backlog); err != nil {
			return fail("listen", err)
		}
	}
	if addr.Port() == 0 {
		if bound, err := rawsys.Getsockname(fd); err == nil {
			addr = bound
		}
	}
	return fd, addr, nil
}

// handle accepts up to acceptBatch connections into loop l (tcp), or
// forwards a batch of datagrams (udp).
func (ln *Listener) handle(l *Loop, _ int, _ uint32) {
	if ln.udp != nil {
		ln.handleUDP(l)
		return
	}
	for i := 0; i < acceptBatch; i++ {
		fd, src, err := rawsys.Accept4(ln.fd, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
		if err != nil {
			switch err {
			case unix.EAGAIN:
			case unix.ECONNABORTED, unix.EPROTO, unix.EPERM:
				continue // that one connection is gone; the next may be fine
			case unix.EMFILE, unix.ENFILE, unix.ENOBUFS, unix.ENOMEM: // outOfFds
				ln.Paused.Add(1)
				l.pauseListener(ln)
				ln.warnOnce(l, err)
			default:
				ln.warnOnce(l, err)
			}
			return
		}
		ln.Accepted.Add(1)
		newSession(l, ln, fd, src)
		if len(l.fdWait) > 0 {
			return // out of fds: the listener is paused until they free up
		}
	}
}

// warnOnce logs an accept failure at most once a second per listener, so a
// flood of failures is never a flood of log lines.
func (ln *Listener) warnOnce(l *Loop, err error) {
	last := ln.lastWarn.Load()
	if last != 0 && l.now-last < int64(time.Second) {
		return
	}
	if ln.lastWarn.CompareAndSwap(last, l.now) {
		l.log.Warn("accept failed; pausing this listener briefly",
			zap.Stringer("listen", ln.addr), zap.Error(err), zap.Uint64("pauses", ln.Paused.Load()))
	}
}
