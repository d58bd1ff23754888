package engine

import (
	"testing"

	"golang.org/x/sys/unix"
)

// fdTable is the fd table size New sizes its defaults by.
func fdTable(t *testing.T) int {
	t.Helper()
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		t.Fatal(err)
	}
	return int(min(rl.Cur, 1<<16))
}

// By default pipes (two fds each) take at most a quarter of the fd table:
// the rest is the sockets'.
func TestDefaultPipesLeaveFdsToSockets(t *testing.T) {
	e := newEngine(t) // started, so that its Shutdown closes the loops' fds
	fds := fdTable(t)
	if got := 2 * e.cfg.MaxPipes; got > fds/4 {
		t.Errorf("default MaxPipes %d: pipes may take %d of %d fds, want at most a quarter", e.cfg.MaxPipes, got, fds)
	}
}
