package testpeer

import (
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TCPPair returns the two ends of a loopback TCP connection as raw fds, both
// blocking; the caller makes its side non-blocking if it wants. Both are
// closed when the test ends.
func TCPPair(tb testing.TB) (a, b int) {
	tb.Helper()
	ln, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		tb.Fatal(err)
	}
	defer unix.Close(ln)
	if err := unix.Bind(ln, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		tb.Fatal(err)
	}
	if err := unix.Listen(ln, 1); err != nil {
		tb.Fatal(err)
	}
	sa, err := unix.Getsockname(ln)
	if err != nil {
		tb.Fatal(err)
	}
	a, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		tb.Fatal(err)
	}
	if err := unix.Connect(a, sa); err != nil {
		unix.Close(a)
		tb.Fatal(err)
	}
	b, _, err = unix.Accept4(ln, unix.SOCK_CLOEXEC)
	if err != nil {
		unix.Close(a)
		tb.Fatal(err)
	}
	tb.Cleanup(func() { unix.Close(a); unix.Close(b) })
	return a, b
}

// Delivered waits until the peer of the TCP socket fd has acknowledged
// everything written to fd, its FIN too after a shutdown (a FIN takes a
// sequence number, so SIOCOUTQ counts it until acknowledged): by then the
// peer's kernel holds it all. On loopback that is usually so when write
// returns, but the receiving softirq can be deferred on a loaded machine.
// It fails the test after 10 s.
func Delivered(tb testing.TB, fd int) {
	tb.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		n, err := unix.IoctlGetInt(fd, unix.SIOCOUTQ)
		if err != nil {
			tb.Fatalf("SIOCOUTQ: %v", err)
		}
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("peer has not acknowledged %d bytes after 10 s", n)
		}
	}
}

// DeliveredConn is Delivered for a connection of package net.
func DeliveredConn(tb testing.TB, c syscall.Conn) {
	tb.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		tb.Fatal(err)
	}
	if err := rc.Control(func(fd uintptr) { Delivered(tb, int(fd)) }); err != nil {
		tb.Fatal(err)
	}
}
