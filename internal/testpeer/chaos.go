package testpeer

// Chaos exchanges: the exchange of testpeer.go made symmetric, with a random
// order of half-closes and a planned reset on either side, for load and
// fault tests.
//
// The client sends a 48-byte plan, then both sides send their stream (the
// client the seed's, the backend the stream of seed+1), each followed by its
// own SHA-256 (32 bytes), then shut their write side; each side checks every
// byte it reads against the stream it expects, the trailer against the hash
// of what it read, and that EOF follows the trailer. The plan says:
//
//   - the order: both at once; the backend only after the client's EOF (the
//     download flows after a half-close); or the client only after the
//     backend's EOF (the upload flows after a half-close);
//   - a fault: none; the client resets (SO_LINGER 0, close) after At bytes
//     of its stream; or the backend does. A reset always comes before the
//     side's last byte, so the session cannot end cleanly: the proxy must
//     end it as a reset and pass the reset on.
//
// Every byte that arrives is checked, on sessions that reset too: a reset
// may cut a stream short, never change a byte of it.

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
)

// Order says which side sends first.
type Order uint8

const (
	Together    Order = iota // both sides send at once
	ClientFirst              // the backend sends only after the client's EOF
	ServerFirst              // the client sends only after the backend's EOF
	orderCount
)

var orderNames = [...]string{"together", "client-first", "server-first"}

func (o Order) String() string {
	if int(o) < len(orderNames) {
		return orderNames[o]
	}
	return fmt.Sprintf("order-%d", o)
}

// Fault is the reset a plan asks of one side.
type Fault uint8

const (
	NoFault     Fault = iota
	ClientReset       // the client resets after At bytes of its stream
	ServerReset       // the backend resets after At bytes of its stream
	faultCount
)

var faultNames = [...]string{"none", "client-reset", "server-reset"}

func (f Fault) String() string {
	if int(f) < len(faultNames) {
		return faultNames[f]
	}
	return fmt.Sprintf("fault-%d", f)
}

// Plan is one chaos exchange.
type Plan struct {
	Seed     uint64
	Up, Down int64 // payload bytes each way; each is followed by its 32-byte SHA-256
	Order    Order
	Fault    Fault
	At       int64 // for a fault: bytes of its own stream (payload and trailer) the faulting side sends first
}

// PlanLen is the size of a plan on the wire.
const PlanLen = 48

const trailerLen = sha256.Size

func (p Plan) String() string {
	s := fmt.Sprintf("seed %d, up %d, down %d, %s", p.Seed, p.Up, p.Down, p.Order)
	if p.Fault != NoFault {
		s += fmt.Sprintf(", %s after %d bytes", p.Fault, p.At)
	}
	return s
}

// Marshal returns the plan as the client sends it, for clients that play
// their half by hand (one that never reads, say).
func (p Plan) Marshal() []byte {
	b := make([]byte, PlanLen)
	binary.LittleEndian.PutUint64(b[0:], p.Seed)
	binary.LittleEndian.PutUint64(b[8:], uint64(p.Up))
	binary.LittleEndian.PutUint64(b[16:], uint64(p.Down))
	b[24], b[25] = byte(p.Order), byte(p.Fault)
	binary.LittleEndian.PutUint64(b[32:], uint64(p.At))
	return b
}

// parsePlan reads a plan, refusing one no client of this package sends.
func parsePlan(b []byte) (Plan, error) {
	p := Plan{
		Seed: binary.LittleEndian.Uint64(b[0:]),
		Up:   int64(binary.LittleEndian.Uint64(b[8:])), Down: int64(binary.LittleEndian.Uint64(b[16:])),
		Order: Order(b[24]), Fault: Fault(b[25]),
		At: int64(binary.LittleEndian.Uint64(b[32:])),
	}
	switch {
	case p.Up < 0 || p.Down < 0 || p.Order >= orderCount || p.Fault >= faultCount:
		return p, fmt.Errorf("bad plan %x", b)
	case p.Fault == ClientReset && (p.At < 0 || p.At >= p.Up+trailerLen),
		p.Fault == ServerReset && (p.At < 0 || p.At >= p.Down+trailerLen):
		return p, fmt.Errorf("plan %v: reset point out of the stream", p)
	}
	return p, nil
}

// LogUniform returns a size from 0 to max whose logarithm is uniform (plus
// the zero sizes), so a run mixes empty, one-byte and multi-megabyte streams.
func LogUniform(rng *rand.Rand, max int64) int64 {
	if rng.IntN(20) == 0 {
		return 0
	}
	return int64(math.Exp(rng.Float64() * math.Log(float64(max))))
}

// RandomPlan draws a plan: sizes log-uniform up to maxSize, any order, and a
// reset with probability resetShare, on either side with equal odds, at a
// uniform point of the faulting side's stream.
func RandomPlan(rng *rand.Rand, seed uint64, maxSize int64, resetShare float64) Plan {
	p := Plan{Seed: seed, Up: LogUniform(rng, maxSize), Down: LogUniform(rng, maxSize), Order: Order(rng.IntN(int(orderCount)))}
	if rng.Float64() < resetShare {
		if rng.IntN(2) == 0 {
			p.Fault, p.At = ClientReset, rng.Int64N(p.Up+trailerLen)
		} else {
			p.Fault, p.At = ServerReset, rng.Int64N(p.Down+trailerLen)
		}
	}
	return p
}

// Result is how one side's half of an exchange went.
type Result struct {
	Sent     int64 // bytes of its own stream (payload and trailer) written
	Received int64 // bytes of the peer's stream read, every one checked
	Complete bool  // both streams whole: exact payload, matching trailer, then EOF
	Reset    bool  // this side reset the conn at its planned point
	GotReset bool  // a read or a write failed with ECONNRESET or EPIPE
	Cut      bool  // the peer's stream ended (EOF) before its trailer
	Corrupt  error // a byte, the trailer, or what followed it was wrong: never acceptable
	Err      error // anything else (a deadline passed, a dial failed): the exchange hung or never began
}

// Side names which end of an exchange a Result is from.
type Side uint8

const (
	ClientSide Side = iota
	ServerSide
)

// Check says whether r is what plan p allows on side: a plan without a
// fault must complete; the faulting side must have reset at its point; the
// other side must see the reset (as ECONNRESET or EPIPE: a clean EOF there
// would mean the proxy turned a reset into a normal end, and a stream cut
// short would look whole to a protocol without a trailer). No byte may ever
// differ.
func (r Result) Check(p Plan, side Side) error {
	if r.Corrupt != nil {
		return r.Corrupt
	}
	own := (p.Fault == ClientReset) == (side == ClientSide)
	switch {
	case p.Fault == NoFault && !r.Complete:
		return fmt.Errorf("did not complete: %s", r.describe())
	case p.Fault == NoFault:
		return nil
	case r.Complete:
		return fmt.Errorf("completed despite a %s planned", p.Fault)
	case own && !r.Reset:
		return fmt.Errorf("did not reach its reset point: %s", r.describe())
	case !own && r.Err != nil:
		return fmt.Errorf("waiting for the peer's reset: %w", r.Err)
	case !own && !r.GotReset:
		return fmt.Errorf("the peer's reset arrived as a clean end of stream: %s", r.describe())
	}
	return nil
}

// Lost says whether r shows anything but a complete exchange or a clean cut
// (a reset, or an EOF before the trailer): the check for sessions whose
// backend dies, where either ending is right.
func (r Result) Lost() error {
	switch {
	case r.Corrupt != nil:
		return r.Corrupt
	case r.Err != nil:
		return r.Err
	case !r.Complete && !r.GotReset && !r.Cut:
		return fmt.Errorf("neither complete nor cut: %s", r.describe())
	}
	return nil
}

func (r Result) describe() string {
	s := fmt.Sprintf("sent %d, received %d", r.Sent, r.Received)
	for _, f := range []struct {
		on   bool
		name string
	}{{r.Complete, "complete"}, {r.Reset, "reset by this side"}, {r.GotReset, "saw a reset"}, {r.Cut, "cut by EOF"}} {
		if f.on {
			s += ", " + f.name
		}
	}
	if r.Err != nil {
		s += ", error: " + r.Err.Error()
	}
	return s
}

// Options change how a side runs its half.
type Options struct {
	// Hold, when set, stops the reader once it has HoldAt bytes of the
	// peer's stream, until Hold is closed: sessions held mid-stream.
	Hold   <-chan struct{}
	HoldAt int64
	OnHold func() // called once the reader stops at HoldAt (or reaches EOF first)
	// HoldSend moves the hold to the writer: it stops after HoldAt bytes
	// of its own stream (sessions held mid-upload).
	HoldSend bool
}

// isReset reports a reset seen by a read or a write. ENOTCONN is what
// shutdown(2) says of a conn already torn down by a reset whose error a
// read or a write has taken.
func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ENOTCONN)
}

// chunk is the read and write size: small, since thousands of exchanges
// run at once.
const chunk = 8 << 10

// recvResult is what the reader of one side found.
type recvResult struct {
	n        int64
	whole    bool // payload, trailer and EOF
	gotReset bool
	cut      bool
	corrupt  error
	err      error
}

// receive reads the peer's stream: n bytes of seed's stream, its SHA-256,
// then EOF. closedByUs is set once this side closed the conn itself (its own
// reset): the read error that follows is expected.
func receive(c net.Conn, seed uint64, n int64, o Options, closedByUs func() bool) recvResult {
	var r recvResult
	want := Stream(seed)
	h := sha256.New()
	var trailer [trailerLen]byte
	got := make([]byte, chunk)
	exp := make([]byte, chunk)
	held := o.Hold == nil || o.HoldSend
	hold := func() {
		if o.OnHold != nil {
			o.OnHold()
		}
		<-o.Hold
		held = true
	}
	defer func() {
		if !held && o.OnHold != nil {
			o.OnHold() // ended before its hold point: it will not stop there
		}
	}()
	for {
		if !held && r.n >= o.HoldAt {
			hold()
		}
		max := len(got)
		if !held && o.HoldAt-r.n < int64(max) {
			max = int(o.HoldAt - r.n)
		}
		k, err := c.Read(got[:max])
		if k > 0 {
			b := got[:k]
			if p := n - r.n; p > 0 { // payload bytes
				m := min(int64(len(b)), p)
				io.ReadFull(want, exp[:m])
				if !bytes.Equal(b[:m], exp[:m]) {
					i := 0
					for b[i] == exp[i] {
						i++
					}
					r.corrupt = fmt.Errorf("byte %d of a %d-byte stream differs (got %#02x, want %#02x)", r.n+int64(i), n, b[i], exp[i])
					return r
				}
				h.Write(b[:m])
				r.n += m
				b = b[m:]
			}
			if len(b) > 0 { // trailer bytes, or more
				off := r.n - n
				if off+int64(len(b)) > trailerLen {
					r.corrupt = fmt.Errorf("%d bytes after the %d-byte stream and its trailer", off+int64(len(b))-trailerLen, n)
					return r
				}
				copy(trailer[off:], b)
				r.n += int64(len(b))
			}
		}
		switch {
		case err == nil:
			continue
		case err == io.EOF:
			if r.n < n+trailerLen {
				r.cut = true
				return r
			}
			if sum := h.Sum(nil); string(sum) != string(trailer[:]) {
				r.corrupt = fmt.Errorf("trailer of the %d-byte stream is not its SHA-256", n)
				return r
			}
			r.whole = true
			return r
		case isReset(err):
			r.gotReset = true
		case closedByUs():
		default:
			r.err = fmt.Errorf("reading, %d of %d bytes in: %w", r.n, n+trailerLen, err)
		}
		return r
	}
}

// sendResult is what the writer of one side did.
type sendResult struct {
	n        int64
	reset    bool // reset at the planned point
	gotReset bool
	err      error
}

// send writes n bytes of seed's stream and its SHA-256, then shuts the
// write side; with resetAt >= 0 it writes only resetAt bytes of that, then
// resets the conn.
func send(c *net.TCPConn, seed uint64, n, resetAt int64, reset func(), o Options) sendResult {
	var s sendResult
	holding := o.Hold != nil && o.HoldSend
	defer func() {
		if holding && o.OnHold != nil {
			o.OnHold() // ended before its hold point
		}
	}()
	src := Stream(seed)
	h := sha256.New()
	buf := make([]byte, chunk)
	total := n + trailerLen
	if resetAt >= 0 {
		total = resetAt
	}
	var trailer []byte
	for s.n < total {
		if holding && s.n >= o.HoldAt {
			if o.OnHold != nil {
				o.OnHold()
			}
			<-o.Hold
			holding = false
		}
		limit := total
		if holding {
			limit = min(total, o.HoldAt)
		}
		var b []byte
		if s.n < n {
			b = buf[:min(int64(len(buf)), n-s.n, limit-s.n)]
			io.ReadFull(src, b)
			h.Write(b)
		} else {
			if trailer == nil {
				trailer = h.Sum(nil)
			}
			b = trailer[s.n-n : min(trailerLen, limit-n)]
		}
		k, err := c.Write(b)
		s.n += int64(k)
		if err != nil {
			if isReset(err) {
				s.gotReset = true
			} else {
				s.err = fmt.Errorf("writing, %d of %d bytes out: %w", s.n, n+trailerLen, err)
			}
			return s
		}
	}
	if resetAt >= 0 {
		reset()
		s.reset = true
		return s
	}
	if err := c.CloseWrite(); err != nil {
		if isReset(err) {
			s.gotReset = true
		} else {
			s.err = fmt.Errorf("shutting the write side: %w", err)
		}
	}
	return s
}

// half runs one side: the reader at once, the writer after the reader when
// writerWaits, then merges what both found and closes the conn.
func half(c *net.TCPConn, sendSeed uint64, sendN, resetAt int64, recvSeed uint64, recvN int64, writerWaits bool, o Options) Result {
	var mu sync.Mutex
	resetDone := false
	reset := func() {
		mu.Lock()
		resetDone = true
		mu.Unlock()
		c.SetLinger(0)
		c.Close()
	}
	closedByUs := func() bool {
		mu.Lock()
		defer mu.Unlock()
		return resetDone
	}
	done := make(chan recvResult, 1)
	go func() { done <- receive(c, recvSeed, recvN, o, closedByUs) }()
	var rr recvResult
	got := false
	if writerWaits {
		rr, got = <-done, true
	}
	var sr sendResult
	if !got || rr.whole {
		sr = send(c, sendSeed, sendN, resetAt, reset, o)
	}
	if !got {
		if sr.err != nil || sr.gotReset {
			// The writer failed: the reader may wait forever on a conn
			// whose other half is still up. Wake it with a deadline.
			c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		}
		rr = <-done
	}
	res := Result{Sent: sr.n, Received: rr.n, Reset: sr.reset, GotReset: sr.gotReset || rr.gotReset,
		Cut: rr.cut, Corrupt: rr.corrupt}
	res.Err = errors.Join(sr.err, rr.err)
	if errors.Is(rr.err, os.ErrDeadlineExceeded) && (sr.err != nil || sr.gotReset) {
		res.Err = sr.err // the deadline was ours, set to end the reader
	}
	res.Complete = rr.whole && sr.n == sendN+trailerLen && !sr.reset && sr.err == nil && !sr.gotReset
	if !sr.reset {
		if rr.corrupt != nil || res.Err != nil {
			c.SetLinger(0) // nothing of a broken exchange lingers
		}
		c.Close()
	}
	return res
}

// Client runs the client's half of plan p on c and closes c. The caller may
// set a deadline on c first; a deadline that passes is an Err.
func (p Plan) Client(c *net.TCPConn, o Options) Result {
	if _, err := c.Write(p.Marshal()); err != nil {
		c.SetLinger(0)
		c.Close()
		if isReset(err) {
			return Result{GotReset: true}
		}
		return Result{Err: fmt.Errorf("writing the plan: %w", err)}
	}
	resetAt := int64(-1)
	if p.Fault == ClientReset {
		resetAt = p.At
	}
	return half(c, p.Seed, p.Up, resetAt, p.Seed+1, p.Down, p.Order == ServerFirst, o)
}

// ErrProbe is a conn that ended cleanly before its first byte: a readiness
// probe, not an exchange.
var ErrProbe = errProbe

// ServeChaos runs the backend's half of the exchange on c, with the plan
// the client sends, and closes c. It returns the plan, whether one arrived,
// and the result; a conn that closed before a byte has Err ErrProbe, one
// reset before its plan arrived has GotReset.
func ServeChaos(c *net.TCPConn, o Options) (Plan, bool, Result) {
	hdr := make([]byte, PlanLen)
	if n, err := io.ReadFull(c, hdr); err != nil {
		if n == 0 && err == io.EOF {
			c.Close() // a probe ends as cleanly as it came
			return Plan{}, false, Result{Err: ErrProbe}
		}
		c.SetLinger(0)
		c.Close()
		switch {
		case isReset(err):
			return Plan{}, false, Result{GotReset: true, Received: int64(n)}
		}
		return Plan{}, false, Result{Cut: err == io.ErrUnexpectedEOF, Received: int64(n), Err: fmt.Errorf("reading the plan, %d bytes in: %w", n, err)}
	}
	p, err := parsePlan(hdr)
	if err != nil {
		c.SetLinger(0)
		c.Close()
		return p, false, Result{Corrupt: err}
	}
	resetAt := int64(-1)
	if p.Fault == ServerReset {
		resetAt = p.At
	}
	return p, true, half(c, p.Seed+1, p.Down, resetAt, p.Seed, p.Up, p.Order == ClientFirst, o)
}

// ChaosStats are a chaos backend's counts.
type ChaosStats struct {
	Completed   int64    // plans without a fault, complete and exact
	ServerReset int64    // plans with a backend reset, reset as planned
	ClientReset int64    // plans with a client reset, whose reset arrived as one
	Early       int64    // conns reset before their plan arrived (a client reset at once)
	Probes      int64    // conns closed before any byte
	Failures    int64    // conns whose result their plan does not allow
	Errors      []string // the first few failures
	Bytes       int64    // bytes read and written, every one checked
	Open        int64    // conns being served
}

// ChaosBackend serves chaos exchanges and counts how they went: a Backend
// (Served counts exchanges whose plan's check passed, Failures the others)
// with the chaos counts besides.
type ChaosBackend struct {
	*Backend
	mu sync.Mutex
	st ChaosStats
}

// ListenChaos starts a chaos backend on addr ("127.0.0.1:0" for any port).
func ListenChaos(addr string) (*ChaosBackend, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	b := &ChaosBackend{}
	b.Backend = serveWith(ln, b.exchange)
	return b, nil
}

// Stats returns the counts so far.
func (b *ChaosBackend) Stats() ChaosStats {
	b.mu.Lock()
	s := b.st
	b.mu.Unlock()
	s.Errors = append([]string(nil), s.Errors...)
	s.Open = int64(b.Conns())
	return s
}

func (b *ChaosBackend) exchange(c net.Conn) error {
	p, ok, r := ServeChaos(c.(*net.TCPConn), Options{})
	b.mu.Lock()
	defer b.mu.Unlock()
	b.st.Bytes += r.Sent + r.Received
	switch {
	case errors.Is(r.Err, ErrProbe):
		b.st.Probes++
		return ErrProbe
	case !ok && r.GotReset && r.Corrupt == nil:
		b.st.Early++
		return nil
	}
	if err := r.Check(p, ServerSide); err != nil {
		b.st.Failures++
		if len(b.st.Errors) < 8 {
			b.st.Errors = append(b.st.Errors, fmt.Sprintf("%s: %v", p, err))
		}
		return fmt.Errorf("%s: %w", p, err)
	}
	switch p.Fault {
	case NoFault:
		b.st.Completed++
	case ServerReset:
		b.st.ServerReset++
	case ClientReset:
		b.st.ClientReset++
	}
	return nil
}
