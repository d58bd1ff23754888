package netns_test

import (
	"fmt"
	"os"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/internal/netns"
	"github.com/sluice-proxy/sluice/internal/netnstest"
)

// threadNS returns the inode of the calling thread's network namespace.
func threadNS(t *testing.T) uint64 {
	t.Helper()
	return inode(t, fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
}

// inode returns the inode of the file at path.
func inode(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// The thread is in the target namespace between Enter and leave, and back
// in its own after leave.
func TestEnterLeave(t *testing.T) {
	ns := netnstest.New(t)
	f, err := os.Open(ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	want := inode(t, ns.Path)

	// Our own lock keeps the goroutine on one thread across leave's unlock,
	// so the checks below look at the thread Enter switched.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	home := threadNS(t)
	if home == want {
		t.Fatal("the test already runs in the new namespace")
	}
	leave, err := netns.Enter(f)
	if err != nil {
		t.Fatal(err)
	}
	if got := threadNS(t); got != want {
		t.Errorf("after Enter: thread in netns %d, want %d", got, want)
	}
	leave()
	if got := threadNS(t); got != home {
		t.Errorf("after leave: thread in netns %d, want its own %d", got, home)
	}
}

// A failed Enter leaves the thread where it was.
func TestEnterNotANamespace(t *testing.T) {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	home := threadNS(t)
	if leave, err := netns.Enter(f); err == nil {
		leave()
		t.Fatal("Enter(/proc/self/status) succeeded")
	}
	if got := threadNS(t); got != home {
		t.Errorf("after a failed Enter: thread in netns %d, want %d", got, home)
	}
}
