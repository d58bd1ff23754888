package handshake

import (
	"crypto/tls"
	"slices"

	"github.com/pires/go-proxyproto"
	"github.com/pires/go-proxyproto/tlvparse"
)

// AddTLS gives st's outgoing PROXY v2 header what the client side's TLS
// termination negotiated, as HAProxy writes it with "send-proxy-v2
// proxy-v2-options ssl,cert-cn,ssl-cipher,authority": PP2_TYPE_AUTHORITY
// (the SNI) and PP2_TYPE_ALPN (the negotiated protocol) replace the ones a
// received header carried, and PP2_TYPE_SSL is added with the client flags
// (SSL; CERT_CONN and CERT_SESS for a client certificate), verify 0 (a
// presented certificate is always verified: tls.client-ca requires and
// verifies it, and a refused one ends the handshake) and the sub-TLVs
// VERSION, CN (a verified client certificate's) and CIPHER, in HAProxy's
// order. The TLVs are kept in ascending type order, which is HAProxy's
// order too (ALPN, AUTHORITY, UNIQUE_ID, SSL, NETNS). Once per session,
// before the outgoing chain runs; only a send-proxy=v2 route needs it.
func (st *State) AddTLS(cs *tls.ConnectionState) {
	var tlvs []proxyproto.TLV
	for _, t := range st.TLVs {
		switch {
		case t.Type == proxyproto.PP2_TYPE_AUTHORITY && cs.ServerName != "",
			t.Type == proxyproto.PP2_TYPE_ALPN && cs.NegotiatedProtocol != "",
			t.Type == proxyproto.PP2_TYPE_SSL:
			continue // ours wins
		}
		tlvs = append(tlvs, t)
	}
	if cs.NegotiatedProtocol != "" {
		tlvs = append(tlvs, proxyproto.TLV{Type: proxyproto.PP2_TYPE_ALPN, Value: []byte(cs.NegotiatedProtocol)})
	}
	if cs.ServerName != "" {
		tlvs = append(tlvs, proxyproto.TLV{Type: proxyproto.PP2_TYPE_AUTHORITY, Value: []byte(cs.ServerName)})
	}
	if ssl, err := sslTLV(cs).Marshal(); err == nil {
		tlvs = append(tlvs, ssl)
	}
	slices.SortStableFunc(tlvs, func(a, b proxyproto.TLV) int { return int(a.Type) - int(b.Type) })
	st.TLVs = tlvs
}

// sslTLV is the PP2_TYPE_SSL TLV of a terminated conn (see AddTLS).
func sslTLV(cs *tls.ConnectionState) tlvparse.PP2SSL {
	s := tlvparse.PP2SSL{Client: tlvparse.PP2_BITFIELD_CLIENT_SSL}
	s.TLV = append(s.TLV, proxyproto.TLV{Type: proxyproto.PP2_SUBTYPE_SSL_VERSION, Value: []byte(opensslVersion(cs.Version))})
	if len(cs.PeerCertificates) > 0 {
		// A resumed session's certificate was presented on the session's
		// first conn, not on this one: HAProxy's cert_used_conn.
		s.Client |= tlvparse.PP2_BITFIELD_CLIENT_CERT_SESS
		if !cs.DidResume {
			s.Client |= tlvparse.PP2_BITFIELD_CLIENT_CERT_CONN
		}
		if len(cs.VerifiedChains) > 0 && cs.PeerCertificates[0].Subject.CommonName != "" {
			s.TLV = append(s.TLV, proxyproto.TLV{Type: proxyproto.PP2_SUBTYPE_SSL_CN, Value: []byte(cs.PeerCertificates[0].Subject.CommonName)})
		}
	}
	s.TLV = append(s.TLV, proxyproto.TLV{Type: proxyproto.PP2_SUBTYPE_SSL_CIPHER, Value: []byte(opensslCipher(cs.CipherSuite))})
	return s
}

// opensslVersion names a TLS version as OpenSSL's SSL_get_version does
// ("TLSv1.3"), which is what HAProxy writes in PP2_SUBTYPE_SSL_VERSION.
func opensslVersion(v uint16) string {
	switch v {
	case tls.VersionTLS10:
		return "TLSv1"
	case tls.VersionTLS11:
		return "TLSv1.1"
	case tls.VersionTLS12:
		return "TLSv1.2"
	case tls.VersionTLS13:
		return "TLSv1.3"
	}
	return tls.VersionName(v)
}

// opensslCipher names a cipher suite as OpenSSL does (TLS 1.3 suites keep
// their IANA names there), which is what HAProxy writes in
// PP2_SUBTYPE_SSL_CIPHER; a suite OpenSSL does not know keeps Go's name.
func opensslCipher(id uint16) string {
	if n, ok := opensslCiphers[id]; ok {
		return n
	}
	return tls.CipherSuiteName(id)
}

// opensslCiphers covers every suite crypto/tls implements (a test checks
// the list against tls.CipherSuites and openssl ciphers -stdname).
var opensslCiphers = map[uint16]string{
	tls.TLS_AES_128_GCM_SHA256:                        "TLS_AES_128_GCM_SHA256",
	tls.TLS_AES_256_GCM_SHA384:                        "TLS_AES_256_GCM_SHA384",
	tls.TLS_CHACHA20_POLY1305_SHA256:                  "TLS_CHACHA20_POLY1305_SHA256",
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256:       "ECDHE-ECDSA-AES128-GCM-SHA256",
	tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256:         "ECDHE-RSA-AES128-GCM-SHA256",
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384:       "ECDHE-ECDSA-AES256-GCM-SHA384",
	tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384:         "ECDHE-RSA-AES256-GCM-SHA384",
	tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256: "ECDHE-ECDSA-CHACHA20-POLY1305",
	tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256:   "ECDHE-RSA-CHACHA20-POLY1305",
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA:          "ECDHE-ECDSA-AES128-SHA",
	tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA:            "ECDHE-RSA-AES128-SHA",
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA:          "ECDHE-ECDSA-AES256-SHA",
	tls.TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA:            "ECDHE-RSA-AES256-SHA",
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256:       "ECDHE-ECDSA-AES128-SHA256",
	tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256:         "ECDHE-RSA-AES128-SHA256",
	tls.TLS_RSA_WITH_AES_128_GCM_SHA256:               "AES128-GCM-SHA256",
	tls.TLS_RSA_WITH_AES_256_GCM_SHA384:               "AES256-GCM-SHA384",
	tls.TLS_RSA_WITH_AES_128_CBC_SHA:                  "AES128-SHA",
	tls.TLS_RSA_WITH_AES_256_CBC_SHA:                  "AES256-SHA",
	tls.TLS_RSA_WITH_AES_128_CBC_SHA256:               "AES128-SHA256",
	tls.TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA:           "ECDHE-RSA-DES-CBC3-SHA",
	tls.TLS_RSA_WITH_3DES_EDE_CBC_SHA:                 "DES-CBC3-SHA",
	tls.TLS_ECDHE_ECDSA_WITH_RC4_128_SHA:              "ECDHE-ECDSA-RC4-SHA",
	tls.TLS_ECDHE_RSA_WITH_RC4_128_SHA:                "ECDHE-RSA-RC4-SHA",
	tls.TLS_RSA_WITH_RC4_128_SHA:                      "RC4-SHA",
}
