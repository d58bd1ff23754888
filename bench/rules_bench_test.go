package bench

// The decisions made from a rule for each new conn, through the packages'
// own entry points, with no socket involved:
//
//   - BenchmarkTrustCheck: accept-proxy's trusted-list check, on a source
//     outside the list (the whole list is scanned; such a conn is then a
//     plain client). A trusted source goes on to read its header from the
//     socket: that is BenchmarkProxyAccept.
//   - BenchmarkRuleConnRules: the rules step (allow/deny, rate, maxconn), and
//     the whole incoming chain without I/O (monitor, accept-proxy, rules).
//   - BenchmarkBalancePick: the session step's backend choice, as a session
//     uses the pool from dial to end (Start, Next, Target, Acquire,
//     Connected, Release).
//   - BenchmarkRuleParse and BenchmarkRuleTableDiff: the control side, per
//     rule line and per transaction (ctl's server diffs the table it is sent
//     against the active one; BenchmarkApply* measure that only buried in the
//     whole apply, socket work included).
//
// Each per-conn benchmark runs the handshake chain as the engine does:
// handshake.Get, Policy.Begin, Policy.RunIn, handshake.Put.
//
// Not here: the UDP per-datagram flow lookup. It is a map lookup inside
// engine.Listener.handleUDP (unexported, fed by the loop's recvfrom), so a
// test outside package engine can only reach it through a full datagram
// round trip, which measures the sockets rather than the lookup.
//
//	go test -run '^$' -bench 'Trust|Rule|Balance' -benchmem ./bench/

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/sluice-proxy/sluice/balance"
	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/handshake"
	"github.com/sluice-proxy/sluice/rules"
)

// benchChain runs rule line's incoming chain once per op on a conn from each
// of srcs in turn, at a clock advancing 1µs per op; every run must end in
// want.
func benchChain(b *testing.B, line string, srcs []netip.AddrPort, want handshake.Result) *handshake.Policy {
	b.Helper()
	r, err := rules.Parse(line)
	if err != nil {
		b.Fatal(err)
	}
	pol := handshake.NewPolicy(r, 0)
	// The chain never touches the conn's fd on these paths (no header is
	// read): the conn only carries its addresses.
	var in conn.Conn
	dst := netip.MustParseAddrPort("127.0.0.1:8080")
	run := func(i int) {
		in.Src, in.Dst = srcs[i%len(srcs)], dst
		st := handshake.Get(&in, nil)
		st.Now = int64(i) * 1000
		pol.Begin(st)
		if res, code := pol.RunIn(st); res != want {
			b.Fatalf("%s: source %v: %v %v, want %v", line, in.Src, res, code, want)
		}
		if st.Has(handshake.MaxConn) {
			pol.ReleaseSlot() // as the session's end does
		}
		handshake.Put(st)
	}
	// One round first, so sources the rate table has not seen yet (its
	// entries are made once) do not count in the steady state.
	for i := range srcs {
		run(i)
	}
	i := len(srcs)
	b.ReportAllocs()
	for b.Loop() {
		run(i)
		i++
	}
	return pol
}

// cidrList is n prefixes 10.i.0.0/16.
func cidrList(n int) string {
	ps := make([]string, n)
	for i := range ps {
		ps[i] = fmt.Sprintf("10.%d.0.0/16", i)
	}
	return strings.Join(ps, ",")
}

// sources are n client addresses 192.0.2.x (outside every list above).
func sources(n int) []netip.AddrPort {
	out := make([]netip.AddrPort, n)
	for i := range out {
		out[i] = netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, byte(2 + i/250), byte(1 + i%250)}), uint16(40000+i))
	}
	return out
}

func BenchmarkTrustCheck(b *testing.B) {
	for _, n := range []int{1, 4, 32} {
		b.Run(fmt.Sprintf("cidrs=%d", n), func(b *testing.B) {
			pol := benchChain(b, "tcp 127.0.0.1:8080 -> 127.0.0.1:80 accept-proxy="+cidrList(n), sources(1), handshake.Done)
			if s := pol.Stats(); s.ProxyUntrusted != s.Accepted {
				b.Fatalf("%d untrusted of %d: the check did not run", s.ProxyUntrusted, s.Accepted)
			}
		})
	}
}

func BenchmarkRuleConnRules(b *testing.B) {
	const base = "tcp 127.0.0.1:8080 -> 127.0.0.1:80 "
	cases := []struct {
		name, opts string
		srcs       int
	}{
		// Allowed: in the allow list, outside the deny list (both scanned).
		{"allow-deny", "allow=10.0.0.0/8,192.0.0.0/16 deny=192.0.66.0/24", 1},
		// 1 024 sources in turn, each well under its rate: a table lookup
		// and update per conn.
		{"rate", "rate=1000000/s", 1024},
		// A slot taken and given back per conn.
		{"maxconn", "maxconn=1000", 1},
		// Every step that needs no I/O: monitor (a miss), accept-proxy (an
		// untrusted source), then allow/deny, rate and maxconn.
		{"chain", "monitor=10.255.0.0/16 accept-proxy=" + cidrList(4) +
			" allow=10.0.0.0/8,192.0.0.0/16 deny=192.0.66.0/24 rate=1000000/s maxconn=1000", 1024},
	}
	for _, tc := range cases {
		b.Run(tc.name, func(b *testing.B) {
			pol := benchChain(b, base+tc.opts, sources(tc.srcs), handshake.Done)
			if s := pol.Stats(); s.Passed != s.Accepted || s.MaxConnInUse != 0 {
				b.Fatalf("%d passed of %d, %d maxconn slots left", s.Passed, s.Accepted, s.MaxConnInUse)
			}
		})
	}
}

func BenchmarkBalancePick(b *testing.B) {
	targets := []netip.AddrPort{
		netip.MustParseAddrPort("10.0.0.1:80"), netip.MustParseAddrPort("10.0.0.2:80"),
		netip.MustParseAddrPort("10.0.0.3:80"), netip.MustParseAddrPort("10.0.0.4:80"),
	}
	srcs := sources(256)
	for _, mode := range []rules.Balance{rules.BalanceRoundRobin, rules.BalanceLeastConn, rules.BalanceSource} {
		for _, down := range []bool{false, true} {
			name := mode.String() + "/backends=4"
			if down {
				name += "/one-down"
			}
			b.Run(name, func(b *testing.B) {
				p := balance.New(mode, targets)
				const now = int64(1e9) // within DownFor of the failure below
				if down {
					p.Failed(1, now) // skipped by Start (leastconn) and Next
				}
				i := 0
				b.ReportAllocs()
				for b.Loop() {
					first := p.Start(srcs[i%len(srcs)].Addr(), now)
					k := p.Next(first, 0, now)
					if k < 0 || down && k == 1 || !p.Target(k).IsValid() {
						b.Fatalf("picked backend %d", k)
					}
					p.Acquire(k)
					p.Connected(k)
					p.Release(k)
					i++
				}
			})
		}
	}
}

func BenchmarkRuleParse(b *testing.B) {
	for _, tc := range []struct{ name, line string }{
		{"simple", "tcp 0.0.0.0:8080 -> 127.0.0.1:80"},
		{"full", "tcp 0.0.0.0:8443 -> 10.0.0.1:443,10.0.0.2:443 accept-proxy=10.0.0.0/8,192.168.0.0/16 " +
			"send-proxy=v2 allow=10.0.0.0/8 rate=100/s maxconn=1000 balance=leastconn timeout.idle=1m"},
	} {
		b.Run(tc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := rules.Parse(tc.line); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkRuleTableDiff: a table of 1 000 one-port rules against the same
// table with its middle rule moved to another port, as BenchmarkApply*'s
// one-rule case sends it (same helpers).
func BenchmarkRuleTableDiff(b *testing.B) {
	const base, n = 21000, 1000
	addr := benchAddr()
	old := portRules(b, addr, base, n, 1)
	changed := oneRuleChange(b, old, addr, base+n)
	b.Run(fmt.Sprintf("rules=%d/one-changed", n), func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			d := rules.TableDiff(old, changed)
			if len(d.Added) != 1 || len(d.Removed) != 1 || len(d.Kept) != n-1 {
				b.Fatalf("diff: %d kept, %d added, %d removed", len(d.Kept), len(d.Added), len(d.Removed))
			}
		}
	})
}
