package main

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"syscall"

	"go.uber.org/zap"

	"github.com/sluice-proxy/sluice/engine"
	"github.com/sluice-proxy/sluice/rules"
)

// demoListen is where the demo forward listens; if it is taken, an ephemeral
// port is used instead and printed.
const demoListen = "127.0.0.1:8080"

// cmdRun is the daemon. With no configuration file it runs the built-in demo:
// a tiny HTTP responder on an ephemeral loopback port, and a forward to it.
func cmdRun(args []string) error {
	var d daemonFlags
	fs := newFlagSet("run", "sluice run [flags]")
	d.register(fs)
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return usageError{err}
	}
	if len(pos) > 0 {
		return usagef("run: unexpected argument %q", pos[0])
	}
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

	target := backend.Addr().String()
	listen := demoListen
	if ln, err := net.Listen("tcp", listen); err != nil {
		if !errors.Is(err, syscall.EADDRINUSE) {
			return fmt.Errorf("demo listen %s: %w", listen, err)
		}
		listen = "127.0.0.1:0"
	} else {
		ln.Close()
	}
	r, err := rules.ParseForward(listen, target, nil)
	if err != nil {
		return err
	}
	return serve(&d, []*rules.Rule{r}, func(e *engine.Engine, log *zap.Logger) {
		addr := e.Listeners()[0].Addr()
		if listen != demoListen {
			log.Warn("demo: " + demoListen + " is in use; using an ephemeral port instead")
		}
		fmt.Printf("\nsluice demo is up: tcp %s -> %s (a built-in HTTP responder)\n", addr, target)
		fmt.Printf("  try:   curl http://%s/\n", addr)
		fmt.Printf("  stop:  Ctrl-C (SIGINT) or SIGTERM; live sessions drain first\n\n")
	})
}
