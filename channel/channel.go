// Package channel owns one direction of a session: the bytes read from one
// socket and not yet written to the other, held in a pooled buffer or a pooled
// splice pipe, and the status flags that tell the event loop what the
// direction waits for.
//
// A channel never blocks and never starts a goroutine: Pump moves what it can,
// up to the caller's byte budget, and returns; the flags say why it stopped
// (Yielded: on the budget, with work left that no event will announce). With edge-triggered polling the
// loop clears EmptyIn on a readable event and FullOut on a writable one, then
// pumps again. A short read counts as an empty input (a stream socket hands
// over all it holds, and new bytes raise a new edge), which saves the read
// that would only say EAGAIN, except after an event that reported a hang-up:
// then no edge is left to come and reads go on to EOF.
//
// Reads, writes and splices go through internal/rawsys: they never block,
// so the runtime need not prepare to hand the loop's P away.
package channel

import (
	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/internal/bitnames"
	"github.com/sluice-proxy/sluice/internal/rawsys"
	"github.com/sluice-proxy/sluice/rules"
)

// Flags is the state of a channel. The first six are its outside view.
type Flags uint16

const (
	ErrIn   Flags = 0x0001 // reading the input failed (reset); the session aborts
	ErrOut  Flags = 0x0002 // writing the output failed (reset, EPIPE); the session aborts
	ShutIn  Flags = 0x0004 // the input ended: a read returned 0
	ShutOut Flags = 0x0008 // the output is shut: the owner did shutdown(SHUT_WR)
	EmptyIn Flags = 0x0010 // the input had nothing more: wait for a readable event
	FullOut Flags = 0x0020 // the output took nothing more: wait for a writable event

	onPipe   Flags = 0x0040 // bytes currently travel through a pipe
	toPipe   Flags = 0x0080 // splice=auto: a read filled the buffer, use a pipe from the next empty state
	noSplice Flags = 0x0100 // splice said EINVAL on this pair: buffers only from now on
	pipeFull Flags = 0x0200 // splice-in said EAGAIN with bytes in the pipe: flush before reading again
	sawHup   Flags = 0x0400 // the last input event carried RDHUP/HUP/ERR (or none came yet): read on to EOF
	yielded  Flags = 0x0800 // the last Pump stopped on its budget with bytes still to move: no event will say so, pump again
	sawFin   Flags = 0x1000 // the last input event carried RDHUP alone: the peer's FIN is queued behind the bytes, a short read ends the input
)

var flagNames = []bitnames.Name[Flags]{
	{Bit: ErrIn, Name: "ERR_IN"}, {Bit: ErrOut, Name: "ERR_OUT"}, {Bit: ShutIn, Name: "SHUT_IN"}, {Bit: ShutOut, Name: "SHUT_OUT"},
	{Bit: EmptyIn, Name: "EMPTY_IN"}, {Bit: FullOut, Name: "FULL_OUT"}, {Bit: onPipe, Name: "ON_PIPE"}, {Bit: toPipe, Name: "TO_PIPE"},
	{Bit: noSplice, Name: "NO_SPLICE"}, {Bit: pipeFull, Name: "PIPE_FULL"}, {Bit: sawHup, Name: "SAW_HUP"},
	{Bit: yielded, Name: "YIELDED"}, {Bit: sawFin, Name: "SAW_FIN"},
}

const allFlags Flags = 0x1fff

// String names every set bit, joined by '|'.
func (f Flags) String() string { return bitnames.Format(f, flagNames) }

// Layer is a data layer above a socket (TLS) that a channel reads or
// writes through instead of the socket, with rawsys's conventions: Read
// returns n > 0, (0, nil) at the end of input, (0, unix.EAGAIN) when it has
// nothing now; Write returns the bytes taken or (0, unix.EAGAIN), and
// Write(nil) flushes what the layer holds for the socket.
type Layer interface {
	Read(b []byte) (int, error)
	Write(b []byte) (int, error)
}

// Layers are the data layers of a channel's input and output; nil for a
// raw socket.
type Layers struct {
	In, Out Layer
}

// Channel moves bytes from the socket in to the socket out.
//
// Invariants: at most one of buf and pipe is held at a time; both are nil when
// the channel holds no bytes (an idle session holds neither); ShutOut is set
// only once ShutIn is set and nothing is held.
type Channel struct {
	in, out int32
	flags   Flags
	mode    rules.SpliceMode
	r, w    int32 // buf[r:w] is held
	inPipe  int32 // bytes held in pipe
	buf     []byte
	pipe    *Pipe
	layers  *Layers // nil: both sides raw (the plain path)

	Bytes   uint64 // bytes written to out
	Spliced uint64 // of Bytes, those moved through a pipe
}

// Init prepares the channel to move bytes from in to out, both non-blocking
// stream sockets owned by the caller (socket calls move the bytes: any other
// fd fails with ENOTSOCK). The input is registered edge-triggered: a
// short read normally drains it (EmptyIn until the next edge), but a FIN
// queued before Init sent its edge already, so until the first event says
// otherwise a hang-up is assumed and reads go on to EAGAIN or EOF.
func (c *Channel) Init(in, out int, mode rules.SpliceMode) {
	*c = Channel{in: int32(in), out: int32(out), mode: mode, flags: sawHup}
}

// InitLayers is Init for a channel with a data layer on one side or both
// (TLS variants: buffers only, never a pipe). The input is assumed
// readable: a layer may hold input the socket no longer signals.
func (c *Channel) InitLayers(in, out int, l *Layers) {
	*c = Channel{in: int32(in), out: int32(out), mode: rules.SpliceOff, flags: sawHup | noSplice, layers: l}
}

func (c *Channel) Flags() Flags { return c.flags & allFlags }

// Prime sets what the poller reported on the input before the channel
// existed (Init assumes the worst: readable, maybe ended): readable false
// when no readable event came, so the first Pump does not read only to get
// EAGAIN; hup false when none carried RDHUP, HUP or ERR, so a short read
// ends reading. Events not yet delivered are not lost: they come later.
func (c *Channel) Prime(readable, hup bool) {
	if !readable && (c.layers == nil || c.layers.In == nil) {
		c.flags |= EmptyIn
	}
	if !hup {
		c.flags &^= sawHup
	}
}

// Readable records a readable event on the input; hup says whether it
// carried RDHUP, HUP or ERR (the input ended or failed: read on to EOF).
func (c *Channel) Readable(hup bool) {
	c.flags &^= EmptyIn | sawFin
	if hup {
		c.flags |= sawHup
	} else {
		c.flags &^= sawHup
	}
}

// ReadableFin records a readable event that carried RDHUP without HUP or
// ERR: the peer shut its write side, so its FIN is queued behind whatever
// bytes are there and no more can come. The read that drains them short
// therefore ends the input as well, saving the read that would only return
// 0 (HAProxy's raw_sock stops there too). A socket that fails afterwards
// still reports it on the output side or at close.
func (c *Channel) ReadableFin() {
	c.Readable(true)
	c.flags |= sawFin
}

// HupSeen reports whether the input's last event carried RDHUP, HUP or ERR
// (as primed): no byte will follow those already queued.
func (c *Channel) HupSeen() bool { return c.flags&sawHup != 0 }

// Writable records a writable (or hang-up) event on the output.
func (c *Channel) Writable() { c.flags &^= FullOut }

// Held returns the number of bytes read and not yet written.
func (c *Channel) Held() int {
	if c.pipe != nil {
		return int(c.inPipe)
	}
	return int(c.w - c.r)
}

// Piped reports whether the channel's bytes currently travel through a pipe.
func (c *Channel) Piped() bool { return c.flags&onPipe != 0 }

// Failed reports whether either side failed.
func (c *Channel) Failed() bool { return c.flags&(ErrIn|ErrOut) != 0 }

// WantShutOut reports whether the input has ended and every byte is out, so
// the owner should shut the output's write side now.
func (c *Channel) WantShutOut() bool {
	return c.flags&(ShutIn|ShutOut|ErrIn|ErrOut) == ShutIn && c.Held() == 0
}

// SetShutOut records that the owner shut the output's write side.
func (c *Channel) SetShutOut() { c.flags |= ShutOut }

// Done reports whether the direction is finished: output shut, or failed.
func (c *Channel) Done() bool { return c.flags&(ShutOut|ErrIn|ErrOut) != 0 }

// Idle reports whether the channel is waiting with nothing held: it can neither
// read (input empty or ended) nor has bytes to write.
func (c *Channel) Idle() bool { return c.Held() == 0 && c.flags&(EmptyIn|ShutIn) != 0 }

// DefaultBudget is the bytes after which one Pump yields (it stops after
// the write that reached them): one full pipe, or sixteen 16 KiB buffers. A loop that pumps a bulk stream
// until EAGAIN can hold every other session of the loop for milliseconds;
// with the budget the stream waits its turn (Yielded) after the other ready
// sessions of the batch. Like HAProxy's tune.maxpollevents and recv_enough.
const DefaultBudget = 256 << 10

// Pump moves bytes from in to out until both sides would block, the input
// ends, a side fails, or budget bytes (when budget > 0) have been written to
// out; the flags say which, and Yielded reports the budget. It returns the
// bytes written to out. Hot path: no allocation once the pools are warm.
func (c *Channel) Pump(p *Pools, budget int) int {
	c.flags &^= yielded
	moved := 0
	if c.layers != nil && c.layers.Out != nil && c.flags&(FullOut|ErrOut) == 0 {
		c.flushLayer()
	}
	for c.flags&(ErrIn|ErrOut) == 0 {
		progress := false
		if c.Held() > 0 && c.flags&FullOut == 0 {
			n := c.send(p)
			moved += n
			progress = n > 0
			if budget > 0 && moved >= budget {
				if c.canMove() {
					c.flags |= yielded
				}
				break
			}
		}
		if c.flags&(ShutIn|EmptyIn|ErrOut) == 0 && c.room() {
			before := c.flags
			if c.recv(p) > 0 || c.flags&ShutIn != before&ShutIn {
				progress = true
			}
		}
		if !progress {
			break
		}
	}
	return moved
}

// canMove reports whether a Pump now would move bytes or learn something
// that no event will announce: bytes held and the output not known full, or
// nothing held and the input not known empty or ended. (Bytes held behind
// a full output wait for its writable event.)
func (c *Channel) canMove() bool {
	if c.flags&(ErrIn|ErrOut) != 0 {
		return false
	}
	if c.Held() > 0 {
		return c.flags&FullOut == 0
	}
	return c.flags&(ShutIn|EmptyIn) == 0
}

// Yielded reports whether the last Pump stopped on its budget with work
// left: with edge-triggered polling no new event will come for it, so the
// owner must pump the channel again soon (after the other ready sessions).
func (c *Channel) Yielded() bool { return c.flags&yielded != 0 }

// Flush writes held bytes to out until nothing is held or out is full or
// failed (FullOut, ErrOut); it never reads, so the input may be closed
// already (a channel whose input failed delivers what it read). It returns
// the bytes written.
func (c *Channel) Flush(p *Pools) int {
	moved := 0
	for c.Held() > 0 && c.flags&(FullOut|ErrOut) == 0 {
		moved += c.send(p)
	}
	return moved
}

// room reports whether a read may be tried now, choosing the backing when
// nothing is held.
func (c *Channel) room() bool {
	if c.pipe != nil {
		return c.flags&pipeFull == 0 && int(c.inPipe) < c.pipe.size
	}
	if c.buf != nil {
		if int(c.w) < len(c.buf) {
			return true
		}
		if c.r > 0 { // slide the held bytes down to make room
			copy(c.buf, c.buf[c.r:c.w])
			c.w -= c.r
			c.r = 0
			return true
		}
		return false
	}
	return true // nothing held: recv picks a backing
}

// recv reads once into the current backing. It returns the bytes read; on 0
// the flags tell why (ShutIn, EmptyIn, ErrIn, or the pipe is full).
func (c *Channel) recv(p *Pools) int {
	if c.pipe == nil && c.buf == nil {
		c.pick(p)
	}
	if c.flags&onPipe != 0 {
		return c.spliceIn(p)
	}
	if c.buf == nil {
		c.buf = p.getBuf()
	}
	room := len(c.buf) - int(c.w)
	var n int
	var err error
	layered := c.layers != nil && c.layers.In != nil
	if layered {
		n, err = c.layers.In.Read(c.buf[c.w:])
	} else {
		n, err = rawsys.Recv(int(c.in), c.buf[c.w:], 0)
	}
	switch {
	case n > 0:
		c.w += int32(n)
		if n == room && c.mode == rules.SpliceAuto && c.flags&noSplice == 0 && room == len(c.buf) {
			c.flags |= toPipe // a whole buffer in one read: a bulk transfer
		}
		// A short read of a layer says nothing of the socket (a record
		// at a time): it reads on to EAGAIN.
		if n < room && !layered {
			switch {
			case c.flags&sawHup == 0:
				c.flags |= EmptyIn // a short read drained the socket: wait for the next edge
			case c.flags&sawFin != 0:
				c.flags |= ShutIn // drained up to the FIN the event announced: the 0 read is not needed
			}
		}
		return n
	case err == nil: // n == 0
		c.flags |= ShutIn
	case err == unix.EAGAIN:
		c.flags |= EmptyIn
	default:
		c.flags |= ErrIn
	}
	c.releaseIfEmpty(p)
	return 0
}

// pick chooses the backing for the next bytes: a pipe for splice=on, or for
// splice=auto once a read has filled a buffer; a buffer otherwise or when no
// pipe can be had.
func (c *Channel) pick(p *Pools) {
	c.flags &^= onPipe
	if c.flags&noSplice != 0 || c.mode == rules.SpliceOff || (c.mode == rules.SpliceAuto && c.flags&toPipe == 0) {
		return
	}
	if c.pipe = p.getPipe(); c.pipe != nil {
		c.flags |= onPipe
	}
}

func (c *Channel) spliceIn(p *Pools) int {
	n, err := rawsys.Splice(int(c.in), c.pipe.w, c.pipe.size-int(c.inPipe), unix.SPLICE_F_NONBLOCK)
	switch {
	case n > 0:
		c.inPipe += int32(n)
		return int(n)
	case err == nil:
		c.flags |= ShutIn
	case err == unix.EAGAIN:
		// Either the socket is empty or the pipe has no free slot (a pipe
		// holds a number of page slots, not bytes). Only an empty pipe
		// proves the socket is empty.
		if c.inPipe > 0 {
			c.flags |= pipeFull
			return 0
		}
		c.flags |= EmptyIn
	case err == unix.EINVAL && c.inPipe == 0:
		// This pair cannot splice: go on with buffers.
		c.flags |= noSplice
		c.releaseIfEmpty(p)
		return c.recv(p)
	default:
		c.flags |= ErrIn
	}
	c.releaseIfEmpty(p)
	return 0
}

// send writes held bytes once. It returns the bytes written; on 0 the flags
// tell why (FullOut or ErrOut).
func (c *Channel) send(p *Pools) int {
	var n int
	var err error
	if c.pipe != nil {
		var n64 int64
		n64, err = rawsys.Splice(c.pipe.r, int(c.out), int(c.inPipe), unix.SPLICE_F_NONBLOCK)
		n = int(n64)
	} else if c.layers != nil && c.layers.Out != nil {
		n, err = c.layers.Out.Write(c.buf[c.r:c.w])
	} else {
		n, err = rawsys.Send(int(c.out), c.buf[c.r:c.w])
	}
	switch {
	case n > 0:
		c.Bytes += uint64(n)
		if c.pipe != nil {
			c.inPipe -= int32(n)
			c.Spliced += uint64(n)
			c.flags &^= pipeFull
		} else {
			c.r += int32(n)
		}
		c.releaseIfEmpty(p)
		return n
	case err == unix.EAGAIN:
		c.flags |= FullOut
	default:
		c.flags |= ErrOut
	}
	return 0
}

// flushLayer writes what the output's layer holds for its socket (records
// a full socket did not take), so they leave even when the channel holds
// nothing more.
func (c *Channel) flushLayer() {
	switch _, err := c.layers.Out.Write(nil); err {
	case nil:
	case unix.EAGAIN:
		c.flags |= FullOut
	default:
		c.flags |= ErrOut
	}
}

// releaseIfEmpty returns the buffer or pipe to the pool once nothing is held.
func (c *Channel) releaseIfEmpty(p *Pools) {
	if c.pipe != nil && c.inPipe == 0 {
		p.putPipe(c.pipe)
		c.pipe = nil
		c.flags &^= pipeFull
	}
	if c.buf != nil && c.r == c.w {
		p.putBuf(c.buf)
		c.buf = nil
		c.r, c.w = 0, 0
	}
}

// Release gives back whatever the channel holds, dropping unsent bytes. Call
// it when the session closes; a pipe with bytes in it is closed, not reused.
func (c *Channel) Release(p *Pools) {
	if c.pipe != nil {
		if c.inPipe > 0 {
			p.dropPipe(c.pipe)
		} else {
			p.putPipe(c.pipe)
		}
		c.pipe, c.inPipe = nil, 0
	}
	if c.buf != nil {
		p.putBuf(c.buf)
		c.buf = nil
		c.r, c.w = 0, 0
	}
	c.flags &^= onPipe | pipeFull
}
