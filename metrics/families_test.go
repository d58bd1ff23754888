package metrics

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluice-proxy/sluice/engine"
)

// Every family of the engine's table is exported, with its name, help and
// labels, and every family served comes from the table; each sampler of
// custom is for a family of it that no CounterDef names.
func TestFamiliesFromTable(t *testing.T) {
	c := NewCollector(func() engine.Stats { return engine.Stats{} })
	ch := make(chan *prometheus.Desc, 2*len(engine.Families))
	c.Describe(ch)
	close(ch)
	got := map[string]bool{}
	for d := range ch {
		got[d.String()] = true
	}
	if len(got) != len(engine.Families) || len(allFamilies) != len(engine.Families) {
		t.Errorf("%d descriptions, %d families served, %d in the table", len(got), len(allFamilies), len(engine.Families))
	}
	in := map[*engine.Family]bool{}
	for i, f := range engine.Families {
		in[f] = true
		labels := f.Labels
		if f.PerRule {
			labels = withRule(f.Labels...)
		}
		want := prometheus.NewDesc(prometheus.BuildFQName(Namespace, "", f.Name), f.Help, labels, nil).String()
		if !got[want] {
			t.Errorf("family %s not described as %s", f.Name, want)
		}
		if m := allFamilies[i]; m.name != f.Name || (m.samples == nil) == (m.hist == nil) || (m.hist != nil) != (f.Kind == engine.KindHistogram) {
			t.Errorf("family %s served as %+v", f.Name, m)
		}
	}
	for f := range custom {
		if !in[f] {
			t.Errorf("custom sampler for %s, not in engine.Families", f.Name)
		}
	}
}
