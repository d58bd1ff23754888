package metrics

import (
	"net/http/httptest"
	"net/netip"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/balance"
	"github.com/sluice-proxy/sluice/engine"
	"github.com/sluice-proxy/sluice/handshake"
	"github.com/sluice-proxy/sluice/rules"
)

// fakeSource serves a fixed Stats and settable Totals.
type fakeSource struct {
	mu     sync.Mutex
	stats  engine.Stats
	totals engine.Totals
}

func (f *fakeSource) Stats() engine.Stats { return f.stats }
func (f *fakeSource) Totals() engine.Totals {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.totals
}

func (f *fakeSource) set(t engine.Totals) {
	f.mu.Lock()
	f.totals = t
	f.mu.Unlock()
}

// Rates over each window compare with the sample a window ago, or the
// oldest one while the page is younger; a counter that went down (a rule
// dropped) reads 0, not a negative rate.
func TestStatusRates(t *testing.T) {
	src := &fakeSource{}
	p := newStatusPage(src, StatusInfo{}, time.Hour) // no tick: samples taken by hand
	defer p.Close()
	t0 := time.Now()
	p.samples = nil
	if r := p.rates(t0, engine.Totals{}); len(r) != 1 || r[0].Conns != "–" || r[0].Up != "–" {
		t.Fatalf("no sample: %+v", r)
	}
	for i := 0; i <= 70; i++ { // a sample a second; from t0+10s on, 100 conns and 1 MiB in per second
		n := uint64(max(0, i-10))
		src.set(engine.Totals{Accepted: 100 * n, BytesUp: n << 20, BytesDown: 2 * n << 10, Datagrams: 0})
		p.take(t0.Add(time.Duration(i) * time.Second))
	}
	if len(p.samples) > 64 {
		t.Errorf("%d samples kept; a minute's worth is enough", len(p.samples))
	}
	now := t0.Add(70 * time.Second)
	r := p.rates(now, src.Totals())
	if len(r) != 2 || r[0].Window != "last 10s" || r[0].Conns != "100.0/s" || r[0].Up != "1.0 MiB/s" || r[0].Down != "2.0 KiB/s" {
		t.Errorf("10 s window: %+v", r)
	}
	if r[1].Window != "last 1m" || r[1].Conns != "100.0/s" {
		t.Errorf("1 min window: %+v", r[1])
	}
	// Younger than a window: the oldest sample, and the span it covers.
	p.samples = nil
	src.set(engine.Totals{Accepted: 10})
	p.take(t0)
	src.set(engine.Totals{Accepted: 50})
	if r := p.rates(t0.Add(4*time.Second), src.Totals()); len(r) != 1 || r[0].Window != "last 4s" || r[0].Conns != "10.0/s" {
		t.Errorf("young page: %+v", r)
	}
	src.set(engine.Totals{Accepted: 5}) // went down
	if r := p.rates(t0.Add(4*time.Second), src.Totals()); r[0].Conns != "0.0/s" {
		t.Errorf("after a drop: %+v", r[0])
	}
}

// The sampler takes samples by itself, and Close stops it (twice is fine).
func TestStatusSampler(t *testing.T) {
	src := &fakeSource{}
	p := newStatusPage(src, StatusInfo{}, 5*time.Millisecond)
	deadline := time.Now().Add(5 * time.Second)
	for {
		p.mu.Lock()
		n := len(p.samples)
		p.mu.Unlock()
		if n >= 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d samples after 5 s", n)
		}
		time.Sleep(5 * time.Millisecond)
	}
	p.Close()
	p.Close()
	select {
	case <-p.done:
	default:
		t.Fatal("sampler still running after Close")
	}
}

func pageOf(t *testing.T, p *StatusPage) string {
	t.Helper()
	w := httptest.NewRecorder()
	p.ServeHTTP(w, httptest.NewRequest("GET", "/", nil))
	if w.Code != 200 || w.Header().Get("Content-Type") != "text/html; charset=utf-8" {
		t.Fatalf("%d %v", w.Code, w.Header())
	}
	return w.Body.String()
}

// Everything the page promises, from a known snapshot.
func TestStatusPageContent(t *testing.T) {
	fail := &rules.Summary{Generation: 3, Kept: 1, Rules: []rules.RuleResult{
		{Listen: "tcp 127.0.0.1:9000", Requested: 1, Failed: []rules.PortError{{Port: 9000, Msg: "address already in use"}}}}}
	okSum := &rules.Summary{Generation: 2, Kept: 1, Added: 2}
	var many []engine.ListenerStats
	for i := 0; i < maxRows+3; i++ {
		many = append(many, engine.ListenerStats{Addr: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(8000+i)), State: engine.ListenerListening})
	}
	st := engine.Stats{Sessions: 17, FDs: 99, Draining: true,
		Table: engine.TableStats{Generation: 2, Recent: []engine.TxnRecord{
			{Op: engine.OpRollback, Generation: 2, Summary: &rules.Summary{Generation: 2, Kept: 1}},
			{Op: engine.OpApply, Generation: 3, Summary: fail},
			{Op: engine.OpCommit, Generation: 2},
			{Op: engine.OpApply, Generation: 2, Summary: okSum},
		}},
		Rules: []engine.RuleStats{
			{Line: "tcp 127.0.0.1:8080 -> 10.0.0.1:80,10.0.0.2:80", Listen: "tcp 127.0.0.1:8080", Pif: "host", Proto: "tcp", Requested: 1,
				Listeners: []engine.ListenerStats{{Addr: netip.MustParseAddrPort("127.0.0.1:8080"), State: engine.ListenerListening, Accepted: 31}},
				Backends: []balance.BackendStats{{Target: netip.MustParseAddrPort("10.0.0.1:80"), Up: true, Active: 4},
					{Target: netip.MustParseAddrPort("10.0.0.2:80"), Up: false, Failures: 6}},
				Policy:   handshake.Stats{Accepted: 31, HealthUp: 2, Refused: map[string]map[string]uint64{"rules": {"denied": 5}, "accept-proxy": {"proxy-bad": 1}}},
				Sessions: 3, BytesUp: 1 << 20, BytesDown: 3 << 30,
				Cert: &engine.CertInfo{Subject: "CN=a.example.com", Expiry: time.Date(2099, 1, 2, 3, 4, 0, 0, time.UTC)}},
			{Line: "tcp 127.0.0.1:8000-8026 -> 10.0.0.9:8000-8026 weak", Listen: "tcp 127.0.0.1:8000-8026", Pif: "ns1", Proto: "tcp", Requested: 28,
				Listeners: many, Failed: []rules.PortError{{Port: 8027, Msg: "address already in use"}},
				Cert: &engine.CertInfo{Subject: "CN=old.example.com", Expiry: time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)}},
			{Line: "udp 127.0.0.1:5353 -> 10.0.0.3:53", Listen: "udp 127.0.0.1:5353", Pif: "host", Proto: "udp", Requested: 1,
				Listeners: []engine.ListenerStats{{Addr: netip.MustParseAddrPort("127.0.0.1:5353"), State: engine.ListenerPending}},
				UDP:       engine.UDPStats{Flows: 7, Opened: 8, DatagramsUp: 9, DatagramsDown: 10, Dropped: 11}},
		}}
	p := newStatusPage(&fakeSource{stats: st}, StatusInfo{Version: "v9.9", Config: "/etc/<sluice>.yaml", Refresh: 3 * time.Second}, time.Hour)
	defer p.Close()
	page := pageOf(t, p)
	for _, s := range []string{
		`<meta http-equiv="refresh" content="3">`, `<meta name="viewport" content="width=device-width, initial-scale=1">`,
		"sluice v9.9", "table generation 2", "draining", "/etc/&lt;sluice&gt;.yaml",
		`<b id="sessions">17</b>`, "Open fds<b>99</b>",
		"tcp 127.0.0.1:8080 -&gt; 10.0.0.1:80,10.0.0.2:80", "1/1 ports bound", "accepted 31", "refused 6", "in 1.0 MiB", "out 3.0 GiB",
		"health replies 2 ok, 0 fail", "10.0.0.1:80", "10.0.0.2:80", "backend (1/2 up)", `<span class="pill">up</span>`, `<span class="pill bad">down</span>`,
		`<span class="pill bad">27/28 ports bound</span>`, "port 8027: address already in use", "… and 3 more", "pif ns1",
		"flows 7 live, 8 opened", "datagrams 9 in, 10 out, 11 dropped", `<span class="warn">pending</span>`,
		"certificate <code>CN=a.example.com</code> · expires 2099-01-02 03:04 UTC (",
		`certificate <code>CN=old.example.com</code> · expires <span class="pill bad">2000-01-01 00:00 UTC (expired)</span>`,
		"Last transactions", "tcp 127.0.0.1:9000: port 9000: address already in use", "1/2/0", `href="/metrics"`,
	} {
		if !strings.Contains(page, s) {
			t.Errorf("page lacks %q", s)
		}
	}
	// Newest first: rollback, the failed apply, commit, the first apply.
	ops := regexp.MustCompile(`<tr><td>[0-9:]+</td><td>(\w+)</td><td>(\d+)</td>`).FindAllStringSubmatch(page, -1)
	var got []string
	for _, m := range ops {
		got = append(got, m[1]+" "+m[2])
	}
	if strings.Join(got, ", ") != "rollback 2, apply 3, commit 2, apply 2" {
		t.Errorf("transactions: %v", got)
	}
	// No external asset: no script, stylesheet or image is fetched.
	for _, bad := range []string{"<script", "<link", "<img", "src=", "url(", "http://", "https://"} {
		if strings.Contains(page, bad) {
			t.Errorf("page has %q: an external asset or a script", bad)
		}
	}
	if n := len(regexp.MustCompile(`<tr><td><code>127\.0\.0\.1:80[0-2]\d</code>`).FindAllString(page, -1)); n != maxRows {
		t.Errorf("%d listener rows of the range rule, want %d", n, maxRows)
	}
}

// An engine with no rule yet: the page says so instead of an empty list.
func TestStatusPageEmpty(t *testing.T) {
	p := newStatusPage(&fakeSource{stats: engine.Stats{FDs: -1}}, StatusInfo{Version: "x"}, time.Hour)
	defer p.Close()
	page := pageOf(t, p)
	for _, s := range []string{"No rules: nothing is forwarded.", "No table operation yet.", "Open fds<b>?</b>", "running"} {
		if !strings.Contains(page, s) {
			t.Errorf("page lacks %q", s)
		}
	}
}

// A range rule's ports each have a pool; a backend in several is shown once,
// down if any pool has it down, its counts added up.
func TestMergeBackends(t *testing.T) {
	a, b := netip.MustParseAddrPort("10.0.0.1:80"), netip.MustParseAddrPort("10.0.0.2:80")
	got := mergeBackends([]balance.BackendStats{
		{Target: a, Up: true, Active: 1, Failures: 0}, {Target: b, Up: true, Active: 2},
		{Target: a, Up: false, Active: 3, Failures: 4}, {Target: b, Up: true, Active: 5, Failures: 6},
	})
	want := []backendView{{Addr: "10.0.0.1:80", Up: false, Active: 4, Failures: 4}, {Addr: "10.0.0.2:80", Up: true, Active: 7, Failures: 6}}
	if len(got) != 2 || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("got %+v, want %+v", got, want)
	}
}
