package integration

import (
	"fmt"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// etcdServer is a real etcd server process (Debian's etcd-server, installed
// by scripts/test-deps.sh) started by one test: a temporary data dir,
// loopback client and peer URLs on free ports. Only the PID it started is
// ever killed.
type etcdServer struct {
	t      testing.TB
	bin    string
	dir    string
	URL    string
	args   []string
	cmd    *exec.Cmd
	stderr *logBuffer
	exited chan error
}

// startEtcd starts an etcd server and waits until it answers /health; the
// test is skipped loudly when no etcd binary is installed.
func startEtcd(t testing.TB) *etcdServer {
	t.Helper()
	bin, err := exec.LookPath("etcd")
	if err != nil {
		t.Skip("SKIPPED: no etcd binary (scripts/test-deps.sh installs Debian's etcd-server)")
	}
	dir := t.TempDir()
	client, peer := freePort(t), freePort(t)
	s := &etcdServer{t: t, bin: bin, dir: dir, URL: fmt.Sprintf("http://127.0.0.1:%d", client)}
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", peer)
	s.args = []string{"--name", "t", "--data-dir", dir + "/data",
		"--listen-client-urls", s.URL, "--advertise-client-urls", s.URL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "t=" + peerURL, "--initial-cluster-state", "new",
		"--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn"}
	s.start()
	t.Cleanup(s.kill)
	return s
}

// start runs the server (again, on the same data dir) and waits for it.
func (s *etcdServer) start() {
	t := s.t
	t.Helper()
	s.stderr, s.exited = &logBuffer{}, make(chan error, 1)
	s.cmd = exec.Command(s.bin, s.args...)
	s.cmd.Stdout, s.cmd.Stderr = logWriter{s.stderr}, logWriter{s.stderr}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
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
			t.Fatalf("etcd exited at start: %v\n%s", err, s.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("etcd did not answer on %s within 20s\n%s", s.URL, s.stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// kill stops the server at once (SIGKILL, its own PID only) and waits.
func (s *etcdServer) kill() {
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

// logWriter writes into a logBuffer.
type logWriter struct{ b *logBuffer }

func (w logWriter) Write(p []byte) (int, error) { w.b.WriteString(string(p)); return len(p), nil }

// runSluiceFor is runSluice with a longer bound (a rollout waits for its
// batches).
func runSluiceFor(t *testing.T, limit time.Duration, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	cmd := exec.Command(sluiceBin, args...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		code = 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
	case <-time.After(limit):
		_ = cmd.Process.Kill()
		<-done
		t.Fatalf("sluice %s: still running after %s\n%s%s", strings.Join(args, " "), limit, out.String(), errb.String())
	}
	return code, out.String(), errb.String()
}
