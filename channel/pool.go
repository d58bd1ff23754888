package channel

import (
	"bufio"
	"os"
	"strconv"
	"strings"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Defaults for the pools. A buffer is HAProxy's bufsize; a pipe asks the
// kernel for PipeSize and takes what it is given.
const (
	DefaultBufSize  = 16 << 10
	DefaultPipeSize = 256 << 10
	// keepFree bounds how many idle buffers one pool keeps for reuse; past
	// it they go back to the GC. Free pipes are bounded by the budget.
	keepFree = 64
	// maxFreePipes bounds the free pipes of a process: an idle pipe is two
	// fds and, unprivileged, pipe pages of the user's allowance.
	maxFreePipes = 256
)

// PipeBudget bounds the pipes of a whole process, shared by every Pools
// (HAProxy's maxpipes): the pipes open, and of those the ones kept free for
// reuse. Safe for concurrent use.
//
// Invariant: free <= inUse <= max, and free <= maxFree, outside the moments
// of an update.
type PipeBudget struct {
	max     int64
	maxFree int64
	inUse   atomic.Int64 // pipes open, in use or kept free
	free    atomic.Int64 // of those, kept free in a pool
	fails   atomic.Int64 // times a channel wanted a pipe and got none
}

// NewPipeBudget returns a budget of max pipes, a quarter of them (at least
// one, at most 256) kept free once returned; max <= 0 means no pipes at all.
func NewPipeBudget(n int) *PipeBudget {
	return &PipeBudget{max: int64(n), maxFree: int64(min(max(n/4, 1), maxFreePipes))}
}

// Max returns the most pipes the budget lets the process open.
func (b *PipeBudget) Max() int64 { return b.max }

// MaxFree returns the most pipes the pools keep free.
func (b *PipeBudget) MaxFree() int64 { return b.maxFree }

// keep reports whether one more returned pipe may be kept free; the caller
// closes it otherwise (the surplus goes back to the kernel).
func (b *PipeBudget) keep() bool {
	if b.free.Add(1) > b.maxFree {
		b.free.Add(-1)
		return false
	}
	return true
}

func (b *PipeBudget) unkeep(n int64) { b.free.Add(-n) }

// The pipes the kernel grants an unprivileged user at full size: every pipe
// of a user without CAP_SYS_RESOURCE or CAP_SYS_ADMIN counts its slots (one
// page each) against /proc/sys/fs/pipe-user-pages-soft, and past it a new
// pipe gets 2 slots (8 KiB) and F_SETPIPE_SZ fails; past
// pipe-user-pages-hard no pipe is made at all. Of the allowance, sluice
// takes pipeFitShare quarters: the user's other pipes (the daemon's own stdio, other
// processes of the same user) need the rest.
const pipeFitShare = 3 // quarters of the allowance

// PipeFit returns how many pipes of pipeSize bytes this process may hold at
// full size under the kernel's per-user pipe limits, or -1 when no limit
// applies (the process is privileged, or the limits are off).
func PipeFit(pipeSize int) int {
	if privilegedPipes() {
		return -1
	}
	soft := readProcInt("/proc/sys/fs/pipe-user-pages-soft")
	if hard := readProcInt("/proc/sys/fs/pipe-user-pages-hard"); hard > 0 && (soft <= 0 || hard < soft) {
		soft = hard
	}
	if soft <= 0 {
		return -1
	}
	return soft * pipeFitShare / 4 / pipeSlots(pipeSize)
}

// MaxPipes returns the pipe budget of a process whose fd table holds fds
// descriptors, for pipes of pipeSize bytes: want (0: the default, an
// eighth of the fds, so that pipes, two fds each, take at most a quarter
// and sockets keep the rest), cut to PipeFit when the kernel's per-user
// pipe limits apply.
func MaxPipes(want, fds, pipeSize int) int {
	if want == 0 {
		want = fds / 8
	}
	if fit := PipeFit(pipeSize); fit >= 0 && want > fit {
		want = max(fit, 1)
	}
	return want
}

// pipeSlots is the slots (pages) the kernel gives a pipe asked for size
// bytes: a power of two, at least one.
func pipeSlots(size int) int {
	pages := (size + os.Getpagesize() - 1) / os.Getpagesize()
	n := 1
	for n < pages {
		n <<= 1
	}
	return n
}

// privilegedPipes reports whether the process has CAP_SYS_RESOURCE or
// CAP_SYS_ADMIN in its effective set: the kernel's pipe limits do not apply.
func privilegedPipes() bool {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return os.Geteuid() == 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "CapEff:"); ok {
			caps, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				return os.Geteuid() == 0
			}
			return caps&(1<<unix.CAP_SYS_RESOURCE|1<<unix.CAP_SYS_ADMIN) != 0
		}
	}
	return os.Geteuid() == 0
}

// readProcInt reads a number from a /proc file, or -1.
func readProcInt(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return -1
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return -1
	}
	return n
}

// Open returns the number of pipes open in the process under this budget.
func (b *PipeBudget) Open() int64 { return b.inUse.Load() }

// Denied returns how many times a pipe was wanted and the budget said no.
func (b *PipeBudget) Denied() int64 { return b.fails.Load() }

func (b *PipeBudget) take() bool {
	if b.inUse.Add(1) > b.max {
		b.inUse.Add(-1)
		b.fails.Add(1)
		return false
	}
	return true
}

func (b *PipeBudget) give() { b.inUse.Add(-1) }

// Pipe is a kernel pipe used as a splice buffer.
type Pipe struct {
	r, w int // read and write ends, non-blocking
	size int // capacity the kernel granted
}

// Stats is a snapshot of a pool's counters.
type Stats struct {
	BuffersInUse, BuffersFree int64
	PipesInUse, PipesFree     int64
}

// Pools hands buffers and pipes to the channels of one event loop. Get and put
// run on that loop only; the counters may be read from anywhere.
type Pools struct {
	bufSize  int
	pipeSize int
	budget   *PipeBudget
	bufs     [][]byte
	pipes    []*Pipe
	noPipes  bool // pipe creation failed in a way that will not heal (no splice support)

	bufInUse, bufFree   atomic.Int64
	pipeInUse, pipeFree atomic.Int64
}

// NewPools returns pools with buffers of bufSize bytes and pipes of pipeSize
// bytes (asked of the kernel), drawing pipes from budget (nil: no pipes).
func NewPools(bufSize, pipeSize int, budget *PipeBudget) *Pools {
	if bufSize <= 0 {
		bufSize = DefaultBufSize
	}
	if pipeSize <= 0 {
		pipeSize = DefaultPipeSize
	}
	return &Pools{bufSize: bufSize, pipeSize: pipeSize, budget: budget, noPipes: budget == nil}
}

// Stats returns the pool's counters.
func (p *Pools) Stats() Stats {
	return Stats{
		BuffersInUse: p.bufInUse.Load(), BuffersFree: p.bufFree.Load(),
		PipesInUse: p.pipeInUse.Load(), PipesFree: p.pipeFree.Load(),
	}
}

// BufSize returns the size of the pool's buffers.
func (p *Pools) BufSize() int { return p.bufSize }

func (p *Pools) getBuf() []byte {
	p.bufInUse.Add(1)
	if n := len(p.bufs); n > 0 {
		b := p.bufs[n-1]
		p.bufs[n-1] = nil
		p.bufs = p.bufs[:n-1]
		p.bufFree.Add(-1)
		return b
	}
	return make([]byte, p.bufSize)
}

func (p *Pools) putBuf(b []byte) {
	p.bufInUse.Add(-1)
	if len(p.bufs) < keepFree {
		p.bufs = append(p.bufs, b)
		p.bufFree.Add(1)
	}
}

// getPipe returns a pipe, or nil when the budget is spent or pipes cannot be
// made; the caller then stays on a buffer. A pipe the kernel made smaller
// than a buffer (an unprivileged user past pipe-user-pages-soft, which the
// budget should have kept us from) is closed and counted as denied: splice
// through 8 KiB moves less per call than the buffer does.
func (p *Pools) getPipe() *Pipe {
	if n := len(p.pipes); n > 0 {
		pp := p.pipes[n-1]
		p.pipes[n-1] = nil
		p.pipes = p.pipes[:n-1]
		p.pipeFree.Add(-1)
		p.budget.unkeep(1)
		p.pipeInUse.Add(1)
		return pp
	}
	if p.noPipes || !p.budget.take() {
		return nil
	}
	pp, err := newPipe(p.pipeSize)
	if err != nil {
		p.budget.give()
		if err != unix.EMFILE && err != unix.ENFILE && err != unix.EPERM {
			p.noPipes = true
		}
		return nil
	}
	if pp.size < min(p.pipeSize, p.bufSize) {
		pp.close()
		p.budget.give()
		p.budget.fails.Add(1)
		return nil
	}
	p.pipeInUse.Add(1)
	return pp
}

// putPipe takes back an empty pipe: kept free while the budget's free bound
// allows, closed otherwise.
func (p *Pools) putPipe(pp *Pipe) {
	p.pipeInUse.Add(-1)
	if p.budget.keep() {
		p.pipes = append(p.pipes, pp)
		p.pipeFree.Add(1)
		return
	}
	pp.close()
	p.budget.give()
}

// dropPipe closes a pipe whose content is unknown (its session failed with
// bytes still inside): it is never reused.
func (p *Pools) dropPipe(pp *Pipe) {
	p.pipeInUse.Add(-1)
	pp.close()
	p.budget.give()
}

// Close closes every free pipe and forgets free buffers. Pipes in use are the
// channels' to return first.
func (p *Pools) Close() {
	for _, pp := range p.pipes {
		pp.close()
		p.budget.give()
	}
	if len(p.pipes) > 0 {
		p.budget.unkeep(int64(len(p.pipes)))
	}
	p.pipeFree.Add(-int64(len(p.pipes)))
	p.pipes = nil
	p.bufFree.Add(-int64(len(p.bufs)))
	p.bufs = nil
}

func newPipe(size int) (*Pipe, error) {
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return nil, err
	}
	pp := &Pipe{r: fds[0], w: fds[1]}
	// F_SETPIPE_SZ fails with EPERM for an unprivileged user past
	// pipe-user-pages-soft or above pipe-max-size; the pipe then keeps the
	// size the kernel chose, which F_GETPIPE_SZ tells.
	_, _ = unix.FcntlInt(uintptr(pp.w), unix.F_SETPIPE_SZ, size)
	got, err := unix.FcntlInt(uintptr(pp.w), unix.F_GETPIPE_SZ, 0)
	if err != nil || got <= 0 {
		got = 4096
	}
	pp.size = got
	return pp, nil
}

func (pp *Pipe) close() {
	unix.Close(pp.r)
	unix.Close(pp.w)
}
