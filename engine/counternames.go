package engine

import (
	"sort"
	"sync/atomic"

	"github.com/sluice-proxy/sluice/balance"
	"github.com/sluice-proxy/sluice/internal/logsink"
	"github.com/sluice-proxy/sluice/observe"
	"github.com/sluice-proxy/sluice/rules"
)

// The names of the counters: one table, read by every output. A number of
// Stats appears once here (a CounterDef) with each name it has for users:
// its Prometheus family and label values (package metrics builds its
// families from Families and these rows), its ctl stats name (Counters) and,
// for the per-session numbers a rule sums, its access-log field (logEnd).
// The user-visible names are documented in README.md and never change
// without a reason; the Go names use one word pair for directions, Up
// (client to backend) and Down (backend to client), which the table maps to
// each output's own words: bytes_in/bytes_out in ctl stats, direction="in"/
// "out" and "to_target"/"to_client" in Prometheus, bytes_up/bytes_down in
// the access log.

// Kind is a family's Prometheus type.
type Kind uint8

const (
	KindGauge Kind = iota
	KindCounter
	KindHistogram
)

// Family is one Prometheus family. Its samples are the CounterDefs that
// name it; a family that no CounterDef names (its label values are not
// fixed: end codes, termination codes, refusals; or a histogram) is sampled
// by metrics from the Stats field its help names.
type Family struct {
	Name    string // after the namespace "sluice_"
	Help    string
	Kind    Kind
	Labels  []string // per-rule families: after the labels rule and pif
	PerRule bool     // one sample set per rule of Stats.Rules
	Proto   string   // per-rule families: the rules of this protocol only; "" every rule
}

// CounterDef is one number of Stats under each of its names. Exactly one of
// Get and Rule is set.
type CounterDef struct {
	Family *Family  // exported as a sample of it; nil: not exported
	Labels []string // the sample's label values, in Family.Labels' order
	Stat   string   // ctl stats name, "rule.KEY." before it for a per-rule one; "": not shown
	Log    string   // per-rule: the access-log field of the same number for one session; "": none
	Known  bool     // a negative value means unknown: Prometheus leaves the sample out
	Get    func(*Stats) int64
	Rule   func(*RuleStats) int64
}

var (
	tcp = rules.TCP.String()
	udp = rules.UDP.String()
)

// The families, by the order of Families.
var (
	famEventLoops        = &Family{Name: "event_loops", Help: "Event loops running.", Kind: KindGauge}
	famSessions          = &Family{Name: "sessions", Help: "Live sessions.", Kind: KindGauge}
	FamSessionsEnded     = &Family{Name: "sessions_ended_total", Help: "Sessions ended, by end code (reason is the code's stable name).", Kind: KindCounter, Labels: []string{"code", "reason"}}
	famConnectErrors     = &Family{Name: "connect_errors_total", Help: "Backend connects that failed (each try of a pool counts).", Kind: KindCounter}
	famBuffers           = &Family{Name: "buffers", Help: "Channel buffers of the loops' pools, in use by sessions or free in the pools.", Kind: KindGauge, Labels: []string{"state"}}
	famPipes             = &Family{Name: "pipes", Help: "Splice pipes of the loops' pools, in use by sessions or free in the pools.", Kind: KindGauge, Labels: []string{"state"}}
	famPipesOpen         = &Family{Name: "pipes_open", Help: "Splice pipes open in the process (the pipe budget's count).", Kind: KindGauge}
	famPipesDenied       = &Family{Name: "pipes_denied_total", Help: "Times a pipe was wanted and the pipe budget refused (the channel kept its buffer).", Kind: KindCounter}
	famUDPFlows          = &Family{Name: "udp_flows", Help: "Live UDP flows (one per client address and port).", Kind: KindGauge}
	famUDPFlowsOpened    = &Family{Name: "udp_flows_opened_total", Help: "UDP flows opened.", Kind: KindCounter}
	famUDPFlowsExpired   = &Family{Name: "udp_flows_expired_total", Help: "UDP flows ended by timeout.idle (flows whose target replied).", Kind: KindCounter}
	famUDPFlowsUnanswer  = &Family{Name: "udp_flows_unanswered_total", Help: "UDP flows ended because their target never replied within min(timeout.idle, 5s) of the client's last datagram.", Kind: KindCounter}
	famUDPFlowsDenied    = &Family{Name: "udp_flows_denied_total", Help: "New UDP sources refused a flow because the process's flow budget (a quarter of the fd limit, at most 16384) was spent; their datagrams are dropped.", Kind: KindCounter}
	famUDPDatagrams      = &Family{Name: "udp_datagrams_total", Help: "UDP datagrams forwarded, by direction.", Kind: KindCounter, Labels: []string{"direction"}}
	famUDPDropped        = &Family{Name: "udp_dropped_total", Help: "UDP datagrams not forwarded (flow budget spent, no fd, buffer full).", Kind: KindCounter}
	famFDsOpen           = &Family{Name: "fds_open", Help: "File descriptors open in the process (/proc/self/fd), read at scrape time.", Kind: KindGauge}
	famLogDropped        = &Family{Name: "log_dropped_total", Help: "Log lines dropped because the log output (stderr) did not take them in time; the data path never waits for it.", Kind: KindCounter}
	famDraining          = &Family{Name: "draining", Help: "1 once the daemon is stopping and drains its sessions.", Kind: KindGauge}
	famTableGeneration   = &Family{Name: "table_generation", Help: "Generation of the active rule table (one more at each commit).", Kind: KindGauge}
	famTablePending      = &Family{Name: "table_pending", Help: "1 while an applied table awaits its commit or rollback.", Kind: KindGauge}
	famTableConfirmBy    = &Family{Name: "table_confirm_deadline_seconds", Help: "Unix time at which a commit-confirmed apply rolls back by itself unless confirmed; 0 when none is pending.", Kind: KindGauge}
	famTableOperations   = &Family{Name: "table_operations_total", Help: "Table operations of the engine: apply, commit, rollback.", Kind: KindCounter, Labels: []string{"op"}}
	FamTableApplySeconds = &Family{Name: "table_apply_seconds", Help: "Time the engine took to apply a table (bind, sync the loops).", Kind: KindHistogram}
	famCtlTransactions   = &Family{Name: "ctl_transactions_total", Help: "Writing control transactions by outcome, as the control server counts them.", Kind: KindCounter, Labels: []string{"outcome"}}

	famRulePorts          = &Family{Name: "rule_ports", Help: "Listen ports of the rule: bound (serving, or bound by an apply awaiting commit) and failed to bind at its apply.", Kind: KindGauge, Labels: []string{"state"}, PerRule: true}
	famRuleConnections    = &Family{Name: "rule_connections_total", Help: "Connections accepted by the rule (entered its handshake); a route's: those routed to it.", Kind: KindCounter, PerRule: true, Proto: tcp}
	FamRuleRefused        = &Family{Name: "rule_refused_total", Help: "Connections a handshake step closed, by step and reason (the end code's name).", Kind: KindCounter, Labels: []string{"step", "reason"}, PerRule: true, Proto: tcp}
	famRuleSessions       = &Family{Name: "rule_sessions", Help: "Live connections of the rule, from accept to end (handshakes included).", Kind: KindGauge, PerRule: true, Proto: tcp}
	FamRuleTerminations   = &Family{Name: "rule_terminations_total", Help: "Connections of the rule ended, by two-letter termination code (who ended it, in which phase; see README).", Kind: KindCounter, Labels: []string{"term"}, PerRule: true, Proto: tcp}
	famRuleBytes          = &Family{Name: "rule_bytes_total", Help: "Bytes forwarded: in, client to backend; out, backend to client.", Kind: KindCounter, Labels: []string{"direction"}, PerRule: true, Proto: tcp}
	famRuleBytesMoved     = &Family{Name: "rule_bytes_moved_total", Help: "Bytes forwarded (both ways) by how: splice(2) through a pipe, or a buffer.", Kind: KindCounter, Labels: []string{"via"}, PerRule: true, Proto: tcp}
	famRuleConnectErrors  = &Family{Name: "rule_connect_errors_total", Help: "Backend connects of the rule that failed (each try of the pool).", Kind: KindCounter, PerRule: true, Proto: tcp}
	famRuleConnectRetries = &Family{Name: "rule_connect_retries_total", Help: "Connects to a further backend of the pool after one failed.", Kind: KindCounter, PerRule: true, Proto: tcp}
	famRuleHealthReplies  = &Family{Name: "rule_health_replies_total", Help: "Health replies sent: ok (200, OK) or fail (503, DOWN).", Kind: KindCounter, Labels: []string{"result"}, PerRule: true, Proto: tcp}
	famRuleProxyHeaders   = &Family{Name: "rule_proxy_headers_total", Help: "PROXY headers accepted from clients, by version.", Kind: KindCounter, Labels: []string{"version"}, PerRule: true, Proto: tcp}
	FamRuleHandshakeSecs  = &Family{Name: "rule_handshake_seconds", Help: "Accept to the end of the incoming handshake, for connections that passed it.", Kind: KindHistogram, PerRule: true, Proto: tcp}
	FamRuleConnectSecs    = &Family{Name: "rule_connect_seconds", Help: "End of the handshake to the backend connected, retries included.", Kind: KindHistogram, PerRule: true, Proto: tcp}
	FamRuleSessionSecs    = &Family{Name: "rule_session_seconds", Help: "Accept to end, for sessions that passed the handshake.", Kind: KindHistogram, PerRule: true, Proto: tcp}
	FamRuleTLSHelloBytes  = &Family{Name: "rule_tls_hello_bytes", Help: "Size of the TLS ClientHellos (bytes the sni stage read) of connections that chose the route; routes only.", Kind: KindHistogram, PerRule: true, Proto: tcp}
	famRuleUDPFlows       = &Family{Name: "rule_udp_flows", Help: "Live UDP flows of the rule.", Kind: KindGauge, PerRule: true, Proto: udp}
	famRuleUDPFlowsOpened = &Family{Name: "rule_udp_flows_opened_total", Help: "UDP flows the rule opened.", Kind: KindCounter, PerRule: true, Proto: udp}
	famRuleUDPDatagrams   = &Family{Name: "rule_udp_datagrams_total", Help: "UDP datagrams the rule forwarded, by direction.", Kind: KindCounter, Labels: []string{"direction"}, PerRule: true, Proto: udp}
	famRuleUDPDropped     = &Family{Name: "rule_udp_dropped_total", Help: "UDP datagrams of the rule not forwarded.", Kind: KindCounter, PerRule: true, Proto: udp}

	FamBackendUp        = &Family{Name: "backend_up", Help: "1 when the backend is up (its checks and passive health), else 0; rules with check= only (RuleStats.Checked).", Kind: KindGauge, Labels: []string{"backend"}, PerRule: true, Proto: tcp}
	FamBackendChecks    = &Family{Name: "backend_checks_total", Help: "Active checks of the backend by result: ok, fail, timeout; rules with check= only (RuleStats.Checked).", Kind: KindCounter, Labels: []string{"backend", "result"}, PerRule: true, Proto: tcp}
	FamBackendCheckSecs = &Family{Name: "backend_check_seconds", Help: "Latency of the rule's active checks, every backend and result (RuleStats.CheckTime).", Kind: KindHistogram, PerRule: true, Proto: tcp}

	famTLSHandshakes     = &Family{Name: "tls_handshakes_total", Help: "Client side TLS handshakes of terminating routes, by result: ok, failed (an alert, bytes that are not TLS, a missing client certificate, a timeout).", Kind: KindCounter, Labels: []string{"result"}}
	famTLSVersions       = &Family{Name: "tls_handshake_versions_total", Help: "Successful client side TLS handshakes, by version: 1.2, 1.3.", Kind: KindCounter, Labels: []string{"version"}}
	famTLSResumed        = &Family{Name: "tls_resumptions_total", Help: "Successful client side TLS handshakes that resumed a session (a ticket).", Kind: KindCounter}
	FamTLSHandshakeSecs  = &Family{Name: "tls_handshake_seconds", Help: "Duration of the successful client side TLS handshakes (the hello read to the handshake's end), every terminating route (Stats.TLS.HandshakeTime).", Kind: KindHistogram}
	FamRuleTLSCertExpiry = &Family{Name: "rule_tls_cert_expiry_seconds", Help: "Seconds left until the terminating rule's certificate expires (negative once expired), as loaded by the last apply; terminating rules only (RuleStats.Cert).", Kind: KindGauge, PerRule: true, Proto: tcp}

	FamPifUp = &Family{Name: "pif_up", Help: "1 while the pif's path still names the network namespace the daemon entered at start, 0 once it is gone (ip netns del) or names another: what runs there goes on, but a table naming the pif is refused until a restart; named pifs only.", Kind: KindGauge, Labels: []string{"pif"}}

	famStoreConnected = &Family{Name: "store_connected", Help: "1 while the fleet's store (etcd) answers, 0 while it is unreachable (the active table keeps serving); absent without store.etcd.", Kind: KindGauge}
	FamStoreVersion   = &Family{Name: "store_version", Help: "1, labelled with the store version the instance runs (its last committed assignment); absent before one.", Kind: KindGauge, Labels: []string{"version"}}
	famStoreLastApply = &Family{Name: "store_last_apply_seconds", Help: "Unix time of the last transaction run for an assignment of the store; 0 before one.", Kind: KindGauge}
	famStoreErrors    = &Family{Name: "store_errors_total", Help: "Store errors: etcd unreachable, lease lost, watch compacted, bad input (a key of another shape, a table invalid or over the size limit), an assignment not committed.", Kind: KindCounter}
)

// StoreStats are the numbers of the fleet's store (package store/etcd, run
// by the daemon): process-wide, like the log writer's, as one daemon runs
// one store loop. Enabled false: no store; its families are left out.
type StoreStats struct {
	Enabled   bool
	Connected bool
	Version   string
	LastApply int64 // unix seconds
	Errors    uint64
}

var storeSource atomic.Pointer[func() StoreStats]

// SetStoreSource sets what the sluice_store_* families read at scrape time;
// nil: no store.
func SetStoreSource(f func() StoreStats) {
	if f == nil {
		storeSource.Store(nil)
		return
	}
	storeSource.Store(&f)
}

// StoreNow reads the store's numbers now.
func StoreNow() StoreStats {
	if f := storeSource.Load(); f != nil {
		return (*f)()
	}
	return StoreStats{}
}

// storeGet is a CounterDef's Get of a store number: -1 (left out) without
// a store.
func storeGet(f func(StoreStats) int64) func(*Stats) int64 {
	return func(*Stats) int64 {
		st := StoreNow()
		if !st.Enabled {
			return -1
		}
		return f(st)
	}
}

// Families are every Prometheus family of the engine's counters, in the
// order they are described. The exported ones have no CounterDef: metrics
// samples them itself.
var Families = []*Family{
	famEventLoops, famSessions, FamSessionsEnded, famConnectErrors, famBuffers, famPipes, famPipesOpen, famPipesDenied,
	famUDPFlows, famUDPFlowsOpened, famUDPFlowsExpired, famUDPFlowsUnanswer, famUDPFlowsDenied, famUDPDatagrams, famUDPDropped, famFDsOpen, famLogDropped, famDraining,
	famTableGeneration, famTablePending, famTableConfirmBy, famTableOperations, FamTableApplySeconds, famCtlTransactions,
	famRulePorts, famRuleConnections, FamRuleRefused, famRuleSessions, FamRuleTerminations, famRuleBytes, famRuleBytesMoved,
	famRuleConnectErrors, famRuleConnectRetries, famRuleHealthReplies, famRuleProxyHeaders,
	FamRuleHandshakeSecs, FamRuleConnectSecs, FamRuleSessionSecs, FamRuleTLSHelloBytes,
	famRuleUDPFlows, famRuleUDPFlowsOpened, famRuleUDPDatagrams, famRuleUDPDropped,
	FamBackendUp, FamBackendChecks, FamBackendCheckSecs,
	famStoreConnected, FamStoreVersion, famStoreLastApply, famStoreErrors,
	famTLSHandshakes, famTLSVersions, famTLSResumed, FamTLSHandshakeSecs, FamRuleTLSCertExpiry,
	FamPifUp,
}

func b2i(b bool) int64 {
	if b {
		return 1
	}
	return 0
}

// EngineDefs are the engine-wide numbers, in ctl stats' order (the end
// codes, ended.CODE, follow them there).
var EngineDefs = []CounterDef{
	{Stat: "loops", Family: famEventLoops, Get: func(s *Stats) int64 { return int64(s.Loops) }},
	{Stat: "sessions", Family: famSessions, Get: func(s *Stats) int64 { return s.Sessions }},
	{Stat: "connect_errors", Family: famConnectErrors, Get: func(s *Stats) int64 { return int64(s.ConnectErrors) }},
	{Stat: "buffers_in_use", Family: famBuffers, Labels: []string{"in_use"}, Get: func(s *Stats) int64 { return int64(s.Pools.BuffersInUse) }},
	{Stat: "buffers_free", Family: famBuffers, Labels: []string{"free"}, Get: func(s *Stats) int64 { return int64(s.Pools.BuffersFree) }},
	{Stat: "pipes_in_use", Family: famPipes, Labels: []string{"in_use"}, Get: func(s *Stats) int64 { return int64(s.Pools.PipesInUse) }},
	{Stat: "pipes_free", Family: famPipes, Labels: []string{"free"}, Get: func(s *Stats) int64 { return int64(s.Pools.PipesFree) }},
	{Stat: "pipes_open", Family: famPipesOpen, Get: func(s *Stats) int64 { return s.PipesOpen }},
	{Stat: "pipes_denied", Family: famPipesDenied, Get: func(s *Stats) int64 { return s.PipesDenied }},
	{Stat: "udp_flows", Family: famUDPFlows, Get: func(s *Stats) int64 { return s.UDPFlows }},
	{Stat: "udp_flows_opened", Family: famUDPFlowsOpened, Get: func(s *Stats) int64 { return int64(s.UDPFlowsOpened) }},
	{Stat: "udp_flows_expired", Family: famUDPFlowsExpired, Get: func(s *Stats) int64 { return int64(s.UDPFlowsExpired) }},
	{Stat: "udp_flows_unanswered", Family: famUDPFlowsUnanswer, Get: func(s *Stats) int64 { return int64(s.UDPFlowsUnanswered) }},
	{Stat: "udp_flows_denied", Family: famUDPFlowsDenied, Get: func(s *Stats) int64 { return int64(s.UDPFlowsDenied) }},
	{Stat: "udp_datagrams_in", Family: famUDPDatagrams, Labels: []string{"to_target"}, Get: func(s *Stats) int64 { return int64(s.UDPDatagramsUp) }},
	{Stat: "udp_datagrams_out", Family: famUDPDatagrams, Labels: []string{"to_client"}, Get: func(s *Stats) int64 { return int64(s.UDPDatagramsDown) }},
	{Stat: "udp_dropped", Family: famUDPDropped, Get: func(s *Stats) int64 { return int64(s.UDPDropped) }},
	{Stat: "fds", Family: famFDsOpen, Known: true, Get: func(s *Stats) int64 { return int64(s.FDs) }},
	// Process-wide, read at scrape time: the log writer is the process's, not the engine's.
	{Stat: "log_dropped", Family: famLogDropped, Get: func(*Stats) int64 { return int64(logsink.Dropped()) }},
	{Stat: "draining", Family: famDraining, Get: func(s *Stats) int64 { return b2i(s.Draining) }},
	{Stat: "generation", Family: famTableGeneration, Get: func(s *Stats) int64 { return int64(s.Table.Generation) }},
	{Stat: "rules", Get: func(s *Stats) int64 { return int64(len(s.Rules)) }},
	{Stat: "tls.handshakes_ok", Family: famTLSHandshakes, Labels: []string{"ok"}, Get: func(s *Stats) int64 { return int64(s.TLS.OK) }},
	{Stat: "tls.handshakes_failed", Family: famTLSHandshakes, Labels: []string{"failed"}, Get: func(s *Stats) int64 { return int64(s.TLS.Failed) }},
	{Stat: "tls.tls1_2", Family: famTLSVersions, Labels: []string{"1.2"}, Get: func(s *Stats) int64 { return int64(s.TLS.TLS12) }},
	{Stat: "tls.tls1_3", Family: famTLSVersions, Labels: []string{"1.3"}, Get: func(s *Stats) int64 { return int64(s.TLS.TLS13) }},
	{Stat: "tls.resumed", Family: famTLSResumed, Get: func(s *Stats) int64 { return int64(s.TLS.Resumed) }},
	// The store's, process-wide (StoreStats); in ctl stats as store.*
	// only with a store (StoreCounters): ctl stats has no "absent".
	{Family: famStoreConnected, Known: true, Get: storeGet(func(st StoreStats) int64 { return b2i(st.Connected) })},
	{Family: famStoreLastApply, Known: true, Get: storeGet(func(st StoreStats) int64 { return st.LastApply })},
	{Family: famStoreErrors, Known: true, Get: storeGet(func(st StoreStats) int64 { return int64(st.Errors) })},
}

// TableDefs are the rule table's and the control transactions' numbers, in
// ctl stats' order.
var TableDefs = []CounterDef{
	{Stat: "table.pending", Family: famTablePending, Get: func(s *Stats) int64 { return b2i(s.Table.Pending) }},
	{Stat: "table.confirm_deadline", Family: famTableConfirmBy, Get: func(s *Stats) int64 { return s.Table.ConfirmDeadline }},
	{Stat: "table.applies", Family: famTableOperations, Labels: []string{OpApply.String()}, Get: func(s *Stats) int64 { return int64(s.Table.Applies) }},
	{Stat: "table.commits", Family: famTableOperations, Labels: []string{OpCommit.String()}, Get: func(s *Stats) int64 { return int64(s.Table.Commits) }},
	{Stat: "table.rollbacks", Family: famTableOperations, Labels: []string{OpRollback.String()}, Get: func(s *Stats) int64 { return int64(s.Table.Rollbacks) }},
	{Stat: "txn." + rules.TxnCommitted.String(), Family: famCtlTransactions, Labels: []string{rules.TxnCommitted.String()}, Get: func(s *Stats) int64 { return int64(s.Table.Committed) }},
	{Stat: "txn." + rules.TxnRolledBack.String(), Family: famCtlTransactions, Labels: []string{rules.TxnRolledBack.String()}, Get: func(s *Stats) int64 { return int64(s.Table.RolledBack) }},
	{Stat: "txn." + rules.TxnFailed.String(), Family: famCtlTransactions, Labels: []string{rules.TxnFailed.String()}, Get: func(s *Stats) int64 { return int64(s.Table.Failed) }},
}

// Indexes of RuleDefs that the access log reads its field names from.
const (
	ruleDefBytesUp   = 1
	ruleDefBytesDown = 2
	ruleDefSpliced   = 3
)

// RuleDefs are one rule's numbers: those with a ctl stats name first, in its
// order (the termination codes, term.CODE, follow them there).
var RuleDefs = []CounterDef{
	{Stat: "sessions", Family: famRuleSessions, Rule: func(r *RuleStats) int64 { return r.Sessions }},
	ruleDefBytesUp:   {Stat: "bytes_in", Log: "bytes_up", Family: famRuleBytes, Labels: []string{"in"}, Rule: func(r *RuleStats) int64 { return int64(r.BytesUp) }},
	ruleDefBytesDown: {Stat: "bytes_out", Log: "bytes_down", Family: famRuleBytes, Labels: []string{"out"}, Rule: func(r *RuleStats) int64 { return int64(r.BytesDown) }},
	ruleDefSpliced:   {Stat: "spliced", Log: "spliced", Family: famRuleBytesMoved, Labels: []string{"splice"}, Rule: func(r *RuleStats) int64 { return int64(r.Spliced) }},
	{Stat: "connect_errors", Family: famRuleConnectErrors, Rule: func(r *RuleStats) int64 { return int64(r.ConnectErrors) }},
	{Stat: "retries", Family: famRuleConnectRetries, Rule: func(r *RuleStats) int64 { return int64(r.Retries) }},
	{Stat: "ports_bound", Family: famRulePorts, Labels: []string{"bound"}, Rule: func(r *RuleStats) int64 { return int64(len(r.Listeners)) }},
	{Stat: "ports_failed", Family: famRulePorts, Labels: []string{"failed"}, Rule: func(r *RuleStats) int64 { return int64(len(r.Failed)) }},
	{Stat: "backends", Rule: func(r *RuleStats) int64 { return int64(len(r.Backends)) }},
	{Stat: "backends_up", Rule: backendsUp},
	{Stat: "checks_ok", Rule: func(r *RuleStats) int64 { return checkCount(r, balance.ResultOK) }},
	{Stat: "checks_failed", Rule: func(r *RuleStats) int64 { return checkCount(r, balance.ResultFail) }},
	{Stat: "checks_timeout", Rule: func(r *RuleStats) int64 { return checkCount(r, balance.ResultTimeout) }},

	{Family: famRuleBytesMoved, Labels: []string{"buffer"}, Rule: func(r *RuleStats) int64 {
		return int64(r.BytesUp + r.BytesDown - min(r.Spliced, r.BytesUp+r.BytesDown))
	}},
	{Family: famRuleConnections, Rule: func(r *RuleStats) int64 { return int64(r.Policy.Accepted) }},
	{Family: famRuleHealthReplies, Labels: []string{"ok"}, Rule: func(r *RuleStats) int64 { return int64(r.Policy.HealthUp) }},
	{Family: famRuleHealthReplies, Labels: []string{"fail"}, Rule: func(r *RuleStats) int64 { return int64(r.Policy.HealthDown) }},
	{Family: famRuleProxyHeaders, Labels: []string{"v1"}, Rule: func(r *RuleStats) int64 { return int64(r.Policy.ProxyV1) }},
	{Family: famRuleProxyHeaders, Labels: []string{"v2"}, Rule: func(r *RuleStats) int64 { return int64(r.Policy.ProxyV2) }},
	{Family: famRuleUDPFlows, Rule: func(r *RuleStats) int64 { return r.UDP.Flows }},
	{Family: famRuleUDPFlowsOpened, Rule: func(r *RuleStats) int64 { return int64(r.UDP.Opened) }},
	{Family: famRuleUDPDatagrams, Labels: []string{"to_target"}, Rule: func(r *RuleStats) int64 { return int64(r.UDP.DatagramsUp) }},
	{Family: famRuleUDPDatagrams, Labels: []string{"to_client"}, Rule: func(r *RuleStats) int64 { return int64(r.UDP.DatagramsDown) }},
	{Family: famRuleUDPDropped, Rule: func(r *RuleStats) int64 { return int64(r.UDP.Dropped) }},
}

// backendsUp counts the rule's backends that passive health has up.
func backendsUp(r *RuleStats) int64 {
	n := int64(0)
	for _, be := range r.Backends {
		if be.Up {
			n++
		}
	}
	return n
}

// checkCount sums the checks of the rule's backends that ended with res.
func checkCount(r *RuleStats, res balance.Result) int64 {
	n := int64(0)
	for _, be := range r.Checked {
		n += int64(be.Check.Counts[res])
	}
	return n
}

// The access log's field names of the per-session numbers a rule sums.
var (
	logBytesUp   = RuleDefs[ruleDefBytesUp].Log
	logBytesDown = RuleDefs[ruleDefBytesDown].Log
	logSpliced   = RuleDefs[ruleDefSpliced].Log
)

// Counters returns Stats as named counters, for ctl stats: engine-wide
// ones (EngineDefs), per end code ("ended.CODE", sorted), the store's
// (store.*, with a store only: AppendStoreCounters), the table's
// (TableDefs), then per rule ("rule.KEY.NAME": RuleDefs, then "term.CODE"
// sorted).
func (e *Engine) Counters() []observe.Counter { return countersOf(e.Stats()) }

func countersOf(s Stats) []observe.Counter {
	var out []observe.Counter
	for i := range EngineDefs {
		if d := &EngineDefs[i]; d.Stat != "" {
			out = append(out, observe.Counter{Name: d.Stat, Value: d.Get(&s)})
		}
	}
	out = appendSorted(out, "ended.", s.Ended)
	out = AppendStoreCounters(out, StoreNow())
	for i := range TableDefs {
		if d := &TableDefs[i]; d.Stat != "" {
			out = append(out, observe.Counter{Name: d.Stat, Value: d.Get(&s)})
		}
	}
	for i := range s.Rules {
		r := &s.Rules[i]
		p := "rule." + r.Listen + "."
		for j := range RuleDefs {
			if d := &RuleDefs[j]; d.Stat != "" {
				out = append(out, observe.Counter{Name: p + d.Stat, Value: d.Rule(r)})
			}
		}
		out = appendSorted(out, p+"term.", r.Terms)
		steps := make([]string, 0, len(r.Policy.Refused))
		for step := range r.Policy.Refused {
			steps = append(steps, step)
		}
		sort.Strings(steps)
		for _, step := range steps {
			out = appendSorted(out, p+"refused."+step+".", r.Policy.Refused[step])
		}
	}
	return out
}

// The store's names in ctl stats; the version the instance runs is in the
// name of a counter of value 1, as sluice_store_version carries it in a
// label.
const (
	StatStoreConnected = "store.connected"
	StatStoreLastApply = "store.last_apply"
	StatStoreErrors    = "store.errors"
	StatStoreVersion   = "store.version." // + VERSION
)

// AppendStoreCounters appends st as ctl stats counters: nothing without a
// store; store.version.VERSION only once a version runs.
func AppendStoreCounters(out []observe.Counter, st StoreStats) []observe.Counter {
	if !st.Enabled {
		return out
	}
	out = append(out, observe.Counter{Name: StatStoreConnected, Value: b2i(st.Connected)},
		observe.Counter{Name: StatStoreLastApply, Value: st.LastApply},
		observe.Counter{Name: StatStoreErrors, Value: int64(st.Errors)})
	if st.Version != "" {
		out = append(out, observe.Counter{Name: StatStoreVersion + st.Version, Value: 1})
	}
	return out
}

// appendSorted appends m's counts named prefix+key, in key order.
func appendSorted(out []observe.Counter, prefix string, m map[string]uint64) []observe.Counter {
	n := len(out)
	for k, v := range m {
		out = append(out, observe.Counter{Name: prefix + k, Value: int64(v)})
	}
	add := out[n:]
	sort.Slice(add, func(i, j int) bool { return add[i].Name < add[j].Name })
	return out
}
