package engine

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/internal/testcert"
	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// echoBackend echoes every connection's bytes (plain, or TLS with cfg).
func echoBackend(t *testing.T, cfg *tls.Config) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if cfg != nil {
		ln = tls.NewListener(ln, cfg)
	}
	t.Cleanup(func() { ln.Close() })
	testpeer.Accept(ln, func(c net.Conn) {
		defer c.Close()
		io.Copy(c, c)
	})
	return ln.Addr().String()
}

func caPool(t *testing.T, ca *testcert.CA) *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Cert)
	return p
}

// tlsExchange writes n bytes through c, reads the echo, and checks both
// digests.
func tlsExchange(t *testing.T, c net.Conn, n int) {
	t.Helper()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	data := make([]byte, n)
	for i := range data {
		data[i] = byte(i * 7)
	}
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		errc <- err
	}()
	h := sha256.New()
	if _, err := io.CopyN(h, c, int64(n)); err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if want := sha256.Sum256(data); string(h.Sum(nil)) != string(want[:]) {
		t.Fatal("echo differs")
	}
}

// Termination: a Go client gets the route's certificate, its bytes reach the
// backend in plaintext and come back; the session shows its version. With
// tls.client-ca, a client without a certificate is refused (tls-handshake),
// one with a certificate passes.
func TestTLSTerminate(t *testing.T) {
	dir := t.TempDir()
	ca := testcert.NewCA(t, dir)
	cert, key := ca.Leaf(t, "srv", "a.example.com")
	be := echoBackend(t, nil)
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+be+" tls.cert="+cert+" tls.key="+key+" tls.alpn=h2,http/1.1", Config{})
	for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: caPool(t, ca), ServerName: "a.example.com", MaxVersion: v, NextProtos: []string{"h2"}})
		if err != nil {
			t.Fatalf("%x: %v", v, err)
		}
		if cs := c.ConnectionState(); cs.Version != v || cs.NegotiatedProtocol != "h2" {
			t.Errorf("version %x alpn %q", cs.Version, cs.NegotiatedProtocol)
		}
		tlsExchange(t, c, 8<<20+123)
		c.Close()
	}
	// Garbage instead of a hello.
	g := dial(t, addr)
	g.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
	g.SetDeadline(time.Now().Add(5 * time.Second))
	if b, _ := io.ReadAll(g); strings.Contains(string(b), "HTTP/1") {
		t.Errorf("plaintext got through: %q", b)
	}
	g.Close()
	waitIdle(t, e)
	if n := e.tlsc.ok.Load(); n != 2 {
		t.Errorf("%d handshakes ok", n)
	}
	if n := e.tlsc.failed.Load(); n != 1 {
		t.Errorf("%d handshakes failed", n)
	}

	// mTLS.
	ccert, ckey := ca.Leaf(t, "client", "client-1")
	e2, addr2 := start(t, "tcp 127.0.0.1:0 -> "+be+" tls.cert="+cert+" tls.key="+key+" tls.client-ca="+ca.File, Config{})
	c, err := tls.Dial("tcp", addr2, &tls.Config{RootCAs: caPool(t, ca), ServerName: "a.example.com"})
	if err == nil {
		// TLS 1.3: the refusal comes with the first read.
		c.SetDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Read(make([]byte, 1))
		c.Close()
	}
	if err == nil {
		t.Error("a client without a certificate passed")
	}
	pair, err := tls.LoadX509KeyPair(ccert, ckey)
	if err != nil {
		t.Fatal(err)
	}
	c, err = tls.Dial("tcp", addr2, &tls.Config{RootCAs: caPool(t, ca), ServerName: "a.example.com", Certificates: []tls.Certificate{pair}})
	if err != nil {
		t.Fatal(err)
	}
	tlsExchange(t, c, 100000)
	c.Close()
	waitIdle(t, e2)
	if e2.Stats().Ended[conn.CodeTLSHandshake.String()] != 1 {
		t.Errorf("ends %v", e2.Stats().Ended)
	}
}

// A client that stalls mid-handshake is closed at timeout.handshake.
func TestTLSHandshakeStall(t *testing.T) {
	dir := t.TempDir()
	ca := testcert.NewCA(t, dir)
	cert, key := ca.Leaf(t, "srv", "a.example.com")
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+echoBackend(t, nil)+" tls.cert="+cert+" tls.key="+key+" timeout.handshake=300ms", Config{})
	c := dial(t, addr)
	defer c.Close()
	c.Write([]byte{0x16, 0x03, 0x01, 0x00, 0x80, 0x01}) // a hello's first bytes, then nothing
	c.SetDeadline(time.Now().Add(5 * time.Second))
	t0 := time.Now()
	io.ReadAll(c)
	if d := time.Since(t0); d > 3*time.Second {
		t.Errorf("closed after %s", d)
	}
	waitIdle(t, e)
	if e.Stats().Ended[conn.CodeHandshakeTimeout.String()] != 1 {
		t.Errorf("ends %v", e.Stats().Ended)
	}
}

// Origination: verify against the backend's CA passes; a wrong name or an
// unknown CA is tls-backend.
func TestTLSBackend(t *testing.T) {
	dir := t.TempDir()
	ca := testcert.NewCA(t, dir)
	cert, key := ca.Leaf(t, "be", "127.0.0.1")
	pair, _ := tls.LoadX509KeyPair(cert, key)
	be := echoBackend(t, &tls.Config{Certificates: []tls.Certificate{pair}})
	_, addr := start(t, "tcp 127.0.0.1:0 -> "+be+" tls.backend=verify tls.backend-ca="+ca.File, Config{})
	c := dial(t, addr)
	tlsExchange(t, c, 1<<20)
	c.Close()
	other := testcert.NewCA(t, t.TempDir())
	for _, opts := range []string{"tls.backend=verify tls.backend-ca=" + ca.File + " tls.backend-name=wrong.example.com", "tls.backend=verify tls.backend-ca=" + other.File} {
		e, addr := start(t, "tcp 127.0.0.1:0 -> "+be+" "+opts, Config{})
		c := dial(t, addr)
		c.SetDeadline(time.Now().Add(5 * time.Second))
		c.Write([]byte("x"))
		if b, _ := io.ReadAll(c); len(b) > 0 {
			t.Errorf("%s: got %q", opts, b)
		}
		c.Close()
		waitIdle(t, e)
		if e.Stats().Ended[conn.CodeTLSBackend.String()] != 1 {
			t.Errorf("%s: ends %v", opts, e.Stats().Ended)
		}
	}
	_ = os.Remove
}
