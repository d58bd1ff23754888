package ctl

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ErrInUse is in the error of a control socket another daemon serves.
var ErrInUse = errors.New("another daemon serves it")

// listenUnix creates the control socket at path: its directory is made
// with mode 0700 if it is missing and its parent exists (only the last
// directory: a mistyped path is an error, not a tree made as root), and
// must otherwise belong to us (or root) and grant nothing to group or
// others; the socket is 0600. A stale socket file nobody listens on is
// replaced; a live one is an error that wraps ErrInUse. made says whether
// the directory was made.
func listenUnix(path string) (ln *net.UnixListener, made bool, err error) {
	if path == "" {
		return nil, false, errors.New("ctl socket: empty path")
	}
	dir := filepath.Dir(path)
	if made, err = secureDir(dir); err != nil {
		return nil, false, err
	}
	if err := removeStale(path); err != nil {
		return nil, made, err
	}
	ln, err = net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, made, fmt.Errorf("ctl socket %s: %w", path, err)
	}
	// The 0700 directory keeps everyone else out between bind and chmod.
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, made, fmt.Errorf("ctl socket %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(true)
	return ln, made, nil
}

// CheckSocketPath returns what Serve would refuse about the place of a
// control socket at path, without making or changing anything: a
// directory of another user, one that grants group or others access, a
// missing directory whose parent is missing too, a path whose directory is
// not one. A socket in use is not checked: the daemon may be running.
func CheckSocketPath(path string) error {
	if path == "" {
		return errors.New("ctl socket: empty path")
	}
	_, err := checkDir(filepath.Dir(path))
	return err
}

// checkDir checks that dir is a directory of ours (or root's) that grants
// nothing to group or others; missing says it does not exist while its
// parent does (secureDir makes it).
func checkDir(dir string) (missing bool, err error) {
	fi, err := os.Stat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		parent := filepath.Dir(dir)
		if pi, perr := os.Stat(parent); perr != nil || !pi.IsDir() {
			return false, fmt.Errorf("ctl socket directory %s is missing and so is its parent %s: only the last directory is made; create the others, or set ctl.socket", dir, parent)
		}
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("ctl socket directory: %w", err)
	}
	if !fi.IsDir() {
		return false, fmt.Errorf("ctl socket directory %s is not a directory", dir)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return false, fmt.Errorf("ctl socket directory %s: no owner information", dir)
	}
	if uid := os.Geteuid(); int(st.Uid) != uid && st.Uid != 0 {
		return false, fmt.Errorf("ctl socket directory %s belongs to uid %d, not to this process (uid %d) or root", dir, st.Uid, uid)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return false, fmt.Errorf("ctl socket directory %s has mode %#o: it must grant nothing to group or others (0700); give the socket a directory of its own", dir, fi.Mode().Perm())
	}
	return false, nil
}

// secureDir is checkDir, and makes a missing dir with mode 0700; made says
// it did.
func secureDir(dir string) (made bool, err error) {
	missing, err := checkDir(dir)
	if err != nil || !missing {
		return false, err
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		return false, fmt.Errorf("ctl socket directory: %w", err)
	}
	// Mkdir is subject to the umask; say exactly what we want.
	if err := os.Chmod(dir, 0o700); err != nil {
		return true, fmt.Errorf("ctl socket directory: %w", err)
	}
	return true, nil
}

// removeStale removes a socket file at path that nobody listens on.
func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("ctl socket %s: %w", path, err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("ctl socket %s exists and is not a socket", path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("ctl socket %s: %w", path, ErrInUse)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("ctl socket %s: exists and cannot tell whether it is in use: %w", path, err)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("ctl socket %s: removing the stale socket: %w", path, err)
	}
	return nil
}

// peer is who is at the other end of a connection, from SO_PEERCRED.
type peer struct {
	pid int32
	uid uint32
	gid uint32
}

func peerCred(c *net.UnixConn) (peer, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return peer{}, err
	}
	var cred *unix.Ucred
	var gerr error
	if err := raw.Control(func(fd uintptr) {
		cred, gerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return peer{}, err
	}
	if gerr != nil {
		return peer{}, fmt.Errorf("SO_PEERCRED: %w", gerr)
	}
	return peer{pid: cred.Pid, uid: cred.Uid, gid: cred.Gid}, nil
}

// peerAllowed says whether a peer of uid may use the socket of a server
// running as serverUID: the same user, or root.
func peerAllowed(uid, serverUID uint32) bool {
	return uid == serverUID || uid == 0
}
