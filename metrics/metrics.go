// Package metrics serves sluice's Prometheus endpoint: /metrics, read from
// the engine's counters at scrape time (nothing is counted here: the data
// path only adds to the engine's atomics, see engine/counters.go), and the
// status page at / (status.go).
package metrics

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"

	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/engine"
)

// Namespace prefixes every metric of sluice's own.
const Namespace = "sluice"

// A metric is one family: its description, from engine.Families, and how
// to read its samples out of a Stats snapshot: from the engine.CounterDefs
// that name it, or, for the few whose label values are not fixed, by
// a sampler of custom. To add a metric, add it to the engine's table
// (engine/counternames.go).
type metric struct {
	name   string // after the namespace
	help   string
	typ    prometheus.ValueType
	labels []string
	// samples emits each sample's value and label values (in labels' order).
	samples func(s *engine.Stats, emit func(v float64, labelValues ...string))
	// hist, instead of samples, emits histograms (typ is then ignored).
	hist func(s *engine.Stats, emit func(h engine.HistogramSnapshot, labelValues ...string))
}

// custom samples the families that no engine.CounterDef names.
var custom = map[*engine.Family]metric{
	engine.FamSessionsEnded: {samples: endedSamples},
	engine.FamTableApplySeconds: {hist: func(s *engine.Stats, emit func(engine.HistogramSnapshot, ...string)) {
		emit(s.Table.ApplyTime)
	}},
	engine.FamRuleRefused:       {samples: perRule(engine.FamRuleRefused, refusedSamples)},
	engine.FamRuleTerminations:  {samples: perRule(engine.FamRuleTerminations, termSamples)},
	engine.FamRuleHandshakeSecs: {hist: perRuleHist(engine.FamRuleHandshakeSecs, func(r *engine.RuleStats) engine.HistogramSnapshot { return r.Handshake })},
	engine.FamRuleConnectSecs:   {hist: perRuleHist(engine.FamRuleConnectSecs, func(r *engine.RuleStats) engine.HistogramSnapshot { return r.Connect })},
	engine.FamRuleSessionSecs:   {hist: perRuleHist(engine.FamRuleSessionSecs, func(r *engine.RuleStats) engine.HistogramSnapshot { return r.Duration })},
	engine.FamBackendUp:         {samples: perRule(engine.FamBackendUp, backendUpSamples)},
	engine.FamBackendChecks:     {samples: perRule(engine.FamBackendChecks, backendCheckSamples)},
	engine.FamBackendCheckSecs:  {hist: checkedHist(engine.FamBackendCheckSecs)},
	engine.FamRuleTLSHelloBytes: {hist: perRuleHist(engine.FamRuleTLSHelloBytes, func(r *engine.RuleStats) engine.HistogramSnapshot { return r.Hello })},
	engine.FamTLSHandshakeSecs: {hist: func(s *engine.Stats, emit func(engine.HistogramSnapshot, ...string)) {
		emit(s.TLS.HandshakeTime)
	}},
	engine.FamRuleTLSCertExpiry: {samples: perRule(engine.FamRuleTLSCertExpiry, certExpirySamples)},
	engine.FamPifUp: {samples: func(s *engine.Stats, emit func(float64, ...string)) {
		for _, p := range s.Pifs {
			up := 0.0
			if p.Gone == "" {
				up = 1
			}
			emit(up, p.Name)
		}
	}},
	engine.FamStoreVersion: {samples: func(_ *engine.Stats, emit func(float64, ...string)) {
		if st := engine.StoreNow(); st.Enabled && st.Version != "" {
			emit(1, st.Version)
		}
	}},
}

// valueTypes are the Prometheus types of the engine's kinds (a histogram's
// is not used).
var valueTypes = map[engine.Kind]prometheus.ValueType{
	engine.KindGauge: prometheus.GaugeValue, engine.KindCounter: prometheus.CounterValue, engine.KindHistogram: prometheus.UntypedValue,
}

// buildFamilies makes a metric of every family of engine.Families, in its
// order. It panics on a family that has neither a CounterDef nor a sampler
// of custom, or that has both: the table is wrong (a test builds it).
func buildFamilies() []metric {
	defs := map[*engine.Family][]*engine.CounterDef{}
	for _, t := range [][]engine.CounterDef{engine.EngineDefs, engine.TableDefs, engine.RuleDefs} {
		for i := range t {
			if d := &t[i]; d.Family != nil {
				defs[d.Family] = append(defs[d.Family], d)
			}
		}
	}
	var out []metric
	for _, f := range engine.Families {
		m, ok := custom[f]
		switch {
		case ok && len(defs[f]) > 0:
			panic("metrics: family " + f.Name + " has both counter defs and a sampler")
		case !ok && len(defs[f]) == 0:
			panic("metrics: family " + f.Name + " has nothing to sample")
		case !ok:
			m.samples = defSamples(f, defs[f])
		}
		m.name, m.help, m.typ, m.labels = f.Name, f.Help, valueTypes[f.Kind], f.Labels
		if f.PerRule {
			m.labels = withRule(f.Labels...)
		}
		out = append(out, m)
	}
	return out
}

// defSamples emits the samples of family f, one per def (per rule and def
// for a per-rule family).
func defSamples(f *engine.Family, defs []*engine.CounterDef) func(*engine.Stats, func(float64, ...string)) {
	if f.PerRule {
		return perRule(f, func(r *engine.RuleStats, emit func(float64, ...string)) {
			for _, d := range defs {
				emit(float64(d.Rule(r)), d.Labels...)
			}
		})
	}
	return func(s *engine.Stats, emit func(float64, ...string)) {
		for _, d := range defs {
			if v := d.Get(s); v >= 0 || !d.Known {
				emit(float64(v), d.Labels...)
			}
		}
	}
}

// endedSamples emits every end code this build knows, zero or not, so that
// rates work from the first scrape; then any name Stats has that is not
// among them.
func endedSamples(s *engine.Stats, emit func(float64, ...string)) {
	done := map[string]bool{}
	for _, c := range endCodes() {
		name := c.String()
		done[name] = true
		emit(float64(s.Ended[name]), strconv.Itoa(int(c)), name)
	}
	var rest []string
	for name := range s.Ended {
		if !done[name] {
			rest = append(rest, name)
		}
	}
	slices.Sort(rest)
	for _, name := range rest {
		emit(float64(s.Ended[name]), "", name)
	}
}

// endCodes lists the end codes this build names, from 1 (0 is "none"):
// numbers may be reserved for codes still to come (they print "code-N"),
// so the scan goes on past them until maxGap unnamed numbers in a row.
func endCodes() []conn.Code {
	const maxGap = 16
	var codes []conn.Code
	for c, gap := conn.Code(1), 0; c < 1024 && gap < maxGap; c++ {
		if strings.HasPrefix(c.String(), "code-") {
			gap++
			continue
		}
		gap = 0
		codes = append(codes, c)
	}
	return codes
}

// Collector is a prometheus.Collector over an engine's counters. Each
// scrape takes one Stats snapshot.
type Collector struct {
	stats func() engine.Stats
	descs []*prometheus.Desc
}

// NewCollector returns a collector reading stats (engine.Engine.Stats) at
// each scrape.
func NewCollector(stats func() engine.Stats) *Collector {
	c := &Collector{stats: stats}
	for _, m := range allFamilies {
		c.descs = append(c.descs, prometheus.NewDesc(prometheus.BuildFQName(Namespace, "", m.name), m.help, m.labels, nil))
	}
	return c
}

// allFamilies is every family the collector serves, in order.
var allFamilies = buildFamilies()

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.descs {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	s := c.stats()
	for i, m := range allFamilies {
		desc := c.descs[i]
		if m.hist != nil {
			m.hist(&s, func(h engine.HistogramSnapshot, lv ...string) {
				buckets := make(map[float64]uint64, len(h.Bounds))
				var cum uint64
				for j, le := range h.Bounds {
					cum += h.Counts[j]
					buckets[le] = cum
				}
				pm, err := prometheus.NewConstHistogram(desc, h.Count(), h.Sum, buckets, lv...)
				if err != nil {
					pm = prometheus.NewInvalidMetric(desc, err)
				}
				ch <- pm
			})
			continue
		}
		m.samples(&s, func(v float64, lv ...string) {
			pm, err := prometheus.NewConstMetric(desc, m.typ, v, lv...)
			if err != nil {
				pm = prometheus.NewInvalidMetric(desc, err)
			}
			ch <- pm
		})
	}
}

// NewRegistry returns a registry with the engine's collector and the Go
// runtime's and the process's standard ones.
func NewRegistry(stats func() engine.Stats) (*prometheus.Registry, error) {
	reg := prometheus.NewRegistry()
	for _, c := range []prometheus.Collector{
		NewCollector(stats),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("registering metrics: %w", err)
		}
	}
	return reg, nil
}

// Server is the HTTP endpoint: /metrics, and the status page at /.
type Server struct {
	ln     net.Listener
	srv    *http.Server
	status http.Handler
	done   chan struct{}
}

// Serve listens on addr (port 0: any free port) and serves the gatherer's
// metrics at /metrics and the status page at / (status may be nil: a line
// pointing to /metrics). Close closes status too when it is an io.Closer
// (a StatusPage). Errors of the HTTP server after the start are logged to
// log.
func Serve(addr netip.AddrPort, g prometheus.Gatherer, status http.Handler, log *zap.Logger) (*Server, error) {
	ln, err := Listen(addr)
	if err != nil {
		return nil, err
	}
	return ServeOn(ln, g, status, log), nil
}

// Listen binds the metrics endpoint's address (port 0: any free port)
// without serving it: a daemon binds every socket that can fail before
// any of them accepts, and serves this one later with ServeOn.
func Listen(addr netip.AddrPort) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr.String())
	if err != nil {
		return nil, fmt.Errorf("metrics listen %s: %w", addr, err)
	}
	return ln, nil
}

// ServeOn is Serve on a listener of Listen; the Server owns ln.
func ServeOn(ln net.Listener, g prometheus.Gatherer, status http.Handler, log *zap.Logger) *Server {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{
		ErrorLog:      zap.NewStdLog(log),
		ErrorHandling: promhttp.ContinueOnError,
	}))
	if status == nil {
		status = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			fmt.Fprintf(w, "metrics: http://%s/metrics\n", r.Host)
		})
	}
	mux.Handle("GET /{$}", status)
	s := &Server{
		ln:     ln,
		status: status,
		srv: &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second,
			ErrorLog: zap.NewStdLog(log)},
		done: make(chan struct{}),
	}
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server stopped", zap.Error(err))
		}
	}()
	return s
}

// Addr returns the address the server listens on.
func (s *Server) Addr() netip.AddrPort {
	return s.ln.Addr().(*net.TCPAddr).AddrPort()
}

// Close stops the server: scrapes under way may finish until ctx is done.
func (s *Server) Close(ctx context.Context) error {
	err := s.srv.Shutdown(ctx)
	if err != nil {
		err = errors.Join(err, s.srv.Close())
	}
	<-s.done
	if c, ok := s.status.(io.Closer); ok {
		err = errors.Join(err, c.Close())
	}
	return err
}

// certExpirySamples emits a terminating rule's seconds left on its
// certificate; a rule that does not terminate has no sample.
func certExpirySamples(r *engine.RuleStats, emit func(float64, ...string)) {
	if r.Cert != nil {
		emit(time.Until(r.Cert.Expiry).Seconds())
	}
}
