package main

import (
	"fmt"
	"strings"

	"github.com/sluice-proxy/sluice/rules"
)

// The help of the binary has one source: the commands below and the rule
// options' table (rules.OptionDocs). `sluice help` (usage), `sluice help
// rules` (rules.OptionHelp) and the man page (`sluice help man`, committed
// as docs/sluice.1 by make man) are each written from them; TestManPage
// fails when the committed page is not what the binary writes.

// command is one entry of the usage: its synopsis lines (a continuation
// keeps its indentation) and its help lines.
type command struct {
	syn  []string
	help []string
}

const (
	usageTitle  = "sluice: a TCP/UDP stream proxy"
	usageFooter = `Run "sluice COMMAND -h" for a command's flags.`
	usageCol    = 39 // the help column, after the two blanks of indentation
)

var commands = []command{
	{[]string{"sluice run [-c FILE] [--loops N] [--log-level L] [--log-format F] [--drain-timeout D]", "           [--busy-poll D] [--state DIR [--fresh]]"},
		[]string{"the daemon on a YAML configuration file;", "without -c, on its built-in demo configuration"}},
	{[]string{"sluice check -c FILE"}, []string{"validate a configuration file"}},
	{[]string{"sluice check -r RULESFILE"}, []string{"validate a rules file (one rule per line)"}},
	{[]string{"sluice forward LISTEN TARGET [OPTION...] [--loops N] [--log-level L] [--log-format F]"},
		[]string{"the daemon with one rule, e.g.", "sluice forward 127.0.0.1:8080 127.0.0.1:80 splice=on"}},
	{[]string{"sluice ctl [-s SOCKET] status|pifs|list|apply FILE|add RULE|del RULE",
		"sluice ctl [-s SOCKET] watch [GROUP...]|sessions [--rule KEY]|stats",
		"sluice ctl [-s SOCKET] history [-n N]|reload|confirm|rollback",
		"sluice ctl rollout FILE|fleet --etcd URL --prefix P"},
		[]string{"talk to a running daemon (sluice ctl -h)"}},
	{[]string{"sluice version"}, []string{"this build: module version, VCS revision (also --version)"}},
	{[]string{"sluice help rules"}, []string{"every rule option, with its default"}},
	{[]string{"sluice help man"}, []string{"this help and every rule option as a man page (roff)"}},
}

// exitCodes is the contract's exit codes (DESIGN.md), for the man page.
var exitCodes = []struct {
	code  int
	means string
}{
	{exitOK, "success"},
	{exitRuntime, "a runtime or protocol error"},
	{exitUsage, "bad usage, or a configuration or table that does not validate (check: every problem as FILE:LINE: message)"},
	{exitRollback, "applied but rolled back"},
	{exitBusy, "another writer holds the control socket"},
}

// usageText is `sluice help`: each command's synopsis with its help in a
// column beside it, or under it when it is longer than a line or too long.
func usageText() string {
	var b strings.Builder
	b.WriteString(usageTitle + "\n\nusage:\n")
	pad := strings.Repeat(" ", usageCol)
	for _, c := range commands {
		last := c.syn[len(c.syn)-1]
		for _, s := range c.syn[:len(c.syn)-1] {
			b.WriteString("  " + s + "\n")
		}
		help := c.help
		if len(c.syn) == 1 && len(last) < usageCol {
			fmt.Fprintf(&b, "  %-*s%s\n", usageCol, last, help[0])
			help = help[1:]
		} else {
			b.WriteString("  " + last + "\n")
		}
		for _, h := range help {
			b.WriteString("  " + pad + h + "\n")
		}
	}
	b.WriteString("\n" + usageFooter + "\n")
	return b.String()
}

// manPage is `sluice help man`: the man page, in roff (man(7) macros),
// from the commands, the exit codes and rules.OptionDocs.
func manPage() string {
	var b strings.Builder
	line := func(s string) { // a text line, escaped
		s = roff(s)
		if strings.HasPrefix(s, ".") || strings.HasPrefix(s, "'") {
			s = `\&` + s
		}
		b.WriteString(s + "\n")
	}
	req := func(s string) { b.WriteString(s + "\n") } // a request, as is
	req(`.\" Written by "sluice help man" (cmd/sluice/help.go, rules/options.go); make man writes docs/sluice.1. Do not edit.`)
	req(`.TH SLUICE 1 "" "sluice" "sluice manual"`)
	req(".SH NAME")
	line("sluice - a TCP/UDP stream proxy")
	req(".SH SYNOPSIS")
	req(`\fBsluice\fR \fICOMMAND\fR [\fIARGUMENT\fR...]`)
	req(".SH DESCRIPTION")
	line("sluice forwards TCP and UDP streams from the addresses it listens on to backends, by a table of one-line rules: from a YAML configuration file (run -c), or one rule given on the command line (forward). The table of a running daemon is read and changed through its control socket (ctl), in transactions.")
	line(usageFooter)
	req(".SH COMMANDS")
	for _, c := range commands {
		req(".PP")
		req(".nf")
		for _, s := range c.syn {
			indent := ""
			if strings.HasPrefix(s, " ") { // a continuation
				indent = "    "
			}
			req(indent + `\fB` + roff(strings.TrimSpace(s)) + `\fR`)
		}
		req(".fi")
		req(".RS")
		line(strings.Join(c.help, " "))
		req(".RE")
	}
	req(".SH RULES")
	line("A rule, one line of a rules file or of the rules: list of a configuration:")
	req(".PP")
	req(`.RS`)
	req(`\fB` + roff(rules.Syntax) + `\fR`)
	req(`.RE`)
	req(".PP")
	line("A rules file is one rule per line; # starts a comment. The options, each with its default:")
	for _, o := range rules.OptionDocs {
		req(".TP")
		req(manOption(o))
		line(o.Help + ". Default: " + o.Default + ".")
	}
	req(".SH EXIT STATUS")
	for _, e := range exitCodes {
		req(".TP")
		req(fmt.Sprintf(`.B %d`, e.code))
		line(e.means)
	}
	req(".SH SEE ALSO")
	line("sluice help rules; the README (commands, options, metrics, the access log) and docs/ctl-protocol.md (the control protocol) of the source.")
	return b.String()
}

// manOption is an option's tag on the man page: its name bold, the form
// of its value italic ("\fBsplice\fR\fI=auto|on|off\fR").
func manOption(o rules.OptionDoc) string {
	tag := `\fB` + roff(o.Name) + `\fR`
	if rest := strings.TrimPrefix(o.Form(), o.Name); rest != "" {
		tag += `\fI` + roff(rest) + `\fR`
	}
	return tag
}

// roff escapes text for roff: a backslash is \e, a hyphen \- (a minus,
// as man pages write options), an ellipsis three dots (plain ASCII for
// every output device).
var roff = strings.NewReplacer(`\`, `\e`, "-", `\-`, "…", "...").Replace
