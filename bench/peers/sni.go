package main

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"text/template"
	"time"

	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// The sni scenario: new TLS connections routed by server name without
// terminating TLS (passthrough) to a TLS backend. Each peer routes
// sniName to the backend and a decoy name elsewhere, so the choice is made
// on every connection; the client is Go's crypto/tls with its default,
// post-quantum hello (X25519MLKEM768: about 1.8 KB, two segments' worth of
// data on a 1500-byte MTU).
const (
	sniName    = "bench.example.com"
	sniDecoy   = "other.example.com"
	sniNowhere = "127.0.0.1:9" // the decoy's target: never reached
	sniConc    = 50            // connections in flight, as cps
)

var sniScenario = scenario{name: "sni", title: "sni: new TLS connections routed by name (passthrough) to an nginx TLS backend, 50 in flight, a full handshake and one request each", unit: "conn/s", latency: true,
	skip: func(p peer) string {
		switch p.name {
		case "direct", "haproxy", "nginx", "nginx-hc", "sluice", "sluice-splice", "sluice-b":
			return ""
		}
		return "does not route by TLS name here"
	},
	backend: func(h *harness) (string, *proc, error) { return h.startTLSBackend(h.opt.loadCPU) },
	route:   startRouter,
	measure: tlsConns}

// startRouter starts peer p routing by name to target.
func startRouter(h *harness, p peer, target string, cpu int) (string, *proc, error) {
	d := confData{Target: target, MaxConn: 9700, Name: sniName, Decoy: sniDecoy, Nowhere: sniNowhere}
	switch p.name {
	case "direct":
		return target, nil, nil
	case "haproxy":
		addr, port, err := listenAddr()
		if err != nil {
			return "", nil, err
		}
		d.Listen = addr
		conf, err := h.writeConf("haproxy-sni", haproxySNIConf, d)
		if err != nil {
			return "", nil, err
		}
		px, err := h.startListening("haproxy", cpuList(cpu), port, nil, "haproxy", "-db", "-f", conf)
		return addr, px, err
	case "nginx", "nginx-hc":
		d.MaxConn = 19800
		d.HalfClose = p.name == "nginx-hc"
		return h.startNginx("nginx-sni", nginxSNIConf, d, cpuList(cpu))
	case "sluice", "sluice-splice", "sluice-b":
		addr, port, err := listenAddr()
		if err != nil {
			return "", nil, err
		}
		d.Listen = addr
		if p.name == "sluice-splice" {
			d.Options = " splice=on"
		}
		bin := h.sluice
		if p.name == "sluice-b" {
			bin = h.opt.sluiceB
		}
		px, err := h.startSluiceConf(bin, "sluice-sni", sluiceSNIConf, d, cpu, port)
		return addr, px, err
	}
	return "", nil, fmt.Errorf("%s does not route by TLS name", p.name)
}

// startSluiceConf runs the sluice binary bin with the configuration t
// renders from d (one event loop, warnings only), listening on port.
func (h *harness) startSluiceConf(bin, name string, t *template.Template, d confData, cpu, port int) (*proc, error) {
	conf, err := h.writeConf(name, t, d)
	if err != nil {
		return nil, err
	}
	return h.startListening("sluice", cpuList(cpu), port, nil, bin, "run", "-c", conf,
		"--loops", "1", "--log-level", "warn", "--drain-timeout", "1s")
}

// HAProxy: wait for the whole hello (req.ssl_hello_type), then choose the
// backend by req.ssl_sni; no match is refused.
// haproxyHead is the start of a bench configuration of HAProxy: one
// thread, TCP mode.
const haproxyHead = `global
    nbthread 1
    maxconn {{.MaxConn}}

defaults
    mode tcp
    maxconn {{.MaxConn}}
    timeout connect 5s
    timeout client 10m
    timeout server 10m
`

var haproxySNIConf = template.Must(template.New("haproxy-sni").Parse(haproxyHead + `
frontend fe
    bind {{.Listen}}
    tcp-request inspect-delay 5s
    tcp-request content accept if { req.ssl_hello_type 1 }
    use_backend be if { req.ssl_sni -i {{.Name}} }
    use_backend decoy if { req.ssl_sni -i {{.Decoy}} }

backend be
    server s1 {{.Target}}

backend decoy
    server s1 {{.Nowhere}}
`))

// nginx stream: ssl_preread reads the hello, a map chooses the upstream.
var nginxSNIConf = template.Must(template.New("nginx-sni").Parse(nginxMain + `load_module /usr/lib/nginx/modules/ngx_stream_module.so;

events {
    worker_connections {{.MaxConn}};
}

stream {
    map $ssl_preread_server_name $upstream {
        {{.Name}} {{.Target}};
        {{.Decoy}} {{.Nowhere}};
        default {{.Nowhere}};
    }
    server {
        listen {{.Listen}};
        ssl_preread on;
        proxy_pass $upstream;
{{- if .HalfClose}}
        proxy_half_close on;
{{- end}}
    }
}
`))

// sluice: two routes on one listen key.
var sluiceSNIConf = template.Must(template.New("sluice-sni").Parse(`ctl: {socket: {{.Dir}}/ctl.sock}
rules:
  - tcp {{.Listen}} -> {{.Target}} sni={{.Name}}{{.Options}}
  - tcp {{.Listen}} -> {{.Nowhere}} sni={{.Decoy}}
`))

// The TLS backend: nginx, one worker, a self-signed certificate for
// sniName made here, no session resumption (every connection a full
// handshake), a short reply. TLS 1.3 is offered as a current server offers
// it: nginx before 1.23.4 leaves it out of its default ssl_protocols, and
// the Go client then negotiated TLS 1.2 (7 flights a connection, not the 4
// of sni-replay's recorded TLS 1.3 exchange).
var nginxTLSConf = template.Must(template.New("nginx-tls").Parse(nginxMain + `

events {
    worker_connections 10000;
}

http {` + nginxHTTPTemps + `
    server {
        listen {{.Listen}} ssl backlog=4096;
        ssl_certificate {{.Cert}};
        ssl_certificate_key {{.Key}};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache off;
        ssl_session_tickets off;
        location / {
            default_type text/plain;
            return 200 "{{.Name}}\n";
        }
    }
}
`))

func (h *harness) startTLSBackend(cpu int) (string, *proc, error) {
	dir, err := os.MkdirTemp(h.dir, "tls-")
	if err != nil {
		return "", nil, err
	}
	cert, key, err := testpeer.WriteSelfSigned(dir, sniName)
	if err != nil {
		return "", nil, err
	}
	return h.startNginx("nginx-tls", nginxTLSConf, confData{Name: sniName, Cert: cert, Key: key}, cpuList(cpu))
}

// tlsConns runs the tlsclient role on the load CPU through the peer.
func tlsConns(h *harness, t target) (map[string]float64, error) {
	secs := h.secs(h.opt.duration)
	return connRole(h, t, "tlsclient", secs, t.addr, sniName, (time.Duration(secs) * time.Second).String(), strconv.Itoa(sniConc))
}

// connRole runs a client role that prints a tlsResult (args after this
// binary) on the load CPU through the peer, for about secs seconds.
func connRole(h *harness, t target, role string, secs int, args ...string) (map[string]float64, error) {
	v := map[string]float64{}
	m := h.meter(t)
	out, err := h.runTool(role, h.opt.loadCPU, []string{roleEnv + "=" + role}, time.Duration(secs+30)*time.Second,
		append([]string{h.self}, args...)...)
	m.read(v)
	if err != nil {
		return nil, err
	}
	var r tlsResult
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		return nil, fmt.Errorf("%s: %v: %q", role, err, out)
	}
	if r.N == 0 {
		return nil, fmt.Errorf("%s: no connection served: %s", role, r.Err)
	}
	v[mValue], v[mP50], v[mP99], v[mErrors] = float64(r.N)/r.Secs, r.P50ms, r.P99ms, float64(r.Errors)
	return v, nil
}

// tlsResult is what tlsclient prints.
type tlsResult struct {
	N      int     `json:"n"`
	Errors int     `json:"errors"`
	Secs   float64 `json:"secs"`
	P50ms  float64 `json:"p50_ms"`
	P99ms  float64 `json:"p99_ms"`
	Err    string  `json:"err,omitempty"` // the last error
}

// tlsClient ADDR NAME DURATION CONC: CONC workers, each again and again for
// DURATION: connect, a full TLS handshake for NAME (Go's default hello, no
// resumption), GET /, the whole reply, close.
func tlsClient(args []string) error {
	if len(args) != 4 {
		return fmt.Errorf("usage: tlsclient ADDR NAME DURATION CONC")
	}
	d, conc, err := loadArgs(args[2], args[3])
	if err != nil {
		return err
	}
	addr, name := args[0], args[1]
	cfg := &tls.Config{ServerName: name, InsecureSkipVerify: true}
	req := "GET / HTTP/1.0\r\nHost: " + name + "\r\n\r\n"
	res := connLoop(d, conc, func() func() error {
		return func() error { return tlsOnce(addr, cfg, req, name) }
	})
	return json.NewEncoder(os.Stdout).Encode(res)
}

// loadArgs parses a load role's DURATION and CONC arguments (CONC > 0).
func loadArgs(dur, conc string) (time.Duration, int, error) {
	d, err := time.ParseDuration(dur)
	if err != nil {
		return 0, 0, err
	}
	n, err := strconv.Atoi(conc)
	if err != nil || n <= 0 {
		return 0, 0, fmt.Errorf("bad concurrency %q", conc)
	}
	return d, n, nil
}

// connLoop runs conc workers, each calling its once (newOnce makes one per
// worker) again and again until d has passed, and returns the
// connections made, the failures, and the latencies' p50 and p99.
func connLoop(d time.Duration, conc int, newOnce func() func() error) tlsResult {
	var n, errs atomic.Int64
	var mu sync.Mutex
	var lat []time.Duration
	var last string
	began := time.Now()
	end := began.Add(d)
	var wg sync.WaitGroup
	for i := 0; i < conc; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			once := newOnce()
			var mine []time.Duration
			for time.Now().Before(end) {
				t0 := time.Now()
				if err := once(); err != nil {
					errs.Add(1)
					mu.Lock()
					last = err.Error()
					mu.Unlock()
					continue
				}
				n.Add(1)
				if len(mine) < 1<<16 {
					mine = append(mine, time.Since(t0))
				}
			}
			mu.Lock()
			lat = append(lat, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	res := tlsResult{N: int(n.Load()), Errors: int(errs.Load()), Secs: time.Since(began).Seconds(), Err: last}
	if len(lat) > 0 {
		slices.Sort(lat)
		ms := func(q float64) float64 { return float64(lat[int(q*float64(len(lat)-1))]) / 1e6 }
		res.P50ms, res.P99ms = ms(0.50), ms(0.99)
	}
	return res
}

// tlsOnce makes one connection and checks the reply names the backend.
func tlsOnce(addr string, cfg *tls.Config, req, name string) error {
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, req); err != nil {
		return err
	}
	b, err := io.ReadAll(c)
	if err != nil {
		return err
	}
	if !strings.HasPrefix(string(b), "HTTP/1.1 200") || !strings.HasSuffix(string(b), name+"\n") {
		return fmt.Errorf("reply %.40q", b)
	}
	return nil
}
