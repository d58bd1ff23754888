package integration

import (
	"bufio"
	"encoding/json"
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
	var stats func() any
	switch role {
	case "echo":
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		// Plain read/write with a small buffer: io.Copy between TCP conns
		// would splice through a pipe per conn, three fds per session, and
		// run out of fds near 6 600 sessions.
		testpeer.Accept(ln, func(c net.Conn) {
			io.CopyBuffer(struct{ io.Writer }{c}, struct{ io.Reader }{c}, make([]byte, 512))
			c.Close()
		})
		addr, closeFn = ln.Addr().String(), func() { ln.Close() }
	case "hash":
		b, err := testpeer.Listen("127.0.0.1:0")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		addr, closeFn = b.Addr(), b.Close
	case "gocopy": // the baseline proxy of the benchmarks, on $SLUICE_IT_PEER_LISTEN (or loopback) to $SLUICE_IT_PEER_TARGET
		ln, err := goCopyProxy(os.Getenv(peerListenEnv), os.Getenv(peerTargetEnv))
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
		start, ok := peerRoles[role]
		if !ok {
			fmt.Fprintln(os.Stderr, "unknown peer role", role)
			return 2
		}
		var err error
		if addr, stats, closeFn, err = start(); err != nil {
			fmt.Fprintln(os.Stderr, role+":", err)
			return 1
		}
	}
	fmt.Println(addr)
	// Each "stats" line on stdin is answered with one JSON line of the
	// role's counts; EOF ends the peer.
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		if sc.Text() == "stats" {
			var v any = struct{}{}
			if stats != nil {
				v = stats()
			}
			b, _ := json.Marshal(v)
			fmt.Println(string(b))
		}
	}
	closeFn()
	return 0
}

// peerRoles are the roles other files add: start begins the role and
// returns the line to print (an address, a count), the role's counts for
// "stats" (nil: none), and what ends it.
var peerRoles = map[string]func() (line string, stats func() any, closeFn func(), err error){}

// peer is a peer process started by a test.
type peer struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Reader
	Addr  string
}

// stats asks the peer for its counts (one JSON line) into v.
func (p *peer) stats(t testing.TB, v any) {
	t.Helper()
	if _, err := io.WriteString(p.stdin, "stats\n"); err != nil {
		t.Fatalf("peer stats: %v", err)
	}
	line, err := p.out.ReadString('\n')
	if err != nil {
		t.Fatalf("peer stats: %v", err)
	}
	if err := json.Unmarshal([]byte(line), v); err != nil {
		t.Fatalf("peer stats %q: %v", line, err)
	}
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
	out := bufio.NewReader(stdout)
	line, err := out.ReadString('\n')
	if err != nil {
		cmd.Process.Kill()
		t.Fatalf("peer %s: %v", role, err)
	}
	p := &peer{cmd: cmd, stdin: stdin, out: out, Addr: strings.TrimSpace(line)}
	t.Cleanup(func() { stdin.Close(); cmd.Wait() })
	return p
}
