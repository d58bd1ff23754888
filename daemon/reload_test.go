package daemon

import (
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/ctl"
	"github.com/sluice-proxy/sluice/state"
)

// Every key read only at start is reported when it changed, and nothing
// else.
func TestRestartKeys(t *testing.T) {
	base := []string{"loops: 1", "log: {level: info, format: console}", "rules:", "  - tcp 127.0.0.1:0 -> 127.0.0.1:9"}
	c := parse(t, base...)
	if got := restartKeys(c, parse(t, "loops: 1", "log: {level: debug, format: console}", "drain: 3s", "rules: []")); len(got) != 0 {
		t.Fatalf("live keys reported: %q", got)
	}
	nc := parse(t, "loops: 2", "log: {format: json}", "ctl: {socket: /run/x/ctl.sock}", "metrics: {listen: 127.0.0.1:9100}",
		"state: {dir: /var/lib/x}", "pifs: [{name: a, netns: /run/netns/a}]", "rules: []")
	got := restartKeys(c, nc)
	var keys []string
	for _, k := range got {
		key, _, _ := strings.Cut(k, " changed in the file")
		keys = append(keys, key)
	}
	if want := []string{"loops", "ctl.socket", "metrics.listen", "state.dir", "log.format", "pifs"}; !slices.Equal(keys, want) {
		t.Fatalf("keys %q (%q), want %q", keys, got, want)
	}
}

// Without a file, a reload is refused with no-reload; with one whose
// rules are the active table, nothing is applied.
func TestReloadDirect(t *testing.T) {
	lines := []string{"loops: 1", "rules:", "  - tcp 127.0.0.1:0 -> 127.0.0.1:9"}
	d, err := Start(Options{Config: parse(t, lines...), Signals: make(chan os.Signal)})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Stop(t.Context())
	if _, err := d.Reload(state.Self("test")); ctl.CodeOf(err) != ctl.CodeNoReload {
		t.Fatalf("no file: %v", err)
	}
	d.opt.Reload = func() (*config.Config, error) { return parse(t, lines...), nil }
	r, err := d.Reload(state.Self("test"))
	if err != nil || r.Outcome != ctl.ReloadUnchanged || r.Generation != 1 {
		t.Fatalf("same rules: %+v, %v", r, err)
	}
	d.opt.Reload = func() (*config.Config, error) {
		return parse(t, "loops: 1", "pifs: [{name: a, netns: /run/netns/a}]", "rules:", "  - tcp a/127.0.0.1:0 -> 127.0.0.1:9"), nil
	}
	if _, err := d.Reload(state.Self("test")); ctl.CodeOf(err) != ctl.CodeInvalidTable {
		t.Fatalf("a new pif: %v", err)
	}
}
