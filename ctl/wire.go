package ctl

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
)

// Framing: "SL", version, type, u32 length, payload. See docs/ctl-protocol.md.
const (
	headerLen = 8
	// MaxPayload bounds the payload of one frame.
	MaxPayload = 1 << 20
	magic0     = 'S'
	magic1     = 'L'
	// readStep bounds how much the reader grows its buffer ahead of the
	// bytes that have arrived: a header that claims a large payload costs
	// nothing until the payload comes.
	readStep = 64 << 10
)

// Error is a protocol error: one the server sent in an ERROR frame, or one a
// side found in what it read. Its Code is stable; see codes.go.
type Error struct {
	Code  Code
	Index int    // the rule concerned, 0-based in load order; -1 for none
	Rule  string // that rule's text, or ""
	Msg   string
}

func (e *Error) Error() string {
	s := e.Code.String() + ": "
	if e.Index >= 0 {
		s += "rule " + strconv.Itoa(e.Index+1)
		if e.Rule != "" {
			s += " (" + e.Rule + ")"
		}
		s += ": "
	}
	return s + e.Msg
}

// CodeOf returns the code of the protocol error in err's chain, or 0.
func CodeOf(err error) Code {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return 0
}

func errorf(code Code, format string, a ...any) *Error {
	return &Error{Code: code, Index: -1, Msg: fmt.Sprintf(format, a...)}
}

// frame is one frame as read. payload aliases the reader's buffer: it is
// valid until the next read.
type frame struct {
	ver     uint8
	typ     MsgType
	payload []byte
}

// frameReader reads frames with a bounded, reused buffer.
type frameReader struct {
	r   io.Reader
	hdr [headerLen]byte
	buf []byte
}

// read returns the next frame. A clean end of stream before a header is
// io.EOF; a header that is wrong is an *Error, its payload left unread.
func (fr *frameReader) read() (frame, error) {
	if _, err := io.ReadFull(fr.r, fr.hdr[:]); err != nil {
		if err == io.EOF {
			return frame{}, io.EOF
		}
		return frame{}, fmt.Errorf("reading a frame header: %w", err)
	}
	h := fr.hdr
	if h[0] != magic0 || h[1] != magic1 {
		return frame{}, errorf(CodeBadFrame, "bad magic %#02x %#02x (want \"SL\")", h[0], h[1])
	}
	f := frame{ver: h[2], typ: MsgType(h[3])}
	if f.ver == 0 || f.ver > MaxVersion {
		return frame{}, errorf(CodeBadVersion, "frame version %d: this build speaks 1 to %d", f.ver, MaxVersion)
	}
	if !f.typ.Known() {
		return frame{}, errorf(CodeBadFrame, "unknown message type %#02x", h[3])
	}
	n := binary.BigEndian.Uint32(h[4:])
	if n > MaxPayload {
		return frame{}, errorf(CodeTooLarge, "%s frame of %d bytes, at most %d allowed", f.typ, n, MaxPayload)
	}
	fr.buf = fr.buf[:0]
	for len(fr.buf) < int(n) {
		have := len(fr.buf)
		step := min(int(n)-have, readStep)
		fr.buf = slices.Grow(fr.buf, step)[:have+step]
		if _, err := io.ReadFull(fr.r, fr.buf[have:]); err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return frame{}, fmt.Errorf("reading a %s frame's %d-byte payload: %w", f.typ, n, err)
		}
	}
	f.payload = fr.buf
	return f, nil
}

// frameWriter builds frames in a reused buffer and writes them to a
// buffered writer; flush sends them.
type frameWriter struct {
	w       *bufio.Writer
	onFrame func() // if set, runs before each frame is queued (the server refreshes its write deadline)
	enc
}

// start begins a frame.
func (fw *frameWriter) start(ver uint8, typ MsgType) {
	fw.b = append(fw.b[:0], magic0, magic1, ver, byte(typ), 0, 0, 0, 0)
	fw.err = nil
}

// finish closes the frame begun by start and queues it.
func (fw *frameWriter) finish() error {
	if fw.err != nil {
		return fw.err
	}
	n := len(fw.b) - headerLen
	if n > MaxPayload {
		return errorf(CodeTooLarge, "%s frame of %d bytes, at most %d allowed", MsgType(fw.b[3]), n, MaxPayload)
	}
	binary.BigEndian.PutUint32(fw.b[4:], uint32(n))
	if fw.onFrame != nil {
		fw.onFrame()
	}
	_, err := fw.w.Write(fw.b)
	return err
}

func (fw *frameWriter) flush() error { return fw.w.Flush() }

// enc appends payload fields; the first error sticks.
type enc struct {
	b   []byte
	err error
}

func (e *enc) u8(v uint8)   { e.b = append(e.b, v) }
func (e *enc) u16(v uint16) { e.b = binary.BigEndian.AppendUint16(e.b, v) }
func (e *enc) u32(v uint32) { e.b = binary.BigEndian.AppendUint32(e.b, v) }
func (e *enc) u64(v uint64) { e.b = binary.BigEndian.AppendUint64(e.b, v) }

func (e *enc) bool(v bool) {
	if v {
		e.u8(1)
	} else {
		e.u8(0)
	}
}

// count writes n as a u32, refusing a negative or too large one.
func (e *enc) count32(n int, what string) {
	if n < 0 || uint64(n) > 0xffffffff {
		e.fail(errorf(CodeTooLarge, "%s: %d does not fit a u32", what, n))
		return
	}
	e.u32(uint32(n))
}

// str writes a string of at most max bytes.
func (e *enc) str(s string, max int, what string) {
	if len(s) > max {
		e.fail(errorf(CodeTooLarge, "%s is %d bytes long, at most %d allowed", what, len(s), max))
		return
	}
	e.u16(uint16(len(s)))
	e.b = append(e.b, s...)
}

func (e *enc) fail(err error) {
	if e.err == nil {
		e.err = err
	}
}

// dec reads payload fields; the first error sticks and later reads return
// zero values.
type dec struct {
	typ MsgType
	b   []byte
	off int
	err error
}

func newDec(f frame) *dec { return &dec{typ: f.typ, b: f.payload} }

func (d *dec) fail(code Code, format string, a ...any) {
	if d.err == nil {
		d.err = errorf(code, "%s: %s", d.typ, fmt.Sprintf(format, a...))
	}
}

func (d *dec) take(n int, what string) []byte {
	if d.err != nil {
		return nil
	}
	if len(d.b)-d.off < n {
		d.fail(CodeBadFrame, "payload ends inside %s (offset %d)", what, d.off)
		return nil
	}
	p := d.b[d.off : d.off+n]
	d.off += n
	return p
}

func (d *dec) u8(what string) uint8 {
	if p := d.take(1, what); p != nil {
		return p[0]
	}
	return 0
}

func (d *dec) u16(what string) uint16 {
	if p := d.take(2, what); p != nil {
		return binary.BigEndian.Uint16(p)
	}
	return 0
}

func (d *dec) u32(what string) uint32 {
	if p := d.take(4, what); p != nil {
		return binary.BigEndian.Uint32(p)
	}
	return 0
}

func (d *dec) u64(what string) uint64 {
	if p := d.take(8, what); p != nil {
		return binary.BigEndian.Uint64(p)
	}
	return 0
}

// bool reads a u8 that must be 0 or 1.
func (d *dec) bool(what string) bool {
	v := d.u8(what)
	if v > 1 {
		d.fail(CodeBadFrame, "%s is %d, want 0 or 1", what, v)
	}
	return v == 1
}

// str reads a string of at most max bytes.
func (d *dec) str(max int, what string) string {
	n := int(d.u16(what + " length"))
	if d.err != nil {
		return ""
	}
	if n > max {
		d.fail(CodeTooLarge, "%s is %d bytes long, at most %d allowed", what, n, max)
		return ""
	}
	return string(d.take(n, what))
}

// count checks a list's count before anything is allocated for it: at most
// max items, and no more than the bytes left could hold at minItem bytes
// each.
func (d *dec) count(n, max, minItem int, what string) int {
	if d.err != nil {
		return 0
	}
	if n > max {
		d.fail(CodeTooLarge, "%d %s, at most %d allowed", n, what, max)
		return 0
	}
	if n*minItem > len(d.b)-d.off {
		d.fail(CodeBadFrame, "%d %s cannot fit in the %d bytes left", n, what, len(d.b)-d.off)
		return 0
	}
	return n
}

// end checks that the payload was consumed exactly and returns the first
// error.
func (d *dec) end() error {
	if d.err == nil && d.off != len(d.b) {
		d.fail(CodeBadFrame, "%d bytes left over after the last field", len(d.b)-d.off)
	}
	return d.err
}
