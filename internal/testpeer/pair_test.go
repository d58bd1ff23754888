package testpeer

import (
	"testing"

	"golang.org/x/sys/unix"
)

// After Delivered, the peer's kernel holds the bytes and the FIN: a
// non-blocking read gets both at once, never EAGAIN.
func TestDelivered(t *testing.T) {
	a, b := TCPPair(t)
	if _, err := unix.Write(a, []byte("abc")); err != nil {
		t.Fatal(err)
	}
	unix.Shutdown(a, unix.SHUT_WR)
	Delivered(t, a)
	if err := unix.SetNonblock(b, true); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 8)
	if n, err := unix.Read(b, buf); n != 3 || err != nil {
		t.Fatalf("read %d, %v; want 3 bytes", n, err)
	}
	if n, err := unix.Read(b, buf); n != 0 || err != nil {
		t.Fatalf("read %d, %v; want the FIN (0, nil)", n, err)
	}
}
