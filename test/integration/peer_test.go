package integration

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// A peer is this test binary re-run in another role, so that heavy peers get
// their own fd limit. It prints its listen address on stdout, then serves
// until its stdin closes.
const peerRoleEnv = "SLUICE_IT_PEER"

func runPeer(role string) int {
	var addr string
	var closeFn func()
	switch role {
	case "echo":
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				// Plain read/write with a small buffer: io.Copy between
				// TCP conns would splice through a pipe per conn, three
				// fds per session, and run out of fds near 6 600
				// sessions.
				go func() {
					io.CopyBuffer(struct{ io.Writer }{c}, struct{ io.Reader }{c}, make([]byte, 512))
					c.Close()
				}()
			}
		}()
		addr, closeFn = ln.Addr().String(), func() { ln.Close() }
	case "hash":
		b, err := testpeer.Listen("127.0.0.1:0")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		addr, closeFn = b.Addr(), b.Close
	case "gocopy": // the baseline proxy of the benchmarks, to $SLUICE_IT_PEER_TARGET
		ln, err := goCopyProxy(os.Getenv(peerTargetEnv))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		addr, closeFn = ln.Addr().String(), func() { ln.Close() }
	case "slowloris": // $SLUICE_IT_PEER_COUNT conns to $SLUICE_IT_PEER_TARGET, one header byte a second
		n, stop, err := slowloris(os.Getenv(peerTargetEnv), os.Getenv(peerCountEnv))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		addr, closeFn = strconv.Itoa(n), stop
	default:
		fmt.Fprintln(os.Stderr, "unknown peer role", role)
		return 2
	}
	fmt.Println(addr)
	io.Copy(io.Discard, os.Stdin)
	closeFn()
	return 0
}

// peer is a peer process started by a test.
type peer struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	Addr  string
}

// startPeer runs this binary as a peer of the given role ("echo", "hash").
func startPeer(t testing.TB, role string) *peer {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), peerRoleEnv+"="+role)
	cmd.Stderr = os.Stderr
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		cmd.Process.Kill()
		t.Fatalf("peer %s: %v", role, err)
	}
	p := &peer{cmd: cmd, stdin: stdin, Addr: strings.TrimSpace(line)}
	t.Cleanup(func() { stdin.Close(); cmd.Wait() })
	return p
}
