package config

import (
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/rules"
)

// contractExample is the configuration of DESIGN.md's contract, verbatim.
const contractExample = `loops: 0                      # event loops; 0 = one per CPU
log: {level: info, format: console}        # or json
ctl: {socket: /run/sluice/ctl.sock}
metrics: {listen: 127.0.0.1:9901}          # Prometheus /metrics and the status page /
pifs:
  - {name: ns1, netns: /run/netns/ns1}
rules:
  - tcp 0.0.0.0:8080 -> 127.0.0.1:80 send-proxy=v2
  - tcp 0.0.0.0:8081 health=http
`

func TestParseContractExample(t *testing.T) {
	c, err := Parse("sluice.yaml", []byte(contractExample))
	if err != nil {
		t.Fatal(err)
	}
	want := &Config{
		File:    "sluice.yaml",
		Log:     Log{"info", "console"},
		Ctl:     Ctl{"/run/sluice/ctl.sock"},
		Metrics: Metrics{netip.MustParseAddrPort("127.0.0.1:9901")},
		Drain:   DefaultDrain,
		Pifs:    []Pif{{Name: "ns1", Netns: "/run/netns/ns1", Line: 6}},
		Rules: []rules.Entry{
			{Rule: mustRule(t, "tcp 0.0.0.0:8080 -> 127.0.0.1:80 send-proxy=v2"), Line: 8},
			{Rule: mustRule(t, "tcp 0.0.0.0:8081 health=http"), Line: 9},
		},
	}
	if !reflect.DeepEqual(c, want) {
		t.Fatalf("got  %+v\nwant %+v", c, want)
	}
	if c.CtlSocket() != "/run/sluice/ctl.sock" || c.Ports() != 2 || len(c.RuleList()) != 2 {
		t.Fatalf("CtlSocket %q, Ports %d, RuleList %v", c.CtlSocket(), c.Ports(), c.RuleList())
	}
}

func mustRule(t *testing.T, line string) *rules.Rule {
	t.Helper()
	r, err := rules.Parse(line)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestParseSettings(t *testing.T) {
	for _, tc := range []struct {
		src  string
		want func(c *Config)
	}{
		{"", func(c *Config) {}},
		{"# nothing but a comment\n", func(c *Config) {}},
		{"log:\nctl:\nmetrics:\npifs:\nrules:\n", func(c *Config) {}}, // null sections are left out
		{"loops: 4\ndrain: 1m30s\n", func(c *Config) { c.Loops = 4; c.Drain = 90 * time.Second }},
		{"loops: 0x10\n", func(c *Config) { c.Loops = 16 }},
		{"drain: 0s\n", func(c *Config) { c.Drain = 0 }},
		{"busy-poll: 200us\n", func(c *Config) { c.BusyPoll = 200 * time.Microsecond }},
		{"busy-poll: 1s\n", func(c *Config) { c.BusyPoll = time.Second }},
		{"busy-poll: 0s\n", func(c *Config) {}},
		{"log: {level: debug, format: json}\n", func(c *Config) { c.Log = Log{"debug", "json"} }},
		{"log:\n  format: json\n", func(c *Config) { c.Log.Format = "json" }},
		{"metrics: {listen: '[::1]:0'}\n", func(c *Config) { c.Metrics.Listen = netip.MustParseAddrPort("[::1]:0") }},
		{"metrics: {listen: '[::ffff:127.0.0.1]:9901'}\n", func(c *Config) { c.Metrics.Listen = netip.MustParseAddrPort("127.0.0.1:9901") }},
		{"\ufeffloops: 1\n", func(c *Config) { c.Loops = 1 }}, // a byte order mark
		{"log: &l {level: warn}\n", func(c *Config) { c.Log.Level = "warn" }},
	} {
		c, err := Parse("f", []byte(tc.src))
		if err != nil {
			t.Errorf("Parse(%q): %v", tc.src, err)
			continue
		}
		want := Default()
		want.File = "f"
		tc.want(want)
		if !reflect.DeepEqual(c, want) {
			t.Errorf("Parse(%q) = %+v, want %+v", tc.src, c, want)
		}
	}
}

func TestParseRulesAndPifs(t *testing.T) {
	src := `pifs:
  - name: ns-1.a_b
    netns: /proc/1/ns/net
  - {name: ns2, netns: /run/netns/ns2}
rules:
  - tcp ns-1.a_b/0.0.0.0:8000-8009 -> ns2/10.0.0.1:9000-9009
  - "udp [::]:53 -> host/127.0.0.1:5353"
  - >-
    tcp 127.0.0.1:1
    -> 127.0.0.1:2
`
	c, err := Parse("f", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Pifs) != 2 || c.Pifs[0] != (Pif{"ns-1.a_b", "/proc/1/ns/net", 2}) || c.Pifs[1].Line != 4 {
		t.Fatalf("pifs = %+v", c.Pifs)
	}
	var got []string
	for _, e := range c.Rules {
		got = append(got, fmt.Sprintf("%d %s", e.Line, e.Rule))
	}
	want := []string{
		"6 tcp ns-1.a_b/0.0.0.0:8000-8009 -> ns2/10.0.0.1:9000-9009",
		"7 udp [::]:53 -> 127.0.0.1:5353",
		"8 tcp 127.0.0.1:1 -> 127.0.0.1:2",
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("rules:\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if c.Ports() != 12 {
		t.Fatalf("Ports = %d", c.Ports())
	}
}

// Every message, at its line. Each case is one file; want lists every
// error it must give, in order, as "LINE: message".
func TestParseErrors(t *testing.T) {
	long := "/" + strings.Repeat("s", 107)
	var manyPifs strings.Builder
	manyPifs.WriteString("pifs:\n")
	for i := 0; i <= MaxPifs; i++ {
		fmt.Fprintf(&manyPifs, "  - {name: p%d, netns: /x}\n", i)
	}
	for _, tc := range []struct {
		name, src string
		want      []string
	}{
		{"too large", strings.Repeat("#", MaxFileSize+1), []string{fmt.Sprintf("1: file is larger than %d bytes", MaxFileSize)}},
		{"invalid utf-8", "loops: 1\nlog: \xff\n", []string{"2: byte 0xff is not valid UTF-8"}},
		{"control character", "loops: 1\n\nlog: \x01\n", []string{"3: control character U+0001 is not allowed"}},
		{"paragraph separator", "loops: 1\nrules: [\"a\u2029b\"]\n", []string{"2: line separator U+2029 is not allowed"}},
		{"yaml syntax", "loops: 1\nrules: [\n", []string{"2: YAML: did not find expected node content"}},
		{"yaml syntax first line", "log: {level: info\n", []string{"1: YAML: did not find expected ',' or '}'"}},
		{"unknown anchor", "loops: 1\nlog: *nope\n", []string{"2: YAML: unknown anchor 'nope' referenced"}},
		{"second document", "loops: 1\n---\nloops: 2\n", []string{"2: a second YAML document: a configuration is one document"}},
		{"not a mapping", "- tcp 0.0.0.0:80 -> 1.2.3.4:80\n", []string{"1: want a mapping of loops, busy-poll, log, ctl, metrics, state, store, drain, pifs, rules, got a sequence"}},
		{"scalar document", "hello\n", []string{`1: want a mapping of loops, busy-poll, log, ctl, metrics, state, store, drain, pifs, rules, got "hello"`}},
		{"long scalar document", "# a rules file\ntcp 0.0.0.0:80 -> 127.0.0.1:80\ntcp 0.0.0.0:81 -> 127.0.0.1:81\n",
			[]string{`2: want a mapping of loops, busy-poll, log, ctl, metrics, state, store, drain, pifs, rules, got "tcp 0.0.0.0:80 -> 127.0.0.1:80 tcp 0.0.0.0:81 -> 127.0.0.1:8"...`}},
		{"very long scalar", "log: " + strings.Repeat("x", 70) + "\n", []string{`1: log: want a mapping of level, format, got "` + strings.Repeat("x", 60) + `"...`}},
		{"complex key", "? [a]\n: 1\n", []string{"1: want a plain word as a key, got a sequence"}},
		{"duplicate key", "loops: 1\nlog: {}\nloops: 2\n", []string{`3: key "loops" given twice (first at line 1)`}},
		{"unknown key", "loops: 1\nlooops: 2\n", []string{`2: unknown key "looops": want loops, busy-poll, log, ctl, metrics, state, store, drain, pifs or rules`}},
		{"unknown nested key", "log:\n  level: info\n  colour: red\n", []string{`3: log: unknown key "colour": want level or format`}},
		{"duplicate nested key", "log: {level: info, level: warn}\n", []string{`1: log: key "level" given twice (first at line 1)`}},
		{"merge key", "log: &l {level: info}\nctl:\n  <<: *l\n", []string{`3: ctl: unknown key "<<": want socket`}},
		{"loops word", "loops: many\n", []string{`1: loops: want a whole number from 0 (one per CPU) to 1024, got "many"`}},
		{"loops quoted", "loops: '2'\n", []string{`1: loops: want a whole number from 0 (one per CPU) to 1024, got "2"`}},
		{"loops negative", "loops: -1\n", []string{`1: loops: want a whole number from 0 (one per CPU) to 1024, got "-1"`}},
		{"loops too many", "loops: 1025\n", []string{`1: loops: want a whole number from 0 (one per CPU) to 1024, got "1025"`}},
		{"loops float", "loops: 1.5\n", []string{`1: loops: want a whole number from 0 (one per CPU) to 1024, got "1.5"`}},
		{"loops sequence", "loops: [1]\n", []string{`1: loops: want a whole number from 0 (one per CPU) to 1024, got a sequence`}},
		{"log scalar", "log: info\n", []string{`1: log: want a mapping of level, format, got "info"`}},
		{"log level", "log: {level: verbose}\n", []string{`1: log.level: want debug, info, warn or error, got "verbose"`}},
		{"log level mapping", "log:\n  level: {a: 1}\n", []string{`2: log.level: want debug, info, warn or error, got a mapping`}},
		{"log format", "log: {format: xml}\n", []string{`1: log.format: want console or json, got "xml"`}},
		{"state relative", "state: {dir: var/sluice}\n", []string{`1: state.dir: want an absolute path, got "var/sluice"`}},
		{"state unknown key", "state: {path: /x}\n", []string{`1: state: unknown key "path": want dir`}},
		{"ctl relative", "ctl: {socket: ctl.sock}\n", []string{`1: ctl.socket: want an absolute path, got "ctl.sock"`}},
		{"ctl empty", "ctl: {socket: ''}\n", []string{`1: ctl.socket: want an absolute path, got ""`}},
		{"ctl sequence", "ctl: {socket: [a]}\n", []string{`1: ctl.socket: want an absolute path, got a sequence`}},
		{"ctl too long", "ctl: {socket: " + long + "}\n", []string{"1: ctl.socket: path is 108 bytes long, a unix socket path has at most 107"}},
		{"metrics no listen", "metrics: {}\n", []string{"1: metrics: no listen address (metrics: {listen: 127.0.0.1:9901}); leave metrics out for no endpoint"}},
		{"metrics scalar", "metrics: 127.0.0.1:9901\n", []string{`1: metrics: want a mapping of listen, got "127.0.0.1:9901"`}},
		{"metrics host name", "metrics: {listen: 'localhost:9901'}\n", []string{`1: metrics.listen: want IP:PORT such as 127.0.0.1:9901 or [::1]:9901, got "localhost:9901"`}},
		{"metrics no port", "metrics: {listen: 127.0.0.1}\n", []string{`1: metrics.listen: want IP:PORT such as 127.0.0.1:9901 or [::1]:9901, got "127.0.0.1"`}},
		{"metrics zone", "metrics: {listen: '[fe80::1%eth0]:9901'}\n", []string{`1: metrics.listen: want IP:PORT such as 127.0.0.1:9901 or [::1]:9901, got "[fe80::1%eth0]:9901"`}},
		{"metrics unknown key", "metrics: {listen: 127.0.0.1:1, path: /m}\n", []string{`1: metrics: unknown key "path": want listen`}},
		{"drain number", "drain: 10\n", []string{`1: drain: want a duration from 0s to 24h such as 10s, got "10"`}},
		{"drain negative", "drain: -1s\n", []string{`1: drain: want a duration from 0s to 24h such as 10s, got "-1s"`}},
		{"drain too long", "drain: 25h\n", []string{`1: drain: want a duration from 0s to 24h such as 10s, got "25h"`}},
		{"busy-poll number", "busy-poll: 200\n", []string{`1: busy-poll: want a duration from 0s (off) to 1s such as 200us, got "200"`}},
		{"busy-poll negative", "busy-poll: -1ms\n", []string{`1: busy-poll: want a duration from 0s (off) to 1s such as 200us, got "-1ms"`}},
		{"busy-poll too long", "busy-poll: 2s\n", []string{`1: busy-poll: want a duration from 0s (off) to 1s such as 200us, got "2s"`}},
		{"pifs mapping", "pifs: {name: ns1}\n", []string{`1: pifs: want a sequence of {name: NAME, netns: PATH}, got a mapping`}},
		{"pif scalar", "pifs:\n  - ns1\n", []string{`2: pifs: want {name: NAME, netns: PATH}, got "ns1"`}},
		{"pif no name", "pifs:\n  - {netns: /run/netns/a}\n", []string{"2: pif: no name (name: NAME)"}},
		{"pif name sequence", "pifs:\n  - {name: [a], netns: /x}\n", []string{"2: pif name: want a name, got a sequence"}},
		{"pif name empty", "pifs:\n  - {name: '', netns: /x}\n", []string{"2: pif name is empty"}},
		{"pif host", "pifs:\n  - {name: host, netns: /x}\n", []string{`2: pif name "host" is reserved for the daemon's own network namespace`}},
		{"pif name chars", "pifs:\n  - {name: 'ns/1', netns: /x}\n", []string{`2: pif name "ns/1": only letters, digits, '-', '_' and '.' are allowed`}},
		{"pif name long", "pifs:\n  - {name: " + strings.Repeat("n", 65) + ", netns: /x}\n", []string{fmt.Sprintf("2: pif name %q is longer than 64 bytes", strings.Repeat("n", 65))}},
		{"pif twice", "pifs:\n  - {name: a, netns: /x}\n  - {name: a, netns: /y}\n", []string{`3: pif "a" is declared twice (first at line 2)`}},
		{"pif no netns", "pifs:\n  - {name: a}\n", []string{`2: pif "a": no netns (netns: /run/netns/NAME or /proc/PID/ns/net)`}},
		{"pif netns relative", "pifs:\n  - name: a\n    netns: netns/a\n", []string{`3: pif "a": netns: want an absolute path, got "netns/a"`}},
		{"pif unknown key", "pifs:\n  - {name: a, netns: /x, mtu: 1500}\n", []string{`2: pif: unknown key "mtu": want name or netns`}},
		{"too many pifs", manyPifs.String(), []string{fmt.Sprintf("%d: more than %d pifs", MaxPifs+2, MaxPifs)}},
		{"rules mapping", "rules: {a: b}\n", []string{"1: rules: want a sequence of rule lines, got a mapping"}},
		{"rules scalar", "rules: tcp 0.0.0.0:80 -> 1.2.3.4:80\n", []string{`1: rules: want a sequence of rule lines, got "tcp 0.0.0.0:80 -> 1.2.3.4:80"`}},
		{"rule mapping", "rules:\n  - tcp 0.0.0.0:80 -> 1.2.3.4:80 timeout.idle: 5s\n", []string{"2: rules: want a rule line (PROTO LISTEN [-> TARGET] [OPTION...]), got a mapping"}},
		{"rule null", "rules:\n  -\n", []string{"2: rules: want a rule line (PROTO LISTEN [-> TARGET] [OPTION...]), got nothing"}},
		{"rule syntax", "rules:\n  - tcp 0.0.0.0:9000-8000 -> 1.2.3.4:80\n", []string{"2: port range 9000-8000 is reversed"}},
		{"unknown listen pif", "rules:\n  - tcp ns2/0.0.0.0:80 -> 1.2.3.4:80\n", []string{`2: unknown pif "ns2"`}},
		{"unknown target pif", "pifs:\n  - {name: ns1, netns: /x}\nrules:\n  - tcp ns1/0.0.0.0:80 -> ns2/1.2.3.4:80\n", []string{`4: unknown pif "ns2"`}},
		{"unknown pifs both", "rules:\n  - tcp a/0.0.0.0:80 -> b/1.2.3.4:80\n  - tcp c/0.0.0.0:80 -> c/1.2.3.4:80\n",
			[]string{`2: unknown pif "a"`, `2: unknown pif "b"`, `3: unknown pif "c"`}},
		{"table overlap", "rules:\n  - tcp 0.0.0.0:8080 -> 1.2.3.4:80\n\n  - tcp 127.0.0.1:8000-8100 -> 1.2.3.4:80\n",
			[]string{"4: listen tcp 127.0.0.1:8080 overlaps line 2 (tcp 0.0.0.0:8080): a wildcard and a specific address cannot share port 8080"}},
		{"table duplicate via alias", "rules:\n  - &r tcp 127.0.0.1:80 -> 1.2.3.4:80\n  - *r\n", []string{"3: listen tcp 127.0.0.1:80 is also line 2's"}},
		{"every error at once", `loops: -2
log: {level: loud, format: xml}
ctl: {socket: here}
metrics: {listen: nowhere}
drain: soon
whatever: 1
pifs:
  - {name: host, netns: /x}
  - {name: ok, netns: rel}
rules:
  - tcp 0.0.0.0:80 -> 1.2.3.4:80 frobnicate
  - tcp 0.0.0.0:81 -> 1.2.3.4:80
  - tcp 0.0.0.0:81 -> 1.2.3.4:82
  - tcp ok/0.0.0.0:82 -> 1.2.3.4:80
`, []string{
			`1: loops: want a whole number from 0 (one per CPU) to 1024, got "-2"`,
			`2: log.level: want debug, info, warn or error, got "loud"`,
			`2: log.format: want console or json, got "xml"`,
			`3: ctl.socket: want an absolute path, got "here"`,
			`4: metrics.listen: want IP:PORT such as 127.0.0.1:9901 or [::1]:9901, got "nowhere"`,
			`5: drain: want a duration from 0s to 24h such as 10s, got "soon"`,
			`6: unknown key "whatever": want loops, busy-poll, log, ctl, metrics, state, store, drain, pifs or rules`,
			`8: pif name "host" is reserved for the daemon's own network namespace`,
			`9: pif "ok": netns: want an absolute path, got "rel"`,
			`11: unknown option "frobnicate"`,
			`13: listen tcp 0.0.0.0:81 is also line 12's`,
			`14: unknown pif "ok"`, // its declaration did not validate
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse("dir/f.yaml", []byte(tc.src))
			if c != nil {
				t.Errorf("got a configuration with errors: %+v", c)
			}
			var list rules.ErrorList
			if !errors.As(err, &list) {
				t.Fatalf("err = %v (%T), want a rules.ErrorList", err, err)
			}
			var got []string
			for _, e := range list {
				if e.File != "dir/f.yaml" {
					t.Errorf("error %q names file %q", e, e.File)
				}
				if !strings.HasPrefix(e.Error(), "dir/f.yaml:") {
					t.Errorf("error %q does not start FILE:", e)
				}
				got = append(got, fmt.Sprintf("%d: %s", e.Line, e.Msg))
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got\n  %s\nwant\n  %s", strings.Join(got, "\n  "), strings.Join(tc.want, "\n  "))
			}
		})
	}
}

func TestCtlSocketDefault(t *testing.T) {
	t.Setenv("XDG_RUNTIME_DIR", "/run/user/1000")
	if got := Default().CtlSocket(); got != "/run/user/1000/sluice/ctl.sock" {
		t.Errorf("with XDG_RUNTIME_DIR: %q", got)
	}
	t.Setenv("XDG_RUNTIME_DIR", "relative/dir") // not absolute: ignored, as the XDG spec says
	got := DefaultCtlSocket()
	if os.Geteuid() == 0 {
		if got != "/run/sluice/ctl.sock" {
			t.Errorf("root without XDG_RUNTIME_DIR: %q", got)
		}
	} else if want := filepath.Join(os.TempDir(), fmt.Sprintf("sluice-%d", os.Geteuid()), "ctl.sock"); got != want {
		t.Errorf("user without XDG_RUNTIME_DIR: %q, want %q", got, want)
	}
	c := &Config{Ctl: Ctl{Socket: "/tmp/x.sock"}}
	if c.CtlSocket() != "/tmp/x.sock" {
		t.Errorf("ctl.socket ignored: %q", c.CtlSocket())
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	if err := os.WriteFile(good, []byte(contractExample), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := Load(good)
	if err != nil || c.File != good || len(c.Rules) != 2 {
		t.Fatalf("Load: %+v, %v", c, err)
	}
	if _, err := Load(filepath.Join(dir, "missing.yaml")); !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), "missing.yaml") {
		t.Fatalf("missing file: %v", err)
	}
	if _, err := Load(dir); err == nil || !strings.Contains(err.Error(), dir) {
		t.Fatalf("a directory: %v", err)
	}
	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte("loops: x\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = Load(bad)
	var list rules.ErrorList
	if !errors.As(err, &list) || len(list) != 1 || !strings.HasPrefix(list[0].Error(), bad+":1: loops:") {
		t.Fatalf("bad file: %v", err)
	}
}

// render writes a configuration back as YAML, the way a person would.
func render(c *Config) string {
	var b strings.Builder
	fmt.Fprintf(&b, "loops: %d\nbusy-poll: %s\nlog: {level: %s, format: %s}\ndrain: %s\n", c.Loops, c.BusyPoll, c.Log.Level, c.Log.Format, c.Drain)
	if c.Ctl.Socket != "" {
		fmt.Fprintf(&b, "ctl: {socket: %q}\n", c.Ctl.Socket)
	}
	if c.Metrics.Listen.IsValid() {
		fmt.Fprintf(&b, "metrics: {listen: %q}\n", c.Metrics.Listen)
	}
	b.WriteString("pifs:\n")
	for _, p := range c.Pifs {
		fmt.Fprintf(&b, "  - {name: %q, netns: %q}\n", p.Name, p.Netns)
	}
	b.WriteString("rules:\n")
	for _, e := range c.Rules {
		fmt.Fprintf(&b, "  - %q\n", e.Rule)
	}
	return b.String()
}

// sameSettings compares two configurations, lines and file name aside.
func sameSettings(a, b *Config) bool {
	strip := func(c *Config) Config {
		s := *c
		s.File = ""
		s.Pifs = nil
		for _, p := range c.Pifs {
			s.Pifs = append(s.Pifs, Pif{Name: p.Name, Netns: p.Netns})
		}
		s.Rules = nil
		for _, e := range c.Rules {
			s.Rules = append(s.Rules, rules.Entry{Rule: e.Rule})
		}
		return s
	}
	return reflect.DeepEqual(strip(a), strip(b))
}

// FuzzParse: any input gives either a configuration or errors that each
// name the file and a line of it; a configuration written back as YAML
// parses to the same configuration.
func FuzzParse(f *testing.F) {
	f.Add(contractExample)
	f.Add("loops: 2\ndrain: 1s\nmetrics: {listen: '[::1]:0'}\nrules: [tcp 127.0.0.1:1-3 -> 127.0.0.1:4-6, 'udp [::]:53 -> [::1]:53']\n")
	f.Add("pifs: [{name: a, netns: /a}, {name: a, netns: b}]\nrules:\n - tcp a/0.0.0.0:1 -> b/1.2.3.4:1\n")
	f.Add("log: &l {level: info}\nctl: *l\nx: [\n")
	f.Add("rules: [&a 'tcp 0.0.0.0:1 -> 1.1.1.1:1', *a, *a]\n---\n")
	f.Fuzz(func(t *testing.T, src string) {
		c, err := Parse("fuzz.yaml", []byte(src))
		if err != nil {
			var list rules.ErrorList
			if !errors.As(err, &list) || len(list) == 0 {
				t.Fatalf("err = %v (%T), want a non-empty rules.ErrorList", err, err)
			}
			lines := strings.Count(strings.ReplaceAll(src, "\r\n", "\n"), "\n") + strings.Count(strings.ReplaceAll(src, "\r\n", ""), "\r") + 1
			for i, e := range list {
				if e.File != "fuzz.yaml" || e.Line < 1 || e.Line > lines || e.Msg == "" {
					t.Fatalf("bad error %q (line %d of %d)", e, e.Line, lines)
				}
				if i > 0 && e.Line < list[i-1].Line {
					t.Fatalf("errors out of line order: %v", list)
				}
			}
			return
		}
		if len(c.Rules) > rules.MaxRules || c.Ports() > rules.MaxPorts {
			t.Fatalf("table over its limits: %d rules, %d ports", len(c.Rules), c.Ports())
		}
		pifs := map[string]bool{"": true}
		for _, p := range c.Pifs {
			pifs[p.Name] = true
		}
		for _, e := range c.Rules {
			if !pifs[e.Rule.ListenPif] || !pifs[e.Rule.TargetPif] {
				t.Fatalf("rule %q names an undeclared pif", e.Rule)
			}
		}
		again := render(c)
		c2, err := Parse("again.yaml", []byte(again))
		if err != nil {
			t.Fatalf("written back:\n%s\ndoes not parse: %v", again, err)
		}
		if !sameSettings(c, c2) {
			t.Fatalf("round trip differs:\n%+v\n%+v", c, c2)
		}
	})
}

func TestStateDir(t *testing.T) {
	c, err := Parse("s.yaml", []byte("state: {dir: /var/lib/sluice}\n"))
	if err != nil || c.State.Dir != "/var/lib/sluice" {
		t.Fatalf("state.dir: %+v, %v", c, err)
	}
}

// store.etcd: the keys, the defaults, and what is refused (a password in
// the file above all).
func TestStoreEtcd(t *testing.T) {
	c, err := Parse("s.yaml", []byte(`store: {etcd: {endpoints: [http://127.0.0.1:2379, https://e2:2379], prefix: /sluice/web, instance: a-1, ca: /ca.pem, cert: /c.pem, key: /k.pem, user: u, password-file: /pw, ttl: 5s}}
`))
	if err != nil {
		t.Fatal(err)
	}
	e := c.Store.Etcd
	if e == nil || len(e.Endpoints) != 2 || e.Prefix != "/sluice/web" || e.Instance != "a-1" || e.CA != "/ca.pem" ||
		e.Cert != "/c.pem" || e.Key != "/k.pem" || e.User != "u" || e.PasswordFile != "/pw" || e.TTL != 5*time.Second {
		t.Fatalf("store.etcd: %+v", e)
	}
	for src, want := range map[string]string{
		`store: {etcd: {prefix: /p}}`:                                          "no endpoints",
		`store: {etcd: {endpoints: [127.0.0.1:2379], prefix: /p}}`:             "want http://HOST:PORT",
		`store: {etcd: {endpoints: [http://h:1], prefix: p/}}`:                 "store.etcd.prefix",
		`store: {etcd: {endpoints: [http://h:1], prefix: /p, password: x}}`:    "never in the file",
		`store: {etcd: {endpoints: [http://h:1], prefix: /p, cert: /c}}`:       "cert and key go together",
		`store: {etcd: {endpoints: [http://h:1], prefix: /p, ttl: 1s}}`:        "store.etcd.ttl",
		`store: {etcd: {endpoints: [http://h:1], prefix: /p, instance: a/b}}`:  "store.etcd.instance",
		`store: {etcd: {endpoints: [http://h:1], prefix: /p, nonsense: true}}`: "unknown key",
	} {
		_, err := Parse("s.yaml", []byte(src+"\n"))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: got %v, want %q", src, err, want)
		}
	}
}
