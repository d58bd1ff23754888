package ctl

// This file holds intent upgrade — the daemon replaced by a new process on
// the same sockets, through the Upgrader its Engine implements — and the
// control socket's own part of an upgrade: its listening socket handed to
// the successor (ListenerFile), served there from the inherited fd
// (ServeFile), and the old server no longer accepting on it
// (StopAccepting) while the successor does.
//
// The server answers the hello with PIFS, reads UPGRADE (the binary, ""
// for the daemon's own, and the timeout), and answers UPGRADED once the
// successor serves, or ERROR upgrade-failed (the new process was stopped;
// this one serves on), upgrading (one is under way, or the process this
// one replaced still drains), busy (a writer holds the slot).

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// Upgrader is implemented by an Engine that can start its successor (the
// daemon). Upgrade starts binary ("" = the daemon's own) and waits, at
// most timeout (0 = DefaultUpgradeTimeout), for it to serve. On success
// this process has stopped accepting; done is to be called once the
// client has its answer (the daemon then drains and exits). Its error is
// an *Error: CodeUpgradeFailed, CodeUpgrading, CodeBusy.
type Upgrader interface {
	Upgrade(who Who, binary string, timeout time.Duration) (u *Upgraded, done func(), err error)
}

// Bounds of intent upgrade.
const (
	DefaultUpgradeTimeout = 30 * time.Second
	MaxUpgradeTimeout     = 10 * time.Minute
	maxBinary             = 4096 // bytes of a binary's path (PATH_MAX)
)

// Upgraded is how an upgrade ended well.
type Upgraded struct {
	OldPID, NewPID uint32
	Generation     uint64 // of the table the successor serves: the committed one
}

func (fw *frameWriter) writeUpgrade(ver uint8, binary string, timeout time.Duration) error {
	fw.start(ver, MsgUpgrade)
	fw.str(binary, maxBinary, "binary")
	fw.u32(uint32(timeout / time.Millisecond))
	return fw.finish()
}

func decodeUpgrade(f frame) (string, time.Duration, error) {
	d := newDec(f)
	bin := d.str(maxBinary, "binary")
	ms := d.u32("timeout ms")
	t := time.Duration(ms) * time.Millisecond
	if d.err == nil && t > MaxUpgradeTimeout {
		d.fail(CodeBadValue, "timeout %s, at most %s", t, MaxUpgradeTimeout)
	}
	return bin, t, d.end()
}

func (fw *frameWriter) writeUpgraded(ver uint8, u *Upgraded) error {
	fw.start(ver, MsgUpgraded)
	fw.u32(u.OldPID)
	fw.u32(u.NewPID)
	fw.u64(u.Generation)
	return fw.finish()
}

func decodeUpgraded(f frame) (*Upgraded, error) {
	d := newDec(f)
	u := &Upgraded{OldPID: d.u32("old pid"), NewPID: d.u32("new pid"), Generation: d.u64("generation")}
	return u, d.end()
}

// upgrade serves intent upgrade: PIFS, the client's UPGRADE, then
// UPGRADED or the upgrade's ERROR.
func (cc *ctlConn) upgrade() error {
	f, err := cc.pifsThen(MsgUpgrade)
	if err != nil {
		return err
	}
	bin, timeout, err := decodeUpgrade(f)
	if err != nil {
		return err
	}
	up, ok := cc.s.eng.(Upgrader)
	if !ok {
		return errorf(CodeUpgradeFailed, "this daemon cannot upgrade itself")
	}
	// The upgrade outlasts the I/O timeout: the client waits for it, and
	// nothing is read meanwhile.
	u, done, err := up.Upgrade(cc.who, bin, timeout)
	if err != nil {
		return err
	}
	defer done()
	return cc.send(func() error { return cc.w.writeUpgraded(cc.ver, u) })
}

// Upgrade asks for the upgrade on a connection that said IntentUpgrade and
// read its Pifs, and returns once the successor serves (the context should
// allow the timeout and some seconds more). binary "" is the daemon's own;
// timeout 0 the default.
func (c *Client) Upgrade(ctx context.Context, binary string, timeout time.Duration) (*Upgraded, error) {
	var out *Upgraded
	err := c.call(ctx, stepPifs, func() error {
		if c.intent != IntentUpgrade {
			return fmt.Errorf("ctl: Upgrade on a connection for %s", c.intent)
		}
		if timeout < 0 || timeout > MaxUpgradeTimeout {
			return fmt.Errorf("ctl: Upgrade timeout %s: want 0 to %s", timeout, MaxUpgradeTimeout)
		}
		if err := c.send(func() error { return c.w.writeUpgrade(c.ver, binary, timeout) }); err != nil {
			return err
		}
		f, err := c.expect(MsgUpgraded)
		if err != nil {
			return err
		}
		if out, err = decodeUpgraded(f); err != nil {
			return err
		}
		c.step = stepDone
		return nil
	})
	return out, err
}

// ListenerFile duplicates the control socket's listening fd for a
// successor (close-on-exec; the caller closes it).
func (s *Server) ListenerFile() (*os.File, error) {
	raw, err := s.ln.SyscallConn()
	if err != nil {
		return nil, err
	}
	var nfd int
	var derr error
	if err := raw.Control(func(fd uintptr) { nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 3) }); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, fmt.Errorf("ctl socket: dup: %w", derr)
	}
	return os.NewFile(uintptr(nfd), s.path), nil
}

// StopAccepting stops accepting on the control socket and closes this
// process's fd of it, leaving the socket file in place: a successor serves
// the same socket. Connections being served go on until Close.
func (s *Server) StopAccepting() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.handedOver {
		return
	}
	s.handedOver = true
	s.ln.SetUnlinkOnClose(false)
	_ = s.ln.Close()
	s.log.Info("control socket handed over: no longer accepting here", zap.String("socket", s.path))
}

// Conns is the number of control connections being served.
func (s *Server) Conns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// ServeFile serves the control socket whose listening fd is f — inherited
// from the process this one replaced, or passed by systemd — as Serve
// does; the socket file is removed at Close. held: the writer slot is
// taken before the first accept, and the file is not removed at Close,
// until release (a successor takes no table change before its predecessor
// stopped, and one that fails leaves the socket to it); release is a no-op
// when not held. It is BindFile, then Bound.ServeFile.
func ServeFile(ctx context.Context, f *os.File, eng Engine, log *zap.Logger, held bool) (s *Server, release func(), err error) {
	if eng == nil {
		return nil, nil, errors.New("ctl: nil engine")
	}
	b, err := BindFile(f)
	if err != nil {
		return nil, nil, err
	}
	return b.ServeFile(ctx, eng, log, held)
}

// BindFile takes the listening control socket whose fd is f as Bind makes
// one: not served yet, so that a daemon checks the fd (a unix listening
// socket) before any of its ports accepts. f may be closed once it
// returns. Closed without being served, the socket file stays: it is the
// predecessor's, or systemd's.
func BindFile(f *os.File) (*Bound, error) {
	l, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("ctl socket (inherited fd %d): %w", f.Fd(), err)
	}
	ln, ok := l.(*net.UnixListener)
	if !ok {
		l.Close()
		return nil, fmt.Errorf("ctl socket (inherited fd %d): a %s socket, not a unix one", f.Fd(), l.Addr().Network())
	}
	ln.SetUnlinkOnClose(false)
	return &Bound{ln: ln, path: ln.Addr().String(), inherited: true}, nil
}

// ServeFile serves a socket BindFile took, as the function ServeFile
// does (held and release are its); on a socket Bind made it is Serve, and
// release a no-op.
func (b *Bound) ServeFile(ctx context.Context, eng Engine, log *zap.Logger, held bool) (s *Server, release func(), err error) {
	if !b.inherited {
		s, err := b.Serve(ctx, eng, log)
		return s, func() {}, err
	}
	if eng == nil {
		b.Close()
		return nil, nil, errors.New("ctl: nil engine")
	}
	if log == nil {
		log = zap.NewNop()
	}
	ln := b.ln
	// A successor that fails before its release must leave the socket
	// file to the predecessor, which serves on.
	ln.SetUnlinkOnClose(!held)
	s = serveOn(ctx, ln, b.path, eng, log, defaultConfig(), held)
	release = func() {}
	if held {
		release = func() {
			s.mu.Lock()
			if !s.closed {
				ln.SetUnlinkOnClose(true)
			}
			s.mu.Unlock()
			s.writer.Store(false)
		}
	}
	return s, release, nil
}
