package tlsconf

import (
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sluice-proxy/sluice/internal/testcert"
	"github.com/sluice-proxy/sluice/rules"
)

func rule(t *testing.T, line string) *rules.Rule {
	t.Helper()
	r, err := rules.Parse(line)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	ca := testcert.NewCA(t, dir)
	cert, key := ca.Leaf(t, "a", "a.example.com")
	_, other := ca.Leaf(t, "b", "b.example.com")
	both := filepath.Join(dir, "both.pem")
	cb, _ := os.ReadFile(cert)
	kb, _ := os.ReadFile(key)
	os.WriteFile(both, append(cb, kb...), 0o600)

	l, err := Load(rule(t, "tcp 0.0.0.0:443 -> 127.0.0.1:80 tls.cert="+cert+" tls.key="+key+" tls.client-ca="+ca.File+" tls.min=1.3 tls.alpn=h2"))
	if err != nil {
		t.Fatal(err)
	}
	if l.Server == nil || l.Client != nil || l.Server.ClientCAs == nil || l.Server.MinVersion != 0x0304 || l.Subject() != "CN=a.example.com" || l.Expiry().IsZero() {
		t.Errorf("loaded %+v", l)
	}
	l2, err := Load(rule(t, "tcp 0.0.0.0:443 -> 127.0.0.1:80 tls.cert="+both))
	if err != nil || l2.Digest == l.Digest {
		t.Fatalf("key in the cert file: %v", err)
	}
	if n, _ := Load(rule(t, "tcp 0.0.0.0:443 -> 127.0.0.1:80")); n != nil {
		t.Error("a plain rule loads something")
	}
	c, err := Load(rule(t, "tcp 0.0.0.0:80 -> 127.0.0.1:443 tls.backend=verify tls.backend-ca="+ca.File))
	if err != nil || c.Client == nil || c.Client.RootCAs == nil || c.ClientFor("127.0.0.1").ServerName != "127.0.0.1" {
		t.Fatalf("backend: %+v %v", c, err)
	}

	for _, tc := range []struct{ line, want string }{
		{"tls.cert=" + dir + "/none.pem", "tls.cert " + dir + "/none.pem: open"},
		{"tls.cert=" + cert, "tls.cert " + cert + ": no private key"},
		{"tls.cert=" + cert + " tls.key=" + other, "tls.key " + other + ": the key does not match the certificate"},
		{"tls.cert=" + key + " tls.key=" + key, "no certificate"},
		{"tls.cert=" + both + " tls.client-ca=" + key, "tls.client-ca " + key + ": no PEM certificate"},
		{"tls.backend=verify tls.backend-ca=" + dir + "/x", "tls.backend-ca " + dir + "/x: open"},
	} {
		_, err := Load(rule(t, "tcp 0.0.0.0:443 -> 127.0.0.1:80 "+tc.line))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.line, err, tc.want)
		}
	}
	// A changed file changes the digest.
	ca.Leaf(t, "a", "a.example.com")
	l3, err := Load(rule(t, "tcp 0.0.0.0:443 -> 127.0.0.1:80 tls.cert="+cert+" tls.key="+key+" tls.client-ca="+ca.File+" tls.min=1.3 tls.alpn=h2"))
	if err != nil || l3.Digest == l.Digest {
		t.Errorf("a new certificate, same digest (%v)", err)
	}
}

// A ticket resumes on a Config loaded again for the same route (an apply
// re-reads the files and makes new Configs), with the certificate renewed
// too, and never on another route's Config, nor on the same route once it
// trusts other client CAs: tickets are sealed with one key set for the
// process and bound to their route.
func TestTicketsOutliveTheirConfig(t *testing.T) {
	dir := t.TempDir()
	ca := testcert.NewCA(t, dir)
	otherCA := testcert.NewCA(t, "")
	cert, key := ca.Leaf(t, "a", "a.example.com")
	renewed, renewedKey := ca.Leaf(t, "a2", "a.example.com")
	ccert, ckey := ca.Leaf(t, "client", "client one")
	pair, err := tls.LoadX509KeyPair(ccert, ckey)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	load := func(line string) *tls.Config {
		l, err := Load(rule(t, line))
		if err != nil {
			t.Fatal(err)
		}
		return l.Server
	}
	// handshake runs one TLS conn on loopback (net.Pipe does not buffer:
	// TLS 1.3's two sides write at once) and reports whether it resumed;
	// the client reads until the server closes, so a TLS 1.3 ticket (sent
	// after the handshake) reaches its cache.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	handshake := func(srv *tls.Config, cache tls.ClientSessionCache, v uint16) bool {
		t.Helper()
		b, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		a, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() {
			s := tls.Server(a, srv)
			err := s.Handshake()
			if err == nil {
				_, err = s.Write([]byte("x"))
			}
			s.Close()
			done <- err
		}()
		c := tls.Client(b, &tls.Config{ServerName: "a.example.com", RootCAs: pool, Certificates: []tls.Certificate{pair},
			ClientSessionCache: cache, MinVersion: v, MaxVersion: v})
		defer c.Close()
		if _, err := io.ReadAll(c); err != nil {
			t.Fatalf("client: %v", err)
		}
		if err := <-done; err != nil {
			t.Fatalf("server: %v", err)
		}
		return c.ConnectionState().DidResume
	}
	const route = "tcp 127.0.0.1:443 -> 127.0.0.1:80 tls.client-ca="
	for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		for _, tc := range []struct {
			name, next string
			resume     bool
		}{
			{"loaded again", route + ca.File + " tls.cert=" + cert + " tls.key=" + key, true},
			{"certificate renewed", route + ca.File + " tls.cert=" + renewed + " tls.key=" + renewedKey, true},
			{"another route", "tcp 127.0.0.1:444 -> 127.0.0.1:80 tls.client-ca=" + ca.File + " tls.cert=" + cert + " tls.key=" + key, false},
			{"other client CAs", route + otherCA.File + " tls.cert=" + cert + " tls.key=" + key, false},
		} {
			cache := tls.NewLRUClientSessionCache(4)
			if handshake(load(route+ca.File+" tls.cert="+cert+" tls.key="+key), cache, v) {
				t.Fatalf("%s: the first conn resumed", tc.name)
			}
			srv := load(tc.next)
			if tc.name == "other client CAs" {
				srv.ClientCAs = pool // the client's certificate is still accepted: only the route's tickets differ
			}
			if got := handshake(srv, cache, v); got != tc.resume {
				t.Errorf("%s, %s: resumed %v, want %v", tls.VersionName(v), tc.name, got, tc.resume)
			}
		}
	}
}
