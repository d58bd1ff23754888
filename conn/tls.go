package conn

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/internal/rawsys"
)

// MaxHandshakes bounds the TLS handshakes in progress in the process: each
// runs on a goroutine of its own (crypto/tls's handshake blocks on its
// reads), and beyond the bound a new one is refused (ErrBusy) rather than
// queued. The record layer afterwards runs on the conn's event loop, with
// no goroutine.
const MaxHandshakes = 16384

// ErrBusy is Start's error when MaxHandshakes handshakes are running.
var ErrBusy = errors.New("conn: too many TLS handshakes in progress")

var handshakeSlots = make(chan struct{}, MaxHandshakes)

// HandshakesRunning returns the TLS handshakes in progress.
func HandshakesRunning() int { return len(handshakeSlots) }

// TLS is the TLS data layer of a Conn: a crypto/tls connection on the
// conn's socket. Its handshake (the data layer's accept or connect, the
// conn's OpDataAccept or OpDataConnect) runs on a goroutine (Start) on a
// duplicate of the fd driven by the runtime's poller; once done, the event
// loop owns it and reads and writes through it without blocking (Read,
// Write: rawsys's conventions), the socket's EAGAIN passed up, records the
// socket would not take held in a pending buffer.
//
// Between Start and the done callback the loop touches nothing of it but
// Close (which aborts the handshake).
type TLS struct {
	tc   *tls.Conn
	sock sockIO
	c    *Conn
	op   Flags // OpDataAccept (server) or OpDataConnect (client)

	mu   sync.Mutex // guards file: the handshake goroutine's, which Close aborts
	file *os.File

	// Set by the handshake, read by the loop after the done callback.
	Took    time.Duration
	aborted bool
}

var _ Layer = (*TLS)(nil)

// NewTLSServer returns a server-side layer for c; hello are bytes already
// read from the socket (the sni stage's ClientHello), handed to the
// handshake first. It sets the conn's data layer and OpDataAccept wanted.
func NewTLSServer(c *Conn, cfg *tls.Config, hello []byte) *TLS {
	t := &TLS{c: c, op: OpDataAccept}
	t.sock = sockIO{fd: c.FD(), prefix: append([]byte(nil), hello...)}
	t.tc = tls.Server(&t.sock, cfg)
	c.data = t
	c.SetOp(OpDataAccept, StepWanted)
	return t
}

// NewTLSClient returns a client-side layer for c (a connected backend
// conn). It sets the conn's data layer and OpDataConnect wanted.
func NewTLSClient(c *Conn, cfg *tls.Config) *TLS {
	t := &TLS{c: c, op: OpDataConnect}
	t.sock = sockIO{fd: c.FD()}
	t.tc = tls.Client(&t.sock, cfg)
	c.data = t
	c.SetOp(OpDataConnect, StepWanted)
	return t
}

// TLS returns the conn's TLS data layer, or nil for a raw one.
func (c *Conn) TLS() *TLS {
	t, _ := c.data.(*TLS)
	return t
}

// Start runs the handshake on a goroutine, bounded by deadline, and calls
// done (on that goroutine) when it ends, with nil or why it failed; the
// owner must then call Finish on its loop. It returns ErrBusy, or the dup
// error, without starting anything.
func (t *TLS) Start(deadline time.Time, done func()) error {
	select {
	case handshakeSlots <- struct{}{}:
	default:
		return ErrBusy
	}
	nfd, err := unix.FcntlInt(uintptr(t.c.FD()), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		<-handshakeSlots
		return err
	}
	f := os.NewFile(uintptr(nfd), "tls")
	t.file, t.sock.file = f, f
	t.c.SetOp(t.op, StepStarted)
	go func() {
		start := time.Now()
		_ = f.SetDeadline(deadline)
		err := t.tc.Handshake()
		t.Took = time.Since(start)
		t.mu.Lock()
		t.file = nil
		t.mu.Unlock()
		t.sock.file = nil
		_ = f.Close()
		t.sock.err = err
		<-handshakeSlots
		done()
	}()
	return nil
}

// Finish records the handshake's end on the conn, on its loop after the
// done callback. It returns nil when the handshake succeeded, else its
// error; timedOut tells a deadline from a failure.
func (t *TLS) Finish() (err error, timedOut bool) {
	if err = t.sock.err; err != nil {
		t.c.flags |= DataFailed
		return err, errors.Is(err, os.ErrDeadlineExceeded) && !t.aborted
	}
	t.c.SetOp(t.op, StepDone)
	t.c.flags |= DataConnected
	return nil, false
}

// State returns the TLS connection's state (after a successful handshake).
func (t *TLS) State() tls.ConnectionState { return t.tc.ConnectionState() }

// Read reads plaintext into b, rawsys's way: n > 0; (0, nil) at the end of
// input (the peer's close_notify, or its FIN: DataShutR is set); (0,
// unix.EAGAIN) when the socket has no complete record; another error when
// the layer failed (DataFailed).
func (t *TLS) Read(b []byte) (int, error) {
	n, err := t.tc.Read(b)
	if n > 0 {
		return n, nil
	}
	switch {
	case err == nil:
		return 0, unix.EAGAIN
	case err == errWouldBlock:
		return 0, unix.EAGAIN
	case err == io.EOF || errors.Is(err, io.ErrUnexpectedEOF):
		t.c.flags |= DataShutR
		return 0, nil
	}
	t.c.flags |= DataFailed
	return 0, err
}

// Write encrypts b and writes it, rawsys's way: it returns len(b) once the
// records are written or held; (0, unix.EAGAIN) while records of an earlier
// write are still held (the fd's writable edge is due); another error when
// the layer failed. Write(nil) flushes the held records only.
func (t *TLS) Write(b []byte) (int, error) {
	if err := t.sock.flush(); err != nil {
		return 0, err
	}
	if len(b) == 0 {
		return 0, nil
	}
	n, err := t.tc.Write(b)
	if err != nil {
		t.c.flags |= DataFailed
		return 0, err
	}
	return n, nil
}

// Pending reports whether records are held for the socket.
func (t *TLS) Pending() bool { return len(t.sock.pend) > 0 }

// ShutW sends close_notify (after the records held), Layer's convention.
func (t *TLS) ShutW(*Conn) error {
	if t.c.Op(t.op) != StepDone {
		return nil // no handshake, no alert: the socket's shutdown alone
	}
	if err := t.sock.flush(); err != nil {
		return err
	}
	if err := t.tc.CloseWrite(); err != nil {
		return err
	}
	return t.sock.flush()
}

// Close aborts a handshake in progress and drops the held records. It never
// waits: the handshake goroutine closes its own fd.
func (t *TLS) Close(*Conn) error {
	t.mu.Lock()
	if t.file != nil {
		t.aborted = true
		_ = t.file.SetDeadline(time.Unix(1, 0))
	}
	t.mu.Unlock()
	t.sock.pend = nil
	return nil
}

// errWouldBlock is the socket's EAGAIN as crypto/tls takes it: a temporary
// net.Error, which leaves the connection usable (a partial record stays in
// its input buffer).
var errWouldBlock error = wouldBlock{}

type wouldBlock struct{}

func (wouldBlock) Error() string   { return "would block" }
func (wouldBlock) Timeout() bool   { return true }
func (wouldBlock) Temporary() bool { return true }

// sockIO is the net.Conn crypto/tls runs on: during the handshake the
// duplicated fd's os.File (blocking, on the runtime's poller), afterwards
// the conn's own non-blocking fd. crypto/tls makes a write error permanent,
// so after the handshake Write never fails on a full socket: what the
// socket does not take is held in pend, flushed first by the next call.
type sockIO struct {
	fd     int
	file   *os.File
	prefix []byte // read before the socket (the hello the sni stage read)
	pend   []byte
	err    error // the handshake's result
}

var _ net.Conn = (*sockIO)(nil)

func (s *sockIO) Read(b []byte) (int, error) {
	if len(s.prefix) > 0 {
		n := copy(b, s.prefix)
		s.prefix = s.prefix[n:]
		if len(s.prefix) == 0 {
			s.prefix = nil
		}
		return n, nil
	}
	if s.file != nil {
		return s.file.Read(b)
	}
	n, err := rawsys.Recv(s.fd, b, 0)
	switch {
	case n > 0:
		return n, nil
	case err == nil:
		return 0, io.EOF
	case err == unix.EAGAIN:
		return 0, errWouldBlock
	}
	return 0, err
}

func (s *sockIO) Write(b []byte) (int, error) {
	if s.file != nil {
		return s.file.Write(b)
	}
	total := len(b)
	if len(s.pend) == 0 {
		n, err := rawsys.Send(s.fd, b)
		if err != nil && err != unix.EAGAIN {
			return 0, err
		}
		if n > 0 {
			b = b[n:]
		}
	}
	s.pend = append(s.pend, b...)
	return total, nil
}

// flush writes the held records: nil when none is left, unix.EAGAIN while
// some are, another error when the socket failed.
func (s *sockIO) flush() error {
	for len(s.pend) > 0 {
		n, err := rawsys.Send(s.fd, s.pend)
		if err != nil {
			return err
		}
		s.pend = s.pend[n:]
	}
	s.pend = nil // an idle session holds no buffer
	return nil
}

func (s *sockIO) Close() error { return nil }

func (s *sockIO) LocalAddr() net.Addr  { return sockAddr{} }
func (s *sockIO) RemoteAddr() net.Addr { return sockAddr{} }

func (s *sockIO) SetDeadline(t time.Time) error {
	if s.file != nil {
		return s.file.SetDeadline(t)
	}
	return nil
}
func (s *sockIO) SetReadDeadline(t time.Time) error {
	if s.file != nil {
		return s.file.SetReadDeadline(t)
	}
	return nil
}
func (s *sockIO) SetWriteDeadline(t time.Time) error {
	if s.file != nil {
		return s.file.SetWriteDeadline(t)
	}
	return nil
}

type sockAddr struct{}

func (sockAddr) Network() string { return "tcp" }
func (sockAddr) String() string  { return "sluice-conn" }
