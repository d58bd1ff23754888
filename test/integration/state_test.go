package integration

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/state"
)

// startStateful runs `sluice run -c cfg ARGS...` and waits until its
// control socket answers.
func startStateful(t *testing.T, cfg string, args ...string) *liveDaemon {
	t.Helper()
	d := &liveDaemon{daemon: startDaemon(t, forwardOpts{}, append([]string{"run", "-c", cfg}, args...)...), t: t}
	d.sock = d.Ctl
	d.waitCtl()
	return d
}

func stateConfig(t *testing.T, name string, lines ...string) string {
	var b strings.Builder
	b.WriteString("rules:\n")
	for _, l := range lines {
		fmt.Fprintf(&b, "  - %s\n", l)
	}
	return writeFile(t, name, b.String())
}

func wantLog(t *testing.T, d *liveDaemon, s string) {
	t.Helper()
	waitFor(t, 5*time.Second, "log line "+s, func() bool { return strings.Contains(d.stderr.String(), s) })
}

func fwd(port int) string { return fmt.Sprintf("tcp 127.0.0.1:%d -> 127.0.0.1:9", port) }

// Every start-up path of the contract, each with its log line and exit
// code: no state dir; the first start with one; resume; the file wins
// (table.rules.prev); --fresh; a corrupt state (exit 1, path, --fresh);
// --fresh over a corrupt state; --fresh without a state dir (exit 2).
func TestStateStartPaths(t *testing.T) {
	base := freeRange(t, 4)
	cfg := stateConfig(t, "a.yaml", fwd(base))
	dir := filepath.Join(t.TempDir(), "state")

	d := startStateful(t, cfg)
	wantLog(t, d, "no state dir: committed tables are not kept")
	d.stop(5 * time.Second)

	d = startStateful(t, cfg, "--state", dir)
	wantLog(t, d, "no saved table: starting from the configuration's rules")
	if code, out, errs := d.cli("add", fwd(base+1)); code != 0 {
		t.Fatalf("add: %d %s%s", code, out, errs)
	}
	// diff: none, some, invalid; --dry-run prints the same lines.
	same := writeFile(t, "same.rules", fwd(base)+"\n"+fwd(base+1)+"\n")
	other := writeFile(t, "other.rules", fwd(base)+"\n"+fwd(base+2)+"\n")
	bad := writeFile(t, "bad.rules", "tcp 127.0.0.1:99999\n")
	if code, out, errs := d.cli("diff", same); code != 0 || out != "" {
		t.Fatalf("diff same: %d %q %s", code, out, errs)
	}
	wantDiff := "- " + fwd(base+1) + "\n+ " + fwd(base+2) + "\n"
	if code, out, errs := d.cli("diff", other); code != 1 || out != wantDiff || errs != "" {
		t.Fatalf("diff other: %d %q %q", code, out, errs)
	}
	if code, _, errs := d.cli("diff", bad); code != 2 || !strings.Contains(errs, bad+":1:") {
		t.Fatalf("diff bad: %d %q", code, errs)
	}
	if code, out, errs := d.cli("apply", other, "--dry-run"); code != 0 || !strings.HasPrefix(out, wantDiff) {
		t.Fatalf("apply --dry-run: %d %q %s", code, out, errs)
	}
	if code, out, _ := d.cli("status"); code != 0 || !strings.Contains(out, "boot id") {
		t.Fatalf("status: %d %s", code, out)
	}
	_, boot1, _ := d.cli("status")
	d.stop(5 * time.Second)
	saved, err := os.ReadFile(filepath.Join(dir, state.TableFile))
	if err != nil || !strings.Contains(string(saved), "# generation: 2\n") || !strings.Contains(string(saved), `name="sluice ctl"`) {
		t.Fatalf("table.rules: %v\n%s", err, saved)
	}

	d = startStateful(t, cfg, "--state", dir)
	wantLog(t, d, "resuming generation 2 saved at")
	if gen, ls := d.list(); gen != 2 || !slices.Equal(ls, []string{fwd(base), fwd(base + 1)}) {
		t.Fatalf("resumed: %d %q", gen, ls)
	}
	_, boot2, _ := d.cli("status")
	if bootLine(boot1) == bootLine(boot2) || bootLine(boot2) == "" {
		t.Fatalf("boot id did not change: %q %q", bootLine(boot1), bootLine(boot2))
	}
	d.stop(5 * time.Second)

	cfg2 := stateConfig(t, "b.yaml", fwd(base+3))
	d = startStateful(t, cfg2, "--state", dir)
	wantLog(t, d, "the file wins; the saved table is kept")
	if gen, ls := d.list(); gen != 3 || !slices.Equal(ls, []string{fwd(base + 3)}) {
		t.Fatalf("file wins: %d %q", gen, ls)
	}
	if prev, err := os.ReadFile(filepath.Join(dir, state.PrevFile)); err != nil || !strings.Contains(string(prev), fwd(base+1)) {
		t.Fatalf("table.rules.prev: %v %s", err, prev)
	}
	d.stop(5 * time.Second)

	d = startStateful(t, cfg2, "--state", dir, "--fresh")
	wantLog(t, d, "--fresh: starting from the configuration's rules")
	if gen, _ := d.list(); gen != 4 {
		t.Fatalf("fresh: generation %d", gen)
	}
	d.stop(5 * time.Second)
	es, bad2, err := mustOpen(t, dir).History(0)
	if err != nil || bad2 != 0 || len(es) != 4 || es[1].Who.Name != "sluice ctl" || es[3].Generation != 4 {
		t.Fatalf("history: %+v %d %v", es, bad2, err)
	}

	tablePath := filepath.Join(dir, state.TableFile)
	os.WriteFile(tablePath, []byte("# sluice state v1\n# generation: x\n"), 0o600)
	code, _, errs := runSluice(t, "run", "-c", cfg2, "--state", dir)
	if code != 1 || !strings.Contains(errs, tablePath) || !strings.Contains(errs, "--fresh") {
		t.Fatalf("corrupt state: exit %d\n%s", code, errs)
	}
	d = startStateful(t, cfg2, "--state", dir, "--fresh")
	wantLog(t, d, "the saved table does not parse")
	if gen, _ := d.list(); gen != 1 {
		t.Fatalf("fresh over corrupt: generation %d", gen)
	}
	d.stop(5 * time.Second)

	if code, _, errs := runSluice(t, "run", "-c", cfg2, "--fresh"); code != 2 || !strings.Contains(errs, "--fresh: no state dir") {
		t.Fatalf("--fresh without a state dir: %d %s", code, errs)
	}
}

func bootLine(status string) string {
	for _, l := range lines(status) {
		if strings.HasPrefix(l, "boot id") {
			return l
		}
	}
	return ""
}

func mustOpen(t *testing.T, dir string) *state.Dir {
	t.Helper()
	st, err := state.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// Kill -9 at random instants during a stream of 200 commits (sluice ctl
// add/del): after each restart the table is exactly the last acknowledged
// commit or the one after it, never older, never torn, and the state file
// always parses. On tmpfs (/dev/shm) and on the disk (/var/tmp).
func TestStateKill9(t *testing.T) {
	for _, fs := range []struct{ name, base string }{{"tmpfs", "/dev/shm"}, {"disk", "/var/tmp"}} {
		t.Run(fs.name, func(t *testing.T) {
			var sf syscall.Statfs_t
			if err := syscall.Statfs(fs.base, &sf); err != nil {
				t.Skipf("%s: %v", fs.base, err)
			}
			const tmpfsMagic = 0x01021994
			t.Logf("%s: filesystem magic %#x (tmpfs: %v)", fs.base, sf.Type, sf.Type == tmpfsMagic)
			dir, err := os.MkdirTemp(fs.base, "sluice-state-")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(dir) })
			kill9Stream(t, dir, 200, 10)
		})
	}
}

func kill9Stream(t *testing.T, dir string, commits, kills int) {
	const n = 10 // ports that come and go
	base := freeRange(t, n+1)
	cfg := stateConfig(t, "k.yaml", fwd(base))
	// op k (0-based) adds port k%n+1 in the first half of each cycle of 2n,
	// and deletes it in the second.
	tableAfter := func(k int) []string {
		on := map[int]bool{}
		for i := 0; i < k; i++ {
			j := i % (2 * n)
			on[j%n+1] = j < n
		}
		out := []string{fwd(base)}
		// Ports are added, and deleted, 1 to n in order: the active ones are in order.
		for p := 1; p <= n; p++ {
			if on[p] {
				out = append(out, fwd(base+p))
			}
		}
		return out
	}
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 19))
	acked := 0 // commits acknowledged (or found applied after a restart)
	killsDone := 0
	d := startStateful(t, cfg, "--state", dir, "--log-level", "warn")
	for acked < commits {
		// A kill at a random instant, while the commits go on.
		var killAt <-chan time.Time
		if killsDone < kills {
			killAt = time.After(time.Duration(rng.IntN(250)) * time.Millisecond)
		}
		killed := make(chan struct{})
		go func() {
			if killAt == nil {
				return
			}
			<-killAt
			d.cmd.Process.Signal(syscall.SIGKILL)
			close(killed)
		}()
		for acked < commits {
			j := acked % (2 * n)
			verb := "add"
			if j >= n {
				verb = "del"
			}
			code, _, _ := runSluice(t, "ctl", "-s", d.sock, verb, fwd(base+j%n+1))
			if code == 0 {
				acked++
				continue
			}
			select {
			case <-killed:
			case <-time.After(2 * time.Second):
				t.Fatalf("commit %d (%s) failed with exit %d and no kill\n%s", acked, verb, code, d.stderr.String())
			}
			break
		}
		if killAt == nil {
			break
		}
		<-killed
		<-d.exited
		killsDone++
		// The state file parses, and holds acked or acked+1 commits.
		st := mustOpen(t, dir)
		tb, err := st.Load()
		if err != nil || tb == nil {
			t.Fatalf("after kill %d: state: %v", killsDone, err)
		}
		d = startStateful(t, cfg, "--state", dir, "--log-level", "warn")
		gen, ls := d.list()
		switch {
		case gen == uint64(1+acked) && slices.Equal(ls, tableAfter(acked)):
		case gen == uint64(2+acked) && slices.Equal(ls, tableAfter(acked+1)):
			acked++ // the commit in flight made it, its answer did not
		default:
			t.Fatalf("after kill %d with %d commits acknowledged: generation %d, table %q; want %d %q or %d %q",
				killsDone, acked, gen, ls, 1+acked, tableAfter(acked), 2+acked, tableAfter(acked+1))
		}
		if tb.Generation != gen || !slices.Equal(tb.Lines, ls) {
			t.Fatalf("state file generation %d %q, daemon %d %q", tb.Generation, tb.Lines, gen, ls)
		}
	}
	gen, ls := d.list()
	if gen != uint64(1+acked) || !slices.Equal(ls, tableAfter(acked)) {
		t.Fatalf("at the end: generation %d %q, want %d %q", gen, ls, 1+acked, tableAfter(acked))
	}
	t.Logf("%d commits, %d kills", acked, killsDone)
}
