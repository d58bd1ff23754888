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

// A metric is one family: its description and how to read its samples out
// of a Stats snapshot. To add a metric, add an entry to families.
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

func one(f func(s *engine.Stats) float64) func(*engine.Stats, func(float64, ...string)) {
	return func(s *engine.Stats, emit func(float64, ...string)) { emit(f(s)) }
}

var families = []metric{
	{name: "event_loops", help: "Event loops running.", typ: prometheus.GaugeValue,
		samples: one(func(s *engine.Stats) float64 { return float64(s.Loops) })},
	{name: "sessions", help: "Live sessions.", typ: prometheus.GaugeValue,
		samples: one(func(s *engine.Stats) float64 { return float64(s.Sessions) })},
	{name: "sessions_ended_total", help: "Sessions ended, by end code (reason is the code's stable name).",
		typ: prometheus.CounterValue, labels: []string{"code", "reason"}, samples: endedSamples},
	{name: "connect_errors_total", help: "Backend connects that failed (each try of a pool counts).", typ: prometheus.CounterValue,
		samples: one(func(s *engine.Stats) float64 { return float64(s.ConnectErrors) })},
	{name: "buffers", help: "Channel buffers of the loops' pools, in use by sessions or free in the pools.",
		typ: prometheus.GaugeValue, labels: []string{"state"},
		samples: func(s *engine.Stats, emit func(float64, ...string)) {
			emit(float64(s.Pools.BuffersInUse), "in_use")
			emit(float64(s.Pools.BuffersFree), "free")
		}},
	{name: "pipes", help: "Splice pipes of the loops' pools, in use by sessions or free in the pools.",
		typ: prometheus.GaugeValue, labels: []string{"state"},
		samples: func(s *engine.Stats, emit func(float64, ...string)) {
			emit(float64(s.Pools.PipesInUse), "in_use")
			emit(float64(s.Pools.PipesFree), "free")
		}},
	{name: "pipes_open", help: "Splice pipes open in the process (the pipe budget's count).", typ: prometheus.GaugeValue,
		samples: one(func(s *engine.Stats) float64 { return float64(s.PipesOpen) })},
	{name: "pipes_denied_total", help: "Times a pipe was wanted and the pipe budget refused (the channel kept its buffer).",
		typ:     prometheus.CounterValue,
		samples: one(func(s *engine.Stats) float64 { return float64(s.PipesDenied) })},
	{name: "udp_flows", help: "Live UDP flows (one per client address and port).", typ: prometheus.GaugeValue,
		samples: one(func(s *engine.Stats) float64 { return float64(s.UDPFlows) })},
	{name: "udp_flows_opened_total", help: "UDP flows opened.", typ: prometheus.CounterValue,
		samples: one(func(s *engine.Stats) float64 { return float64(s.UDPFlowsOpened) })},
	{name: "udp_flows_expired_total", help: "UDP flows ended by timeout.idle.", typ: prometheus.CounterValue,
		samples: one(func(s *engine.Stats) float64 { return float64(s.UDPFlowsExpired) })},
	{name: "udp_datagrams_total", help: "UDP datagrams forwarded, by direction.",
		typ: prometheus.CounterValue, labels: []string{"direction"},
		samples: func(s *engine.Stats, emit func(float64, ...string)) {
			emit(float64(s.UDPDatagramsUp), "to_target")
			emit(float64(s.UDPDatagramsDown), "to_client")
		}},
	{name: "udp_dropped_total", help: "UDP datagrams not forwarded (flow table full, no fd, buffer full).", typ: prometheus.CounterValue,
		samples: one(func(s *engine.Stats) float64 { return float64(s.UDPDropped) })},
	{name: "fds_open", help: "File descriptors open in the process (/proc/self/fd), read at scrape time.", typ: prometheus.GaugeValue,
		samples: func(s *engine.Stats, emit func(float64, ...string)) {
			if s.FDs >= 0 {
				emit(float64(s.FDs))
			}
		}},
	{name: "draining", help: "1 once the daemon is stopping and drains its sessions.", typ: prometheus.GaugeValue,
		samples: one(func(s *engine.Stats) float64 { return b2f(s.Draining) })},
}

// tableFamilies are the rule table's and the control transactions' metrics.
var tableFamilies = []metric{
	{name: "table_generation", help: "Generation of the active rule table (one more at each commit).", typ: prometheus.GaugeValue,
		samples: one(func(s *engine.Stats) float64 { return float64(s.Table.Generation) })},
	{name: "table_pending", help: "1 while an applied table awaits its commit or rollback.", typ: prometheus.GaugeValue,
		samples: one(func(s *engine.Stats) float64 { return b2f(s.Table.Pending) })},
	{name: "table_operations_total", help: "Table operations of the engine: apply, commit, rollback.",
		typ: prometheus.CounterValue, labels: []string{"op"},
		samples: func(s *engine.Stats, emit func(float64, ...string)) {
			emit(float64(s.Table.Applies), engine.OpApply.String())
			emit(float64(s.Table.Commits), engine.OpCommit.String())
			emit(float64(s.Table.Rollbacks), engine.OpRollback.String())
		}},
	{name: "table_apply_seconds", help: "Time the engine took to apply a table (bind, sync the loops).",
		hist: func(s *engine.Stats, emit func(engine.HistogramSnapshot, ...string)) { emit(s.Table.ApplyTime) }},
	{name: "ctl_transactions_total", help: "Writing control transactions by outcome, as the control server counts them.",
		typ: prometheus.CounterValue, labels: []string{"outcome"},
		samples: func(s *engine.Stats, emit func(float64, ...string)) {
			emit(float64(s.Table.Committed), "committed")
			emit(float64(s.Table.RolledBack), "rolled_back")
			emit(float64(s.Table.Failed), "failed")
		}},
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
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

// endCodes lists the end codes this build names: from 1 (0 is "none")
// until the first number conn has no name for ("code-N").
func endCodes() []conn.Code {
	var codes []conn.Code
	for c := conn.Code(1); c < 1024 && !strings.HasPrefix(c.String(), "code-"); c++ {
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
var allFamilies = slices.Concat(families, tableFamilies, ruleFamilies)

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
	ln, err := net.Listen("tcp", addr.String())
	if err != nil {
		return nil, fmt.Errorf("metrics listen %s: %w", addr, err)
	}
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
	return s, nil
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
