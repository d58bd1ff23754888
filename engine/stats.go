package engine

import (
	"encoding/binary"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/balance"
	"github.com/sluice-proxy/sluice/handshake"
	"github.com/sluice-proxy/sluice/rules"
)

// Snapshots of the counters: what Stats and Totals read, at scrape time.

// Listener states, as ListenerStats.State names them.
const (
	ListenerListening = "listening" // in the active table
	ListenerPending   = "pending"   // bound by an apply that awaits its commit
)

// ListenerStats is one listening socket of a rule.
type ListenerStats struct {
	Addr     netip.AddrPort
	State    string // ListenerListening or ListenerPending
	Accepted uint64 // tcp conns accepted on this port; a route's: routed to it
	Paused   uint64 // times accept paused for want of fds
}

// UDPStats are a udp rule's flow counters, summed over its ports.
type UDPStats struct {
	Flows                      int64 // live
	Opened, Expired            uint64
	DatagramsUp, DatagramsDown uint64 // client to target, target to client
	Dropped                    uint64
}

// RuleStats is one rule of the table, its sockets and its counters.
type RuleStats struct {
	Line      string // canonical rule line
	Listen    string // listen part, pif included; a port-0 rule shows the port it got
	Pif       string // the listen pif: "host" or its name
	Proto     string
	Requested int                    // ports the rule listens on
	Failed    []rules.PortError      // ports that failed to bind at its apply
	Listeners []ListenerStats        // bound ports
	Backends  []balance.BackendStats // every port's pool, in port order (passive health)
	Checked   []balance.BackendStats // check= rules: each backend once, in the order first seen (checkStats)
	CheckTime HistogramSnapshot      // check= rules: the latency of every check
	Routes    []string               // a route's: every route of its key (rule labels), in table order; nil otherwise

	Policy handshake.Stats // accepted, passed, refused by step and code, health replies, PROXY headers

	Sessions                     int64  // live, from accept to end
	BytesUp, BytesDown, Spliced  uint64 // up: client to backend, down: backend to client; Spliced: of both, through pipes
	ConnectErrors, Retries       uint64
	Terms                        map[string]uint64 // sessions ended, by termination code ("SC")
	Handshake, Connect, Duration HistogramSnapshot
	Hello                        HistogramSnapshot // a route's: sizes of the hellos that chose it; zero for a rule that does not route
	UDP                          UDPStats
	Cert                         *CertInfo // a terminating rule's certificate (tls.go); nil otherwise
}

// TableStats are the rule table's counters and its recent operations.
type TableStats struct {
	Generation                    uint64
	Pending                       bool     // an apply awaits commit or rollback
	ConfirmDeadline               int64    // Unix seconds at which a commit-confirmed apply rolls back by itself; 0: none
	Paused                        []string // listen keys the pending apply paused (closed at commit)
	Applies, Commits, Rollbacks   uint64
	ApplyTime                     HistogramSnapshot
	Committed, RolledBack, Failed uint64      // transactions by outcome, as the control server counted them
	Recent                        []TxnRecord // newest first
}

// counterStats fills the parts of s that come from this file.
func (e *Engine) counterStats(s *Stats) {
	s.FDs = openFDs()
	s.Draining = e.draining.Load()
	now := int64(time.Since(e.base))
	e.mu.Lock()
	defer e.mu.Unlock()
	t := &s.Table
	t.Generation, t.Pending = e.gen, e.pending != nil
	if !e.confirmBy.IsZero() {
		t.ConfirmDeadline = e.confirmBy.Unix()
	}
	t.Applies, t.Commits, t.Rollbacks = e.ctr.applies.Load(), e.ctr.commits.Load(), e.ctr.rollbacks.Load()
	t.ApplyTime = e.ctr.applyTime.Snapshot()
	t.Committed, t.RolledBack, t.Failed = e.ctr.txn.Committed.Load(), e.ctr.txn.RolledBack.Load(), e.ctr.txn.Failed.Load()
	for i := 1; i <= e.ctr.n; i++ {
		t.Recent = append(t.Recent, e.ctr.recent[(e.ctr.next-i+recentTxns)%recentTxns])
	}
	added := map[*Listener]bool{}
	if p := e.pending; p != nil {
		for _, ln := range p.added {
			added[ln] = true
		}
		for _, ln := range p.paused {
			t.Paused = append(t.Paused, ln.key.String())
		}
	}
	// A rule's listeners are found by listen key: a kept socket keeps the
	// Listener of the rule object it was first bound for (and its counters).
	// Port 0 is no identity: those are the rule's own.
	lns := e.statListeners()
	byKey := make(map[rules.Key]*Listener, len(lns))
	anyPort := map[*rules.Rule][]*Listener{}
	for _, ln := range lns {
		if ln.key.Port == 0 {
			anyPort[ln.rule] = append(anyPort[ln.rule], ln)
		} else {
			byKey[ln.key] = ln
		}
	}
	for _, r := range e.rules {
		rs := RuleStats{Line: r.String(), Listen: r.ListenString(), Pif: rules.PifName(r.ListenPif), Proto: r.Proto.String(),
			Requested: r.ListenPorts.Len(), Failed: e.ctr.bindFailed[r], Terms: map[string]uint64{}}
		lns := anyPort[r]
		if r.ListenPorts.First != 0 {
			for _, k := range r.ListenKeys() {
				if ln := byKey[k]; ln != nil {
					lns = append(lns, ln.routeFor(r))
					if rs.Routes == nil {
						for _, rl := range ln.routes {
							rs.Routes = append(rs.Routes, rl.rule.RouteString())
						}
					}
				}
			}
		}
		if len(lns) > 0 {
			rs.Listen = lns[0].ruleName()
		}
		for _, ln := range lns {
			st := ListenerListening
			if added[ln] {
				st = ListenerPending
			}
			acc := ln.Accepted.Load()
			if ln.route {
				acc = ln.Routed.Load() // a route's share of its key's socket
			}
			rs.Listeners = append(rs.Listeners, ListenerStats{Addr: ln.addr, State: st, Accepted: acc, Paused: ln.Paused.Load()})
			rs.Backends = append(rs.Backends, ln.pool.Stats(now)...)
			if u := ln.udp; u != nil {
				rs.UDP.Flows += u.FlowsActive.Load()
				rs.UDP.Opened += u.FlowsOpened.Load()
				rs.UDP.Expired += u.FlowsExpired.Load()
				rs.UDP.DatagramsUp += u.DatagramsUp.Load()
				rs.UDP.DatagramsDown += u.DatagramsDown.Load()
				rs.UDP.Dropped += u.Dropped.Load()
			}
		}
		if len(lns) > 0 {
			// Every port of a rule shares its policy and counters.
			rs.Policy = lns[0].policy.Stats()
			rs.Cert = certInfo(lns[0].policy.TLS())
			c := lns[0].ctr
			for i := range c.shards {
				sh := &c.shards[i]
				rs.Sessions += sh.live.Load()
				rs.BytesUp += sh.bytesUp.Load()
				rs.BytesDown += sh.bytesDown.Load()
				rs.Spliced += sh.spliced.Load()
			}
			rs.ConnectErrors, rs.Retries = c.connectErrors.Load(), c.retries.Load()
			for w := range c.terms {
				for p := range c.terms[w] {
					if n := c.terms[w][p].Load(); n > 0 {
						rs.Terms[Term{who: uint8(w), phase: uint8(p)}.String()] = n
					}
				}
			}
			rs.Handshake, rs.Connect, rs.Duration = c.handshake.Snapshot(), c.connect.Snapshot(), c.session.Snapshot()
			if lns[0].route {
				rs.Hello = c.hello.Snapshot()
			}
		}
		e.checkStats(&rs)
		s.Rules = append(s.Rules, rs)
	}
}

// Totals are the engine's running totals for rates, cheaper to read than
// Stats. They cover the rules of the current table only, so a table change
// can make them go down.
type Totals struct {
	Sessions  int64  // live
	Accepted  uint64 // tcp conns accepted
	BytesUp   uint64 // client to backend
	BytesDown uint64 // backend to client
	Datagrams uint64 // udp, both ways
}

// Totals returns the running totals.
func (e *Engine) Totals() Totals {
	t := Totals{Sessions: e.active.Load()}
	e.mu.Lock()
	defer e.mu.Unlock()
	seen := map[*RuleCounters]bool{}
	for _, ln := range e.statListeners() {
		t.Accepted += ln.Accepted.Load()
		if u := ln.udp; u != nil {
			t.Datagrams += u.DatagramsUp.Load() + u.DatagramsDown.Load()
		}
		if c := ln.ctr; !seen[c] { // once per rule: its ports share them
			seen[c] = true
			for i := range c.shards {
				t.BytesUp += c.shards[i].bytesUp.Load()
				t.BytesDown += c.shards[i].bytesDown.Load()
			}
		}
	}
	return t
}

// openFDs counts the process's open fds, as /proc/self/fd lists them (less
// the one reading it); -1 when it cannot be read. It reads the directory in
// one buffer, without a string per entry.
func openFDs() int {
	fd, err := unix.Open("/proc/self/fd", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1
	}
	defer unix.Close(fd)
	var buf [16 << 10]byte
	n := 0
	for {
		m, err := unix.Getdents(fd, buf[:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return -1
		}
		if m <= 0 {
			break
		}
		// struct linux_dirent64: ino u64, off s64, reclen u16, type u8, name.
		for off := 0; off+19 < m; {
			reclen := int(binary.NativeEndian.Uint16(buf[off+16:]))
			if reclen == 0 {
				break
			}
			name := buf[off+19 : off+reclen]
			if !(name[0] == '.' && (name[1] == 0 || name[1] == '.' && name[2] == 0)) {
				n++
			}
			off += reclen
		}
	}
	return n - 1
}
