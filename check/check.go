// Package check is the protocol of one active health check of a backend:
// a non-blocking connect (check=tcp), then for check=http a request written
// and a status line read, on an fd the caller made in the backend's pif and
// polls. It keeps no goroutine and no timer: the engine runs checks on its
// event loops, arms their timeouts and spreads them over the interval
// (Offset), and records results in the backends' balance.Health.
package check

import (
	"net/netip"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/balance"
	"github.com/sluice-proxy/sluice/internal/rawsys"
	"github.com/sluice-proxy/sluice/rules"
)

// Reasons a check failed: static strings, so recording one never allocates.
var (
	ReasonRefused    = "connection refused"
	ReasonReset      = "connection reset"
	ReasonError      = "connect error"
	ReasonTimeout    = "timeout"
	ReasonClosed     = "closed before a status line"
	ReasonBadReply   = "not an HTTP status line"
	ReasonBadStatus  = "status not 2xx or 3xx"
	ReasonNoResource = "out of fds"
)

// Events is the epoll interest of a check's fd: edge-triggered, both ways.
const Events = unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET

// Addr returns the address checks of backend target go to: check.port when
// the rule sets it, else the backend's own port.
func Addr(c rules.Check, target netip.AddrPort) netip.AddrPort {
	if c.Port != 0 {
		return netip.AddrPortFrom(target.Addr(), c.Port)
	}
	return target
}

// Request returns the HTTP check's request for a backend known as host
// ("10.0.0.1:80", or "web:80" for a target given by name): "GET PATH
// HTTP/1.1", Host, Connection: close. The path and the host were validated
// by rules (printable, no blanks), so they go in as they are.
func Request(path, host string) []byte {
	b := make([]byte, 0, 64+len(path)+len(host))
	b = append(b, "GET "...)
	b = append(b, path...)
	b = append(b, " HTTP/1.1\r\nHost: "...)
	b = append(b, host...)
	b = append(b, "\r\nUser-Agent: sluice-check\r\nConnection: close\r\n\r\n"...)
	return b
}

// Offset returns when, within one interval, the k-th of n checks of a rule
// first runs: evenly apart, so thousands of backends of a port range are
// not checked in the same millisecond.
func Offset(k, n int, interval time.Duration) time.Duration {
	if n <= 1 {
		return 0
	}
	return time.Duration(int64(interval) / int64(n) * int64(k%n))
}

type phase uint8

const (
	phaseIdle       phase = iota // no fd
	phaseConnecting              // connect in flight
	phaseWriting                 // http: request being written
	phaseReading                 // http: waiting for the status line
)

var phaseNames = [...]string{"idle", "connecting", "writing", "reading"}

func (p phase) String() string {
	if int(p) < len(phaseNames) {
		return phaseNames[p]
	}
	return "phase-?"
}

// statusLen is what a status line needs to be judged: "HTTP/1.1 200".
const statusLen = 12

// Probe is one check in flight. The zero value is idle; a Probe is reused
// for every check of its backend, so checking allocates nothing.
//
// Return convention of Start and Event: done false means wait for the fd's
// next event (or the timeout); done true means the check is over with res
// (and reason, nil for a success) and the fd is closed: the caller must have
// taken it out of its poll set's table first (Event's caller: before
// calling; see Close).
type Probe struct {
	fd    int
	phase phase
	kind  rules.CheckKind
	req   []byte // http: the request; shared, never written
	sent  int
	buf   [statusLen]byte
	got   int
}

// FD returns the fd of the check in flight, or -1.
func (p *Probe) FD() int {
	if p.phase == phaseIdle {
		return -1
	}
	return p.fd
}

// Start connects fd (a non-blocking stream socket the caller made) to addr
// for a check of kind; req is the http request (nil for tcp).
func (p *Probe) Start(fd int, addr netip.AddrPort, kind rules.CheckKind, req []byte) (done bool, res balance.Result, reason *string) {
	*p = Probe{fd: fd, phase: phaseConnecting, kind: kind, req: req}
	// Checks end with a reset, not a FIN: thousands of checks every few
	// seconds would otherwise fill the table of TIME_WAIT sockets and the
	// ephemeral ports with them.
	_ = rawsys.LingerZero(fd)
	switch err := rawsys.Connect(fd, addr); err {
	case nil:
		return p.connected()
	case unix.EINPROGRESS:
		return false, 0, nil
	default:
		return p.finish(balance.ResultFail, connectReason(err))
	}
}

// Event handles a readiness event ev of the check's fd.
func (p *Probe) Event(ev uint32) (done bool, res balance.Result, reason *string) {
	switch p.phase {
	case phaseConnecting:
		if ev&(unix.EPOLLOUT|unix.EPOLLERR|unix.EPOLLHUP) == 0 {
			return false, 0, nil
		}
		if ev&(unix.EPOLLERR|unix.EPOLLHUP) != 0 {
			soerr, err := rawsys.GetsockoptInt(p.fd, unix.SOL_SOCKET, unix.SO_ERROR)
			if err == nil && soerr != 0 {
				return p.finish(balance.ResultFail, connectReason(unix.Errno(soerr)))
			}
			if err != nil || ev&unix.EPOLLHUP != 0 {
				return p.finish(balance.ResultFail, &ReasonError)
			}
		}
		return p.connected()
	case phaseWriting:
		if ev&(unix.EPOLLERR|unix.EPOLLHUP) != 0 {
			return p.finish(balance.ResultFail, &ReasonReset)
		}
		return p.write()
	case phaseReading:
		return p.read()
	}
	return false, 0, nil
}

// Close ends a check in flight without a result (the timeout, or the check
// was stopped). The caller forgets the fd in its table first.
func (p *Probe) Close() {
	if p.phase != phaseIdle {
		rawsys.Close(p.fd)
		p.phase = phaseIdle
	}
}

func (p *Probe) connected() (bool, balance.Result, *string) {
	if p.kind != rules.CheckHTTP {
		return p.finish(balance.ResultOK, nil)
	}
	p.phase = phaseWriting
	return p.write()
}

func (p *Probe) write() (bool, balance.Result, *string) {
	for p.sent < len(p.req) {
		n, err := rawsys.Write(p.fd, p.req[p.sent:])
		if err == unix.EAGAIN {
			return false, 0, nil
		}
		if err != nil {
			return p.finish(balance.ResultFail, &ReasonReset)
		}
		p.sent += n
	}
	p.phase = phaseReading
	return p.read()
}

// read takes the status line's first bytes; the rest of the reply is never
// read (the reset at close discards it).
func (p *Probe) read() (bool, balance.Result, *string) {
	for p.got < statusLen {
		n, err := rawsys.Read(p.fd, p.buf[p.got:])
		switch {
		case err == unix.EAGAIN:
			return false, 0, nil
		case err != nil:
			return p.finish(balance.ResultFail, &ReasonReset)
		case n == 0:
			if ok, judged := judge(p.buf[:p.got]); judged {
				return p.status(ok)
			}
			return p.finish(balance.ResultFail, &ReasonClosed)
		}
		p.got += n
	}
	ok, judged := judge(p.buf[:p.got])
	if !judged {
		return p.finish(balance.ResultFail, &ReasonBadReply)
	}
	return p.status(ok)
}

func (p *Probe) status(ok bool) (bool, balance.Result, *string) {
	if ok {
		return p.finish(balance.ResultOK, nil)
	}
	return p.finish(balance.ResultFail, &ReasonBadStatus)
}

// judge reads a status line's start, "HTTP/1.x DDD": judged false when b is
// not one, ok when the status is 2xx or 3xx.
func judge(b []byte) (ok, judged bool) {
	if len(b) < statusLen || string(b[:7]) != "HTTP/1." || b[8] != ' ' {
		return false, false
	}
	for _, c := range b[9:12] {
		if c < '0' || c > '9' {
			return false, false
		}
	}
	return b[9] == '2' || b[9] == '3', true
}

func (p *Probe) finish(res balance.Result, reason *string) (bool, balance.Result, *string) {
	p.Close()
	return true, res, reason
}

func connectReason(err error) *string {
	switch err {
	case unix.ECONNREFUSED:
		return &ReasonRefused
	case unix.ECONNRESET:
		return &ReasonReset
	case unix.ETIMEDOUT:
		return &ReasonTimeout
	}
	return &ReasonError
}
