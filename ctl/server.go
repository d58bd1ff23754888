package ctl

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime/debug"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/sluice-proxy/sluice/observe"
	"github.com/sluice-proxy/sluice/rules"
)

// Engine is what the control server drives. *engine.Engine satisfies it.
// Its methods must be safe for concurrent use: readers (status, pifs, list)
// call the first four while a writer's transaction runs.
type Engine interface {
	Pifs() []string                                 // named pifs in order; index 0 is "host", these are 1..n
	Generation() uint64                             // of the active table
	Rules() []*rules.Rule                           // the active table
	Sessions() int64                                // live sessions
	Apply(rs []*rules.Rule) (*rules.Summary, error) // swap to rs and sync sockets; an apply stays pending until Commit or Rollback; error if one is already pending or the engine stopped
	Commit() (uint64, error)                        // the new generation
	Rollback() (*rules.Summary, error)              // swap back, resume paused sockets; the summary describes the restored table

	// Watch subscribes to groups with a queue of n events, then returns the
	// current state (events of type observe.TypeState): subscribed first,
	// so no change after the state is missed.
	Watch(groups observe.Group, n int) (*observe.Sub, []observe.Event)
	SessionList(rule string, max int) observe.Sessions // live sessions of rule ("" = all), at most max
	Counters() []observe.Counter                       // the engine's counters, named
}

// Defaults of the server; the hello advertises them.
const (
	DefaultConfirm = 30 * time.Second
	MaxConfirm     = 10 * time.Minute
	IOTimeout      = 10 * time.Second
	MaxClients     = 64
	WatchQueue     = 4096 // events queued for one watcher before it is cut off (slow-watcher)
)

// config is the server's tunables. Only tests change them: a short I/O
// timeout, a small client limit, or maxVersion 1 to serve as a version 1
// server would.
type config struct {
	maxVersion     uint8
	ioTimeout      time.Duration
	defaultConfirm time.Duration
	maxConfirm     time.Duration
	maxClients     int
	software       string
	watchQueue     int // events queued for one watcher before it is cut off
}

func defaultConfig() config {
	sw := "sluice"
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		sw += " " + bi.Main.Version
	}
	return config{maxVersion: MaxVersion, ioTimeout: IOTimeout, defaultConfirm: DefaultConfirm,
		maxConfirm: MaxConfirm, maxClients: MaxClients, software: truncate(sw, maxSoftware), watchQueue: WatchQueue}
}

// hello is the server hello of a server with this config.
func (cfg *config) hello() ServerHello {
	return ServerHello{
		Software: cfg.software,
		Limits: Limits{MaxPayload: MaxPayload, MaxRules: rules.MaxRules, MaxPorts: rules.MaxPorts,
			MaxPortsPerRule: rules.MaxPortsPerRule, MaxLineLen: rules.MaxLineLen, MaxPifs: MaxPifs,
			DefaultConfirm: cfg.defaultConfirm, MaxConfirm: cfg.maxConfirm, IOTimeout: cfg.ioTimeout,
			MaxClients: cfg.maxClients},
		Features: []string{FeatureTxn, FeatureConfirmTimeout, FeatureConcurrentRead, FeaturePeerCred, FeatureWatch, FeatureSessions, FeatureStats},
	}
}

// Server serves the control socket: one transaction per connection, one
// writer at a time, readers beside it.
type Server struct {
	path  string
	eng   Engine
	log   *zap.Logger
	cfg   config
	ln    *net.UnixListener
	uid   uint32
	hello ServerHello
	stop  func() bool // detaches Close from the context

	writer atomic.Bool // a writing transaction holds the socket
	nextID atomic.Uint64

	mu       sync.Mutex
	closed   bool
	sessions map[*session]struct{}
	wg       sync.WaitGroup

	errorsSent [codeCount]atomic.Uint64
	committed  atomic.Uint64
	rolledBack atomic.Uint64
}

// Serve creates the control socket at path (see docs/ctl-protocol.md,
// "Transport and access") and serves it until ctx ends or Close is called.
func Serve(ctx context.Context, path string, eng Engine, log *zap.Logger) (*Server, error) {
	return serve(ctx, path, eng, log, defaultConfig())
}

func serve(ctx context.Context, path string, eng Engine, log *zap.Logger, cfg config) (*Server, error) {
	if eng == nil {
		return nil, errors.New("ctl: nil engine")
	}
	if log == nil {
		log = zap.NewNop()
	}
	ln, err := listenUnix(path)
	if err != nil {
		return nil, err
	}
	s := &Server{path: path, eng: eng, log: log.Named("ctl"), cfg: cfg, ln: ln, uid: uint32(os.Geteuid()),
		sessions: map[*session]struct{}{}}
	s.hello = cfg.hello()
	s.stop = context.AfterFunc(ctx, func() { _ = s.Close() })
	s.wg.Add(1)
	go s.accept()
	s.log.Info("control socket ready", zap.String("socket", path), zap.Uint8("max_version", cfg.maxVersion))
	return s, nil
}

// Path is the socket's path.
func (s *Server) Path() string { return s.path }

// Close stops accepting, ends every connection (an open transaction past
// apply is rolled back, its client told "shutting-down"), waits for them
// and removes the socket.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		s.wg.Wait()
		return nil
	}
	s.closed = true
	err := s.ln.Close()
	for ss := range s.sessions {
		ss.shutdown()
	}
	s.mu.Unlock()
	s.stop()
	s.wg.Wait()
	s.log.Info("control socket closed", zap.String("socket", s.path))
	return err
}

// Stats counts what the server did, for metrics.
type Stats struct {
	Committed  uint64            // transactions committed
	RolledBack uint64            // transactions rolled back: asked, bad verdict, disconnect, confirm timeout
	Errors     map[string]uint64 // ERROR frames sent, by code name
	Writer     bool              // a writing transaction is open
}

// Stats returns the counters so far.
func (s *Server) Stats() Stats {
	st := Stats{Committed: s.committed.Load(), RolledBack: s.rolledBack.Load(), Errors: map[string]uint64{}, Writer: s.writer.Load()}
	for c := range s.errorsSent {
		if n := s.errorsSent[c].Load(); n > 0 {
			st.Errors[Code(c).String()] = n
		}
	}
	return st
}

func (s *Server) accept() {
	defer s.wg.Done()
	backoff := 5 * time.Millisecond
	for {
		c, err := s.ln.AcceptUnix()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return
			}
			// EMFILE and the like: say so, wait, go on.
			s.log.Warn("accepting a control connection", zap.Error(err), zap.Duration("retry_in", backoff))
			time.Sleep(backoff)
			backoff = min(2*backoff, time.Second)
			continue
		}
		backoff = 5 * time.Millisecond
		ss := &session{s: s, conn: c, id: s.nextID.Add(1), ver: Version1}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			return
		}
		if len(s.sessions) >= s.cfg.maxClients {
			s.mu.Unlock()
			// A fresh socket's buffer is empty: this write does not block.
			ss.refuse(errorf(CodeTooManyClients, "%d control connections are open, at most %d allowed", s.cfg.maxClients, s.cfg.maxClients))
			continue
		}
		s.sessions[ss] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go ss.run()
	}
}

// session is one connection: one transaction.
type session struct {
	s    *Server
	conn *net.UnixConn
	id   uint64
	log  *zap.Logger
	r    frameReader
	w    frameWriter
	ver  uint8 // Version1 until the client hello is answered

	mu      sync.Mutex
	closing bool // the server is closing: deadlines are "now"

	pending bool // applied, neither committed nor rolled back
}

func (ss *session) run() {
	defer func() {
		ss.conn.Close()
		ss.s.mu.Lock()
		delete(ss.s.sessions, ss)
		ss.s.mu.Unlock()
		ss.s.wg.Done()
	}()
	ss.log = ss.s.log.With(zap.Uint64("conn", ss.id))
	ss.r.r = bufio.NewReaderSize(ss.conn, 64<<10)
	ss.w.w = bufio.NewWriterSize(ss.conn, 64<<10)
	ss.w.onFrame = ss.refreshWriteDeadline
	ss.finish(ss.serve())
}

// refuse answers a connection that is not served with an error, and closes
// it.
func (ss *session) refuse(e *Error) {
	ss.s.errorsSent[min(int(e.Code), codeCount-1)].Add(1)
	ss.s.log.Warn("control connection refused", zap.Stringer("code", e.Code), zap.String("error", e.Msg))
	ss.w.w = bufio.NewWriterSize(ss.conn, 1024)
	_ = ss.conn.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	if err := ss.w.writeError(Version1, e); err == nil {
		_ = ss.w.flush()
	}
	ss.conn.Close()
}

// shutdown makes every blocked and later read or write of the session fail
// at once; the session then rolls back what it must and ends.
func (ss *session) shutdown() {
	ss.mu.Lock()
	ss.closing = true
	_ = ss.conn.SetDeadline(time.Now())
	ss.mu.Unlock()
}

func (ss *session) isClosing() bool {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	return ss.closing
}

var errClosing = errors.New("the control server is closing")

func (ss *session) setReadDeadline(t time.Time) error {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.closing {
		return errClosing
	}
	return ss.conn.SetReadDeadline(t)
}

// refreshWriteDeadline gives the next frame written the I/O timeout, unless
// the server is closing.
func (ss *session) refreshWriteDeadline() {
	ss.mu.Lock()
	if !ss.closing {
		_ = ss.conn.SetWriteDeadline(time.Now().Add(ss.s.cfg.ioTimeout))
	}
	ss.mu.Unlock()
}

// send writes one message, each frame of it under the I/O timeout, and
// flushes it.
func (ss *session) send(write func() error) error {
	ss.mu.Lock()
	closing := ss.closing
	ss.mu.Unlock()
	if closing {
		return errClosing
	}
	if err := write(); err != nil {
		return err
	}
	return ss.w.flush()
}

// read reads the next frame, whole, by deadline, in the agreed version.
func (ss *session) read(deadline time.Time) (frame, error) {
	if err := ss.setReadDeadline(deadline); err != nil {
		return frame{}, err
	}
	f, err := ss.r.read()
	if err != nil {
		return frame{}, err
	}
	if f.ver != ss.ver {
		return frame{}, errorf(CodeBadVersion, "%s frame in version %d, but this connection speaks version %d", f.typ, f.ver, ss.ver)
	}
	return f, nil
}

func (ss *session) readNext() (frame, error) {
	return ss.read(time.Now().Add(ss.s.cfg.ioTimeout))
}

// finish ends the session after serve: it sends the ERROR err calls for, if
// any, and logs.
func (ss *session) finish(err error) {
	if err == nil {
		return
	}
	var e *Error
	switch {
	case errors.As(err, &e):
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		ss.log.Debug("control client closed the connection", zap.Error(err))
		return
	case errors.Is(err, errClosing) || ss.isClosing():
		e = errorf(CodeShuttingDown, "the daemon is stopping")
	case errors.Is(err, os.ErrDeadlineExceeded):
		e = errorf(CodeTimeout, "no whole frame within %s: %v", ss.s.cfg.ioTimeout, err)
	default:
		ss.log.Info("control connection failed", zap.Error(err))
		return
	}
	ss.s.errorsSent[min(int(e.Code), codeCount-1)].Add(1)
	ss.log.Warn("control transaction ended with an error", zap.Stringer("code", e.Code), zap.String("error", e.Error()))
	// Best effort, bounded: the client may be gone or not reading.
	wait := ss.s.cfg.ioTimeout
	if ss.isClosing() {
		wait = 250 * time.Millisecond
	}
	_ = ss.conn.SetWriteDeadline(time.Now().Add(wait))
	ss.w.onFrame = nil
	if werr := ss.w.writeError(ss.ver, e); werr == nil {
		_ = ss.w.flush()
	}
}

// serve runs steps 1 and 2 and what the intent asks for.
func (ss *session) serve() error {
	s := ss.s
	p, err := peerCred(ss.conn)
	if err != nil {
		return fmt.Errorf("reading the peer's credentials: %w", err)
	}
	ss.log = ss.log.With(zap.Uint32("uid", p.uid), zap.Int32("pid", p.pid))
	if !peerAllowed(p.uid, s.uid) {
		return errorf(CodePermissionDenied, "uid %d may not use this socket (only uid %d and root)", p.uid, s.uid)
	}
	// 1. server hello
	if err := ss.send(func() error { return ss.w.writeHello(&s.hello) }); err != nil {
		return err
	}
	// 2. client hello
	f, err := ss.readNext()
	if err != nil {
		return err
	}
	if f.typ != MsgClientHello {
		return errorf(CodeUnexpected, "%s before the client hello", f.typ)
	}
	ch, err := decodeClientHello(f)
	if err != nil {
		return err
	}
	if ch.Want == 0 {
		return errorf(CodeBadValue, "client hello asks for version 0")
	}
	if !ch.Intent.Known() {
		return errorf(CodeBadValue, "unknown intent %d", ch.Intent)
	}
	// The service upgrade: from now on, the lower of the two.
	ss.ver = min(ch.Want, s.cfg.maxVersion)
	ss.log = ss.log.With(zap.Stringer("intent", ch.Intent), zap.String("client", ch.Name), zap.Uint8("version", ss.ver))
	ss.log.Debug("control connection")
	switch ch.Intent {
	case IntentStatus:
		st := s.status()
		return ss.send(func() error { return ss.w.writeStatus(ss.ver, st) })
	case IntentPifs:
		pifs, err := s.pifs()
		if err != nil {
			return err
		}
		return ss.send(func() error { return ss.w.writePifs(ss.ver, pifs) })
	case IntentList:
		_, _, err := ss.listTable()
		return err
	case IntentWatch:
		return ss.watch()
	case IntentSessions:
		return ss.sessions()
	case IntentStats:
		return ss.stats()
	}
	return ss.write()
}

func (s *Server) status() *Status {
	gen, rs := s.snapshot()
	return &Status{Generation: gen, Rules: len(rs), Ports: rules.ListenPortCount(rs), Sessions: s.eng.Sessions(),
		Pifs: 1 + len(s.eng.Pifs()), Writer: s.writer.Load()}
}

func (s *Server) pifs() ([]Pif, error) {
	names := s.eng.Pifs()
	if 1+len(names) > MaxPifs {
		return nil, errorf(CodeInternal, "the engine has %d pifs, the protocol carries at most %d", 1+len(names), MaxPifs)
	}
	pifs := make([]Pif, 0, 1+len(names))
	pifs = append(pifs, Pif{Index: 0, Name: rules.HostPif})
	for i, n := range names {
		pifs = append(pifs, Pif{Index: i + 1, Name: n})
	}
	return pifs, nil
}

// snapshot reads the active table and its generation as one: a commit
// between the two reads is seen and the reads are done again.
func (s *Server) snapshot() (uint64, []*rules.Rule) {
	for i := 0; ; i++ {
		gen := s.eng.Generation()
		rs := s.eng.Rules()
		// Only a commit changes the generation, and only the one writer
		// commits: a second try is all it takes in practice.
		if s.eng.Generation() == gen || i == 100 {
			return gen, rs
		}
	}
}

// listTable sends steps 3 and 4: PIFS, then RULES one pif at a time.
func (ss *session) listTable() ([]Pif, uint64, error) {
	s := ss.s
	pifs, err := s.pifs()
	if err != nil {
		return nil, 0, err
	}
	gen, rs := s.snapshot()
	index := make(map[string]uint16, len(pifs))
	for _, p := range pifs {
		index[rules.ModelPif(p.Name)] = uint16(p.Index)
	}
	lines := make([]tableLine, len(rs))
	for i, r := range rs {
		pi, ok := index[r.ListenPif]
		if !ok {
			return nil, 0, errorf(CodeInternal, "the active table listens in pif %q, which the engine does not list", r.ListenPif)
		}
		lines[i] = tableLine{pif: pi, line: r.String()}
	}
	slices.SortStableFunc(lines, func(a, b tableLine) int { return int(a.pif) - int(b.pif) })
	if err := ss.send(func() error { return ss.w.writePifs(ss.ver, pifs) }); err != nil {
		return nil, 0, err
	}
	err = ss.send(func() error { return ss.w.writeTable(ss.ver, MsgRules, gen, lines) })
	return pifs, gen, err
}

// TxnObserver is implemented by an Engine that wants to hear how each
// writing transaction ended (for its metrics): exactly one call per
// transaction that held the writer slot, with TxnCommitted, TxnRolledBack
// (applied, then rolled back for any reason) or TxnFailed (ended before an
// apply: invalid table, stale generation, protocol error, disconnect).
type TxnObserver interface {
	TxnEnded(outcome rules.TxnOutcome)
}

// Outcomes given to TxnObserver.TxnEnded.
const (
	TxnCommitted  = rules.TxnCommitted
	TxnRolledBack = rules.TxnRolledBack
	TxnFailed     = rules.TxnFailed
)

// write runs the writing transaction, steps 3 to 10.
func (ss *session) write() error {
	s := ss.s
	if !s.writer.CompareAndSwap(false, true) {
		return errorf(CodeBusy, "another writing transaction holds the control socket")
	}
	// The slot is freed once the engine has no pending apply, before the
	// last answer (COMMITTED, or the rollback's SUMMARY) is sent: a client
	// that has its answer may start the next transaction at once, and is
	// never told busy by the one it just finished.
	release := sync.OnceFunc(func() { s.writer.Store(false) })
	defer release()
	// How the transaction ended, for an engine that counts it: registered
	// first, so it runs after the deferred rollback of a pending apply.
	committedBefore, rolledBackBefore := s.committed.Load(), s.rolledBack.Load()
	defer func() {
		if o, ok := s.eng.(TxnObserver); ok {
			switch {
			case s.committed.Load() != committedBefore:
				o.TxnEnded(TxnCommitted)
			case s.rolledBack.Load() != rolledBackBefore:
				o.TxnEnded(TxnRolledBack)
			default:
				o.TxnEnded(TxnFailed)
			}
		}
	}()
	// 3, 4.
	pifs, _, err := ss.listTable()
	if err != nil {
		return err
	}
	// 5, 6.
	rs, err := ss.load(pifs)
	if err != nil {
		if errors.Is(err, io.EOF) {
			ss.log.Info("control client left during the load: shadow discarded, nothing changed")
		}
		return err
	}
	ld := &Loaded{Generation: s.eng.Generation(), Rules: len(rs), Ports: rules.ListenPortCount(rs)}
	d := rules.TableDiff(s.eng.Rules(), rs)
	ld.Kept, ld.Added, ld.Removed = len(d.Kept), len(d.Added), len(d.Removed)
	if err := ss.send(func() error { return ss.w.writeLoaded(ss.ver, ld) }); err != nil {
		return err
	}
	// 7.
	f, err := ss.readNext()
	if errors.Is(err, io.EOF) {
		ss.log.Info("control client closed after validation: shadow discarded, nothing changed", zap.Int("rules", len(rs)))
		return nil
	}
	if err != nil {
		return err
	}
	if f.typ != MsgApply {
		return errorf(CodeUnexpected, "%s where APPLY (or a close) was expected", f.typ)
	}
	ms, err := decodeApply(f)
	if err != nil {
		return err
	}
	confirm := time.Duration(ms) * time.Millisecond
	if ms == 0 {
		confirm = s.cfg.defaultConfirm
	}
	if confirm > s.cfg.maxConfirm {
		return errorf(CodeBadValue, "confirm timeout %s, at most %s allowed", confirm, s.cfg.maxConfirm)
	}
	sum, err := s.eng.Apply(rs)
	if err != nil {
		return errorf(CodeApplyFailed, "%v", err)
	}
	applied := time.Now()
	ss.pending = true
	defer func() {
		if ss.pending {
			ss.rollback("the transaction ended before a commit")
		}
	}()
	if sum == nil {
		return errorf(CodeInternal, "the engine applied the table but gave no summary: rolled back")
	}
	ss.log.Info("table applied, waiting for commit", zap.Uint64("generation", sum.Generation), zap.Bool("verdict", sum.OK()),
		zap.Int("kept", sum.Kept), zap.Int("added", sum.Added), zap.Int("removed", sum.Removed), zap.Duration("confirm", confirm))
	// 8.
	if err := ss.send(func() error { return ss.w.writeSummary(ss.ver, summaryFrom(sum)) }); err != nil {
		return err
	}
	// 9.
	f, err = ss.read(applied.Add(confirm))
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) && !ss.isClosing() {
			ss.rollback("confirm timeout")
			return errorf(CodeConfirmTimeout, "no commit within the confirm timeout of %s: rolled back", confirm)
		}
		return err
	}
	switch f.typ {
	case MsgCommit:
		if err := decodeEmpty(f); err != nil {
			return err
		}
		gen, err := s.eng.Commit()
		if err != nil {
			return errorf(CodeCommitFailed, "%v (rolled back)", err)
		}
		ss.pending = false
		s.committed.Add(1)
		ss.log.Info("table committed", zap.Uint64("generation", gen))
		release()
		// 10.
		return ss.send(func() error { return ss.w.writeCommitted(ss.ver, gen) })
	case MsgRollback:
		if err := decodeEmpty(f); err != nil {
			return err
		}
		rsum, err := ss.rollback("asked by the client")
		if err != nil {
			return errorf(CodeRollbackFailed, "%v", err)
		}
		release()
		// 10.
		return ss.send(func() error { return ss.w.writeSummary(ss.ver, summaryFrom(rsum)) })
	}
	return errorf(CodeUnexpected, "%s where COMMIT or ROLLBACK was expected", f.typ)
}

// rollback undoes the pending apply.
func (ss *session) rollback(why string) (*rules.Summary, error) {
	ss.pending = false
	sum, err := ss.s.eng.Rollback()
	if err == nil && sum == nil {
		err = errors.New("the engine rolled back but gave no summary")
	}
	if err != nil {
		ss.log.Error("rollback failed", zap.String("why", why), zap.Error(err))
		return nil, err
	}
	ss.s.rolledBack.Add(1)
	ss.log.Info("table rolled back", zap.String("why", why), zap.Uint64("generation", sum.Generation))
	return sum, nil
}

// load reads LOAD chunks into the shadow table (step 5): every line parsed,
// every pif checked, then the whole table validated. No socket is touched.
func (ss *session) load(pifs []Pif) ([]*rules.Rule, error) {
	s := ss.s
	known := make(map[string]bool, len(pifs))
	for _, p := range pifs {
		known[rules.ModelPif(p.Name)] = true
	}
	var rs []*rules.Rule
	var texts []string
	var base uint64
	prevPif := -1
	for {
		f, err := ss.readNext()
		if err != nil {
			return nil, err
		}
		if f.typ != MsgLoad {
			return nil, errorf(CodeUnexpected, "%s where LOAD was expected", f.typ)
		}
		c, err := decodeTableChunk(f)
		if err != nil {
			return nil, err
		}
		if prevPif < 0 {
			if gen := s.eng.Generation(); c.gen != gen {
				return nil, errorf(CodeStaleGeneration, "the table was built on generation %d; the active one is %d", c.gen, gen)
			}
			base = c.gen
		} else if c.gen != base {
			return nil, errorf(CodeBadValue, "LOAD chunk on generation %d after chunks on %d", c.gen, base)
		}
		if int(c.pif) >= len(pifs) {
			return nil, errorf(CodeUnknownPif, "pif index %d: the daemon has %d pifs (0 to %d)", c.pif, len(pifs), len(pifs)-1)
		}
		if int(c.pif) < prevPif {
			return nil, errorf(CodeBadValue, "LOAD chunk for pif %d after pif %d: one pif at a time, in order", c.pif, prevPif)
		}
		prevPif = int(c.pif)
		if len(rs)+len(c.lines) > rules.MaxRules {
			return nil, errorf(CodeTooLarge, "more than %d rules loaded, at most %d allowed", len(rs)+len(c.lines), rules.MaxRules)
		}
		pifName := rules.ModelPif(pifs[c.pif].Name)
		for _, line := range c.lines {
			idx := len(rs)
			r, err := rules.Parse(line)
			if err != nil {
				return nil, &Error{Code: CodeInvalidRule, Index: idx, Rule: line, Msg: err.Error()}
			}
			if r.ListenPif != pifName {
				return nil, &Error{Code: CodeUnknownPif, Index: idx, Rule: line,
					Msg: fmt.Sprintf("the rule listens in pif %q but was sent under pif %d (%q)", rules.PifName(r.ListenPif), c.pif, pifs[c.pif].Name)}
			}
			if !known[r.TargetPif] {
				return nil, &Error{Code: CodeUnknownPif, Index: idx, Rule: line, Msg: fmt.Sprintf("target pif %q: the daemon has no such pif", r.TargetPif)}
			}
			rs = append(rs, r)
			texts = append(texts, line)
		}
		if c.last {
			break
		}
	}
	// Messages name the other rule of a collision by its text: the client's
	// numbering (file lines) is not ours.
	if errs := rules.ValidateTable(rs, func(i int) string { return strconv.Quote(texts[i]) }); len(errs) > 0 {
		e := &Error{Code: CodeInvalidTable, Index: -1, Msg: errs[0].Msg}
		if i := errs[0].Index; i >= 0 && i < len(rs) {
			e.Index, e.Rule = i, texts[i]
		}
		if len(errs) > 1 {
			e.Msg += fmt.Sprintf(" (and %d more problems)", len(errs)-1)
		}
		return nil, e
	}
	return rs, nil
}
