package main

import (
	"fmt"
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
	// start runs the proxy to target pinned to cpu and returns the address
	// to use and the process (nil for direct).
	start func(h *harness, target string, cpu int) (string, *proc, error)
	// idleCap, when > 0, bounds the idle sessions of this peer (socat forks
	// a process per session; the pid space is shared with other users).
	idleCap int
	// optIn: not in the default list of peers; run only when named.
	optIn bool
}

var allPeers = []peer{
	{name: "direct", desc: "no proxy: the load talks to the backend",
		start: func(h *harness, target string, cpu int) (string, *proc, error) { return target, nil, nil }},
	{name: "haproxy", desc: "HAProxy, mode tcp, nbthread 1, no splicing", start: startHAProxy(false)},
	{name: "haproxy-splice", desc: "HAProxy, mode tcp, nbthread 1, `option splice-auto`", start: startHAProxy(true)},
	{name: "nginx", desc: "nginx stream, one worker (`worker_processes 1`, master + worker counted)", start: startNginxStream},
	{name: "socat", desc: "socat `TCP4-LISTEN:…,fork` (a process per session, all counted)", start: startSocat, idleCap: 2000},
	{name: "gocopy", desc: "the plain Go proxy of test/integration (goroutine per direction, io.Copy; Go splices TCP to TCP)", start: startGoCopy},
	{name: "sluice", desc: "`sluice forward … --loops 1` (splice=auto)", start: startSluice()},
	{name: "sluice-splice", desc: "`sluice forward … --loops 1 splice=on`", start: startSluice("splice=on")},
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
	port, err := freePort()
	if err != nil {
		return "", 0, err
	}
	return "127.0.0.1:" + strconv.Itoa(port), port, nil
}

// startListening starts argv and waits until port listens.
func (h *harness) startListening(name string, cpu int, port int, env []string, argv ...string) (*proc, error) {
	p, err := h.start(name, startOpts{cpu: cpu, env: env}, argv...)
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
	Splice              bool
	MaxConn, MaxPipes   int
	Body                string
	// The sni scenario's: the routed name, the decoy name and its target,
	// a route's extra options, the backend's certificate and key files.
	Name, Decoy, Nowhere, Options, Cert, Key string
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

// HAProxy 2.6: one thread. maxconn fits 9 500 sessions; maxpipes is set so
// that 2×maxconn + 2×maxpipes stays within the fd limit (its default,
// maxconn/4, would not).
var haproxyConf = template.Must(template.New("haproxy").Parse(`global
    nbthread 1
    maxconn {{.MaxConn}}
    maxpipes {{.MaxPipes}}

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
    bind {{.Listen}}
    default_backend be

backend be
    server s1 {{.Target}}
`))

func startHAProxy(splice bool) func(*harness, string, int) (string, *proc, error) {
	return func(h *harness, target string, cpu int) (string, *proc, error) {
		addr, port, err := listenAddr()
		if err != nil {
			return "", nil, err
		}
		conf, err := h.writeConf("haproxy", haproxyConf, confData{
			Listen: addr, Target: target, Splice: splice, MaxConn: 9700, MaxPipes: 256})
		if err != nil {
			return "", nil, err
		}
		// -db: stay in the foreground, one process.
		p, err := h.startListening("haproxy", cpu, port, nil, "haproxy", "-db", "-f", conf)
		return addr, p, err
	}
}

// nginxMain is the main context of both nginx configurations: in the
// foreground, one worker, everything in the run's directory.
const nginxMain = `daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {{.Dir}}/nginx.pid;
error_log {{.Dir}}/error.log warn;
`

// nginx 1.22 stream module, one worker. It needs two connections per
// session.
var nginxStreamConf = template.Must(template.New("nginx").Parse(nginxMain + `load_module /usr/lib/nginx/modules/ngx_stream_module.so;

events {
    worker_connections {{.MaxConn}};
}

stream {
    server {
        listen {{.Listen}};
        proxy_pass {{.Target}};
    }
}
`))

func startNginxStream(h *harness, target string, cpu int) (string, *proc, error) {
	return h.startNginx("nginx", nginxStreamConf, confData{Target: target, MaxConn: 19800}, cpu)
}

// startNginx runs nginx on a configuration rendered from t, listening on a
// free port, its prefix and error log in its own directory.
func (h *harness) startNginx(name string, t *template.Template, d confData, cpu int) (string, *proc, error) {
	addr, port, err := listenAddr()
	if err != nil {
		return "", nil, err
	}
	d.Listen = addr
	conf, err := h.writeConf(name, t, d)
	if err != nil {
		return "", nil, err
	}
	dir := filepath.Dir(conf)
	p, err := h.startListening(name, cpu, port, nil, "nginx", "-p", dir, "-e", filepath.Join(dir, "error.log"), "-c", conf)
	return addr, p, err
}

func startSocat(h *harness, target string, cpu int) (string, *proc, error) {
	addr, port, err := listenAddr()
	if err != nil {
		return "", nil, err
	}
	// socat's listen backlog is 5 unless told.
	p, err := h.startListening("socat", cpu, port, nil, "socat",
		fmt.Sprintf("TCP4-LISTEN:%d,bind=127.0.0.1,reuseaddr,fork,backlog=1024", port), "TCP4:"+target)
	return addr, p, err
}

// startGoCopy runs the "gocopy" peer role of the integration tests' binary
// (test/integration/compare_test.go): it prints its address and serves until
// its stdin closes.
func startGoCopy(h *harness, target string, cpu int) (string, *proc, error) {
	if h.gocopy == "" {
		return "", nil, fmt.Errorf("gocopy: the integration test binary was not built")
	}
	return h.startServer("gocopy", cpu, []string{"SLUICE_IT_PEER=gocopy", "SLUICE_IT_PEER_TARGET=" + target},
		h.gocopy, "-test.run=^$")
}

// startServer runs a server that prints its listen address on stdout and
// serves until its stdin closes, and returns that address.
func (h *harness) startServer(name string, cpu int, env []string, argv ...string) (string, *proc, error) {
	p, err := h.start(name, startOpts{cpu: cpu, stdin: true, stdout: true, env: env}, argv...)
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

func startSluice(options ...string) func(*harness, string, int) (string, *proc, error) {
	return func(h *harness, target string, cpu int) (string, *proc, error) {
		return h.startSluiceBin(h.sluice, target, cpu, options...)
	}
}

func startSluiceB(h *harness, target string, cpu int) (string, *proc, error) {
	if h.opt.sluiceB == "" {
		return "", nil, fmt.Errorf("sluice-b: no --sluice-b binary given")
	}
	return h.startSluiceBin(h.opt.sluiceB, target, cpu)
}

func (h *harness) startSluiceBin(bin, target string, cpu int, options ...string) (string, *proc, error) {
	addr, port, err := listenAddr()
	if err != nil {
		return "", nil, err
	}
	args := append([]string{bin, "forward", addr, target,
		"--loops", "1", "--log-level", "warn", "--drain-timeout", "1s"}, options...)
	p, err := h.startListening("sluice", cpu, port, nil, args...)
	return addr, p, err
}

// Backends, on the load CPU, shared by every peer of a scenario.

// startRole runs this binary in a server role and returns its address.
func (h *harness) startRole(role string, cpu int, args ...string) (string, *proc, error) {
	return h.startServer(role, cpu, []string{roleEnv + "=" + role}, append([]string{h.self}, args...)...)
}

func (h *harness) startIperf3(cpu int) (string, *proc, error) {
	addr, port, err := listenAddr()
	if err != nil {
		return "", nil, err
	}
	p, err := h.startListening("iperf3-server", cpu, port, nil, "iperf3", "-s", "-B", "127.0.0.1", "-p", strconv.Itoa(port))
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
// memory, keep-alive without a request limit.
var nginxHTTPConf = template.Must(template.New("nginx-http").Parse(nginxMain + `

events {
    worker_connections 10000;
}

http {` + nginxHTTPTemps + `
    keepalive_requests 1000000000;
    keepalive_timeout 300s;
    server {
        listen {{.Listen}} backlog=4096;
        location / {
            default_type application/octet-stream;
            return 200 "{{.Body}}";
        }
    }
}
`))

func (h *harness) startHTTPBackend(cpu int) (string, *proc, error) {
	return h.startNginx("nginx-http", nginxHTTPConf, confData{Body: strings.Repeat("x", 1024)}, cpu)
}
