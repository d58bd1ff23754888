package engine

import (
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/channel"
	"github.com/sluice-proxy/sluice/conn"
)

// Defaults for a rule's timeouts left at zero.
const (
	DefaultConnectTimeout = 5 * time.Second
	DefaultIdleTimeout    = 10 * time.Minute // as nginx's proxy_timeout
)

type sessionState uint8

const (
	stConnecting sessionState = iota // backend connect in flight; channels not set up
	stForwarding                     // both conns up; channels pumping
	stClosed                         // fds closed; waiting for the GC
)

// session is a client conn, its backend conn and the two channels between
// them. It is one allocation, owned by one loop. Both fds route their events
// to it through the loop's table.
type session struct {
	cli, srv conn.Conn
	up, down channel.Channel // up: client to backend; down: backend to client
	tmr      timer           // connect timeout, then idle timeout
	ln       *Listener
	start    int64 // loop clock at accept
	active   int64 // loop clock of the last byte moved
	state    sessionState
	tries    uint8 // backends tried so far
	first    uint8 // index of the first backend tried
}

var _ handler = (*session)(nil)
var _ expirer = (*session)(nil)

func (s *session) expire(l *Loop) {
	switch s.state {
	case stConnecting:
		s.connectFailed(l, conn.CodeConnectTimeout)
	case stForwarding:
		deadline := s.active + int64(s.idleTimeout())
		if l.now < deadline {
			l.wheel.add(&s.tmr, (deadline+int64(tick)-1)/int64(tick))
			return
		}
		s.finish(l, conn.CodeIdleTimeout, false)
	}
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
// registered on l, the first backend dialed.
func newSession(l *Loop, ln *Listener, fd int, sa unix.Sockaddr) {
	s := &session{ln: ln, start: l.now, active: l.now}
	s.tmr.owner = s
	s.cli.Init(fd, nil, true)
	s.cli.Src = addrPort(sa)
	s.cli.Dst = ln.addr
	_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	if err := l.register(fd, sessionEvents, s); err != nil {
		l.log.Warn("register client", zap.Int("fd", fd), zap.Error(err))
		s.cli.Close(true)
		return
	}
	l.sessions++
	l.e.active.Add(1)
	s.first = uint8(ln.pickTarget())
	s.dial(l)
}

// dial starts a non-blocking connect to the next backend of the pool.
// On return the session is connecting, forwarding, or finished.
func (s *session) dial(l *Loop) {
	for int(s.tries) < len(s.ln.targets) {
		target := s.ln.targets[(int(s.first)+int(s.tries))%len(s.ln.targets)]
		s.tries++
		fd, err := s.ln.targetPif.socket(family(target.Addr()), unix.SOCK_STREAM)
		if err != nil {
			s.finish(l, conn.CodeResource, true)
			return
		}
		_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
		err = unix.Connect(fd, sockaddr(target))
		if err != nil && err != unix.EINPROGRESS {
			unix.Close(fd)
			l.e.connectErrors.Add(1)
			continue // refused at once (or unreachable): next backend
		}
		s.srv.Init(fd, nil, false)
		s.srv.Dst = target
		if rerr := l.register(fd, sessionEvents, s); rerr != nil {
			s.srv.Close(true)
			s.finish(l, conn.CodeResource, true)
			return
		}
		if err == nil {
			s.established(l)
			return
		}
		s.state = stConnecting
		l.arm(&s.tmr, s.connectTimeout())
		return
	}
	s.finish(l, conn.CodeConnectRefused, false)
}

// connectFailed drops the backend conn in flight and tries the next backend.
func (s *session) connectFailed(l *Loop, code conn.Code) {
	l.e.connectErrors.Add(1)
	if fd := s.srv.FD(); fd >= 0 {
		l.forget(fd)
		s.srv.Close(true)
	}
	if int(s.tries) < len(s.ln.targets) {
		s.dial(l)
		return
	}
	s.finish(l, code, false)
}

// established sets up the channels once the backend is connected.
func (s *session) established(l *Loop) {
	s.srv.Connected()
	if sa, err := unix.Getsockname(s.srv.FD()); err == nil {
		s.srv.Src = addrPort(sa)
	}
	mode := s.ln.rule.Splice
	s.up.Init(s.cli.FD(), s.srv.FD(), mode)
	s.down.Init(s.srv.FD(), s.cli.FD(), mode)
	s.state = stForwarding
	s.active = l.now
	l.arm(&s.tmr, s.idleTimeout())
	s.pump(l)
}

func (s *session) handle(l *Loop, fd int, ev uint32) {
	switch s.state {
	case stConnecting:
		if fd == s.srv.FD() {
			if ev&(unix.EPOLLOUT|unix.EPOLLERR|unix.EPOLLHUP) == 0 {
				return
			}
			soerr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
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
			s.finish(l, conn.CodeClientReset, true)
		}
	case stForwarding:
		const in = unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLHUP | unix.EPOLLERR
		const out = unix.EPOLLOUT | unix.EPOLLHUP | unix.EPOLLERR
		if fd == s.cli.FD() {
			if ev&in != 0 {
				s.up.Readable()
			}
			if ev&out != 0 {
				s.down.Writable()
			}
		} else {
			if ev&in != 0 {
				s.down.Readable()
			}
			if ev&out != 0 {
				s.up.Writable()
			}
		}
		s.pump(l)
	}
}

// pump moves bytes both ways, turns an ended input into a shut output once
// drained, and ends the session when both directions are done or one failed.
func (s *session) pump(l *Loop) {
	if s.up.Pump(l.pools)+s.down.Pump(l.pools) > 0 {
		s.active = l.now
	}
	if s.up.Failed() || s.down.Failed() {
		s.finish(l, s.failCode(), true)
		return
	}
	if s.up.WantShutOut() {
		s.shutOut(l, &s.srv, &s.up)
	}
	if s.down.WantShutOut() {
		s.shutOut(l, &s.cli, &s.down)
	}
	if s.up.Done() && s.down.Done() && s.state == stForwarding {
		s.finish(l, conn.CodeDone, false)
	}
}

// shutOut propagates an ended input to the other side as shutdown(SHUT_WR).
func (s *session) shutOut(l *Loop, c *conn.Conn, ch *channel.Channel) {
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

// failCode says who failed: a read error on a side or a write error to it.
func (s *session) failCode() conn.Code {
	if s.up.Flags()&channel.ErrIn != 0 || s.down.Flags()&channel.ErrOut != 0 {
		return conn.CodeClientReset
	}
	return conn.CodeServerReset
}

// finish closes both conns (abort: with a reset), returns the channels'
// buffers and pipes, and logs the session. Safe to call once per session;
// later calls do nothing.
func (s *session) finish(l *Loop, code conn.Code, abort bool) {
	if s.state == stClosed {
		return
	}
	forwarding := s.state == stForwarding
	s.state = stClosed
	l.wheel.del(&s.tmr)
	if forwarding {
		s.up.Release(l.pools)
		s.down.Release(l.pools)
	}
	s.cli.SetCode(code)
	for _, c := range [...]*conn.Conn{&s.cli, &s.srv} {
		if fd := c.FD(); fd >= 0 {
			l.forget(fd)
			c.Close(abort)
		}
	}
	l.sessions--
	l.e.active.Add(-1)
	l.e.ended(code)
	if ce := l.log.Check(zap.InfoLevel, "session"); ce != nil {
		ce.Write(
			zap.Stringer("listen", s.ln.addr),
			zap.Stringer("src", s.cli.Src),
			zap.Stringer("target", s.srv.Dst),
			zap.Uint64("bytes_up", s.up.Bytes),
			zap.Uint64("bytes_down", s.down.Bytes),
			zap.Uint64("spliced", s.up.Spliced+s.down.Spliced),
			zap.Duration("duration", time.Duration(l.now-s.start)),
			zap.Stringer("end", code),
			zap.Uint16("code", uint16(code)),
		)
	}
	if len(l.paused) > 0 {
		l.resumeListeners() // an fd was just freed
	}
}

