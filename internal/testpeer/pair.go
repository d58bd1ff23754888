package testpeer

import (
	"testing"

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
