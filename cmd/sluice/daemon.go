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

	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/ctl"
	"github.com/sluice-proxy/sluice/engine"
	"github.com/sluice-proxy/sluice/metrics"
	"github.com/sluice-proxy/sluice/rules"
)

// daemonFlags are the flags every daemon command shares. Given on the
// command line, they override the configuration file.
type daemonFlags struct {
	fs        *flag.FlagSet
	loops     int
	logLevel  string
	logFormat string
	drain     time.Duration
}

func (d *daemonFlags) register(fs *flag.FlagSet) {
	d.fs = fs
	fs.IntVar(&d.loops, "loops", 0, "event loops; 0 = one per CPU (overrides loops of the file)")
	fs.StringVar(&d.logLevel, "log-level", config.DefaultLogLevel, "log level: debug, info, warn, error (overrides log.level)")
	fs.StringVar(&d.logFormat, "log-format", config.DefaultLogFormat, "log format: console or json (overrides log.format)")
	fs.DurationVar(&d.drain, "drain-timeout", config.DefaultDrain, "on SIGTERM/SIGINT, how long live sessions may finish before they are closed (overrides drain)")
}

// override sets c's settings from the flags given on the command line.
func (d *daemonFlags) override(c *config.Config) error {
	d.fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "loops":
			c.Loops = d.loops
		case "log-level":
			c.Log.Level = d.logLevel
		case "log-format":
			c.Log.Format = d.logFormat
		case "drain-timeout":
			c.Drain = d.drain
		}
	})
	if c.Loops < 0 {
		return usagef("--loops %d: want 0 (one per CPU) or more", c.Loops)
	}
	if c.Drain < 0 {
		return usagef("--drain-timeout %s: want 0 or more", c.Drain)
	}
	return nil
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

// parseCommand parses a command's flags and positional arguments. help is
// true after -h (the usage is printed; the command does nothing more); a
// bad flag is a usage error.
func parseCommand(fs *flag.FlagSet, args []string) (pos []string, help bool, err error) {
	pos, err = parseInterleaved(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		return nil, true, nil
	}
	if err != nil {
		return nil, false, usageError{err}
	}
	return pos, false, nil
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

// at names where a rule or pif of c comes from: "FILE:LINE: ", or "" for
// one given on the command line.
func at(c *config.Config, line int) string {
	if c.File == "" {
		return ""
	}
	return fmt.Sprintf("%s:%d: ", c.File, line)
}

// applyInitial installs the configuration's table as generation 1, through
// the same transaction the control socket uses: every port is bound or the
// daemon does not start, and each failure names its rule's line
// ("FILE:LINE: tcp 0.0.0.0:8080: port 8080: address already in use"); the
// failed ports of weak rules are logged, not fatal.
func applyInitial(c *config.Config, e *engine.Engine) error {
	sum, err := e.Apply(c.RuleList())
	if err != nil {
		return err
	}
	var msgs []string
	for i, res := range sum.Rules {
		for _, f := range res.Failed {
			msgs = append(msgs, fmt.Sprintf("%s%s: port %d: %s", at(c, c.Rules[i].Line), res.Listen, f.Port, f.Msg))
		}
	}
	if !sum.OK() {
		if _, err := e.Rollback(); err != nil {
			return err
		}
		return errors.New(strings.Join(msgs, "\n"))
	}
	if _, err := e.Commit(); err != nil {
		return err
	}
	for _, m := range msgs {
		e.Log().Warn("weak rule: port not bound", zap.String("failure", m))
	}
	return nil
}

// running is the daemon once it is up, as its ready hook sees it.
type running struct {
	e       *engine.Engine
	log     *zap.Logger
	metrics *metrics.Server // nil without metrics.listen
	ctl     *ctl.Server     // nil without a control socket
}

// The engine is what the control socket drives.
var (
	_ ctl.Engine      = (*engine.Engine)(nil)
	_ ctl.TxnObserver = (*engine.Engine)(nil)
)

// serve runs the daemon on a configuration: pifs, the engine, every rule's
// listeners, the metrics endpoint. ready, if set, runs once all are up.
// It blocks until SIGINT or SIGTERM, then drains live sessions for up to
// c.Drain (a second signal stops at once).
func serve(c *config.Config, ctlPath string, ready func(*running)) error {
	log, err := newLogger(c.Log.Level, c.Log.Format)
	if err != nil {
		return err
	}
	defer log.Sync()
	e, err := engine.New(engine.Config{Loops: c.Loops, Log: log})
	if err != nil {
		return fmt.Errorf("starting the engine: %w", err)
	}
	for _, p := range c.Pifs {
		if err := e.AddPif(p.Name, p.Netns); err != nil {
			_ = e.Shutdown(context.Background())
			return fmt.Errorf("%spif %s (netns %s): %w", at(c, p.Line), p.Name, p.Netns, err)
		}
		log.Info("pif added", zap.String("pif", p.Name), zap.String("netns", p.Netns))
	}
	e.Start()
	sig := make(chan os.Signal, 2)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sig)
	if err := applyInitial(c, e); err != nil {
		_ = e.Shutdown(context.Background())
		return err
	}
	for _, ln := range e.Listeners() {
		log.Info("listening", zap.Stringer("rule", ln.Rule()), zap.Stringer("addr", ln.Addr()))
	}
	if len(c.Rules) == 0 {
		log.Warn("the configuration has no rules: nothing to forward")
	}
	r := &running{e: e, log: log}
	if ctlPath != "" {
		if r.ctl, err = ctl.Serve(context.Background(), ctlPath, e, log); err != nil {
			_ = e.Shutdown(context.Background())
			return fmt.Errorf("control socket: %w (set ctl.socket, or stop the daemon that holds it)", err)
		}
		// Closed before the engine stops: an open transaction rolls back
		// through the engine first.
		defer r.ctl.Close()
	}
	if c.Metrics.Listen.IsValid() {
		if r.metrics, err = startMetrics(c, e, log); err != nil {
			_ = e.Shutdown(context.Background())
			return err
		}
		log.Info("metrics listening", zap.String("url", "http://"+r.metrics.Addr().String()+"/metrics"))
	}
	if ready != nil {
		ready(r)
	}
	s := <-sig
	log.Info("stopping: no new connections; draining live sessions",
		zap.Stringer("signal", s), zap.Int64("sessions", e.Stats().Sessions), zap.Duration("deadline", c.Drain))
	ctx, cancel := context.WithTimeout(context.Background(), c.Drain)
	defer cancel()
	go func() { // a second signal stops at once
		select {
		case <-sig:
			cancel()
		case <-ctx.Done():
		}
	}()
	if r.ctl != nil {
		_ = r.ctl.Close() // no table change during the drain
	}
	err = e.Shutdown(ctx)
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		log.Warn("drain deadline passed; remaining sessions closed")
		err = nil
	}
	if r.metrics != nil {
		// Scrapes went on during the drain; the last ones may finish.
		mctx, mcancel := context.WithTimeout(context.Background(), time.Second)
		if merr := r.metrics.Close(mctx); merr != nil {
			log.Warn("metrics server close", zap.Error(merr))
		}
		mcancel()
	}
	log.Info("stopped")
	return err
}

// startMetrics serves /metrics from e's counters and the status page (the
// server's Close stops the page's sampler).
func startMetrics(c *config.Config, e *engine.Engine, log *zap.Logger) (*metrics.Server, error) {
	reg, err := metrics.NewRegistry(e.Stats)
	if err != nil {
		return nil, err
	}
	page := metrics.NewStatusPage(e, metrics.StatusInfo{Version: version, Config: c.File})
	srv, err := metrics.Serve(c.Metrics.Listen, reg, page, log)
	if err != nil {
		page.Close()
	}
	return srv, err
}

func cmdForward(args []string) error {
	var d daemonFlags
	var ctlPath string
	fs := newFlagSet("forward", "sluice forward LISTEN TARGET [OPTION...] [--ctl PATH] [flags]")
	fs.StringVar(&ctlPath, "ctl", "", "serve a control socket at PATH (sluice ctl -s PATH ...)")
	d.register(fs)
	pos, help, err := parseCommand(fs, args)
	if help || err != nil {
		return err
	}
	if len(pos) < 2 {
		return usagef("forward: want LISTEN TARGET [OPTION...], got %q", strings.Join(pos, " "))
	}
	r, err := rules.ParseForward(pos[0], pos[1], pos[2:])
	if err != nil {
		return usagef("forward: %v", err)
	}
	if r.ListenPif != "" || r.TargetPif != "" {
		return usagef("forward: %s: forward knows no pifs; declare them in a configuration file (sluice run -c)", r)
	}
	c := config.Default()
	c.Rules = []rules.Entry{{Rule: r}}
	if err := d.override(c); err != nil {
		return err
	}
	return serve(c, ctlPath, nil)
}
