package balance

import (
	"testing"
	"unsafe"

	"github.com/sluice-proxy/sluice/rules"
)

var errRefused = "refused"

// Fall failures in a row take a backend down, rise successes bring it back;
// a success in between resets the count.
func TestHealthRiseFall(t *testing.T) {
	var h Health
	steps := []struct {
		res     Result
		changed bool
		down    bool
	}{
		{ResultFail, false, false}, {ResultFail, false, false}, {ResultOK, false, false},
		{ResultFail, false, false}, {ResultTimeout, false, false}, {ResultFail, true, true},
		{ResultFail, false, true}, {ResultOK, false, true}, {ResultFail, false, true},
		{ResultOK, false, true}, {ResultOK, true, false},
	}
	for i, s := range steps {
		var reason *string
		if s.res != ResultOK {
			reason = &errRefused
		}
		if got := h.Record(s.res, 0, int64(i+1), reason, 2, 3); got != s.changed || h.Down() != s.down {
			t.Fatalf("step %d (%s): changed %v down %v, want %v %v", i, s.res, got, h.Down(), s.changed, s.down)
		}
	}
	st := h.Stats()
	if !st.Up || st.Since != 11 || st.Counts[ResultOK] != 4 || st.Counts[ResultFail] != 6 || st.Counts[ResultTimeout] != 1 || st.Reason != "" {
		t.Errorf("stats %+v", st)
	}
	var c Health
	c.CopyFrom(&h)
	if c.Stats() != st {
		t.Errorf("copy %+v, want %+v", c.Stats(), st)
	}
}

// A backend its checks say is down gets no session, even when every other
// one is down too; a pool all down by checks is NoBackend.
func TestPoolSkipsCheckedDown(t *testing.T) {
	p := pool(rules.BalanceRoundRobin, 3)
	hs := make([]Health, 3)
	for i := range hs {
		p.SetCheck(i, &hs[i])
	}
	hs[1].down.Store(true)
	for k := 0; k < 9; k++ {
		if got := p.Next(p.Start(src, 1), 0, 1); got == 1 {
			t.Fatal("chose backend 1, down by checks")
		}
	}
	p.Failed(0, 0)
	p.Failed(2, 0)
	if got := p.Next(0, 0, 1); got != 0 && got != 2 {
		t.Errorf("all down: want a passive-down fallback, got %d", got)
	}
	if p.NoBackend() || !p.AllDown(1) {
		t.Error("NoBackend with backends only passive-down")
	}
	hs[0].down.Store(true)
	hs[2].down.Store(true)
	if !p.NoBackend() || p.Next(0, 0, 1) != -1 {
		t.Error("every backend down by checks: want NoBackend and no choice")
	}
	if st := p.Stats(1); !st[0].Checked || st[0].Check.Up || st[0].Up {
		t.Errorf("stats %+v", st[0])
	}
	if pool(rules.BalanceRoundRobin, 2).NoBackend() {
		t.Error("an unchecked pool is never NoBackend")
	}
}

func TestBackendCacheLine(t *testing.T) {
	if n := unsafe.Sizeof(backend{}); n != 64 {
		t.Errorf("backend is %d bytes, want one cache line", n)
	}
	for r := Result(0); r < ResultCount; r++ {
		if r.String() == "" || r.String()[0] == 'r' {
			t.Errorf("result %d has no name", r)
		}
	}
}
