package handshake

import (
	"sync"

	"github.com/pires/go-proxyproto"

	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/internal/bitnames"
)

// Flags is the state of one conn's handshake, as bits.
type Flags uint16

const (
	Health     Flags = 0x0001 // the conn gets the health reply (a monitor source, or a rule with no target)
	Failing    Flags = 0x0002 // the health reply says down: every backend is known down, or the daemon drains
	PeerClosed Flags = 0x0004 // the client shut its write side or hung up (EPOLLRDHUP / EPOLLHUP seen)
	Proxied    Flags = 0x0008 // the conn's addresses were replaced by a PROXY header's
	Local      Flags = 0x0010 // a PROXY header said LOCAL (v1: UNKNOWN): the real addresses are kept
	Untrusted  Flags = 0x0020 // accept-proxy did not apply: the source is outside the trusted list
	MaxConn    Flags = 0x0040 // the conn holds one of the rule's maxconn slots: ReleaseSlot at its end
	Replied    Flags = 0x0080 // the health reply is written and the write side shut
	Routed     Flags = 0x0100 // the sni stage chose a route (State.Route)
	Drained    Flags = 0x0200 // the chain's last read of the client was short: its socket held nothing more (a read before its next event would only say EAGAIN)
)

var flagNames = [...]bitnames.Name[Flags]{
	{Bit: Health, Name: "HEALTH"}, {Bit: Failing, Name: "FAILING"}, {Bit: PeerClosed, Name: "PEER_CLOSED"}, {Bit: Proxied, Name: "PROXIED"},
	{Bit: Local, Name: "LOCAL"}, {Bit: Untrusted, Name: "UNTRUSTED"}, {Bit: MaxConn, Name: "MAXCONN"}, {Bit: Replied, Name: "REPLIED"},
	{Bit: Routed, Name: "ROUTED"}, {Bit: Drained, Name: "DRAINED"},
}

// allFlags is the union of every named bit.
const allFlags Flags = 0x03ff

// String names every set bit, joined by '|'; unknown bits are shown in hex.
func (f Flags) String() string { return bitnames.Format(f, flagNames[:]) }

// peekSize is the inline peek buffer: a v1 header (107 bytes at most) or a v2
// header with IPv6 addresses and some TLVs. A longer v2 header (up to
// maxV2Len + 16) is peeked into a pooled big buffer once the kernel holds all
// of it.
const peekSize = 256

// State is one conn's handshake in progress. It is pooled: Get it when the
// conn is accepted, Put it back when the session starts forwarding or ends,
// so an established session holds none of it (the gate borrows one for each
// run). Owned by one event loop.
type State struct {
	In  *conn.Conn // the client conn; accept-proxy rewrites its Src and Dst
	Out *conn.Conn // the backend conn, for the outgoing chain
	Now int64      // the loop's clock (ns); the owner sets it before each run

	Version uint8            // PROXY version received (0: none)
	TLVs    []proxyproto.TLV // kept from a v2 header: ALPN, authority, unique ID, netns
	flags   Flags            // see Flags
	idx     uint8            // the running chain's next handler
	outDone bool             // the incoming chain is finished; the outgoing one runs
	off     uint32           // bytes of out written, or of a health request drained
	out     []byte           // bytes to write: the health reply or the outgoing PROXY header
	peek    [peekSize]byte   // MSG_PEEK target; holds nothing between calls
	sni     sniState         // the sni stage's (sni.go)
}

// Flags returns the handshake's flags.
func (st *State) Flags() Flags { return st.flags }

// Set sets flags; the owner uses it for PeerClosed and Failing.
func (st *State) Set(f Flags) { st.flags |= f }

// Has reports whether every bit of f is set.
func (st *State) Has(f Flags) bool { return st.flags&f == f }

var statePool = sync.Pool{New: func() any { return new(State) }}

// Get returns a clean State for the conns in and out.
func Get(in, out *conn.Conn) *State {
	st := statePool.Get().(*State)
	st.In, st.Out = in, out
	return st
}

// Put gives st back to the pool; st must not be used afterwards.
func Put(st *State) {
	st.sni.release()
	*st = State{} // drop references (conns, TLVs) so the pool keeps nothing alive
	statePool.Put(st)
}

// bigBuf holds a v2 header longer than the inline peek buffer.
var bigPool = sync.Pool{New: func() any { return new([maxHeaderLen]byte) }}
