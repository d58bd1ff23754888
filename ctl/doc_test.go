package ctl

import (
	"bytes"
	"encoding/hex"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/ctl/ctltest"
)

var errConnReset = syscall.ECONNRESET

func readDoc(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("../docs/ctl-protocol.md")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

type docSection struct {
	title      string
	fromServer bool
	bytes      []byte
}

// exampleSections parses the worked example: "# ..." lines start a
// section (its direction in the title), other lines are hex bytes up to the
// first double space, then a note.
func exampleSections(t *testing.T, doc string) []docSection {
	t.Helper()
	_, rest, ok := strings.Cut(doc, "<!-- example:begin -->")
	body, _, ok2 := strings.Cut(rest, "<!-- example:end -->")
	if !ok || !ok2 {
		t.Fatal("docs/ctl-protocol.md: no example markers")
	}
	var secs []docSection
	for n, line := range strings.Split(body, "\n") {
		switch {
		case strings.HasPrefix(line, "```") || strings.TrimSpace(line) == "":
			continue
		case strings.HasPrefix(line, "# "):
			secs = append(secs, docSection{title: line, fromServer: strings.Contains(line, "server → client")})
			continue
		}
		if len(secs) == 0 {
			t.Fatalf("example line %d: bytes before any section", n)
		}
		hexPart, _, _ := strings.Cut(line, "  ")
		for _, tok := range strings.Fields(hexPart) {
			b, err := hex.DecodeString(tok)
			if err != nil || len(b) != 1 {
				t.Fatalf("example line %q: %q is not one hex byte", line, tok)
			}
			secs[len(secs)-1].bytes = append(secs[len(secs)-1].bytes, b[0])
		}
	}
	return secs
}

// The worked example is true: the client's bytes of the doc, sent to a real
// server over a unix socket, get the server's bytes of the doc back, byte
// for byte, and then the close.
func TestDocExample(t *testing.T) {
	secs := exampleSections(t, readDoc(t))
	eng := ctltest.New(7, nil, mustRules(t, "tcp 0.0.0.0:8080 -> 127.0.0.1:80")...)
	eng.FailPort(9090, syscall.EADDRINUSE)
	_, path := startServer(t, eng, nil)
	r := dialRaw(t, path, false)
	for _, s := range secs {
		if len(s.bytes) == 0 {
			continue
		}
		if !s.fromServer {
			r.send(s.bytes)
			continue
		}
		got := make([]byte, len(s.bytes))
		_ = r.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(r.conn, got); err != nil {
			t.Fatalf("%s: %v", s.title, err)
		}
		if !bytes.Equal(got, s.bytes) {
			t.Fatalf("%s: the server sent\n%s\nthe doc says\n%s", s.title, hex.Dump(got), hex.Dump(s.bytes))
		}
		// The header's length is the payload's.
		if n := int(got[4])<<24 | int(got[5])<<16 | int(got[6])<<8 | int(got[7]); n != len(got)-headerLen {
			t.Fatalf("%s: header says %d bytes, the doc's section has %d", s.title, n, len(got)-headerLen)
		}
	}
	r.expectClosed()
	wantLines(t, eng, "tcp 0.0.0.0:8080 -> 127.0.0.1:80")
	if a, c, rb := eng.Counts(); a != 1 || c != 0 || rb != 1 {
		t.Fatalf("applies %d commits %d rollbacks %d, want 1 0 1", a, c, rb)
	}
}

// tableAfter returns the cells of the first markdown table after marker.
func tableAfter(t *testing.T, doc, marker string) [][]string {
	t.Helper()
	i := strings.Index(doc, marker)
	if i < 0 {
		t.Fatalf("docs/ctl-protocol.md: no %q", marker)
	}
	var rows [][]string
	started := false
	for _, line := range strings.Split(doc[i:], "\n") {
		if strings.HasPrefix(line, "|") {
			started = true
			cells := strings.Split(strings.Trim(line, "|"), "|")
			for k := range cells {
				cells[k] = strings.Trim(strings.TrimSpace(cells[k]), "`")
			}
			if !strings.HasPrefix(cells[0], "---") {
				rows = append(rows, cells)
			}
		} else if started {
			break
		}
	}
	if len(rows) < 2 {
		t.Fatalf("no table after %q", marker)
	}
	return rows[1:] // without the heading
}

// The doc's tables list exactly the codes, limits, message types, intents
// and features of the code, with the same numbers and names.
func TestDocTables(t *testing.T) {
	doc := readDoc(t)
	t.Run("error codes", func(t *testing.T) {
		rows := tableAfter(t, doc, "## Error codes")
		if len(rows) != codeCount-1 {
			t.Errorf("the doc lists %d codes, the code has %d", len(rows), codeCount-1)
		}
		for _, row := range rows {
			n, err := strconv.Atoi(row[0])
			if err != nil || Code(n).String() != row[1] {
				t.Errorf("doc: code %s %q, code says %q", row[0], row[1], Code(n).String())
			}
		}
	})
	t.Run("limits", func(t *testing.T) {
		cfg := defaultConfig()
		h := cfg.hello()
		values := map[LimitID]uint64{} // every limit the hello has, so a new one needs its row
		for _, l := range h.Limits.fields() {
			values[l.id] = l.get()
		}
		rows := tableAfter(t, doc, "Limit ids (stable")
		if len(rows) != limitCount-1 || len(values) != limitCount-1 {
			t.Errorf("the doc lists %d limits, the code has %d", len(rows), limitCount-1)
		}
		lead := regexp.MustCompile(`^\d+`)
		for _, row := range rows {
			n, err := strconv.Atoi(row[0])
			id := LimitID(n)
			if err != nil || id.String() != row[1] {
				t.Errorf("doc: limit %s %q, code says %q", row[0], row[1], id.String())
				continue
			}
			if v := lead.FindString(row[2]); v != strconv.FormatUint(values[id], 10) {
				t.Errorf("doc: limit %s = %s, the server says %d", row[1], v, values[id])
			}
		}
	})
	t.Run("message types", func(t *testing.T) {
		rows := tableAfter(t, doc, "### Message types")
		if len(rows) != msgTypeCount-1 {
			t.Errorf("the doc lists %d types, the code has %d", len(rows), msgTypeCount-1)
		}
		for _, row := range rows {
			n, err := strconv.ParseUint(strings.TrimPrefix(row[0], "0x"), 16, 8)
			if err != nil || MsgType(n).String() != row[1] {
				t.Errorf("doc: type %s %q, code says %q", row[0], row[1], MsgType(n).String())
			}
		}
	})
	t.Run("intents", func(t *testing.T) {
		for i := Intent(1); i < intentCount; i++ {
			if want := "`" + strconv.Itoa(int(i)) + "` " + i.String(); !strings.Contains(doc, want) {
				t.Errorf("the doc does not say %q", want)
			}
		}
	})
	t.Run("features", func(t *testing.T) {
		rows := tableAfter(t, doc, "Features of this build")
		cfg := defaultConfig()
		h := cfg.hello()
		if len(rows) != len(h.Features) {
			t.Errorf("the doc lists %d features, the server %d", len(rows), len(h.Features))
		}
		for _, row := range rows {
			if !h.Has(row[0]) {
				t.Errorf("the doc lists feature %q, the server does not", row[0])
			}
		}
	})
}

// Every code, limit, message type and intent has a name, and the numbers
// are stable: a renumbering or a missing name fails here.
func TestEveryNumberHasAName(t *testing.T) {
	check := func(kind string, n int, name string, unknown string) {
		if strings.HasPrefix(name, unknown) {
			t.Errorf("%s %d has no name", kind, n)
		}
	}
	seen := map[string]bool{}
	for c := Code(1); c < codeCount; c++ {
		check("code", int(c), c.String(), "code-")
		if seen[c.String()] {
			t.Errorf("two codes named %q", c)
		}
		seen[c.String()] = true
	}
	for l := LimitID(1); l < limitCount; l++ {
		check("limit", int(l), l.String(), "limit-")
	}
	for m := MsgType(1); m < msgTypeCount; m++ {
		check("message type", int(m), m.String(), "type-")
	}
	for i := Intent(1); i < intentCount; i++ {
		check("intent", int(i), i.String(), "intent-")
	}
	for r := RunState(1); r < runStateCount; r++ {
		check("state", int(r), r.String(), "state-")
	}
	if RunState(0).String() != "" || RunState(runStateCount).String() != "state-"+strconv.Itoa(runStateCount) {
		t.Error("state 0 is none, a state past the names has none")
	}
	if StateServing != 1 || StateDraining != 2 {
		t.Error("run states are never renumbered")
	}
	if Code(999).String() != "code-999" || MsgType(0).Known() || Intent(0).Known() {
		t.Error("unknown numbers must not have names")
	}
	stable := map[Code]string{1: "bad-frame", 2: "too-large", 3: "bad-version", 4: "unexpected", 5: "timeout", 6: "busy",
		7: "stale-generation", 8: "invalid-rule", 9: "invalid-table", 10: "unknown-pif", 11: "bad-value", 12: "apply-failed",
		13: "commit-failed", 14: "rollback-failed", 15: "confirm-timeout", 16: "shutting-down", 17: "permission-denied",
		18: "too-many-clients", 19: "internal", 20: "slow-watcher",
		21: "no-state", 22: "no-pending", 23: "no-reload", 24: "empty-chunk", 25: "upgrade-failed", 26: "upgrading", 27: "draining"}
	for c, name := range stable {
		if c.String() != name {
			t.Errorf("code %d is %q, was %q: codes are never renumbered", c, c, name)
		}
	}
}
