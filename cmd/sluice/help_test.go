package main

import (
	"bytes"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/sluice-proxy/sluice/rules"
)

// The committed man page is what `sluice help man` writes, and it has a
// line for every command and every rule option: a changed option or
// command without `make man` fails here.
func TestManPage(t *testing.T) {
	page := manPage()
	committed, err := os.ReadFile("../../docs/sluice.1")
	if err != nil {
		t.Fatal(err)
	}
	if string(committed) != page {
		t.Errorf("docs/sluice.1 is not what sluice help man writes: run make man")
	}
	for _, o := range rules.OptionDocs { // on the committed page: which line is missing
		if want := ".TP\n" + manOption(o) + "\n" + roff(o.Help) + ". Default: " + roff(o.Default) + ".\n"; !strings.Contains(string(committed), want) {
			t.Errorf("docs/sluice.1 lacks option %s (run make man):\n%s", o.Name, want)
		}
	}
	usage := usageText()
	for _, c := range commands {
		for _, s := range c.syn {
			if !strings.Contains(page, `\fB`+roff(strings.TrimSpace(s))+`\fR`) || !strings.Contains(usage, s) {
				t.Errorf("the man page or the usage lacks %q", s)
			}
		}
		if !strings.Contains(page, roff(strings.Join(c.help, " "))) {
			t.Errorf("the man page lacks %q", c.help)
		}
	}
	for _, code := range []int{exitOK, exitRuntime, exitUsage, exitRollback, exitBusy} {
		found := false
		for _, e := range exitCodes {
			found = found || e.code == code
		}
		if !found {
			t.Errorf("exit code %d is not on the man page", code)
		}
	}
	groff, err := exec.LookPath("groff")
	if err != nil {
		t.Skip("no groff: the page's roff is not checked")
	}
	cmd := exec.Command(groff, "-man", "-ww", "-z")
	cmd.Stdin = strings.NewReader(page)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil || stderr.Len() > 0 {
		t.Errorf("groff -man -ww: %v\n%s", err, stderr.String())
	}
}

// The usage puts a command's help beside a one-line synopsis that leaves
// room for it, else under the synopsis, in one column.
func TestUsageText(t *testing.T) {
	u := usageText()
	for _, want := range []string{
		"  sluice check -c FILE                   validate a configuration file\n",
		"             [--busy-poll D] [--state DIR [--fresh]]\n                                         the daemon on a YAML configuration file;\n",
		"  sluice ctl rollout FILE|fleet --etcd URL --prefix P\n                                         talk to a running daemon (sluice ctl -h)\n",
		"  sluice help man                        this help",
	} {
		if !strings.Contains(u, want) {
			t.Errorf("usage lacks %q:\n%s", want, u)
		}
	}
	if !strings.HasPrefix(u, usageTitle+"\n\nusage:\n") || !strings.HasSuffix(u, "\n\n"+usageFooter+"\n") {
		t.Errorf("usage:\n%s", u)
	}
}
