package engine

import (
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/sluice-proxy/sluice/observe"
	"github.com/sluice-proxy/sluice/rules"
)

// The table is consistent: each def reads Stats one way, with the labels
// its family has, in a family of Families; no name is used twice.
func TestCounterDefsConsistent(t *testing.T) {
	fams := map[*Family]bool{}
	for _, f := range Families {
		if fams[f] {
			t.Errorf("family %s listed twice", f.Name)
		}
		fams[f] = true
	}
	stats, samples := map[string]bool{}, map[string]bool{}
	for _, c := range []struct {
		name    string
		defs    []CounterDef
		perRule bool
	}{{"EngineDefs", EngineDefs, false}, {"TableDefs", TableDefs, false}, {"RuleDefs", RuleDefs, true}} {
		for i, d := range c.defs {
			if (d.Get != nil) == (d.Rule != nil) || (d.Rule != nil) != c.perRule {
				t.Errorf("%s[%d] %q: Get and Rule wrong for its table", c.name, i, d.Stat)
			}
			if d.Stat == "" && d.Family == nil {
				t.Errorf("%s[%d]: no name at all", c.name, i)
			}
			if d.Stat != "" {
				k := c.name[:4] + d.Stat
				if stats[k] {
					t.Errorf("%s: ctl stats name %q twice", c.name, d.Stat)
				}
				stats[k] = true
			}
			if f := d.Family; f != nil {
				if !fams[f] {
					t.Errorf("%s[%d]: family %s not in Families", c.name, i, f.Name)
				}
				if f.PerRule != c.perRule || len(d.Labels) != len(f.Labels) || f.Kind == KindHistogram {
					t.Errorf("%s[%d]: sample %v of family %+v", c.name, i, d.Labels, f)
				}
				k := f.Name + "{" + strings.Join(d.Labels, ",") + "}"
				if samples[k] {
					t.Errorf("sample %s twice", k)
				}
				samples[k] = true
			}
		}
	}
}

// Every number of Stats is in the table: changing any numeric field changes
// what some def reads. The fields left out are sampled by metrics itself,
// as noted.
func TestEveryStatsFieldHasADef(t *testing.T) {
	notInTable := map[string]string{
		"Stats.Ended":            "sessions_ended_total, ended.CODE",
		"TableStats.ApplyTime":   "table_apply_seconds",
		"RuleStats.Terms":        "rule_terminations_total, term.CODE",
		"RuleStats.Handshake":    "rule_handshake_seconds",
		"RuleStats.Connect":      "rule_connect_seconds",
		"RuleStats.Duration":     "rule_session_seconds",
		"RuleStats.Hello":        "rule_tls_hello_bytes",
		"RuleStats.Routes":       "status page only",
		"RuleStats.Requested":    "status page only",
		"UDPStats.Expired":       "engine-wide only (udp_flows_expired_total), as before",
		"TableStats.Recent":      "status page only",
		"TableStats.Paused":      "status page only",
		"RuleStats.Policy":       "handshake's own Stats; its Accepted, HealthUp/Down and ProxyV1/V2 are in the table",
		"RuleStats.Listeners":    "counted: ports_bound",
		"RuleStats.Failed":       "counted: ports_failed",
		"RuleStats.Backends":     "counted: backends, backends_up",
		"RuleStats.Checked":      "backend_up, backend_checks_total; counted: checks_ok, checks_failed, checks_timeout",
		"RuleStats.CheckTime":    "backend_check_seconds",
		"Stats.Rules":            "counted: rules; each rule by RuleDefs",
		"RuleStats.Line":         "a name, not a number",
		"RuleStats.Listen":       "the rule label",
		"RuleStats.Pif":          "the pif label",
		"RuleStats.Proto":        "selects the families",
		"ListenerStats":          "status page only",
		"TLSStats.HandshakeTime": "tls_handshake_seconds",
		"Stats.Pifs":             "pif_up, by pif",
		"RuleStats.Cert":         "rule_tls_cert_expiry_seconds; status page",
	}
	read := func(s *Stats) []int64 {
		var out []int64
		for _, t := range [][]CounterDef{EngineDefs, TableDefs, RuleDefs} {
			for i := range t {
				if d := &t[i]; d.Get != nil {
					out = append(out, d.Get(s))
				} else {
					out = append(out, d.Rule(&s.Rules[0]))
				}
			}
		}
		return out
	}
	base := Stats{Rules: []RuleStats{{Proto: rules.TCP.String()}}}
	want := read(&base)
	var walk func(name string, v reflect.Value)
	walk = func(name string, v reflect.Value) {
		for i := 0; i < v.NumField(); i++ {
			f, ft := v.Field(i), v.Type().Field(i)
			key := v.Type().Name() + "." + ft.Name
			if _, ok := notInTable[key]; ok {
				continue
			}
			switch f.Kind() {
			case reflect.Struct:
				walk(key, f)
				continue
			case reflect.Int, reflect.Int64:
				f.SetInt(7777)
			case reflect.Uint64:
				f.SetUint(7777)
			case reflect.Bool:
				f.SetBool(true)
			default:
				t.Errorf("%s: a %s, neither in the table nor listed as left out", key, f.Kind())
				continue
			}
			if got := read(&base); reflect.DeepEqual(got, want) {
				t.Errorf("%s: no def reads it", key)
			}
			f.Set(reflect.Zero(f.Type()))
		}
	}
	walk("Stats", reflect.ValueOf(&base).Elem())
	walk("RuleStats", reflect.ValueOf(&base.Rules[0]).Elem())
	// The list of fields left out has no stale entry.
	for key := range notInTable {
		typ, field, _ := strings.Cut(key, ".")
		var v any
		switch typ {
		case "Stats":
			v = Stats{}
		case "TableStats":
			v = TableStats{}
		case "RuleStats":
			v = RuleStats{}
		case "UDPStats":
			v = UDPStats{}
		case "TLSStats":
			v = TLSStats{}
		case "ListenerStats":
			continue
		}
		if _, ok := reflect.TypeOf(v).FieldByName(field); !ok {
			t.Errorf("%s listed as left out: no such field", key)
		}
	}
}

// README.md documents every family, and the access log's fields the table
// names.
func TestCounterNamesDocumented(t *testing.T) {
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	readme := string(b)
	for _, f := range Families {
		if !strings.Contains(readme, "`sluice_"+f.Name) && !strings.Contains(readme, "`sluice_"+f.Name+"`") {
			t.Errorf("README.md does not document sluice_%s", f.Name)
		}
	}
	for _, d := range RuleDefs {
		if d.Log != "" && !strings.Contains(readme, "`"+d.Log+"`") {
			t.Errorf("README.md does not document the access-log field %s", d.Log)
		}
	}
	if logBytesUp != "bytes_up" || logBytesDown != "bytes_down" || logSpliced != "spliced" {
		t.Errorf("access-log fields %q %q %q", logBytesUp, logBytesDown, logSpliced)
	}
}

// ctl stats carries the store's numbers only with a store, the version in
// a counter's name; README.md names them.
func TestStoreCounters(t *testing.T) {
	if got := AppendStoreCounters(nil, StoreStats{}); len(got) != 0 {
		t.Errorf("without a store: %v", got)
	}
	got := AppendStoreCounters(nil, StoreStats{Enabled: true, Connected: true, Version: "v1", LastApply: 7, Errors: 3})
	want := []observe.Counter{{Name: "store.connected", Value: 1}, {Name: "store.last_apply", Value: 7}, {Name: "store.errors", Value: 3}, {Name: "store.version.v1", Value: 1}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
	if got := AppendStoreCounters(nil, StoreStats{Enabled: true}); len(got) != 3 {
		t.Errorf("before a version runs: %v", got)
	}
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range want[:3] {
		if !strings.Contains(string(b), "`"+c.Name+"`") {
			t.Errorf("README.md does not name %s", c.Name)
		}
	}
}
