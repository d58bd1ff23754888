//go:build !sluice_nocounters

package engine

// CountersEnabled says the per-rule data-path counters of counters.go are
// compiled in. Build with -tags sluice_nocounters to compile them out and
// measure their cost (bench/RESULTS.md); that build is for benchmarks only:
// the per-rule metrics then read zero, and the tests that check them skip.
const CountersEnabled = true
