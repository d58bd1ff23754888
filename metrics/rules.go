package metrics

import (
	"slices"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluice-proxy/sluice/engine"
	"github.com/sluice-proxy/sluice/rules"
)

// Per-rule families. Every sample carries the rule's listen part as the
// label rule ("tcp 0.0.0.0:8080", "tcp ns1/10.0.0.1:8000-8010") and its pif
// (host, or the pif's name). tcp rules have the connection and session
// families, udp rules the flow ones. A rule that a table change replaces
// with a changed one starts from zero (a counter reset to Prometheus).

// ruleLabels are the labels every per-rule family starts with.
var ruleLabels = []string{"rule", "pif"}

func withRule(extra ...string) []string { return slices.Concat(ruleLabels, extra) }

// perRule emits f's samples for each rule of protocol proto ("" for all),
// with the rule's labels first.
func perRule(proto string, f func(r *engine.RuleStats, emit func(v float64, extra ...string))) func(*engine.Stats, func(float64, ...string)) {
	return func(s *engine.Stats, emit func(float64, ...string)) {
		for i := range s.Rules {
			r := &s.Rules[i]
			if proto != "" && r.Proto != proto {
				continue
			}
			f(r, func(v float64, extra ...string) { emit(v, slices.Concat([]string{r.Listen, r.Pif}, extra)...) })
		}
	}
}

func perRuleHist(pick func(r *engine.RuleStats) engine.HistogramSnapshot) func(*engine.Stats, func(engine.HistogramSnapshot, ...string)) {
	return func(s *engine.Stats, emit func(engine.HistogramSnapshot, ...string)) {
		for i := range s.Rules {
			if r := &s.Rules[i]; r.Proto == tcp {
				emit(pick(r), r.Listen, r.Pif)
			}
		}
	}
}

var (
	tcp = rules.TCP.String()
	udp = rules.UDP.String()
)

// sortedKeys returns m's keys in order, so samples come out stable.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

var ruleFamilies = []metric{
	{name: "rule_ports", help: "Listen ports of the rule: bound (serving, or bound by an apply awaiting commit) and failed to bind at its apply.",
		typ: prometheus.GaugeValue, labels: withRule("state"),
		samples: perRule("", func(r *engine.RuleStats, emit func(float64, ...string)) {
			emit(float64(len(r.Listeners)), "bound")
			emit(float64(len(r.Failed)), "failed")
		})},
	{name: "rule_connections_total", help: "Connections accepted by the rule (entered its handshake).",
		typ: prometheus.CounterValue, labels: withRule(),
		samples: perRule(tcp, func(r *engine.RuleStats, emit func(float64, ...string)) { emit(float64(r.Policy.Accepted)) })},
	{name: "rule_refused_total", help: "Connections a handshake step closed, by step and reason (the end code's name).",
		typ: prometheus.CounterValue, labels: withRule("step", "reason"),
		samples: perRule(tcp, func(r *engine.RuleStats, emit func(float64, ...string)) {
			for _, step := range sortedKeys(r.Policy.Refused) {
				byCode := r.Policy.Refused[step]
				for _, reason := range sortedKeys(byCode) {
					emit(float64(byCode[reason]), step, reason)
				}
			}
		})},
	{name: "rule_sessions", help: "Live connections of the rule, from accept to end (handshakes included).",
		typ: prometheus.GaugeValue, labels: withRule(),
		samples: perRule(tcp, func(r *engine.RuleStats, emit func(float64, ...string)) { emit(float64(r.Sessions)) })},
	{name: "rule_terminations_total", help: "Connections of the rule ended, by two-letter termination code (who ended it, in which phase; see README).",
		typ: prometheus.CounterValue, labels: withRule("term"),
		samples: perRule(tcp, func(r *engine.RuleStats, emit func(float64, ...string)) {
			for _, t := range sortedKeys(r.Terms) {
				emit(float64(r.Terms[t]), t)
			}
		})},
	{name: "rule_bytes_total", help: "Bytes forwarded: in, client to backend; out, backend to client.",
		typ: prometheus.CounterValue, labels: withRule("direction"),
		samples: perRule(tcp, func(r *engine.RuleStats, emit func(float64, ...string)) {
			emit(float64(r.BytesUp), "in")
			emit(float64(r.BytesDown), "out")
		})},
	{name: "rule_bytes_moved_total", help: "Bytes forwarded (both ways) by how: splice(2) through a pipe, or a buffer.",
		typ: prometheus.CounterValue, labels: withRule("via"),
		samples: perRule(tcp, func(r *engine.RuleStats, emit func(float64, ...string)) {
			emit(float64(r.Spliced), "splice")
			emit(float64(r.BytesUp+r.BytesDown-min(r.Spliced, r.BytesUp+r.BytesDown)), "buffer")
		})},
	{name: "rule_connect_errors_total", help: "Backend connects of the rule that failed (each try of the pool).",
		typ: prometheus.CounterValue, labels: withRule(),
		samples: perRule(tcp, func(r *engine.RuleStats, emit func(float64, ...string)) { emit(float64(r.ConnectErrors)) })},
	{name: "rule_connect_retries_total", help: "Connects to a further backend of the pool after one failed.",
		typ: prometheus.CounterValue, labels: withRule(),
		samples: perRule(tcp, func(r *engine.RuleStats, emit func(float64, ...string)) { emit(float64(r.Retries)) })},
	{name: "rule_health_replies_total", help: "Health replies sent: ok (200, OK) or fail (503, DOWN).",
		typ: prometheus.CounterValue, labels: withRule("result"),
		samples: perRule(tcp, func(r *engine.RuleStats, emit func(float64, ...string)) {
			emit(float64(r.Policy.HealthUp), "ok")
			emit(float64(r.Policy.HealthDown), "fail")
		})},
	{name: "rule_proxy_headers_total", help: "PROXY headers accepted from clients, by version.",
		typ: prometheus.CounterValue, labels: withRule("version"),
		samples: perRule(tcp, func(r *engine.RuleStats, emit func(float64, ...string)) {
			emit(float64(r.Policy.ProxyV1), "v1")
			emit(float64(r.Policy.ProxyV2), "v2")
		})},
	{name: "rule_handshake_seconds", help: "Accept to the end of the incoming handshake, for connections that passed it.",
		labels: withRule(), hist: perRuleHist(func(r *engine.RuleStats) engine.HistogramSnapshot { return r.Handshake })},
	{name: "rule_connect_seconds", help: "End of the handshake to the backend connected, retries included.",
		labels: withRule(), hist: perRuleHist(func(r *engine.RuleStats) engine.HistogramSnapshot { return r.Connect })},
	{name: "rule_session_seconds", help: "Accept to end, for sessions that passed the handshake.",
		labels: withRule(), hist: perRuleHist(func(r *engine.RuleStats) engine.HistogramSnapshot { return r.Duration })},
	{name: "rule_udp_flows", help: "Live UDP flows of the rule.",
		typ: prometheus.GaugeValue, labels: withRule(),
		samples: perRule(udp, func(r *engine.RuleStats, emit func(float64, ...string)) { emit(float64(r.UDP.Flows)) })},
	{name: "rule_udp_flows_opened_total", help: "UDP flows the rule opened.",
		typ: prometheus.CounterValue, labels: withRule(),
		samples: perRule(udp, func(r *engine.RuleStats, emit func(float64, ...string)) { emit(float64(r.UDP.Opened)) })},
	{name: "rule_udp_datagrams_total", help: "UDP datagrams the rule forwarded, by direction.",
		typ: prometheus.CounterValue, labels: withRule("direction"),
		samples: perRule(udp, func(r *engine.RuleStats, emit func(float64, ...string)) {
			emit(float64(r.UDP.DatagramsUp), "to_target")
			emit(float64(r.UDP.DatagramsDown), "to_client")
		})},
	{name: "rule_udp_dropped_total", help: "UDP datagrams of the rule not forwarded.",
		typ: prometheus.CounterValue, labels: withRule(),
		samples: perRule(udp, func(r *engine.RuleStats, emit func(float64, ...string)) { emit(float64(r.UDP.Dropped)) })},
}
