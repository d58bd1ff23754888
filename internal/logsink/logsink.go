// Package logsink is the daemon's log output: a bounded buffer in front of a
// file (stderr) that one goroutine writes out, so a logger never blocks its
// caller on a slow or stuck reader (a journald pipe nobody drains). What does
// not fit is dropped and counted: losing log lines is the price of never
// stalling an event loop.
package logsink

import (
	"os"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap/zapcore"
)

// DefaultSize is the buffer a Writer holds before it drops.
const DefaultSize = 1 << 20

// syncWait bounds Sync: a stuck reader must not hold a stopping daemon.
const syncWait = time.Second

// dropped counts the writes every Writer of the process dropped.
var dropped atomic.Uint64

// Dropped returns the log writes dropped so far by every Writer of the
// process (sluice_log_dropped_total).
func Dropped() uint64 { return dropped.Load() }

// Writer buffers writes for out. Safe for concurrent use.
//
// Invariant: len(buf) <= cap(buf) == the size given; buf holds whole writes
// only (a write that does not fit is dropped whole, never cut).
type Writer struct {
	out  *os.File
	mu   sync.Mutex
	buf  []byte        // waiting to be written
	idle bool          // the writer goroutine has nothing in hand
	kick chan struct{} // cap 1: buf has bytes
	done chan struct{} // closed when buf is empty and idle (renewed by Write)
}

var _ zapcore.WriteSyncer = (*Writer)(nil)

// New returns a Writer of size bytes (0: DefaultSize) for out, and starts
// the goroutine that writes out; it lives as long as the process.
func New(out *os.File, size int) *Writer {
	if size <= 0 {
		size = DefaultSize
	}
	w := &Writer{out: out, buf: make([]byte, 0, size), idle: true, kick: make(chan struct{}, 1), done: make(chan struct{})}
	close(w.done)
	go w.run(make([]byte, 0, size))
	return w
}

// Write queues a copy of p, or drops it (counted) when the buffer has no
// room. It never blocks on out and always reports success: the logger must
// not react to a dropped line. No allocation.
func (w *Writer) Write(p []byte) (int, error) {
	w.mu.Lock()
	if len(w.buf)+len(p) > cap(w.buf) {
		w.mu.Unlock()
		dropped.Add(1)
		return len(p), nil
	}
	if len(w.buf) == 0 && w.idle {
		w.done = make(chan struct{})
	}
	w.buf = append(w.buf, p...)
	w.mu.Unlock()
	select {
	case w.kick <- struct{}{}:
	default:
	}
	return len(p), nil
}

// Sync waits until what was queued is written, at most a second.
func (w *Writer) Sync() error {
	w.mu.Lock()
	done := w.done
	w.mu.Unlock()
	select {
	case <-done:
	case <-time.After(syncWait):
	}
	return nil
}

// run writes the buffer out, swapping it with spare so writers go on
// filling one while the other is written (and may block).
func (w *Writer) run(spare []byte) {
	for range w.kick {
		for {
			w.mu.Lock()
			if len(w.buf) == 0 {
				if !w.idle { // (a kick can come for bytes already written)
					w.idle = true
					close(w.done)
				}
				w.mu.Unlock()
				break
			}
			w.idle = false
			out := w.buf
			w.buf = spare[:0]
			w.mu.Unlock()
			_, _ = w.out.Write(out) // errors: nowhere to report them but the log itself
			spare = out
		}
	}
}
