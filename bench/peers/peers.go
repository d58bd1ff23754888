package main

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/template"
	"time"
)

// peer is one proxy under comparison (or none: direct).
type peer struct {
	name string
	desc string // how it runs, for the report
	// start runs the proxy as s asks and returns the address the load
	// connects to and the process (nil for direct).
	start func(h *harness, s spec) (string, *proc, error)
	// cannot says why the peer cannot run variant v ("" = it can).
	cannot func(v variant) string
	// idleCap, when > 0, bounds the idle sessions of this peer (socat forks
	// a process per session; the pid space is shared with other users).
	idleCap int
	// optIn: not in the default list of peers; run only when named.
	optIn bool
}

// spec is what a scenario asks of a peer: forward to target, pinned to
// cpus, in the scenario's variant of the plain forward.
type spec struct {
	target string
	cpus   string // taskset's list: "1", or "0,1" (loops2)
	variant
}

// variant is how a scenario's forward differs from the plain one (the
// zero variant: loopback listener, one thread, no PROXY protocol).
type variant struct {
	wildcard bool // listen on 0.0.0.0; the load still connects to 127.0.0.1
	threads  int  // event loops, threads or workers; 0 is 1
	proxy    bool // read a PROXY v2 header from each client, send one onward
}

// nThreads is the variant's thread count, at least one.
func (v variant) nThreads() int { return max(1, v.threads) }

var allPeers = []peer{
	{name: "direct", desc: "no proxy: the load talks to the backend (proxy-rps, proxy-cps: through the PROXY front)",
		start: func(h *harness, s spec) (string, *proc, error) { return s.target, nil, nil }},
	{name: "haproxy", desc: "HAProxy, mode tcp, nbthread 1, no splicing", start: startHAProxy(false, false)},
	{name: "haproxy-splice", desc: "HAProxy, mode tcp, nbthread 1, `option splice-auto`", start: startHAProxy(true, false)},
	// Not run unless named: busy-polling spends the proxy's CPU while
	// traffic flows, so its per-core figures are not the others' kind.
	{name: "haproxy-busy", desc: "HAProxy, mode tcp, nbthread 1, no splicing, `busy-polling`", start: startHAProxy(false, true), optIn: true},
	{name: "nginx", desc: "nginx stream, one worker (`worker_processes 1`, master + worker counted)", start: startNginxStream(false)},
	// nginx's default (proxy_half_close off) closes both sides at the first
	// end of input: a client still sending after the backend's FIN loses
	// what it sends. sluice and HAProxy propagate the half-close and wait
	// for the other side's end, one wake-up, read and shutdown more per
	// connection; this peer is nginx doing that same work.
	{name: "nginx-hc", desc: "nginx stream as `nginx`, with `proxy_half_close on` (half-closes as sluice and HAProxy do)", start: startNginxStream(true)},
	{name: "socat", desc: "socat `TCP4-LISTEN:…,fork` (a process per session, all counted)", start: startSocat, idleCap: 2000,
		cannot: func(v variant) string {
			switch {
			case v.proxy:
				return "does not speak the PROXY protocol"
			case v.threads > 1:
				return "forks a process per session: it has no count of threads to set"
			}
			return ""
		}},
	{name: "gocopy", desc: "the plain Go proxy of test/integration (goroutine per direction, io.Copy; Go splices TCP to TCP; GOMAXPROCS from its CPUs: 1, or 2 in loops2)", start: startGoCopy,
		cannot: func(v variant) string {
			if v.proxy {
				return "does not speak the PROXY protocol"
			}
			return ""
		}},
	{name: "sluice", desc: "`sluice forward … --loops 1` (splice=auto)", start: startSluice()},
	{name: "sluice-splice", desc: "`sluice forward … --loops 1 splice=on`", start: startSluice("splice=on")},
	{name: "sluice-busy", desc: "`sluice forward … --loops 1 --busy-poll 200us` (splice=auto)", start: startSluice("--busy-poll", "200us"), optIn: true},
	// Not run unless named: the same as sluice from another binary, for a
	// before/after comparison inside one run.
	{name: "sluice-b", desc: "`sluice forward … --loops 1` (splice=auto) from the binary given by --sluice-b", start: startSluiceB, optIn: true},
}

func peerByName(name string) (peer, bool) {
	for _, p := range allPeers {
		if p.name == name {
			return p, true
		}
	}
	return peer{}, false
}

// listenAddr picks a free loopback port for a proxy.
func listenAddr() (string, int, error) {
	listen, _, port, err := listenOn(false)
	return listen, port, err
}

// listenOn picks a free port for a proxy: the address to listen on
// (127.0.0.1, or the wildcard 0.0.0.0) and the one to connect to (always
// 127.0.0.1).
func listenOn(wildcard bool) (listen, dial string, port int, err error) {
	host := "127.0.0.1"
	if wildcard {
		host = "0.0.0.0"
	}
	if port, err = freePort(host); err != nil {
		return "", "", 0, err
	}
	p := strconv.Itoa(port)
	return host + ":" + p, "127.0.0.1:" + p, port, nil
}

// startListening starts argv pinned to cpus and waits until port listens.
func (h *harness) startListening(name, cpus string, port int, env []string, argv ...string) (*proc, error) {
	p, err := h.start(name, startOpts{cpus: cpus, env: env}, argv...)
	if err != nil {
		return nil, err
	}
	if err := waitListening(p, port, 10*time.Second); err != nil {
		p.stop(2 * time.Second)
		return nil, err
	}
	return p, nil
}

// A proxy's configuration: where it listens, where it forwards, and its
// private directory in the run's temporary directory.
type confData struct {
	Listen, Target, Dir string
	Splice, Busy        bool // HAProxy: option splice-auto, busy-polling
	MaxConn, MaxPipes   int
	Body                string
	// The sni scenario's: the routed name, the decoy name and its target,
	// a route's extra options, the backend's certificate and key files.
	Name, Decoy, Nowhere, Options, Cert, Key string
	// A variant's: threads or workers (0 is 1), listening on the wildcard
	// (startNginx), reading a PROXY header, sending one.
	Threads           int
	Wildcard          bool
	ProxyIn, ProxyOut bool
	HalfClose         bool // nginx: proxy_half_close on
}

// writeConf renders a template into a fresh directory and returns the
// directory and the file's path.
func (h *harness) writeConf(name string, t *template.Template, d confData) (string, error) {
	dir, err := os.MkdirTemp(h.dir, name+"-")
	if err != nil {
		return "", err
	}
	d.Dir = dir
	path := filepath.Join(dir, name+".conf")
	f, err := os.Create(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	return path, t.Execute(f, d)
}

// HAProxy 2.6: one thread (nbthread 2 in loops2). maxconn fits 9 500
// sessions; maxpipes is set so that 2×maxconn + 2×maxpipes stays within the
// fd limit (its default, maxconn/4, would not). PROXY: accept-proxy on the
// bind, send-proxy-v2 on the server.
var haproxyConf = template.Must(template.New("haproxy").Parse(`global
    nbthread {{or .Threads 1}}
    maxconn {{.MaxConn}}
    maxpipes {{.MaxPipes}}
{{- if .Busy}}
    busy-polling
{{- end}}

defaults
    mode tcp
    maxconn {{.MaxConn}}
    timeout connect 5s
    timeout client 10m
    timeout server 10m
{{- if .Splice}}
    option splice-auto
{{- end}}

frontend fe
    bind {{.Listen}}{{if .ProxyIn}} accept-proxy{{end}}
    default_backend be

backend be
    server s1 {{.Target}}{{if .ProxyOut}} send-proxy-v2{{end}}
`))

func startHAProxy(splice, busy bool) func(*harness, spec) (string, *proc, error) {
	return func(h *harness, s spec) (string, *proc, error) {
		listen, dial, port, err := listenOn(s.wildcard)
		if err != nil {
			return "", nil, err
		}
		conf, err := h.writeConf("haproxy", haproxyConf, confData{
			Listen: listen, Target: s.target, Splice: splice, Busy: busy, MaxConn: 9700, MaxPipes: 256,
			Threads: s.threads, ProxyIn: s.proxy, ProxyOut: s.proxy})
		if err != nil {
			return "", nil, err
		}
		// -db: stay in the foreground, one process.
		p, err := h.startListening("haproxy", s.cpus, port, nil, "haproxy", "-db", "-f", conf)
		return dial, p, err
	}
}

// The PROXY front of proxy-rps and proxy-cps: HAProxy, one thread, on the
// load CPU, the same for every peer; it writes a v2 header on each
// connection to the peer and forwards.
var haproxyFrontConf = template.Must(template.New("haproxy-front").Parse(haproxyHead + `
frontend fe
    bind {{.Listen}}
    default_backend be

backend be
    server s1 {{.Target}} send-proxy-v2
`))

// startProxyFront starts the PROXY front to target on the load CPU and
// returns the address the load connects to.
func (h *harness) startProxyFront(target string) (string, *proc, error) {
	addr, port, err := listenAddr()
	if err != nil {
		return "", nil, err
	}
	conf, err := h.writeConf("haproxy-front", haproxyFrontConf, confData{Listen: addr, Target: target, MaxConn: 9700})
	if err != nil {
		return "", nil, err
	}
	p, err := h.startListening("proxy-front", cpuList(h.opt.loadCPU), port, nil, "haproxy", "-db", "-f", conf)
	return addr, p, err
}

// nginxMain is the main context of every nginx configuration: in the
// foreground, one worker unless .Threads says more, everything in the run's
// directory.
const nginxMain = `daemon off;
master_process on;
worker_processes {{or .Threads 1}};
worker_rlimit_nofile 20000;
pid {{.Dir}}/nginx.pid;
error_log {{.Dir}}/error.log warn;
`

// nginx 1.22 stream module, one worker. It needs two connections per
// session. PROXY: proxy_protocol on the listen reads v1 or v2;
// `proxy_protocol on` writes v1, the only version nginx 1.22 writes.
var nginxStreamConf = template.Must(template.New("nginx").Parse(nginxMain + `load_module /usr/lib/nginx/modules/ngx_stream_module.so;

events {
    worker_connections {{.MaxConn}};
}

stream {
    server {
        listen {{.Listen}}{{if .ProxyIn}} proxy_protocol{{end}};
        proxy_pass {{.Target}};
{{- if .ProxyOut}}
        proxy_protocol on;
{{- end}}
{{- if .HalfClose}}
        proxy_half_close on;
{{- end}}
    }
}
`))

// startNginxStream starts nginx stream, half-closing (proxy_half_close on)
// when halfClose.
func startNginxStream(halfClose bool) func(h *harness, s spec) (string, *proc, error) {
	return func(h *harness, s spec) (string, *proc, error) {
		return h.startNginx("nginx", nginxStreamConf, confData{Target: s.target, MaxConn: 19800,
			Threads: s.threads, Wildcard: s.wildcard, ProxyIn: s.proxy, ProxyOut: s.proxy, HalfClose: halfClose}, s.cpus)
	}
}

// startNginx runs nginx on a configuration rendered from t, listening on a
// free port (of the wildcard when d.Wildcard), its prefix and error log in
// its own directory, and returns the address to connect to.
func (h *harness) startNginx(name string, t *template.Template, d confData, cpus string) (string, *proc, error) {
	listen, dial, port, err := listenOn(d.Wildcard)
	if err != nil {
		return "", nil, err
	}
	d.Listen = listen
	conf, err := h.writeConf(name, t, d)
	if err != nil {
		return "", nil, err
	}
	dir := filepath.Dir(conf)
	p, err := h.startListening(name, cpus, port, nil, "nginx", "-p", dir, "-e", filepath.Join(dir, "error.log"), "-c", conf)
	return dial, p, err
}

func startSocat(h *harness, s spec) (string, *proc, error) {
	_, dial, port, err := listenOn(s.wildcard)
	if err != nil {
		return "", nil, err
	}
	// socat's listen backlog is 5 unless told; without bind= it listens
	// on the wildcard.
	bind := ",bind=127.0.0.1"
	if s.wildcard {
		bind = ""
	}
	p, err := h.startListening("socat", s.cpus, port, nil, "socat",
		fmt.Sprintf("TCP4-LISTEN:%d%s,reuseaddr,fork,backlog=1024", port, bind), "TCP4:"+s.target)
	return dial, p, err
}

// startGoCopy runs the "gocopy" peer role of the integration tests' binary
// (test/integration/compare_test.go): it prints its address and serves until
// its stdin closes.
func startGoCopy(h *harness, s spec) (string, *proc, error) {
	if h.gocopy == "" {
		return "", nil, fmt.Errorf("gocopy: the integration test binary was not built")
	}
	env := []string{"SLUICE_IT_PEER=gocopy", "SLUICE_IT_PEER_TARGET=" + s.target}
	if s.wildcard {
		env = append(env, "SLUICE_IT_PEER_LISTEN=0.0.0.0:0")
	}
	addr, p, err := h.startServer("gocopy", s.cpus, env, h.gocopy, "-test.run=^$")
	if err != nil || !s.wildcard {
		return addr, p, err
	}
	// It prints the address it listens on, 0.0.0.0:PORT.
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		p.stop(2 * time.Second)
		return "", nil, fmt.Errorf("gocopy printed %q: %v", addr, err)
	}
	return net.JoinHostPort("127.0.0.1", port), p, nil
}

// startServer runs a server pinned to cpus that prints its listen address
// on stdout and serves until its stdin closes, and returns that address.
func (h *harness) startServer(name, cpus string, env []string, argv ...string) (string, *proc, error) {
	p, err := h.start(name, startOpts{cpus: cpus, stdin: true, stdout: true, env: env}, argv...)
	if err != nil {
		return "", nil, err
	}
	addr, err := p.line(10 * time.Second)
	if err != nil {
		p.stop(2 * time.Second)
		return "", nil, err
	}
	return addr, p, nil
}

func startSluice(options ...string) func(*harness, spec) (string, *proc, error) {
	return func(h *harness, s spec) (string, *proc, error) {
		return h.startSluiceBin(h.sluice, s, options...)
	}
}

func startSluiceB(h *harness, s spec) (string, *proc, error) {
	if h.opt.sluiceB == "" {
		return "", nil, fmt.Errorf("sluice-b: no --sluice-b binary given")
	}
	return h.startSluiceBin(h.opt.sluiceB, s)
}

// startSluiceBin runs `bin forward` as s asks: the wildcard listen address,
// `--loops N`, and the rule options `accept-proxy send-proxy=v2` for PROXY.
func (h *harness) startSluiceBin(bin string, s spec, options ...string) (string, *proc, error) {
	listen, dial, port, err := listenOn(s.wildcard)
	if err != nil {
		return "", nil, err
	}
	if s.proxy {
		options = append([]string{"accept-proxy", "send-proxy=v2"}, options...)
	}
	args := append([]string{bin, "forward", listen, s.target,
		"--loops", strconv.Itoa(s.nThreads()), "--log-level", "warn", "--drain-timeout", "1s"}, options...)
	p, err := h.startListening("sluice", s.cpus, port, nil, args...)
	return dial, p, err
}

// Backends, on the load CPU, shared by every peer of a scenario.

// startRole runs this binary in a server role and returns its address.
func (h *harness) startRole(role string, cpu int, args ...string) (string, *proc, error) {
	return h.startServer(role, cpuList(cpu), []string{roleEnv + "=" + role}, append([]string{h.self}, args...)...)
}

func (h *harness) startIperf3(cpu int) (string, *proc, error) {
	addr, port, err := listenAddr()
	if err != nil {
		return "", nil, err
	}
	p, err := h.startListening("iperf3-server", cpuList(cpu), port, nil, "iperf3", "-s", "-B", "127.0.0.1", "-p", strconv.Itoa(port))
	return addr, p, err
}

// nginxHTTPTemps starts an http context of nginx: no access log, the
// temporary paths in the run's directory.
const nginxHTTPTemps = `
    access_log off;
    client_body_temp_path {{.Dir}}/body;
    proxy_temp_path {{.Dir}}/proxy;
    fastcgi_temp_path {{.Dir}}/fastcgi;
    uwsgi_temp_path {{.Dir}}/uwsgi;
    scgi_temp_path {{.Dir}}/scgi;`

// The HTTP backend of rps and cps: nginx, one worker, a 1 KiB body from
// memory, keep-alive without a request limit. With ProxyIn every connection
// must start with a PROXY header (v1 or v2): one without, or a second
// header left in the stream as payload, is an error or a 400.
var nginxHTTPConf = template.Must(template.New("nginx-http").Parse(nginxMain + `

events {
    worker_connections 10000;
}

http {` + nginxHTTPTemps + `
    keepalive_requests 1000000000;
    keepalive_timeout 300s;
    server {
        listen {{.Listen}}{{if .ProxyIn}} proxy_protocol{{end}} backlog=4096;
        location / {
            default_type application/octet-stream;
            return 200 "{{.Body}}";
        }
    }
}
`))

// startHTTPBackend starts the HTTP backend on cpu; with proxyIn it requires
// a PROXY header on every connection.
func (h *harness) startHTTPBackend(cpu int, proxyIn bool) (string, *proc, error) {
	return h.startNginx("nginx-http", nginxHTTPConf, confData{Body: strings.Repeat("x", 1024), ProxyIn: proxyIn}, cpuList(cpu))
}
