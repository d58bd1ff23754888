package engine

import (
	"net/netip"
	"strconv"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/channel"
	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/handshake"
	"github.com/sluice-proxy/sluice/internal/bitnames"
	"github.com/sluice-proxy/sluice/internal/rawsys"
	"github.com/sluice-proxy/sluice/rules"
)

// Defaults for a rule's timeouts left at zero.
const (
	DefaultConnectTimeout = 5 * time.Second
	DefaultIdleTimeout    = 10 * time.Minute // as nginx's proxy_timeout
)

type sessionState uint8

const (
	stHandshake  sessionState = iota // the incoming chain runs (monitor, health, accept-proxy, rules)
	stConnecting                     // backend connect in flight; channels not set up
	stSendProxy                      // backend connected; the outgoing chain (send-proxy) writes
	stForwarding                     // both conns up; channels pumping; no handshake state held
	stClosed                         // fds closed; the struct waits for the GC or for reuse (recycle)
	stWaitFd                         // out of fds for the backend socket: parked on the loop's fdWait list
	stDraining                       // one side failed and is closed; the other gets what sluice holds for it, then a reset
	stTLSAccept                      // the client's TLS handshake runs on its goroutine (tls.go); the loop ignores the conn's events
	stTLSConnect                     // the backend's TLS handshake (tls.backend) runs on its goroutine
)

var stateNames = [...]string{"handshake", "connecting", "send-proxy", "forwarding", "closed", "wait-fd", "draining", "tls-accept", "tls-connect"}

func (s sessionState) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return "state-" + strconv.Itoa(int(s))
}

// sessionFlags is what a session remembers past its handshake (the shared
// counts it must give back when it ends) and, until forwarding starts, what
// the events on its conns said.
type sessionFlags uint16

const (
	sfMaxConn   sessionFlags = 0x01 // holds one of the rule's maxconn slots
	sfBackend   sessionFlags = 0x02 // counted on backend s.backend of the pool (leastconn)
	sfPassed    sessionFlags = 0x04 // passed the incoming chain (logged at info when it ends)
	sfConnected sessionFlags = 0x08 // the backend connected (connUs is set)
	sfGate      sessionFlags = 0x10 // the client's first bytes must still pass the policy's gate (Policy.Gated)

	// Before forwarding, what the events on each conn said (see Channel.Prime).
	sfCliIn  sessionFlags = 0x20  // a readable event on the client
	sfCliHup sessionFlags = 0x40  // an event on the client with RDHUP, HUP or ERR
	sfSrvIn  sessionFlags = 0x80  // a readable event on the backend conn
	sfSrvHup sessionFlags = 0x100 // an event on the backend conn with RDHUP, HUP or ERR

	sfParked sessionFlags = 0x200  // waited for an fd on this dial: on l.fdWait until it dials, its timer the first connect deadline
	sfHeld   sessionFlags = 0x400  // the gate holds a strict prefix of a PROXY signature: the timer bounds the wait (sfGate)
	sfAgain  sessionFlags = 0x800  // a pump yielded on its budget: on l.again, to pump after the batch
	sfTLS    sessionFlags = 0x1000 // a TLS handshake was started: its goroutine may still post to the session, which is never reused (recycle)
	sfDstAny sessionFlags = 0x2000 // cli.Dst is the wildcard listener's address: getsockname deferred until something needs the real one (localAddr)
)

var sessionFlagNames = [...]bitnames.Name[sessionFlags]{{Bit: sfMaxConn, Name: "MAXCONN"}, {Bit: sfBackend, Name: "BACKEND"},
	{Bit: sfPassed, Name: "PASSED"}, {Bit: sfConnected, Name: "CONNECTED"}, {Bit: sfGate, Name: "GATE"},
	{Bit: sfCliIn, Name: "CLI_IN"}, {Bit: sfCliHup, Name: "CLI_HUP"}, {Bit: sfSrvIn, Name: "SRV_IN"}, {Bit: sfSrvHup, Name: "SRV_HUP"},
	{Bit: sfParked, Name: "PARKED"}, {Bit: sfHeld, Name: "HELD"}, {Bit: sfAgain, Name: "AGAIN"}, {Bit: sfTLS, Name: "TLS"}, {Bit: sfDstAny, Name: "DST_ANY"}}

const allSessionFlags sessionFlags = 0x3fff

func (f sessionFlags) String() string { return bitnames.Format(f, sessionFlagNames[:]) }

// session is a client conn, its backend conn and the two channels between
// them. It is one allocation, owned by one loop. Both fds route their events
// to it through the loop's table.
//
// The handshake (the chains' per-conn state, peek buffer included) is a
// separate pooled State in hs, given back when forwarding starts: an
// established idle session is this struct alone (TestSessionSize bounds it).
type session struct {
	cli, srv conn.Conn
	up, down channel.Channel // up: client to backend; down: backend to client
	tmr      timer           // handshake timeout, then connect timeout, then idle timeout
	ln       *Listener
	hs       *handshake.State // nil once forwarding
	start    int64            // loop clock at accept
	active   int64            // loop clock of the last byte moved
	state    sessionState
	flags    sessionFlags
	backend  uint8       // index in the pool of the backend in use
	first    uint8       // index in the pool of the backend the session step chose first
	hsUs     uint32      // µs from start to the end of the incoming chain (sfPassed)
	connUs   uint32      // µs from start to the backend connected (sfConnected)
	ext      *sessionExt // what few sessions carry (PROXY'd, routed by name); nil: none
	tried    uint64      // bit i: backend i of the pool was dialled (dial)
}

// sessionExt is what only some sessions have: one pointer in every session,
// allocated for a session that needs it, so a plain session does not grow
// (a recycled struct keeps its own, zeroed: see recycle).
type sessionExt struct {
	orig      netip.AddrPort // the client's own address when a PROXY header replaced it; zero: none
	sni, alpn string         // what the hello said, for a routed session (handshake.State.Seen)
	tls       *sessionTLS    // a session with a TLS side (tls.go); nil: plain
}

// extra returns the session's sessionExt, allocated on first use.
func (s *session) extra() *sessionExt {
	if s.ext == nil {
		s.ext = new(sessionExt)
	}
	return s.ext
}

// origSrc returns the client's own address when a PROXY header replaced it,
// else the zero AddrPort.
func (s *session) origSrc() netip.AddrPort {
	if s.ext == nil {
		return netip.AddrPort{}
	}
	return s.ext.orig
}

// seen returns the hello's server name and ALPN protocol of a routed
// session ("" when none).
func (s *session) seen() (sni, alpn string) {
	if s.ext == nil {
		return "", ""
	}
	return s.ext.sni, s.ext.alpn
}

var _ handler = (*session)(nil)
var _ expirer = (*session)(nil)

func (s *session) expire(l *Loop) {
	switch s.state {
	case stHandshake:
		code := s.ln.policy.Expired(s.hs)
		s.finish(l, code, code != conn.CodeHealth)
	case stConnecting:
		s.connectFailed(l, conn.CodeConnectTimeout)
	case stWaitFd:
		// No fd freed up within timeout.connect.
		s.finish(l, conn.CodeResource, true)
	case stSendProxy:
		// The backend accepted but took no header within timeout.connect.
		if s.ln.pool.Failed(int(s.backend), l.now) {
			l.healthChanged(s.ln, int(s.backend), false)
		}
		s.finish(l, conn.CodeConnectTimeout, true)
	case stDraining:
		s.drain(l)
	case stTLSAccept:
		l.e.tlsc.failed.Add(1)
		s.ln.policy.Refuse(conn.CodeHandshakeTimeout)
		s.finish(l, conn.CodeHandshakeTimeout, true)
	case stTLSConnect:
		s.finish(l, conn.CodeConnectTimeout, true)
	case stForwarding:
		deadline := s.active + int64(s.idleTimeout())
		if s.flags&sfHeld != 0 && l.now < deadline {
			// The gate's bound: the client sent a strict prefix of a
			// signature and neither finished it nor ended its input.
			s.finish(l, s.ln.policy.GateExpired(), true)
			return
		}
		if l.now < deadline {
			l.wheel.add(&s.tmr, (deadline+int64(tick)-1)/int64(tick))
			return
		}
		s.resetQueued()
		s.finish(l, conn.CodeIdleTimeout, false)
	}
}

// resetQueued makes the close of each of the session's sockets whose peer
// left bytes unacknowledged in its send queue (SIOCOUTQ) a reset: after
// timeout.idle the peer is not reading, and a plain close would leave an
// orphan socket holding the queue while it probes a zero window.
func (s *session) resetQueued() {
	for _, c := range [...]*conn.Conn{&s.cli, &s.srv} {
		if fd := c.FD(); fd >= 0 {
			if q, err := unix.IoctlGetInt(fd, unix.SIOCOUTQ); err == nil && q > 0 {
				_ = rawsys.LingerZero(fd)
			}
		}
	}
}

// clientGone ends a session whose client reset before its backend was
// connected, unless the client's socket still holds bytes it sent
// (SIOCINQ): those are owed to the backend, so the session waits for its
// connect (timeout.connect still bounds it), forwards them and then passes
// the reset on, as a reset while forwarding does. The events are recorded
// (sfCliIn, sfCliHup) for the channels.
func (s *session) clientGone(l *Loop) {
	if heldBytes(s.cli.FD()) {
		return
	}
	s.finish(l, conn.CodeClientReset, true)
}

// heldBytes reports whether socket fd has received bytes not yet read
// (SIOCINQ), which a reset that followed them does not take back.
func heldBytes(fd int) bool {
	q, err := unix.IoctlGetInt(fd, unix.SIOCINQ)
	return err == nil && q > 0
}

func (s *session) idleTimeout() time.Duration {
	if d := s.ln.rule.IdleTimeout; d > 0 {
		return d
	}
	return DefaultIdleTimeout
}

func (s *session) connectTimeout() time.Duration {
	if d := s.ln.rule.ConnectTimeout; d > 0 {
		return d
	}
	return DefaultConnectTimeout
}

// newSession takes an accepted fd and starts the session: the client conn
// registered on l and its incoming handshake chain run, bounded by the
// rule's timeout.handshake.
func newSession(l *Loop, ln *Listener, fd int, src netip.AddrPort) {
	s := l.newSessionStruct()
	x := s.ext // a recycled struct's, kept for the next session needing one (recycle)
	*s = session{ln: ln, start: l.now, active: l.now}
	if x != nil {
		*x = sessionExt{}
		s.ext = x
	}
	s.tmr.owner = s
	s.cli.Init(fd, nil, true)
	s.cli.Src = src
	s.cli.Dst = ln.addr
	if ln.addr.Addr().IsUnspecified() {
		// A wildcard listener: the address the client reached is what a
		// PROXY header sent onwards must carry, and what the access log
		// shows; a rule without send-proxy asks for it only when the log
		// line is written (localAddr), one system call fewer per
		// connection when nobody reads it.
		s.flags |= sfDstAny
		if ln.rule.SendProxy != rules.ProxyNone {
			s.localAddr()
		}
	}
	// TCP_NODELAY came with the accept: listenSocket set it on the listener.
	if err := l.register(fd, sessionEvents, s); err != nil {
		l.log.Warn("register client", zap.Int("fd", fd), zap.Error(err))
		s.cli.Close(true)
		return
	}
	l.sessions++
	l.e.active.Add(1)
	ln.ctr.begin(l)
	l.e.handshaking.Add(1)
	pol := ln.policy
	s.hs = handshake.Get(&s.cli, &s.srv)
	pol.Begin(s.hs)
	if pol.HasHealth() && (l.e.draining.Load() || ln.pool.AllDown(l.now)) {
		s.hs.Set(handshake.Failing)
	}
	s.state = stHandshake
	l.arm(&s.tmr, pol.Timeout())
	s.handshake(l)
}

// handshake runs the incoming chain; once it is done, the session step.
func (s *session) handshake(l *Loop) {
	s.hs.Now = l.now
	src := s.cli.Src
	r, code := s.ln.policy.RunIn(s.hs)
	s.keepOrig(src)
	switch r {
	case handshake.Done:
		s.sessionStep(l)
	case handshake.Fail:
		s.finish(l, code, true) // a refused conn is reset: nothing of it lingers
	case handshake.Close:
		s.finish(l, code, false)
	}
	// WantRead, WantWrite: the next event on the client runs it again.
}

// sessionStep is the chain's last handler, the engine's own: it refuses new
// sessions while the daemon drains, picks a backend and dials it.
func (s *session) sessionStep(l *Loop) {
	l.e.handshaking.Add(-1)
	if rts := s.ln.routes; rts != nil {
		// The route the sni stage chose decides the rest: policy (outgoing
		// chain, end counts), pool, target, timeouts, counters.
		if i := s.hs.Route(); i >= 0 && i < len(rts) {
			s.ln.ctr.moveLive(l, rts[i].ctr)
			s.ln = rts[i]
			s.ln.Routed.Add(1)
			s.ln.policy.C.Routed.Add(1)
			s.ln.ctr.routed(s.hs.HelloBytes())
		}
		if sni, alpn := s.hs.Seen(); sni != "" || alpn != "" {
			x := s.extra()
			x.sni, x.alpn = sni, alpn
		}
	}
	if s.hs.Has(handshake.Drained) {
		// The hello's read emptied the socket: forwarding need not read
		// it before its next event (which sets sfCliIn again).
		s.flags &^= sfCliIn
	}
	s.flags |= sfPassed
	s.hsUs = sinceUs(l.now, s.start)
	if s.hs.Has(handshake.MaxConn) {
		s.flags |= sfMaxConn
	}
	if s.ln.policy.Terminates() && !l.e.draining.Load() {
		s.tlsAccept(l) // then pickBackend
		return
	}
	s.pickBackend(l)
}

// pickBackend is the rest of the session step, once the client is through
// (a terminating route's TLS handshake included): draining, the pool's
// state, the backend's choice and dial.
func (s *session) pickBackend(l *Loop) {
	s.state = stConnecting // the handshake is over, whatever happens next
	if l.e.draining.Load() {
		s.ln.policy.Refuse(conn.CodeStopping)
		s.finish(l, conn.CodeStopping, false)
		return
	}
	if s.ln.pool.NoBackend() {
		// Every backend is down by its checks: closed at once, no connect.
		s.ln.policy.Refuse(conn.CodeNoBackend)
		s.finish(l, conn.CodeNoBackend, false)
		return
	}
	if s.ln.pool.Len() == 0 {
		// A health-only rule answers every conn itself; nothing reaches here.
		s.ln.policy.Refuse(conn.CodeConnectRefused)
		s.finish(l, conn.CodeConnectRefused, false)
		return
	}
	s.first = uint8(s.ln.pool.Start(s.cli.Src.Addr(), l.now))
	s.dial(l, conn.CodeConnectRefused)
}

// dial starts a non-blocking connect to the next backend of the pool not yet
// tried (up ones first). When none is left the session ends with code, the
// reason the last one failed. On return the session is connecting, sending
// its PROXY header, forwarding, or finished.
func (s *session) dial(l *Loop, code conn.Code) {
	pool := s.ln.pool
	for {
		i := pool.Next(int(s.first), s.tried, l.now)
		if i < 0 {
			break
		}
		if s.tried != 0 {
			s.ln.ctr.retry()
		}
		s.tried |= 1 << i
		target := pool.Target(i)
		fd, err := s.ln.targetPif.socket(family(target.Addr()), unix.SOCK_STREAM)
		if err != nil {
			if outOfFds(err) {
				// Keep the client: the session waits, parked, until a
				// session of this loop frees an fd (or timeout.connect),
				// and the listener stops accepting clients it could not
				// serve either. A session fdFreed retried is still
				// parked: it keeps its place, its deadline and its one
				// count.
				s.tried &^= 1 << i
				s.state = stWaitFd
				if s.flags&sfParked != 0 {
					return
				}
				s.flags |= sfParked
				l.fdWait = append(l.fdWait, s)
				l.arm(&s.tmr, s.connectTimeout())
				s.ln.Paused.Add(1)
				l.pauseListener(s.ln)
				s.ln.warnOnce(l, err)
				return
			}
			s.finish(l, conn.CodeResource, true)
			return
		}
		_ = rawsys.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
		setSockBuf(fd, s.ln.rule.SockBuf) // before connect: the window it offers follows
		err = rawsys.Connect(fd, target)
		if err != nil && err != unix.EINPROGRESS {
			rawsys.Close(fd)
			l.connectError(s.ln)
			if pool.Failed(i, l.now) {
				l.healthChanged(s.ln, i, false)
			}
			continue // refused at once (or unreachable): next backend
		}
		s.srv.Init(fd, nil, false)
		s.srv.Dst = target
		s.flags &^= sfSrvIn | sfSrvHup // of a backend conn given up
		s.backend = uint8(i)
		s.flags |= sfBackend
		pool.Acquire(i)
		if rerr := l.register(fd, sessionEvents, s); rerr != nil {
			s.srv.Close(true)
			s.finish(l, conn.CodeResource, true)
			return
		}
		// A session that waited for this fd connects within what is left
		// of the deadline it got when it parked.
		parked := s.flags&sfParked != 0
		s.unpark(l)
		if err == nil {
			s.established(l)
			return
		}
		s.state = stConnecting
		if !parked {
			l.arm(&s.tmr, s.connectTimeout())
		}
		return
	}
	s.finish(l, code, false)
}

// unpark takes s off the loop's list of sessions waiting for an fd, if it
// is on it.
func (s *session) unpark(l *Loop) {
	if s.flags&sfParked != 0 {
		s.flags &^= sfParked
		l.unpark(s)
	}
}

// connectFailed drops the backend conn in flight, marks its backend down and
// tries the next one.
func (s *session) connectFailed(l *Loop, code conn.Code) {
	l.connectError(s.ln)
	if s.ln.pool.Failed(int(s.backend), l.now) {
		l.healthChanged(s.ln, int(s.backend), false)
	}
	s.ln.pool.Release(int(s.backend))
	s.flags &^= sfBackend
	if fd := s.srv.FD(); fd >= 0 {
		l.forget(fd)
		s.srv.Close(true)
	}
	s.dial(l, code)
}

// established runs once the backend is connected: the outgoing chain if the
// rule has one, then forwarding.
func (s *session) established(l *Loop) {
	s.srv.Connected()
	s.flags |= sfConnected
	s.connUs = sinceUs(l.now, s.start)
	if s.ln.pool.Connected(int(s.backend)) {
		l.healthChanged(s.ln, int(s.backend), true)
	}
	if s.ln.policy.HasOut() {
		s.state = stSendProxy
		l.arm(&s.tmr, s.connectTimeout())
		s.sendProxy(l)
		return
	}
	s.outDone(l)
}

// outDone runs once the outgoing chain wrote what it had: the backend's
// TLS handshake (tls.backend), else forwarding.
func (s *session) outDone(l *Loop) {
	if s.ln.policy.Originates() {
		s.tlsConnect(l)
		return
	}
	s.forward(l)
}

// sendProxy runs the outgoing chain: the PROXY header before any payload.
func (s *session) sendProxy(l *Loop) {
	s.hs.Now = l.now
	switch r, code := s.ln.policy.RunOut(s.hs); r {
	case handshake.Done:
		s.outDone(l)
	case handshake.Fail:
		s.finish(l, code, true)
	}
	// WantWrite: the backend's next writable event runs it again.
}

// forward gives the handshake state back and starts the channels.
func (s *session) forward(l *Loop) {
	if s.ln.policy.Gated(s.hs) {
		s.flags |= sfGate
	}
	handshake.Put(s.hs)
	s.hs = nil
	if s.cli.Plain() && s.srv.Plain() {
		mode := s.ln.rule.Splice
		s.up.Init(s.cli.FD(), s.srv.FD(), mode)
		s.down.Init(s.srv.FD(), s.cli.FD(), mode)
	} else {
		s.initTLSChannels()
	}
	s.up.Prime(s.flags&sfCliIn != 0, s.flags&sfCliHup != 0)
	s.down.Prime(s.flags&sfSrvIn != 0, s.flags&sfSrvHup != 0)
	s.state = stForwarding
	s.active = l.now
	l.arm(&s.tmr, s.idleTimeout())
	l.sessionEvent(s, "start", 0)
	s.pump(l)
}

// readable hands a readable event of its input to ch: RDHUP alone is the
// peer's FIN (channel.ReadableFin), any HUP or ERR a hang-up to read on to.
func readable(ch *channel.Channel, ev uint32) {
	switch {
	case ev&(unix.EPOLLHUP|unix.EPOLLERR) != 0:
		ch.Readable(true)
	case ev&unix.EPOLLRDHUP != 0:
		ch.ReadableFin()
	default:
		ch.Readable(false)
	}
}

func (s *session) handle(l *Loop, fd int, ev uint32) {
	const hup = unix.EPOLLRDHUP | unix.EPOLLHUP | unix.EPOLLERR
	if s.state != stForwarding {
		// Edge-triggered: remember what this event said for the channels.
		in, hupped := sfCliIn, sfCliHup
		if fd != s.cli.FD() {
			in, hupped = sfSrvIn, sfSrvHup
		}
		if ev&(unix.EPOLLIN|hup) != 0 {
			s.flags |= in
		}
		if ev&hup != 0 {
			s.flags |= hupped
		}
	}
	switch s.state {
	case stHandshake:
		if fd != s.cli.FD() {
			return
		}
		if ev&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
			s.hs.Set(handshake.PeerClosed)
		}
		s.handshake(l)
	case stConnecting:
		if fd == s.srv.FD() {
			if ev&(unix.EPOLLOUT|unix.EPOLLERR|unix.EPOLLHUP) == 0 {
				return
			}
			// Writable without an error or hang-up: connected; only a
			// failure needs SO_ERROR to say which.
			soerr, err := 0, error(nil)
			if ev&(unix.EPOLLERR|unix.EPOLLHUP) != 0 && !heldBytes(fd) {
				soerr, err = rawsys.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
			}
			// Bytes to read mean the connect had completed: the backend
			// accepted, sent, then reset before this loop saw the connect
			// end. The session is established with the error left in the
			// socket (SO_ERROR would clear it): the channel reads the bytes,
			// then the reset, and ends as a server reset once they reached
			// the client.
			if err == nil && soerr == 0 {
				l.wheel.del(&s.tmr)
				s.established(l)
				return
			}
			code := conn.CodeConnectError
			if unix.Errno(soerr) == unix.ECONNREFUSED {
				code = conn.CodeConnectRefused
			}
			s.connectFailed(l, code)
		} else if ev&(unix.EPOLLERR|unix.EPOLLHUP) != 0 {
			// The client is gone before its backend answered.
			s.clientGone(l)
		}
	case stWaitFd:
		if ev&(unix.EPOLLERR|unix.EPOLLHUP) != 0 {
			// The client gave up while its session waited for an fd.
			s.finish(l, conn.CodeClientReset, true)
		}
	case stSendProxy:
		if fd == s.srv.FD() {
			if ev&(unix.EPOLLOUT|unix.EPOLLERR|unix.EPOLLHUP) != 0 {
				s.sendProxy(l)
			}
		} else if ev&(unix.EPOLLERR|unix.EPOLLHUP) != 0 {
			s.finish(l, conn.CodeClientReset, true)
		}
	case stDraining:
		// Only the healthy side is still open and polled.
		if ev&(unix.EPOLLOUT|unix.EPOLLERR|unix.EPOLLHUP) != 0 {
			s.drainChannel().Writable()
			s.drain(l)
		}
	case stForwarding:
		const in = unix.EPOLLIN | hup
		const out = unix.EPOLLOUT | unix.EPOLLHUP | unix.EPOLLERR
		if fd == s.cli.FD() {
			if ev&in != 0 {
				readable(&s.up, ev)
			}
			if ev&out != 0 {
				s.down.Writable()
			}
		} else {
			if ev&in != 0 {
				readable(&s.down, ev)
			}
			if ev&out != 0 {
				s.up.Writable()
			}
		}
		s.pump(l)
	}
}

// pump moves bytes both ways, each at most about the loop's budget (a
// direction that stopped on it puts the session on the loop's again list),
// turns an ended input into a shut output once drained, and ends the
// session when both directions are done or one failed.
func (s *session) pump(l *Loop) {
	upOK := s.flags&sfGate == 0 || s.gate(l)
	if s.state != stForwarding {
		return // refused by the gate
	}
	spliced := s.up.Spliced + s.down.Spliced
	up := 0
	if upOK {
		up = s.up.Pump(l.pools, l.budget)
	}
	if down := s.down.Pump(l.pools, l.budget); up+down > 0 {
		s.active = l.now
		s.ln.ctr.moved(l, up, down, s.up.Spliced+s.down.Spliced-spliced)
	}
	if s.up.Failed() || s.down.Failed() {
		s.failed(l)
		return
	}
	if s.up.WantShutOut() {
		s.shutOut(l, &s.srv, &s.up, &s.down)
	}
	if s.down.WantShutOut() {
		s.shutOut(l, &s.cli, &s.down, &s.up)
	}
	if s.up.Done() && s.down.Done() && s.state == stForwarding {
		s.finish(l, conn.CodeDone, false)
	}
	if s.state == stForwarding && (s.up.Yielded() || s.down.Yielded()) {
		l.requeue(s)
	}
}

// gate runs the policy's gate on the client (the first-bytes check of a
// source accept-proxy did not trust) before any of its bytes is forwarded;
// the backend's bytes flow meanwhile.
//
// It returns true once the client's bytes may flow (and clears sfGate),
// false while they must wait, or when the gate refused the conn and the
// session is finished. Held bytes wait at most timeout.handshake (or
// timeout.idle if shorter) from when the gate first held them (sfHeld).
func (s *session) gate(l *Loop) bool {
	switch r, code := s.ln.policy.RunGate(&s.cli, s.up.HupSeen()); r {
	case handshake.Done:
		s.flags &^= sfGate | sfHeld
		return true
	case handshake.Fail:
		s.finish(l, code, true)
	case handshake.WantRead:
		if code != conn.CodeNone && s.flags&sfHeld == 0 {
			s.flags |= sfHeld
			l.arm(&s.tmr, min(s.ln.policy.Timeout(), s.idleTimeout()))
		}
	}
	return false
}

// shutOut propagates an ended input to the other side as shutdown(SHUT_WR).
//
// When the other direction is already done, the session ends right after:
// both inputs were read to their end, so close(2) sends the FIN itself and
// the shutdown(2) is skipped (one system call less per connection).
func (s *session) shutOut(l *Loop, c *conn.Conn, ch, other *channel.Channel) {
	if other.Done() && c.Plain() {
		ch.SetShutOut()
		return
	}
	switch err := c.ShutW(); err {
	case nil:
		ch.SetShutOut()
	case unix.EAGAIN:
		// A layer above raw could not finish yet; the next writable event
		// pumps again and retries.
	default:
		code := conn.CodeServerReset
		if c == &s.cli {
			code = conn.CodeClientReset
		}
		s.finish(l, code, true)
	}
}

// failed ends a session one side of which failed (a reset, a write error):
// that side is closed with a reset at once, and the healthy side first gets
// what it was already given or sluice holds for it (drain), then a reset, so
// the abnormal end still reaches it. The direction towards the failed side is
// dropped: nobody is left to take it.
func (s *session) failed(l *Loop) {
	bad := &s.srv
	if s.failCode() == conn.CodeClientReset {
		bad = &s.cli
	}
	if s.drainChannel().Flags()&channel.ErrOut != 0 {
		// Both sides failed: nothing can be delivered.
		s.finish(l, s.failCode(), true)
		return
	}
	l.forget(bad.FD())
	bad.Close(true)
	s.state = stDraining
	s.drain(l)
}

// drainChannel is, once a side failed, the channel towards the healthy side.
func (s *session) drainChannel() *channel.Channel {
	if s.cli.FD() < 0 || s.failCode() == conn.CodeClientReset {
		return &s.up
	}
	return &s.down
}

// drain writes what the channel holds to the healthy side, then waits for
// its socket's send queue to empty (SIOCOUTQ, polled on the wheel, less
// often the longer it takes), and ends the session with the reset the
// failed side's code promises. Nothing moving for timeout.idle ends the wait.
func (s *session) drain(l *Loop) {
	code, good, ch := conn.CodeServerReset, &s.cli, &s.down
	if s.cli.FD() < 0 {
		code, good, ch = conn.CodeClientReset, &s.srv, &s.up
	}
	spliced := ch.Spliced
	if n := ch.Flush(l.pools); n > 0 {
		s.active = l.now
		if ch == &s.up {
			s.ln.ctr.moved(l, n, 0, ch.Spliced-spliced)
		} else {
			s.ln.ctr.moved(l, 0, n, ch.Spliced-spliced)
		}
	}
	waited := l.now - s.active
	if ch.Flags()&channel.ErrOut != 0 || waited >= int64(s.idleTimeout()) {
		s.finish(l, code, true)
		return
	}
	if ch.Held() > 0 {
		l.arm(&s.tmr, s.idleTimeout()-time.Duration(waited)) // the writable event comes first
		return
	}
	if q, err := unix.IoctlGetInt(good.FD(), unix.SIOCOUTQ); err != nil || q == 0 {
		s.finish(l, code, true)
		return
	}
	l.arm(&s.tmr, min(max(time.Duration(waited)/8, tick), time.Second))
}

// failCode says who failed: a read error on a side or a write error to it.
func (s *session) failCode() conn.Code {
	if s.up.Flags()&channel.ErrIn != 0 || s.down.Flags()&channel.ErrOut != 0 {
		return conn.CodeClientReset
	}
	return conn.CodeServerReset
}

// finish closes both conns (abort: with a reset), returns the channels'
// buffers and pipes, the handshake state and the shared counts it holds, and
// counts and logs the session (logEnd, in access.go). Safe to call once per
// session; later calls do nothing.
func (s *session) finish(l *Loop, code conn.Code, abort bool) {
	if s.state == stClosed {
		return
	}
	forwarding := s.state == stForwarding || s.state == stDraining
	term := s.term(code)
	if s.state == stHandshake {
		l.e.handshaking.Add(-1)
	}

	s.unpark(l)
	s.state = stClosed
	l.wheel.del(&s.tmr)
	if forwarding {
		s.up.Release(l.pools)
		s.down.Release(l.pools)
	}
	if s.hs != nil {
		if s.hs.Has(handshake.MaxConn) {
			s.flags |= sfMaxConn
		}
		handshake.Put(s.hs)
		s.hs = nil
	}
	pol := s.ln.policy
	if s.flags&sfMaxConn != 0 {
		pol.ReleaseSlot()
	}
	if s.flags&sfBackend != 0 {
		s.ln.pool.Release(int(s.backend))
	}
	if s.flags&sfDstAny != 0 && s.cli.FD() >= 0 && l.log.Core().Enabled(s.logLevel()) {
		s.localAddr() // for the access line's dst, before the fd closes
	}
	cliFD := s.cli.FD() // for the access line's id, after the close
	for _, c := range [...]*conn.Conn{&s.cli, &s.srv} {
		if fd := c.FD(); fd >= 0 {
			l.forget(fd)
			c.Close(abort)
		}
	}
	if forwarding {
		l.sessionEvent(s, "end", code)
	}
	l.sessions--
	l.e.active.Add(-1)
	l.e.ended(code)
	pol.Ended(code)
	s.ln.ctr.ended(l, s, term)
	s.logEnd(l, code, term, cliFD)
	if loggedRefusal(code) {
		s.logRefusal(l, code, term)
	}
	l.fdFreed()
	l.recycle(s)
}

// localAddr replaces a wildcard cli.Dst with the address the client
// reached (getsockname), once, unless a PROXY header has replaced it; the
// client fd must still be open.
func (s *session) localAddr() {
	if s.flags&sfDstAny == 0 {
		return
	}
	s.flags &^= sfDstAny
	if s.cli.Dst != s.ln.addr {
		return // a PROXY header said where the client went
	}
	if la, err := rawsys.Getsockname(s.cli.FD()); err == nil {
		s.cli.Dst = la
	}
}

// maxFreeSessions bounds a loop's free list of session structs: enough for
// a burst of short connections, small against the sessions a loop holds.
const maxFreeSessions = 64

// newSessionStruct returns a session struct for newSession to fill: one
// that finished on this loop when there is one, else a new allocation. A
// loop that accepts and ends connections at a steady rate allocates none
// (fewer GC cycles, and each GC cycle preempts the loops).
func (l *Loop) newSessionStruct() *session {
	if n := len(l.free); n > 0 {
		s := l.free[n-1]
		l.free[n-1] = nil
		l.free = l.free[:n-1]
		return s
	}
	return new(session)
}

// recycle keeps a finished session's struct for a later newSession. It is
// called last in finish and the struct is left as it is (stClosed) until
// newSession overwrites it, so what runs after finish in the same event
// still reads a closed session. References that outlive finish make a
// struct unfit: a TLS handshake's goroutine posts to its session (sfTLS),
// and its sessionTLS goes to the GC with it. A sessionExt without one
// (a PROXY'd or routed session's) is only ever read on the loop: it stays
// with the struct and newSession zeroes it for the next session, so a
// routed connection allocates nothing either (BenchmarkAccept/engine-sni);
// a plain session given such a struct carries the zeroed ext, so no more
// exts live than the most routed sessions ever held at once, plus the
// free list's.
// Entries for it left on l.again are harmless: pumpAgain pumps only a
// forwarding session, and a pump too many of a live one moves what is
// there. Events still queued for its fds are dropped by the table's
// generations.
func (l *Loop) recycle(s *session) {
	if (s.ext != nil && s.ext.tls != nil) || s.flags&sfTLS != 0 || len(l.free) >= maxFreeSessions {
		return
	}
	l.free = append(l.free, s)
}
