// Package etcdtest starts a real etcd server process for a test or a
// benchmark (Debian's etcd-server, installed by scripts/test-deps.sh):
// never a mock of the etcd API. One helper for store/etcd's tests, the
// integration tests and the fleet benchmark.
package etcdtest

import (
	"bytes"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"sync"
	"testing"
	"time"
)

// Server is one etcd server process: a temporary data dir, loopback
// client and peer URLs on free ports. Only the PID it started is ever
// killed; Kill and Start may alternate (the same data dir: a restart).
type Server struct {
	tb     testing.TB
	bin    string
	URL    string
	args   []string
	cmd    *exec.Cmd
	stderr *buffer
	exited chan error
}

// Start starts an etcd server and waits until it answers /health; the
// test is skipped loudly when no etcd binary is installed. It is killed at
// the test's cleanup.
func Start(tb testing.TB) *Server {
	tb.Helper()
	bin, err := exec.LookPath("etcd")
	if err != nil {
		tb.Skip("SKIPPED: no etcd binary (scripts/test-deps.sh installs Debian's etcd-server)")
	}
	dir := tb.TempDir()
	client, peer := freePort(tb), freePort(tb)
	s := &Server{tb: tb, bin: bin, URL: fmt.Sprintf("http://127.0.0.1:%d", client)}
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", peer)
	s.args = []string{"--name", "t", "--data-dir", dir + "/data",
		"--listen-client-urls", s.URL, "--advertise-client-urls", s.URL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "t=" + peerURL, "--initial-cluster-state", "new",
		"--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn"}
	s.Start()
	tb.Cleanup(s.Kill)
	return s
}

// Start runs the server (again, on the same data dir) and waits for it.
func (s *Server) Start() {
	tb := s.tb
	tb.Helper()
	s.stderr, s.exited = &buffer{}, make(chan error, 1)
	s.cmd = exec.Command(s.bin, s.args...)
	s.cmd.Stdout, s.cmd.Stderr = s.stderr, s.stderr
	if err := s.cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	cmd, exited := s.cmd, s.exited
	go func() { exited <- cmd.Wait() }()
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get(s.URL + "/health")
		if err == nil {
			ok := resp.StatusCode == 200
			resp.Body.Close()
			if ok {
				return
			}
		}
		select {
		case err := <-exited:
			exited <- err
			tb.Fatalf("etcd exited at start: %v\n%s", err, s.Stderr())
		default:
		}
		if time.Now().After(deadline) {
			tb.Fatalf("etcd did not answer on %s within 20s\n%s", s.URL, s.Stderr())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Kill stops the server at once (SIGKILL, its own PID only) and waits.
func (s *Server) Kill() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	select {
	case err := <-s.exited:
		s.exited <- err
		return
	default:
	}
	_ = s.cmd.Process.Kill()
	err := <-s.exited
	s.exited <- err
}

// Stderr is what the server wrote since its last start.
func (s *Server) Stderr() string { return s.stderr.String() }

func freePort(tb testing.TB) int {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// buffer is a bytes.Buffer safe for the process's writer and a reader.
type buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
