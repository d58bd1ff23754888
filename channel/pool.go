package channel

import (
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Defaults for the pools. A buffer is HAProxy's bufsize; a pipe asks the
// kernel for PipeSize and takes what it is given.
const (
	DefaultBufSize  = 16 << 10
	DefaultPipeSize = 256 << 10
	// keepFree bounds how many idle buffers and pipes one pool keeps for
	// reuse; past it they go back to the GC (buffers) or are closed (pipes).
	keepFree = 64
)

// PipeBudget bounds the pipes of a whole process, shared by every Pools
// (HAProxy's maxpipes). Safe for concurrent use.
type PipeBudget struct {
	max   int64
	inUse atomic.Int64 // pipes open, in use or kept free
	fails atomic.Int64 // times a channel wanted a pipe and got none
}

// NewPipeBudget returns a budget of max pipes; max <= 0 means no pipes at all.
func NewPipeBudget(max int) *PipeBudget { return &PipeBudget{max: int64(max)} }

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
// made; the caller then stays on a buffer.
func (p *Pools) getPipe() *Pipe {
	if n := len(p.pipes); n > 0 {
		pp := p.pipes[n-1]
		p.pipes[n-1] = nil
		p.pipes = p.pipes[:n-1]
		p.pipeFree.Add(-1)
		p.pipeInUse.Add(1)
		return pp
	}
	if p.noPipes || !p.budget.take() {
		return nil
	}
	pp, err := newPipe(p.pipeSize)
	if err != nil {
		p.budget.give()
		if err != unix.EMFILE && err != unix.ENFILE {
			p.noPipes = true
		}
		return nil
	}
	p.pipeInUse.Add(1)
	return pp
}

// putPipe takes back an empty pipe.
func (p *Pools) putPipe(pp *Pipe) {
	p.pipeInUse.Add(-1)
	if len(p.pipes) < keepFree {
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
