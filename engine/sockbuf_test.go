package engine

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// flooder runs a backend that writes to every connection until the write
// fails, and never reads.
func flooder(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := testpeer.ServeFunc(ln, func(c net.Conn) error {
		buf := make([]byte, 64<<10)
		for {
			c.SetWriteDeadline(time.Now().Add(10 * time.Second))
			if _, err := c.Write(buf); err != nil {
				return nil
			}
		}
	})
	t.Cleanup(b.Close)
	return b.Addr()
}

// sessionFds returns the client and backend sockets of e's one session.
func sessionFds(t *testing.T, e *Engine) (cli, srv int) {
	t.Helper()
	cli, srv = -1, -1
	e.onLoops(func(l *Loop) {
		for _, h := range l.table {
			if s, ok := h.(*session); ok {
				cli, srv = s.cli.FD(), s.srv.FD()
			}
		}
	})
	if cli < 0 || srv < 0 {
		t.Fatal("no session")
	}
	return cli, srv
}

// kernelHeld returns what sluice's two sockets of the session hold for a
// client that does not read: the client socket's unacknowledged and unsent
// bytes (SIOCOUTQ) and its SO_SNDBUF, the backend socket's unread bytes
// (SIOCINQ) and its SO_RCVBUF. It waits until the queues stop growing.
func kernelHeld(t *testing.T, e *Engine) (outq, sndbuf, inq, rcvbuf int) {
	t.Helper()
	last := -1
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		var cli, srv int
		var err error
		cli, srv = sessionFds(t, e)
		if outq, err = unix.IoctlGetInt(cli, unix.SIOCOUTQ); err != nil {
			t.Fatal(err)
		}
		if inq, err = unix.IoctlGetInt(srv, unix.SIOCINQ); err != nil {
			t.Fatal(err)
		}
		sndbuf, _ = unix.GetsockoptInt(cli, unix.SOL_SOCKET, unix.SO_SNDBUF)
		rcvbuf, _ = unix.GetsockoptInt(srv, unix.SOL_SOCKET, unix.SO_RCVBUF)
		if outq+inq == last {
			return
		}
		last = outq + inq
	}
	t.Fatalf("the queues kept growing: outq %d inq %d", outq, inq)
	return
}

// A client that never reads pins at most the rule's socket buffers of
// kernel memory in sluice's sockets (the kernel doubles SO_SNDBUF and
// SO_RCVBUF for its bookkeeping; the payload queued stays under that), not
// the kernel's autotuned megabytes: by default DefaultSockBuf, with
// sockbuf=SIZE that size.
func TestSockBufBoundsNonReader(t *testing.T) {
	back := flooder(t)
	for _, tc := range []struct {
		opt   string
		bound int
	}{{"", DefaultSockBuf}, {" sockbuf=64k", 64 << 10}} {
		t.Run(strings.TrimSpace(tc.opt), func(t *testing.T) {
			e, addr := start(t, "tcp 127.0.0.1:0 -> "+back+tc.opt, Config{Loops: 1})
			c := dial(t, addr)
			defer c.Close()
			c.SetReadBuffer(64 << 10) // the client's own kernel memory is not sluice's
			outq, sndbuf, inq, rcvbuf := kernelHeld(t, e)
			held := e.Stats().Pools
			t.Logf("sockbuf %d: client socket SIOCOUTQ %d SO_SNDBUF %d; backend socket SIOCINQ %d SO_RCVBUF %d; pools %+v",
				tc.bound, outq, sndbuf, inq, rcvbuf, held)
			if sndbuf > 2*tc.bound || rcvbuf > 2*tc.bound {
				t.Errorf("SO_SNDBUF %d, SO_RCVBUF %d: want at most %d (twice the bound %d, as the kernel counts)", sndbuf, rcvbuf, 2*tc.bound, tc.bound)
			}
			// A queue may end one write past its buffer: the kernel takes a
			// write that starts under SO_SNDBUF whole, up to a 64 KiB skb
			// (seen: 2 116 608 queued under a 2 097 152 buffer).
			const skb = 64 << 10
			if outq > 2*tc.bound+skb || inq > 2*tc.bound+skb {
				t.Errorf("a non-reading client pins %d bytes in sluice's client socket and %d in its backend socket; want each at most %d (+ one 64 KiB skb)", outq, inq, 2*tc.bound)
			}
		})
	}
}

// At timeout.idle a session whose client left bytes unread in sluice's
// send queue is closed with a reset: the kernel frees the queue at once
// instead of keeping an orphan socket probing a zero window. The client
// sees a reset, not a clean end of a stream it did not get.
func TestIdleTimeoutResetsQueued(t *testing.T) {
	back := flooder(t)
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+back+" timeout.idle=1500ms", Config{Loops: 1})
	c := dial(t, addr)
	defer c.Close()
	c.SetReadBuffer(64 << 10)
	kernelHeld(t, e) // the queues are full: nothing moves from now on
	waitStats(t, e, "the idle timeout", func(s Stats) bool { return s.Sessions == 0 && s.Ended["idle-timeout"] == 1 })
	local := netip.MustParseAddrPort(addr)
	peer := c.LocalAddr().(*net.TCPAddr).AddrPort()
	if st, txq, ok := tcpSocket(t, local, peer); ok {
		t.Errorf("sluice's client socket lingers after its close: state %s, %d bytes queued", st, txq)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := io.Copy(io.Discard, c)
	t.Logf("the client read %d bytes, then %v", n, err)
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("the client read %d bytes then %v; want a reset", n, err)
	}
}

// tcpSocket finds the socket local→peer in /proc/net/tcp and returns its
// state (hex, as the file has it) and send queue.
func tcpSocket(t *testing.T, local, peer netip.AddrPort) (state string, txq int, found bool) {
	t.Helper()
	f, err := os.Open("/proc/net/tcp")
	if err != nil {
		t.Skip(err)
	}
	defer f.Close()
	want := fmt.Sprintf(":%04X", local.Port())
	wantPeer := fmt.Sprintf(":%04X", peer.Port())
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 5 || !strings.HasSuffix(fs[1], want) || !strings.HasSuffix(fs[2], wantPeer) {
			continue
		}
		q := strings.Split(fs[4], ":")
		fmt.Sscanf(q[0], "%x", &txq)
		return fs[3], txq, true
	}
	return "", 0, false
}
