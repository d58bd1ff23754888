package conn

import (
	"errors"
	"net/netip"

	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/internal/rawsys"
)

// Layer is one layer above the socket: raw bytes today, TLS later. Its steps
// may not finish at once (a TLS close_notify can meet a full socket buffer).
type Layer interface {
	// ShutW ends the layer's write side. It returns nil when done, unix.EAGAIN
	// when it must be called again once the fd is writable, any other error
	// when the layer failed (the caller then closes).
	ShutW(c *Conn) error
	// Close releases the layer's state. Same return convention as ShutW.
	Close(c *Conn) error
}

// Raw is the plain data layer: bytes go straight to the socket.
type Raw struct{}

func (Raw) ShutW(*Conn) error { return nil }
func (Raw) Close(*Conn) error { return nil }

var _ Layer = Raw{}

// Conn is one file descriptor with its layer state. The zero value is unused;
// call Init. A Conn is embedded in its owner (a session) to keep an idle
// session to a single allocation.
type Conn struct {
	fd    int32
	flags Flags
	data  Layer // nil means Raw

	// Src and Dst are the conn's addresses: for an accepted conn the client and
	// the local listen address (replaced by a PROXY header's, later); for a
	// dialed conn the backend in Dst (the engine leaves Src unset: nothing
	// reads it, and getsockname per connection is not free).
	Src, Dst netip.AddrPort
}

// Init takes ownership of fd, an open non-blocking socket. data may be nil for
// the raw layer. connected tells whether the socket is already connected
// (accepted) or still connecting (dialed).
func (c *Conn) Init(fd int, data Layer, connected bool) {
	*c = Conn{fd: int32(fd), data: data, flags: FDAlloc | CtrlInit | DataInit}
	if connected {
		c.flags |= CtrlConnected | DataConnected
	}
}

// FD returns the file descriptor, or -1 once closed.
func (c *Conn) FD() int {
	if c.flags&FDAlloc == 0 {
		return -1
	}
	return int(c.fd)
}

func (c *Conn) Flags() Flags     { return c.flags }
func (c *Conn) Set(f Flags)      { c.flags |= f }
func (c *Conn) Clear(f Flags)    { c.flags &^= f }
func (c *Conn) Has(f Flags) bool { return c.flags&f == f }

// Op returns the state of the multi-step operation whose mask is op.
func (c *Conn) Op(op Flags) Step { return Step((c.flags & op) >> shift(op)) }

// SetOp sets the state of the multi-step operation whose mask is op.
func (c *Conn) SetOp(op Flags, s Step) {
	c.flags = c.flags&^op | Flags(s)<<shift(op)&op
}

// Connected marks an outgoing connect as complete on both layers.
func (c *Conn) Connected() { c.flags |= CtrlConnected | DataConnected }

// Plain reports whether the conn has no data layer above the socket: its
// write side ends with shutdown(2) or close(2) alone.
func (c *Conn) Plain() bool { return c.data == nil }

func (c *Conn) layer() Layer {
	if c.data == nil {
		return Raw{}
	}
	return c.data
}

// ShutW runs the write-shutdown sequence: data layer, then CTRL (shutdown(2)),
// then the FD step (the owner stops polling for output). Each step that
// completes is recorded, so a call after unix.EAGAIN resumes where it stopped.
//
// It returns nil when the whole sequence is done (or was already), unix.EAGAIN
// when a step must be retried once the fd is writable, or the error that made
// the conn fail (CtrlFailed or DataFailed is then set).
func (c *Conn) ShutW() error {
	if c.flags&FDAlloc == 0 {
		return errClosed
	}
	if c.flags&DataShutW == 0 {
		if err := c.layer().ShutW(c); err != nil {
			if err != unix.EAGAIN {
				c.flags |= DataFailed
			}
			return err
		}
		c.flags |= DataShutW
	}
	if c.flags&CtrlShutW == 0 {
		if err := rawsys.Shutdown(int(c.fd), unix.SHUT_WR); err != nil && err != unix.ENOTCONN {
			c.flags |= CtrlFailed
			return err
		}
		c.flags |= CtrlShutW
	}
	c.flags |= FDShutW
	return nil
}

var errClosed = errors.New("conn: closed")

// Close runs the close sequence: data layer, CTRL (with abort, SO_LINGER 0 so
// the peer gets a reset rather than a clean end), then close(2) of the fd. The
// owner must have removed the fd from its poller's table first: the number is
// free for reuse the moment close(2) returns.
//
// It returns nil when the fd is closed (or was already), unix.EAGAIN when the
// data layer must be called again; any other error of the data layer is
// recorded and the fd is closed anyway.
func (c *Conn) Close(abort bool) error {
	if c.flags&FDAlloc == 0 {
		return nil
	}
	if err := c.layer().Close(c); err != nil {
		if err == unix.EAGAIN {
			return err
		}
		c.flags |= DataFailed
	}
	if abort {
		// Errors are ignored: the socket may already be reset, and close(2)
		// follows regardless.
		_ = rawsys.LingerZero(int(c.fd))
	}
	_ = rawsys.Close(int(c.fd))
	c.flags = c.flags&^FDAlloc | Closed
	return nil
}
