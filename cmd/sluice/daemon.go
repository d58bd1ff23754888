package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/sluice-proxy/sluice/engine"
	"github.com/sluice-proxy/sluice/rules"
)

// daemonFlags are the flags every daemon command shares.
type daemonFlags struct {
	loops     int
	logLevel  string
	logFormat string
	drain     time.Duration
}

func (d *daemonFlags) register(fs *flag.FlagSet) {
	fs.IntVar(&d.loops, "loops", 0, "event loops; 0 = one per CPU")
	fs.StringVar(&d.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	fs.StringVar(&d.logFormat, "log-format", "console", "log format: console or json")
	fs.DurationVar(&d.drain, "drain-timeout", 10*time.Second, "on SIGTERM/SIGINT, how long live sessions may finish before they are closed")
}

// parseInterleaved parses flags that may appear before, between or after
// positional arguments, and returns the positional ones in order.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			return pos, nil
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

func newFlagSet(name, synopsis string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: %s\n\nflags:\n", synopsis)
		fs.PrintDefaults()
	}
	return fs
}

func newLogger(level, format string) (*zap.Logger, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, usagef("--log-level %q: want debug, info, warn or error", level)
	}
	var cfg zap.Config
	switch format {
	case "json":
		cfg = zap.NewProductionConfig()
	case "console":
		cfg = zap.NewDevelopmentConfig()
		cfg.Development = false
		cfg.DisableStacktrace = true
	default:
		return nil, usagef("--log-format %q: want console or json", format)
	}
	cfg.Level = zap.NewAtomicLevelAt(lvl)
	cfg.Sampling = nil
	cfg.DisableCaller = true
	cfg.OutputPaths = []string{"stderr"}
	return cfg.Build()
}

// serve starts an engine with rules and blocks until SIGINT or SIGTERM, then
// drains. ready, if set, runs once every listener is up.
func serve(d *daemonFlags, rs []*rules.Rule, ready func(*engine.Engine, *zap.Logger)) error {
	log, err := newLogger(d.logLevel, d.logFormat)
	if err != nil {
		return err
	}
	defer log.Sync()
	if d.loops < 0 {
		return usagef("--loops %d: want 0 (one per CPU) or more", d.loops)
	}
	e, err := engine.New(engine.Config{Loops: d.loops, Log: log})
	if err != nil {
		return err
	}
	e.Start()
	sig := make(chan os.Signal, 2)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sig)
	for _, r := range rs {
		lns, err := e.Listen(r)
		if err != nil {
			_ = e.Shutdown(context.Background())
			return fmt.Errorf("%s: %w", r, err)
		}
		for _, ln := range lns {
			log.Info("listening", zap.String("rule", r.String()), zap.Stringer("addr", ln.Addr()))
		}
	}
	if ready != nil {
		ready(e, log)
	}
	s := <-sig
	log.Info("stopping: no new connections; draining live sessions",
		zap.Stringer("signal", s), zap.Int64("sessions", e.Stats().Sessions), zap.Duration("deadline", d.drain))
	ctx, cancel := context.WithTimeout(context.Background(), d.drain)
	defer cancel()
	go func() { // a second signal stops at once
		select {
		case <-sig:
			cancel()
		case <-ctx.Done():
		}
	}()
	err = e.Shutdown(ctx)
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		log.Warn("drain deadline passed; remaining sessions closed")
		err = nil
	}
	log.Info("stopped")
	return err
}

func cmdForward(args []string) error {
	var d daemonFlags
	fs := newFlagSet("forward", "sluice forward LISTEN TARGET [OPTION...] [flags]")
	d.register(fs)
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return usageError{err}
	}
	if len(pos) < 2 {
		return usagef("forward: want LISTEN TARGET [OPTION...], got %q", strings.Join(pos, " "))
	}
	r, err := rules.ParseForward(pos[0], pos[1], pos[2:])
	if err != nil {
		return usagef("forward: %v", err)
	}
	if err := engineSupports(r); err != nil {
		return usagef("forward: %v", err)
	}
	return serve(&d, []*rules.Rule{r}, nil)
}

// engineSupports refuses rule options the engine does not act on yet, so no
// option is silently ignored.
func engineSupports(r *rules.Rule) error {
	var not []string
	if r.Proto != rules.TCP {
		not = append(not, r.Proto.String())
	}
	if r.AcceptProxy {
		not = append(not, "accept-proxy")
	}
	if r.SendProxy != 0 {
		not = append(not, "send-proxy")
	}
	if r.Health != rules.HealthNone {
		not = append(not, "health")
	}
	if len(r.Monitor) > 0 {
		not = append(not, "monitor")
	}
	if len(r.Allow) > 0 || len(r.Deny) > 0 {
		not = append(not, "allow/deny")
	}
	if r.Rate > 0 || r.MaxConn > 0 {
		not = append(not, "rate/maxconn")
	}
	if r.Balance != rules.BalanceRoundRobin {
		not = append(not, "balance="+r.Balance.String())
	}
	if r.HandshakeTimeout > 0 {
		not = append(not, "timeout.handshake")
	}
	if r.ListenPif != "" || r.TargetPif != "" {
		not = append(not, "pifs")
	}
	if len(not) > 0 {
		return fmt.Errorf("not supported by this build yet: %s", strings.Join(not, ", "))
	}
	return nil
}
