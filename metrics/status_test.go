package metrics

import (
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
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
// oldest one while the page is younger: then the card keeps its window's
// name and says it is filling, with the span its figures cover. A counter
// that went down (a rule dropped) reads 0, not a negative rate.
func TestStatusRates(t *testing.T) {
	src := &fakeSource{}
	p := newStatusPage(src, StatusInfo{}, time.Hour, rateWindows) // no tick: samples taken by hand
	defer p.Close()
	t0 := time.Now()
	p.samples = nil
	r := p.rates(t0, engine.Totals{})
	if len(r) != 2 || r[0].Conns != "–" || r[0].Up != "–" || r[0].Window != "last 10 s" || r[0].Filling != "filling: 0 s so far" ||
		r[1].Window != "last 60 s" || r[1].Conns != "–" {
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
	r = p.rates(now, src.Totals())
	if len(r) != 2 || r[0].Window != "last 10 s" || r[0].Filling != "" || r[0].Conns != "100.0/s" || r[0].Up != "1.0 MiB/s" || r[0].Down != "2.0 KiB/s" {
		t.Errorf("10 s window: %+v", r)
	}
	if r[1].Window != "last 60 s" || r[1].Filling != "" || r[1].Conns != "100.0/s" {
		t.Errorf("1 min window: %+v", r[1])
	}
	// Younger than a window: the oldest sample, and the span it covers.
	p.samples = nil
	src.set(engine.Totals{Accepted: 10})
	p.take(t0)
	src.set(engine.Totals{Accepted: 50})
	r = p.rates(t0.Add(4*time.Second), src.Totals())
	for i, w := range []string{"last 10 s", "last 60 s"} {
		if len(r) != 2 || r[i].Window != w || r[i].Filling != "filling: 4 s so far" || r[i].Conns != "10.0/s" {
			t.Errorf("young page, card %d: %+v", i, r)
		}
	}
	// Older than the short window, younger than the long one.
	src.set(engine.Totals{Accepted: 10 + 11*10})
	p.take(t0.Add(11 * time.Second))
	r = p.rates(t0.Add(11*time.Second), src.Totals())
	if r[0].Filling != "" || r[0].Conns != "10.0/s" || r[1].Filling != "filling: 11 s so far" || r[1].Conns != "10.0/s" {
		t.Errorf("11 s old page: %+v", r)
	}
	src.set(engine.Totals{Accepted: 5}) // went down
	if r := p.rates(t0.Add(11*time.Second), src.Totals()); r[1].Conns != "0.0/s" {
		t.Errorf("after a drop: %+v", r[1])
	}
}

// The sampler takes samples by itself, and Close stops it (twice is fine).
func TestStatusSampler(t *testing.T) {
	src := &fakeSource{}
	p := newStatusPage(src, StatusInfo{}, 5*time.Millisecond, rateWindows)
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
				Policy: handshake.Stats{RateRefused: 1, MaxConnRefused: 2,
					Refused: map[string]map[string]uint64{"rules": {"rate-limited": 3, "denied": 1}, "sni": {"no-route": 0}}},
				Cert: &engine.CertInfo{Subject: "CN=old.example.com", Expiry: time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)}},
			{Line: "udp 127.0.0.1:5353 -> 10.0.0.3:53", Listen: "udp 127.0.0.1:5353", Pif: "host", Proto: "udp", Requested: 1,
				Listeners: []engine.ListenerStats{{Addr: netip.MustParseAddrPort("127.0.0.1:5353"), State: engine.ListenerPending}},
				UDP:       engine.UDPStats{Flows: 7, Opened: 8, DatagramsUp: 9, DatagramsDown: 10, Dropped: 11}},
		}}
	p := newStatusPage(&fakeSource{stats: st}, StatusInfo{Version: "v9.9", Config: "/etc/<sluice>.yaml", Refresh: 3 * time.Second}, time.Hour, rateWindows)
	defer p.Close()
	page := pageOf(t, p)
	for _, s := range []string{
		`<meta http-equiv="refresh" content="3">`, `<meta name="viewport" content="width=device-width, initial-scale=1">`,
		"sluice v9.9", "table generation 2", "draining", "/etc/&lt;sluice&gt;.yaml",
		`<b id="sessions">17</b>`, "Open fds<b>99</b>",
		"tcp 127.0.0.1:8080 -&gt; 10.0.0.1:80,10.0.0.2:80", "1/1 ports bound", "accepted 31", "refused 6: denied 5, proxy-bad 1 ·", "refused 4: rate-limited 3 (maxconn 2, rate 1), denied 1 ·",
		`Refused<b id="refused">10</b><span class="meta">denied 6, rate-limited 3 (maxconn 2, rate 1), proxy-bad 1 · by the rules of this table`, "in 1.0 MiB", "out 3.0 GiB",
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
	if strings.Contains(page, "no-route") {
		t.Error("a reason with no refusal is shown")
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
	p := newStatusPage(&fakeSource{stats: engine.Stats{FDs: -1}}, StatusInfo{Version: "x"}, time.Hour, rateWindows)
	defer p.Close()
	page := pageOf(t, p)
	for _, s := range []string{"No rules: nothing is forwarded.", "No table operation yet.", "Open fds<b>?</b>", "running",
		`Refused<b id="refused">0</b><span class="meta">none · `} {
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

// getPage fetches url over HTTP and returns the page.
func getPage(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET %s: %s %v", url, resp.Status, err)
	}
	return string(b)
}

// pageUntil fetches url until the page matches every pattern, for 5 s at
// most (sessions are counted a little after their clients see them), and
// returns the last page; each pattern still missing is then an error.
func pageUntil(t *testing.T, url string, patterns ...string) string {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		page := getPage(t, url)
		var missing []string
		for _, p := range patterns {
			if !regexp.MustCompile(p).MatchString(page) {
				missing = append(missing, p)
			}
		}
		if len(missing) == 0 {
			return page
		}
		if time.Now().After(deadline) {
			for _, p := range missing {
				t.Errorf("page does not match %q", p)
			}
			return page
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A real engine behind a real HTTP server: the rate cards name their window
// and say they fill until the page is that old, then stop saying it; a
// maxconn=1 rule with a second client refused shows the refusal by reason,
// on the rule and in the totals.
func TestStatusPageLive(t *testing.T) {
	if !engine.CountersEnabled {
		t.Skip("built with -tags sluice_nocounters: no per-rule counters to check")
	}
	e, b := startEngine(t)
	addr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	r, err := rules.Parse("tcp " + addr + " -> " + b.Addr() + " maxconn=1")
	if err != nil {
		t.Fatal(err)
	}
	if sum, err := e.Apply([]*rules.Rule{r}); err != nil || !sum.OK() {
		t.Fatalf("apply: %v %v", err, sum.Failures())
	}
	if _, err := e.Commit(); err != nil {
		t.Fatal(err)
	}
	// Windows of 1 s and 3 s, sampled every 50 ms: the page fills in 3 s.
	p := newStatusPage(e, StatusInfo{Version: "live"}, 50*time.Millisecond, []time.Duration{time.Second, 3 * time.Second})
	defer p.Close()
	srv := httptest.NewServer(p)
	defer srv.Close()

	page := getPage(t, srv.URL)
	for _, w := range []string{"1", "3"} {
		re := `Rates per second, <span class="window">last ` + w + ` s</span> <span class="filling">\(filling: [01] s so far\)</span><b>`
		if !regexp.MustCompile(re).MatchString(page) {
			t.Errorf("a young page's %s s card does not match %q", w, re)
		}
	}

	held, err := net.Dial("tcp", addr) // the one connection maxconn=1 lets in: it sends nothing, the backend waits
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	pageUntil(t, srv.URL, `<b id="sessions">1</b>`)
	// The second is reset at once: at the read, or already in the dial.
	if refused, err := net.Dial("tcp", addr); err == nil {
		refused.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := refused.Read(make([]byte, 1)); err == nil || isTimeout(err) {
			t.Fatalf("the second client was not refused: read %d, %v", n, err)
		}
		refused.Close()
	} else if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatal(err)
	}
	pageUntil(t, srv.URL,
		`accepted 2 · refused 1: rate-limited 1 \(maxconn 1\) ·`,
		`Refused<b id="refused">1</b><span class="meta">rate-limited 1 \(maxconn 1\) · by the rules of this table</span>`)

	// Once the page is older than the long window, no card is filling.
	time.Sleep(time.Until(p.started.Add(3*time.Second + 100*time.Millisecond)))
	page = pageUntil(t, srv.URL, `Rates per second, <span class="window">last 1 s</span><b>`, `Rates per second, <span class="window">last 3 s</span><b>`)
	if strings.Contains(page, "(filling:") {
		t.Errorf("a card still fills on a page older than its window:\n%s", page)
	}
}

// The layout claims a desktop's width and still fits a phone: one page
// column up to 1400 px, centred; grids whose columns shrink to the screen;
// no fixed width a phone cannot hold; every table in a scrolling box and its
// cells unwrapped, so a narrow screen scrolls a table instead of breaking
// its rows.
func TestStatusPageLayout(t *testing.T) {
	st := engine.Stats{Rules: []engine.RuleStats{{Line: "tcp 127.0.0.1:8080 -> 10.0.0.1:80", Listen: "tcp 127.0.0.1:8080", Pif: "host", Proto: "tcp", Requested: 1,
		Listeners: []engine.ListenerStats{{Addr: netip.MustParseAddrPort("127.0.0.1:8080"), State: engine.ListenerListening}},
		Backends:  []balance.BackendStats{{Target: netip.MustParseAddrPort("10.0.0.1:80"), Up: true}}}},
		Table: engine.TableStats{Recent: []engine.TxnRecord{{Op: engine.OpCommit, Generation: 1}}}}
	p := newStatusPage(&fakeSource{stats: st}, StatusInfo{Version: "x"}, time.Hour, rateWindows)
	defer p.Close()
	srv := httptest.NewServer(p)
	defer srv.Close()
	page := getPage(t, srv.URL)

	m := regexp.MustCompile(`(?s)<style>(.*)</style>`).FindStringSubmatch(page)
	if m == nil {
		t.Fatal("no inline style")
	}
	css := map[string]string{} // selector → declarations, outside media queries
	media := regexp.MustCompile(`@media[^{]*\{([^{}]*\{[^}]*\})*\}`)
	for _, rule := range regexp.MustCompile(`([^{}]+)\{([^}]*)\}`).FindAllStringSubmatch(media.ReplaceAllString(m[1], ""), -1) {
		for _, sel := range strings.Split(rule[1], ",") {
			css[strings.TrimSpace(sel)] += rule[2] + ";"
		}
	}
	has := func(sel string, decls ...string) {
		t.Helper()
		for _, d := range decls {
			if !strings.Contains(css[sel], d) {
				t.Errorf("%s lacks %q: {%s}", sel, d, css[sel])
			}
		}
	}
	has(".page", "max-width:1400px", "margin:0 auto")
	has(".cards", "display:grid", "minmax(min(100%,")
	has(".rule-body", "display:grid", "repeat(auto-fit,minmax(min(100%,")
	has(".scroll", "overflow-x:auto")
	has("th", "white-space:nowrap")
	if strings.Contains(css["body"], "width") {
		t.Errorf("body sets a width, the page column is .page's: {%s}", css["body"])
	}
	// A width in px beyond a phone's, other than .page's maximum, would
	// overflow a phone or narrow the desktop.
	for sel, d := range css {
		for _, w := range regexp.MustCompile(`(?:^|;)\s*((?:min-|max-)?width):(\d+)px`).FindAllStringSubmatch(d, -1) {
			if n, _ := strconv.Atoi(w[2]); n > 360 && !(sel == ".page" && w[1] == "max-width") {
				t.Errorf("%s {%s:%spx}: wider than a phone", sel, w[1], w[2])
			}
		}
		for _, w := range regexp.MustCompile(`minmax\((\d+)px`).FindAllStringSubmatch(d, -1) {
			t.Errorf("%s: minmax(%spx, …) without min(100%%, …) overflows a phone", sel, w[1])
		}
	}

	// The markup: everything in the page column, the rules in their grid,
	// each rule's tables side by side in its body, every table scrolling.
	body := page[strings.Index(page, "<body>"):]
	if !strings.HasPrefix(body, "<body>\n<main class=\"page\">") || !strings.Contains(body, "</main>\n</body>") {
		t.Errorf("the body is not one .page column:\n%s", body)
	}
	if !regexp.MustCompile(`<div class="rules">\s*<section class="rule">`).MatchString(page) {
		t.Error("rules are not in .rules")
	}
	if !regexp.MustCompile(`<div class="rule-body">\s*<div class="scroll"><table>(?s:.*?)</table></div>\s*<div class="scroll"><table>`).MatchString(page) {
		t.Error("a rule's listener and backend tables are not in its .rule-body")
	}
	if n, boxed := strings.Count(page, "<table>"), strings.Count(page, `<div class="scroll"><table>`); n != boxed || n != 3 {
		t.Errorf("%d tables, %d of them in a scrolling box; want 3 and 3", n, boxed)
	}
}
