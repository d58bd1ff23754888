package ctl

// This file holds the server: the Engine it drives, its tunables and the
// hello they make, the socket it serves, and accept with the connection
// limit; and Close, which ends every connection. One connection is a
// ctlConn (ctlconn.go); the writing transaction is a writeTxn (txn.go).

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"runtime/debug"
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
	Pifs() []string       // named pifs in order; index 0 is "host", these are 1..n
	Generation() uint64   // of the active table
	Rules() []*rules.Rule // the active table (while an apply is pending, the applied one)
	// Tables reads, as one, the committed table and its generation and,
	// while an apply awaits its commit or rollback, the applied table
	// (pending true; it gets generation gen+1 if committed).
	Tables() (gen uint64, committed, applied []*rules.Rule, pending bool)
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

// Resolver is implemented by an Engine whose tables may name backends by
// host name: a load resolves them (step 5), and a name that does not
// resolve is an invalid rule at its line. Resolve returns (-1, nil) when
// every name of rs resolves, else the index of the first rule whose name
// does not and why.
type Resolver interface {
	Resolve(rs []*rules.Rule) (int, error)
}

// Defaults of the server; the hello advertises them.
const (
	DefaultConfirm = 30 * time.Second
	MaxConfirm     = 10 * time.Minute
	IOTimeout      = 10 * time.Second
	MaxClients     = 64
	MaxWatchers    = 32               // watch connections at once, beside the max-clients others
	LoadTimeout    = 30 * time.Second // a whole load, step 5, from its first chunk to its last
	WatchQueue     = 4096             // events queued for one watcher before it is cut off (slow-watcher)
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
	watchQueue     int           // events queued for one watcher before it is cut off
	loadTimeout    time.Duration // the whole load, step 5
	maxWatchers    int           // watch connections at once, counted apart from maxClients
}

func defaultConfig() config {
	sw := "sluice"
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		sw += " " + bi.Main.Version
	}
	return config{maxVersion: MaxVersion, ioTimeout: IOTimeout, defaultConfirm: DefaultConfirm,
		maxConfirm: MaxConfirm, maxClients: MaxClients, software: truncate(sw, maxSoftware), watchQueue: WatchQueue,
		loadTimeout: LoadTimeout, maxWatchers: MaxWatchers}
}

// hello is the server hello of a server with this config.
func (cfg *config) hello() ServerHello {
	return ServerHello{
		Software: cfg.software,
		Limits: Limits{MaxPayload: MaxPayload, MaxRules: rules.MaxRules, MaxPorts: rules.MaxPorts,
			MaxPortsPerRule: rules.MaxPortsPerRule, MaxLineLen: rules.MaxLineLen, MaxPifs: MaxPifs,
			DefaultConfirm: cfg.defaultConfirm, MaxConfirm: cfg.maxConfirm, IOTimeout: cfg.ioTimeout,
			MaxClients: cfg.maxClients, LoadTimeout: cfg.loadTimeout, MaxWatchers: cfg.maxWatchers},
		Features: []string{FeatureTxn, FeatureConfirmTimeout, FeatureConcurrentRead, FeaturePeerCred, FeatureWatch, FeatureSessions, FeatureStats,
			FeatureHistory, FeatureReload, FeatureConfirmLater, FeatureListPending, FeatureUpgrade},
	}
}

// Server serves the control socket: one control connection (ctlConn) per
// client, at most cfg.maxClients at once; one transaction per connection,
// one writer at a time (the writer slot, see txn.go), readers beside it.
type Server struct {
	path  string
	eng   Engine
	log   *zap.Logger
	cfg   config
	ln    *net.UnixListener
	uid   uint32
	hello ServerHello
	stop  func() bool // detaches Close from the context

	writer atomic.Bool // the writer slot: a writing transaction holds the socket (txn.go)
	// pending is the commit-confirmed apply left past its connection; it
	// holds the writer slot (confirm.go).
	pmu     sync.Mutex
	pending *pendingTxn
	ending  sync.WaitGroup // endTaken calls under way
	nextID  atomic.Uint64

	// What STATUS says of the process (version 6): the Engine's Described,
	// else no version and the server's own start.
	version string
	started time.Time

	mu         sync.Mutex
	closed     bool
	draining   bool                  // Drain: read-only intents only (drain.go)
	drainBy    time.Time             // Drain's deadline
	handedOver bool                  // StopAccepting: the socket is a successor's (upgrade.go)
	conns      map[*ctlConn]struct{} // the connections being served; Close shuts each down
	watchers   int                   // of conns, those of intent watch (admit)
	wg         sync.WaitGroup        // accept and every connection's run

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
	b, err := Bind(path)
	if err != nil {
		return nil, err
	}
	return b.serve(ctx, eng, log, cfg)
}

// Bound is a control socket made and listening, not served yet: a daemon
// binds every socket that can fail before any of them accepts, and serves
// this one once its table is in place. Close it when it is never served.
type Bound struct {
	ln        *net.UnixListener
	path      string
	made      bool // its directory was made
	inherited bool // BindFile's: an fd handed over, served by Bound.ServeFile
}

// Bind makes the control socket at path as Serve does, without serving it.
func Bind(path string) (*Bound, error) {
	ln, made, err := listenUnix(path)
	if err != nil {
		return nil, err
	}
	return &Bound{ln: ln, path: path, made: made}, nil
}

// Serve serves the bound socket as Serve does; b is the Server's from then
// on. A socket BindFile took is served as Bound.ServeFile does, not held.
func (b *Bound) Serve(ctx context.Context, eng Engine, log *zap.Logger) (*Server, error) {
	if b.inherited {
		s, _, err := b.ServeFile(ctx, eng, log, false)
		return s, err
	}
	return b.serve(ctx, eng, log, defaultConfig())
}

func (b *Bound) serve(ctx context.Context, eng Engine, log *zap.Logger, cfg config) (*Server, error) {
	if eng == nil {
		b.Close()
		return nil, errors.New("ctl: nil engine")
	}
	if log == nil {
		log = zap.NewNop()
	}
	if b.made {
		log.Info("made the control socket's directory", zap.String("dir", filepath.Dir(b.path)), zap.String("mode", "0700"))
	}
	return serveOn(ctx, b.ln, b.path, eng, log, cfg, false), nil
}

// Close closes a socket never served and removes its file.
func (b *Bound) Close() error { return b.ln.Close() }

// serveOn serves the control socket ln (at path) until ctx ends or Close
// is called; held: the writer slot is taken before the first accept, for
// the caller to release (an upgrade's successor, upgrade.go).
func serveOn(ctx context.Context, ln *net.UnixListener, path string, eng Engine, log *zap.Logger, cfg config, held bool) *Server {
	s := &Server{path: path, eng: eng, log: log.Named("ctl"), cfg: cfg, ln: ln, uid: uint32(os.Geteuid()),
		conns: map[*ctlConn]struct{}{}, started: time.Now()}
	s.hello = cfg.hello()
	if b, ok := eng.(Booted); ok {
		s.hello.Limits.BootID = b.BootID()
	}
	if d, ok := eng.(Described); ok {
		s.version, s.started = d.Described()
	}
	s.writer.Store(held)
	s.stop = context.AfterFunc(ctx, func() { _ = s.Close() })
	s.wg.Add(1)
	go s.accept()
	s.log.Info("control socket ready", zap.String("socket", path), zap.Uint8("max_version", cfg.maxVersion))
	return s
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
	if s.handedOver {
		err = nil // StopAccepting closed it (upgrade.go)
	}
	for cc := range s.conns {
		cc.shutdown()
	}
	s.mu.Unlock()
	// A daemon stop during a pending commit-confirmed apply rolls it back
	// first, while the engine still runs.
	s.closePending()
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

// accept accepts connections until the listener is closed, and serves each
// on its own goroutine. Connections other than watchers are at most
// max-clients and one kept for a writer; one past that is refused with
// too-many-clients here, and admit refuses, at the client hello, a reader
// in the writer's slot and a watcher past max-watchers.
func (s *Server) accept() {
	defer s.wg.Done()
	backoff := 5 * time.Millisecond
	for {
		c, err := s.ln.AcceptUnix()
		if err != nil {
			s.mu.Lock()
			closed := s.closed || s.handedOver
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
		cc := &ctlConn{s: s, conn: c, id: s.nextID.Add(1), ver: Version1, done: make(chan struct{})}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			return
		}
		// Watchers are counted apart (admit); one slot past max-clients
		// is kept for a writer.
		if n := len(s.conns) - s.watchers; n >= s.cfg.maxClients+1 {
			s.mu.Unlock()
			// A fresh socket's buffer is empty: this write does not block.
			cc.refuse(errorf(CodeTooManyClients, "%d control connections are open, at most %d allowed", n, s.cfg.maxClients))
			continue
		}
		s.conns[cc] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go cc.run()
	}
}

// isWriter reports whether intent takes or ends the writer slot: these may
// use the slot kept past max-clients.
func (i Intent) isWriter() bool {
	return i == IntentWrite || i == IntentReload || i == IntentConfirm || i == IntentRollback
}

// changes reports whether intent changes the daemon's state (its table,
// or its process): these are refused while it drains (Drain).
func (i Intent) changes() bool { return i.isWriter() || i == IntentUpgrade }

// admit classes a connection by the intent of its client hello, and
// refuses it (too-many-clients) if its class is full. Watchers stay open
// for as long as their clients like: they have a bound of their own
// (max-watchers) and leave max-clients to readers and writers, so no number
// of watchers locks a writer or a reader out. A reader or a watcher that
// came in on the slot kept past max-clients gives it back to the writer.
func (s *Server) admit(cc *ctlConn, intent Intent) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	cc.intent = intent
	if s.draining && intent.changes() {
		return s.drainingError(intent)
	}
	if intent == IntentWatch {
		if s.watchers >= s.cfg.maxWatchers {
			return errorf(CodeTooManyClients, "%d watchers are open, at most %d allowed", s.watchers, s.cfg.maxWatchers)
		}
		s.watchers++
		cc.watcher = true
		return nil
	}
	if n := len(s.conns) - s.watchers; n > s.cfg.maxClients && !intent.isWriter() {
		return errorf(CodeTooManyClients, "%d control connections are open, at most %d allowed (one more for a writer)", n-1, s.cfg.maxClients)
	}
	return nil
}
