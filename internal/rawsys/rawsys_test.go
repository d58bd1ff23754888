package rawsys

import (
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// listen returns a non-blocking listener on addr (port 0) and its address.
func listen(t *testing.T, addr string) (int, netip.AddrPort) {
	t.Helper()
	ap := netip.MustParseAddrPort(addr)
	fam := familyOf(ap)
	fd, err := Socket(fam, unix.SOCK_STREAM)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { Close(fd) })
	var sa unix.Sockaddr = &unix.SockaddrInet6{Addr: ap.Addr().As16()}
	if fam == unix.AF_INET {
		sa = &unix.SockaddrInet4{Addr: ap.Addr().As4()}
	}
	if err := unix.Bind(fd, sa); err != nil {
		t.Skipf("bind %s: %v", addr, err) // no IPv6 on this host
	}
	if err := unix.Listen(fd, 8); err != nil {
		t.Fatal(err)
	}
	got, err := Getsockname(fd)
	if err != nil || got.Addr() != ap.Addr() || got.Port() == 0 {
		t.Fatalf("getsockname = %v, %v; want %s with a port", got, err, ap.Addr())
	}
	return fd, got
}

func familyOf(ap netip.AddrPort) int {
	if ap.Addr().Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

// waitFd polls fd for events, at most a second.
func waitFd(t *testing.T, fd int, events int16) {
	t.Helper()
	p := []unix.PollFd{{Fd: int32(fd), Events: events}}
	if n, err := unix.Poll(p, 1000); n != 1 || err != nil {
		t.Fatalf("poll fd %d for %#x: %d, %v", fd, events, n, err)
	}
}

// A connection end to end through the raw calls, both families: the
// addresses come back as the kernel sees them, with their ports in host order.
func TestConnectAcceptAddresses(t *testing.T) {
	for _, addr := range []string{"127.0.0.1:0", "[::1]:0"} {
		t.Run(addr, func(t *testing.T) {
			lfd, laddr := listen(t, addr)
			if _, _, err := Accept4(lfd, unix.SOCK_NONBLOCK); err != unix.EAGAIN {
				t.Fatalf("accept on an empty queue: %v, want EAGAIN", err)
			}
			cfd, err := Socket(familyOf(laddr), unix.SOCK_STREAM)
			if err != nil {
				t.Fatal(err)
			}
			defer Close(cfd)
			if err := SetsockoptInt(cfd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
				t.Fatal(err)
			}
			if v, err := GetsockoptInt(cfd, unix.IPPROTO_TCP, unix.TCP_NODELAY); err != nil || v == 0 {
				t.Fatalf("TCP_NODELAY = %d, %v", v, err)
			}
			if err := Connect(cfd, laddr); err != nil && err != unix.EINPROGRESS {
				t.Fatal(err)
			}
			waitFd(t, cfd, unix.POLLOUT)
			if soerr, err := GetsockoptInt(cfd, unix.SOL_SOCKET, unix.SO_ERROR); err != nil || soerr != 0 {
				t.Fatalf("SO_ERROR = %d, %v", soerr, err)
			}
			caddr, err := Getsockname(cfd)
			if err != nil {
				t.Fatal(err)
			}
			waitFd(t, lfd, unix.POLLIN)
			afd, peer, err := Accept4(lfd, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
			if err != nil {
				t.Fatal(err)
			}
			defer Close(afd)
			if peer != caddr {
				t.Fatalf("accepted peer %v, client is %v", peer, caddr)
			}
			if n, err := Write(cfd, []byte("ping")); n != 4 || err != nil {
				t.Fatalf("write: %d, %v", n, err)
			}
			waitFd(t, afd, unix.POLLIN)
			buf := make([]byte, 16)
			if n, err := Read(afd, buf); n != 4 || err != nil || string(buf[:n]) != "ping" {
				t.Fatalf("read: %q, %v", buf[:max(n, 0)], err)
			}
			if n, err := Read(afd, buf); n != -1 || err != unix.EAGAIN {
				t.Fatalf("read of an empty socket: %d, %v; want -1, EAGAIN", n, err)
			}
			if err := Shutdown(cfd, unix.SHUT_WR); err != nil {
				t.Fatal(err)
			}
			waitFd(t, afd, unix.POLLIN)
			if n, err := Read(afd, buf); n != 0 || err != nil {
				t.Fatalf("read after FIN: %d, %v; want 0, nil", n, err)
			}
			if err := LingerZero(afd); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestErrors(t *testing.T) {
	if err := Close(-1); err != unix.EBADF {
		t.Errorf("close(-1): %v, want EBADF", err)
	}
	if _, err := Getsockname(-1); err != unix.EBADF {
		t.Errorf("getsockname(-1): %v, want EBADF", err)
	}
	if _, err := Splice(-1, -1, 1, unix.SPLICE_F_NONBLOCK); err != unix.EBADF {
		t.Errorf("splice(-1): %v, want EBADF", err)
	}
	// A port nothing listens on: refused, at once or through SO_ERROR.
	lfd, addr := listen(t, "127.0.0.1:0")
	Close(lfd)
	fd, err := Socket(unix.AF_INET, unix.SOCK_STREAM)
	if err != nil {
		t.Fatal(err)
	}
	defer Close(fd)
	err = Connect(fd, addr)
	if err == unix.EINPROGRESS {
		waitFd(t, fd, unix.POLLOUT)
		soerr, _ := GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
		err = unix.Errno(soerr)
	}
	if err != unix.ECONNREFUSED {
		t.Errorf("connect to a closed port: %v, want ECONNREFUSED", err)
	}
}

// The calls the engine makes per connection allocate nothing.
func TestNoAllocations(t *testing.T) {
	lfd, addr := listen(t, "127.0.0.1:0")
	buf := make([]byte, 8)
	allocs := testing.AllocsPerRun(100, func() {
		Accept4(lfd, unix.SOCK_NONBLOCK)
		Getsockname(lfd)
		Read(lfd, buf)
		SetsockoptInt(lfd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
		fd, _ := Socket(unix.AF_INET, unix.SOCK_STREAM)
		Connect(fd, addr)
		Close(fd)
	})
	if allocs != 0 {
		t.Errorf("%.1f allocations per run, want 0", allocs)
	}
}
