package handshake

import (
	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/internal/rawsys"
	"github.com/sluice-proxy/sluice/rules"
)

// Health replies. A probe gets its reply at once, without its request being
// parsed (HAProxy's "mode health" does the same): balancers only look at the
// status line or the first bytes.
var (
	httpUp   = []byte("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nOK\n")
	httpDown = []byte("HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: close\r\n\r\nDOWN\n")
	tcpUp    = []byte("OK\n")
	tcpDown  = []byte("DOWN\n")
)

// maxDrain bounds what a health conn reads (and drops) after its reply while
// it waits for the client to close.
const maxDrain = 64 << 10

// health writes the last chunk of a probe's answer, shuts the write side, and
// reads until the client closes, so that closing never resets a reply the
// client has not read yet. A rule with no target answers every conn (always).
type health struct {
	always   bool
	up, down []byte
	c        *Counters
}

var _ Handler = (*health)(nil)

// newHealth returns the health step of r, or nil when r has no health=.
func newHealth(r *rules.Rule, p *Policy) Handler {
	if r.Health == rules.HealthNone {
		return nil
	}
	h := &health{always: len(r.Targets) == 0, up: tcpUp, down: tcpDown, c: &p.C}
	if r.Health == rules.HealthHTTP {
		h.up, h.down = httpUp, httpDown
	}
	return h
}

func (h *health) Handshake(st *State) (Result, conn.Code) {
	if !h.always && st.flags&Health == 0 {
		return Done, conn.CodeNone
	}
	st.flags |= Health
	fd := st.In.FD()
	if st.flags&Replied == 0 {
		if st.out == nil {
			st.out = h.up
			if st.flags&Failing != 0 {
				st.out = h.down
				h.c.HealthDown.Add(1)
			} else {
				h.c.HealthUp.Add(1)
			}
		}
		if r, code := st.flush(fd, conn.CodeClientReset); r != Done {
			return r, code
		}
		_ = st.In.ShutW() // a failure here means the client is gone; the drain below sees it
		st.flags |= Replied
		st.out, st.off = nil, 0
	}
	for st.off < maxDrain {
		n, err := rawsys.Recv(fd, st.peek[:], 0)
		switch {
		case err == nil && n > 0:
			st.off += uint32(n)
		case err == nil:
			return Close, conn.CodeHealth // the client closed: served
		case err == unix.EAGAIN:
			return WantRead, conn.CodeNone
		default:
			return Close, conn.CodeHealth // a reset after the reply is a client's way to close
		}
	}
	return Close, conn.CodeHealth
}
