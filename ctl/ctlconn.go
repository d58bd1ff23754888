package ctl

// This file holds one control connection (ctlConn): its deadlines, reading
// and sending whole frames, the hellos and the dispatch by intent, the
// read-only intents status, pifs and list (watch, sessions and stats are in
// watch.go), and finish, the ERROR a connection ends with. A control
// connection is not a session: a session is a proxied one, everywhere else.

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/sluice-proxy/sluice/rules"
)

// ctlConn is one control connection: one intent, served to its end (for
// intent write, one transaction: a writeTxn). Its goroutine (run) does its
// I/O, but for the one reader a watch adds (watch.go); Close reaches it
// through shutdown alone, under mu.
type ctlConn struct {
	s    *Server
	conn *net.UnixConn
	id   uint64
	log  *zap.Logger
	r    frameReader
	w    frameWriter
	ver  uint8 // Version1 until the client hello is answered
	who  Who   // the peer and its client name, set once the hello is read

	watcher bool          // counted in Server.watchers (admit); under s.mu
	intent  Intent        // said in the client hello (admit); under s.mu
	done    chan struct{} // closed once run has ended (Drain waits for the writers)

	mu      sync.Mutex
	closing bool // the server is closing: deadlines are "now"
}

// run serves the connection, then closes it and leaves the server's set.
func (cc *ctlConn) run() {
	defer func() {
		cc.conn.Close()
		cc.s.mu.Lock()
		delete(cc.s.conns, cc)
		if cc.watcher {
			cc.s.watchers--
		}
		cc.s.mu.Unlock()
		close(cc.done)
		cc.s.wg.Done()
	}()
	cc.log = cc.s.log.With(zap.Uint64("conn", cc.id))
	cc.r.r = bufio.NewReaderSize(cc.conn, 64<<10)
	cc.w.w = bufio.NewWriterSize(cc.conn, 64<<10)
	cc.w.onFrame = cc.refreshWriteDeadline
	cc.finish(cc.serve())
}

// refuse answers a connection that is not served with an error, and closes
// it.
func (cc *ctlConn) refuse(e *Error) {
	cc.s.errorsSent[min(int(e.Code), codeCount-1)].Add(1)
	cc.s.log.Warn("control connection refused", zap.Stringer("code", e.Code), zap.String("error", e.Msg))
	cc.w.w = bufio.NewWriterSize(cc.conn, 1024)
	_ = cc.conn.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	if err := cc.w.writeError(Version1, e); err == nil {
		_ = cc.w.flush()
	}
	cc.conn.Close()
}

// shutdown makes every blocked and later read or write of the connection
// fail at once; the connection then rolls back what it must and ends.
func (cc *ctlConn) shutdown() {
	cc.mu.Lock()
	cc.closing = true
	_ = cc.conn.SetDeadline(time.Now())
	cc.mu.Unlock()
}

func (cc *ctlConn) isClosing() bool {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	return cc.closing
}

var errClosing = errors.New("the control server is closing")

func (cc *ctlConn) setReadDeadline(t time.Time) error {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if cc.closing {
		return errClosing
	}
	return cc.conn.SetReadDeadline(t)
}

// refreshWriteDeadline gives the next frame written the I/O timeout, unless
// the server is closing.
func (cc *ctlConn) refreshWriteDeadline() {
	cc.mu.Lock()
	if !cc.closing {
		_ = cc.conn.SetWriteDeadline(time.Now().Add(cc.s.cfg.ioTimeout))
	}
	cc.mu.Unlock()
}

// send writes one message, each frame of it under the I/O timeout, and
// flushes it.
func (cc *ctlConn) send(write func() error) error {
	cc.mu.Lock()
	closing := cc.closing
	cc.mu.Unlock()
	if closing {
		return errClosing
	}
	if err := write(); err != nil {
		return err
	}
	return cc.w.flush()
}

// read reads the next frame, whole, by deadline, in the agreed version.
func (cc *ctlConn) read(deadline time.Time) (frame, error) {
	if err := cc.setReadDeadline(deadline); err != nil {
		return frame{}, err
	}
	f, err := cc.r.read()
	if err != nil {
		return frame{}, err
	}
	if f.ver != cc.ver {
		return frame{}, errorf(CodeBadVersion, "%s frame in version %d, but this connection speaks version %d", f.typ, f.ver, cc.ver)
	}
	return f, nil
}

func (cc *ctlConn) readNext() (frame, error) {
	return cc.read(time.Now().Add(cc.s.cfg.ioTimeout))
}

// finish ends the connection after serve: it sends the ERROR err calls for, if
// any, and logs.
func (cc *ctlConn) finish(err error) {
	if err == nil {
		return
	}
	var e *Error
	switch {
	case errors.As(err, &e):
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		cc.log.Debug("control client closed the connection", zap.Error(err))
		return
	case errors.Is(err, errClosing) || cc.isClosing():
		e = errorf(CodeShuttingDown, "the daemon is stopping")
	case errors.Is(err, os.ErrDeadlineExceeded):
		e = errorf(CodeTimeout, "no whole frame within %s: %v", cc.s.cfg.ioTimeout, err)
	default:
		cc.log.Info("control connection failed", zap.Error(err))
		return
	}
	cc.s.errorsSent[min(int(e.Code), codeCount-1)].Add(1)
	cc.log.Warn("control transaction ended with an error", zap.Stringer("code", e.Code), zap.String("error", e.Error()))
	// Best effort, bounded: the client may be gone or not reading.
	wait := cc.s.cfg.ioTimeout
	if cc.isClosing() {
		wait = 250 * time.Millisecond
	}
	_ = cc.conn.SetWriteDeadline(time.Now().Add(wait))
	cc.w.onFrame = nil
	if werr := cc.w.writeError(cc.ver, e); werr == nil {
		_ = cc.w.flush()
	}
}

// serve checks the peer, runs steps 1 and 2 (the hellos and the service
// upgrade) and then what the intent asks for; intent write is the writing
// transaction (txn.go). Its error is finish's to report.
func (cc *ctlConn) serve() error {
	s := cc.s
	p, err := peerCred(cc.conn)
	if err != nil {
		return fmt.Errorf("reading the peer's credentials: %w", err)
	}
	cc.log = cc.log.With(zap.Uint32("uid", p.uid), zap.Int32("pid", p.pid))
	if !peerAllowed(p.uid, s.uid) {
		return errorf(CodePermissionDenied, "uid %d may not use this socket (only uid %d and root)", p.uid, s.uid)
	}
	// 1. server hello
	if err := cc.send(func() error { return cc.w.writeHello(&s.hello) }); err != nil {
		return err
	}
	// 2. client hello
	f, err := cc.readNext()
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
	cc.who = Who{UID: p.uid, PID: p.pid, Name: ch.Name}
	// The service upgrade: from now on, the lower of the two.
	cc.ver = min(ch.Want, s.cfg.maxVersion)
	cc.log = cc.log.With(zap.Stringer("intent", ch.Intent), zap.String("client", ch.Name), zap.Uint8("version", cc.ver))
	cc.log.Debug("control connection")
	if err := s.admit(cc, ch.Intent); err != nil {
		return err
	}
	switch ch.Intent {
	case IntentStatus:
		st := s.status()
		return cc.send(func() error { return cc.w.writeStatus(cc.ver, st) })
	case IntentPifs:
		pifs, err := s.pifs()
		if err != nil {
			return err
		}
		return cc.send(func() error { return cc.w.writePifs(cc.ver, pifs) })
	case IntentList:
		_, _, err := cc.listTable(false)
		return err
	case IntentListPending:
		_, _, err := cc.listTable(true)
		return err
	case IntentWatch:
		return cc.watch()
	case IntentSessions:
		return cc.sessions()
	case IntentStats:
		return cc.stats()
	case IntentHistory:
		return cc.history()
	case IntentReload:
		return cc.reload()
	case IntentUpgrade:
		return cc.upgrade()
	case IntentConfirm, IntentRollback:
		return cc.s.endPending(cc, ch.Intent == IntentConfirm)
	}
	return (&writeTxn{cc: cc}).run()
}

// status is the answer to intent status: the committed table and, apart,
// an applied one that awaits its commit; the process and its state.
func (s *Server) status() *Status {
	gen, rs, applied, pending := s.eng.Tables()
	st := &Status{Generation: gen, Rules: len(rs), Ports: rules.ListenPortCount(rs), Sessions: s.eng.Sessions(),
		Pifs: 1 + len(s.eng.Pifs()), Writer: s.writer.Load(), BootID: s.hello.Limits.BootID}
	if pending {
		st.PendingGen, st.PendingRules, st.PendingPorts = gen+1, len(applied), rules.ListenPortCount(applied)
	}
	st.ConfirmGen, st.ConfirmLeft = s.pendingLeft()
	st.Version, st.PID, st.Started, st.Uptime = s.version, os.Getpid(), s.started, time.Since(s.started)
	st.State, st.DrainLeft = s.drainState()
	return st
}

// pifs lists the engine's pifs with "host" first, as PIFS carries them.
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

// listTable sends steps 3 and 4: PIFS, then RULES one pif at a time. The
// table is the committed one, never an apply that may still roll back (a
// backup made from it saves what a restart would serve); with pending, it
// is that apply's, under the generation it gets if committed, and none
// pending is no-pending.
func (cc *ctlConn) listTable(pending bool) ([]Pif, uint64, error) {
	s := cc.s
	pifs, err := s.pifs()
	if err != nil {
		return nil, 0, err
	}
	gen, rs, applied, isPending := s.eng.Tables()
	if pending {
		if !isPending {
			return nil, 0, errorf(CodeNoPending, "no applied table awaits its commit: the committed one is generation %d", gen)
		}
		gen, rs = gen+1, applied
	}
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
	if err := cc.send(func() error { return cc.w.writePifs(cc.ver, pifs) }); err != nil {
		return nil, 0, err
	}
	err = cc.send(func() error { return cc.w.writeTable(cc.ver, MsgRules, gen, lines) })
	return pifs, gen, err
}
