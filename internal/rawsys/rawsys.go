// Package rawsys makes the engine's non-blocking system calls without telling
// the Go runtime.
//
// unix.Read and its kin go through syscall.Syscall, which marks the thread as
// possibly blocked (entersyscall/exitsyscall): if the call lasts a few tens of
// microseconds, sysmon hands the caller's P to another thread, and the caller
// must win a P back before it goes on. An event loop locked to its thread pays
// that on every loopback send, whose delivery runs the receiver's softirq in
// the sender's call. The calls here act only on non-blocking sockets, pipes
// (with SPLICE_F_NONBLOCK) and epoll sets, so none can block, and
// RawSyscall is safe. The price: a garbage-collector stop waits for the call
// in flight, microseconds at most. Never use them for a call that may block
// (epoll_wait with a timeout, a blocking socket).
//
// Conventions, as in unix: each returns the count or fd, or -1 and the errno
// (EINTR is the caller's to retry). Addresses travel as netip.AddrPort and
// are converted on the stack: nothing here allocates.
package rawsys

import (
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

func errnoErr(e unix.Errno) error {
	switch e {
	case unix.EAGAIN:
		return unix.EAGAIN // the common case, without boxing a new value
	}
	return e
}

func Read(fd int, p []byte) (int, error) { return readWrite(unix.SYS_READ, fd, p) }

func Write(fd int, p []byte) (int, error) { return readWrite(unix.SYS_WRITE, fd, p) }

// readWrite is read(2) or write(2), as trap says.
func readWrite(trap uintptr, fd int, p []byte) (int, error) {
	var ptr unsafe.Pointer
	if len(p) > 0 {
		ptr = unsafe.Pointer(&p[0])
	}
	r, _, e := unix.RawSyscall(trap, uintptr(fd), uintptr(ptr), uintptr(len(p)))
	if e != 0 {
		return -1, errnoErr(e)
	}
	return int(r), nil
}

// Recv is recvfrom(2) without a source address (a stream socket's read with
// flags, MSG_PEEK for the handshake's peeks): no sockaddr, so no allocation.
func Recv(fd int, p []byte, flags int) (int, error) {
	var ptr unsafe.Pointer
	if len(p) > 0 {
		ptr = unsafe.Pointer(&p[0])
	}
	r, _, e := unix.RawSyscall6(unix.SYS_RECVFROM, uintptr(fd), uintptr(ptr), uintptr(len(p)), uintptr(flags), 0, 0)
	if e != 0 {
		return -1, errnoErr(e)
	}
	return int(r), nil
}

// Splice moves up to n bytes from rfd to wfd; one of them must be a pipe.
func Splice(rfd, wfd int, n int, flags int) (int64, error) {
	r, _, e := unix.RawSyscall6(unix.SYS_SPLICE, uintptr(rfd), 0, uintptr(wfd), 0, uintptr(n), uintptr(flags))
	if e != 0 {
		return -1, errnoErr(e)
	}
	return int64(r), nil
}

// Accept4 takes a connection from the non-blocking listener fd and returns
// it with its peer's address.
func Accept4(fd int, flags int) (int, netip.AddrPort, error) {
	var rsa unix.RawSockaddrAny
	l := uint32(unsafe.Sizeof(rsa))
	r, _, e := unix.RawSyscall6(unix.SYS_ACCEPT4, uintptr(fd), uintptr(unsafe.Pointer(&rsa)), uintptr(unsafe.Pointer(&l)), uintptr(flags), 0, 0)
	if e != 0 {
		return -1, netip.AddrPort{}, errnoErr(e)
	}
	return int(r), toAddrPort(&rsa), nil
}

// Socket makes a non-blocking, close-on-exec socket.
func Socket(family, typ int) (int, error) {
	r, _, e := unix.RawSyscall(unix.SYS_SOCKET, uintptr(family), uintptr(typ|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC), 0)
	if e != 0 {
		return -1, errnoErr(e)
	}
	return int(r), nil
}

// Connect starts a connect on the non-blocking fd: nil when it completed at
// once, EINPROGRESS when its end comes as a writable event.
func Connect(fd int, to netip.AddrPort) error {
	var rsa unix.RawSockaddrAny
	l := fromAddrPort(to, &rsa)
	_, _, e := unix.RawSyscall(unix.SYS_CONNECT, uintptr(fd), uintptr(unsafe.Pointer(&rsa)), uintptr(l))
	if e != 0 {
		return errnoErr(e)
	}
	return nil
}

// Getsockname returns the socket's local address.
func Getsockname(fd int) (netip.AddrPort, error) {
	var rsa unix.RawSockaddrAny
	l := uint32(unsafe.Sizeof(rsa))
	_, _, e := unix.RawSyscall(unix.SYS_GETSOCKNAME, uintptr(fd), uintptr(unsafe.Pointer(&rsa)), uintptr(unsafe.Pointer(&l)))
	if e != 0 {
		return netip.AddrPort{}, errnoErr(e)
	}
	return toAddrPort(&rsa), nil
}

func SetsockoptInt(fd, level, opt, value int) error {
	v := int32(value)
	_, _, e := unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(unsafe.Pointer(&v)), 4, 0)
	if e != 0 {
		return errnoErr(e)
	}
	return nil
}

func GetsockoptInt(fd, level, opt int) (int, error) {
	var v int32
	l := uint32(4)
	_, _, e := unix.RawSyscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(unsafe.Pointer(&v)), uintptr(unsafe.Pointer(&l)), 0)
	if e != 0 {
		return -1, errnoErr(e)
	}
	return int(v), nil
}

// LingerZero makes the next close of fd send a reset.
func LingerZero(fd int) error {
	lg := unix.Linger{Onoff: 1, Linger: 0}
	_, _, e := unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_LINGER, uintptr(unsafe.Pointer(&lg)), unsafe.Sizeof(lg), 0)
	if e != 0 {
		return errnoErr(e)
	}
	return nil
}

func Shutdown(fd, how int) error {
	_, _, e := unix.RawSyscall(unix.SYS_SHUTDOWN, uintptr(fd), uintptr(how), 0)
	if e != 0 {
		return errnoErr(e)
	}
	return nil
}

// Close closes fd. Without SO_LINGER set to a positive time (never here),
// close of a socket does not wait.
func Close(fd int) error {
	_, _, e := unix.RawSyscall(unix.SYS_CLOSE, uintptr(fd), 0, 0)
	if e != 0 {
		return errnoErr(e)
	}
	return nil
}

// EpollCtl changes the epoll set epfd; ev may be nil for EPOLL_CTL_DEL.
func EpollCtl(epfd, op, fd int, ev *unix.EpollEvent) error {
	_, _, e := unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(epfd), uintptr(op), uintptr(fd), uintptr(unsafe.Pointer(ev)), 0, 0)
	if e != 0 {
		return errnoErr(e)
	}
	return nil
}

// toAddrPort converts an AF_INET or AF_INET6 address (a v4-mapped one to
// its v4 form); any other family gives the zero value.
func toAddrPort(rsa *unix.RawSockaddrAny) netip.AddrPort {
	switch rsa.Addr.Family {
	case unix.AF_INET:
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(rsa))
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), portOf(&sa.Port))
	case unix.AF_INET6:
		sa := (*unix.RawSockaddrInet6)(unsafe.Pointer(rsa))
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), portOf(&sa.Port))
	}
	return netip.AddrPort{}
}

// fromAddrPort fills rsa with ap (a v4 or v4-mapped address as AF_INET) and
// returns the length to pass.
func fromAddrPort(ap netip.AddrPort, rsa *unix.RawSockaddrAny) uint32 {
	a := ap.Addr()
	if a.Is4() || a.Is4In6() {
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(rsa))
		sa.Family = unix.AF_INET
		setPort(&sa.Port, ap.Port())
		sa.Addr = a.Unmap().As4()
		return unix.SizeofSockaddrInet4
	}
	sa := (*unix.RawSockaddrInet6)(unsafe.Pointer(rsa))
	sa.Family = unix.AF_INET6
	setPort(&sa.Port, ap.Port())
	sa.Addr = a.As16()
	return unix.SizeofSockaddrInet6
}

// portOf reads a sockaddr's port field, held in network byte order.
func portOf(f *uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(f))
	return uint16(b[0])<<8 | uint16(b[1])
}

// setPort writes p into a sockaddr's port field in network byte order.
func setPort(f *uint16, p uint16) {
	*(*[2]byte)(unsafe.Pointer(f)) = [2]byte{byte(p >> 8), byte(p)}
}
