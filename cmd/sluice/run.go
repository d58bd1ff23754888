package main

import (
	"fmt"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/daemon"
)

// cmdRun is the daemon on a configuration file, or on the built-in demo
// configuration without one.
func cmdRun(args []string) error {
	var d daemonFlags
	var file string
	fs := newFlagSet("run", "sluice run [-c FILE] [flags]")
	fs.StringVar(&file, "c", "", "the configuration file (YAML); without it, the built-in demo")
	d.register(fs)
	pos, help, err := parseCommand(fs, args)
	if help || err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("run: unexpected argument %q", pos[0])
	}
	if file == "" {
		return runDemo(&d)
	}
	c, err := loadConfig(file)
	if err != nil {
		return err
	}
	d.file = file
	return runConfig(c, &d, func(d *daemon.Daemon) {
		d.Log().Info("sluice is up")
	})
}

// loadConfig reads a configuration file. A file that cannot be read is a
// usage error; one that does not validate returns its rules.ErrorList.
func loadConfig(file string) (*config.Config, error) {
	c, err := config.Load(file)
	if err == nil {
		return c, nil
	}
	if isErrorList(err) {
		return nil, err
	}
	return nil, usageError{fmt.Errorf("-c: %w", err)}
}

// reloader reads the configuration file again with the command line's
// flags over it, for a reload; nil without a file.
func (d *daemonFlags) reloader() func() (*config.Config, error) {
	if d.file == "" {
		return nil
	}
	return func() (*config.Config, error) {
		c, err := loadConfig(d.file)
		if err != nil {
			return nil, err
		}
		if err := d.override(c); err != nil {
			return nil, err
		}
		return c, nil
	}
}

// liveLogger is newLogger with a level a reload may change: the logger is
// built at debug and filtered by the returned level (zap.IncreaseLevel
// reads it at every entry).
func liveLogger(level, format string) (*zap.Logger, *zap.AtomicLevel, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		_, err = newLogger(level, format) // its usage error for the level
		return nil, nil, err
	}
	log, err := newLogger(zapcore.DebugLevel.String(), format)
	if err != nil {
		return nil, nil, err
	}
	al := zap.NewAtomicLevelAt(lvl)
	return log.WithOptions(zap.IncreaseLevel(al)), &al, nil
}

// runConfig applies the command line's flags over the file's settings and
// serves.
func runConfig(c *config.Config, d *daemonFlags, ready func(*daemon.Daemon)) error {
	if err := d.override(c); err != nil {
		return err
	}
	return serve(c, d, c.CtlSocket(), ready)
}
