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

// deploy/systemd/sluice.socket and sluice-ctl.socket are socket units
// systemd accepts beside the service they activate: a listening address
// that a rule must match, and the control socket, named ctl.
func TestDeploySystemdSockets(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Fatal("systemd-analyze not found: scripts/test-deps.sh installs Debian's systemd package")
	}
	dir := t.TempDir()
	var paths []string
	for _, tc := range []struct {
		file string
		want []string
	}{
		{"sluice.service", nil},
		{"sluice.socket", []string{"\nListenStream=0.0.0.0:443\n", "  - tcp 0.0.0.0:443 -> ", "\nService=sluice.service\n", "\nWantedBy=sockets.target\n"}},
		{"sluice-ctl.socket", []string{"\nListenStream=/run/sluice-ctl.sock\n", "\nFileDescriptorName=ctl\n", "\nSocketMode=0600\n",
			"\nService=sluice.service\n", "ExecReload=/usr/local/bin/sluice ctl -s /run/sluice-ctl.sock reload\n"}},
	} {
		src, err := os.ReadFile("../../deploy/systemd/" + tc.file)
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range tc.want {
			if !strings.Contains(string(src), want) {
				t.Errorf("%s lacks %q", tc.file, strings.TrimSpace(want))
			}
		}
		path := filepath.Join(dir, tc.file)
		if err := os.WriteFile(path, []byte(strings.ReplaceAll(string(src), "/usr/local/bin/sluice", sluiceBin)), 0o644); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, path)
	}
	out, err := exec.Command(analyze, append([]string{"verify", "--man=no"}, paths[1:]...)...).CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}
