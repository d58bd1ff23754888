package ctl

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/ctl/ctltest"
)

// The socket is 0600 in a 0700 directory the server made.
func TestSocketMode(t *testing.T) {
	_, path := startServer(t, ctltest.New(1, nil), nil)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v", fi.Mode())
	}
	di, err := os.Stat(filepath.Dir(path))
	if err != nil {
		t.Fatal(err)
	}
	if di.Mode().Perm() != 0o700 {
		t.Fatalf("directory mode %v", di.Mode())
	}
}

// A directory open to others, a file that is not a socket and a socket
// another server listens on are refused; a stale socket is replaced.
func TestSocketPlace(t *testing.T) {
	eng := ctltest.New(1, nil)
	dir := shortDir(t)

	open := filepath.Join(dir, "open")
	if err := os.Mkdir(open, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := Serve(ctxT(t), filepath.Join(open, "ctl.sock"), eng, nil); err == nil || !strings.Contains(err.Error(), "0700") {
		t.Fatalf("socket in a 0755 directory: %v", err)
	}

	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Serve(ctxT(t), file, eng, nil); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("a plain file in the way: %v", err)
	}

	stale := filepath.Join(dir, "stale.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	s, err := Serve(ctxT(t), stale, eng, nil)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	defer s.Close()
	if _, err := Serve(ctxT(t), stale, eng, nil); err == nil || !strings.Contains(err.Error(), "another daemon") {
		t.Fatalf("a live socket taken over: %v", err)
	}
}

// Only the last directory of the socket's path is made; CheckSocketPath
// refuses what Serve refuses about the place and makes nothing.
func TestSocketDirMade(t *testing.T) {
	eng := ctltest.New(1, nil)
	dir := shortDir(t)
	deep := filepath.Join(dir, "a", "b", "ctl.sock")
	if err := CheckSocketPath(deep); err == nil || !strings.Contains(err.Error(), "only the last directory") {
		t.Fatalf("CheckSocketPath of a missing tree: %v", err)
	}
	if _, err := Serve(ctxT(t), deep, eng, nil); err == nil || !strings.Contains(err.Error(), "only the last directory") {
		t.Fatalf("Serve in a missing tree: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "a")); err == nil {
		t.Fatal("Serve made the tree")
	}
	last := filepath.Join(dir, "a", "ctl.sock")
	if err := CheckSocketPath(last); err != nil {
		t.Fatalf("CheckSocketPath of a missing last directory: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "a")); err == nil {
		t.Fatal("CheckSocketPath made the directory")
	}
	s, err := Serve(ctxT(t), last, eng, nil)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if err := os.Chmod(filepath.Join(dir, "a"), 0o750); err != nil {
		t.Fatal(err)
	}
	if err := CheckSocketPath(last); err == nil || !strings.Contains(err.Error(), "mode 0750") {
		t.Fatalf("CheckSocketPath of a 0750 directory: %v", err)
	}
}

func TestPeerAllowed(t *testing.T) {
	cases := []struct {
		peer, server uint32
		ok           bool
	}{{0, 0, true}, {1000, 0, false}, {1000, 1000, true}, {0, 1000, true}, {1001, 1000, false}, {65534, 0, false}}
	for _, c := range cases {
		if got := peerAllowed(c.peer, c.server); got != c.ok {
			t.Errorf("peer uid %d, server uid %d: %v, want %v", c.peer, c.server, got, c.ok)
		}
	}
}

// The peer's credentials are read: our own uid passes.
func TestPeerCredSelf(t *testing.T) {
	_, path := startServer(t, ctltest.New(1, nil), nil)
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	p, err := peerCred(c) // the server, seen from the client
	if err != nil || p.uid != uint32(os.Geteuid()) || int(p.pid) != os.Getpid() {
		t.Fatalf("peer %+v, %v", p, err)
	}
}

const peerHelperEnv = "SLUICE_CTL_PEER_HELPER"

// A peer of another uid is refused with permission-denied before the
// hello. The peer is this test binary run again as nobody (65534), which
// needs root; the socket's directory and mode are opened up for the test so
// that only SO_PEERCRED stands in the way.
func TestPeerCredRefused(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a client as another uid")
	}
	s, path := startServer(t, ctltest.New(1, nil), nil)
	if err := os.Chmod(filepath.Dir(path), 0o711); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Dir(filepath.Dir(path)), 0o711); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o666); err != nil {
		t.Fatal(err)
	}
	// The test binary lives in a 0700 build directory: copy it where
	// nobody can run it.
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(filepath.Dir(filepath.Dir(path)), "ctl.test")
	src, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, src, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-test.run=^TestPeerHelper$")
	cmd.Env = append(os.Environ(), peerHelperEnv+"="+path)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helper: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "code=permission-denied uid=65534") {
		t.Fatalf("helper output:\n%s", out)
	}
	if n := s.Stats().Errors["permission-denied"]; n != 1 {
		t.Fatalf("refusals counted: %d", n)
	}
}

// TestPeerHelper is the other uid's side of TestPeerCredRefused.
func TestPeerHelper(t *testing.T) {
	path := os.Getenv(peerHelperEnv)
	if path == "" {
		t.Skip("run by TestPeerCredRefused")
	}
	c, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	fr := frameReader{r: bufio.NewReader(c)}
	f, err := fr.read()
	if err != nil {
		t.Fatal(err)
	}
	if f.typ != MsgError {
		t.Fatalf("got %s, want ERROR", f.typ)
	}
	e, err := decodeError(f)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fr.read(); err != io.EOF {
		t.Fatalf("after the ERROR: %v, want the close", err)
	}
	fmt.Printf("code=%s uid=%d\n", e.Code, os.Geteuid())
}
