package rules

import (
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// String returns the rule's canonical line: the host pif and default options
// left out, options in a fixed order. Parse of the canonical line gives back
// an equal rule.
func (r *Rule) String() string {
	var b strings.Builder
	b.WriteString(r.Proto.String())
	b.WriteByte(' ')
	writePif(&b, r.ListenPif)
	writeAddrPorts(&b, r.ListenAddr, r.ListenPorts)
	if len(r.Targets) > 0 {
		b.WriteString(" -> ")
		writePif(&b, r.TargetPif)
		for i, t := range r.Targets {
			if i > 0 {
				b.WriteByte(',')
			}
			if t.Host != "" {
				b.WriteString(t.Host + ":" + t.Ports.String())
				continue
			}
			writeAddrPorts(&b, t.Addr, t.Ports)
		}
	}
	b.WriteString(r.routeWords())
	if r.Weak {
		b.WriteString(" weak")
	}
	if r.AcceptProxy {
		b.WriteString(" accept-proxy")
		if len(r.Trusted) > 0 {
			b.WriteByte('=')
			writeCIDRs(&b, r.Trusted)
		}
	}
	if r.SendProxy != ProxyNone {
		b.WriteString(" send-proxy=" + r.SendProxy.String())
	}
	if r.Health != HealthNone {
		b.WriteString(" health=" + r.Health.String())
	}
	writeCIDROpt(&b, "monitor", r.Monitor)
	writeCIDROpt(&b, "allow", r.Allow)
	writeCIDROpt(&b, "deny", r.Deny)
	if r.Rate > 0 {
		b.WriteString(" rate=" + strconv.Itoa(r.Rate) + "/s")
	}
	if r.MaxConn > 0 {
		b.WriteString(" maxconn=" + strconv.Itoa(r.MaxConn))
	}
	if r.Splice != SpliceAuto {
		b.WriteString(" splice=" + r.Splice.String())
	}
	if r.Balance != BalanceRoundRobin {
		b.WriteString(" balance=" + r.Balance.String())
	}
	if r.SockBuf != 0 {
		b.WriteString(" sockbuf=" + FormatSockBuf(r.SockBuf))
	}
	writeDurOpt(&b, "timeout.connect", r.ConnectTimeout)
	writeDurOpt(&b, "timeout.idle", r.IdleTimeout)
	writeDurOpt(&b, "timeout.handshake", r.HandshakeTimeout)
	writeTLS(&b, r.TLS)
	writeCheck(&b, r.Check)
	writeResolve(&b, r.Resolve)
	return b.String()
}

func writePif(b *strings.Builder, pif string) {
	if pif != "" && pif != HostPif {
		b.WriteString(pif)
		b.WriteByte('/')
	}
}

func writeAddrPorts(b *strings.Builder, a netip.Addr, p PortRange) {
	if a.Is6() {
		b.WriteByte('[')
		b.WriteString(a.String())
		b.WriteByte(']')
	} else {
		b.WriteString(a.String())
	}
	b.WriteByte(':')
	b.WriteString(p.String())
}

func writeCIDROpt(b *strings.Builder, name string, ps []netip.Prefix) {
	if len(ps) == 0 {
		return
	}
	b.WriteString(" " + name + "=")
	writeCIDRs(b, ps)
}

func writeCIDRs(b *strings.Builder, ps []netip.Prefix) {
	for i, p := range ps {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(p.String())
	}
}

func writeDurOpt(b *strings.Builder, name string, d time.Duration) {
	if d > 0 {
		b.WriteString(" " + name + "=" + FormatDuration(d))
	}
}

// FormatSockBuf writes a sockbuf value as Parse reads it: "auto", or the
// size in the largest unit that holds it exactly (256k, 1m, 5000).
func FormatSockBuf(n int) string {
	switch {
	case n == SockBufAuto:
		return "auto"
	case n%(1<<20) == 0:
		return strconv.Itoa(n>>20) + "m"
	case n%(1<<10) == 0:
		return strconv.Itoa(n>>10) + "k"
	}
	return strconv.Itoa(n)
}

// FormatDuration writes d as a Go duration without zero trailing units:
// "1m" rather than "1m0s", "1h30m" rather than "1h30m0s".
func FormatDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = s[:len(s)-2]
	}
	if strings.HasSuffix(s, "h0m") {
		s = s[:len(s)-2]
	}
	return s
}
