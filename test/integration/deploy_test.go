package integration

import (
	"encoding/json"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"

	"github.com/sluice-proxy/sluice/engine"
)

// deploy/ ships Prometheus alert rules and a Grafana dashboard for sluice's
// metrics. They must load (promtool, from Debian's prometheus package), the
// alerts must fire as their unit tests say, and every sluice_* metric they
// name must be one the daemon serves: a renamed family fails here.
func TestDeployAlertRules(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatal("promtool not found: scripts/test-deps.sh installs Debian's prometheus package")
	}
	for _, args := range [][]string{
		{"check", "rules", "sluice-alerts.yaml"},
		{"test", "rules", "sluice-alerts_test.yaml"},
	} {
		cmd := exec.Command(promtool, args...)
		cmd.Dir = "../../deploy/prometheus"
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	src, err := os.ReadFile("../../deploy/prometheus/sluice-alerts.yaml")
	if err != nil {
		t.Fatal(err)
	}
	checkMetricNames(t, "deploy/prometheus/sluice-alerts.yaml", string(src))
}

func TestDeployDashboard(t *testing.T) {
	src, err := os.ReadFile("../../deploy/grafana/sluice-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		UID    string `json:"uid"`
		Panels []struct {
			ID      int    `json:"id"`
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(src, &dash); err != nil {
		t.Fatalf("deploy/grafana/sluice-dashboard.json: %v", err)
	}
	if dash.UID == "" || len(dash.Panels) < 10 {
		t.Fatalf("dashboard: uid %q, %d panels", dash.UID, len(dash.Panels))
	}
	ids := map[int]bool{}
	var exprs []string
	for _, p := range dash.Panels {
		if ids[p.ID] || len(p.Targets) == 0 {
			t.Errorf("panel %q: id %d repeated, or no query", p.Title, p.ID)
		}
		ids[p.ID] = true
		for _, q := range p.Targets {
			exprs = append(exprs, q.Expr)
		}
	}
	checkMetricNames(t, "deploy/grafana/sluice-dashboard.json", strings.Join(exprs, "\n"))
}

var sluiceMetric = regexp.MustCompile(`\bsluice_[a-z_]+`)

// checkMetricNames fails for every sluice_* name in src that is not a family
// the daemon serves (a histogram's _bucket, _sum and _count included).
func checkMetricNames(t *testing.T, file, src string) {
	t.Helper()
	served := map[string]bool{}
	for _, f := range engine.Families {
		name := "sluice_" + f.Name
		served[name] = true
		if f.Kind == engine.KindHistogram {
			for _, s := range []string{"_bucket", "_sum", "_count"} {
				served[name+s] = true
			}
		}
	}
	names := sluiceMetric.FindAllString(src, -1)
	if len(names) == 0 {
		t.Errorf("%s names no sluice_* metric", file)
	}
	for _, n := range names {
		if !served[n] {
			t.Errorf("%s: %s is not a metric sluice serves (engine/counternames.go)", file, n)
		}
	}
}
