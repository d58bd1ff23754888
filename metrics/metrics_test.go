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
	stats.UDPDatagramsIn, stats.UDPDatagramsOut, stats.UDPDropped = 15, 16, 17
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
	}
	for c := conn.Code(1); !strings.HasPrefix(c.String(), "code-"); c++ {
		want[fmt.Sprintf("sluice_sessions_ended_total{code=%d,reason=%s}", c, c)] = float64(stats.Ended[c.String()])
	}
	if want["sluice_sessions_ended_total{code=1,reason=done}"] != 11 || want["sluice_sessions_ended_total{code=8,reason=connect-refused}"] != 2 {
		t.Fatal("conn codes renamed? the test's expectations are off")
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("got\n%v\nwant\n%v", got, want)
	}
	types := map[string]dto.MetricType{
		"sluice_sessions": dto.MetricType_GAUGE, "sluice_sessions_ended_total": dto.MetricType_COUNTER,
		"sluice_connect_errors_total": dto.MetricType_COUNTER, "sluice_buffers": dto.MetricType_GAUGE,
		"sluice_pipes_denied_total": dto.MetricType_COUNTER, "sluice_pipes_open": dto.MetricType_GAUGE,
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

// A real engine, real traffic, a real scrape over HTTP.
func TestServeAfterTraffic(t *testing.T) {
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

	reg, err := NewRegistry(e.Stats)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := Serve(netip.MustParseAddrPort("127.0.0.1:0"), reg, func(w io.Writer) { fmt.Fprintln(w, "sluice test status") }, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close(context.Background()) })

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
	var got map[string]float64
	deadline := time.Now().Add(5 * time.Second)
	for {
		got = scrape(t, srv.Addr())
		ok := true
		for k, v := range want {
			if got[k] != v {
				ok = false
			}
		}
		if ok {
			break
		}
		if time.Now().After(deadline) {
			for k, v := range want {
				t.Errorf("%s = %v, want %v", k, got[k], v)
			}
			t.FailNow()
		}
		time.Sleep(20 * time.Millisecond)
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
	if resp.StatusCode != 200 || !strings.Contains(string(page), "sluice test status") || !strings.Contains(string(page), "/metrics") {
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
