package main

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync/atomic"
	"text/template"
	"time"

	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// The TLS termination scenarios (issue 17): HAProxy, nginx and sluice
// terminate TLS with the same self-signed ECDSA P-256 certificate and the
// same pinning (TLS 1.3 only, X25519, TLS_AES_128_GCM_SHA256 where the
// proxy lets it be set; Go's server picks that suite first on AES-capable
// CPUs), plaintext to the backend.
//
//   - tls-hs: new connections, each a full handshake (no resumption), one
//     byte echoed, closed; tls-hs-resume the same with each client worker
//     keeping its session tickets (every connection after its first
//     resumes: no certificate signature).
//   - tls-bulk: one TLS stream, the client writing for the duration to a
//     backend that discards.
const (
	termName = "bench.example.com"
	termConc = 50 // connections in flight, as cps and sni
)

func termSkip(p peer) string {
	switch p.name {
	case "haproxy", "nginx", "sluice":
		return ""
	}
	return "does not terminate TLS here"
}

var tlsTermScenarios = []scenario{
	{name: "tls-hs", title: "tls-hs: new TLS 1.3 connections terminated by the proxy (ECDSA P-256, X25519, no resumption), 50 in flight, one byte echoed each", unit: "conn/s", latency: true,
		skip:    termSkip,
		backend: func(h *harness) (string, *proc, error) { return h.startRole("echo", h.opt.loadCPU) },
		route:   startTerminator, measure: tlsHandshakes(false)},
	{name: "tls-hs-resume", title: "tls-hs-resume: the same, each client worker resuming its session from a ticket", unit: "conn/s", latency: true,
		skip:    termSkip,
		backend: func(h *harness) (string, *proc, error) { return h.startRole("echo", h.opt.loadCPU) },
		route:   startTerminator, measure: tlsHandshakes(true)},
	{name: "tls-bulk", title: "tls-bulk: one TLS 1.3 stream through termination, client to a discarding backend", unit: "Gbit/s",
		skip:    termSkip,
		backend: func(h *harness) (string, *proc, error) { return h.startRole("sink", h.opt.loadCPU) },
		route:   startTerminator, measure: tlsBulk},
}

// startTerminator starts peer p terminating TLS for termName, plaintext
// to target.
func startTerminator(h *harness, p peer, target string, cpu int) (string, *proc, error) {
	dir, err := os.MkdirTemp(h.dir, "term-")
	if err != nil {
		return "", nil, err
	}
	cert, key, err := testpeer.WriteSelfSigned(dir, termName)
	if err != nil {
		return "", nil, err
	}
	d := confData{Target: target, MaxConn: 9700, Name: termName, Cert: cert, Key: key}
	addr, port, err := listenAddr()
	if err != nil {
		return "", nil, err
	}
	d.Listen = addr
	switch p.name {
	case "haproxy":
		// HAProxy reads the key from the crt file.
		cb, err1 := os.ReadFile(cert)
		kb, err2 := os.ReadFile(key)
		if err1 != nil || err2 != nil {
			return "", nil, fmt.Errorf("certificate files: %v %v", err1, err2)
		}
		d.Cert = dir + "/combined.pem"
		if err := os.WriteFile(d.Cert, append(cb, kb...), 0o600); err != nil {
			return "", nil, err
		}
		conf, err := h.writeConf("haproxy-term", haproxyTermConf, d)
		if err != nil {
			return "", nil, err
		}
		px, err := h.startListening("haproxy", cpuList(cpu), port, nil, "haproxy", "-db", "-f", conf)
		return addr, px, err
	case "nginx":
		d.MaxConn = 19800
		return h.startNginx("nginx-term", nginxTermConf, d, cpuList(cpu))
	case "sluice":
		px, err := h.startSluiceConf(h.sluice, "sluice-term", sluiceTermConf, d, cpu, port)
		return addr, px, err
	}
	return "", nil, fmt.Errorf("%s does not terminate TLS here", p.name)
}

var haproxyTermConf = template.Must(template.New("haproxy-term").Parse(haproxyHead + `
frontend fe
    bind {{.Listen}} ssl crt {{.Cert}} ssl-min-ver TLSv1.3 ciphersuites TLS_AES_128_GCM_SHA256 curves X25519
    default_backend be

backend be
    server s1 {{.Target}}
`))

var nginxTermConf = template.Must(template.New("nginx-term").Parse(nginxMain + `load_module /usr/lib/nginx/modules/ngx_stream_module.so;

events {
    worker_connections {{.MaxConn}};
}

stream {
    server {
        listen {{.Listen}} ssl backlog=4096;
        ssl_certificate {{.Cert}};
        ssl_certificate_key {{.Key}};
        ssl_protocols TLSv1.3;
        ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256;
        ssl_ecdh_curve X25519;
        ssl_session_tickets on;
        proxy_pass {{.Target}};
    }
}
`))

var sluiceTermConf = template.Must(template.New("sluice-term").Parse(`ctl: {socket: {{.Dir}}/ctl.sock}
rules:
  - tcp {{.Listen}} -> {{.Target}} tls.cert={{.Cert}} tls.key={{.Key}} tls.min=1.3
`))

// termClientConfig is the client side's pinning.
func termClientConfig(resume bool) *tls.Config {
	cfg := &tls.Config{ServerName: termName, InsecureSkipVerify: true, MinVersion: tls.VersionTLS13,
		CurvePreferences: []tls.CurveID{tls.X25519}}
	if resume {
		cfg.ClientSessionCache = tls.NewLRUClientSessionCache(4)
	}
	return cfg
}

// tlsHandshakes runs the tlshs role on the load CPU through the peer.
func tlsHandshakes(resume bool) func(*harness, target) (map[string]float64, error) {
	return func(h *harness, t target) (map[string]float64, error) {
		secs := h.secs(h.opt.duration)
		return connRole(h, t, "tlshs", secs, t.addr, (time.Duration(secs) * time.Second).String(), strconv.Itoa(termConc), strconv.FormatBool(resume))
	}
}

// tlsHSClient ADDR DURATION CONC RESUME: CONC workers, each again and
// again for DURATION: connect, a TLS handshake (resuming its last session
// when RESUME), one byte there and back, close. It prints a tlsResult.
func tlsHSClient(args []string) error {
	if len(args) != 4 {
		return fmt.Errorf("usage: tlshs ADDR DURATION CONC RESUME")
	}
	d, conc, err := loadArgs(args[1], args[2])
	if err != nil {
		return err
	}
	resume, err := strconv.ParseBool(args[3])
	if err != nil {
		return err
	}
	addr := args[0]
	var resumed atomic.Int64
	res := connLoop(d, conc, func() func() error {
		cfg := termClientConfig(resume) // a session cache per worker
		return func() error {
			did, err := tlsPingOnce(addr, cfg)
			if did {
				resumed.Add(1)
			}
			return err
		}
	})
	if resume && resumed.Load() < int64(res.N)/2 {
		res.Err = fmt.Sprintf("only %d of %d connections resumed", resumed.Load(), res.N)
		res.N = 0
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

// tlsPingOnce makes one connection and one echoed byte; it returns whether
// the handshake resumed.
func tlsPingOnce(addr string, cfg *tls.Config) (bool, error) {
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		return false, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte{'p'}); err != nil {
		return false, err
	}
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return false, err
	}
	return c.ConnectionState().DidResume, nil
}

// tlsBulk runs the tlsbulk role on the load CPU through the peer.
func tlsBulk(h *harness, t target) (map[string]float64, error) {
	secs := h.secs(h.opt.duration)
	v := map[string]float64{}
	m := h.meter(t)
	out, err := h.runTool("tlsbulk", h.opt.loadCPU, []string{roleEnv + "=tlsbulk"}, time.Duration(secs+30)*time.Second,
		h.self, t.addr, (time.Duration(secs) * time.Second).String())
	m.read(v)
	if err != nil {
		return nil, err
	}
	var r struct {
		Bytes int64   `json:"bytes"`
		Secs  float64 `json:"secs"`
		Err   string  `json:"err,omitempty"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		return nil, fmt.Errorf("tlsbulk: %v: %q", err, out)
	}
	if r.Bytes == 0 || r.Err != "" {
		return nil, fmt.Errorf("tlsbulk: %d bytes: %s", r.Bytes, r.Err)
	}
	v[mValue] = float64(r.Bytes) * 8 / r.Secs / 1e9
	return v, nil
}

// tlsBulkClient ADDR DURATION: one TLS connection, 64 KiB writes for
// DURATION; it prints the bytes written and the seconds.
func tlsBulkClient(args []string) error {
	if len(args) != 2 {
		return fmt.Errorf("usage: tlsbulk ADDR DURATION")
	}
	d, err := time.ParseDuration(args[1])
	if err != nil {
		return err
	}
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", args[0], termClientConfig(false))
	if err != nil {
		return err
	}
	defer c.Close()
	buf := make([]byte, 64<<10)
	var total int64
	began := time.Now()
	end := began.Add(d)
	var werr error
	for time.Now().Before(end) {
		c.SetWriteDeadline(time.Now().Add(5 * time.Second))
		n, err := c.Write(buf)
		total += int64(n)
		if err != nil {
			werr = err
			break
		}
	}
	res := struct {
		Bytes int64   `json:"bytes"`
		Secs  float64 `json:"secs"`
		Err   string  `json:"err,omitempty"`
	}{Bytes: total, Secs: time.Since(began).Seconds()}
	if werr != nil {
		res.Err = werr.Error()
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

// serveSink discards every byte it gets: tls-bulk's backend.
func serveSink() error {
	return serveConns(func(c net.Conn) { defer c.Close(); io.Copy(io.Discard, c) })
}
