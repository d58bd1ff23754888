// Package bench holds sluice's benchmarks: Go micro-benchmarks of the data
// path (channel_bench_test.go, run by `make bench`) and the side-by-side
// comparison with other proxies (the peers command, `go run ./bench/peers`,
// also run by `make bench`); RESULTS.md keeps the latest figures.
package bench
