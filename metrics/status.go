package metrics

import (
	"bytes"
	"cmp"
	"fmt"
	"html/template"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/sluice-proxy/sluice/balance"
	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/engine"
)

// StatusSource is what the status page reads; *engine.Engine is one.
type StatusSource interface {
	Stats() engine.Stats   // everything, at each page view
	Totals() engine.Totals // running totals, sampled every second for the rates
}

// StatusInfo is what the daemon tells the page about itself.
type StatusInfo struct {
	Version string
	Config  string        // the configuration file, "" for none
	Refresh time.Duration // how often the page reloads itself; 0: DefaultRefresh
}

// DefaultRefresh is how often the status page reloads itself.
const DefaultRefresh = 5 * time.Second

// Rows of one rule's listeners and backends shown before "… and N more".
const maxRows = 24

// minSpan is the shortest time a rate is computed over.
const minSpan = 500 * time.Millisecond

// rateWindows are the windows the page shows rates over, shortest first.
var rateWindows = []time.Duration{10 * time.Second, time.Minute}

// StatusPage is the HTML page at /: rules with their listeners and bind
// state, backends with their passive health, live sessions and rates,
// refusals by reason, the last table operations with their bind summaries.
// Plain HTML with a little inline CSS, no external asset, a meta refresh;
// laid out for a phone first, up to 1400 px wide on a desktop.
// A goroutine samples the engine's totals every second for the rates; Close
// stops it.
type StatusPage struct {
	src     StatusSource
	info    StatusInfo
	started time.Time
	every   time.Duration   // the sampler's tick
	windows []time.Duration // rateWindows, shorter in tests

	mu      sync.Mutex
	samples []sample // oldest first, at most a window's worth

	stop chan struct{}
	done chan struct{}
	once sync.Once
}

type sample struct {
	at time.Time
	t  engine.Totals
}

// NewStatusPage starts the page's sampler.
func NewStatusPage(src StatusSource, info StatusInfo) *StatusPage {
	return newStatusPage(src, info, time.Second, rateWindows)
}

// newStatusPage samples every tick for rates over windows (shortest first).
func newStatusPage(src StatusSource, info StatusInfo, every time.Duration, windows []time.Duration) *StatusPage {
	if info.Refresh <= 0 {
		info.Refresh = DefaultRefresh
	}
	p := &StatusPage{src: src, info: info, started: time.Now(), every: every, windows: windows,
		stop: make(chan struct{}), done: make(chan struct{})}
	p.take(time.Now())
	go p.sampler()
	return p
}

func (p *StatusPage) sampler() {
	defer close(p.done)
	t := time.NewTicker(p.every)
	defer t.Stop()
	for {
		select {
		case <-p.stop:
			return
		case now := <-t.C:
			p.take(now)
		}
	}
}

// take records the totals now, keeping the longest window's worth.
func (p *StatusPage) take(now time.Time) {
	t := p.src.Totals()
	p.mu.Lock()
	defer p.mu.Unlock()
	p.samples = append(p.samples, sample{at: now, t: t})
	keep := p.windows[len(p.windows)-1] + 2*time.Second // a sample a window old stays, at a tick of 1 s or less
	i := 0
	for i < len(p.samples)-1 && now.Sub(p.samples[i].at) > keep {
		i++
	}
	p.samples = append(p.samples[:0], p.samples[i:]...)
}

// Close stops the sampler. It is safe to call more than once.
func (p *StatusPage) Close() error {
	p.once.Do(func() { close(p.stop) })
	<-p.done
	return nil
}

// rateView is the traffic over one window.
type rateView struct {
	Window                string // the window the card is defined over: "last 60 s"
	Filling               string // while the page is younger than the window: "filling: 11 s so far"; "" once full
	Conns, Up, Down, Dgrm string
}

// rates compares cur, read at now, with the sample a window ago, one card
// per window. A window the page is younger than compares with the oldest
// sample and says it is filling, with the span its figures cover: a card
// keeps the name of its window, so that "last 60 s" never reads "last 11s".
func (p *StatusPage) rates(now time.Time, cur engine.Totals) []rateView {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []rateView
	for _, w := range p.windows {
		var old *sample
		for i := len(p.samples) - 1; i >= 0; i-- {
			old = &p.samples[i]
			if now.Sub(old.at) >= w {
				break
			}
		}
		rv := rateView{Window: "last " + seconds(w)}
		var span time.Duration // 0: too little history for a rate
		if old != nil {
			span = now.Sub(old.at)
		}
		if span < w {
			rv.Filling = "filling: " + seconds(span) + " so far"
		}
		if span < minSpan {
			rv.Conns, rv.Up, rv.Down, rv.Dgrm = "–", "–", "–", "–"
			out = append(out, rv)
			continue
		}
		dt := span.Seconds()
		per := func(a, b uint64) float64 {
			if a < b { // a table change dropped a rule's counters
				return 0
			}
			return float64(a-b) / dt
		}
		rv.Conns = strconv.FormatFloat(per(cur.Accepted, old.t.Accepted), 'f', 1, 64) + "/s"
		rv.Up = humanBytes(per(cur.BytesUp, old.t.BytesUp)) + "/s"
		rv.Down = humanBytes(per(cur.BytesDown, old.t.BytesDown)) + "/s"
		rv.Dgrm = strconv.FormatFloat(per(cur.Datagrams, old.t.Datagrams), 'f', 1, 64) + "/s"
		out = append(out, rv)
	}
	return out
}

// seconds writes d in whole seconds, "60 s": the unit of every rate.
func seconds(d time.Duration) string {
	return strconv.FormatInt(int64(d.Round(time.Second)/time.Second), 10) + " s"
}

type statusView struct {
	Version, Config, Uptime, Now string
	Refresh                      int
	Generation                   uint64
	Draining, Pending, UDP       bool
	Paused                       []string
	Sessions                     int64
	FDs                          int
	Buffers, Pipes               string
	Rates                        []rateView
	Refused                      uint64        // by every rule of the table
	Refusals                     []refusalView // Refused by reason, most first
	Rules                        []ruleView
	Txns                         []txnView
}

type ruleView struct {
	Line, Listen, Pif, Proto string
	Bound, Requested         int
	BindOK                   bool
	Failed                   []string
	Routes                   []string // the routes sharing the rule's socket (a routed key)
	Cert, CertExpiry         string   // a terminating rule's certificate subject and NotAfter (UTC), with the time left
	CertSoon                 bool     // it expires within a week, or has
	Listeners                []listenerView
	MoreListeners            int
	Backends                 []backendView
	MoreBackends             int
	UpBackends, AllBackends  int
	Sessions                 int64
	Accepted, Refused        uint64
	Refusals                 []refusalView // Refused by reason, most first
	Up, Down                 string
	HealthOK, HealthFail     uint64
	UDP                      engine.UDPStats
}

// refusalView is one reason connections were refused, with its count.
type refusalView struct {
	Reason        string // the end code's name, sluice_rule_refused_total's reason
	N             uint64
	Rate, MaxConn uint64 // of rate-limited: refused by rate= and by maxconn=
}

// Detail says which limit a rate-limited count came from: "maxconn 2,
// rate 1"; "" for any other reason.
func (r refusalView) Detail() string {
	var parts []string
	if r.MaxConn > 0 {
		parts = append(parts, "maxconn "+strconv.FormatUint(r.MaxConn, 10))
	}
	if r.Rate > 0 {
		parts = append(parts, "rate "+strconv.FormatUint(r.Rate, 10))
	}
	return strings.Join(parts, ", ")
}

// addRefusals adds rule r's refusals to list by reason, whatever the step
// (the step is in the metric), and returns list sorted most first.
func addRefusals(list []refusalView, r *engine.RuleStats) []refusalView {
	at := func(reason string) *refusalView {
		for i := range list {
			if list[i].Reason == reason {
				return &list[i]
			}
		}
		list = append(list, refusalView{Reason: reason})
		return &list[len(list)-1]
	}
	refusedSamples(r, func(n float64, labels ...string) {
		if n > 0 {
			at(labels[1]).N += uint64(n)
		}
	})
	if r.Policy.RateRefused+r.Policy.MaxConnRefused > 0 {
		rl := at(conn.CodeRateLimited.String())
		rl.Rate += r.Policy.RateRefused
		rl.MaxConn += r.Policy.MaxConnRefused
	}
	slices.SortFunc(list, func(a, b refusalView) int {
		if c := cmp.Compare(b.N, a.N); c != 0 {
			return c
		}
		return strings.Compare(a.Reason, b.Reason)
	})
	return list
}

type listenerView struct {
	Addr, State      string
	Accepted, Paused uint64
}

type backendView struct {
	Addr     string
	Up       bool
	Active   int32
	Failures uint64
	Checked  bool   // the rule has check=: the fields below are its checks'
	Since    string // how long in its state
	Last     string // the last check's result and latency, "ok 1.2ms"
	Reason   string // why the last check failed
}

type txnView struct {
	Time, Op, Took      string
	Generation          uint64
	HasSummary, OK      bool
	Kept, Added, Remove int
	Failures            []string
}

func (p *StatusPage) view(now time.Time) statusView {
	st := p.src.Stats()
	v := statusView{
		Version: p.info.Version, Config: p.info.Config,
		Uptime: shortDuration(now.Sub(p.started).Round(time.Second)), Now: now.UTC().Format("2006-01-02 15:04:05 UTC"),
		Refresh:    int((p.info.Refresh + time.Second - 1) / time.Second),
		Generation: st.Table.Generation, Draining: st.Draining, Pending: st.Table.Pending, Paused: st.Table.Paused,
		Sessions: st.Sessions, FDs: st.FDs,
		Buffers: fmt.Sprintf("%d in use, %d free", st.Pools.BuffersInUse, st.Pools.BuffersFree),
		Pipes:   fmt.Sprintf("%d in use, %d free", st.Pools.PipesInUse, st.Pools.PipesFree),
	}
	v.Rates = p.rates(now, p.src.Totals())
	for _, r := range st.Rules {
		rv := ruleView{Line: r.Line, Listen: r.Listen, Pif: r.Pif, Proto: r.Proto,
			Bound: len(r.Listeners), Requested: r.Requested, Sessions: r.Sessions,
			Accepted: r.Policy.Accepted, Up: humanBytes(float64(r.BytesUp)), Down: humanBytes(float64(r.BytesDown)),
			HealthOK: r.Policy.HealthUp, HealthFail: r.Policy.HealthDown, UDP: r.UDP, Routes: r.Routes}
		rv.BindOK = len(r.Failed) == 0 && rv.Bound == rv.Requested
		if c := r.Cert; c != nil {
			left := c.Expiry.Sub(now)
			rv.Cert, rv.CertSoon = c.Subject, left < 7*24*time.Hour
			rv.CertExpiry = c.Expiry.UTC().Format("2006-01-02 15:04 UTC") + " (" + shortDuration(left.Round(time.Minute)) + " left)"
			if left <= 0 {
				rv.CertExpiry = c.Expiry.UTC().Format("2006-01-02 15:04 UTC") + " (expired)"
			}
		}
		rv.Refusals = addRefusals(nil, &r)
		for _, f := range rv.Refusals {
			rv.Refused += f.N
		}
		v.Refused += rv.Refused
		v.Refusals = addRefusals(v.Refusals, &r)
		for _, f := range r.Failed {
			rv.Failed = append(rv.Failed, fmt.Sprintf("port %d: %s", f.Port, f.Msg))
		}
		for i, ln := range r.Listeners {
			if i == maxRows {
				rv.MoreListeners = len(r.Listeners) - maxRows
				break
			}
			rv.Listeners = append(rv.Listeners, listenerView{Addr: ln.Addr.String(), State: ln.State, Accepted: ln.Accepted, Paused: ln.Paused})
		}
		for _, b := range mergeBackends(r.Backends) {
			if b.Up {
				rv.UpBackends++
			}
			if len(rv.Backends) < maxRows {
				rv.Backends = append(rv.Backends, b)
			} else {
				rv.MoreBackends++
			}
		}
		rv.AllBackends = len(rv.Backends) + rv.MoreBackends
		v.UDP = v.UDP || r.Proto == "udp"
		v.Rules = append(v.Rules, rv)
	}
	for _, t := range st.Table.Recent {
		tv := txnView{Time: t.Time.UTC().Format("15:04:05"), Op: t.Op.String(), Generation: t.Generation,
			Took: t.Took.Round(time.Microsecond).String()}
		if s := t.Summary; s != nil {
			tv.HasSummary, tv.OK = true, s.OK()
			tv.Kept, tv.Added, tv.Remove = s.Kept, s.Added, s.Removed
			tv.Failures = s.Failures()
		}
		v.Txns = append(v.Txns, tv)
	}
	return v
}

// mergeBackends lists each backend of a rule once: the ports of a range
// rule each have their pool, and a single-port target is in all of them. A
// backend is up when no pool has it down; its sessions and failures add up.
func mergeBackends(bs []balance.BackendStats) []backendView {
	var out []backendView
	at := map[netip.AddrPort]int{}
	for _, b := range bs {
		i, seen := at[b.Target]
		if !seen {
			at[b.Target] = len(out)
			bv := backendView{Addr: b.Target.String(), Up: b.Up, Active: b.Active, Failures: b.Failures, Checked: b.Checked}
			if c := b.Check; b.Checked {
				bv.Since, bv.Reason = shortDuration(c.For.Round(time.Second)), c.Reason
				if c.LastAt != 0 {
					bv.Last = c.Last.String() + " " + c.Latency.Round(10*time.Microsecond).String()
				}
			}
			out = append(out, bv)
			continue
		}
		out[i].Up = out[i].Up && b.Up
		out[i].Active += b.Active
		out[i].Failures += b.Failures
	}
	return out
}

// ServeHTTP renders the page.
func (p *StatusPage) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var buf bytes.Buffer
	if err := statusTmpl.Execute(&buf, p.view(time.Now())); err != nil {
		http.Error(w, "status page: "+err.Error(), http.StatusInternalServerError)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	_, _ = w.Write(buf.Bytes())
}

// humanBytes writes n bytes with a binary unit.
func humanBytes(n float64) string {
	const units = "KMGTPE"
	if n < 1024 {
		return strconv.FormatFloat(n, 'f', 0, 64) + " B"
	}
	i := -1
	for n >= 1024 && i < len(units)-1 {
		n /= 1024
		i++
	}
	return strconv.FormatFloat(n, 'f', 1, 64) + " " + units[i:i+1] + "iB"
}

// shortDuration writes d without zero parts: "1h2m", "10s", "1m".
func shortDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

var statusTmpl = template.Must(template.New("status").Parse(`<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{{.Refresh}}">
<title>sluice status</title>
<style>
:root{--fg:#1d232a;--mute:#5d6873;--line:#dfe3e8;--card:#fff;--bg:#f4f6f8;--ok:#157f3b;--bad:#b42318;--warn:#9a5b00}
*{box-sizing:border-box}
body{margin:0;font:15px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
.page{max-width:1400px;margin:0 auto;padding:12px}
@media (min-width:800px){.page{padding:16px 24px}}
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:4px 16px}
h1{font-size:1.35em;margin:0}
h2{font-size:1.05em;margin:18px 0 6px;text-transform:uppercase;letter-spacing:.04em;color:var(--mute)}
.meta{color:var(--mute);font-size:.88em;overflow-wrap:anywhere}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,170px),1fr));gap:8px}
.card,.rule{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:8px 10px;min-width:0}
.card b{display:block;font-size:1.35em}
.card .meta{display:block}
.window{white-space:nowrap}
.filling{color:var(--warn)}
.rules{display:grid;gap:10px}
.rule-body{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,520px),1fr));gap:0 16px}
code{font:13px/1.35 ui-monospace,"DejaVu Sans Mono",monospace;overflow-wrap:anywhere}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;width:100%;font-size:.9em;margin-top:6px}
th,td{text-align:left;padding:3px 8px;border-bottom:1px solid var(--line);white-space:nowrap}
td.wrap{white-space:normal;overflow-wrap:anywhere;min-width:12em}
th{color:var(--mute);font-weight:600}
.ok{color:var(--ok)}.bad{color:var(--bad)}.warn{color:var(--warn)}
.pill{display:inline-block;padding:0 7px;border-radius:10px;font-size:.85em;font-weight:600;background:#e7f4ec;color:var(--ok)}
.pill.bad{background:#fdecea;color:var(--bad)}.pill.warn{background:#fff4e0;color:var(--warn)}
ul{margin:4px 0;padding-left:18px}
footer{margin-top:16px}
a{color:#1559b7}
</style>
</head>
<body>
<main class="page">
<header>
<h1>sluice {{.Version}}</h1>
<div class="meta">up {{.Uptime}} · table generation {{.Generation}} · {{if .Draining}}<span class="pill warn">draining</span>{{else}}<span class="pill">running</span>{{end}}{{if .Pending}} · <span class="pill warn">apply pending commit</span>{{end}}{{with .Config}} · {{.}}{{end}}</div>
<div class="meta">{{.Now}}</div>
</header>

<h2>Traffic</h2>
<div class="cards">
<div class="card">Live sessions<b id="sessions">{{.Sessions}}</b></div>
{{range .Rates}}<div class="card rate">Rates per second, <span class="window">{{.Window}}</span>{{with .Filling}} <span class="filling">({{.}})</span>{{end}}<b>{{.Conns}}</b><span class="meta">new connections · in {{.Up}} · out {{.Down}}{{if $.UDP}} · {{.Dgrm}} datagrams{{end}}</span></div>
{{end}}<div class="card">Refused<b id="refused">{{.Refused}}</b><span class="meta">{{with .Refusals}}{{template "refusals" .}}{{else}}none{{end}} · by the rules of this table</span></div>
<div class="card">Open fds<b>{{if ge .FDs 0}}{{.FDs}}{{else}}?{{end}}</b><span class="meta">buffers {{.Buffers}}; pipes {{.Pipes}}</span></div>
</div>

<h2>Rules</h2>
{{if not .Rules}}<p class="meta">No rules: nothing is forwarded.</p>{{end}}
<div class="rules">
{{range .Rules}}<section class="rule">
<div><code>{{.Line}}</code></div>
<div class="meta">{{.Proto}} · pif {{.Pif}} · {{if .BindOK}}<span class="pill">{{.Bound}}/{{.Requested}} ports bound</span>{{else}}<span class="pill bad">{{.Bound}}/{{.Requested}} ports bound</span>{{end}}</div>
{{if .Failed}}<ul class="bad">{{range .Failed}}<li>{{.}}</li>{{end}}</ul>{{end}}
{{if .Cert}}<div class="meta">certificate <code>{{.Cert}}</code> · expires {{if .CertSoon}}<span class="pill bad">{{.CertExpiry}}</span>{{else}}{{.CertExpiry}}{{end}}</div>{{end}}
{{if .Routes}}<div class="meta">routes of this listener, by TLS name: {{range .Routes}}<code>{{.}}</code> {{end}}</div>{{end}}
{{if eq .Proto "udp"}}<div>flows {{.UDP.Flows}} live, {{.UDP.Opened}} opened · datagrams {{.UDP.DatagramsUp}} in, {{.UDP.DatagramsDown}} out, {{.UDP.Dropped}} dropped</div>
{{else}}<div>sessions <b>{{.Sessions}}</b> · accepted {{.Accepted}} · refused {{.Refused}}{{with .Refusals}}: {{template "refusals" .}}{{end}} · in {{.Up}} · out {{.Down}}{{if or .HealthOK .HealthFail}} · health replies {{.HealthOK}} ok, {{.HealthFail}} fail{{end}}</div>{{end}}
<div class="rule-body">
<div class="scroll"><table>
<tr><th>listener</th><th>state</th><th>accepted</th><th title="times accept paused for want of fds">paused</th></tr>
{{range .Listeners}}<tr><td><code>{{.Addr}}</code></td><td>{{if eq .State "listening"}}<span class="ok">{{.State}}</span>{{else}}<span class="warn">{{.State}}</span>{{end}}</td><td>{{.Accepted}}</td><td>{{.Paused}}</td></tr>
{{end}}{{if .MoreListeners}}<tr><td colspan="4" class="meta">… and {{.MoreListeners}} more</td></tr>{{end}}
</table></div>
{{if .Backends}}<div class="scroll"><table>
<tr><th>backend ({{.UpBackends}}/{{.AllBackends}} up)</th><th>health</th><th>sessions</th><th title="connects that failed">fails</th><th title="active checks: time in this state">since</th><th title="the last check's result and latency">last check</th><th>reason</th></tr>
{{range .Backends}}<tr><td><code>{{.Addr}}</code></td><td>{{if .Up}}<span class="pill">up</span>{{else}}<span class="pill bad">down</span>{{end}}</td><td>{{.Active}}</td><td>{{.Failures}}</td>{{if .Checked}}<td>{{.Since}}</td><td>{{.Last}}</td><td class="wrap">{{.Reason}}</td>{{else}}<td colspan="3" class="meta">passive only</td>{{end}}</tr>
{{end}}{{if .MoreBackends}}<tr><td colspan="7" class="meta">… and {{.MoreBackends}} more</td></tr>{{end}}
</table></div>{{end}}
</div>
</section>
{{end}}</div>
{{if .Paused}}<p class="meta">Paused by the pending apply (closed at commit): {{range $i, $k := .Paused}}{{if $i}}, {{end}}<code>{{$k}}</code>{{end}}</p>{{end}}

<h2>Last transactions</h2>
{{if not .Txns}}<p class="meta">No table operation yet.</p>{{else}}<div class="scroll"><table>
<tr><th>time</th><th>step</th><th>gen</th><th>verdict</th><th title="listen ports kept, added, removed">kept/added/removed</th><th>took</th></tr>
{{range .Txns}}<tr><td>{{.Time}}</td><td>{{.Op}}</td><td>{{.Generation}}</td><td>{{if .HasSummary}}{{if .OK}}<span class="pill">ok</span>{{else}}<span class="pill bad">failed</span>{{end}}{{else}}<span class="pill">committed</span>{{end}}</td><td>{{if .HasSummary}}{{.Kept}}/{{.Added}}/{{.Remove}}{{end}}</td><td>{{.Took}}</td></tr>
{{if .Failures}}<tr><td></td><td colspan="5" class="bad wrap">{{range .Failures}}<div><code>{{.}}</code></div>{{end}}</td></tr>{{end}}
{{end}}</table></div>{{end}}

<footer class="meta">Prometheus metrics: <a href="/metrics">/metrics</a> · this page reloads every {{.Refresh}} s</footer>
</main>
</body>
</html>
{{define "refusals"}}{{range $i, $r := .}}{{if $i}}, {{end}}{{$r.Reason}} {{$r.N}}{{with $r.Detail}} ({{.}}){{end}}{{end}}{{end}}`))
