package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/ctl"
	"github.com/sluice-proxy/sluice/daemon"
	"github.com/sluice-proxy/sluice/rules"
	"github.com/sluice-proxy/sluice/tlsconf"
)

// cmdCheck validates a configuration (-c) or a rules file (-r), and reads
// the rules' TLS files as run would (checkTLS), and the files store.etcd
// names (its password file, CA, certificate and key: daemon.CheckStore).
// Every error goes to stderr as "FILE:LINE: message" (main prints the list,
// exit 2); on success a one-line summary goes to stdout.
func cmdCheck(args []string) error {
	var cfgFile, rulesFile string
	fs := newFlagSet("check", "sluice check -c FILE | sluice check -r RULESFILE")
	fs.StringVar(&cfgFile, "c", "", "a configuration file (YAML) to validate")
	fs.StringVar(&rulesFile, "r", "", "a rules file (one rule per line, # comments) to validate")
	pos, help, err := parseCommand(fs, args)
	if help || err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("check: unexpected argument %q (want -c FILE or -r RULESFILE)", pos[0])
	}
	switch {
	case (cfgFile == "") == (rulesFile == ""):
		return usagef("check: want one of -c FILE or -r RULESFILE")
	case cfgFile != "":
		c, err := loadConfig(cfgFile)
		if err != nil {
			return err
		}
		errs := checkTLS(cfgFile, c.Rules)
		if sc := c.Store.Etcd; sc != nil {
			if err := daemon.CheckStore(sc); err != nil {
				errs = append(errs, &rules.Error{File: cfgFile, Line: sc.Line, Msg: "store.etcd: " + err.Error()})
			}
		}
		if len(errs) > 0 {
			return errs
		}
		// What run would refuse and check can know without a daemon.
		if err := ctl.CheckSocketPath(c.CtlSocket()); err != nil {
			return usageError{fmt.Errorf("%s: ctl.socket %s: %w", cfgFile, c.CtlSocket(), err)}
		}
		fmt.Printf("%s: ok: %s, %s, %s\n", cfgFile, count(len(c.Rules), "rule"), count(c.Ports(), "listen port"), count(len(c.Pifs), "pif"))
	default:
		src, err := config.ReadFile(rulesFile)
		if err != nil {
			return usageError{fmt.Errorf("-r: %w", err)}
		}
		entries, err := rules.ParseFile(rulesFile, src)
		if err != nil {
			return err
		}
		if errs := checkTLS(rulesFile, entries); len(errs) > 0 {
			return errs
		}
		ports := rules.ListenPortCount(rules.RulesOf(entries))
		fmt.Printf("%s: ok: %s, %s\n", rulesFile, count(len(entries), "rule"), count(ports, "listen port"))
	}
	return nil
}

// checkTLS reads and checks the files of every entry's tls.* options with
// the loader run and apply use (tlsconf.Load, through the engine's
// CheckTLS), and returns a problem per rule whose files do not load, in
// run's words: "FILE:LINE: RULE: tls.cert /a.pem: open …". A relative path
// is read from the current directory, as the daemon reads it from its own.
func checkTLS(file string, entries []rules.Entry) rules.ErrorList {
	var errs rules.ErrorList
	for _, e := range entries {
		if _, err := tlsconf.Load(e.Rule); err != nil {
			errs = append(errs, &rules.Error{File: file, Line: e.Line, Msg: fmt.Sprintf("%s: %v", e.Rule, err)})
		}
	}
	return errs
}

// count writes "1 rule", "2 rules".
func count(n int, what string) string { return fmt.Sprintf("%d %s", n, plural(n, what)) }

// plural is what, with an s unless n is 1.
func plural(n int, what string) string {
	if n == 1 {
		return what
	}
	return what + "s"
}

// allOf writes "all 2" (of several), "the one" (of one): "committed on all
// 2 instances", "on the one instance".
func allOf(n int) string {
	if n == 1 {
		return "the one"
	}
	return fmt.Sprintf("all %d", n)
}

// isErrorList reports whether err carries validation errors to print one
// per line.
func isErrorList(err error) bool {
	var list rules.ErrorList
	return errors.As(err, &list)
}

// printErrorList prints every validation error of err, one per line, as
// FILE:LINE: message, and reports whether there were any.
func printErrorList(err error) bool {
	var list rules.ErrorList
	if !errors.As(err, &list) {
		return false
	}
	for _, e := range list {
		fmt.Fprintln(os.Stderr, e)
	}
	return true
}
