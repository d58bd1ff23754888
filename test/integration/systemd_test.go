package integration

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// deploy/systemd/sluice.service is a unit systemd accepts (systemd-analyze
// verify, from Debian's systemd package; it needs no running systemd), its
// ExecStart and ExecReload pointed at the binary under test, and it says
// what the daemon relies on.
func TestDeploySystemdUnit(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Fatal("systemd-analyze not found: scripts/test-deps.sh installs Debian's systemd package")
	}
	src, err := os.ReadFile("../../deploy/systemd/sluice.service")
	if err != nil {
		t.Fatal(err)
	}
	unit := string(src)
	for _, want := range []string{"\nType=notify\n", "\nNotifyAccess=all\n", "\nExecReload=/usr/local/bin/sluice ctl -s /run/sluice/ctl.sock reload\n",
		"\nStateDirectory=sluice\n", "--state /var/lib/sluice", "\nRuntimeDirectoryMode=0700\n", "\nProtectSystem=strict\n",
		"\nNoNewPrivileges=yes\n", "\nCapabilityBoundingSet=CAP_NET_BIND_SERVICE\n", "\nWatchdogSec="} {
		if !strings.Contains(unit, want) {
			t.Errorf("the unit lacks %q", strings.TrimSpace(want))
		}
	}
	path := filepath.Join(t.TempDir(), "sluice.service")
	if err := os.WriteFile(path, []byte(strings.ReplaceAll(unit, "/usr/local/bin/sluice", sluiceBin)), 0o644); err != nil {
		t.Fatal(err)
	}
	// Unknown keys and bad values are warnings with exit 0: any output fails.
	out, err := exec.Command(analyze, "verify", "--man=no", path).CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}
