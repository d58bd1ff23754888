package rawsys

import (
	"net/netip"
	"os"
	"os/signal"
	"testing"
	"time"

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

// udpSocket returns a non-blocking datagram socket bound by Bind to addr
// (port 0) and its address.
func udpSocket(t *testing.T, addr string) (int, netip.AddrPort) {
	t.Helper()
	ap := netip.MustParseAddrPort(addr)
	fd, err := Socket(familyOf(ap), unix.SOCK_DGRAM)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { Close(fd) })
	if err := Bind(fd, ap); err != nil {
		t.Skipf("bind %s: %v", addr, err) // no IPv6 on this host
	}
	got, err := Getsockname(fd)
	if err != nil || got.Addr() != ap.Addr() || got.Port() == 0 {
		t.Fatalf("getsockname = %v, %v; want %s with a port", got, err, ap.Addr())
	}
	return fd, got
}

// Datagrams both ways through Sendto and Recvfrom, both families: each keeps
// its bounds, and its source is the sender's address.
func TestDatagrams(t *testing.T) {
	for _, addr := range []string{"127.0.0.1:0", "[::1]:0"} {
		t.Run(addr, func(t *testing.T) {
			a, aAddr := udpSocket(t, addr)
			b, bAddr := udpSocket(t, addr)
			buf := make([]byte, 64)
			if n, _, err := Recvfrom(a, buf, 0); n != -1 || err != unix.EAGAIN {
				t.Fatalf("recvfrom on an empty socket: %d, %v; want -1, EAGAIN", n, err)
			}
			for _, msg := range []string{"one", "", "three"} {
				if n, err := Sendto(b, []byte(msg), 0, aAddr); n != len(msg) || err != nil {
					t.Fatalf("sendto %q: %d, %v", msg, n, err)
				}
			}
			for _, msg := range []string{"one", "", "three"} {
				waitFd(t, a, unix.POLLIN)
				n, src, err := Recvfrom(a, buf, 0)
				if err != nil || string(buf[:n]) != msg || src != bAddr {
					t.Fatalf("recvfrom: %q from %v, %v; want %q from %v", buf[:max(n, 0)], src, err, msg, bAddr)
				}
			}
			// A connected datagram socket: Write to it, Recvfrom names it.
			if err := Connect(b, aAddr); err != nil {
				t.Fatalf("connect of a datagram socket: %v", err)
			}
			if n, err := Write(b, []byte("hi")); n != 2 || err != nil {
				t.Fatalf("write: %d, %v", n, err)
			}
			waitFd(t, a, unix.POLLIN)
			if n, src, err := Recvfrom(a, buf, 0); n != 2 || src != bAddr || err != nil {
				t.Fatalf("recvfrom: %d from %v, %v", n, src, err)
			}
		})
	}
}

// A connected datagram socket to a port with nothing bound: the kernel's
// port-unreachable comes back as ECONNREFUSED on the next call.
func TestDatagramRefused(t *testing.T) {
	dead, deadAddr := udpSocket(t, "127.0.0.1:0")
	Close(dead)
	fd, _ := udpSocket(t, "127.0.0.1:0")
	if err := Connect(fd, deadAddr); err != nil {
		t.Fatal(err)
	}
	if _, err := Write(fd, []byte("anyone?")); err != nil {
		t.Fatal(err)
	}
	waitFd(t, fd, unix.POLLIN|unix.POLLERR)
	if _, err := Read(fd, make([]byte, 8)); err != unix.ECONNREFUSED {
		t.Fatalf("read after the port-unreachable: %v, want ECONNREFUSED", err)
	}
}

// Addresses round-trip through the kernel's form: a v4-mapped one comes back
// as v4 (it is sent as AF_INET), an unknown family decodes to the zero value.
func TestAddrPortRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		family   uint16
	}{
		{"127.0.0.1:80", "127.0.0.1:80", unix.AF_INET},
		{"255.255.255.255:65535", "255.255.255.255:65535", unix.AF_INET},
		{"[::ffff:10.0.0.1]:443", "10.0.0.1:443", unix.AF_INET},
		{"[::1]:1", "[::1]:1", unix.AF_INET6},
		{"[2001:db8::1]:8080", "[2001:db8::1]:8080", unix.AF_INET6},
	} {
		var rsa unix.RawSockaddrAny
		l := fromAddrPort(netip.MustParseAddrPort(tc.in), &rsa)
		if rsa.Addr.Family != tc.family {
			t.Errorf("%s: family %d, want %d", tc.in, rsa.Addr.Family, tc.family)
		}
		if want := map[uint16]uint32{unix.AF_INET: unix.SizeofSockaddrInet4, unix.AF_INET6: unix.SizeofSockaddrInet6}[tc.family]; l != want {
			t.Errorf("%s: length %d, want %d", tc.in, l, want)
		}
		if got := toAddrPort(&rsa); got != netip.MustParseAddrPort(tc.want) {
			t.Errorf("%s: decoded %v, want %s", tc.in, got, tc.want)
		}
	}
	rsa := unix.RawSockaddrAny{Addr: unix.RawSockaddr{Family: unix.AF_UNIX}}
	if got := toAddrPort(&rsa); got.IsValid() {
		t.Errorf("AF_UNIX decoded as %v, want the zero value", got)
	}
}

// The per-datagram calls allocate nothing, with control data too.
func TestDatagramNoAllocations(t *testing.T) {
	a, aAddr := udpSocket(t, "127.0.0.1:0")
	b, _ := udpSocket(t, "127.0.0.1:0")
	if err := SetsockoptInt(a, unix.IPPROTO_IP, unix.IP_PKTINFO, 1); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	allocs := testing.AllocsPerRun(100, func() {
		Sendto(b, buf[:8], 0, aAddr)
		Recvfrom(a, buf, 0)
		Sendto(b, buf[:8], 0, aAddr)
		_, src, dst, ifindex, _ := RecvFromTo(a, buf)
		SendFromTo(a, buf[:8], dst, ifindex, src)
		Recvfrom(b, buf, 0)
	})
	if allocs != 0 {
		t.Errorf("%.1f allocations per datagram, want 0", allocs)
	}
}

// A wildcard datagram socket asked for IP_PKTINFO / IPV6_RECVPKTINFO:
// RecvFromTo names the address each datagram was sent to, and SendFromTo
// sends the reply from it (127.0.0.2 is as local as 127.0.0.1). Without the
// option there is no destination, and SendFromTo without a source is
// Sendto.
func TestPktinfo(t *testing.T) {
	for _, tc := range []struct {
		wild, client string
		level, opt   int
		dsts         []string
	}{
		{"0.0.0.0:0", "127.0.0.1:0", unix.IPPROTO_IP, unix.IP_PKTINFO, []string{"127.0.0.1", "127.0.0.2", "127.1.2.3"}},
		{"[::]:0", "[::1]:0", unix.IPPROTO_IPV6, unix.IPV6_RECVPKTINFO, []string{"::1"}},
	} {
		t.Run(tc.wild, func(t *testing.T) {
			srv, srvAddr := udpSocket(t, tc.wild)
			cl, clAddr := udpSocket(t, tc.client)
			buf := make([]byte, 64)
			Sendto(cl, []byte("no option"), 0, netip.AddrPortFrom(netip.MustParseAddr(tc.dsts[0]), srvAddr.Port()))
			waitFd(t, srv, unix.POLLIN)
			if n, src, dst, _, err := RecvFromTo(srv, buf); err != nil || string(buf[:n]) != "no option" || src != clAddr || dst.IsValid() {
				t.Fatalf("without the option: %q from %v to %v, %v", buf[:max(n, 0)], src, dst, err)
			}
			if err := SetsockoptInt(srv, tc.level, tc.opt, 1); err != nil {
				t.Fatal(err)
			}
			for _, d := range tc.dsts {
				to := netip.AddrPortFrom(netip.MustParseAddr(d), srvAddr.Port())
				Sendto(cl, []byte(d), 0, to)
				waitFd(t, srv, unix.POLLIN)
				n, src, dst, ifindex, err := RecvFromTo(srv, buf)
				if err != nil || string(buf[:n]) != d || src != clAddr || dst != to.Addr() || ifindex <= 0 {
					t.Fatalf("sent %q to %v: got %q from %v to %v (if %d), %v", d, to, buf[:max(n, 0)], src, dst, ifindex, err)
				}
				if n, err := SendFromTo(srv, buf[:n], dst, ifindex, src); err != nil || n != len(d) {
					t.Fatalf("sendmsg: %d, %v", n, err)
				}
				waitFd(t, cl, unix.POLLIN)
				if n, from, err := Recvfrom(cl, buf, 0); err != nil || string(buf[:n]) != d || from != to {
					t.Fatalf("reply %q from %v, %v; want it from %v", buf[:max(n, 0)], from, err, to)
				}
			}
		})
	}
}

// Send and Recv move a stream's bytes; Send with MSG_NOSIGNAL to a peer that
// reset fails with EPIPE and raises no SIGPIPE (with flags 0 the Notify
// channel receives one: the test fails).
func TestSendRecvStream(t *testing.T) {
	lfd, addr := listen(t, "127.0.0.1:0")
	fd, err := Socket(unix.AF_INET, unix.SOCK_STREAM)
	if err != nil {
		t.Fatal(err)
	}
	defer Close(fd)
	if err := Connect(fd, addr); err != nil && err != unix.EINPROGRESS {
		t.Fatal(err)
	}
	waitFd(t, lfd, unix.POLLIN)
	afd, _, err := Accept4(lfd, unix.SOCK_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	waitFd(t, fd, unix.POLLOUT)
	if n, err := Send(fd, []byte("hello")); n != 5 || err != nil {
		t.Fatalf("send: %d, %v", n, err)
	}
	waitFd(t, afd, unix.POLLIN)
	buf := make([]byte, 16)
	if n, err := Recv(afd, buf, 0); n != 5 || err != nil || string(buf[:n]) != "hello" {
		t.Fatalf("recv: %d %q, %v", n, buf[:max(n, 0)], err)
	}
	if _, err := Recv(afd, buf, 0); err != unix.EAGAIN {
		t.Fatalf("recv of an empty socket: %v, want EAGAIN", err)
	}

	pipes := make(chan os.Signal, 1)
	signal.Notify(pipes, unix.SIGPIPE)
	defer signal.Stop(pipes)
	LingerZero(afd)
	Close(afd) // a reset to fd
	waitFd(t, fd, unix.POLLIN)
	var last error
	for i := 0; i < 3 && last != unix.EPIPE; i++ { // ECONNRESET first, then EPIPE: the one that signals
		_, last = Send(fd, []byte("x"))
	}
	if last != unix.EPIPE {
		t.Errorf("send after the peer's reset: %v, want EPIPE", last)
	}
	select {
	case <-pipes:
		t.Error("SIGPIPE raised despite MSG_NOSIGNAL")
	case <-time.After(50 * time.Millisecond):
	}
}
