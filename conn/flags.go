// Package conn owns Conn: one file descriptor plus the state of its CTRL layer
// (the socket) and its DATA layer (raw bytes, later TLS), kept as flag bits,
// and the ordered shutdown and close sequences over those layers.
//
// A Conn is owned by exactly one event loop and is never touched from another
// goroutine, so nothing here locks.
package conn

import (
	"math/bits"

	"github.com/sluice-proxy/sluice/internal/bitnames"
)

// Flags is the internal state of a Conn. The bits follow HAProxy's
// connection-layering notes: the FD, then the CTRL layer, then the DATA layer,
// then the two-bit multi-step operations (see Step).
type Flags uint32

const (
	FDAlloc Flags = 0x00000001 // the file descriptor is open and owned by this Conn

	CtrlInit      Flags = 0x00000002 // socket layer set up (non-blocking, options)
	CtrlConnected Flags = 0x00000004 // accepted, or outgoing connect completed
	CtrlFailed    Flags = 0x00000010 // socket error seen; only close is left
	CtrlShutW     Flags = 0x00000040 // shutdown(SHUT_WR) issued on the socket

	DataInit      Flags = 0x00000080 // data layer set up (raw: nothing to do)
	DataConnected Flags = 0x00000100 // data layer handshake done (raw: at once)
	DataFailed    Flags = 0x00000400 // data layer error (a TLS alert, say)
	DataShutR     Flags = 0x00000800 // data layer's input ended (TLS: the peer's close_notify, or its FIN)
	DataShutW     Flags = 0x00001000 // data layer finished its shutdown (TLS close_notify sent)

	FDShutW Flags = 0x00002000 // polling updated after the write shutdown
	Closed  Flags = 0x00008000 // Close completed; the fd number is no longer ours

	// Two-bit multi-step operations; each occupies the mask shown.
	OpAcceptProxy Flags = 0x00030000 // reading a PROXY header
	OpSendProxy   Flags = 0x000c0000 // writing a PROXY header
	OpDataAccept  Flags = 0x00300000 // data-layer accept (TLS server handshake)
	OpDataConnect Flags = 0x00c00000 // data-layer connect (TLS client handshake)
)

// flagNames names every single bit, for String and for the test that fails when
// a bit is added without a name.
var flagNames = [...]bitnames.Name[Flags]{
	{Bit: FDAlloc, Name: "FD_ALLOC"},
	{Bit: CtrlInit, Name: "CTRL_INIT"},
	{Bit: CtrlConnected, Name: "CTRL_CONNECTED"},
	{Bit: CtrlFailed, Name: "CTRL_FAILED"},
	{Bit: CtrlShutW, Name: "CTRL_SHUTW"},
	{Bit: DataInit, Name: "DATA_INIT"},
	{Bit: DataConnected, Name: "DATA_CONNECTED"},
	{Bit: DataFailed, Name: "DATA_FAILED"},
	{Bit: DataShutR, Name: "DATA_SHUTR"},
	{Bit: DataShutW, Name: "DATA_SHUTW"},
	{Bit: FDShutW, Name: "FD_SHUTW"},
	{Bit: Closed, Name: "CLOSED"},
	{Bit: OpAcceptProxy & 0x00010000, Name: "ACCEPT_PROXY_LO"},
	{Bit: OpAcceptProxy & 0x00020000, Name: "ACCEPT_PROXY_HI"},
	{Bit: OpSendProxy & 0x00040000, Name: "SEND_PROXY_LO"},
	{Bit: OpSendProxy & 0x00080000, Name: "SEND_PROXY_HI"},
	{Bit: OpDataAccept & 0x00100000, Name: "DATA_ACCEPT_LO"},
	{Bit: OpDataAccept & 0x00200000, Name: "DATA_ACCEPT_HI"},
	{Bit: OpDataConnect & 0x00400000, Name: "DATA_CONNECT_LO"},
	{Bit: OpDataConnect & 0x00800000, Name: "DATA_CONNECT_HI"},
}

// allFlags is the union of every named bit. The gaps (0x08, 0x20, 0x200,
// 0x4000) held CTRL/DATA "handlers done" and the CTRL shut-read bit that
// nothing set: a raw conn's end of input is the channel's to see
// (docs/architecture.md, "Connections"); the TLS data layer reads for the
// channel, and records its own end of input (DataShutR).
const allFlags Flags = 0x00ffbdd7

// String names every set bit, joined by '|'; unknown bits are shown in hex.
func (f Flags) String() string { return bitnames.Format(f, flagNames[:]) }

// Step is the state of a multi-step operation, stored in two bits:
//
//	00 not wanted, 10 wanted but not started, 11 started not done, 01 done.
//
// So s != 0 means wanted, s&1 means started, s&2 means not finished.
type Step uint8

const (
	StepNone    Step = 0b00
	StepWanted  Step = 0b10
	StepStarted Step = 0b11
	StepDone    Step = 0b01
)

func (s Step) String() string {
	switch s {
	case StepNone:
		return "none"
	case StepWanted:
		return "wanted"
	case StepStarted:
		return "started"
	case StepDone:
		return "done"
	}
	return "invalid"
}

// Wanted reports whether the operation is needed at all.
func (s Step) Wanted() bool { return s != 0 }

// Pending reports whether the operation is wanted and not finished.
func (s Step) Pending() bool { return s&0b10 != 0 }

// shift returns the position of an operation mask's low bit.
func shift(op Flags) int { return bits.TrailingZeros32(uint32(op)) }
