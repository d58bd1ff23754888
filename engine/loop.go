package engine

import (
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/channel"
	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/internal/rawsys"
)

// handler receives the readiness events of the fds it registered.
type handler interface {
	handle(l *Loop, fd int, events uint32)
}

// Edge-triggered interest for sessions: both directions always, so the
// loop never calls epoll_ctl to change interest; a channel's EmptyIn and
// FullOut flags say what it actually waits for.
const sessionEvents = unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET

// yieldEvery is how often, at most, the loop yields to the scheduler before
// blocking in epoll_wait: half sysmon's 10 ms preemption threshold, so a
// loop that blocks often is never found stale. A busy loop that never
// blocks does not yield (sysmon preempts it every 10 ms: a signal, cheap
// next to thousands of sysmon wake-ups); an idle one yields once per wait.
const yieldEvery = 5 * time.Millisecond

// Loop is one event loop: a goroutine (not locked to a thread), an epoll set,
// an eventfd to wake it, a timer wheel and the pools of its sessions. Every
// session lives on exactly one loop; nothing in it is touched from another
// goroutine except through post.
type Loop struct {
	id     int
	e      *Engine
	epfd   int
	wakefd int
	table  []handler // by fd number; fds are small integers, so no map
	gens   []uint32  // by fd number: the registration an event must carry to be delivered
	gen    uint32    // the last registration's number
	wheel  wheel
	pools  *channel.Pools
	base   time.Time
	now    int64 // nanoseconds since base, read once per wake-up
	// yielded is when the loop last went through the scheduler (run's
	// Gosched before a blocking wait), in now's units.
	yielded int64
	// lastEvent is when the loop's last epoll_wait returned events, and
	// busyPoll Config.BusyPoll, both in now's units.
	lastEvent, busyPoll int64
	waits               atomic.Uint64 // epoll_wait calls, read by tests (a busy-polling loop sleeps once idle)
	log                 *zap.Logger

	mu     sync.Mutex
	tasks  []func(*Loop)
	stop   bool
	closed bool // the loop has stopped and closed wakefd: nothing may be posted or woken

	paused    []*Listener // listeners this loop stopped polling (out of fds)
	resumeTmr loopTimer

	udp *udpScratch // datagram scratch, made when a udp listener first lands here

	fdWait  []*session // sessions parked for want of an fd, oldest first
	inFreed bool       // fdFreed is running (it may end sessions, which call it)

	budget   int           // bytes per pump of a direction (Config.Budget; 0: no bound)
	again    []*session    // sessions whose pump yielded on its budget, to pump after the batch (sfAgain)
	free     []*session    // finished sessions' structs for newSession to reuse (recycle), at most maxFreeSessions
	requeued atomic.Uint64 // times a session went on again (read by tests and benchmarks)

	sessions int // live sessions on this loop
	done     chan struct{}
}

// loopTimer is a timer owned by the loop itself.
type loopTimer struct {
	timer
	fn func(l *Loop)
}

func (t *loopTimer) expire(l *Loop) { t.fn(l) }

func newLoop(e *Engine, id int, tableSize int) (*Loop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("loop %d: epoll_create1: %w", id, err)
	}
	wfd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("loop %d: eventfd: %w", id, err)
	}
	l := &Loop{
		id: id, e: e, epfd: epfd, wakefd: wfd,
		table:    make([]handler, tableSize),
		gens:     make([]uint32, tableSize),
		pools:    channel.NewPools(e.cfg.BufSize, e.cfg.PipeSize, e.budget),
		base:     e.base,
		log:      e.log.With(zap.Int("loop", id)),
		budget:   pumpBudget(e.cfg.Budget),
		done:     make(chan struct{}),
		busyPoll: int64(e.cfg.BusyPoll),
	}
	l.wheel.init(0)
	l.resumeTmr.owner = &l.resumeTmr
	l.resumeTmr.fn = (*Loop).fdFreed
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(wfd)}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wfd, &ev); err != nil {
		unix.Close(epfd)
		unix.Close(wfd)
		return nil, fmt.Errorf("loop %d: epoll_ctl eventfd: %w", id, err)
	}
	return l, nil
}

// post runs fn on the loop's goroutine soon. Safe from any goroutine.
// It returns false, and fn never runs, when the loop has stopped.
func (l *Loop) post(fn func(*Loop)) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return false
	}
	l.tasks = append(l.tasks, fn)
	l.signal()
	return true
}

// wake makes the loop's epoll_wait return. Safe from any goroutine; a no-op
// once the loop has stopped.
func (l *Loop) wake() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.closed {
		l.signal()
	}
}

// signal writes to the eventfd: eventfd(2) adds the 8 bytes' count. It never
// blocks (EFD_NONBLOCK; a full count is already a wake-up), so it goes
// through rawsys like every call of the data path. Called with l.mu held and
// the loop not closed: the loop closes wakefd under l.mu, and a write after
// that would land in whatever file got the number since.
func (l *Loop) signal() {
	var one = [8]byte{1}
	_, _ = rawsys.Write(l.wakefd, one[:])
}

// register adds fd to the loop's epoll set with the given interest and routes
// its events to h.
//
// Each registration gets a number, carried in the event's data beside the
// fd, and an event is delivered only if its number is still the fd's: one
// epoll_wait batch can hold events of a socket that an earlier event of the
// same batch closed, and a socket accepted or dialed in between may already
// have its fd number. Without the check the new session would take the old
// socket's reset or writable event as its own.
func (l *Loop) register(fd int, events uint32, h handler) error {
	if fd >= len(l.table) {
		// The fd limit was raised after start; grow once, rarely.
		t := make([]handler, fd*2)
		copy(t, l.table)
		l.table = t
		g := make([]uint32, fd*2)
		copy(g, l.gens)
		l.gens = g
	}
	l.gen++
	ev := unix.EpollEvent{Events: events, Fd: int32(fd), Pad: int32(l.gen)}
	if err := rawsys.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return err
	}
	l.table[fd] = h
	l.gens[fd] = l.gen
	return nil
}

// registerListener polls ln on this loop if it belongs here: a tcp listener
// on every loop, a udp one on its owner loop only.
func (l *Loop) registerListener(ln *Listener) error {
	events := uint32(listenerEvents)
	if ln.udp != nil {
		if ln.udp.loop != l {
			return nil
		}
		if l.udp == nil {
			l.udp = new(udpScratch)
		}
		events = udpEvents
	}
	return l.register(ln.fd, events, ln)
}

// forget removes fd from the loop's table. close(2) removes it from the epoll
// set; call forget just before closing so a reused number never meets a
// stale handler.
func (l *Loop) forget(fd int) {
	if fd >= 0 && fd < len(l.table) {
		l.table[fd] = nil
	}
}

// unregister removes fd from the epoll set and the table without closing it.
func (l *Loop) unregister(fd int) {
	_ = rawsys.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, fd, nil)
	l.forget(fd)
}

// ticks converts a duration from now into an absolute wheel tick, rounding up
// so a timer never fires early.
func (l *Loop) ticks(d time.Duration) int64 {
	return (l.now + int64(d) + int64(tick) - 1) / int64(tick)
}

func (l *Loop) arm(t *timer, d time.Duration) { l.wheel.add(t, l.ticks(d)) }

func (l *Loop) clock() { l.now = int64(time.Since(l.base)) }

// run is the loop's goroutine. It is not locked to its OS thread: a busy
// loop yields only to sysmon's preemption (every 10 ms or so of busy time;
// a blocking one yields itself, see yieldEvery), and a locked goroutine's
// preemption is a hand-off between threads (stoplockedm, startlockedm:
// futex wake-ups and a context switch on the proxy's CPU), where an
// unlocked one is simply rescheduled on the thread it ran on. Nothing of the loop is bound to a thread: the epoll
// set, sockets and pipes belong to the process, and pif sockets are made
// by the pifs' own locked threads. (cps, one loop: futex calls 1 644 ->
// 1 020 and context switches 13 720 -> 11 392 over 4 s, bench/RESULTS.md.)
func (l *Loop) run() {
	defer close(l.done)
	var events [256]unix.EpollEvent
	l.clock()
	l.wheel.init(l.now / int64(tick))
	for {
		msec := -1
		if due := l.wheel.next(); due >= 0 {
			// Sleep to the boundary of the first tick with a timer in its
			// slot, not to the next tick: no wake-up every tick for timers
			// that are far away.
			next := due*int64(tick) - l.now
			msec = int((next + int64(time.Millisecond) - 1) / int64(time.Millisecond))
			if msec < 0 {
				msec = 0
			}
		}
		if len(l.again) > 0 {
			msec = 0 // sessions wait their turn: look for other ready ones, then pump them again
		}
		if msec != 0 && l.now-l.yielded >= int64(yieldEvery) {
			// Before a blocking wait, at most every yieldEvery: the loop
			// goes through the scheduler, so sysmon finds its schedtick
			// fresh. A loop that never does is, every 10 ms, either
			// preempted (running) or has its P retaken (blocked here):
			// each retake resets sysmon to waking every 20 µs for the next
			// millisecond or more, thousands of wake-ups a second on the
			// proxy's CPU. In the sni scenario (the loop blocking between
			// flights, ~30 % busy) sysmon's usleep took 11 % of sluice's
			// CPU (perf); see yieldEvery.
			runtime.Gosched()
			l.yielded = l.now
		}
		if msec != 0 && l.now-l.lastEvent < l.busyPoll {
			// Busy-polling (Config.BusyPoll, HAProxy's busy-polling): for
			// a while after the last event the loop asks without sleeping,
			// so the next event finds it running: no wake-up of a sleeping
			// thread (scheduler, IPI) on its path, at the price of its CPU
			// while the window lasts. Timers and the yield are as before.
			msec = 0
		}
		l.waits.Add(1)
		n, err := unix.EpollWait(l.epfd, events[:], msec)
		if err != nil && err != unix.EINTR {
			l.log.Error("epoll_wait failed; loop stops", zap.Error(err))
			l.shutdownSessions()
			return
		}
		l.clock()
		if n > 0 {
			l.lastEvent = l.now
		}
		for i := 0; i < n; i++ {
			fd := int(events[i].Fd)
			if fd == l.wakefd {
				var buf [8]byte
				_, _ = rawsys.Read(l.wakefd, buf[:])
				continue
			}
			if h := l.table[fd]; h != nil && uint32(events[i].Pad) == l.gens[fd] {
				h.handle(l, fd, events[i].Events)
			}
		}
		l.pumpAgain()
		l.wheel.advance(l, l.now/int64(tick))
		if l.runTasks() {
			l.shutdownSessions()
			return
		}
	}
}

// pumpBudget is the loop's bytes per pump from Config.Budget: 0 takes the
// default, a negative one means no bound (0 for channel.Pump).
func pumpBudget(b int) int {
	switch {
	case b == 0:
		return channel.DefaultBudget
	case b < 0:
		return 0
	}
	return b
}

// requeue puts s on the list of sessions to pump again after the batch: one
// of its channels stopped on the budget with bytes left, and edge-triggered
// polling brings no new event for those. At most once (sfAgain); the list
// keeps its array, so this allocates only while it grows.
func (l *Loop) requeue(s *session) {
	if s.flags&sfAgain != 0 {
		return
	}
	s.flags |= sfAgain
	l.again = append(l.again, s)
	l.requeued.Add(1)
}

// pumpAgain pumps once more each session queued before it started, in
// order; one that yields again goes to the back, behind the ready sessions
// of the next batch. A session that ended meanwhile is skipped.
func (l *Loop) pumpAgain() {
	n := len(l.again)
	for i := 0; i < n; i++ {
		s := l.again[i]
		l.again[i] = nil
		s.flags &^= sfAgain
		if s.state == stForwarding {
			s.pump(l) // may append to l.again, past n
		}
	}
	rest := copy(l.again, l.again[n:])
	clear(l.again[rest:])
	l.again = l.again[:rest]
}

// PumpRequeues is how many times a session's pump stopped on the budget
// and was queued to pump again, over every loop.
func (e *Engine) PumpRequeues() uint64 {
	var n uint64
	for _, l := range e.loops {
		n += l.requeued.Load()
	}
	return n
}

// runTasks runs posted tasks; it reports whether the loop must stop.
func (l *Loop) runTasks() bool {
	l.mu.Lock()
	tasks, stop := l.tasks, l.stop
	l.tasks = nil
	// Stopping: from now on post refuses and wake does nothing, so no task
	// is left behind unrun and nothing writes to wakefd once it is closed.
	l.closed = stop
	l.mu.Unlock()
	for _, fn := range tasks {
		fn(l)
	}
	return stop
}

// shutdownSessions aborts every session still on the loop and frees the loop.
func (l *Loop) shutdownSessions() {
	for fd, h := range l.table {
		switch h := h.(type) {
		case *session:
			if fd == h.cli.FD() || h.cli.FD() < 0 { // (a draining session may have its backend conn alone)
				h.finish(l, conn.CodeStopping, true)
			}
		case *flow:
			h.close(l)
		}
	}
	l.pools.Close()
	l.mu.Lock()
	l.closed = true // (runTasks set it already when asked to stop)
	l.mu.Unlock()
	unix.Close(l.epfd)
	unix.Close(l.wakefd)
}

// pauseListener stops polling ln on this loop after accept ran out of fds,
// and arms a retry. Sessions closing on this loop resume it sooner.
func (l *Loop) pauseListener(ln *Listener) {
	for _, p := range l.paused {
		if p == ln {
			return
		}
	}
	l.unregister(ln.fd)
	l.paused = append(l.paused, ln)
	if !l.resumeTmr.armed() {
		l.arm(&l.resumeTmr.timer, acceptRetry)
	}
}

// outOfFds reports whether err says the process or the system has no fd or
// socket memory left: a shortage that passes, not a failure of the peer.
func outOfFds(err error) bool {
	return err == unix.EMFILE || err == unix.ENFILE || err == unix.ENOBUFS || err == unix.ENOMEM
}

// fdFreed runs when an fd may have been freed (a session ended) and on the
// resume timer: sessions parked for an fd dial again, oldest first, and only
// once none is left waiting do the paused listeners accept again, so new
// clients never take the fds the waiting ones need.
func (l *Loop) fdFreed() {
	if l.inFreed {
		return
	}
	l.inFreed = true
	defer func() { l.inFreed = false }()
	for len(l.fdWait) > 0 {
		// The head dials again; it stays first in line, with its deadline,
		// until it got its fd (dial takes it off the list) or ended.
		s := l.fdWait[0]
		s.dial(l, conn.CodeConnectRefused)
		if s.state == stWaitFd { // still short
			if !l.resumeTmr.armed() {
				l.arm(&l.resumeTmr.timer, acceptRetry)
			}
			return
		}
	}
	if len(l.paused) > 0 {
		l.resumeListeners()
	}
}

// unpark takes s off the list of sessions waiting for an fd, keeping the
// others' order.
func (l *Loop) unpark(s *session) {
	for i, w := range l.fdWait {
		if w == s {
			copy(l.fdWait[i:], l.fdWait[i+1:])
			l.fdWait[len(l.fdWait)-1] = nil
			l.fdWait = l.fdWait[:len(l.fdWait)-1]
			return
		}
	}
}

// resumeListeners polls the paused listeners again; if fds are still short
// the next accept pauses them once more.
func (l *Loop) resumeListeners() {
	l.wheel.del(&l.resumeTmr.timer)
	p := l.paused
	l.paused = nil
	for _, ln := range p {
		if ln.closed.Load() {
			continue
		}
		if err := l.register(ln.fd, listenerEvents, ln); err != nil {
			l.log.Warn("resume listener", zap.Stringer("listen", ln.addr), zap.Error(err))
		}
	}
}
