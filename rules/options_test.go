package rules

import (
	"os"
	"regexp"
	"strings"
	"testing"
)

// Every option of OptionDocs has its help, default and an example the
// parser takes; the parser takes no option OptionDocs lacks (setOption
// refuses it), so an option added to the parser without a help line fails
// its own tests and the FuzzParse corpus.
func TestOptionDocs(t *testing.T) {
	seen := map[string]bool{}
	help := OptionHelp()
	for _, o := range OptionDocs {
		if o.Help == "" || o.Default == "" || o.Example == "" || seen[o.Name] {
			t.Errorf("option %q: help %q, default %q, example %q (or given twice)", o.Name, o.Help, o.Default, o.Example)
		}
		seen[o.Name] = true
		if name, _, _ := strings.Cut(o.Example, "="); name != o.Name {
			t.Errorf("option %q: example %q sets %q", o.Name, o.Example, name)
		}
		base := "tcp 127.0.0.1:1 -> 127.0.0.1:2 "
		switch {
		case strings.HasPrefix(o.Name, "tls.backend-"):
			base += "tls.backend=verify "
		case o.Name == "tls.key" || o.Name == "tls.alpn" || o.Name == "tls.min" || o.Name == "tls.client-ca":
			base += "tls.cert=/x.pem "
		case o.Name == "check.path":
			base += "check=http "
		case strings.HasPrefix(o.Name, "check."):
			base += "check=tcp "
		case o.Name == "health":
			base = "tcp 127.0.0.1:1 "
		case o.Name == "resolve":
			base = "tcp 127.0.0.1:1 -> localhost:2 "
		}
		if _, err := Parse(base + o.Example); err != nil {
			t.Errorf("option %q: %q does not parse: %v", o.Name, base+o.Example, err)
		}
		if !strings.Contains(help, "  "+o.Form()+" ") {
			t.Errorf("help rules lacks %q:\n%s", o.Form(), help)
		}
	}
	if _, err := Parse("tcp 127.0.0.1:1 -> 127.0.0.1:2 frobnicate=1"); err == nil || !strings.Contains(err.Error(), `unknown option "frobnicate"`) {
		t.Errorf("unknown option: %v", err)
	}
}

// README's option table ("| option | meaning | default |") lists every
// option of OptionDocs with the same default: a row names one option or
// several ("`allow=CIDR,…` / `deny=CIDR,…`"), its default one for all or
// one each (" / "), backticks aside.
func TestOptionDocsInREADME(t *testing.T) {
	src, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, table, ok := strings.Cut(string(src), "\n| option | meaning | default |\n|---|---|---|\n")
	if !ok {
		t.Fatal("README has no option table")
	}
	table, _, _ = strings.Cut(table, "\n\n")
	name := regexp.MustCompile("^`([a-z.-]+)")
	readme := map[string]string{}
	for _, row := range strings.Split(table, "\n") {
		cells := strings.Split(strings.ReplaceAll(row, `\|`, "¦"), " | ")
		if len(cells) != 3 || !strings.HasPrefix(cells[0], "| ") || !strings.HasSuffix(cells[2], " |") {
			t.Errorf("README option row not of three cells: %q", row)
			continue
		}
		opts := strings.Split(strings.TrimPrefix(cells[0], "| "), " / ")
		defs := strings.Split(strings.ReplaceAll(strings.TrimSuffix(cells[2], " |"), "`", ""), " / ")
		for i, o := range opts {
			m := name.FindStringSubmatch(o)
			if m == nil {
				t.Errorf("README option row: no option in %q", o)
				continue
			}
			def := defs[0]
			if len(defs) == len(opts) {
				def = defs[i]
			}
			readme[m[1]] = def
		}
	}
	for _, d := range OptionDocs {
		def, ok := readme[d.Name]
		switch {
		case !ok:
			t.Errorf("README's option table has no %s", d.Name)
		case def != d.Default:
			t.Errorf("README gives %s the default %q, OptionDocs %q", d.Name, def, d.Default)
		}
		delete(readme, d.Name)
	}
	for n := range readme {
		t.Errorf("README's option table has %s, OptionDocs does not", n)
	}
}
