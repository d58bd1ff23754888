package handshake

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/pires/go-proxyproto"
	"github.com/pires/go-proxyproto/tlvparse"
)

// Every suite crypto/tls implements has an OpenSSL name, and the names are
// OpenSSL's own (openssl ciphers -stdname maps IANA names to them).
func TestOpenSSLCipherNames(t *testing.T) {
	for _, cs := range append(tls.CipherSuites(), tls.InsecureCipherSuites()...) {
		if _, ok := opensslCiphers[cs.ID]; !ok {
			t.Errorf("%s has no OpenSSL name", cs.Name)
		}
	}
	out, err := exec.Command("openssl", "ciphers", "-stdname", "ALL:@SECLEVEL=0").Output()
	if err != nil {
		t.Skipf("openssl ciphers: %v", err)
	}
	std := map[string]string{} // IANA -> OpenSSL
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && f[1] == "-" {
			std[f[0]] = f[2]
		}
	}
	checked := 0
	for id, name := range opensslCiphers {
		iana := tls.CipherSuiteName(id)
		if want, ok := std[iana]; ok {
			checked++
			if name != want {
				t.Errorf("%s: %q, OpenSSL says %q", iana, name, want)
			}
		}
	}
	if checked < 10 {
		t.Errorf("only %d names checked against openssl", checked)
	}
	if got := opensslVersion(tls.VersionTLS13); got != "TLSv1.3" {
		t.Errorf("TLS 1.3: %q", got)
	}
}

// AddTLS replaces a received authority with the SNI, adds PP2_TYPE_SSL
// with the client certificate's flags and CN, and keeps HAProxy's order;
// the header it gives parses back to the same values.
func TestAddTLS(t *testing.T) {
	st := &State{TLVs: []proxyproto.TLV{
		{Type: proxyproto.PP2_TYPE_UNIQUE_ID, Value: []byte("id1")},
		{Type: proxyproto.PP2_TYPE_AUTHORITY, Value: []byte("old.example.com")},
	}}
	peer := &x509.Certificate{Subject: pkix.Name{CommonName: "client one"}}
	cs := &tls.ConnectionState{Version: tls.VersionTLS12, CipherSuite: tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
		ServerName: "a.example.com", PeerCertificates: []*x509.Certificate{peer}, VerifiedChains: [][]*x509.Certificate{{peer}}}
	st.AddTLS(cs)
	var types []proxyproto.PP2Type
	for _, tl := range st.TLVs {
		types = append(types, tl.Type)
	}
	if want := []proxyproto.PP2Type{proxyproto.PP2_TYPE_AUTHORITY, proxyproto.PP2_TYPE_UNIQUE_ID, proxyproto.PP2_TYPE_SSL}; !slices.Equal(types, want) {
		t.Fatalf("types %v, want %v", types, want)
	}
	if string(st.TLVs[0].Value) != "a.example.com" {
		t.Errorf("authority %q", st.TLVs[0].Value)
	}
	ssl, err := tlvparse.SSL(st.TLVs[2])
	if err != nil {
		t.Fatal(err)
	}
	v, _ := ssl.SSLVersion()
	c, _ := ssl.SSLCipher()
	cn, _ := ssl.ClientCN()
	if !ssl.ClientSSL() || !ssl.ClientCertConn() || !ssl.ClientCertSess() || !ssl.Verified() ||
		v != "TLSv1.2" || c != "ECDHE-ECDSA-AES128-GCM-SHA256" || cn != "client one" {
		t.Errorf("ssl TLV %+v: %q %q %q", ssl, v, c, cn)
	}
	// The sub-TLVs in HAProxy's order: version, CN, cipher.
	val := st.TLVs[2].Value[5:]
	if i, j, k := bytes.Index(val, []byte("TLSv1.2")), bytes.Index(val, []byte("client one")), bytes.Index(val, []byte("ECDHE")); !(i < j && j < k) {
		t.Errorf("sub-TLV order %d %d %d", i, j, k)
	}

	// Resumed without a certificate: SSL only, no CN, no cert flags.
	st = &State{}
	st.AddTLS(&tls.ConnectionState{Version: tls.VersionTLS13, CipherSuite: tls.TLS_AES_128_GCM_SHA256, DidResume: true})
	if len(st.TLVs) != 1 {
		t.Fatalf("TLVs %v", st.TLVs)
	}
	ssl, _ = tlvparse.SSL(st.TLVs[0])
	if ssl.Client != tlvparse.PP2_BITFIELD_CLIENT_SSL {
		t.Errorf("client %#x", ssl.Client)
	}
	if _, ok := ssl.ClientCN(); ok {
		t.Error("a CN without a certificate")
	}
	b, err := formatHeader(2, netip.MustParseAddrPort("127.0.0.1:1"), netip.MustParseAddrPort("127.0.0.1:2"), st.TLVs)
	if err != nil {
		t.Fatal(err)
	}
	h, err := ParseHeader(b)
	if err != nil {
		t.Fatal(err)
	}
	if all, _ := h.TLVs(); len(all) != 1 || !tlvparse.IsSSL(all[0]) {
		t.Errorf("parsed back: %v", all)
	}
}
