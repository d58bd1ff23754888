package balance

import (
	"strconv"
	"sync/atomic"
	"time"
)

// Result is the outcome of one active check.
type Result uint8

const (
	ResultOK      Result = iota // connected (tcp), or a 2xx/3xx status (http)
	ResultFail                  // refused, reset, unreachable, or a status that is not 2xx/3xx
	ResultTimeout               // no answer within check.timeout
	ResultCount
)

var resultNames = [ResultCount]string{"ok", "fail", "timeout"}

func (r Result) String() string {
	if r < ResultCount {
		return resultNames[r]
	}
	return "result-" + strconv.Itoa(int(r))
}

// Health is the active-check state of one backend address of a rule, shared
// by every pool of the rule's ports that has that backend, so a port range
// with one backend checks it once. One writer (the check that owns it, on
// one loop); readers anywhere, through atomics.
//
// The zero value is a backend that is up and was never checked: a new
// backend gets traffic until check.fall checks in a row fail.
type Health struct {
	down    atomic.Bool
	run     atomic.Int32 // >0: successes in a row; <0: failures in a row
	since   atomic.Int64 // engine clock of the last transition; 0: none
	lastAt  atomic.Int64 // engine clock of the last check's end; 0: never checked
	lastNs  atomic.Int64 // the last check's latency
	lastRes atomic.Uint32
	reason  atomic.Pointer[string] // why the last check failed; nil after a success
	counts  [ResultCount]atomic.Uint64
}

// Record adds the result of a check that ended at time now after latency,
// with reason (a static string: "" for a success). A backend goes down after
// fall failures in a row and up after rise successes in a row. It reports
// whether the backend changed state.
func (h *Health) Record(res Result, latency time.Duration, now int64, reason *string, rise, fall int) bool {
	if res < ResultCount {
		h.counts[res].Add(1)
	}
	h.lastAt.Store(now)
	h.lastNs.Store(int64(latency))
	h.lastRes.Store(uint32(res))
	h.reason.Store(reason)
	run := h.run.Load()
	if res == ResultOK {
		if run < 0 {
			run = 0
		}
		run++
		h.run.Store(run)
		if h.down.Load() && int(run) >= rise {
			h.down.Store(false)
			h.since.Store(now)
			return true
		}
		return false
	}
	if run > 0 {
		run = 0
	}
	run--
	h.run.Store(run)
	if !h.down.Load() && int(-run) >= fall {
		h.down.Store(true)
		h.since.Store(now)
		return true
	}
	return false
}

// Down reports whether checks say the backend is down.
func (h *Health) Down() bool { return h.down.Load() }

// CopyFrom starts h from o's state: a changed rule's check of a backend the
// old rule checked too goes on from where the old one was.
func (h *Health) CopyFrom(o *Health) {
	h.down.Store(o.down.Load())
	h.run.Store(o.run.Load())
	h.since.Store(o.since.Load())
	h.lastAt.Store(o.lastAt.Load())
	h.lastNs.Store(o.lastNs.Load())
	h.lastRes.Store(o.lastRes.Load())
	h.reason.Store(o.reason.Load())
	for i := range h.counts {
		h.counts[i].Store(o.counts[i].Load())
	}
}

// CheckStats is what the checks of one backend said.
type CheckStats struct {
	Up      bool
	Since   int64 // engine clock of the last transition; 0: none
	LastAt  int64 // engine clock of the last check; 0: never checked
	Last    Result
	Latency time.Duration
	Reason  string              // why the last check failed; "" after a success
	Counts  [ResultCount]uint64 // checks by result
	For     time.Duration       // Pool.Stats: time in this state (since the engine's start if it never changed)
}

// Stats returns the state of the checks.
func (h *Health) Stats() CheckStats {
	s := CheckStats{Up: !h.down.Load(), Since: h.since.Load(), LastAt: h.lastAt.Load(),
		Last: Result(h.lastRes.Load()), Latency: time.Duration(h.lastNs.Load())}
	if r := h.reason.Load(); r != nil {
		s.Reason = *r
	}
	for i := range s.Counts {
		s.Counts[i] = h.counts[i].Load()
	}
	return s
}

// Check returns backend i's active-check state, nil when it has none.
func (p *Pool) Check(i int) *Health { return p.backends[i].check }
