// Package rules owns the model of sluice's forwarding table: pifs, rules and
// their options, the one-line rule syntax (Parse and Rule.String, which
// round-trip), validation of a rule and of a whole table, and listen keys.
// It does no I/O and imports nothing else of sluice.
package rules

import (
	"net/netip"
	"strconv"
	"time"
)

// HostPif is the pif of the daemon's own network namespace. In the model it
// is the empty string; it is never written out.
const HostPif = "host"

// PifName is the name of pif p as the outside writes it: "host" for the
// model's "" (the daemon's own namespace), else p.
func PifName(p string) string {
	if p == "" {
		return HostPif
	}
	return p
}

// ModelPif is the inverse of PifName: a pif's name as Rule holds it ("" for
// "host").
func ModelPif(name string) string {
	if name == HostPif {
		return ""
	}
	return name
}

// ListenPortCount returns the number of listen ports of rs: the sockets
// the table binds. The routes of one key (rules with the same listen part,
// routed by sni=/alpn=) share its sockets and count once.
func ListenPortCount(rs []*Rule) int {
	n := 0
	var parts map[string]bool // listen parts counted, made when a table has more than one rule
	for _, r := range rs {
		if r.ListenPorts.First != 0 && len(rs) > 1 {
			if parts == nil {
				parts = make(map[string]bool, len(rs))
			}
			k := r.listenString()
			if parts[k] {
				continue
			}
			parts[k] = true
		}
		n += r.ListenPorts.Len()
	}
	return n
}

// Limits of one table. The control protocol's server hello advertises them.
const (
	MaxRules        = 4096  // rules in one table
	MaxPortsPerRule = 4096  // ports in one rule's listen range
	MaxPorts        = 16384 // listen ports in one table, summed over its rules
	MaxTargets      = 64    // backends in one rule's pool
	MaxCIDRs        = 256   // prefixes in one CIDR list option
	MaxLineLen      = 8192  // bytes in one rule line
)

// Proto is a rule's transport protocol. The zero value is invalid.
type Proto uint8

const (
	TCP Proto = 1
	UDP Proto = 2
)

func (p Proto) String() string {
	switch p {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	}
	return "proto-" + strconv.Itoa(int(p))
}

// SpliceMode says when a channel moves bytes through a splice pipe. The zero
// value is SpliceAuto, the default.
type SpliceMode uint8

const (
	SpliceAuto SpliceMode = 0 // buffer first; a pipe once a read fills a whole buffer
	SpliceOn   SpliceMode = 1 // a pipe whenever one can be had
	SpliceOff  SpliceMode = 2 // buffers only
)

func (m SpliceMode) String() string {
	switch m {
	case SpliceAuto:
		return "auto"
	case SpliceOn:
		return "on"
	case SpliceOff:
		return "off"
	}
	return "splice-" + strconv.Itoa(int(m))
}

// Balance chooses a backend of a pool. The zero value is round robin.
type Balance uint8

const (
	BalanceRoundRobin Balance = 0
	BalanceLeastConn  Balance = 1
	BalanceSource     Balance = 2
)

func (b Balance) String() string {
	switch b {
	case BalanceRoundRobin:
		return "roundrobin"
	case BalanceLeastConn:
		return "leastconn"
	case BalanceSource:
		return "source"
	}
	return "balance-" + strconv.Itoa(int(b))
}

// Health is the reply a rule gives to health probes. The zero value is none.
type Health uint8

const (
	HealthNone Health = 0
	HealthTCP  Health = 1 // "OK\n", then close
	HealthHTTP Health = 2 // "HTTP/1.0 200 OK" with a short body, then close
)

func (h Health) String() string {
	switch h {
	case HealthNone:
		return "none"
	case HealthTCP:
		return "tcp"
	case HealthHTTP:
		return "http"
	}
	return "health-" + strconv.Itoa(int(h))
}

// ProxyVersion is the PROXY protocol version a rule sends to its backend;
// zero sends none.
type ProxyVersion uint8

const (
	ProxyNone ProxyVersion = 0
	ProxyV1   ProxyVersion = 1
	ProxyV2   ProxyVersion = 2
)

func (v ProxyVersion) String() string {
	switch v {
	case ProxyNone:
		return "none"
	case ProxyV1:
		return "v1"
	case ProxyV2:
		return "v2"
	}
	return "v" + strconv.Itoa(int(v))
}

// SockBufAuto is Rule.SockBuf for sockbuf=auto: no bound, the kernel tunes
// the socket buffers itself. Sizes of sockbuf=SIZE lie within
// [MinSockBuf, MaxSockBuf].
const (
	SockBufAuto = -1
	MinSockBuf  = 4 << 10
	MaxSockBuf  = 64 << 20
)

// PortRange is an inclusive range of ports. A single port has First == Last.
type PortRange struct {
	First, Last uint16
}

// Len returns the number of ports in the range (0 for a reversed range).
func (p PortRange) Len() int {
	if p.Last < p.First {
		return 0
	}
	return int(p.Last) - int(p.First) + 1
}

func (p PortRange) String() string {
	if p.First == p.Last {
		return strconv.Itoa(int(p.First))
	}
	return strconv.Itoa(int(p.First)) + "-" + strconv.Itoa(int(p.Last))
}

// Target is one backend of a pool: an address and a port or port range.
// A target given by name has Host set and no Addr: each address the name
// resolves to is a backend (names.go).
type Target struct {
	Addr  netip.Addr
	Ports PortRange
	Host  string // a host name, lower case; "" for an address
}

// Rule is one line of the table: where to listen, what to do with a new
// connection, and where to send it.
//
// The zero value of every option is its default; two rules that mean the
// same thing are equal field by field (Parse normalizes: host pif is "",
// prefixes are masked).
type Rule struct {
	Proto       Proto
	ListenPif   string // "" = host
	ListenAddr  netip.Addr
	ListenPorts PortRange

	TargetPif string   // "" = host
	Targets   []Target // empty: no target (a health-only rule)

	Weak        bool           // ports that fail to bind are skipped and reported
	AcceptProxy bool           // a PROXY header is expected from trusted sources
	Trusted     []netip.Prefix // sources that may send a header; empty = every source
	SendProxy   ProxyVersion
	Health      Health
	Monitor     []netip.Prefix // sources whose conns get the health reply
	Allow       []netip.Prefix // if set, only these sources
	Deny        []netip.Prefix // never these sources
	Rate        int            // new conns per second per source; 0 = unlimited
	MaxConn     int            // concurrent conns on the rule; 0 = unlimited
	Splice      SpliceMode
	Balance     Balance
	SockBuf     int // SO_SNDBUF and SO_RCVBUF of both sockets of a session, bytes; 0 = the engine's default, SockBufAuto = the kernel's autotuning

	// Routing by TLS ClientHello (routes.go): names lowercase without a
	// trailing dot, "*.b.example.com" for a wildcard; ALPN protocol names.
	// Empty: the rule matches any hello (the key's default route).
	SNI  []string
	ALPN []string

	ConnectTimeout   time.Duration // 0 = the engine's default
	IdleTimeout      time.Duration
	HandshakeTimeout time.Duration

	TLS     TLS           // termination and origination (tls.go)
	Check   Check         // active health checks of the pool (check.go)
	Resolve time.Duration // names: re-resolve interval; 0 = DefaultResolve, ResolveOff = once (names.go)
}

// Key is a listen key: the identity of one listening socket, kept across
// table changes.
type Key struct {
	Pif   string // "" = host
	Proto Proto
	Addr  netip.Addr
	Port  uint16
}

func (k Key) String() string {
	s := k.Proto.String() + " "
	if k.Pif != "" {
		s += k.Pif + "/"
	}
	return s + netip.AddrPortFrom(k.Addr, k.Port).String()
}

// ListenKeys returns the rule's listen keys, one per port, in port order.
func (r *Rule) ListenKeys() []Key {
	n := r.ListenPorts.Len()
	keys := make([]Key, 0, n)
	for i := 0; i < n; i++ {
		keys = append(keys, Key{Pif: r.ListenPif, Proto: r.Proto, Addr: r.ListenAddr, Port: r.ListenPorts.First + uint16(i)})
	}
	return keys
}

// TargetFor returns the backend pool of the i-th listen port: a target whose
// range has the listen range's length is offset by i, a single-port target is
// used as is. It returns nil for a rule without targets. Targets given by
// name are left out (TargetForAddrs has their addresses).
func (r *Rule) TargetFor(i int) []netip.AddrPort { return r.TargetForAddrs(i, nil) }
