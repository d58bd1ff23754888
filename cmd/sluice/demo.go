package main

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/daemon"
	"github.com/sluice-proxy/sluice/rules"
)

// Where the demo listens and serves metrics; a port that is taken is
// replaced by an ephemeral one, and the addresses used are printed.
const (
	demoListen  = "127.0.0.1:8080"
	demoHealth  = "127.0.0.1:8081"
	demoMetrics = "127.0.0.1:9901"
)

// demoConfig is the built-in demo's configuration file, run through the
// same parsing and checks as one given with -c. The listen address, the
// responder's address and the metrics address are filled in at start.
const demoConfig = `# sluice's built-in demo ("sluice run" with no -c)
metrics: {listen: %q}
rules:
  - tcp %s -> %s
  - tcp %s health=http
`

// demoFile is the demo configuration's name in messages.
const demoFile = "(built-in demo)"

// freeOr returns addr if a TCP listener can bind it now, else the same
// address with port 0 (any free port).
func freeOr(addr string) (string, error) {
	ln, err := net.Listen("tcp", addr)
	if err == nil {
		ln.Close()
		return addr, nil
	}
	if !errors.Is(err, syscall.EADDRINUSE) {
		return "", fmt.Errorf("demo: %s: %w", addr, err)
	}
	host, _, _ := net.SplitHostPort(addr)
	return net.JoinHostPort(host, "0"), nil
}

// socketLive reports whether something accepts on the unix socket at path.
func socketLive(path string) bool {
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// runDemo is `sluice run` with no file: a tiny HTTP responder on an
// ephemeral loopback port, a forward to it, and metrics, all on loopback,
// so it works on any machine without root.
func runDemo(d *daemonFlags) error {
	backend, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("demo backend: %w", err)
	}
	defer backend.Close()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintf(w, "hello from sluice's demo backend\nyou are %s, proxied by sluice to %s\n", r.RemoteAddr, backend.Addr())
	})}
	go srv.Serve(backend)
	defer srv.Close()

	listen, err := freeOr(demoListen)
	if err != nil {
		return err
	}
	health, err := freeOr(demoHealth)
	if err != nil {
		return err
	}
	metricsAddr, err := freeOr(demoMetrics)
	if err != nil {
		return err
	}
	target := backend.Addr().String()
	src := fmt.Sprintf(demoConfig, metricsAddr, listen, target, health)
	c, err := config.Parse(demoFile, []byte(src))
	if err != nil {
		return fmt.Errorf("the demo configuration does not validate (a bug):\n%s\n%w", src, err)
	}
	// The control socket is the default one, so `sluice ctl status` finds
	// it with no -s; if a daemon already holds that, a private one.
	ctlFlag := ""
	if c.Ctl.Socket = config.DefaultCtlSocket(); socketLive(c.Ctl.Socket) {
		dir, err := os.MkdirTemp("", "sluice-demo-")
		if err != nil {
			return fmt.Errorf("demo: %w", err)
		}
		defer os.RemoveAll(dir)
		c.Ctl.Socket = filepath.Join(dir, "ctl.sock")
		ctlFlag = " -s " + c.Ctl.Socket
	}
	return runConfig(c, d, func(d *daemon.Daemon) {
		var addr, healthAddr netip.AddrPort
		for _, ln := range d.Engine().Listeners() {
			if ln.Rule().Health != rules.HealthNone {
				healthAddr = ln.Addr()
			} else {
				addr = ln.Addr()
			}
		}
		if listen != demoListen || health != demoHealth {
			d.Log().Warn("demo: " + demoListen + " or " + demoHealth + " is in use; using an ephemeral port instead")
		}
		if metricsAddr != demoMetrics {
			d.Log().Warn("demo: " + demoMetrics + " is in use; metrics on an ephemeral port instead")
		}
		d.Log().Debug("demo configuration", zap.String("yaml", src))
		fmt.Printf("\nsluice demo is up: tcp %s -> %s (a built-in HTTP responder)\n", addr, target)
		fmt.Printf("  try:      curl http://%s/\n", addr)
		fmt.Printf("  health:   curl http://%s/   (200 while up, 503 while draining)\n", healthAddr)
		fmt.Printf("  metrics:  curl http://%s/metrics   (status page: http://%s/)\n", d.Metrics().Addr(), d.Metrics().Addr())
		self := os.Args[0] // as the user started it: ./bin/sluice under make run
		fmt.Printf("  control:  %s ctl%s list    (then: %s ctl%s add 'tcp 127.0.0.1:8090 -> %s')\n", self, ctlFlag, self, ctlFlag, target)
		fmt.Printf("  stop:     Ctrl-C (SIGINT) or SIGTERM; live sessions drain first\n")
		fmt.Printf("  your own: sluice run -c FILE (YAML: see README.md, \"Configuration\")\n\n")
	})
}
