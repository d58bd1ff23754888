package integration

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// runSluice runs the binary to its end (10 s at most: a command that should
// refuse must not start serving) and returns its exit code and output.
func runSluice(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, sluiceBin, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("sluice %s: still running after 10s\n%s", strings.Join(args, " "), errb.String())
	}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.ExitCode()
	default:
		t.Fatal(err)
	}
	return code, out.String(), errb.String()
}

// Bad usage and rules that do not validate exit 2 at once, with a message
// that names what is wrong; nothing is served.
func TestCLIBadUsage(t *testing.T) {
	l := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	const target = "127.0.0.1:9"
	cases := []struct {
		name string
		args []string
		want string // in stderr
	}{
		{"no command", nil, "usage"},
		{"unknown command", []string{"frobnicate"}, `"frobnicate"`},
		{"forward without arguments", []string{"forward"}, "LISTEN TARGET"},
		{"forward without target", []string{"forward", l}, "LISTEN TARGET"},
		{"bad listen port", []string{"forward", "127.0.0.1:99999", target}, "99999"},
		{"bad target", []string{"forward", l, "127.0.0.1"}, `"127.0.0.1"`},
		{"range lengths differ", []string{"forward", "127.0.0.1:8000-8002", "127.0.0.1:9000-9001"}, "range"},
		{"unknown option", []string{"forward", l, target, "frobnicate"}, `"frobnicate"`},
		{"bad splice mode", []string{"forward", l, target, "splice=maybe"}, "splice=maybe"},
		{"bad duration", []string{"forward", l, target, "timeout.idle=soon"}, "timeout.idle=soon"},
		// A pif this build cannot serve (or, with pifs, one no config names).
		{"unknown pif", []string{"forward", "nope/" + l, target}, "pif"},
		{"unknown flag", []string{"forward", l, target, "--frobnicate"}, "frobnicate"},
		{"bad flag value", []string{"forward", l, target, "--loops", "-1"}, "--loops"},
		{"bad log level", []string{"forward", l, target, "--log-level", "loud"}, "loud"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			code, _, stderr := runSluice(t, c.args...)
			if code != 2 {
				t.Errorf("sluice %s: exit %d, want 2\n%s", strings.Join(c.args, " "), code, stderr)
			}
			if !strings.Contains(stderr, c.want) {
				t.Errorf("sluice %s: stderr does not mention %q:\n%s", strings.Join(c.args, " "), c.want, stderr)
			}
		})
	}
}

// A listen port already taken is a runtime error (exit 1) naming the port and
// the system's reason.
func TestCLIPortInUse(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	code, _, stderr := runSluice(t, "forward", ln.Addr().String(), "127.0.0.1:9", "--log-level", "error")
	if code != 1 {
		t.Errorf("exit %d, want 1\n%s", code, stderr)
	}
	for _, want := range []string{fmt.Sprintf("port %d", port), "address already in use"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr does not mention %q:\n%s", want, stderr)
		}
	}
}

func TestCLIVersion(t *testing.T) {
	code, stdout, stderr := runSluice(t, "version")
	if code != 0 || !strings.HasPrefix(stdout, "sluice ") {
		t.Errorf("sluice version: exit %d, stdout %q, stderr %q; want 0 and \"sluice VERSION\"", code, stdout, stderr)
	}
}

// `sluice forward` with every option and flag this build documents serves
// byte-exact, and exits 0 on SIGTERM.
func TestCLIForwardServes(t *testing.T) {
	b := hashBackend(t)
	d := startForward(t, b.Addr(), "splice=on", "timeout.connect=2s", "timeout.idle=1m",
		"--loops", "1", "--busy-poll", "1ms", "--log-format", "json", "--drain-timeout", "2s")
	c, err := net.Dial("tcp", d.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := testpeer.Exchange(c, 1<<20, 1<<20, 7); err != nil {
		t.Fatalf("%v\n%s", err, d.stderr.String())
	}
	if err := d.stop(5 * time.Second); err != nil {
		t.Errorf("stop: %v (want exit 0)\n%s", err, d.stderr.String())
	}
}
