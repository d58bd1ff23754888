package integration

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// tlsBackend is a TLS server that answers each handshake with its name and
// closes: the backend terminates, sluice only routes.
func tlsBackend(t *testing.T, name string) string {
	t.Helper()
	cfg := &tls.Config{Certificates: []tls.Certificate{selfSigned(t, name)}, NextProtos: []string{"h2", "http/1.1"}}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	testpeer.Accept(ln, func(c net.Conn) {
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if c.(*tls.Conn).Handshake() == nil {
			io.WriteString(c, name)
		}
	})
	return ln.Addr().String()
}

// selfSigned returns a self-signed certificate for name.
func selfSigned(t *testing.T, name string) tls.Certificate {
	t.Helper()
	c, err := testpeer.SelfSigned(name)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// startRules runs `sluice run -c` with the rules and waits for addr.
func startRules(t *testing.T, addr string, lines ...string) *daemon {
	t.Helper()
	return startRulesWith(t, "log: {level: warn}\n", addr, lines...)
}

// startRulesWith is startRules with head, the configuration before rules:.
func startRulesWith(t *testing.T, head, addr string, lines ...string) *daemon {
	t.Helper()
	cfg := head + "rules:\n"
	for _, l := range lines {
		cfg += "  - " + l + "\n"
	}
	file := filepath.Join(t.TempDir(), "sluice.yaml")
	if err := os.WriteFile(file, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, forwardOpts{}, "run", "-c", file)
	d.Addr = addr
	d.waitListening(addr)
	return d
}

// whoAnswers dials addr with a Go crypto/tls client (its default,
// post-quantum hello) for name and returns the backend's name.
func whoAnswers(t *testing.T, addr, name string, alpn ...string) (string, error) {
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 3 * time.Second}, "tcp", addr,
		&tls.Config{ServerName: name, NextProtos: alpn, InsecureSkipVerify: true})
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	b, err := io.ReadAll(c)
	return string(b), err
}

func TestSNIRoutesGoClients(t *testing.T) {
	a, b, h2, def := tlsBackend(t, "a"), tlsBackend(t, "b"), tlsBackend(t, "h2"), tlsBackend(t, "default")
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	d := startRules(t, addr,
		"tcp "+addr+" -> "+a+" sni=a.example.com",
		"tcp "+addr+" -> "+h2+" sni=a.example.com alpn=h2",
		"tcp "+addr+" -> "+b+" sni=*.b.example.com splice=on",
		"tcp "+addr+" -> "+def)
	for _, tc := range []struct {
		name string
		alpn []string
		want string
	}{
		{"a.example.com", nil, "a"},
		{"A.EXAMPLE.com", []string{"http/1.1"}, "a"},
		{"a.example.com", []string{"h2"}, "h2"},
		{"x.y.b.example.com", nil, "b"},
		{"b.example.com", nil, "default"},
		{"", nil, "default"},
	} {
		got, err := whoAnswers(t, addr, tc.name, tc.alpn...)
		if err != nil || got != tc.want {
			t.Errorf("%q %q: answered by %q (%v), want %q\n%s", tc.name, tc.alpn, got, err, tc.want, d.stderr.String())
		}
	}
}

// captureHello returns a Go crypto/tls client's first flight for name.
func captureHello(t *testing.T, name string) []byte {
	t.Helper()
	h, err := testpeer.ClientHello(name)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// A real hello re-framed into 3 records and sent one byte per write reaches
// its route, which receives exactly those bytes; refusals are prompt.
func TestSNIFragmentedAndRefused(t *testing.T) {
	got := make(chan []byte, 1)
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	hello := captureHello(t, "frag.example.com")
	msg := hello[5:]
	var framed []byte
	for _, part := range [][]byte{msg[:3], msg[3:900], msg[900:]} {
		framed = append(framed, 22, 3, 1, byte(len(part)>>8), byte(len(part)))
		framed = append(framed, part...)
	}
	go func() {
		c, err := raw.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		b := make([]byte, len(framed))
		n, _ := io.ReadFull(c, b)
		got <- b[:n]
	}()
	other := tlsBackend(t, "other")
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	d := startRules(t, addr,
		"tcp "+addr+" -> "+raw.Addr().String()+" sni=frag.example.com timeout.handshake=20s",
		"tcp "+addr+" -> "+other+" sni=other.example.com timeout.handshake=20s")

	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := range framed {
		if _, err := c.Write(framed[i : i+1]); err != nil {
			t.Fatal(err)
		}
		if i%64 == 0 {
			time.Sleep(time.Millisecond) // separate segments
		}
	}
	select {
	case b := <-got:
		if !bytes.Equal(b, framed) {
			t.Fatalf("backend got %d bytes, not the %d sent\n%s", len(b), len(framed), d.stderr.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("the fragmented hello was not routed\n%s", d.stderr.String())
	}

	refused := func(what string, send []byte) {
		t.Helper()
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write(send)
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		began := time.Now()
		if _, err := c.Read(make([]byte, 1)); err == nil || isTimeout(err) {
			t.Errorf("%s: not closed (%v)", what, err)
		} else if time.Since(began) > 2*time.Second {
			t.Errorf("%s: closed after %v", what, time.Since(began))
		}
	}
	refused("not TLS, no default route", []byte("GET / HTTP/1.0\r\n\r\n"))
	refused("unknown name", captureHello(t, "nobody.example.com"))
	refused("oversized", []byte{22, 3, 1, 0x40, 0, 1, 0, 0x80, 0})
	refused("malformed", []byte{22, 3, 1, 0, 8, 2, 0, 0, 4, 0, 0, 0, 0})
	// A good client meanwhile is served.
	if got, err := whoAnswers(t, addr, "other.example.com"); got != "other" {
		t.Errorf("good client: %q %v", got, err)
	}
}

// A client that sends nothing is closed at timeout.handshake.
func TestSNISilentClient(t *testing.T) {
	a := tlsBackend(t, "a")
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	startRules(t, addr, "tcp "+addr+" -> "+a+" sni=a.example.com timeout.handshake=300ms")
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	began := time.Now()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = c.Read(make([]byte, 1))
	if took := time.Since(began); err == nil || isTimeout(err) || took < 250*time.Millisecond || took > 2*time.Second {
		t.Fatalf("closed after %v (%v), want about 300ms", took, err)
	}
}
