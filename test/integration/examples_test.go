package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/internal/testcert"
	"github.com/sluice-proxy/sluice/rules"
)

// exampleTLSDir is where the examples name their TLS files, as a user's
// system would have them.
const exampleTLSDir = "/etc/sluice/"

// Every file of examples/ is valid as `sluice check` reads it: a YAML
// configuration with -c, a rules file with -r. An example that stops
// validating fails here, not in a user's hands. check reads the TLS files
// an example names (under /etc/sluice/, as a user would have them): the test
// makes them (testcert) under a temporary directory and checks a copy of the
// example whose /etc/sluice/ is that directory, every other byte the same.
func TestExamplesCheck(t *testing.T) {
	files, err := os.ReadDir("../../examples")
	if err != nil {
		t.Fatal(err)
	}
	checked, withTLS := 0, 0
	for _, f := range files {
		path := filepath.Join("../../examples", f.Name())
		var flag string
		switch {
		case strings.HasSuffix(f.Name(), ".yaml"):
			flag = "-c"
		case strings.HasSuffix(f.Name(), ".rules"):
			flag = "-r"
		default:
			t.Errorf("examples/%s: neither a .yaml configuration nor a .rules file", f.Name())
			continue
		}
		src, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if rs := exampleRules(t, path, flag, src); hasTLSFiles(rs) {
			path = exampleWithCerts(t, f.Name(), flag, src)
			withTLS++
		}
		code, stdout, stderr := runSluice(t, "check", flag, path)
		if code != 0 || !strings.Contains(stdout, ": ok: ") {
			t.Errorf("sluice check %s %s: exit %d\n%s%s", flag, path, code, stdout, stderr)
		}
		checked++
	}
	if checked < 6 || withTLS < 1 {
		t.Errorf("checked %d examples, %d with TLS files; want the 6 or more of examples/, one with TLS files", checked, withTLS)
	}
}

// exampleRules returns the rules of an example as check reads them.
func exampleRules(t *testing.T, path, flag string, src []byte) []*rules.Rule {
	t.Helper()
	if flag == "-r" {
		entries, err := rules.ParseFile(path, src)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		return rules.RulesOf(entries)
	}
	c, err := config.Parse(path, src)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return c.RuleList()
}

func hasTLSFiles(rs []*rules.Rule) bool {
	for _, r := range rs {
		if len(r.TLSFiles()) > 0 {
			return true
		}
	}
	return false
}

// exampleWithCerts writes the example's copy, its /etc/sluice/ replaced by
// a temporary directory, and the files its rules name there: for tls.cert
// a certificate for the route's first name (with its key in tls.key, or
// after it when the rule has none), for tls.client-ca and tls.backend-ca a
// CA's certificate. It returns the copy's path.
func exampleWithCerts(t *testing.T, name, flag string, src []byte) string {
	t.Helper()
	dir := t.TempDir()
	copied := filepath.Join(dir, name)
	text := strings.ReplaceAll(string(src), exampleTLSDir, dir+"/")
	if err := os.WriteFile(copied, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	ca := testcert.NewCA(t, t.TempDir())
	caPEM := readFile(t, ca.File)
	put := func(path string, b []byte) {
		if !strings.HasPrefix(path, dir+"/") {
			t.Fatalf("examples/%s names %s: want the files of examples under %s", name, path, exampleTLSDir)
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for i, r := range exampleRules(t, copied, flag, []byte(text)) {
		for _, f := range r.TLSFiles() {
			put(f[1], nil) // every file is under dir, or fails here
		}
		if r.TLS.Cert != "" {
			cn := "localhost"
			if len(r.SNI) > 0 {
				cn = strings.TrimPrefix(r.SNI[0], "*.")
			}
			crt, key := ca.Leaf(t, fmt.Sprintf("leaf%d", i), cn)
			if r.TLS.Key == "" {
				put(r.TLS.Cert, append(readFile(t, crt), readFile(t, key)...))
			} else {
				put(r.TLS.Cert, readFile(t, crt))
				put(r.TLS.Key, readFile(t, key))
			}
		}
		for _, p := range []string{r.TLS.ClientCA, r.TLS.BackendCA} {
			if p != "" {
				put(p, caPEM)
			}
		}
	}
	return copied
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
