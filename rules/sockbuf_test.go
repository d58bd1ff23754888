package rules

import (
	"strings"
	"testing"
)

// sockbuf= sizes in every unit, to their canonical word and back.
func TestSockBufValues(t *testing.T) {
	for _, tc := range []struct {
		in    string
		bytes int
		canon string
	}{
		{"4k", 4 << 10, "4k"}, {"4096", 4 << 10, "4k"}, {"5000", 5000, "5000"}, {"2048k", 2 << 20, "2m"},
		{"1m", 1 << 20, "1m"}, {"64m", 64 << 20, "64m"}, {"auto", SockBufAuto, "auto"},
	} {
		n, err := parseSockBuf(tc.in)
		if err != nil || n != tc.bytes || FormatSockBuf(n) != tc.canon {
			t.Errorf("sockbuf=%s: %d (%v), canonical %q; want %d, %q", tc.in, n, err, FormatSockBuf(n), tc.bytes, tc.canon)
		}
	}
	for _, bad := range []string{"4095", "0", "0k", "k", "m", "1.5m", "65537k", "1M", "1g", "-1", " 4k", "auto ", "9999999999999999999m"} {
		if n, err := parseSockBuf(bad); err == nil {
			t.Errorf("sockbuf=%s accepted as %d", bad, n)
		}
	}
}

// The listening socket's buffers are shared by every route of its key (the
// accepted sockets inherit them): routes must agree on sockbuf.
func TestRoutesAgreeOnSockBuf(t *testing.T) {
	_, err := ParseFile("r", []byte(`tcp 0.0.0.0:443 -> 127.0.0.1:1 sni=a.example.com sockbuf=64k
tcp 0.0.0.0:443 -> 127.0.0.1:2 sockbuf=128k
`))
	if err == nil || !strings.Contains(err.Error(), "must agree on sockbuf") {
		t.Fatalf("routes with two sockbuf sizes: %v", err)
	}
	if _, err := ParseFile("r", []byte(`tcp 0.0.0.0:443 -> 127.0.0.1:1 sni=a.example.com sockbuf=64k
tcp 0.0.0.0:443 -> 127.0.0.1:2 sockbuf=64k
`)); err != nil {
		t.Fatal(err)
	}
}
