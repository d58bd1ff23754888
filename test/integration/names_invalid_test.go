package integration

import (
	"fmt"
	"strings"
	"testing"
)

// A backend name that does not resolve is a validation error at its line,
// wherever a table is loaded: `run -c` exits 2 naming FILE:LINE and serves
// nothing; `ctl apply` is refused at the file's line (exit 2) and the
// active table keeps serving. (.invalid never resolves: RFC 6761.)
func TestUnresolvableNameIsAValidationError(t *testing.T) {
	p := freePort(t)
	cfg := writeFile(t, "names.yaml", fmt.Sprintf("log: {level: warn}\nrules:\n  - tcp 127.0.0.1:%d -> 127.0.0.1:9\n  - tcp 127.0.0.1:%d -> nope.invalid:80\n", p, freePort(t)))
	code, _, stderr := runSluice(t, "run", "-c", cfg)
	if want := cfg + ":4: "; code != 2 || !strings.Contains(stderr, want) || !strings.Contains(stderr, "target nope.invalid") {
		t.Errorf("run -c with an unresolvable name: exit %d, stderr:\n%s\nwant exit 2 and %q…target nope.invalid", code, stderr, want)
	}

	d := startLive(t, liveTable{lines: []string{fmt.Sprintf("tcp 127.0.0.1:%d -> 127.0.0.1:9", p)}})
	rulesFile := writeFile(t, "names.rules", fmt.Sprintf("# a comment\ntcp 127.0.0.1:%d -> 127.0.0.1:9\ntcp 127.0.0.1:%d -> nope.invalid:80\n", p, freePort(t)))
	code, stdout, stderr := d.cli("apply", rulesFile)
	if want := rulesFile + ":3: "; code != 2 || !strings.Contains(stderr, want) || !strings.Contains(stderr, "nope.invalid") {
		t.Errorf("ctl apply with an unresolvable name: exit %d\nstdout:\n%s\nstderr:\n%s\nwant exit 2 and %q", code, stdout, stderr, want)
	}
	if gen, lines := d.list(); gen != 1 || len(lines) != 1 {
		t.Errorf("after the refused apply: generation %d, table %q; want generation 1 unchanged", gen, lines)
	}
}
