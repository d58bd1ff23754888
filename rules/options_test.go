package rules

import (
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
