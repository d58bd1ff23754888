package main

import (
	"fmt"

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

// runConfig applies the command line's flags over the file's settings and
// serves.
func runConfig(c *config.Config, d *daemonFlags, ready func(*daemon.Daemon)) error {
	if err := d.override(c); err != nil {
		return err
	}
	return serve(c, d, c.CtlSocket(), ready)
}
