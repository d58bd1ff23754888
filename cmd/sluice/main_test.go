package main

import (
	"errors"
	"fmt"
	"net"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/config"
)

// Flags given on the command line override the file; flags not given leave
// the file's settings alone.
func TestFlagsOverrideFile(t *testing.T) {
	file := func() *config.Config {
		c, err := config.Parse("f.yaml", []byte("loops: 3\nlog: {level: warn, format: json}\ndrain: 1m\n"))
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	for _, tc := range []struct {
		args []string
		want config.Config
		err  string
	}{
		{nil, config.Config{Loops: 3, Log: config.Log{Level: "warn", Format: "json"}, Drain: time.Minute}, ""},
		{[]string{"--loops", "1"}, config.Config{Loops: 1, Log: config.Log{Level: "warn", Format: "json"}, Drain: time.Minute}, ""},
		{[]string{"--loops", "0"}, config.Config{Loops: 0, Log: config.Log{Level: "warn", Format: "json"}, Drain: time.Minute}, ""},
		{[]string{"--log-level", "debug", "--drain-timeout", "2s"}, config.Config{Loops: 3, Log: config.Log{Level: "debug", Format: "json"}, Drain: 2 * time.Second}, ""},
		{[]string{"--log-format", "console"}, config.Config{Loops: 3, Log: config.Log{Level: "warn", Format: "console"}, Drain: time.Minute}, ""},
		{[]string{"--loops", "-1"}, config.Config{}, "--loops -1"},
		{[]string{"--drain-timeout", "-1s"}, config.Config{}, "--drain-timeout -1s"},
		{[]string{"--busy-poll", "200us"}, config.Config{Loops: 3, BusyPoll: 200 * time.Microsecond, Log: config.Log{Level: "warn", Format: "json"}, Drain: time.Minute}, ""},
		{[]string{"--busy-poll", "-1ms"}, config.Config{}, "--busy-poll -1ms"},
		{[]string{"--busy-poll", "2s"}, config.Config{}, "--busy-poll 2s"},
	} {
		var d daemonFlags
		fs := newFlagSet("t", "t")
		d.register(fs)
		if err := fs.Parse(tc.args); err != nil {
			t.Fatal(err)
		}
		c := file()
		err := d.override(c)
		if tc.err != "" {
			var u usageError
			if !errors.As(err, &u) || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%v: err = %v, want a usage error about %q", tc.args, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%v: %v", tc.args, err)
			continue
		}
		if c.Loops != tc.want.Loops || c.BusyPoll != tc.want.BusyPoll || c.Log != tc.want.Log || c.Drain != tc.want.Drain {
			t.Errorf("%v: loops %d, busy-poll %v, log %+v, drain %v; want %d, %v, %+v, %v", tc.args, c.Loops, c.BusyPoll, c.Log, c.Drain,
				tc.want.Loops, tc.want.BusyPoll, tc.want.Log, tc.want.Drain)
		}
	}
}

// The demo's configuration is a valid file, and a taken port is replaced by
// an ephemeral one.
func TestDemoConfig(t *testing.T) {
	c, err := config.Parse(demoFile, []byte(fmt.Sprintf(demoConfig, "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:4321", "127.0.0.1:0")))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Rules) != 2 || c.Rules[0].Rule.String() != "tcp 127.0.0.1:0 -> 127.0.0.1:4321" ||
		c.Rules[1].Rule.String() != "tcp 127.0.0.1:0 health=http" || c.Metrics.Listen.String() != "127.0.0.1:0" {
		t.Fatalf("demo configuration: %+v", c)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if got, err := freeOr(ln.Addr().String()); err != nil || got != "127.0.0.1:0" {
		t.Fatalf("freeOr(taken) = %q, %v", got, err)
	}
	ln.Close()
	if got, err := freeOr(ln.Addr().String()); err != nil || got != ln.Addr().String() {
		t.Fatalf("freeOr(free) = %q, %v", got, err)
	}
}

func TestCount(t *testing.T) {
	if count(1, "rule") != "1 rule" || count(0, "pif") != "0 pifs" || count(101, "listen port") != "101 listen ports" {
		t.Fatal(count(1, "rule"), count(0, "pif"), count(101, "listen port"))
	}
}

// deploy/bash/sluice completes every command and every ctl verb.
func TestBashCompletion(t *testing.T) {
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("no bash")
	}
	complete := func(words ...string) []string {
		script := `source ../../deploy/bash/sluice; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _sluice; printf '%s\n' "${COMPREPLY[@]}"`
		out, err := exec.Command(bash, append([]string{"-c", script, "bash"}, words...)...).Output()
		if err != nil {
			t.Fatalf("complete %q: %v", words, err)
		}
		return strings.Fields(string(out))
	}
	wants := []struct {
		words []string
		want  []string
	}{
		{[]string{"sluice", ""}, []string{"run", "forward", "check", "ctl", "version", "help"}},
		{[]string{"sluice", "ctl", ""}, []string{"status", "pifs", "list", "apply", "diff", "add", "del", "watch", "sessions", "stats",
			"history", "reload", "confirm", "rollback", "upgrade", "rollout", "fleet"}},
		{[]string{"sluice", "help", ""}, []string{"rules", "man"}},
		{[]string{"sluice", "ctl", "-s", "x", "list", "--"}, []string{"--pending", "--json"}},
	}
	// Every flag a command's -h lists, and every flag ctl's synopsis gives a
	// verb, is completed: a flag added to the code without the script fails.
	for _, cmd := range [][]string{{"run"}, {"forward"}, {"check"}, {"ctl", "rollout"}, {"ctl", "fleet"}} {
		_, _, help := runCaptured(t, append(cmd, "-h")...)
		var flags []string
		for _, m := range regexp.MustCompile(`(?m)^  -(\S+)(?: \S+)?\n\s+(.*)$`).FindAllStringSubmatch(help, -1) {
			if cmd[len(cmd)-1] == "fleet" && strings.HasPrefix(m[2], "rollout:") {
				continue // rollout's alone (fleet refuses them)
			}
			flags = append(flags, map[bool]string{true: "-", false: "--"}[len(m[1]) == 1]+m[1])
		}
		if len(flags) == 0 {
			t.Fatalf("sluice %s -h lists no flags:\n%s", strings.Join(cmd, " "), help)
		}
		wants = append(wants, struct{ words, want []string }{append(append([]string{"sluice"}, cmd...), "-"), flags})
	}
	verb := regexp.MustCompile(`^  ([a-z]+)((?: [^ ]+)*)`)
	for _, line := range strings.Split(ctlSynopsis, "\n")[1:] {
		m := verb.FindStringSubmatch(line)
		if m == nil || m[1] == "rollout" || m[1] == "fleet" {
			continue // a help line's continuation; the fleet verbs are above
		}
		if flags := regexp.MustCompile(`-{1,2}[a-z][a-z-]*`).FindAllString(m[2], -1); len(flags) > 0 {
			wants = append(wants, struct{ words, want []string }{[]string{"sluice", "ctl", m[1], "-"}, flags})
		}
	}
	for _, c := range wants {
		got := complete(c.words...)
		for _, w := range c.want {
			if !slices.Contains(got, w) {
				t.Errorf("complete %q: %q lacks %q", c.words, got, w)
			}
		}
	}
}
