package channel

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// Raw non-blocking I/O for the channel's hot path.
//
// unix.Read and friends go through syscall.Syscall, which tells the runtime
// the thread may block (entersyscall/exitsyscall); if the call lasts, sysmon
// hands the loop's P to another thread and the loop must win one back after
// it. The sockets and pipes here are non-blocking and splice gets
// SPLICE_F_NONBLOCK, so no call can block and RawSyscall is safe: measured on
// the rps scenario (bench/RESULTS.md), it removes most futex wake-ups.
//
// Each returns the count moved, or -1 and the errno; EINTR is the caller's.

func rawRead(fd int, p []byte) (int, error) {
	var ptr unsafe.Pointer
	if len(p) > 0 {
		ptr = unsafe.Pointer(&p[0])
	}
	r, _, e := unix.RawSyscall(unix.SYS_READ, uintptr(fd), uintptr(ptr), uintptr(len(p)))
	if e != 0 {
		return -1, e
	}
	return int(r), nil
}

func rawWrite(fd int, p []byte) (int, error) {
	var ptr unsafe.Pointer
	if len(p) > 0 {
		ptr = unsafe.Pointer(&p[0])
	}
	r, _, e := unix.RawSyscall(unix.SYS_WRITE, uintptr(fd), uintptr(ptr), uintptr(len(p)))
	if e != 0 {
		return -1, e
	}
	return int(r), nil
}

// rawSplice moves up to n bytes from rfd to wfd; one of them must be a pipe.
func rawSplice(rfd, wfd int, n int, flags int) (int64, error) {
	r, _, e := unix.RawSyscall6(unix.SYS_SPLICE, uintptr(rfd), 0, uintptr(wfd), 0, uintptr(n), uintptr(flags))
	if e != 0 {
		return -1, e
	}
	return int64(r), nil
}
