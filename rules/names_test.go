package rules

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"
)

var nameLines = []lineCase{
	{"tcp 0.0.0.0:80 -> web:80", ""},
	{"tcp 0.0.0.0:80 -> Web.Internal.:80,10.0.0.1:80 resolve=5s", "tcp 0.0.0.0:80 -> web.internal:80,10.0.0.1:80 resolve=5s"},
	{"tcp 0.0.0.0:80 -> ns1/db-1.example.com:5432 resolve=off check=tcp", "tcp 0.0.0.0:80 -> ns1/db-1.example.com:5432 check=tcp resolve=off"},
	{"tcp 0.0.0.0:8000-8009 -> web:9000-9009 resolve=1m", ""},
}

func TestNamesRoundTrip(t *testing.T) {
	roundTrip(t, nameLines)
	r, _ := Parse("tcp 0.0.0.0:8000-8001 -> web:9000-9001,10.0.0.1:80,web:7000")
	if h := r.Hosts(); len(h) != 1 || h[0] != "web" || r.ResolveEvery() != DefaultResolve {
		t.Errorf("Hosts %v every %s", h, r.ResolveEvery())
	}
	lookup := func(host string) []netip.Addr {
		return []netip.Addr{netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("::ffff:10.0.0.2")}
	}
	got := r.TargetForAddrs(1, lookup)
	want := []netip.AddrPort{netip.MustParseAddrPort("10.0.0.1:9001"), netip.MustParseAddrPort("10.0.0.2:9001"),
		netip.MustParseAddrPort("10.0.0.1:80"), netip.MustParseAddrPort("10.0.0.1:7000"), netip.MustParseAddrPort("10.0.0.2:7000")}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("TargetForAddrs = %v, want %v", got, want)
	}
	if got := r.TargetFor(0); len(got) != 1 {
		t.Errorf("TargetFor without lookup = %v, want the address target only", got)
	}
	if r, _ := Parse("tcp 0.0.0.0:80 -> web:80 resolve=off"); r.ResolveEvery() != 0 {
		t.Error("resolve=off resolves again")
	}
	if r, _ := Parse("tcp 0.0.0.0:80 -> web:80 resolve=2s"); r.ResolveEvery() != 2*time.Second {
		t.Error("resolve=2s")
	}
}

func TestNameErrors(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"tcp 0.0.0.0:80 -> 10.0.0.1:80 resolve=5s", "no host name"},
		{"tcp 0.0.0.0:80 -> web:80 resolve=100ms", "at least 1s"},
		{"tcp 0.0.0.0:80 -> web:80 resolve=never", "want a duration"},
		{"tcp 0.0.0.0:80 -> web:80 resolve", "needs a value"},
		{"tcp 0.0.0.0:80 -> -web:80", "or a host name"},
		{"tcp 0.0.0.0:80 -> we_b:80", "or a host name"},
		{"tcp 0.0.0.0:80 -> 1.2.3:80", "or a host name"},
		{"tcp 0.0.0.0:80 -> web:0", "port 0"},
		{"tcp web:80 -> 10.0.0.1:80", "want an IP address"},
		{"tcp 0.0.0.0:80 -> " + strings.Repeat("a", 64) + ":80", "or a host name"},
	} {
		if _, err := Parse(tc.in); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Parse(%q) = %v, want %q", tc.in, err, tc.want)
		}
	}
}
