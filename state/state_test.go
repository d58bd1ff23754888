package state

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/rules"
)

func mustRules(t testing.TB, lines ...string) []*rules.Rule {
	t.Helper()
	rs := make([]*rules.Rule, len(lines))
	for i, l := range lines {
		r, err := rules.Parse(l)
		if err != nil {
			t.Fatal(err)
		}
		rs[i] = r
	}
	return rs
}

func sample(t testing.TB) *Table {
	rs := mustRules(t, "tcp 0.0.0.0:8080 -> 127.0.0.1:80", "udp [::]:5353 -> [::1]:53")
	return &Table{
		Header: Header{Generation: 7, Time: time.Date(2024, 5, 1, 10, 0, 0, 123, time.UTC),
			Who: Who{UID: 0, PID: 4242, Name: `sluice "ctl" x`}, Digest: Digest(rs[:1])},
		Lines: Lines(rs),
	}
}

func TestFormatParse(t *testing.T) {
	tb := sample(t)
	src := Format(tb)
	got, err := Parse(src)
	if err != nil {
		t.Fatalf("%v\n%s", err, src)
	}
	if !reflect.DeepEqual(got, tb) {
		t.Fatalf("round trip:\n got %+v\nwant %+v", got, tb)
	}
	// A table.rules is a rules file: the header is comments.
	es, err := rules.ParseFile("table.rules", src)
	if err != nil || len(es) != 2 {
		t.Fatalf("as a rules file: %v, %d", err, len(es))
	}
	empty := &Table{Header: tb.Header}
	if got, err := Parse(Format(empty)); err != nil || len(got.Lines) != 0 {
		t.Fatalf("empty table: %+v, %v", got, err)
	}
}

func TestParseRefuses(t *testing.T) {
	good := string(Format(sample(t)))
	cases := map[string]string{
		"empty":         "",
		"cut short":     good[:len(good)-5],
		"no newline":    strings.TrimSuffix(good, "\n"),
		"bad magic":     strings.Replace(good, "v1", "v9", 1),
		"bad gen":       strings.Replace(good, "generation: 7", "generation: x", 1),
		"bad time":      strings.Replace(good, "2024-05-01", "2024-13-01", 1),
		"bad who":       strings.Replace(good, "uid=0", "uid=-1", 1),
		"bad digest":    strings.Replace(good, "sha256:", "md5:", 1),
		"count low":     strings.Replace(good, "# rules: 2", "# rules: 1", 1),
		"count high":    strings.Replace(good, "# rules: 2", "# rules: 3", 1),
		"bad rule":      strings.Replace(good, "udp [::]:5353", "udp [::]:99999", 1),
		"header only":   magic + "\n",
		"missing field": strings.Replace(good, "# time:", "# tme:", 1),
	}
	for name, src := range cases {
		if _, err := Parse([]byte(src)); err == nil {
			t.Errorf("%s: parsed", name)
		}
	}
}

func TestCommitLoadHistory(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	d, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(dir); err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("dir: %v %v", st, err)
	}
	if tb, err := d.Load(); tb != nil || err != nil {
		t.Fatalf("no table yet: %v %v", tb, err)
	}
	tb := sample(t)
	if err := d.Commit(tb, nil); err != nil {
		t.Fatal(err)
	}
	got, err := d.Load()
	if err != nil || !reflect.DeepEqual(got, tb) {
		t.Fatalf("load: %+v %v", got, err)
	}
	tb2 := *tb
	tb2.Generation = 8
	tb2.Lines = []string{"tcp 0.0.0.0:8080 -> 127.0.0.1:81", "tcp 0.0.0.0:9090 -> 127.0.0.1:90"}
	if err := d.Commit(&tb2, tb.Lines); err != nil {
		t.Fatal(err)
	}
	es, bad, err := d.History(0)
	if err != nil || bad != 0 || len(es) != 2 {
		t.Fatalf("history: %v %d %v", es, bad, err)
	}
	want := Changes{Added: []string{"tcp 0.0.0.0:9090 -> 127.0.0.1:90"}, Removed: []string{"udp [::]:5353 -> [::1]:53"},
		Changed: []Change{{"tcp 0.0.0.0:8080 -> 127.0.0.1:80", "tcp 0.0.0.0:8080 -> 127.0.0.1:81"}}}
	if es[1].Generation != 8 || !reflect.DeepEqual(es[1].Changes, want) || es[1].Who != tb.Who {
		t.Fatalf("entry: %+v", es[1])
	}
	if es, _, _ := d.History(1); len(es) != 1 || es[0].Generation != 8 {
		t.Fatalf("History(1): %+v", es)
	}
	// No temporary file left behind.
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.Contains(e.Name(), ".tmp") {
			t.Errorf("left behind: %s", e.Name())
		}
	}
	if err := d.SavePrev(tb); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(dir, PrevFile)); err != nil || !bytes.Equal(b, Format(tb)) {
		t.Fatalf("prev: %v", err)
	}
	if err := d.KeepPrev(); err != nil {
		t.Fatal(err)
	}
	if tb, err := d.Load(); tb != nil || err != nil {
		t.Fatalf("after KeepPrev: %v %v", tb, err)
	}
	if _, err := os.Stat(filepath.Join(dir, PrevFile)); err != nil {
		t.Fatal(err)
	}
}

func TestLoadCorrupt(t *testing.T) {
	dir := t.TempDir()
	d, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, TableFile), []byte("garbage\n"), 0o600)
	if _, err := d.Load(); err == nil || !strings.Contains(err.Error(), filepath.Join(dir, TableFile)) {
		t.Fatalf("corrupt: %v", err)
	}
}

// A history line torn by a crash (no newline) is cut at Open; the next
// line starts whole; history stays bounded.
func TestHistoryTornAndBounded(t *testing.T) {
	dir := t.TempDir()
	d, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	tb := sample(t)
	if err := d.Commit(tb, nil); err != nil {
		t.Fatal(err)
	}
	f, _ := os.OpenFile(filepath.Join(dir, HistoryFile), os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString(`{"generation":8,"ti`)
	f.Close()
	if d, err = Open(dir); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < MaxHistory+historySlack+5; i++ {
		tb.Generation++
		tb.Lines = []string{fmt.Sprintf("tcp 0.0.0.0:%d -> 127.0.0.1:80", 1000+i)}
		if err := d.Commit(tb, nil); err != nil {
			t.Fatal(err)
		}
	}
	es, bad, err := d.History(0)
	if err != nil || bad != 0 {
		t.Fatal(bad, err)
	}
	if len(es) > MaxHistory+historySlack || len(es) < MaxHistory {
		t.Fatalf("%d entries kept", len(es))
	}
	if es[len(es)-1].Generation != tb.Generation {
		t.Fatalf("last: %d, want %d", es[len(es)-1].Generation, tb.Generation)
	}
	b, _ := os.ReadFile(filepath.Join(dir, HistoryFile))
	if bytes.Count(b, []byte("\n")) != len(es) {
		t.Fatal("lines and entries differ")
	}
}

func TestDecide(t *testing.T) {
	tb := sample(t)
	cases := []struct {
		saved  *Table
		digest string
		fresh  bool
		want   Decision
	}{
		{nil, tb.Digest, false, First},
		{nil, tb.Digest, true, First},
		{tb, tb.Digest, false, Resume},
		{tb, "sha256:other", false, FileWins},
		{tb, tb.Digest, true, Fresh},
	}
	for _, c := range cases {
		if got := Decide(c.saved, c.digest, c.fresh); got != c.want {
			t.Errorf("Decide(%v, %q, %v) = %s, want %s", c.saved != nil, c.digest, c.fresh, got, c.want)
		}
	}
}

func TestDecisionNames(t *testing.T) {
	for d := Decision(1); d < decisionEnd; d++ {
		if strings.HasPrefix(d.String(), "decision-") {
			t.Errorf("decision %d has no name", d)
		}
	}
	if Decision(99).String() != "decision-99" {
		t.Error(Decision(99).String())
	}
}

func TestDigestCanonical(t *testing.T) {
	a := mustRules(t, "tcp 0.0.0.0:80 -> 127.0.0.1:8080   weak")
	b := mustRules(t, "tcp 0.0.0.0:80 -> 127.0.0.1:8080 weak")
	c := mustRules(t, "tcp 0.0.0.0:80 -> 127.0.0.1:8081 weak")
	if Digest(a) != Digest(b) || Digest(a) == Digest(c) || !validDigest(Digest(a)) {
		t.Fatal("digest")
	}
}

func TestChangesFormat(t *testing.T) {
	c := DiffLines([]string{"tcp 0.0.0.0:1 -> 127.0.0.1:1", "tcp 0.0.0.0:2 -> 127.0.0.1:2"},
		[]string{"tcp 0.0.0.0:2 -> 127.0.0.1:3", "tcp 0.0.0.0:4 -> 127.0.0.1:4"})
	want := "- tcp 0.0.0.0:1 -> 127.0.0.1:1\n~ tcp 0.0.0.0:2 -> 127.0.0.1:2\n  tcp 0.0.0.0:2 -> 127.0.0.1:3\n+ tcp 0.0.0.0:4 -> 127.0.0.1:4\n"
	if got := c.Format(); got != want {
		t.Fatalf("got\n%s\nwant\n%s", got, want)
	}
	if !DiffLines([]string{"a b"}, []string{"a b"}).Empty() {
		t.Fatal("same tables differ")
	}
}

func TestParseEntry(t *testing.T) {
	e := Entry{Generation: 3, Time: time.Unix(5, 0).UTC(), Who: Who{1, 2, "x"}, Changes: Changes{Added: []string{"tcp 0.0.0.0:1"}}}
	b, err := e.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParseEntry(bytes.TrimSuffix(b, []byte("\n")))
	if err != nil || !reflect.DeepEqual(*got, e) {
		t.Fatalf("%+v %v", got, err)
	}
	for _, bad := range []string{"", "{}", `{"generation":1,"x":2}`, `{"generation":1} {}`, "[1]"} {
		if _, err := ParseEntry([]byte(bad)); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add(Format(sample(f)))
	f.Add([]byte(magic + "\n# generation: 1\n"))
	f.Fuzz(func(t *testing.T, src []byte) {
		tb, err := Parse(src)
		if err != nil {
			return
		}
		// What parses formats back to the same table.
		again, err := Parse(Format(tb))
		if err != nil {
			t.Fatalf("formatted table does not parse: %v", err)
		}
		if again.Generation != tb.Generation || again.Digest != tb.Digest || again.Who != tb.Who || len(again.Lines) != len(tb.Lines) {
			t.Fatalf("round trip: %+v vs %+v", again, tb)
		}
	})
}

func FuzzParseEntry(f *testing.F) {
	f.Add([]byte(`{"generation":3,"time":"2024-05-01T10:00:00Z","who":{"uid":0,"pid":1,"name":"x"},"added":["tcp 0.0.0.0:1"]}`))
	f.Fuzz(func(t *testing.T, line []byte) {
		e, err := ParseEntry(line)
		if err != nil {
			return
		}
		b, err := e.Marshal()
		if err != nil {
			return // a time outside what JSON carries
		}
		if _, err := ParseEntry(bytes.TrimSuffix(b, []byte("\n"))); err != nil {
			t.Fatalf("marshalled entry does not parse: %v\n%s", err, b)
		}
	})
}
