package integration

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/testcert"
)

// plainHTTP answers every request with "NAME\n", plain HTTP: the backend of
// a terminating route.
func plainHTTP(t *testing.T, name string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, name) })}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

// echoPlain echoes every connection.
func echoPlain(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()
	return ln.Addr().String()
}

// Real clients against sluice terminating: curl --cacert, openssl s_client
// with TLS 1.2 and 1.3, per-route certificates chosen by SNI; 64 MiB each
// way through a Go client reach the backend exactly.
func TestTLSTerminateCurlOpenSSL(t *testing.T) {
	dir := t.TempDir()
	ca := testcert.NewCA(t, dir)
	ca1, ka := ca.Leaf(t, "a", "a.example.com")
	cb, kb := ca.Leaf(t, "b", "b.example.com")
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	d := startRules(t, addr,
		"tcp "+addr+" -> "+plainHTTP(t, "A")+" sni=a.example.com tls.cert="+ca1+" tls.key="+ka,
		"tcp "+addr+" -> "+plainHTTP(t, "B")+" sni=b.example.com tls.cert="+cb+" tls.key="+kb,
		"tcp "+addr+" -> "+echoPlain(t)+" sni=echo.example.com tls.cert="+ca1+" tls.key="+ka)
	_, port, _ := net.SplitHostPort(addr)
	for _, tc := range []struct{ name, want string }{{"a.example.com", "A"}, {"b.example.com", "B"}} {
		out, err := run(t, "", "curl", "-sS", "--max-time", "5", "--cacert", ca.File,
			"--resolve", tc.name+":"+port+":127.0.0.1", "https://"+tc.name+":"+port+"/")
		if strings.TrimSpace(out) != tc.want {
			t.Errorf("curl %s: %q (%v), want %q\n%s", tc.name, out, err, tc.want, d.stderr.String())
		}
		for _, v := range []string{"-tls1_2", "-tls1_3"} {
			out, err = run(t, "GET / HTTP/1.0\r\nHost: "+tc.name+"\r\n\r\n", "openssl", "s_client", v,
				"-connect", addr, "-servername", tc.name, "-CAfile", ca.File, "-verify_return_error", "-quiet")
			if !strings.Contains(out, "\n"+tc.want+"\n") {
				t.Errorf("openssl s_client %s -servername %s: %q (%v)\n%s", v, tc.name, out, err, d.stderr.String())
			}
		}
	}

	// 64 MiB each way, both at once, checked by digest.
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	c, err := tls.Dial("tcp", addr, &tls.Config{ServerName: "echo.example.com", RootCAs: pool, InsecureSkipVerify: false,
		VerifyConnection: nil})
	if err == nil {
		t.Fatal("a certificate for a.example.com passed for echo.example.com")
	}
	c, err = tls.Dial("tcp", addr, &tls.Config{ServerName: "echo.example.com", RootCAs: pool,
		VerifyPeerCertificate: nil, InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	const n = 64 << 20
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i*31 + i>>8)
	}
	sent := sha256.New()
	errc := make(chan error, 1)
	go func() {
		for i := 0; i < n/len(data); i++ {
			data[0] = byte(i)
			sent.Write(data)
			if _, err := c.Write(data); err != nil {
				errc <- err
				return
			}
		}
		errc <- c.CloseWrite()
	}()
	got := sha256.New()
	m, err := io.Copy(got, c)
	if err != nil || m != n {
		t.Fatalf("echo: %d bytes, %v", m, err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if string(got.Sum(nil)) != string(sent.Sum(nil)) {
		t.Fatal("the echo of 64 MiB differs")
	}
}

// Origination to nginx with its ssl module: verify passes with its
// certificate as the CA and its name; a wrong name is refused.
func TestTLSBackendNginx(t *testing.T) {
	addrs := startNginxTLS(t, "web.example.com")
	be := addrs["web.example.com"]
	crt := nginxCert(t, be)
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	addr2 := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	d := startRules(t, addr,
		"tcp "+addr+" -> "+be+" tls.backend=verify tls.backend-ca="+crt+" tls.backend-name=web.example.com",
		"tcp "+addr2+" -> "+be+" tls.backend=verify tls.backend-ca="+crt+" tls.backend-name=other.example.com")
	d.waitListening(addr2)
	out, err := run(t, "", "curl", "-sS", "--max-time", "5", "http://"+addr+"/")
	if strings.TrimSpace(out) != "web.example.com" {
		t.Errorf("through verify: %q (%v)\n%s", out, err, d.stderr.String())
	}
	out, _ = run(t, "", "curl", "-sS", "--max-time", "5", "http://"+addr2+"/")
	if strings.Contains(out, "web.example.com") {
		t.Errorf("a wrong name passed: %q", out)
	}
}

// nginxCert returns the file of the self-signed certificate nginx at addr
// serves, written by startNginxTLS in its directory: read back from the
// handshake and written here.
func nginxCert(t *testing.T, addr string) string {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	der := c.ConnectionState().PeerCertificates[0].Raw
	return writePEM(t, der)
}

func writePEM(t *testing.T, der []byte) string {
	t.Helper()
	f := t.TempDir() + "/backend-ca.pem"
	b := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := os.WriteFile(f, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}
