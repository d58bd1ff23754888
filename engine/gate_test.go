package engine

import (
	"io"
	"net"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// An untrusted client whose first bytes are a strict prefix of a PROXY
// signature is not held past timeout.handshake, and a prefix followed by the
// end of its input is no header: the bytes are forwarded.
func TestGatePrefixBounded(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	testpeer.Accept(ln, func(c net.Conn) { // answers what it got, once the client ended
		defer c.Close()
		b, _ := io.ReadAll(c)
		c.Write(append([]byte("got:"), b...))
	})
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+ln.Addr().String()+" accept-proxy=10.0.0.0/8 timeout.handshake=300ms timeout.idle=1m", Config{Loops: 1})

	t.Run("prefix then EOF", func(t *testing.T) {
		for _, prefix := range []string{"\r\n", "P", "PROX", "\r\n\r\n\x00\r\nQU"} {
			c := dial(t, addr)
			c.Write([]byte(prefix))
			time.Sleep(20 * time.Millisecond) // the gate sees the prefix alone first
			c.CloseWrite()
			c.SetReadDeadline(time.Now().Add(3 * time.Second))
			got, err := io.ReadAll(c)
			c.Close()
			if err != nil || string(got) != "got:"+prefix {
				t.Errorf("%q then EOF: backend answered %q, %v; want the prefix forwarded", prefix, got, err)
			}
		}
	})
	t.Run("prefix held", func(t *testing.T) {
		before := e.Stats().Ended["handshake-timeout"]
		c := dial(t, addr)
		defer c.Close()
		c.Write([]byte("PRO"))
		t0 := time.Now()
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		n, err := c.Read(make([]byte, 64))
		took := time.Since(t0)
		t.Logf("a held prefix ended after %v: %d bytes, %v", took.Round(time.Millisecond), n, err)
		if isTimeout(err) || took > 2*time.Second {
			t.Fatalf("a client holding a strict prefix was kept %v (timeout.handshake=300ms)", took.Round(time.Millisecond))
		}
		if n != 0 {
			t.Errorf("%d bytes reached the held client", n)
		}
		waitFor(t, "the held conn to end handshake-timeout", func() bool { return e.Stats().Ended["handshake-timeout"] == before+1 })
	})
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}
