package handshake

import (
	"slices"
	"testing"

	"github.com/sluice-proxy/sluice/rules"
)

// A rule's chains hold the steps it asks for, in the documented order, each
// under its kind.
func TestChainOrder(t *testing.T) {
	const to = "tcp 127.0.0.1:80 -> 127.0.0.1:81"
	for _, c := range []struct {
		line          string
		in, out, gate []Kind
	}{
		{line: to},
		{line: "tcp 127.0.0.1:80 health=http", in: []Kind{KindHealth}},
		{line: to + " health=tcp monitor=10.0.0.0/8 accept-proxy allow=10.0.0.0/8",
			in: []Kind{KindMonitor, KindHealth, KindAcceptProxy, KindRules}},
		{line: to + " deny=10.0.0.0/8 monitor=10.0.0.0/8 health=http", in: []Kind{KindMonitor, KindHealth, KindRules}},
		{line: to + " rate=10/s", in: []Kind{KindRules}},
		{line: to + " maxconn=5", in: []Kind{KindRules}},
		{line: to + " accept-proxy", in: []Kind{KindAcceptProxy}},
		{line: to + " accept-proxy=10.0.0.0/8 send-proxy=v2",
			in: []Kind{KindAcceptProxy}, out: []Kind{KindSendProxy}, gate: []Kind{KindAcceptProxy}},
		{line: to + " send-proxy=v1", out: []Kind{KindSendProxy}},
	} {
		r, err := rules.Parse(c.line)
		if err != nil {
			t.Fatalf("%s: %v", c.line, err)
		}
		p := NewPolicy(r, 0)
		for _, ch := range []struct {
			name      string
			got, want []Kind
		}{{"in", p.in.Kinds(), c.in}, {"out", p.out.Kinds(), c.out}, {"gate", p.gate.Kinds(), c.gate}} {
			if !slices.Equal(ch.got, ch.want) {
				t.Errorf("%s: %s chain %v, want %v", c.line, ch.name, ch.got, ch.want)
			}
		}
		for _, s := range slices.Concat(p.in, p.out, p.gate) {
			if s.H == nil {
				t.Errorf("%s: step %v has no handler", c.line, s.Kind)
			}
		}
		if p.HasOut() != (len(c.out) > 0) {
			t.Errorf("%s: HasOut %v", c.line, p.HasOut())
		}
	}
}

// Every stage's constructor says no (a nil Handler, not a typed nil) to a
// rule that does not ask for it.
func TestConstructorsOfAPlainRule(t *testing.T) {
	r, err := rules.Parse("tcp 127.0.0.1:80 -> 127.0.0.1:81")
	if err != nil {
		t.Fatal(err)
	}
	p := &Policy{}
	for _, order := range [][]stage{inOrder[:], outOrder[:], gateOrder[:]} {
		for _, s := range order {
			if h := s.ctor(r, p); h != nil {
				t.Errorf("stage %v built %T for a plain rule", s.kind, h)
			}
		}
	}
}
