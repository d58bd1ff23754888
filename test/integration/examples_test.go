package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Every file of examples/ is valid as `sluice check` reads it: a YAML
// configuration with -c, a rules file with -r. An example that stops
// validating fails here, not in a user's hands.
func TestExamplesCheck(t *testing.T) {
	files, err := os.ReadDir("../../examples")
	if err != nil {
		t.Fatal(err)
	}
	checked := 0
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
		code, stdout, stderr := runSluice(t, "check", flag, path)
		if code != 0 || !strings.Contains(stdout, ": ok: ") {
			t.Errorf("sluice check %s %s: exit %d\n%s%s", flag, path, code, stdout, stderr)
		}
		checked++
	}
	if checked < 4 {
		t.Errorf("checked %d examples; want the 4 or more of examples/", checked)
	}
}
