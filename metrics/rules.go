package metrics

import (
	"slices"

	"github.com/sluice-proxy/sluice/balance"
	"github.com/sluice-proxy/sluice/engine"
)

// Per-rule families. Every sample carries the rule's listen part as the
// label rule ("tcp 0.0.0.0:8080", "tcp ns1/10.0.0.1:8000-8010") and its pif
// (host, or the pif's name). tcp rules have the connection and session
// families, udp rules the flow ones. A rule that a table change replaces
// with a changed one starts from zero (a counter reset to Prometheus).

// ruleLabels are the labels every per-rule family starts with.
var ruleLabels = []string{"rule", "pif"}

func withRule(extra ...string) []string { return slices.Concat(ruleLabels, extra) }

// perRule emits f's samples for each rule of family fam's protocol (every
// rule when it names none), with the rule's labels first.
func perRule(fam *engine.Family, f func(r *engine.RuleStats, emit func(v float64, extra ...string))) func(*engine.Stats, func(float64, ...string)) {
	return func(s *engine.Stats, emit func(float64, ...string)) {
		for i := range s.Rules {
			r := &s.Rules[i]
			if fam.Proto != "" && r.Proto != fam.Proto {
				continue
			}
			f(r, func(v float64, extra ...string) { emit(v, slices.Concat([]string{r.Listen, r.Pif}, extra)...) })
		}
	}
}

// perRuleHist emits pick's histogram of each rule of family fam's protocol.
func perRuleHist(fam *engine.Family, pick func(r *engine.RuleStats) engine.HistogramSnapshot) func(*engine.Stats, func(engine.HistogramSnapshot, ...string)) {
	return func(s *engine.Stats, emit func(engine.HistogramSnapshot, ...string)) {
		for i := range s.Rules {
			if r := &s.Rules[i]; fam.Proto == "" || r.Proto == fam.Proto {
				if h := pick(r); h.Bounds != nil { // none: the family is not the rule's (a hello size of a rule that does not route)
					emit(h, r.Listen, r.Pif)
				}
			}
		}
	}
}

// sortedKeys returns m's keys in order, so samples come out stable.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// refusedSamples emits a rule's refusals by step and reason.
func refusedSamples(r *engine.RuleStats, emit func(float64, ...string)) {
	for _, step := range sortedKeys(r.Policy.Refused) {
		byCode := r.Policy.Refused[step]
		for _, reason := range sortedKeys(byCode) {
			emit(float64(byCode[reason]), step, reason)
		}
	}
}

// termSamples emits a rule's ended connections by termination code.
func termSamples(r *engine.RuleStats, emit func(float64, ...string)) {
	for _, t := range sortedKeys(r.Terms) {
		emit(float64(r.Terms[t]), t)
	}
}

// backendUpSamples emits each checked backend's state, 1 up, 0 down.
func backendUpSamples(r *engine.RuleStats, emit func(float64, ...string)) {
	for _, b := range r.Checked {
		v := 0.0
		if b.Up {
			v = 1
		}
		emit(v, b.Target.String())
	}
}

// backendCheckSamples emits each checked backend's checks by result.
func backendCheckSamples(r *engine.RuleStats, emit func(float64, ...string)) {
	for _, b := range r.Checked {
		for res := balance.Result(0); res < balance.ResultCount; res++ {
			emit(float64(b.Check.Counts[res]), b.Target.String(), res.String())
		}
	}
}

// checkedHist emits the check latency of each rule with checks.
func checkedHist(fam *engine.Family) func(*engine.Stats, func(engine.HistogramSnapshot, ...string)) {
	return func(s *engine.Stats, emit func(engine.HistogramSnapshot, ...string)) {
		for i := range s.Rules {
			if r := &s.Rules[i]; len(r.Checked) > 0 {
				emit(r.CheckTime, r.Listen, r.Pif)
			}
		}
	}
}
