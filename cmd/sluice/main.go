// Command sluice is the single binary: the daemon (run, forward) and its
// tools. Exit codes, for every command: 0 success; 1 runtime or protocol
// error; 2 bad usage or a table that does not validate; 3 applied but rolled
// back; 4 another writer holds the control socket.
package main

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"

	"github.com/sluice-proxy/sluice/rules"
)

// The main goroutine keeps the main thread to itself. The process's
// /proc/PID/ns/net and /proc/PID/net/* follow the main thread: were a pif's
// thread (switched into another network namespace, engine/pif.go) ever the
// main thread, the daemon would seem to live in that namespace, and
// `nsenter -t PID -n` would enter it.
func init() { runtime.LockOSThread() }

// Exit codes of the contract in DESIGN.md.
const (
	exitOK       = 0
	exitRuntime  = 1
	exitUsage    = 2
	exitRollback = 3
	exitBusy     = 4
)

// usageError marks an error as bad usage (exit 2).
type usageError struct{ err error }

func (u usageError) Error() string { return u.err.Error() }
func (u usageError) Unwrap() error { return u.err }

func usagef(format string, a ...any) error { return usageError{fmt.Errorf(format, a...)} }

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, usageText())
		return exitUsage
	}
	var err error
	switch args[0] {
	case "run":
		err = cmdRun(args[1:])
	case "forward":
		err = cmdForward(args[1:])
	case "check":
		err = cmdCheck(args[1:])
	case "ctl": // its own exit codes: 3 rolled back, 4 busy (ctl.go)
		return runCtl(args[1:], os.Stdout, os.Stderr)
	case "version", "--version", "-version":
		switch {
		case len(args) == 1:
			fmt.Println("sluice", version)
		case len(args) == 2 && (args[1] == "-h" || args[1] == "--help"):
			fmt.Fprint(os.Stderr, "usage: sluice version\n\nPrints the module version and the VCS revision the binary was built from. No flags.\n")
		default:
			err = usagef("version: takes no arguments (got %s)", strings.Join(args[1:], " "))
		}
	case "help":
		switch {
		case len(args) == 2 && (args[1] == "-h" || args[1] == "--help"):
			fmt.Fprint(os.Stderr, "usage: sluice help [rules|man]\n\n  help        the commands and their flags\n  help rules  every rule option, its form and its default\n  help man    the manual page, as roff (make man writes docs/sluice.1)\n")
		case len(args) == 1:
			fmt.Print(usageText())
		case len(args) == 2 && args[1] == "rules":
			fmt.Print(rules.OptionHelp())
		case len(args) == 2 && args[1] == "man":
			fmt.Print(manPage())
		default:
			err = usagef("help %s: want no topic, rules or man", strings.Join(args[1:], " "))
		}
	case "-h", "--help":
		fmt.Print(usageText())
	default:
		err = usagef("unknown command %q (see sluice --help)", args[0])
	}
	if err == nil {
		return exitOK
	}
	if printErrorList(err) { // FILE:LINE: message, one per line
		return exitUsage
	}
	fmt.Fprintln(os.Stderr, "sluice:", err)
	var u usageError
	if errors.As(err, &u) {
		return exitUsage
	}
	return exitRuntime
}
