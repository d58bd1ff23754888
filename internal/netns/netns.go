// Package netns switches the calling goroutine's OS thread into a network
// namespace, and back.
//
// A thread left in a foreign namespace must never serve other goroutines,
// and must not be the main thread when its goroutine ends: the runtime
// cannot end the main thread, so it parks it for good, and the process's
// /proc/PID/net/* and /proc/PID/ns/net (which follow the main thread) then
// show the foreign namespace. Enter's leave switches the thread back before
// unlocking it, so neither happens.
package netns

import (
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// Enter locks the calling goroutine to its OS thread and switches the thread
// into the network namespace of target (an open /run/netns/NAME,
// /proc/PID/ns/net, ...). target may be closed once Enter returns.
//
// It returns leave, which the same goroutine must call when done: leave
// switches the thread back to the namespace it was in and unlocks it. Should
// switching back fail, leave keeps the thread locked, so the runtime ends it
// with the goroutine instead of reusing it. On error the thread is unchanged
// and unlocked, and leave is nil.
func Enter(target *os.File) (leave func(), err error) {
	runtime.LockOSThread()
	orig, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
	if err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("open this thread's netns: %w", err)
	}
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		orig.Close()
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("setns %s: %w", target.Name(), err)
	}
	return func() {
		err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET)
		orig.Close()
		if err == nil {
			runtime.UnlockOSThread()
		}
	}, nil
}
