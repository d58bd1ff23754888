package tlsconf

import (
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
