package integration

import (
	"strings"
	"testing"
)

// A bad flag is said once, with where to look, and exit 2; -h prints the
// command's usage and exits 0.
func TestCLIBadFlagSaidOnce(t *testing.T) {
	for _, cmd := range [][]string{{"run", "--bogus"}, {"forward", "--bogus"}, {"check", "--bogus"}, {"ctl", "--bogus", "status"}} {
		code, _, stderr := runSluice(t, cmd...)
		if code != 2 || strings.Count(stderr, "flag provided but not defined: -bogus") != 1 || strings.Contains(stderr, "usage:") ||
			!strings.Contains(stderr, "sluice "+cmd[0]+" -h") {
			t.Errorf("sluice %s: exit %d, stderr:\n%s\nwant exit 2 and the error once, pointing at -h", strings.Join(cmd, " "), code, stderr)
		}
		code, _, stderr = runSluice(t, cmd[0], "-h")
		if code != 0 || !strings.HasPrefix(stderr, "usage: sluice "+cmd[0]) {
			t.Errorf("sluice %s -h: exit %d, stderr:\n%s", cmd[0], code, stderr)
		}
	}
	// The commands without flags say so, and refuse what they do not take.
	for _, cmd := range []string{"help", "version"} {
		code, _, stderr := runSluice(t, cmd, "-h")
		if code != 0 || !strings.HasPrefix(stderr, "usage: sluice "+cmd) {
			t.Errorf("sluice %s -h: exit %d, stderr:\n%s", cmd, code, stderr)
		}
		if code, _, stderr = runSluice(t, cmd, "bogus"); code != 2 {
			t.Errorf("sluice %s bogus: exit %d, stderr:\n%s", cmd, code, stderr)
		}
	}
}
