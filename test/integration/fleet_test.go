package integration

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/sluice-proxy/sluice/internal/etcdtest"
	"github.com/sluice-proxy/sluice/internal/netnstest"
	"github.com/sluice-proxy/sluice/internal/testpeer"
	"github.com/sluice-proxy/sluice/store/etcd"
)

// fleet is a real etcd server and three sluice instances following it,
// each with the pif "net" in its own network namespace: the same table
// binds in all three.
type fleet struct {
	t       *testing.T
	etcd    *etcdtest.Server
	prefix  string
	ns      []*netnstest.NS
	files   []string
	metrics []int
	d       []*daemon
	backend *testpeer.Backend
	cli     *clientv3.Client
}

var fleetIDs = []string{"i0", "i1", "i2"}

func startFleet(t *testing.T) *fleet {
	t.Helper()
	f := &fleet{t: t, etcd: etcdtest.Start(t), prefix: fmt.Sprintf("/sluice/t%d", os.Getpid()), backend: hashBackend(t)}
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{f.etcd.URL}, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	f.cli = cli
	for i, id := range fleetIDs {
		ns := netnstest.New(t)
		dir := t.TempDir()
		m := freePort(t)
		file := writeFile(t, id+".yaml", fmt.Sprintf(`loops: 1
log: {level: info}
metrics: {listen: 127.0.0.1:%d}
state: {dir: %s}
pifs:
  - {name: net, netns: %s}
store: {etcd: {endpoints: [%s], prefix: %s, instance: %s, ttl: 2s}}
rules: []
`, m, filepath.Join(dir, "state"), ns.Path, f.etcd.URL, f.prefix, id))
		f.ns, f.files, f.metrics = append(f.ns, ns), append(f.files, file), append(f.metrics, m)
		f.d = append(f.d, nil)
		f.start(i)
	}
	f.waitStatus("every instance reports", func(v *etcd.View) bool {
		n := 0
		for _, m := range v.Members {
			if m.Status != nil {
				n++
			}
		}
		return n == len(fleetIDs)
	})
	return f
}

// start runs instance i (again: the same configuration and state dir).
func (f *fleet) start(i int) {
	f.d[i] = startDaemon(f.t, forwardOpts{}, "run", "-c", f.files[i])
	waitFor(f.t, 10*time.Second, "instance metrics", func() bool {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", f.metrics[i]))
		if err == nil {
			c.Close()
		}
		return err == nil
	})
}

func (f *fleet) view() *etcd.View {
	f.t.Helper()
	fl, err := etcd.OpenFleet(etcd.Conn{Endpoints: []string{f.etcd.URL}}, f.prefix)
	if err != nil {
		f.t.Fatal(err)
	}
	defer fl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	v, err := fl.Read(ctx)
	if err != nil {
		f.t.Fatal(err)
	}
	return v
}

func (f *fleet) waitStatus(what string, cond func(*etcd.View) bool) {
	f.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		v := f.view()
		if cond(v) {
			return
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("%s: not within 20s; fleet: %+v\n%s", what, v.Members, f.logs())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (f *fleet) logs() string {
	var b strings.Builder
	for i, d := range f.d {
		fmt.Fprintf(&b, "--- %s\n%s", fleetIDs[i], d.stderr.String())
	}
	return b.String()
}

func (f *fleet) put(key, val string) {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := f.cli.Put(ctx, f.prefix+"/"+key, val); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fleet) rollout(file string, extra ...string) (int, string, string) {
	f.t.Helper()
	args := append([]string{"ctl", "rollout", file, "--etcd", f.etcd.URL, "--prefix", f.prefix, "--timeout", "15s"}, extra...)
	return runSluiceFor(f.t, 90*time.Second, args...)
}

// ctlStatus is instance i's ctl status.
func (f *fleet) ctlStatus(i int) string {
	f.t.Helper()
	code, out, errb := runSluiceFor(f.t, 20*time.Second, "ctl", "-s", f.d[i].Ctl, "status")
	if code != 0 {
		f.t.Errorf("ctl status: exit %d\n%s%s", code, out, errb)
	}
	return out
}

// exchange moves bytes through instance i's port in its namespace.
func (f *fleet) exchange(i, port int, seed uint64) error {
	c, err := netnsDial(f.t, f.ns[i], port)
	if err != nil {
		return err
	}
	defer c.Close()
	return testpeer.Exchange(c, 64<<10, 64<<10, seed)
}

// netnsDial connects to 127.0.0.1:port inside ns; a refusal is an error,
// not the test's failure.
func netnsDial(t testing.TB, ns *netnstest.NS, port int) (c net.Conn, err error) {
	ns.Do(t, func() { c, err = net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 2*time.Second) })
	return c, err
}

// The contract's rollout across three instances: all committed; then a
// port held in the second's namespace halts the next rollout, the first is
// reverted, the third never moves, exit 3 with a line per instance.
func TestFleetRollout(t *testing.T) {
	f := startFleet(t)
	p1, p2 := 18000+os.Getpid()%1000, 19000+os.Getpid()%1000
	v1 := writeFile(t, "v1.rules", fmt.Sprintf("tcp net/127.0.0.1:%d -> %s\n", p1, f.backend.Addr()))
	code, out, errb := f.rollout(v1)
	if code != 0 {
		t.Fatalf("rollout v1: exit %d\n%s%s\n%s", code, out, errb, f.logs())
	}
	var ver1 string
	view := f.view()
	for _, m := range view.Members {
		if m.Status == nil || m.Status.Outcome != etcd.OutcomeCommitted || m.Status.Version != m.Assigned || m.Assigned == "" {
			t.Fatalf("after rollout v1: %s: assigned %q, status %+v", m.Instance, m.Assigned, m.Status)
		}
		if ver1 == "" {
			ver1 = m.Assigned
		} else if m.Assigned != ver1 {
			t.Fatalf("after rollout v1: %s assigned %s, another %s", m.Instance, m.Assigned, ver1)
		}
	}
	for i := range fleetIDs {
		if err := f.exchange(i, p1, uint64(i+1)); err != nil {
			t.Fatalf("%s: %v\n%s", fleetIDs[i], err, f.logs())
		}
	}

	// The second instance's namespace holds p2.
	held := f.ns[1].Listen(t, fmt.Sprintf("127.0.0.1:%d", p2))
	defer held.Close()
	v2 := writeFile(t, "v2.rules", fmt.Sprintf("tcp net/127.0.0.1:%d -> %s\ntcp net/127.0.0.1:%d -> %s\n", p1, f.backend.Addr(), p2, f.backend.Addr()))
	code, out, errb = f.rollout(v2, "--batch", "1", "--instances", "i0,i1,i2")
	if code != 3 {
		t.Fatalf("rollout v2 with a port held: exit %d, want 3\n%s%s\n%s", code, out, errb, f.logs())
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 3 {
		t.Fatalf("want a line per instance, got:\n%s", out)
	}
	for i, want := range []string{"committed", "rolled-back", "not moved"} {
		if !strings.HasPrefix(lines[i], fleetIDs[i]+": ") || !strings.Contains(lines[i], want) {
			t.Errorf("line %d: %q, want %s: … %s", i, lines[i], fleetIDs[i], want)
		}
	}
	if !strings.Contains(lines[1], fmt.Sprintf("port %d: address already in use", p2)) || !strings.Contains(lines[0], "reverted to "+ver1+": committed") {
		t.Errorf("lines:\n%s", out)
	}
	if !strings.Contains(errb, "halted at batch 2 of 3") {
		t.Errorf("stderr: %s", errb)
	}
	view = f.view()
	for _, m := range view.Members {
		if m.Assigned != ver1 || m.Status == nil || m.Status.Version != ver1 || m.Status.Outcome != etcd.OutcomeCommitted {
			t.Errorf("after the halt: %s: assigned %s, status %+v; want %s committed", m.Instance, m.Assigned, m.Status, ver1)
		}
	}
	if view.Rollout != nil {
		t.Errorf("the rollout key is left: %+v", view.Rollout)
	}
	// The first instance went back: p2 closed again; p1 serves everywhere.
	if c, err := netnsDial(t, f.ns[0], p2); err == nil {
		c.Close()
		t.Errorf("i0 still listens on %d after its revert", p2)
	}
	for i := range fleetIDs {
		if err := f.exchange(i, p1, uint64(10+i)); err != nil {
			t.Errorf("%s after the halt: %v", fleetIDs[i], err)
		}
	}

	// fleet prints every instance.
	code, out, errb = runSluiceFor(t, 20*time.Second, "ctl", "fleet", "--etcd", f.etcd.URL, "--prefix", f.prefix)
	if code != 0 || strings.Count(out, ver1) != 6 {
		t.Errorf("fleet: exit %d\n%s%s", code, out, errb)
	}

	// A second rollout while one is held is refused, naming the holder.
	f.put("rollout", `{"version":"x","holder":"someone@else pid 1","state":"running","batches":[["i0"]],"previous":{"i0":""}}`)
	code, _, errb = f.rollout(v2)
	if code != 4 || !strings.Contains(errb, "someone@else pid 1") {
		t.Errorf("rollout while held: exit %d, want 4 naming the holder\n%s", code, errb)
	}
	if f.backend.Failures.Load() != 0 {
		t.Errorf("%d failed exchanges at the backend", f.backend.Failures.Load())
	}
}

// etcd killed mid-steady-state: every instance keeps forwarding and says
// it is disconnected; restarted, they reconnect and the next rollout
// converges. An instance killed: its status goes with its lease;
// restarted, it resumes from its state dir and reconciles. Bad input from
// the store is reported, never applied, never a crash.
func TestFleetFailures(t *testing.T) {
	f := startFleet(t)
	p1, p2 := 18000+os.Getpid()%1000, 19000+os.Getpid()%1000
	v1 := writeFile(t, "v1.rules", fmt.Sprintf("tcp net/127.0.0.1:%d -> %s\n", p1, f.backend.Addr()))
	if code, out, errb := f.rollout(v1); code != 0 {
		t.Fatalf("rollout v1: exit %d\n%s%s", code, out, errb)
	}
	metric := func(i int, name string) string {
		_, body := httpGet(t, fmt.Sprintf("http://127.0.0.1:%d/metrics", f.metrics[i]))
		for _, l := range strings.Split(body, "\n") {
			if strings.HasPrefix(l, name+" ") {
				return strings.TrimPrefix(l, name+" ")
			}
		}
		return ""
	}

	t.Run("etcd killed and restarted", func(t *testing.T) {
		f.etcd.Kill()
		for i := range fleetIDs {
			waitFor(t, 10*time.Second, fleetIDs[i]+" says disconnected", func() bool { return metric(i, "sluice_store_connected") == "0" })
			if err := f.exchange(i, p1, uint64(20+i)); err != nil {
				t.Errorf("%s with etcd down: %v", fleetIDs[i], err)
			}
		}
		if out := f.ctlStatus(0); !strings.Contains(out, "store             etcd unreachable") {
			t.Errorf("ctl status with etcd down:\n%s", out)
		}
		f.etcd.Start()
		for i := range fleetIDs {
			waitFor(t, 20*time.Second, fleetIDs[i]+" reconnects", func() bool { return metric(i, "sluice_store_connected") == "1" })
		}
		v2 := writeFile(t, "v2.rules", fmt.Sprintf("tcp net/127.0.0.1:%d -> %s\ntcp net/127.0.0.1:%d -> %s\n", p1, f.backend.Addr(), p2, f.backend.Addr()))
		if code, out, errb := f.rollout(v2); code != 0 {
			t.Fatalf("rollout after the restart: exit %d\n%s%s\n%s", code, out, errb, f.logs())
		}
		for i := range fleetIDs {
			if err := f.exchange(i, p2, uint64(30+i)); err != nil {
				t.Errorf("%s on the new port: %v", fleetIDs[i], err)
			}
		}
		ver := f.view().Member("i0").Assigned
		out := f.ctlStatus(0)
		for _, want := range []string{"store             etcd connected\n", "store version     " + ver + "\n", "store last apply  20", "store errors      "} {
			if !strings.Contains(out, want) {
				t.Errorf("ctl status: no %q in\n%s", want, out)
			}
		}
	})

	t.Run("an instance killed and restarted", func(t *testing.T) {
		d := f.d[2]
		_ = d.cmd.Process.Signal(syscall.SIGKILL)
		<-d.exited
		f.waitStatus("i2's status gone with its lease", func(v *etcd.View) bool { m := v.Member("i2"); return m != nil && m.Status == nil })
		want := f.view().Member("i2").Assigned
		f.start(2)
		f.waitStatus("i2 reconciles", func(v *etcd.View) bool {
			m := v.Member("i2")
			return m.Status != nil && m.Status.Version == want && m.Status.Outcome == etcd.OutcomeCommitted
		})
		if !strings.Contains(f.d[2].stderr.String(), "resuming generation") {
			t.Errorf("i2 did not resume from its state dir:\n%s", f.d[2].stderr.String())
		}
		if err := f.exchange(2, p2, 40); err != nil {
			t.Errorf("i2 after its restart: %v", err)
		}
	})

	t.Run("bad input from the store", func(t *testing.T) {
		before := f.view().Member("i0").Status.Generation
		f.put("tables/bad", "tcp 127.0.0.1:1 -> 127.0.0.1:2\ntcp nonsense\n")
		f.put("assign/i0", "bad")
		f.waitStatus("i0 reports the table invalid", func(v *etcd.View) bool {
			st := v.Member("i0").Status
			return st != nil && st.Version == "bad" && st.Outcome == etcd.OutcomeInvalid
		})
		st := f.view().Member("i0").Status
		if !strings.Contains(st.Error, f.prefix+"/tables/bad:2: ") || st.Generation != before {
			t.Errorf("invalid status: %+v (generation before %d)", st, before)
		}
		f.put("tables/big", strings.Repeat("# padding\n", etcd.MaxTableBytes/10+1))
		f.put("assign/i0", "big")
		f.waitStatus("i0 reports the table over the limit", func(v *etcd.View) bool {
			st := v.Member("i0").Status
			return st != nil && st.Version == "big" && st.Outcome == etcd.OutcomeInvalid && strings.Contains(st.Error, "over the limit")
		})
		f.put("assign/a/b", "x")
		f.put("garbage", "x")
		waitFor(t, 10*time.Second, "the key of another shape reported", func() bool {
			return strings.Contains(f.d[0].stderr.String(), "a key of another shape")
		})
		code, out, _ := runSluiceFor(t, 20*time.Second, "ctl", "fleet", "--etcd", f.etcd.URL, "--prefix", f.prefix)
		if code != 0 || !strings.Contains(out, "a key of another shape: "+f.prefix+"/garbage") {
			t.Errorf("fleet: exit %d\n%s", code, out)
		}
		if err := f.exchange(0, p2, 50); err != nil {
			t.Errorf("i0 after bad input: %v", err)
		}
	})
}

// runSluiceFor is runSluice with a longer bound (a rollout waits for its
// batches).
func runSluiceFor(t *testing.T, limit time.Duration, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	cmd := exec.Command(sluiceBin, args...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		code = 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
	case <-time.After(limit):
		_ = cmd.Process.Kill()
		<-done
		t.Fatalf("sluice %s: still running after %s\n%s%s", strings.Join(args, " "), limit, out.String(), errb.String())
	}
	return code, out.String(), errb.String()
}

// bgRollout is a `ctl rollout` run in the background: the test kills its
// process, or etcd under it.
type bgRollout struct {
	cmd      *exec.Cmd
	out, err strings.Builder
	done     chan int // the exit code
}

func (f *fleet) startRollout(file string, extra ...string) *bgRollout {
	f.t.Helper()
	args := append([]string{"ctl", "rollout", file, "--etcd", f.etcd.URL, "--prefix", f.prefix}, extra...)
	r := &bgRollout{cmd: exec.Command(sluiceBin, args...), done: make(chan int, 1)}
	r.cmd.Stdout, r.cmd.Stderr = &r.out, &r.err
	if err := r.cmd.Start(); err != nil {
		f.t.Fatal(err)
	}
	go func() {
		err := r.cmd.Wait()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		}
		r.done <- code
	}()
	f.t.Cleanup(func() { _ = r.cmd.Process.Kill() })
	return r
}

// wait returns the rollout's exit code; the test fails after limit.
func (r *bgRollout) wait(t *testing.T, limit time.Duration) int {
	t.Helper()
	select {
	case code := <-r.done:
		r.done <- code
		return code
	case <-time.After(limit):
		t.Fatalf("rollout still running after %s\n%s%s", limit, r.out.String(), r.err.String())
	}
	return 0
}

// converged says every instance reports its assignment committed and no
// rollout is in progress.
func converged(v *etcd.View) bool {
	for _, m := range v.Members {
		if m.Assigned == "" || m.Status == nil || m.Status.Version != m.Assigned || m.Status.Outcome != etcd.OutcomeCommitted {
			return false
		}
	}
	return v.Rollout == nil && len(v.Members) == len(fleetIDs)
}

// A rollout interrupted: etcd killed and restarted under it (the command
// completes or halts, never leaves the fleet mixed; the instances forward
// throughout), and its operator's process killed between batches (fleet
// shows the mixed versions and the halted rollout; --resume finishes it;
// another run, --revert, restores the previous versions).
func TestFleetRolloutInterrupted(t *testing.T) {
	f := startFleet(t)
	p1, p2, p3 := 18000+os.Getpid()%1000, 19000+os.Getpid()%1000, 17000+os.Getpid()%1000
	rule := func(p int) string { return fmt.Sprintf("tcp net/127.0.0.1:%d -> %s\n", p, f.backend.Addr()) }
	if code, out, errb := f.rollout(writeFile(t, "v1.rules", rule(p1))); code != 0 {
		t.Fatalf("rollout v1: exit %d\n%s%s", code, out, errb)
	}
	batch1Done := func(v *etcd.View) bool { return v.Rollout != nil && v.Rollout.Done >= 1 }

	// i1 stopped (SIGSTOP: it cannot report) holds a --batch 1 rollout
	// in its second batch: the test kills etcd, or the rollout's process,
	// while it waits there.
	i1 := f.d[1].cmd.Process
	stopI1 := func(t *testing.T, file string) *bgRollout {
		t.Helper()
		if err := i1.Signal(syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		r := f.startRollout(file, "--batch", "1", "--instances", "i0,i1,i2", "--timeout", "60s")
		f.waitStatus("the rollout waits for i1", func(v *etcd.View) bool {
			return batch1Done(v) && v.Member("i1").Assigned == v.Rollout.Version
		})
		return r
	}

	t.Run("etcd killed mid-rollout", func(t *testing.T) {
		r := stopI1(t, writeFile(t, "v2.rules", rule(p1)+rule(p2)))
		f.etcd.Kill()
		if err := i1.Signal(syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
		forwarded := 0
		for round := range 3 {
			for i := range fleetIDs {
				if err := f.exchange(i, p1, uint64(100+10*round+i)); err != nil {
					t.Errorf("%s with etcd down: %v", fleetIDs[i], err)
					continue
				}
				forwarded++
			}
			time.Sleep(500 * time.Millisecond)
		}
		if forwarded != 3*len(fleetIDs) {
			t.Errorf("%d of %d exchanges forwarded with etcd down", forwarded, 3*len(fleetIDs))
		}
		f.etcd.Start()
		code := r.wait(t, 120*time.Second)
		t.Logf("rollout across the etcd restart: exit %d\n%s%s", code, r.out.String(), r.err.String())
		if code != 0 && code != 3 {
			t.Fatalf("rollout across the etcd restart: exit %d, want 0 (completed) or 3 (halted and reverted)\n%s%s\n%s", code, r.out.String(), r.err.String(), f.logs())
		}
		f.waitStatus("the fleet converges after the etcd restart", converged)
		port := p2
		if code == 3 {
			port = p1
		}
		for i := range fleetIDs {
			if err := f.exchange(i, port, uint64(200+i)); err != nil {
				t.Errorf("%s after the restart: %v", fleetIDs[i], err)
			}
		}
		if code == 3 { // the rest of the test starts from v2 everywhere
			if c, out, errb := f.rollout(writeFile(t, "v2.rules", rule(p1)+rule(p2))); c != 0 {
				t.Fatalf("rollout v2 again: exit %d\n%s%s", c, out, errb)
			}
		}
	})
	ver2 := f.view().Member("i0").Assigned

	// interrupt kills the rollout's process while it waits for i1, resumes
	// i1 and waits until it has committed the version: the fleet is mixed,
	// the rollout key left.
	interrupt := func(t *testing.T, file string) string {
		t.Helper()
		r := stopI1(t, file)
		_ = r.cmd.Process.Kill()
		if code := r.wait(t, 10*time.Second); code != -1 {
			t.Errorf("the killed rollout: exit %d", code)
		}
		if err := i1.Signal(syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
		v := f.view()
		ver := v.Rollout.Version
		f.waitStatus("i1 commits "+ver, func(v *etcd.View) bool {
			st := v.Member("i1").Status
			return st != nil && st.Version == ver && st.Outcome == etcd.OutcomeCommitted
		})
		code, out, errb := runSluiceFor(t, 20*time.Second, "ctl", "fleet", "--etcd", f.etcd.URL, "--prefix", f.prefix)
		if code != 0 || !strings.Contains(out, "rollout of "+ver+" running: 1 of 3 batches done") {
			t.Errorf("fleet after the operator was lost: exit %d\n%s%s", code, out, errb)
		}
		for _, l := range strings.Split(out, "\n") {
			fs := strings.Fields(l)
			if len(fs) < 5 || !strings.HasPrefix(fs[0], "i") {
				continue
			}
			want := ver
			if fs[0] == "i2" {
				want = ver2
			}
			if fs[1] != want || fs[2] != want || fs[4] != "committed" {
				t.Errorf("fleet line %q: want %s assigned and committed", l, want)
			}
		}
		return ver
	}

	t.Run("operator killed, resumed", func(t *testing.T) {
		ver := interrupt(t, writeFile(t, "v3.rules", rule(p1)+rule(p2)+rule(p3)))
		code, out, errb := runSluiceFor(t, 90*time.Second, "ctl", "rollout", "--resume", "--etcd", f.etcd.URL, "--prefix", f.prefix, "--timeout", "15s")
		if code != 0 || !strings.Contains(out, "rollout "+ver+": committed on all 3 instances") {
			t.Fatalf("rollout --resume: exit %d\n%s%s\n%s", code, out, errb, f.logs())
		}
		f.waitStatus("every instance on "+ver, func(v *etcd.View) bool { return converged(v) && v.Member("i2").Assigned == ver })
		for i := range fleetIDs {
			if err := f.exchange(i, p3, uint64(300+i)); err != nil {
				t.Errorf("%s on the resumed version's port: %v", fleetIDs[i], err)
			}
		}
		ver2 = ver
	})

	t.Run("operator killed, reverted", func(t *testing.T) {
		ver := interrupt(t, writeFile(t, "v4.rules", rule(p1)))
		code, out, errb := runSluiceFor(t, 90*time.Second, "ctl", "rollout", "--revert", "--etcd", f.etcd.URL, "--prefix", f.prefix, "--timeout", "15s")
		if code != 3 || !strings.Contains(errb, "rollout "+ver+" reverted") {
			t.Fatalf("rollout --revert: exit %d, want 3\n%s%s\n%s", code, out, errb, f.logs())
		}
		for _, want := range []string{"i0: " + ver + " committed", "reverted to " + ver2 + ": committed", "i2: not moved (runs " + ver2 + ")"} {
			if !strings.Contains(out, want) {
				t.Errorf("rollout --revert: no %q in\n%s", want, out)
			}
		}
		f.waitStatus("every instance back on "+ver2, func(v *etcd.View) bool {
			return converged(v) && v.Member("i0").Assigned == ver2 && v.Member("i1").Assigned == ver2
		})
		for i := range fleetIDs {
			if err := f.exchange(i, p3, uint64(400+i)); err != nil {
				t.Errorf("%s on the previous version's port: %v", fleetIDs[i], err)
			}
		}
	})
	if f.backend.Failures.Load() != 0 {
		t.Errorf("%d failed exchanges at the backend", f.backend.Failures.Load())
	}
}
