package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/ctl"
	"github.com/sluice-proxy/sluice/ctl/ctltest"
	"github.com/sluice-proxy/sluice/rules"
)

const (
	ruleA = "tcp 0.0.0.0:8080 -> 127.0.0.1:80"
	ruleB = "tcp 0.0.0.0:9090 -> 127.0.0.1:90"
)

// ctlServer serves an in-memory engine holding lines at generation 1, with
// pif ns1, on a socket in a fresh short directory.
func ctlServer(t *testing.T, lines ...string) (*ctltest.Engine, string) {
	t.Helper()
	eng, s := ctlInstance(t, []string{"ns1"}, lines...)
	return eng, s.Path()
}

// ctlInstance is ctlServer with the named pifs, returning the server too.
func ctlInstance(t *testing.T, pifs []string, lines ...string) (*ctltest.Engine, *ctl.Server) {
	t.Helper()
	rs := make([]*rules.Rule, len(lines))
	for i, l := range lines {
		r, err := rules.Parse(l)
		if err != nil {
			t.Fatal(err)
		}
		rs[i] = r
	}
	eng := ctltest.New(1, pifs, rs...)
	dir, err := os.MkdirTemp("", "ctlcli")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	s, err := ctl.Serve(context.Background(), filepath.Join(dir, "ctl.sock"), eng, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return eng, s
}

// sluiceCtl runs `sluice ctl ARGS` in process.
func sluiceCtl(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	return sluiceCtlWith(t, nil, args...)
}

// sluiceCtlWith is sluiceCtl with a hook before each step of a transaction
// across instances.
func sluiceCtlWith(t *testing.T, between func(ctl.Step), args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = runCtlWith(args, &out, &errb, between)
	return code, out.String(), errb.String()
}

func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func wantTable(t *testing.T, eng *ctltest.Engine, want ...string) {
	t.Helper()
	if got := eng.Lines(); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("active table %q, want %q", got, want)
	}
}

func TestCtlReadVerbs(t *testing.T) {
	eng, sock := ctlServer(t, ruleA, "tcp ns1/10.0.0.1:80 -> 127.0.0.1:80")
	eng.SetSessions(3)

	code, out, errs := sluiceCtl(t, "-s", sock, "status")
	if code != 0 {
		t.Fatalf("status: exit %d\n%s", code, errs)
	}
	for _, want := range []string{"protocol    version " + strconv.Itoa(int(ctl.MaxVersion)), "features    txn, confirm-timeout",
		"pid         " + strconv.Itoa(os.Getpid()), "state       serving", "version     -", "generation  1", "rules       2", "sessions    3", "pifs        2", "writer      none", "pending     none"} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
	code, out, _ = sluiceCtl(t, "-s", sock, "pifs")
	if code != 0 || out != "INDEX\tPIF\n0\thost\n1\tns1\n" {
		t.Fatalf("pifs: exit %d\n%q", code, out)
	}
	// --json, for scripts: status, pifs and list as JSON objects.
	code, out, errs = sluiceCtl(t, "-s", sock, "status", "--json")
	var st map[string]any
	if err := json.Unmarshal([]byte(out), &st); code != 0 || err != nil || st["generation"] != float64(1) || st["rules"] != float64(2) ||
		st["sessions"] != float64(3) || st["protocol"] != float64(ctl.MaxVersion) || st["writer"] != false || st["pending"] != nil ||
		st["pid"] != float64(os.Getpid()) || st["state"] != "serving" || st["started"] == nil || st["uptime_ms"] == nil || st["drain_left_ms"] != nil {
		t.Fatalf("status --json: exit %d, %v\n%s%s", code, err, out, errs)
	}
	code, out, errs = sluiceCtl(t, "-s", sock, "pifs", "--json")
	var pifs []map[string]any
	if err := json.Unmarshal([]byte(out), &pifs); code != 0 || err != nil || len(pifs) != 2 || pifs[1]["name"] != "ns1" || pifs[1]["index"] != float64(1) {
		t.Fatalf("pifs --json: exit %d, %v\n%s%s", code, err, out, errs)
	}
	code, out, errs = sluiceCtl(t, "-s", sock, "list", "--json")
	var ls struct {
		Generation uint64
		Pending    bool
		Rules      []string
	}
	if err := json.Unmarshal([]byte(out), &ls); code != 0 || err != nil || ls.Generation != 1 || ls.Pending || len(ls.Rules) != 2 || ls.Rules[0] != ruleA {
		t.Fatalf("list --json: exit %d, %v\n%s%s", code, err, out, errs)
	}
	code, out, _ = sluiceCtl(t, "list", "-s", sock)
	want := "# generation 1\n" + ruleA + "\ntcp ns1/10.0.0.1:80 -> 127.0.0.1:80\n"
	if code != 0 || out != want {
		t.Fatalf("list: exit %d\n%q, want %q", code, out, want)
	}
	// What list prints is a rules file.
	if _, err := rules.ParseFile("list", []byte(out)); err != nil {
		t.Fatalf("list output does not parse: %v", err)
	}
}

func TestCtlApply(t *testing.T) {
	cases := []struct {
		name     string
		file     string
		flags    []string
		failPort uint16
		code     int
		stdout   []string // each in stdout
		stderr   []string // each in stderr
		table    []string // the active table afterwards
		applies  int
	}{
		{name: "good", file: ruleA + "\n" + ruleB + "\n", code: 0,
			stdout: []string{"RULE", ruleB, "verdict good: committed generation 2", "1 kept, 1 added, 0 removed"},
			table:  []string{ruleA, ruleB}, applies: 1},
		{name: "port in use", file: ruleA + "\n" + ruleB + "\n", failPort: 9090, code: 3,
			stdout: []string{"tcp 0.0.0.0:9090: port 9090: address already in use", "rolled back; generation 1 is still active"},
			stderr: []string{"1 listen port failed to bind: rolled back"},
			table:  []string{ruleA}, applies: 1},
		{name: "port in use, weak", file: "tcp 0.0.0.0:9089-9090 -> 127.0.0.1:90 weak\n", failPort: 9090, code: 0,
			stdout: []string{"tcp 0.0.0.0:9089-9090: port 9090: address already in use", "(weak: ignored)", "verdict good: committed"},
			table:  []string{"tcp 0.0.0.0:9089-9090 -> 127.0.0.1:90 weak"}, applies: 1},
		{name: "port in use, forced", file: ruleB + "\n", flags: []string{"--force"}, failPort: 9090, code: 0,
			stdout: []string{"port 9090: address already in use", "committed anyway (--force)"},
			table:  []string{ruleB}, applies: 1},
		{name: "dry run", file: "# new\n" + ruleB + "\n", flags: []string{"--dry-run"}, code: 0,
			stdout: []string{"valid: 1 rule, 1 listen port; applying would keep 0, add 1 and remove 1 listen ports (generation 1; nothing changed: binds are not tried"},
			table:  []string{ruleA}},
		{name: "a line that does not parse", file: ruleA + "\ntcp 0.0.0.0:99999 -> 127.0.0.1:80\n", code: 2,
			stderr: []string{"rules.txt:2: "}, table: []string{ruleA}},
		{name: "a table that does not validate", file: ruleA + "\n\n" + ruleA + " weak\n", code: 2,
			stderr: []string{"rules.txt:3: "}, table: []string{ruleA}},
		{name: "a pif the daemon lacks: the daemon's error at the user's line", file: "# x\n" + ruleA + "\ntcp nsZ/0.0.0.0:80 -> 127.0.0.1:80\n", code: 2,
			stderr: []string{"rules.txt:3: ", `"nsZ"`}, table: []string{ruleA}},
		{name: "a target pif the daemon lacks", file: ruleA + "\n\ntcp 0.0.0.0:81 -> nsQ/127.0.0.1:80\n", code: 2,
			stderr: []string{"rules.txt:3: ", `"nsQ"`}, table: []string{ruleA}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			eng, sock := ctlServer(t, ruleA)
			if c.failPort != 0 {
				eng.FailPort(c.failPort, syscall.EADDRINUSE)
			}
			file := writeFile(t, "rules.txt", c.file)
			args := append([]string{"-s", sock, "apply", file}, c.flags...)
			code, out, errs := sluiceCtl(t, args...)
			if code != c.code {
				t.Fatalf("exit %d, want %d\nstdout:\n%s\nstderr:\n%s", code, c.code, out, errs)
			}
			for _, w := range c.stdout {
				if !strings.Contains(out, w) {
					t.Errorf("stdout lacks %q:\n%s", w, out)
				}
			}
			for _, w := range c.stderr {
				if !strings.Contains(errs, w) {
					t.Errorf("stderr lacks %q:\n%s", w, errs)
				}
			}
			wantTable(t, eng, c.table...)
			if a, _, _ := eng.Counts(); a != c.applies {
				t.Errorf("%d applies, want %d", a, c.applies)
			}
			if eng.Pending() {
				t.Error("an apply is left pending")
			}
		})
	}
}

// Another writer holds the socket: exit 4 at once.
func TestCtlBusy(t *testing.T) {
	eng, sock := ctlServer(t, ruleA)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	holder, err := ctl.Dial(ctx, sock, ctl.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close()
	if err := holder.Hello(ctx, ctl.IntentWrite); err != nil {
		t.Fatal(err)
	}
	file := writeFile(t, "rules.txt", ruleB+"\n")
	start := time.Now()
	code, _, errs := sluiceCtl(t, "-s", sock, "apply", file)
	if code != 4 || !strings.Contains(errs, "busy") {
		t.Fatalf("exit %d, want 4\n%s", code, errs)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("busy took %s", d)
	}
	if code, _, errs := sluiceCtl(t, "-s", sock, "add", ruleB); code != 4 {
		t.Fatalf("add: exit %d, want 4\n%s", code, errs)
	}
	// Readers are still served.
	if code, out, _ := sluiceCtl(t, "-s", sock, "status"); code != 0 || !strings.Contains(out, "a transaction is open") {
		t.Fatalf("status beside a writer: exit %d\n%s", code, out)
	}
	wantTable(t, eng, ruleA)
}

func TestCtlAddDel(t *testing.T) {
	eng, sock := ctlServer(t, ruleA)
	eng.FailPort(7070, syscall.EADDRINUSE)
	steps := []struct {
		args  []string
		code  int
		out   string // in stdout or stderr
		table []string
	}{
		{[]string{"add", ruleB + "  "}, 0, "committed generation 2", []string{ruleA, ruleB}},
		{[]string{"add", "tcp 0.0.0.0:9090 -> 127.0.0.1:91"}, 2, "9090", []string{ruleA, ruleB}},
		{[]string{"add", "tcp 0.0.0.0:7070 -> 127.0.0.1:70"}, 3, "port 7070: address already in use", []string{ruleA, ruleB}},
		{[]string{"add", "tcp nonsense"}, 2, "add:", []string{ruleA, ruleB}},
		{[]string{"add", "tcp", "0.0.0.0:1"}, 2, "one rule line as one argument", []string{ruleA, ruleB}},
		{[]string{"del", "tcp 0.0.0.0:9090  ->  127.0.0.1:90"}, 0, "committed generation 3", []string{ruleA}},
		{[]string{"del", ruleB}, 2, "no rule", []string{ruleA}},
		{[]string{"add", ruleB}, 0, "committed generation 4", []string{ruleA, ruleB}},
		{[]string{"del", "tcp  0.0.0.0:9090"}, 0, "committed generation 5", []string{ruleA}}, // by its name, the listen key
		{[]string{"del", "tcp 0.0.0.0:9090"}, 2, "no rule \"tcp 0.0.0.0:9090\"", []string{ruleA}},
		{[]string{"del", "tcp 0.0.0.0:99999"}, 2, "nor is it a rule's name", []string{ruleA}},
		{[]string{"add", "--dry-run", ruleB}, 0, "valid: 2 rules", []string{ruleA}},
	}
	for _, st := range steps {
		code, out, errs := sluiceCtl(t, append([]string{"-s", sock}, st.args...)...)
		if code != st.code || !strings.Contains(out+errs, st.out) {
			t.Fatalf("ctl %q: exit %d, want %d with %q\nstdout:\n%s\nstderr:\n%s", st.args, code, st.code, st.out, out, errs)
		}
		wantTable(t, eng, st.table...)
	}
}

func TestCtlUsage(t *testing.T) {
	cases := []struct {
		args []string
		want string
	}{
		{nil, "want a verb"},
		{[]string{"frobnicate"}, `"frobnicate"`},
		{[]string{"status", "extra"}, `"extra"`},
		{[]string{"apply"}, "one rules FILE"},
		{[]string{"apply", "a", "b"}, "one rules FILE"},
		{[]string{"del"}, "one rule line"},
		{[]string{"status", "--force"}, "--force"},
		{[]string{"apply", "x", "--timeout", "0s"}, "--timeout"},
		{[]string{"apply", "x", "--timeout", "2h"}, "--timeout"},
		{[]string{"-s", "a", "-s", "b", "status"}, "-s given 2 times"},
		{[]string{"--frobnicate", "status"}, "frobnicate"},
		{[]string{"-s", "/nonexistent/ctl.sock", "apply", "/nonexistent/rules.txt"}, "rules.txt"},
		{[]string{"-c", "/nonexistent/sluice.yaml", "status"}, "sluice.yaml"},
	}
	for _, c := range cases {
		code, _, errs := sluiceCtl(t, c.args...)
		if code != 2 || !strings.Contains(errs, c.want) {
			t.Errorf("ctl %q: exit %d, want 2 with %q\n%s", c.args, code, c.want, errs)
		}
	}
}

// No daemon at the socket: a runtime error, exit 1, naming the socket.
func TestCtlNoDaemon(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "none.sock")
	code, _, errs := sluiceCtl(t, "-s", sock, "status")
	if code != 1 || !strings.Contains(errs, "cannot reach the daemon at "+sock) {
		t.Fatalf("exit %d\n%s", code, errs)
	}
}

// -s wins; else the config's ctl.socket with -c; else the default.
func TestCtlSocketChoice(t *testing.T) {
	cfg := writeFile(t, "sluice.yaml", "ctl: {socket: /srv/sluice/ctl.sock}\n")
	t.Setenv("XDG_RUNTIME_DIR", "/run/user/4242")
	cases := []struct {
		socks []string
		cfg   string
		want  string
	}{
		{[]string{"/a.sock"}, cfg, "/a.sock"},
		{nil, cfg, "/srv/sluice/ctl.sock"},
		{nil, "", "/run/user/4242/sluice/ctl.sock"},
	}
	for _, c := range cases {
		got, err := ctlSocket(c.socks, c.cfg)
		if err != nil || got != c.want {
			t.Errorf("ctlSocket(%q, %q) = %q, %v; want %q", c.socks, c.cfg, got, err, c.want)
		}
	}
	t.Setenv("XDG_RUNTIME_DIR", "")
	if os.Geteuid() == 0 {
		if got, _ := ctlSocket(nil, ""); got != "/run/sluice/ctl.sock" {
			t.Errorf("root without XDG_RUNTIME_DIR: %q", got)
		}
	}
}

// Issue 15, item 12: between apply and commit, list prints the committed
// table and says an applied one is pending; list --pending prints that one
// under the generation it gets; status shows both.
func TestCtlListPending(t *testing.T) {
	eng, sock := ctlServer(t, ruleA)
	a, err := rules.Parse(ruleA)
	if err != nil {
		t.Fatal(err)
	}
	b, err := rules.Parse(ruleB)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := eng.Apply([]*rules.Rule{a, b}); err != nil {
		t.Fatal(err)
	}
	code, out, errs := sluiceCtl(t, "-s", sock, "list")
	want := "# generation 1\n# pending: generation 2 is applied, not committed (sluice ctl list --pending prints it)\n" + ruleA + "\n"
	if code != 0 || out != want {
		t.Fatalf("list: exit %d %s\n%q, want %q", code, errs, out, want)
	}
	code, out, errs = sluiceCtl(t, "-s", sock, "list", "--pending")
	want = "# generation 2 (pending: applied, not committed)\n" + ruleA + "\n" + ruleB + "\n"
	if code != 0 || out != want {
		t.Fatalf("list --pending: exit %d %s\n%q, want %q", code, errs, out, want)
	}
	code, out, _ = sluiceCtl(t, "-s", sock, "status")
	if code != 0 || !strings.Contains(out, "rules       1") || !strings.Contains(out, "pending     generation 2 applied, not committed: 2 rules, 2 listen ports") {
		t.Fatalf("status: exit %d\n%s", code, out)
	}
	if _, err := eng.Commit(); err != nil {
		t.Fatal(err)
	}
	if code, _, errs = sluiceCtl(t, "-s", sock, "list", "--pending"); code != 1 || !strings.Contains(errs, "no-pending") {
		t.Fatalf("list --pending with none pending: exit %d %s", code, errs)
	}
	code, out, _ = sluiceCtl(t, "-s", sock, "list")
	if want := "# generation 2\n" + ruleA + "\n" + ruleB + "\n"; code != 0 || out != want {
		t.Fatalf("list after the commit: %q", out)
	}
}
