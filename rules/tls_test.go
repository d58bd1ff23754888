package rules

import (
	"strings"
	"testing"
)

var tlsLines = []lineCase{
	{"tcp 0.0.0.0:443 -> 127.0.0.1:80 tls.cert=/etc/sluice/a.pem", ""},
	{"tcp 0.0.0.0:443 -> 127.0.0.1:80 tls.min=1.3 tls.key=/k.pem tls.cert=/c.pem tls.alpn=h2,http/1.1 tls.client-ca=/ca.pem",
		"tcp 0.0.0.0:443 -> 127.0.0.1:80 tls.cert=/c.pem tls.key=/k.pem tls.alpn=h2,http/1.1 tls.client-ca=/ca.pem tls.min=1.3"},
	{"tcp 0.0.0.0:443 -> 127.0.0.1:80 tls.min=1.2 tls.cert=a.pem", "tcp 0.0.0.0:443 -> 127.0.0.1:80 tls.cert=a.pem"},
	{"tcp 0.0.0.0:80 -> 127.0.0.1:443 tls.backend=on", ""},
	{"tcp 0.0.0.0:80 -> web:443 tls.backend=verify tls.backend-ca=/ca.pem tls.backend-name=Web.Example.COM.",
		"tcp 0.0.0.0:80 -> web:443 tls.backend=verify tls.backend-ca=/ca.pem tls.backend-name=web.example.com"},
	{"tcp 0.0.0.0:443 -> 127.0.0.1:80 sni=a.example.com tls.cert=a.pem send-proxy=v2",
		"tcp 0.0.0.0:443 -> 127.0.0.1:80 sni=a.example.com send-proxy=v2 tls.cert=a.pem"},
}

func TestTLSOptionsRoundTrip(t *testing.T) { roundTrip(t, tlsLines) }

func TestTLSOptionsBad(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"tcp 0.0.0.0:443 -> 127.0.0.1:80 tls.key=/k.pem", "tls.key needs tls.cert"},
		{"tcp 0.0.0.0:443 -> 127.0.0.1:80 tls.alpn=h2", "tls.alpn needs tls.cert"},
		{"tcp 0.0.0.0:443 -> 127.0.0.1:80 tls.client-ca=/ca", "tls.client-ca needs tls.cert"},
		{"tcp 0.0.0.0:443 -> 127.0.0.1:80 tls.min=1.3", "tls.min needs tls.cert"},
		{"tcp 0.0.0.0:443 -> 127.0.0.1:80 tls.min=1.1 tls.cert=a", "want 1.2 or 1.3"},
		{"tcp 0.0.0.0:443 -> 127.0.0.1:80 tls.backend=yes", "want on or verify"},
		{"tcp 0.0.0.0:443 -> 127.0.0.1:80 tls.backend-ca=/ca", "need tls.backend"},
		{"tcp 0.0.0.0:443 -> 127.0.0.1:80 tls.backend=on tls.backend-ca=/ca", "tls.backend-ca needs tls.backend=verify"},
		{"tcp 0.0.0.0:443 -> 127.0.0.1:80 tls.backend=on tls.backend-name=a_b!", "not a host name"},
		{"tcp 0.0.0.0:443 -> 127.0.0.1:80 tls.cert=", "needs a value"},
		{"tcp 0.0.0.0:443 -> 127.0.0.1:80 tls.cert=a#b", "a path without blanks"},
		{"tcp 0.0.0.0:443 -> 127.0.0.1:80 tls.alpn=h2,h2 tls.cert=a", "tls.alpn"},
		{"tcp 0.0.0.0:443 -> 127.0.0.1:80 tls.foo=1", "unknown option"},
		{"udp 0.0.0.0:443 -> 127.0.0.1:80 tls.cert=a", "tcp rules only"},
		{"tcp 0.0.0.0:443 health=tcp tls.cert=a", "need a target"},
	} {
		_, err := Parse(tc.in)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want one with %q", tc.in, err, tc.want)
		}
	}
	r, _ := Parse("tcp 0.0.0.0:443 -> 127.0.0.1:80 tls.cert=/c tls.client-ca=/ca tls.backend=verify tls.backend-ca=/b")
	if f := r.TLSFiles(); len(f) != 3 || f[0] != [2]string{"tls.cert", "/c"} || f[2] != [2]string{"tls.backend-ca", "/b"} || !r.Terminates() {
		t.Errorf("TLSFiles %v", f)
	}
}
