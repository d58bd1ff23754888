// Package rawsys makes the engine's non-blocking system calls without telling
// the Go runtime.
//
// unix.Read and its kin go through syscall.Syscall, which marks the thread as
// possibly blocked (entersyscall/exitsyscall): if the call lasts a few tens of
// microseconds, sysmon hands the caller's P to another thread, and the caller
// must win a P back before it goes on. An event loop pays
// that on every loopback send, whose delivery runs the receiver's softirq in
// the sender's call. The calls here act only on non-blocking sockets, pipes
// (with SPLICE_F_NONBLOCK) and epoll sets, so none can block, and
// RawSyscall is safe. The price: a garbage-collector stop waits for the call
// in flight, microseconds at most. Never use them for a call that may block
// (epoll_wait with a timeout, a blocking socket).
//
// Conventions, as in unix: each returns the count or fd, or -1 and the errno.
// Addresses travel as netip.AddrPort and are converted on the stack: nothing
// here allocates.
//
// EINTR: no caller ever sees it. Every call that a signal can interrupt
// before it did anything is retried here, at once (none of them blocks, so
// the retry costs one more trap). Two calls differ, because a retry would be
// wrong: connect(2) interrupted goes on asynchronously, so Connect reports
// EINPROGRESS and the end comes as a writable event, as for any connect in
// flight; close(2) releases the fd on Linux even when it reports EINTR, so
// Close never retries (the fd number may already be another thread's) and
// reports success.
package rawsys

import (
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// errnoErr boxes e without allocating for the common EAGAIN.
func errnoErr(e unix.Errno) error {
	switch e {
	case unix.EAGAIN:
		return unix.EAGAIN // the common case, without boxing a new value
	}
	return e
}

// count is the convention of the calls that return a count or an fd: r, or
// -1 and the errno.
func count(r uintptr, e unix.Errno) (int, error) {
	if e != 0 {
		return -1, errnoErr(e)
	}
	return int(r), nil
}

// status is the convention of the calls that return nothing but success.
func status(e unix.Errno) error {
	if e != 0 {
		return errnoErr(e)
	}
	return nil
}

// Every call below is a loop around its trap that runs again on EINTR (the
// package doc says why, and which two calls differ). The trap stays written
// out in each: a pointer converted to uintptr is only kept valid within the
// syscall's own call expression.

func Read(fd int, p []byte) (int, error) { return readWrite(unix.SYS_READ, fd, p) }

func Write(fd int, p []byte) (int, error) { return readWrite(unix.SYS_WRITE, fd, p) }

// readWrite is read(2) or write(2), as trap says.
func readWrite(trap uintptr, fd int, p []byte) (int, error) {
	ptr := bufPtr(p)
	for {
		r, _, e := unix.RawSyscall(trap, uintptr(fd), uintptr(ptr), uintptr(len(p)))
		if e != unix.EINTR {
			return count(r, e)
		}
	}
}

// bufPtr is p's first byte, or nil for an empty p.
func bufPtr(p []byte) unsafe.Pointer {
	if len(p) > 0 {
		return unsafe.Pointer(&p[0])
	}
	return nil
}

// Recv is recvfrom(2) without a source address (a stream socket's read with
// flags, MSG_PEEK for the handshake's peeks): no sockaddr, so no allocation.
func Recv(fd int, p []byte, flags int) (int, error) { return sockIO(unix.SYS_RECVFROM, fd, p, flags) }

// Send is sendto(2) without a destination: a stream socket's write, always
// with MSG_NOSIGNAL (a write to a reset peer fails with EPIPE without a
// SIGPIPE to the process). The engine's byte moves use Recv and Send rather
// than read(2) and write(2), which reach the socket through the file layer
// (fdget_pos, rw_verify_area, the iter wrappers); the socket calls skip it,
// about 3 % of a small write-and-read pair on loopback here.
func Send(fd int, p []byte) (int, error) {
	return sockIO(unix.SYS_SENDTO, fd, p, unix.MSG_NOSIGNAL)
}

// sockIO is recvfrom(2) or sendto(2), as trap says, with no address.
func sockIO(trap uintptr, fd int, p []byte, flags int) (int, error) {
	ptr := bufPtr(p)
	for {
		r, _, e := unix.RawSyscall6(trap, uintptr(fd), uintptr(ptr), uintptr(len(p)), uintptr(flags), 0, 0)
		if e != unix.EINTR {
			return count(r, e)
		}
	}
}

// Recvfrom reads one datagram into p and returns its length and source (the
// zero AddrPort for a family other than IPv4 and IPv6). The address is
// decoded on the stack: unlike unix.Recvfrom, nothing is allocated.
func Recvfrom(fd int, p []byte, flags int) (int, netip.AddrPort, error) {
	ptr := bufPtr(p)
	var rsa unix.RawSockaddrAny
	for {
		l := uint32(unsafe.Sizeof(rsa))
		r, _, e := unix.RawSyscall6(unix.SYS_RECVFROM, uintptr(fd), uintptr(ptr), uintptr(len(p)), uintptr(flags),
			uintptr(unsafe.Pointer(&rsa)), uintptr(unsafe.Pointer(&l)))
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return -1, netip.AddrPort{}, errnoErr(e)
		}
		return int(r), toAddrPort(&rsa), nil
	}
}

// Sendto sends p as one datagram to to, without allocating (unix.Sendto
// boxes a Sockaddr).
func Sendto(fd int, p []byte, flags int, to netip.AddrPort) (int, error) {
	ptr := bufPtr(p)
	var rsa unix.RawSockaddrAny
	l := fromAddrPort(to, &rsa)
	for {
		r, _, e := unix.RawSyscall6(unix.SYS_SENDTO, uintptr(fd), uintptr(ptr), uintptr(len(p)), uintptr(flags),
			uintptr(unsafe.Pointer(&rsa)), uintptr(l))
		if e != unix.EINTR {
			return count(r, e)
		}
	}
}

// RecvFromTo and SendFromTo each fill their msghdr in place: a helper taking
// pointers to the stack variables made all four escape to the heap
// (TestDatagramNoAllocations).

// pktinfoBuf is room for one IP_PKTINFO or IPV6_PKTINFO control message,
// 8-byte aligned as cmsg(3) wants; it lives on the caller's stack.
type pktinfoBuf [8]uint64

// It holds the larger message: a negative constant does not compile.
const _ = uint(unsafe.Sizeof(pktinfoBuf{}) - (unix.SizeofCmsghdr + unix.SizeofInet6Pktinfo))

// RecvFromTo reads one datagram into p, like Recvfrom, and also returns the
// local address it was sent to and the interface it came in on, from the
// IP_PKTINFO / IPV6_PKTINFO control message the socket was asked for
// (IP_PKTINFO, IPV6_RECVPKTINFO); dst is the zero Addr when there is none.
// Nothing is allocated.
func RecvFromTo(fd int, p []byte) (n int, src netip.AddrPort, dst netip.Addr, ifindex int, err error) {
	var rsa unix.RawSockaddrAny
	var oob pktinfoBuf
	var iov unix.Iovec
	iov.Base = (*byte)(bufPtr(p))
	iov.SetLen(len(p))
	var msg unix.Msghdr
	msg.Name = (*byte)(unsafe.Pointer(&rsa))
	msg.Iov = &iov
	msg.SetIovlen(1)
	msg.Control = (*byte)(unsafe.Pointer(&oob))
	for {
		msg.Namelen = uint32(unsafe.Sizeof(rsa))
		msg.SetControllen(int(unsafe.Sizeof(oob)))
		r, _, e := unix.RawSyscall(unix.SYS_RECVMSG, uintptr(fd), uintptr(unsafe.Pointer(&msg)), 0)
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return -1, netip.AddrPort{}, netip.Addr{}, 0, errnoErr(e)
		}
		dst, ifindex = parsePktinfo(oob[:], int(msg.Controllen))
		return int(r), toAddrPort(&rsa), dst, ifindex, nil
	}
}

// parsePktinfo finds the destination address and interface in the first
// IP_PKTINFO or IPV6_PKTINFO message of the control data b[:n].
func parsePktinfo(b []uint64, n int) (netip.Addr, int) {
	raw := unsafe.Slice((*byte)(unsafe.Pointer(&b[0])), len(b)*8)[:min(n, len(b)*8)]
	for len(raw) >= unix.SizeofCmsghdr {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&raw[0]))
		l := int(h.Len)
		if l < unix.SizeofCmsghdr || l > len(raw) {
			break
		}
		data := raw[unix.CmsgLen(0):l]
		switch {
		case h.Level == unix.IPPROTO_IP && h.Type == unix.IP_PKTINFO && len(data) >= unix.SizeofInet4Pktinfo:
			pi := (*unix.Inet4Pktinfo)(unsafe.Pointer(&data[0]))
			return netip.AddrFrom4(pi.Addr), int(pi.Ifindex)
		case h.Level == unix.IPPROTO_IPV6 && h.Type == unix.IPV6_PKTINFO && len(data) >= unix.SizeofInet6Pktinfo:
			pi := (*unix.Inet6Pktinfo)(unsafe.Pointer(&data[0]))
			return netip.AddrFrom16(pi.Addr).Unmap(), int(pi.Ifindex)
		}
		raw = raw[min(unix.CmsgSpace(l-unix.SizeofCmsghdr), len(raw)):]
	}
	return netip.Addr{}, 0
}

// SendFromTo sends p as one datagram to to, from the local address from
// (an IP_PKTINFO / IPV6_PKTINFO control message: the reply of a wildcard
// socket leaves from the address its request came to). ifindex is the
// interface the request came in on: needed for an IPv6 link-local from,
// ignored otherwise (routing chooses). An invalid from leaves the source to
// the kernel, as Sendto. Nothing is allocated.
func SendFromTo(fd int, p []byte, from netip.Addr, ifindex int, to netip.AddrPort) (int, error) {
	var rsa unix.RawSockaddrAny
	var oob pktinfoBuf
	var iov unix.Iovec
	iov.Base = (*byte)(bufPtr(p))
	iov.SetLen(len(p))
	var msg unix.Msghdr
	msg.Name = (*byte)(unsafe.Pointer(&rsa))
	msg.Namelen = fromAddrPort(to, &rsa)
	msg.Iov = &iov
	msg.SetIovlen(1)
	if from.IsValid() {
		msg.Control = (*byte)(unsafe.Pointer(&oob))
		h := (*unix.Cmsghdr)(unsafe.Pointer(&oob))
		data := unsafe.Add(unsafe.Pointer(&oob), unix.CmsgLen(0))
		if rsa.Addr.Family == unix.AF_INET {
			h.Level, h.Type = unix.IPPROTO_IP, unix.IP_PKTINFO
			h.SetLen(unix.CmsgLen(unix.SizeofInet4Pktinfo))
			(*unix.Inet4Pktinfo)(data).Spec_dst = from.Unmap().As4()
			msg.SetControllen(unix.CmsgSpace(unix.SizeofInet4Pktinfo))
		} else {
			h.Level, h.Type = unix.IPPROTO_IPV6, unix.IPV6_PKTINFO
			h.SetLen(unix.CmsgLen(unix.SizeofInet6Pktinfo))
			pi := (*unix.Inet6Pktinfo)(data)
			pi.Addr = from.As16()
			if from.IsLinkLocalUnicast() {
				pi.Ifindex = uint32(ifindex)
			}
			msg.SetControllen(unix.CmsgSpace(unix.SizeofInet6Pktinfo))
		}
	}
	for {
		r, _, e := unix.RawSyscall(unix.SYS_SENDMSG, uintptr(fd), uintptr(unsafe.Pointer(&msg)), 0)
		if e != unix.EINTR {
			return count(r, e)
		}
	}
}

// Splice moves up to n bytes from rfd to wfd; one of them must be a pipe.
func Splice(rfd, wfd int, n int, flags int) (int64, error) {
	for {
		r, _, e := unix.RawSyscall6(unix.SYS_SPLICE, uintptr(rfd), 0, uintptr(wfd), 0, uintptr(n), uintptr(flags))
		if e != unix.EINTR {
			c, err := count(r, e)
			return int64(c), err
		}
	}
}

// Accept4 takes a connection from the non-blocking listener fd and returns
// it with its peer's address.
func Accept4(fd int, flags int) (int, netip.AddrPort, error) {
	var rsa unix.RawSockaddrAny
	for {
		l := uint32(unsafe.Sizeof(rsa))
		r, _, e := unix.RawSyscall6(unix.SYS_ACCEPT4, uintptr(fd), uintptr(unsafe.Pointer(&rsa)), uintptr(unsafe.Pointer(&l)), uintptr(flags), 0, 0)
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return -1, netip.AddrPort{}, errnoErr(e)
		}
		return int(r), toAddrPort(&rsa), nil
	}
}

// Socket makes a non-blocking, close-on-exec socket.
func Socket(family, typ int) (int, error) {
	for {
		r, _, e := unix.RawSyscall(unix.SYS_SOCKET, uintptr(family), uintptr(typ|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC), 0)
		if e != unix.EINTR {
			return count(r, e)
		}
	}
}

// Connect starts a connect on the non-blocking fd: nil when it completed at
// once (always, for a datagram socket that can route to), EINPROGRESS when
// its end comes as a writable event. An interrupted connect goes on in the
// kernel (a second call would say EALREADY): it is reported as EINPROGRESS.
func Connect(fd int, to netip.AddrPort) error {
	var rsa unix.RawSockaddrAny
	l := fromAddrPort(to, &rsa)
	_, _, e := unix.RawSyscall(unix.SYS_CONNECT, uintptr(fd), uintptr(unsafe.Pointer(&rsa)), uintptr(l))
	if e == unix.EINTR {
		return unix.EINPROGRESS
	}
	return status(e)
}

// Bind binds fd to addr.
func Bind(fd int, addr netip.AddrPort) error {
	var rsa unix.RawSockaddrAny
	l := fromAddrPort(addr, &rsa)
	for {
		_, _, e := unix.RawSyscall(unix.SYS_BIND, uintptr(fd), uintptr(unsafe.Pointer(&rsa)), uintptr(l))
		if e != unix.EINTR {
			return status(e)
		}
	}
}

// Getsockname returns the socket's local address.
func Getsockname(fd int) (netip.AddrPort, error) {
	var rsa unix.RawSockaddrAny
	for {
		l := uint32(unsafe.Sizeof(rsa))
		_, _, e := unix.RawSyscall(unix.SYS_GETSOCKNAME, uintptr(fd), uintptr(unsafe.Pointer(&rsa)), uintptr(unsafe.Pointer(&l)))
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return netip.AddrPort{}, errnoErr(e)
		}
		return toAddrPort(&rsa), nil
	}
}

func SetsockoptInt(fd, level, opt, value int) error {
	v := int32(value)
	for {
		_, _, e := unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(unsafe.Pointer(&v)), 4, 0)
		if e != unix.EINTR {
			return status(e)
		}
	}
}

func GetsockoptInt(fd, level, opt int) (int, error) {
	var v int32
	for {
		l := uint32(4)
		_, _, e := unix.RawSyscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(unsafe.Pointer(&v)), uintptr(unsafe.Pointer(&l)), 0)
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return -1, errnoErr(e)
		}
		return int(v), nil
	}
}

// LingerZero makes the next close of fd send a reset.
func LingerZero(fd int) error {
	lg := unix.Linger{Onoff: 1, Linger: 0}
	for {
		_, _, e := unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_LINGER, uintptr(unsafe.Pointer(&lg)), unsafe.Sizeof(lg), 0)
		if e != unix.EINTR {
			return status(e)
		}
	}
}

func Shutdown(fd, how int) error {
	for {
		_, _, e := unix.RawSyscall(unix.SYS_SHUTDOWN, uintptr(fd), uintptr(how), 0)
		if e != unix.EINTR {
			return status(e)
		}
	}
}

// Close closes fd. Without SO_LINGER set to a positive time (never here),
// close of a socket does not wait. EINTR is success and never retried: Linux
// has released the fd by then.
func Close(fd int) error {
	_, _, e := unix.RawSyscall(unix.SYS_CLOSE, uintptr(fd), 0, 0)
	if e == unix.EINTR {
		return nil
	}
	return status(e)
}

// EpollCtl changes the epoll set epfd; ev may be nil for EPOLL_CTL_DEL.
func EpollCtl(epfd, op, fd int, ev *unix.EpollEvent) error {
	for {
		_, _, e := unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(epfd), uintptr(op), uintptr(fd), uintptr(unsafe.Pointer(ev)), 0, 0)
		if e != unix.EINTR {
			return status(e)
		}
	}
}

// toAddrPort decodes a kernel socket address, AF_INET or AF_INET6 (a
// v4-mapped one to its v4 form); any other family gives the zero value. It
// is the one decoder of the engine's addresses.
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
