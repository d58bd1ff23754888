package metrics

import (
	"io"
	"net"
	"net/http"
	"strings"
	"testing"

	"github.com/sluice-proxy/sluice/rules"
)

// A checked rule's backends are in sluice_backend_up and
// sluice_backend_checks_total, its check latency in a histogram, and each
// backend's checks on the status page.
func TestBackendCheckMetrics(t *testing.T) {
	e, b := startEngine(t)
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refusing := closed.Addr().String()
	closed.Close()
	r, err := rules.Parse("tcp 127.0.0.1:0 -> " + b.Addr() + "," + refusing + " check=tcp check.interval=50ms check.timeout=40ms check.fall=1")
	if err != nil {
		t.Fatal(err)
	}
	lns, err := e.Listen(r)
	if err != nil {
		t.Fatal(err)
	}
	rule := "pif=host,rule=tcp " + lns[0].Addr().String() // labels in sorted order
	res := func(r string) string { return "pif=host,result=" + r + ",rule=tcp " + lns[0].Addr().String() }
	srv := serveEngine(t, e, "v")
	got := scrapeWant(t, srv.Addr(), map[string]float64{
		"sluice_backend_up{backend=" + b.Addr() + "," + rule + "}": 1,
		"sluice_backend_up{backend=" + refusing + "," + rule + "}": 0,
	})
	for _, k := range []string{
		"sluice_backend_checks_total{backend=" + b.Addr() + "," + res("ok") + "}",
		"sluice_backend_checks_total{backend=" + refusing + "," + res("fail") + "}",
		"sluice_backend_check_seconds_count{" + rule + "}",
	} {
		if got[k] < 1 {
			t.Errorf("%s = %v, want at least 1", k, got[k])
		}
	}
	if n := got["sluice_backend_checks_total{backend="+refusing+","+res("ok")+"}"]; n != 0 {
		t.Errorf("refusing backend: %v ok checks", n)
	}
	resp, err := http.Get("http://" + srv.Addr().String() + "/")
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{"last check", "connection refused", ">ok "} {
		if !strings.Contains(string(page), want) {
			t.Errorf("status page has no %q", want)
		}
	}
}
