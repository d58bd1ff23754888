package etcd

import (
	"strings"
	"testing"
)

// Every typed constant has its name.
func TestNames(t *testing.T) {
	for k := KeyOther; k < keyKindEnd; k++ {
		if strings.HasPrefix(k.String(), "key-kind-") {
			t.Errorf("KeyKind %d has no name", k)
		}
	}
	for o := OutcomeNone; o < outcomeEnd; o++ {
		var back Outcome
		if b, _ := o.MarshalText(); back.UnmarshalText(b) != nil || back != o || strings.HasPrefix(o.String(), "outcome-") {
			t.Errorf("Outcome %d: name %q does not round-trip", o, o)
		}
	}
	for s := PlanRunning; s < planStateEnd; s++ {
		var back PlanState
		if b, _ := s.MarshalText(); back.UnmarshalText(b) != nil || back != s {
			t.Errorf("PlanState %d: name %q does not round-trip", s, s)
		}
	}
	for o := RolloutCommitted; o < rolloutOutcomeEnd; o++ {
		if strings.HasPrefix(o.String(), "rollout-outcome-") {
			t.Errorf("RolloutOutcome %d has no name", o)
		}
	}
}

// Keys of the contract's shapes parse; every other shape is KeyOther.
func TestParse(t *testing.T) {
	k := Keys{"/sluice/web"}
	for key, want := range map[string]struct {
		kind KeyKind
		name string
	}{
		"/sluice/web/tables/v1":                                   {KeyTable, "v1"},
		"/sluice/web/assign/web-1":                                {KeyAssign, "web-1"},
		"/sluice/web/status/web-1":                                {KeyStatus, "web-1"},
		"/sluice/web/rollout":                                     {KeyRollout, ""},
		"/sluice/web/assign/a/b":                                  {KeyOther, ""},
		"/sluice/web/assign/":                                     {KeyOther, ""},
		"/sluice/web/assign/..":                                   {KeyOther, ""},
		"/sluice/web/assign/a b":                                  {KeyOther, ""},
		"/sluice/web/garbage":                                     {KeyOther, ""},
		"/sluice/webx/assign/a":                                   {KeyOther, ""},
		"/sluice/web/other/a":                                     {KeyOther, ""},
		"/sluice/web/tables/" + strings.Repeat("v", MaxNameLen+1): {KeyOther, ""},
	} {
		kind, name := k.Parse(key)
		if kind != want.kind || name != want.name {
			t.Errorf("Parse(%q) = %s %q, want %s %q", key, kind, name, want.kind, want.name)
		}
	}
	if kind, name := k.Parse(k.Assign("x")); kind != KeyAssign || name != "x" {
		t.Errorf("Assign does not parse back: %s %q", kind, name)
	}
}

// Parse never panics, and what it accepts is a key of the prefix with a
// name CheckName accepts.
func FuzzParse(f *testing.F) {
	k := Keys{"/sluice/web"}
	for _, s := range []string{"/sluice/web/tables/v1", "/sluice/web/assign/a/b", "/sluice/web/rollout", "x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, key string) {
		kind, name := k.Parse(key)
		switch kind {
		case KeyTable, KeyAssign, KeyStatus:
			if CheckName(name) != nil || !strings.HasPrefix(key, k.All()) {
				t.Fatalf("Parse(%q) accepted %s %q", key, kind, name)
			}
		}
	})
}
