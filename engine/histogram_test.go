package engine

import "testing"

func TestHistogramBuckets(t *testing.T) {
	var h Histogram
	for _, us := range []uint64{0, 100, 101, 10e6, 10e6 + 1, 1 << 40} {
		h.observe(us)
	}
	s := h.Snapshot()
	if len(s.Bounds) != len(latencyBounds) || len(s.Counts) != len(s.Bounds)+1 {
		t.Fatalf("%d bounds, %d counts", len(s.Bounds), len(s.Counts))
	}
	want := map[int]uint64{0: 2, 1: 1, len(s.Bounds) - 1: 1, len(s.Bounds): 2}
	for i, n := range s.Counts {
		if n != want[i] {
			t.Errorf("bucket %d (le %v): %d, want %d", i, append(s.Bounds, -1)[i], n, want[i])
		}
	}
	if s.Count() != 6 || s.Bounds[0] != 0.0001 || s.Bounds[len(s.Bounds)-1] != 10 {
		t.Errorf("count %d, bounds %v", s.Count(), s.Bounds)
	}
	if wantSum := float64(0+100+101+10e6+10e6+1+1<<40) / 1e6; s.Sum != wantSum {
		t.Errorf("sum %v, want %v", s.Sum, wantSum)
	}
	d := Histogram{bounds: durationBounds[:]}
	d.observe(90e9) // 25 h: above the last bound (a day)
	if s := d.Snapshot(); s.Counts[len(durationBounds)] != 1 || s.Bounds[len(s.Bounds)-1] != 86400 {
		t.Errorf("duration histogram %+v", s)
	}
}
