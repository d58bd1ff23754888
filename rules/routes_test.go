package rules

import (
	"strings"
	"testing"
)

func TestRouteParse(t *testing.T) {
	for _, tc := range []struct{ in, canon string }{
		{"tcp 0.0.0.0:443 -> 127.0.0.1:8443 sni=A.Example.com.,*.b.example.COM alpn=h2,acme-tls/1",
			"tcp 0.0.0.0:443 -> 127.0.0.1:8443 sni=a.example.com,*.b.example.com alpn=h2,acme-tls/1"},
		{"tcp 0.0.0.0:443 -> 127.0.0.1:8443 weak alpn=http/1.1", "tcp 0.0.0.0:443 -> 127.0.0.1:8443 alpn=http/1.1 weak"},
	} {
		r, err := Parse(tc.in)
		if err != nil {
			t.Fatalf("%q: %v", tc.in, err)
		}
		if got := r.String(); got != tc.canon {
			t.Errorf("%q: canonical %q, want %q", tc.in, got, tc.canon)
		}
	}
	r, _ := Parse("tcp 0.0.0.0:443 -> 127.0.0.1:8443 sni=a.example.com send-proxy=v2")
	if got := r.RouteString(); got != "tcp 0.0.0.0:443 sni=a.example.com" {
		t.Errorf("RouteString = %q", got)
	}
	for _, tc := range []struct{ in, want string }{
		{"tcp 0.0.0.0:443 -> 127.0.0.1:1 sni=", "needs a value"},
		{"tcp 0.0.0.0:443 -> 127.0.0.1:1 sni=a..b", "labels are 1 to 63"},
		{"tcp 0.0.0.0:443 -> 127.0.0.1:1 sni=a.*.b", "first label"},
		{"tcp 0.0.0.0:443 -> 127.0.0.1:1 sni=*.", "label"},
		{"tcp 0.0.0.0:443 -> 127.0.0.1:1 sni=a,A.", "given twice"},
		{"tcp 0.0.0.0:443 -> 127.0.0.1:1 alpn=h2,,x", "1 to 255 bytes"},
		{"tcp 0.0.0.0:443 -> 127.0.0.1:1 alpn=h2,h2", "given twice"},
		{"udp 0.0.0.0:443 -> 127.0.0.1:1 sni=a", "tcp rules only"},
		{"tcp 0.0.0.0:443 health=tcp sni=a", "needs a target"},
		{"tcp 0.0.0.0:443 -> 127.0.0.1:1 sni=" + strings.Repeat("a", 64), "1 to 63"},
	} {
		if _, err := Parse(tc.in); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: err = %v, want %q", tc.in, err, tc.want)
		}
	}
}

func TestRouteTable(t *testing.T) {
	good := `tcp 0.0.0.0:443 -> 127.0.0.1:1 sni=a.example.com maxconn=5
tcp 0.0.0.0:443 -> 127.0.0.1:2 sni=a.example.com alpn=h2 maxconn=5
tcp 0.0.0.0:443 -> 127.0.0.1:3 sni=*.example.com maxconn=5 send-proxy=v2
tcp 0.0.0.0:443 -> 127.0.0.1:4 maxconn=5
tcp 0.0.0.0:443 -> 127.0.0.1:5 alpn=acme-tls/1 maxconn=5
tcp 0.0.0.0:444 -> 127.0.0.1:5
`
	es, err := ParseFile("r", []byte(good))
	if err != nil {
		t.Fatal(err)
	}
	gs := RouteGroups(RulesOf(es))
	if len(gs) != 2 || len(gs[0]) != 5 || len(gs[1]) != 1 {
		t.Fatalf("groups = %v", gs)
	}
	d := TableDiff(RulesOf(es), RulesOf(es[:2]))
	if len(d.Kept) != 1 || len(d.Added) != 0 || len(d.Removed) != 1 {
		t.Fatalf("diff = %+v", d)
	}

	bad := `tcp 0.0.0.0:443 -> 127.0.0.1:1 sni=a.example.com
tcp 0.0.0.0:443 -> 127.0.0.1:2 sni=b.example.com,a.example.com
tcp 0.0.0.0:443 -> 127.0.0.1:3 sni=c.example.com alpn=h2,x
tcp 0.0.0.0:443 -> 127.0.0.1:3 sni=c.example.com alpn=x
tcp 0.0.0.0:443 -> 127.0.0.1:4
tcp 0.0.0.0:443 -> 127.0.0.1:5
tcp 0.0.0.0:443 -> 127.0.0.1:6 sni=d.example.com rate=5/s
tcp 0.0.0.0:440-450 -> 127.0.0.1:7 sni=e.example.com
`
	_, err = ParseFile("r", []byte(bad))
	want := []string{
		"r:2: route of tcp 0.0.0.0:443 clashes with line 1: both match sni a.example.com without alpn=",
		"r:4: route of tcp 0.0.0.0:443 clashes with line 3: both match sni c.example.com with alpn x",
		"r:6: route of tcp 0.0.0.0:443 clashes with line 5: both are the default route",
		"r:7: routes of tcp 0.0.0.0:443 must agree on rate: this rule and line 1 differ",
		"r:8: listen tcp 0.0.0.0:443 is also line",
	}
	list, _ := err.(ErrorList)
	if len(list) != len(want) {
		t.Fatalf("errors:\n%v", err)
	}
	for i, w := range want {
		if !strings.HasPrefix(list[i].Error(), w) {
			t.Errorf("error %d = %q, want %q", i, list[i], w)
		}
	}
}

func TestRouterChoose(t *testing.T) {
	rs := mustParse(t,
		"tcp 0.0.0.0:443 -> 127.0.0.1:1 sni=a.example.com",
		"tcp 0.0.0.0:443 -> 127.0.0.1:2 sni=a.example.com alpn=h2",
		"tcp 0.0.0.0:443 -> 127.0.0.1:3 sni=*.example.com",
		"tcp 0.0.0.0:443 -> 127.0.0.1:4 sni=*.b.example.com alpn=h2",
		"tcp 0.0.0.0:443 -> 127.0.0.1:5 alpn=acme-tls/1",
		"tcp 0.0.0.0:443 -> 127.0.0.1:6",
	)
	rt := NewRouter(rs)
	b := func(ss ...string) [][]byte {
		var out [][]byte
		for _, s := range ss {
			out = append(out, []byte(s))
		}
		return out
	}
	for _, tc := range []struct {
		name string
		alpn [][]byte
		want int
	}{
		{"a.example.com", nil, 0},
		{"A.Example.COM.", b("http/1.1", "h2"), 1},
		{"x.example.com", b("h2"), 2},
		{"example.com", nil, 5},
		{"x.b.example.com", b("h2"), 3},
		{"y.x.b.example.com", nil, 2}, // the longer wildcard wants h2: the next level
		{"other.org", b("acme-tls/1"), 4},
		{"", b("acme-tls/1"), 4},
		{"", nil, 5},
	} {
		var name []byte
		if tc.name != "" {
			name = []byte(tc.name)
		}
		if got := rt.Choose(name, tc.alpn); got != tc.want {
			t.Errorf("Choose(%q, %q) = %d, want %d", tc.name, tc.alpn, got, tc.want)
		}
	}
	if rt.Default() != 5 {
		t.Errorf("Default = %d", rt.Default())
	}
	nodef := NewRouter(rs[:2])
	if nodef.Choose([]byte("b.example.com"), nil) != -1 || nodef.Default() != -1 {
		t.Error("a key without a default route chose one")
	}
	name, h2 := []byte("y.x.b.example.com"), b("h2")
	if n := testing.AllocsPerRun(100, func() { rt.Choose(name, h2) }); n > 0 {
		t.Errorf("Choose allocates %v times", n)
	}
}

func TestParseName(t *testing.T) {
	good := map[string]string{
		"tcp 127.0.0.1:8090":                        "tcp 127.0.0.1:8090",
		"  tcp   127.0.0.1:8090  ":                  "tcp 127.0.0.1:8090",
		"udp ns1/[::]:53":                           "udp ns1/[::]:53",
		"tcp host/0.0.0.0:80":                       "tcp 0.0.0.0:80",
		"tcp 0.0.0.0:8000-8009":                     "tcp 0.0.0.0:8000-8009",
		"tcp [::ffff:1.2.3.4]:1":                    "tcp 1.2.3.4:1",
		"tcp 0.0.0.0:443 alpn=h2 sni=A.example.com": "tcp 0.0.0.0:443 sni=a.example.com alpn=h2",
	}
	for in, want := range good {
		if got, err := ParseName(in); err != nil || got != want {
			t.Errorf("ParseName(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", "tcp", "sctp 1.2.3.4:1", "tcp 1.2.3.4", "tcp 1.2.3.4:1 -> 1.2.3.4:2",
		"tcp 1.2.3.4:1 health", "tcp 1.2.3.4:1 sni=", "tcp 1.2.3.4:1 sni=a sni=b", "tcp 1.2.3.4:1:2"} {
		if got, err := ParseName(in); err == nil {
			t.Errorf("ParseName(%q) = %q, want an error", in, got)
		}
	}
	// Every rule's name parses to itself.
	for _, tc := range goodLines {
		r, err := Parse(tc.in)
		if err != nil {
			continue
		}
		if got, err := ParseName(r.RouteString()); err != nil || got != r.RouteString() {
			t.Errorf("ParseName(%q) = %q, %v", r.RouteString(), got, err)
		}
	}
}

func FuzzParseName(f *testing.F) {
	f.Add("tcp 127.0.0.1:8090")
	f.Add("udp ns1/[::]:53-60")
	f.Add("tcp 0.0.0.0:443 sni=*.a.example,b alpn=h2")
	f.Fuzz(func(t *testing.T, s string) {
		canon, err := ParseName(s)
		if err != nil {
			return
		}
		again, err := ParseName(canon)
		if err != nil || again != canon {
			t.Fatalf("ParseName(%q) = %q, then %q, %v", s, canon, again, err)
		}
	})
}
