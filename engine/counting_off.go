//go:build sluice_nocounters

package engine

// CountersEnabled is off: built with -tags sluice_nocounters, for measuring
// what the per-rule counters cost (see counting_on.go).
const CountersEnabled = false
