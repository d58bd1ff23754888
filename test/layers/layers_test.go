// Package layers checks the rule of imports of docs/architecture.md: a
// package imports only packages of a lower layer, never one above it, so
// rules stays free of I/O, the data path never depends on the control plane,
// and the daemon's wiring stays at the top.
package layers

import (
	"encoding/json"
	"io"
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/sluice-proxy/sluice/"

// layer of every package of the module (tests and commands included). A
// package may import one of a strictly lower layer. A new package must be
// placed here: the test fails until it is.
var layer = map[string]int{
	// 0: leaves. rules is the model and imports nothing of ours.
	"rules": 0, "limits": 0, "observe": 0, "handshake/hello": 0,
	"internal/bitnames": 0, "internal/rawsys": 0, "internal/netns": 0, "internal/logsink": 0, "internal/testpeer": 0, "internal/testcert": 0, "internal/etcdtest": 0,
	"internal/netnstest": 1,
	// 1: one connection, one direction, one pool; the configuration file.
	"conn": 1, "channel": 1, "balance": 1, "config": 1, "tlsconf": 1,
	// state: the committed table on disk (imports rules only).
	"state": 1,
	// 2: the handshake chain over a conn.
	"handshake": 2,
	// 2: one active health check of a backend.
	"check": 2,
	// 3: the event loops that wire them.
	"engine": 3,
	// 4: what drives or reads the engine: ctl through its small Engine
	// interface (it never imports engine), metrics and the status page.
	"ctl": 4, "ctl/ctltest": 4, "metrics": 4,
	"store/etcd": 5,
	// 6: the daemon's life; 7: the binary, benchmarks and end-to-end tests.
	"daemon":     6,
	"cmd/sluice": 7, "bench": 7, "bench/peers": 7, "test/integration": 7, "test/layers": 7,
}

type pkg struct {
	ImportPath string
	Imports    []string
}

func TestNoPackageReachesUpward(t *testing.T) {
	out, err := exec.Command("go", "list", "-json", module+"...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	dec := json.NewDecoder(strings.NewReader(string(out)))
	seen := 0
	for {
		var p pkg
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("decoding go list: %v", err)
		}
		seen++
		name := strings.TrimPrefix(p.ImportPath, module)
		from, ok := layer[name]
		if !ok {
			t.Errorf("package %s has no layer: place it in test/layers and docs/architecture.md", name)
			continue
		}
		check := func(imports []string, what string) {
			for _, imp := range imports {
				if !strings.HasPrefix(imp, module) {
					continue
				}
				dep := strings.TrimPrefix(imp, module)
				to, ok := layer[dep]
				if !ok {
					continue // reported once, as its own package
				}
				if to >= from && dep != name {
					t.Errorf("%s (layer %d) %s %s (layer %d): a package imports only lower layers", name, from, what, dep, to)
				}
			}
		}
		// Only the package itself: its tests may drive it from above
		// (engine's tests talk to it through a real ctl server).
		check(p.Imports, "imports")
	}
	if seen < 10 {
		t.Fatalf("go list listed %d packages; want the whole module", seen)
	}
}
