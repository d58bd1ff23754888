package rules

import (
	"fmt"
	"slices"
	"strings"
	"syscall"
)

// Diff is what changes between two tables, by listen key: the socket of a
// kept key moves to the new table (its rule may change), an added key is
// bound, a removed key is paused and closed at commit.
type Diff struct {
	Kept    []Key
	Added   []Key
	Removed []Key
}

// TableDiff compares two tables by listen key. Its work is proportional to
// the number of listen keys of both tables. Each list is in table order.
func TableDiff(old, new []*Rule) Diff {
	oldKeys := map[Key]bool{}
	for _, r := range old {
		for _, k := range r.ListenKeys() {
			oldKeys[k] = true
		}
	}
	var d Diff
	newKeys := map[Key]bool{}
	for _, r := range new {
		for _, k := range r.ListenKeys() {
			if newKeys[k] {
				continue // a further route of a key already listed
			}
			newKeys[k] = true
			if oldKeys[k] {
				d.Kept = append(d.Kept, k)
			} else {
				d.Added = append(d.Added, k)
			}
		}
	}
	for _, r := range old {
		for _, k := range r.ListenKeys() {
			if !newKeys[k] {
				newKeys[k] = true // listed once, however many routes it had
				d.Removed = append(d.Removed, k)
			}
		}
	}
	return d
}

// PortError is one listen port of a rule that could not be bound.
type PortError struct {
	Port  uint16
	Errno syscall.Errno // 0 when the failure was not a system call's
	Msg   string        // the error text, "address already in use"
}

// RuleResult is what an apply did with one rule of the new table.
type RuleResult struct {
	Rule      string // canonical line
	Listen    string // its listen part, "tcp 0.0.0.0:8080"
	Weak      bool
	Requested int // ports the rule listens on
	Bound     int // ports serving after the apply (moved or newly bound)
	Failed    []PortError
}

// NewResult starts the result of rule r: nothing bound yet.
func NewResult(r *Rule) RuleResult {
	return RuleResult{Rule: r.String(), Listen: r.listenString(), Weak: r.Weak, Requested: r.ListenPorts.Len()}
}

// OK reports whether the rule counts as applied: every port bound, or, for a
// weak rule, at least one.
func (r RuleResult) OK() bool {
	if r.Weak {
		return r.Bound > 0 || r.Requested == 0
	}
	return len(r.Failed) == 0
}

// Summary is the result of an apply or a rollback: per rule of the table
// asked for, and the verdict.
type Summary struct {
	Generation uint64 // the generation the table would have once committed
	Rules      []RuleResult
	Kept       int // listen keys whose socket moved to the new table
	Added      int // listen keys bound anew
	Removed    int // listen keys paused, to be closed at commit
}

// OK is the verdict: every rule applied, ignoring the failed ports of weak
// rules that bound at least one port.
func (s *Summary) OK() bool {
	for _, r := range s.Rules {
		if !r.OK() {
			return false
		}
	}
	return true
}

// Failures lists every failed port as the contract prints it:
// "tcp 0.0.0.0:8080: port 8080: address already in use", weak rules' too.
func (s *Summary) Failures() []string {
	var out []string
	for _, r := range s.Rules {
		for _, f := range r.Failed {
			out = append(out, fmt.Sprintf("%s: port %d: %s", r.Listen, f.Port, f.Msg))
		}
	}
	return out
}

// SortKeys orders listen keys by pif, protocol, address, port: a stable order
// for output and tests.
func SortKeys(ks []Key) {
	slices.SortFunc(ks, func(a, b Key) int {
		if c := strings.Compare(a.Pif, b.Pif); c != 0 {
			return c
		}
		if a.Proto != b.Proto {
			return int(a.Proto) - int(b.Proto)
		}
		if c := a.Addr.Compare(b.Addr); c != 0 {
			return c
		}
		return int(a.Port) - int(b.Port)
	})
}
