package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/daemon"
	"github.com/sluice-proxy/sluice/internal/logsink"
	"github.com/sluice-proxy/sluice/rules"
)

// daemonFlags are the flags every daemon command shares. Given on the
// command line, they override the configuration file.
type daemonFlags struct {
	fs        *flag.FlagSet
	loops     int
	busyPoll  time.Duration
	logLevel  string
	logFormat string
	drain     time.Duration
	stateDir  string
	fresh     bool
	file      string // the configuration file, read again at a reload; "" = none
}

func (d *daemonFlags) register(fs *flag.FlagSet) {
	d.fs = fs
	fs.IntVar(&d.loops, "loops", 0, "event loops; 0 = one per CPU (overrides loops of the file)")
	fs.DurationVar(&d.busyPoll, "busy-poll", 0, "how long a loop polls without sleeping after its last event, such as 200us: lower latency for a loop's CPU; 0 = off (overrides busy-poll)")
	fs.StringVar(&d.logLevel, "log-level", config.DefaultLogLevel, "log level: debug, info, warn, error (overrides log.level)")
	fs.StringVar(&d.logFormat, "log-format", config.DefaultLogFormat, "log format: console or json (overrides log.format)")
	fs.DurationVar(&d.drain, "drain-timeout", config.DefaultDrain, "on SIGTERM/SIGINT, how long live sessions may finish before they are closed (overrides drain)")
	fs.StringVar(&d.stateDir, "state", "", "keep the committed table and its history in DIR across restarts (overrides state.dir)")
	fs.BoolVar(&d.fresh, "fresh", false, "start from the configuration's rules, whatever the state dir holds (the generations continue)")
}

// override sets c's settings from the flags given on the command line.
func (d *daemonFlags) override(c *config.Config) error {
	d.fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "loops":
			c.Loops = d.loops
		case "busy-poll":
			c.BusyPoll = d.busyPoll
		case "log-level":
			c.Log.Level = d.logLevel
		case "log-format":
			c.Log.Format = d.logFormat
		case "drain-timeout":
			c.Drain = d.drain
		case "state":
			c.State.Dir = d.stateDir
		}
	})
	if c.State.Dir != "" && !filepath.IsAbs(c.State.Dir) {
		abs, err := filepath.Abs(c.State.Dir)
		if err != nil {
			return usagef("--state %s: %v", c.State.Dir, err)
		}
		c.State.Dir = abs
	}
	if d.fresh && c.State.Dir == "" {
		return usagef("--fresh: no state dir (set state.dir, or --state DIR)")
	}
	if c.Loops < 0 {
		return usagef("--loops %d: want 0 (one per CPU) or more", c.Loops)
	}
	if c.BusyPoll < 0 || c.BusyPoll > config.MaxBusyPoll {
		return usagef("--busy-poll %s: want 0 (off) to %s", c.BusyPoll, config.MaxBusyPoll)
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
// true after -h (the usage is printed on the flag set's output; the command
// does nothing more); a bad flag is a usage error, printed once, by the
// caller, with a pointer to -h (the flag package would print it and the
// whole usage besides).
func parseCommand(fs *flag.FlagSet, args []string) (pos []string, help bool, err error) {
	out := fs.Output()
	fs.SetOutput(io.Discard)
	pos, err = parseInterleaved(fs, args)
	fs.SetOutput(out)
	if errors.Is(err, flag.ErrHelp) {
		fs.Usage()
		return nil, true, nil
	}
	if err != nil {
		return nil, false, usagef("%v (sluice %s -h lists the flags)", err, fs.Name())
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

// logTimeLayout is the JSON log's time: RFC 3339, UTC, milliseconds.
const logTimeLayout = "2006-01-02T15:04:05.000Z07:00"

func newLogger(level, format string) (*zap.Logger, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, usagef("--log-level %q: want debug, info, warn or error", level)
	}
	cfg, err := logConfig(format)
	if err != nil {
		return nil, err
	}
	// Not cfg.Build: its stderr is written synchronously, and a log line of
	// an event loop must never wait for a slow reader of stderr (a stuck
	// journald pipe). logsink buffers and drops, counted.
	enc := zapcore.NewJSONEncoder(cfg.EncoderConfig)
	if format == "console" {
		enc = zapcore.NewConsoleEncoder(cfg.EncoderConfig)
	}
	out := stderrSink()
	opts := []zap.Option{zap.ErrorOutput(out)}
	if !cfg.DisableStacktrace {
		opts = append(opts, zap.AddStacktrace(zapcore.ErrorLevel))
	}
	return zap.New(zapcore.NewCore(enc, out, zap.NewAtomicLevelAt(lvl)), opts...), nil
}

// logConfig is the zap configuration of a --log-format: its encoder's
// settings and whether errors carry stacks.
func logConfig(format string) (zap.Config, error) {
	var cfg zap.Config
	switch format {
	case "json":
		cfg = zap.NewProductionConfig()
		// RFC 3339 in UTC with milliseconds, as ctl watch's events; not
		// an epoch float a reader has to convert.
		cfg.EncoderConfig.EncodeTime = func(t time.Time, e zapcore.PrimitiveArrayEncoder) {
			e.AppendString(t.UTC().Format(logTimeLayout))
		}
	case "console":
		cfg = zap.NewDevelopmentConfig()
		cfg.Development = false
		cfg.DisableStacktrace = true
	default:
		return cfg, usagef("--log-format %q: want console or json", format)
	}
	return cfg, nil
}

// stderrSink is the process's one non-blocking writer for stderr.
var stderrSink = sync.OnceValue(func() *logsink.Writer { return logsink.New(os.Stderr, 0) })

// serve runs the daemon on a configuration (package daemon: pifs, the
// engine, every rule's listeners, the control socket at ctlPath unless "",
// the metrics endpoint). ready, if set, runs once all are up. It blocks
// until SIGINT or SIGTERM, then drains live sessions for up to c.Drain (a
// second signal stops at once).
func serve(c *config.Config, df *daemonFlags, ctlPath string, ready func(*daemon.Daemon)) error {
	log, level, err := liveLogger(c.Log.Level, c.Log.Format)
	if err != nil {
		return err
	}
	defer log.Sync()
	exe, _ := os.Executable() // now: a binary replaced on disk later is what an upgrade starts
	d, err := daemon.Start(daemon.Options{Config: c, CtlPath: ctlPath, Log: log, Version: version,
		StateDir: c.State.Dir, Fresh: df.fresh, Reload: df.reloader(), Level: level,
		Environ: true, Executable: exe, Args: os.Args[1:]})
	if err != nil {
		return err
	}
	if ready != nil {
		ready(d)
	}
	return d.Run()
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
	return serve(c, &d, ctlPath, nil)
}
