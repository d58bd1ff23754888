package metrics

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"sort"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"go.uber.org/zap"

	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/engine"
	"github.com/sluice-proxy/sluice/handshake"
	"github.com/sluice-proxy/sluice/internal/logsink"
	"github.com/sluice-proxy/sluice/internal/testpeer"
	"github.com/sluice-proxy/sluice/rules"
)

// samples flattens families into "name{label=value,...} value" lines,
// sorted, for the families whose name starts with prefix.
func samples(fams map[string]*dto.MetricFamily, prefix string) map[string]float64 {
	out := map[string]float64{}
	for name, f := range fams {
		if !strings.HasPrefix(name, prefix) {
			continue
		}
		for _, m := range f.Metric {
			var ls []string
			for _, l := range m.Label {
				ls = append(ls, l.GetName()+"="+l.GetValue())
			}
			sort.Strings(ls)
			key := name
			if len(ls) > 0 {
				key += "{" + strings.Join(ls, ",") + "}"
			}
			var v float64
			switch f.GetType() {
			case dto.MetricType_COUNTER:
				v = m.Counter.GetValue()
			case dto.MetricType_GAUGE:
				v = m.Gauge.GetValue()
			case dto.MetricType_HISTOGRAM:
				// As the text format writes one: _count, _sum, a _bucket per le.
				h := m.Histogram
				withLabels := func(name string, more ...string) string {
					all := append(append([]string(nil), ls...), more...)
					sort.Strings(all)
					if len(all) == 0 {
						return name
					}
					return name + "{" + strings.Join(all, ",") + "}"
				}
				out[withLabels(name+"_count")] = float64(h.GetSampleCount())
				out[withLabels(name+"_sum")] = h.GetSampleSum()
				for _, b := range h.Bucket {
					out[withLabels(name+"_bucket", fmt.Sprintf("le=%g", b.GetUpperBound()))] = float64(b.GetCumulativeCount())
				}
				out[withLabels(name+"_bucket", "le=+Inf")] = float64(h.GetSampleCount())
				continue
			default:
				v = -1
			}
			out[key] = v
		}
	}
	return out
}

// Every family, with its type, labels and value, from a known snapshot.
func TestCollector(t *testing.T) {
	stats := engine.Stats{
		Loops: 3, Sessions: 7, ConnectErrors: 5,
		Ended: map[string]uint64{"done": 11, "connect-refused": 2, "from-the-future": 1},
	}
	stats.Pools.BuffersInUse, stats.Pools.BuffersFree, stats.Pools.PipesInUse, stats.Pools.PipesFree = 4, 6, 1, 2
	stats.PipesOpen, stats.PipesDenied = 3, 9
	stats.UDPFlows, stats.UDPFlowsOpened, stats.UDPFlowsExpired = 12, 13, 14
	stats.UDPDatagramsUp, stats.UDPDatagramsDown, stats.UDPDropped = 15, 16, 17
	stats.UDPFlowsUnanswered, stats.UDPFlowsDenied = 18, 19
	stats.FDs, stats.Draining = 42, true
	h := engine.HistogramSnapshot{Bounds: []float64{0.001, 0.01}, Counts: []uint64{1, 2, 3}, Sum: 1.5}
	stats.Table = engine.TableStats{Generation: 4, Pending: true, Applies: 5, Commits: 3, Rollbacks: 2, ApplyTime: h,
		Committed: 3, RolledBack: 1, Failed: 6}
	tcpRule := engine.RuleStats{Listen: "tcp 0.0.0.0:80", Pif: "host", Proto: "tcp", Requested: 2,
		Listeners: make([]engine.ListenerStats, 1), Failed: make([]rules.PortError, 1),
		Policy: handshake.Stats{Accepted: 20, HealthUp: 3, HealthDown: 4, ProxyV1: 5, ProxyV2: 6,
			Refused: map[string]map[string]uint64{"rules": {"denied": 7}, "accept-proxy": {"proxy-bad": 8}}},
		Sessions: 9, BytesUp: 1000, BytesDown: 3000, Spliced: 2500, ConnectErrors: 10, Retries: 11,
		Terms: map[string]uint64{"--": 12, "PR": 15}, Handshake: h, Connect: h, Duration: h,
		Cert: &engine.CertInfo{Subject: "CN=a.example.com", Expiry: time.Now().Add(100 * time.Hour)}}
	stats.TLS = engine.TLSStats{OK: 30, Failed: 31, TLS12: 32, TLS13: 33, Resumed: 34, HandshakeTime: h}
	udpRule := engine.RuleStats{Listen: "udp ns1/10.0.0.1:53", Pif: "ns1", Proto: "udp", Requested: 1,
		Listeners: make([]engine.ListenerStats, 1),
		UDP:       engine.UDPStats{Flows: 21, Opened: 22, DatagramsUp: 23, DatagramsDown: 24, Dropped: 25}}
	stats.Rules = []engine.RuleStats{tcpRule, udpRule}
	scrapes := 0
	reg, err := NewRegistry(func() engine.Stats { scrapes++; return stats })
	if err != nil {
		t.Fatal(err)
	}
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	if scrapes != 1 {
		t.Fatalf("one scrape read Stats %d times, want once", scrapes)
	}
	byName := map[string]*dto.MetricFamily{}
	for _, f := range fams {
		byName[f.GetName()] = f
	}
	got := samples(byName, "sluice_")
	// Seconds left on the certificate: read at scrape time.
	const expiry = "sluice_rule_tls_cert_expiry_seconds{pif=host,rule=tcp 0.0.0.0:80}"
	if v := got[expiry]; v < 100*3600-60 || v > 100*3600 {
		t.Errorf("%s = %v, want about %d", expiry, v, 100*3600)
	}
	delete(got, expiry)
	want := map[string]float64{
		"sluice_event_loops":                                        3,
		"sluice_sessions":                                           7,
		"sluice_connect_errors_total":                               5,
		"sluice_buffers{state=in_use}":                              4,
		"sluice_buffers{state=free}":                                6,
		"sluice_pipes{state=in_use}":                                1,
		"sluice_pipes{state=free}":                                  2,
		"sluice_pipes_open":                                         3,
		"sluice_pipes_denied_total":                                 9,
		"sluice_sessions_ended_total{code=,reason=from-the-future}": 1,
		"sluice_udp_flows":                                          12,
		"sluice_udp_flows_opened_total":                             13,
		"sluice_udp_flows_expired_total":                            14,
		"sluice_udp_datagrams_total{direction=to_target}":           15,
		"sluice_udp_datagrams_total{direction=to_client}":           16,
		"sluice_udp_dropped_total":                                  17,
		"sluice_udp_flows_unanswered_total":                         18,
		"sluice_udp_flows_denied_total":                             19,
		"sluice_log_dropped_total":                                  0,
		"sluice_fds_open":                                           42,
		"sluice_draining":                                           1,

		"sluice_table_generation":                            4,
		"sluice_table_pending":                               1,
		"sluice_table_confirm_deadline_seconds":              0,
		"sluice_table_operations_total{op=apply}":            5,
		"sluice_table_operations_total{op=commit}":           3,
		"sluice_table_operations_total{op=rollback}":         2,
		"sluice_ctl_transactions_total{outcome=committed}":   3,
		"sluice_ctl_transactions_total{outcome=rolled_back}": 1,
		"sluice_ctl_transactions_total{outcome=failed}":      6,
		"sluice_tls_handshakes_total{result=ok}":             30,
		"sluice_tls_handshakes_total{result=failed}":         31,
		"sluice_tls_handshake_versions_total{version=1.2}":   32,
		"sluice_tls_handshake_versions_total{version=1.3}":   33,
		"sluice_tls_resumptions_total":                       34,
		"sluice_tls_handshake_seconds_count":                 6,
		"sluice_tls_handshake_seconds_sum":                   1.5,
		"sluice_tls_handshake_seconds_bucket{le=0.001}":      1,
		"sluice_tls_handshake_seconds_bucket{le=0.01}":       3,
		"sluice_tls_handshake_seconds_bucket{le=+Inf}":       6,
		"sluice_table_apply_seconds_count":                   6,
		"sluice_table_apply_seconds_sum":                     1.5,
		"sluice_table_apply_seconds_bucket{le=0.001}":        1,
		"sluice_table_apply_seconds_bucket{le=0.01}":         3,
		"sluice_table_apply_seconds_bucket{le=+Inf}":         6,

		"sluice_rule_ports{pif=host,rule=tcp 0.0.0.0:80,state=bound}":                                1,
		"sluice_rule_ports{pif=host,rule=tcp 0.0.0.0:80,state=failed}":                               1,
		"sluice_rule_connections_total{pif=host,rule=tcp 0.0.0.0:80}":                                20,
		"sluice_rule_refused_total{pif=host,reason=denied,rule=tcp 0.0.0.0:80,step=rules}":           7,
		"sluice_rule_refused_total{pif=host,reason=proxy-bad,rule=tcp 0.0.0.0:80,step=accept-proxy}": 8,
		"sluice_rule_sessions{pif=host,rule=tcp 0.0.0.0:80}":                                         9,
		"sluice_rule_terminations_total{pif=host,rule=tcp 0.0.0.0:80,term=--}":                       12,
		"sluice_rule_terminations_total{pif=host,rule=tcp 0.0.0.0:80,term=PR}":                       15,
		"sluice_rule_bytes_total{direction=in,pif=host,rule=tcp 0.0.0.0:80}":                         1000,
		"sluice_rule_bytes_total{direction=out,pif=host,rule=tcp 0.0.0.0:80}":                        3000,
		"sluice_rule_bytes_moved_total{pif=host,rule=tcp 0.0.0.0:80,via=splice}":                     2500,
		"sluice_rule_bytes_moved_total{pif=host,rule=tcp 0.0.0.0:80,via=buffer}":                     1500,
		"sluice_rule_connect_errors_total{pif=host,rule=tcp 0.0.0.0:80}":                             10,
		"sluice_rule_connect_retries_total{pif=host,rule=tcp 0.0.0.0:80}":                            11,
		"sluice_rule_health_replies_total{pif=host,result=ok,rule=tcp 0.0.0.0:80}":                   3,
		"sluice_rule_health_replies_total{pif=host,result=fail,rule=tcp 0.0.0.0:80}":                 4,
		"sluice_rule_proxy_headers_total{pif=host,rule=tcp 0.0.0.0:80,version=v1}":                   5,
		"sluice_rule_proxy_headers_total{pif=host,rule=tcp 0.0.0.0:80,version=v2}":                   6,

		"sluice_rule_ports{pif=ns1,rule=udp ns1/10.0.0.1:53,state=bound}":                       1,
		"sluice_rule_ports{pif=ns1,rule=udp ns1/10.0.0.1:53,state=failed}":                      0,
		"sluice_rule_udp_flows{pif=ns1,rule=udp ns1/10.0.0.1:53}":                               21,
		"sluice_rule_udp_flows_opened_total{pif=ns1,rule=udp ns1/10.0.0.1:53}":                  22,
		"sluice_rule_udp_datagrams_total{direction=to_target,pif=ns1,rule=udp ns1/10.0.0.1:53}": 23,
		"sluice_rule_udp_datagrams_total{direction=to_client,pif=ns1,rule=udp ns1/10.0.0.1:53}": 24,
		"sluice_rule_udp_dropped_total{pif=ns1,rule=udp ns1/10.0.0.1:53}":                       25,
	}
	for _, name := range []string{"handshake", "connect", "session"} {
		base := "sluice_rule_" + name + "_seconds"
		lb := "pif=host,rule=tcp 0.0.0.0:80"
		want[base+"_count{"+lb+"}"], want[base+"_sum{"+lb+"}"] = 6, 1.5
		want[base+"_bucket{le=0.001,"+lb+"}"], want[base+"_bucket{le=0.01,"+lb+"}"], want[base+"_bucket{le=+Inf,"+lb+"}"] = 1, 3, 6
	}
	// A process-wide count (the log writer's), not one of stats'.
	want["sluice_log_dropped_total"] = float64(logsink.Dropped())
	codes := endCodes()
	if len(codes) == 0 || codes[len(codes)-1] < conn.CodeNoBackend || codes[0] != conn.CodeDone {
		t.Fatalf("end codes %v: past the reserved numbers, up to no-backend at least", codes)
	}
	for _, c := range codes {
		want[fmt.Sprintf("sluice_sessions_ended_total{code=%d,reason=%s}", c, c)] = float64(stats.Ended[c.String()])
	}
	if want["sluice_sessions_ended_total{code=1,reason=done}"] != 11 || want["sluice_sessions_ended_total{code=8,reason=connect-refused}"] != 2 {
		t.Fatal("conn codes renamed? the test's expectations are off")
	}
	for k, v := range want {
		if g, ok := got[k]; !ok || g != v {
			t.Errorf("%s = %v (present %v), want %v", k, g, ok, v)
		}
	}
	for k, v := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("unexpected sample %s = %v", k, v)
		}
	}
	types := map[string]dto.MetricType{
		"sluice_sessions": dto.MetricType_GAUGE, "sluice_sessions_ended_total": dto.MetricType_COUNTER,
		"sluice_connect_errors_total": dto.MetricType_COUNTER, "sluice_buffers": dto.MetricType_GAUGE,
		"sluice_pipes_denied_total": dto.MetricType_COUNTER, "sluice_pipes_open": dto.MetricType_GAUGE,
		"sluice_rule_session_seconds": dto.MetricType_HISTOGRAM, "sluice_rule_sessions": dto.MetricType_GAUGE,
		"sluice_rule_bytes_total": dto.MetricType_COUNTER, "sluice_table_apply_seconds": dto.MetricType_HISTOGRAM,
		"sluice_ctl_transactions_total": dto.MetricType_COUNTER, "sluice_fds_open": dto.MetricType_GAUGE,
	}
	for name, typ := range types {
		if f := byName[name]; f == nil || f.GetType() != typ || f.GetHelp() == "" {
			t.Errorf("%s: %v", name, f)
		}
	}
	for _, std := range []string{"go_goroutines", "process_open_fds"} {
		if byName[std] == nil {
			t.Errorf("no %s: the standard collectors are missing", std)
		}
	}
}

// scrape fetches and parses /metrics.
func scrape(t *testing.T, addr netip.AddrPort) map[string]float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr.String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("GET /metrics: %s", resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return samples(fams, "")
}

// startEngine runs an engine of two loops and a hash backend (testpeer)
// for the test.
func startEngine(t *testing.T) (*engine.Engine, *testpeer.Backend) {
	t.Helper()
	e, err := engine.New(engine.Config{Loops: 2})
	if err != nil {
		t.Fatal(err)
	}
	e.Start()
	t.Cleanup(func() { e.Shutdown(context.Background()) })
	b, err := testpeer.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	return e, b
}

// serveEngine serves e's metrics and status page (as version) on a free
// loopback port for the test.
func serveEngine(t *testing.T, e *engine.Engine, version string) *Server {
	t.Helper()
	reg, err := NewRegistry(e.Stats)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := Serve(netip.MustParseAddrPort("127.0.0.1:0"), reg, NewStatusPage(e, StatusInfo{Version: version}), zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close(context.Background()) })
	return srv
}

// scrapeWant scrapes addr until every sample of want is there with its value
// (sessions end a little after their clients see them end), for 5 s at
// most; then each one that is not is an error. It returns the last scrape.
func scrapeWant(t *testing.T, addr netip.AddrPort, want map[string]float64) map[string]float64 {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := scrape(t, addr)
		ok := true
		for k, v := range want {
			if g, present := got[k]; !present || g != v {
				ok = false
			}
		}
		if ok {
			return got
		}
		if time.Now().After(deadline) {
			for k, v := range want {
				if g, present := got[k]; !present || g != v {
					t.Errorf("%s = %v (present %v), want %v", k, g, present, v)
				}
			}
			return got
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A real engine, real traffic, a real scrape over HTTP.
func TestServeAfterTraffic(t *testing.T) {
	e, b := startEngine(t)
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refusing := closed.Addr().String()
	closed.Close()

	listen := func(line string) netip.AddrPort {
		r, err := rules.Parse(line)
		if err != nil {
			t.Fatal(err)
		}
		lns, err := e.Listen(r)
		if err != nil {
			t.Fatal(err)
		}
		return lns[0].Addr()
	}
	good := listen("tcp 127.0.0.1:0 -> " + b.Addr())
	bad := listen("tcp 127.0.0.1:0 -> " + refusing)

	srv := serveEngine(t, e, "test-version")

	before := scrape(t, srv.Addr())
	if before["sluice_sessions_ended_total{code=1,reason=done}"] != 0 || before["sluice_event_loops"] != 2 {
		t.Fatalf("before traffic: %v", before)
	}
	const n = 3
	for i := range n {
		c, err := net.Dial("tcp", good.String())
		if err != nil {
			t.Fatal(err)
		}
		err = testpeer.Exchange(c, 100<<10, 1<<20, uint64(i))
		c.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	c, err := net.Dial("tcp", bad.String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if k, err := c.Read(make([]byte, 1)); k != 0 || err == nil {
		t.Fatalf("refused backend: read %d, %v", k, err)
	}
	c.Close()

	want := map[string]float64{
		"sluice_sessions_ended_total{code=1,reason=done}":            n,
		"sluice_sessions_ended_total{code=8,reason=connect-refused}": 1,
		"sluice_connect_errors_total":                                1,
		"sluice_sessions":                                            0,
		"sluice_buffers{state=in_use}":                               0,
		"sluice_pipes{state=in_use}":                                 0,
		"sluice_event_loops":                                         2,
	}
	got := scrapeWant(t, srv.Addr(), want)
	if t.Failed() {
		t.FailNow()
	}
	// 1 MiB down per session went through buffers or pipes, now free.
	if got["sluice_buffers{state=free}"]+got["sluice_pipes{state=free}"] == 0 {
		t.Errorf("no pooled buffer or pipe after traffic: %v", got)
	}
	if got["process_open_fds"] <= 0 || got["go_goroutines"] <= 0 {
		t.Errorf("standard collectors: fds %v, goroutines %v", got["process_open_fds"], got["go_goroutines"])
	}

	resp, err := http.Get("http://" + srv.Addr().String() + "/")
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(page), "sluice test-version") || !strings.Contains(string(page), `href="/metrics"`) ||
		!strings.Contains(string(page), good.String()) || resp.Header.Get("Content-Type") != "text/html; charset=utf-8" {
		t.Errorf("status page: %s\n%s", resp.Status, page)
	}
	resp, err = http.Get("http://" + srv.Addr().String() + "/nothing-here")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 404 {
		t.Errorf("GET /nothing-here: %s", resp.Status)
	}
}

func TestServeAddressInUse(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	reg, err := NewRegistry(func() engine.Stats { return engine.Stats{} })
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().(*net.TCPAddr).AddrPort()
	_, err = Serve(addr, reg, nil, zap.NewNop())
	if err == nil || !strings.Contains(err.Error(), "metrics listen "+addr.String()) || !strings.Contains(err.Error(), "address already in use") {
		t.Fatalf("err = %v", err)
	}
}
