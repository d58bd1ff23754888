package engine

import "sync/atomic"

// Histogram bucket upper bounds, in microseconds.
var (
	// latencyBounds: handshakes, connects, table applies (100 µs to 10 s).
	latencyBounds = [...]uint64{100, 250, 500, 1e3, 2.5e3, 5e3, 10e3, 25e3, 50e3, 100e3, 250e3, 500e3, 1e6, 2.5e6, 5e6, 10e6}
	// durationBounds: whole sessions (1 ms to a day).
	durationBounds = [...]uint64{1e3, 10e3, 100e3, 1e6, 5e6, 10e6, 30e6, 60e6, 300e6, 900e6, 3600e6, 21600e6, 86400e6}
	// helloBounds, in bytes (a byte histogram): TLS ClientHellos, up to the
	// 16 KiB the sni stage reads (a post-quantum one is 1.5-2 KB).
	helloBounds = [...]uint64{256, 512, 1024, 1536, 2048, 3072, 4096, 8192, 16384}
)

const maxBuckets = len(latencyBounds)

// Histogram counts observations in fixed buckets: one atomic add for the
// bucket and one for the sum per observation, no lock, no allocation. The
// zero value has the latency buckets (100 µs to 10 s).
type Histogram struct {
	bounds []uint64                      // upper bounds in µs (bytes: in bytes), ascending; nil: latencyBounds
	bytes  bool                          // a histogram of sizes: bounds and sum are bytes, not µs
	counts [maxBuckets + 1]atomic.Uint64 // by bucket; the last is above every bound
	sumUs  atomic.Uint64
}

func (h *Histogram) bucketBounds() []uint64 {
	if h.bounds == nil {
		return latencyBounds[:]
	}
	return h.bounds
}

// observe counts a value of us microseconds (bytes of a byte histogram).
func (h *Histogram) observe(us uint64) {
	b := h.bucketBounds()
	i := 0
	for i < len(b) && us > b[i] {
		i++
	}
	h.counts[i].Add(1)
	h.sumUs.Add(us)
}

// Snapshot reads the histogram. Observations running meanwhile may be in the
// counts and not yet in the sum, or the other way round.
func (h *Histogram) Snapshot() HistogramSnapshot {
	b := h.bucketBounds()
	unit := 1e6 // µs to seconds
	if h.bytes {
		unit = 1
	}
	s := HistogramSnapshot{Bounds: make([]float64, len(b)), Counts: make([]uint64, len(b)+1)}
	for i, us := range b {
		s.Bounds[i] = float64(us) / unit
	}
	for i := range s.Counts {
		s.Counts[i] = h.counts[i].Load()
	}
	s.Sum = float64(h.sumUs.Load()) / unit
	return s
}

// HistogramSnapshot is a histogram's state in seconds (a byte histogram's
// in bytes); the zero value has no buckets.
type HistogramSnapshot struct {
	Bounds []float64 // bucket upper bounds (le), seconds or bytes, ascending
	Counts []uint64  // observations per bucket, not cumulative; the last is above every bound
	Sum    float64   // seconds or bytes
}

// Count returns the number of observations.
func (h HistogramSnapshot) Count() uint64 {
	var n uint64
	for _, c := range h.Counts {
		n += c
	}
	return n
}
