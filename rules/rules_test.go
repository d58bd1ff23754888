package rules

import (
	"fmt"
	"net/netip"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"
)

// lineCase is a line that parses, and its canonical form ("" = the line is
// canonical).
type lineCase struct{ in, canon string }

// Lines that parse, and their canonical form.
var goodLines = []lineCase{
	{"tcp 0.0.0.0:8080 -> 127.0.0.1:80", ""},
	{"tcp 0.0.0.0:8080 -> 127.0.0.1:80 send-proxy=v2", ""},
	{"tcp 0.0.0.0:8081 health=http", ""},
	{"tcp [::]:8000-8010 -> [::1]:9000-9010", ""},
	{"tcp ns1/10.0.0.1:80 -> host/127.0.0.1:8080", "tcp ns1/10.0.0.1:80 -> 127.0.0.1:8080"},
	{"tcp host/0.0.0.0:80 -> ns1/10.0.0.2:80", "tcp 0.0.0.0:80 -> ns1/10.0.0.2:80"},
	{"tcp 127.0.0.1:0 -> 127.0.0.1:1", ""},
	{"udp 0.0.0.0:53 -> 10.0.0.53:53 timeout.idle=30s", ""},
	{"tcp 0.0.0.0:8000-8099 -> 127.0.0.1:9000", ""},
	{"tcp 0.0.0.0:80 -> 10.0.0.1:80,10.0.0.2:80,[2001:db8::1]:8080 balance=leastconn", ""},
	{"  tcp\t0.0.0.0:80   ->  10.0.0.1:80  weak  ", "tcp 0.0.0.0:80 -> 10.0.0.1:80 weak"},
	{"tcp 0.0.0.0:443 -> 127.0.0.1:8443 splice=auto balance=roundrobin", "tcp 0.0.0.0:443 -> 127.0.0.1:8443"},
	{"tcp 0.0.0.0:80 -> 127.0.0.1:8080 sockbuf=256k", ""},
	{"tcp 0.0.0.0:80 -> 127.0.0.1:8080 sockbuf=1024k", "tcp 0.0.0.0:80 -> 127.0.0.1:8080 sockbuf=1m"},
	{"tcp 0.0.0.0:80 -> 127.0.0.1:8080 sockbuf=5000 splice=on", "tcp 0.0.0.0:80 -> 127.0.0.1:8080 splice=on sockbuf=5000"},
	{"tcp 0.0.0.0:80 -> 127.0.0.1:8080 sockbuf=auto", ""},
	{"tcp 0.0.0.0:80 -> 127.0.0.1:8080 sockbuf=64m", ""},
	{"tcp 0.0.0.0:443 -> 127.0.0.1:8443 timeout.idle=60s timeout.connect=1500ms",
		"tcp 0.0.0.0:443 -> 127.0.0.1:8443 timeout.connect=1.5s timeout.idle=1m"},
	{"tcp 0.0.0.0:80 -> 127.0.0.1:8080 deny=10.1.2.3/8 allow=192.168.1.7 accept-proxy=10.0.0.0/8,fd00::/8",
		"tcp 0.0.0.0:80 -> 127.0.0.1:8080 accept-proxy=10.0.0.0/8,fd00::/8 allow=192.168.1.7/32 deny=10.0.0.0/8"},
	{"tcp 0.0.0.0:80 -> 127.0.0.1:8080 accept-proxy", ""},
	{"tcp 0.0.0.0:80 -> 127.0.0.1:8080 health=http monitor=10.0.0.0/8", ""},
	{"tcp 0.0.0.0:80 -> 127.0.0.1:8080 monitor=10.0.0.0/8", ""},
	{"tcp 0.0.0.0:80 -> 127.0.0.1:8080 rate=100/s maxconn=1000 splice=on send-proxy=v1 timeout.handshake=2s",
		"tcp 0.0.0.0:80 -> 127.0.0.1:8080 send-proxy=v1 rate=100/s maxconn=1000 splice=on timeout.handshake=2s"},
	{"tcp [::ffff:127.0.0.1]:80 -> [::ffff:10.0.0.1]:81", "tcp 127.0.0.1:80 -> 10.0.0.1:81"},
	{"tcp 0.0.0.0:80 -> 127.0.0.1:8080 timeout.idle=2h0m0s", "tcp 0.0.0.0:80 -> 127.0.0.1:8080 timeout.idle=2h"},
}

func TestParseCanonicalRoundTrip(t *testing.T) { roundTrip(t, goodLines) }

// roundTrip checks that each case parses, prints as its canonical form, and
// parses back to the same rule.
func roundTrip(t *testing.T, cases []lineCase) {
	t.Helper()
	for _, tc := range cases {
		r, err := Parse(tc.in)
		if err != nil {
			t.Errorf("Parse(%q): %v", tc.in, err)
			continue
		}
		want := tc.canon
		if want == "" {
			want = tc.in
		}
		got := r.String()
		if got != want {
			t.Errorf("Parse(%q).String() = %q, want %q", tc.in, got, want)
		}
		r2, err := Parse(got)
		if err != nil {
			t.Errorf("Parse(canonical %q): %v", got, err)
			continue
		}
		if !reflect.DeepEqual(r, r2) {
			t.Errorf("round trip of %q differs:\n%#v\n%#v", tc.in, r, r2)
		}
	}
}

func TestParseModel(t *testing.T) {
	r, err := Parse("tcp ns1/[::]:8000-8002 -> host/10.0.0.1:9000-9002,10.0.0.2:7000 weak timeout.connect=2s")
	if err != nil {
		t.Fatal(err)
	}
	want := &Rule{
		Proto: TCP, ListenPif: "ns1", ListenAddr: netip.IPv6Unspecified(), ListenPorts: PortRange{8000, 8002},
		Targets: []Target{
			{Addr: netip.MustParseAddr("10.0.0.1"), Ports: PortRange{9000, 9002}},
			{Addr: netip.MustParseAddr("10.0.0.2"), Ports: PortRange{7000, 7000}},
		},
		Weak: true, ConnectTimeout: 2 * time.Second,
	}
	if !reflect.DeepEqual(r, want) {
		t.Fatalf("got %#v\nwant %#v", r, want)
	}
	keys := r.ListenKeys()
	if len(keys) != 3 || keys[2].Port != 8002 || keys[0].Pif != "ns1" || keys[0].String() != "tcp ns1/[::]:8000" {
		t.Fatalf("ListenKeys = %v", keys)
	}
	pool := r.TargetFor(2)
	if len(pool) != 2 || pool[0].String() != "10.0.0.1:9002" || pool[1].String() != "10.0.0.2:7000" {
		t.Fatalf("TargetFor(2) = %v", pool)
	}
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", "empty rule"},
		{"tcp", "want PROTO LISTEN"},
		{"sctp 0.0.0.0:80 -> 1.2.3.4:80", `unknown protocol "sctp"`},
		{"tcp 0.0.0.0:9000-8000 -> 1.2.3.4:80", "port range 9000-8000 is reversed"},
		{"tcp 0.0.0.0:80 -> 1.2.3.4:90-80", "port range 90-80 is reversed"},
		{"tcp 0.0.0.0:8000-8099 -> 1.2.3.4:9000-9010", "target range 9000-9010 has 11 ports but the listen range 8000-8099 has 100"},
		{"tcp 0.0.0.0:80 -> 1.2.3.4:80 frobnicate", `unknown option "frobnicate"`},
		{"tcp 0.0.0.0:80 -> 1.2.3.4:80 splice=maybe", "splice=maybe: want auto, on or off"},
		{"tcp 0.0.0.0:80 -> 1.2.3.4:80 splice=on splice=off", `option "splice" given twice`},
		{"tcp 0.0.0.0:80 -> 1.2.3.4:80 weak=yes", "option weak takes no value"},
		{"tcp 0.0.0.0:80 -> 1.2.3.4:80 send-proxy", "option send-proxy needs a value"},
		{"tcp 0.0.0.0:80 -> 1.2.3.4:80 send-proxy=v3", "send-proxy=v3: want v1 or v2"},
		{"tcp 0.0.0.0:80 -> 1.2.3.4:80 rate=100", "rate=100: want N/s"},
		{"tcp 0.0.0.0:80 -> 1.2.3.4:80 sockbuf=1k", "sockbuf=1k: want auto or a size from 4k to 64m"},
		{"tcp 0.0.0.0:80 -> 1.2.3.4:80 sockbuf=65m", "sockbuf=65m: want auto"},
		{"tcp 0.0.0.0:80 -> 1.2.3.4:80 sockbuf=-4k", "sockbuf=-4k: want auto"},
		{"tcp 0.0.0.0:80 -> 1.2.3.4:80 sockbuf=+8k", "sockbuf=+8k: want auto"},
		{"tcp 0.0.0.0:80 -> 1.2.3.4:80 sockbuf=1g", "sockbuf=1g: want auto"},
		{"tcp 0.0.0.0:80 -> 1.2.3.4:80 sockbuf=", "option sockbuf needs a value"},
		{"udp 0.0.0.0:53 -> 1.2.3.4:53 sockbuf=64k", "option sockbuf is for tcp rules only"},
		{"tcp 0.0.0.0:80 health=tcp sockbuf=64k", "option sockbuf needs a target"},
		{"tcp 0.0.0.0:80 -> 1.2.3.4:80 rate=0/s", "want a whole number"},
		{"tcp 0.0.0.0:80 -> 1.2.3.4:80 maxconn=-1", "want a whole number"},
		{"tcp 0.0.0.0:80 -> 1.2.3.4:80 timeout.idle=5", "want a duration"},
		{"tcp 0.0.0.0:80 -> 1.2.3.4:80 timeout.idle=-1s", "above 0"},
		{"tcp 0.0.0.0:80 -> 1.2.3.4:80 allow=10.0.0.0/33", `"10.0.0.0/33" is not a CIDR prefix`},
		{"tcp 0.0.0.0:80 -> 1.2.3.4:80 accept-proxy=", "needs a value"},
		{"tcp 0.0.0.0:80", "no target"},
		{"tcp 0.0.0.0:80 ->", "no target after it"},
		{"tcp 0.0.0.0:80 health=tcp splice=on", "option splice needs a target"},
		{"tcp 0.0.0.0:80 -> 1.2.3.4:80 health=http", "monitor=CIDR"},
		{"udp 0.0.0.0:53 -> 1.2.3.4:53 accept-proxy", "option accept-proxy is for tcp rules only"},
		{"tcp ::1:80 -> 1.2.3.4:80", "must be in brackets"},
		{"tcp [::1:80 -> 1.2.3.4:80", `missing "]"`},
		{"tcp [127.0.0.1]:80 -> 1.2.3.4:80", "takes no brackets"},
		{"tcp localhost:80 -> 1.2.3.4:80", "want an IP address"},
		{"tcp [fe80::1%eth0]:80 -> 1.2.3.4:80", "zones are not supported"},
		{"tcp 0.0.0.0:65536 -> 1.2.3.4:80", `port "65536"`},
		{"tcp 0.0.0.0:080 -> 1.2.3.4:80", `port "080"`},
		{"tcp 0.0.0.0: -> 1.2.3.4:80", "missing port"},
		{"tcp 0.0.0.0:0-10 -> 1.2.3.4:80", "port 0 (any free port) cannot start a range"},
		{"tcp 0.0.0.0:80 -> 1.2.3.4:0", "port 0 is not a port to connect to"},
		{"tcp 0.0.0.0:80 -> 0.0.0.0:80", "unspecified address"},
		{"tcp bad pif/0.0.0.0:80 -> 1.2.3.4:80", `listen "bad": want ADDR:PORT`},
		{"tcp n$s/0.0.0.0:80 -> 1.2.3.4:80", `pif name "n$s"`},
		{"tcp /0.0.0.0:80 -> 1.2.3.4:80", "empty pif name"},
		{"tcp 0.0.0.0:1-4097 -> 1.2.3.4:80", "at most 4096 allowed"},
		{"tcp 0.0.0.0:80 -> " + strings.Repeat("1.2.3.4:80,", 64) + "1.2.3.4:80", "more than 64 backends"},
		{"tcp 0.0.0.0:80 -> 1.2.3.4:80 " + strings.Repeat("x", MaxLineLen), "bytes long"},
	} {
		_, err := Parse(tc.in)
		if err == nil {
			t.Errorf("Parse(%q): no error, want %q", tc.in, tc.want)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Parse(%q) = %q, want it to say %q", tc.in, err, tc.want)
		}
	}
}

func TestParseForward(t *testing.T) {
	r, err := ParseForward("127.0.0.1:8080", "127.0.0.1:80", []string{"splice=on", "send-proxy=v2"})
	if err != nil {
		t.Fatal(err)
	}
	if got := r.String(); got != "tcp 127.0.0.1:8080 -> 127.0.0.1:80 send-proxy=v2 splice=on" {
		t.Fatalf("got %q", got)
	}
	for _, bad := range [][]string{{"127.0.0.1:8080 -> x", "1.2.3.4:80"}, {"", "1.2.3.4:80"}} {
		if _, err := ParseForward(bad[0], bad[1], nil); err == nil {
			t.Errorf("ParseForward(%q): no error", bad)
		}
	}
}

func TestParseFile(t *testing.T) {
	src := `# a comment
tcp 0.0.0.0:8080 -> 127.0.0.1:80   # trailing comment

tcp 0.0.0.0:9000-8000 -> 127.0.0.1:80
tcp 0.0.0.0:8080 -> 127.0.0.1:81
tcp 127.0.0.1:8000-8010 -> 127.0.0.1:81
tcp 0.0.0.0:8005 -> 127.0.0.1:81
tcp [::]:8080 -> 127.0.0.1:81
udp 0.0.0.0:8080 -> 127.0.0.1:81
tcp ns1/0.0.0.0:8080 -> 127.0.0.1:81
bogus
`
	_, err := ParseFile("rules.txt", []byte(src))
	list, ok := err.(ErrorList)
	if !ok {
		t.Fatalf("err = %v (%T), want an ErrorList", err, err)
	}
	want := []string{
		"rules.txt:4: port range 9000-8000 is reversed",
		"rules.txt:5: listen tcp 0.0.0.0:8080 is also line 2's",
		"rules.txt:7: listen tcp 0.0.0.0:8005 overlaps line 6 (tcp 127.0.0.1:8000-8010)",
		"rules.txt:11: rule \"bogus\"",
	}
	if len(list) != len(want) {
		t.Fatalf("got %d errors, want %d:\n%v", len(list), len(want), err)
	}
	for i, w := range want {
		if !strings.HasPrefix(list[i].Error(), w) {
			t.Errorf("error %d = %q, want it to start %q", i, list[i], w)
		}
	}

	good := "tcp 0.0.0.0:8080 -> 127.0.0.1:80\n\ntcp 0.0.0.0:8081 health=tcp\n"
	entries, err := ParseFile("ok", []byte(good))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 2 || entries[1].Line != 3 {
		t.Fatalf("entries = %+v", entries)
	}
	rs := []*Rule{entries[0].Rule, entries[1].Rule}
	if got := Format(rs); got != "tcp 0.0.0.0:8080 -> 127.0.0.1:80\ntcp 0.0.0.0:8081 health=tcp\n" {
		t.Fatalf("Format = %q", got)
	}
}

func TestValidateTableLimits(t *testing.T) {
	var rs []*Rule
	for i := 0; i < MaxPorts/MaxPortsPerRule+1; i++ {
		first := uint16(1 + i*MaxPortsPerRule)
		rs = append(rs, &Rule{Proto: TCP, ListenAddr: netip.MustParseAddr("127.0.0.1"),
			ListenPorts: PortRange{first, first + MaxPortsPerRule - 1}})
	}
	errs := ValidateTable(rs, nil)
	if len(errs) != 1 || !strings.Contains(errs[0].Msg, "more than 16384 ports") || errs[0].Index != len(rs)-1 {
		t.Fatalf("errs = %+v", errs)
	}
	// Routes of one key count its ports once: five routes of a full-size
	// range are 4 096 ports, not 20 480.
	var routes []*Rule
	for i := 0; i < 5; i++ {
		routes = append(routes, &Rule{Proto: TCP, ListenAddr: netip.MustParseAddr("127.0.0.1"),
			ListenPorts: PortRange{1, MaxPortsPerRule}, Targets: []Target{{Addr: netip.MustParseAddr("127.0.0.1"), Ports: PortRange{uint16(i + 1), uint16(i + 1)}}},
			SNI: []string{fmt.Sprintf("n%d.example.com", i)}})
	}
	for _, e := range ValidateTable(routes, nil) {
		if strings.Contains(e.Msg, "more than") {
			t.Fatalf("routes of one key: %+v", e)
		}
	}
}

// Every enum value has a name; an unknown one says it is unknown.
func TestEnumNames(t *testing.T) {
	for _, s := range []interface{ String() string }{TCP, UDP, SpliceAuto, SpliceOn, SpliceOff,
		BalanceRoundRobin, BalanceLeastConn, BalanceSource, HealthNone, HealthTCP, HealthHTTP,
		ProxyNone, ProxyV1, ProxyV2} {
		if n := s.String(); n == "" || strings.ContainsAny(n, "-0123456789") && n != "v1" && n != "v2" {
			t.Errorf("%#v has no name: %q", s, n)
		}
	}
	if Proto(9).String() != "proto-9" || SpliceMode(9).String() != "splice-9" {
		t.Error("unknown values must say so")
	}
}

func FuzzParse(f *testing.F) {
	for _, tc := range goodLines {
		f.Add(tc.in)
	}
	f.Add("tcp [::]:1-65535 -> 1.2.3.4:1")
	f.Add("udp a/1.2.3.4:5 -> b/[::1]:6 rate=1/s")
	f.Add("tcp 0.0.0.0:443 -> 127.0.0.1:1 sni=A.b.,*.c alpn=h2,x")
	for _, tc := range checkLines {
		f.Add(tc.in)
	}
	for _, tc := range nameLines {
		f.Add(tc.in)
	}
	f.Add("tcp 127.0.0.1:1 -> 127.0.0.1:2 sockbuf=1024k")
	f.Add("tcp 127.0.0.1:1 -> 127.0.0.1:2 sockbuf=auto")
	for _, tc := range tlsLines {
		f.Add(tc.in)
	}
	f.Fuzz(func(t *testing.T, line string) {
		r, err := Parse(line)
		if err != nil {
			return
		}
		canon := r.String()
		r2, err := Parse(canon)
		if err != nil {
			t.Fatalf("canonical %q of %q does not parse: %v", canon, line, err)
		}
		if !reflect.DeepEqual(r, r2) {
			t.Fatalf("round trip of %q via %q differs:\n%#v\n%#v", line, canon, r, r2)
		}
		if c2 := r2.String(); c2 != canon {
			t.Fatalf("canonical form not stable: %q then %q", canon, c2)
		}
	})
}

func mustParse(t *testing.T, lines ...string) []*Rule {
	t.Helper()
	var rs []*Rule
	for _, l := range lines {
		r, err := Parse(l)
		if err != nil {
			t.Fatalf("%q: %v", l, err)
		}
		rs = append(rs, r)
	}
	return rs
}

func TestTableDiff(t *testing.T) {
	old := mustParse(t,
		"tcp 0.0.0.0:80 -> 10.0.0.1:80",
		"tcp 0.0.0.0:8000-8002 -> 10.0.0.1:9000",
		"udp 0.0.0.0:53 -> 10.0.0.53:53")
	new := mustParse(t,
		"tcp 0.0.0.0:80 -> 10.0.0.2:80 send-proxy=v2", // same key, new target: kept
		"tcp 0.0.0.0:8001-8003 -> 10.0.0.1:9000",      // 8001-8002 kept, 8003 added, 8000 removed
		"udp ns1/0.0.0.0:53 -> 10.0.0.53:53")          // another pif: a different key
	d := TableDiff(old, new)
	str := func(ks []Key) string {
		var s []string
		for _, k := range ks {
			s = append(s, k.String())
		}
		return strings.Join(s, ",")
	}
	if got := str(d.Kept); got != "tcp 0.0.0.0:80,tcp 0.0.0.0:8001,tcp 0.0.0.0:8002" {
		t.Errorf("kept %s", got)
	}
	if got := str(d.Added); got != "tcp 0.0.0.0:8003,udp ns1/0.0.0.0:53" {
		t.Errorf("added %s", got)
	}
	if got := str(d.Removed); got != "tcp 0.0.0.0:8000,udp 0.0.0.0:53" {
		t.Errorf("removed %s", got)
	}
	SortKeys(d.Added)
	if d.Added[0].Pif != "" {
		t.Errorf("host keys sort first: %v", d.Added)
	}
}

func TestSummaryVerdict(t *testing.T) {
	rs := mustParse(t, "tcp 0.0.0.0:8080 -> 127.0.0.1:80", "tcp 0.0.0.0:9000-9001 -> 127.0.0.1:80 weak")
	strict, weak := NewResult(rs[0]), NewResult(rs[1])
	weak.Bound = 1
	weak.Failed = []PortError{{Port: 9001, Errno: syscall.EADDRINUSE, Msg: "address already in use"}}
	strict.Bound = 1
	s := Summary{Rules: []RuleResult{strict, weak}}
	if !s.OK() {
		t.Error("a weak rule with one port bound must not fail the verdict")
	}
	if got := s.Failures(); len(got) != 1 || got[0] != "tcp 0.0.0.0:9000-9001: port 9001: address already in use" {
		t.Errorf("failures %q", got)
	}
	s.Rules[1].Bound = 0
	if s.OK() {
		t.Error("a weak rule that bound no port fails the verdict")
	}
	s.Rules[1].Bound = 1
	s.Rules[0].Bound, s.Rules[0].Failed = 0, []PortError{{Port: 8080, Errno: syscall.EADDRINUSE, Msg: "address already in use"}}
	if s.OK() {
		t.Error("a strict rule with a failed port fails the verdict")
	}
}

func TestPifNameRoundTrip(t *testing.T) {
	for _, tc := range []struct{ model, name string }{{"", HostPif}, {"ns1", "ns1"}} {
		if got := PifName(tc.model); got != tc.name {
			t.Errorf("PifName(%q) = %q, want %q", tc.model, got, tc.name)
		}
		if got := ModelPif(tc.name); got != tc.model {
			t.Errorf("ModelPif(%q) = %q, want %q", tc.name, got, tc.model)
		}
	}
}

func TestListenPortCount(t *testing.T) {
	rs := []*Rule{
		{ListenPorts: PortRange{First: 80, Last: 80}},
		{ListenPorts: PortRange{First: 8000, Last: 8009}},
	}
	if n := ListenPortCount(rs); n != 11 {
		t.Errorf("ListenPortCount = %d, want 11", n)
	}
	if n := ListenPortCount(nil); n != 0 {
		t.Errorf("ListenPortCount(nil) = %d, want 0", n)
	}
	// The routes of one key share its sockets: counted once; port-0 rules
	// each bind one.
	var routed []*Rule
	for _, line := range []string{
		"tcp 0.0.0.0:8000-8009 -> 127.0.0.1:1 sni=a.example.com",
		"tcp 0.0.0.0:8000-8009 -> 127.0.0.1:2 sni=b.example.com",
		"tcp 0.0.0.0:8000-8009 -> 127.0.0.1:3",
		"tcp 127.0.0.1:0 -> 127.0.0.1:4",
		"tcp 127.0.0.1:0 -> 127.0.0.1:5",
	} {
		r, err := Parse(line)
		if err != nil {
			t.Fatal(err)
		}
		routed = append(routed, r)
	}
	if n := ListenPortCount(routed); n != 12 {
		t.Errorf("ListenPortCount of three routes of one 10-port key and two port-0 rules = %d, want 12", n)
	}
	es := []Entry{{Rule: rs[0], Line: 1}, {Rule: rs[1], Line: 3}}
	if got := RulesOf(es); len(got) != 2 || got[0] != rs[0] || got[1] != rs[1] {
		t.Errorf("RulesOf = %v", got)
	}
}

// Parse reports every problem of a line, in the order of its words, each
// naming its word; one problem alone keeps its own text (TestParseErrors).
func TestParseEveryError(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []string // each error, in order, contains it
	}{
		{"tcp 0.0.0.0:80 -> 1.2.3.4:80 splice=maybe send-proxy=v3",
			[]string{"splice=maybe: want auto, on or off", "send-proxy=v3: want v1 or v2"}},
		{"tcp 0.0.0.0:80 -> 1.2.3.4:80 frobnicate rate=100 splice=on splice=off",
			[]string{`unknown option "frobnicate"`, "rate=100: want N/s", `option "splice" given twice`}},
		{"sctp 0.0.0.0:99999 -> 1.2.3.4:80 maxconn=0",
			[]string{`unknown protocol "sctp"`, `port "99999"`, "maxconn=0: want a whole number"}},
		{"tcp 0.0.0.0:80 -> 1.2.3.4 timeout.idle=soon",
			[]string{`target "1.2.3.4"`, "timeout.idle=soon: want a duration"}},
		{"tcp 0.0.0.0:80 -> check.rise=0",
			[]string{`target "check.rise=0"`}},
		// a blank inside LISTEN: the words after it are not options
		{"tcp bad pif/0.0.0.0:80 -> 1.2.3.4:80 splice=maybe", []string{`listen "bad": want ADDR:PORT`}},
		// Validate runs only on a rule whose every word was read ...
		{"udp 0.0.0.0:53 -> 1.2.3.4:53 sockbuf=1k tls.key=/k.pem", []string{"sockbuf=1k: want auto"}},
		// ... and then gives one problem per concern
		{"udp 0.0.0.0:53 -> 1.2.3.4:53 sockbuf=64k check.path=/x tls.key=/k.pem",
			[]string{"option sockbuf is for tcp rules only", "check.* options without check=tcp|http", "tls.key needs tls.cert"}},
		{"tcp 0.0.0.0:80 health=tcp splice=on sni=a.example.com",
			[]string{"option splice needs a target", "a route (sni= or alpn=) needs a target"}},
		{"tcp 0.0.0.0:80", []string{"no target"}},
	} {
		_, err := Parse(tc.in)
		errs := Errors(err)
		if len(errs) != len(tc.want) {
			t.Errorf("Parse(%q): %d errors %q, want %d", tc.in, len(errs), errs, len(tc.want))
			continue
		}
		for i, w := range tc.want {
			if !strings.Contains(errs[i].Error(), w) {
				t.Errorf("Parse(%q): error %d = %q, want it to say %q", tc.in, i, errs[i], w)
			}
		}
		texts := make([]string, len(errs))
		for i, e := range errs {
			texts[i] = e.Error()
		}
		if _, many := err.(LineErrors); many != (len(errs) > 1) || err.Error() != strings.Join(texts, "; ") {
			t.Errorf("Parse(%q) = %q (%T), want one error alone or several joined by \"; \"", tc.in, err, err)
		}
	}
	if Errors(nil) != nil {
		t.Errorf("Errors(nil) = %v", Errors(nil))
	}
}

// A rules file prints each problem of a line at that line.
func TestParseFileEveryError(t *testing.T) {
	src := "tcp 0.0.0.0:8080 -> 127.0.0.1:80 splice=maybe balance=first\n\ntcp 0.0.0.0:81 -> 127.0.0.1:80 rate=1\n"
	_, err := ParseFile("r.rules", []byte(src))
	want := "r.rules:1: splice=maybe: want auto, on or off\n" +
		"r.rules:1: balance=first: want roundrobin, leastconn or source\n" +
		"r.rules:3: rate=1: want N/s, as rate=100/s"
	if err == nil || err.Error() != want {
		t.Errorf("ParseFile:\n%v\nwant\n%s", err, want)
	}
}
