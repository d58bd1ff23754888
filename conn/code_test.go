package conn

import (
	"maps"
	"sync/atomic"
	"testing"
)

// CountsByName names each nonzero count by its code, a number this build
// does not know included, and leaves the zeros out.
func TestCountsByName(t *testing.T) {
	for _, c := range []struct {
		name   string
		counts map[int]uint64 // index: count
		size   int
		want   map[string]uint64
	}{
		{"none", nil, 0, map[string]uint64{}},
		{"all zero", nil, 4, map[string]uint64{}},
		{"some", map[int]uint64{int(CodeDone): 3, int(CodeDenied): 1}, 8, map[string]uint64{"done": 3, "denied": 1}},
		{"unknown code", map[int]uint64{codeCount + 1: 2}, codeCount + 4, map[string]uint64{"code-26": 2}},
	} {
		t.Run(c.name, func(t *testing.T) {
			counts := make([]atomic.Uint64, c.size)
			for i, n := range c.counts {
				counts[i].Store(n)
			}
			got := CountsByName(counts)
			if got == nil || !maps.Equal(got, c.want) {
				t.Errorf("%v, want %v", got, c.want)
			}
		})
	}
}
