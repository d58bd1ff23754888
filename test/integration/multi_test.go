package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/ctl"
	"github.com/sluice-proxy/sluice/internal/netnstest"
	"github.com/sluice-proxy/sluice/rules"
)

// One transaction across two instances (docs/ctl-protocol.md, "One
// transaction across instances"): `sluice run -c` in the host, and the same
// binary and configuration inside a network namespace of its own (run by
// `ip netns exec`, which execs it in place: the pid is sluice's). Both
// listen on the same 127.0.0.1 ports, each in its own namespace; the
// namespace's control socket is a file on the shared filesystem, so the CLI
// and the library in the host reach it.

// multiPair is the two instances and the ports of their tables: p0 and p1
// are the configured table, p0 and p2 the new one (p0 kept, p1 removed, p2
// added). Every rule answers health probes: "OK\n".
type multiPair struct {
	ns         *netnstest.NS
	file, next string // the configuration, and the new table as a rules file
	host, nsd  *liveDaemon
	p0, p1, p2 int
}

func newMultiPair(t *testing.T) *multiPair {
	t.Helper()
	p := &multiPair{ns: netnstest.New(t), p0: freePort(t), p1: freePort(t), p2: freePort(t)}
	p.file = writeFile(t, "sluice.yaml", fmt.Sprintf(`loops: 1
log: {level: info}
rules:
  - tcp 127.0.0.1:%d health=tcp
  - tcp 127.0.0.1:%d health=tcp
`, p.p0, p.p1))
	p.next = writeFile(t, "next.rules", fmt.Sprintf("tcp 127.0.0.1:%d health=tcp\ntcp 127.0.0.1:%d health=tcp\n", p.p0, p.p2))
	p.host = startRunCtl(t, forwardOpts{}, p.file)
	p.nsd = p.startNS(t)
	return p
}

// startNS starts the namespace's instance (again, after a kill).
func (p *multiPair) startNS(t *testing.T) *liveDaemon {
	t.Helper()
	return startRunCtl(t, forwardOpts{prefix: []string{"ip", "netns", "exec", p.ns.Name}}, p.file)
}

func (p *multiPair) socks() []string { return []string{p.host.sock, p.nsd.sock} }

// startRunCtl runs `sluice run -c file` and waits until its control socket
// answers with no writer. Its ports may be in another namespace: only the
// socket is waited for.
func startRunCtl(t *testing.T, o forwardOpts, file string) *liveDaemon {
	t.Helper()
	d := &liveDaemon{daemon: startDaemon(t, o, "run", "-c", file), t: t}
	d.sock = d.Ctl
	d.waitIdle()
	return d
}

// waitIdle waits until the control socket answers a status request with
// no writer (started, or done winding down a transaction); the test fails
// if sluice exits first.
func (d *liveDaemon) waitIdle() {
	d.t.Helper()
	waitFor(d.t, 10*time.Second, "the control socket "+d.sock+" with no writer", func() bool {
		select {
		case err := <-d.exited:
			d.exited <- err
			d.t.Fatalf("sluice exited: %v\n%s", err, d.stderr.String())
		default:
		}
		st, err := d.tryStatus()
		return err == nil && !st.Writer
	})
}

// wantList checks `sluice ctl -s SOCK list`: the generation and the lines.
func (d *liveDaemon) wantList(gen uint64, lines ...string) {
	d.t.Helper()
	if g, ls := d.list(); g != gen || !slices.Equal(ls, lines) {
		d.t.Fatalf("ctl list %s: generation %d %q, want %d %q", d.sock, g, ls, gen, lines)
	}
}

func healthRule(port int) string { return fmt.Sprintf("tcp 127.0.0.1:%d health=tcp", port) }

// healthProbe connects to 127.0.0.1:port (inside ns unless nil) and reads the
// health reply.
func healthProbe(t *testing.T, ns *netnstest.NS, port int) error {
	t.Helper()
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	var c net.Conn
	var err error
	dial := func() { c, err = net.DialTimeout("tcp", addr, 2*time.Second) }
	if ns != nil {
		ns.Do(t, dial)
	} else {
		dial()
	}
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil {
		return err
	}
	if string(b) != "OK\n" {
		return fmt.Errorf("%s answered %q, want the health reply", addr, b)
	}
	return nil
}

// wantServing checks that the ports answer probes and the others refuse.
func wantServing(t *testing.T, where string, ns *netnstest.NS, serving []int, refused ...int) {
	t.Helper()
	for _, port := range serving {
		if err := healthProbe(t, ns, port); err != nil {
			t.Errorf("%s: port %d: %v", where, port, err)
		}
	}
	for _, port := range refused {
		if err := healthProbe(t, ns, port); err == nil || !strings.Contains(err.Error(), "connection refused") {
			t.Errorf("%s: port %d: %v, want connection refused", where, port, err)
		}
	}
}

// listenInodes returns the socket inode of each port listening on
// 127.0.0.1 in pid's network namespace (/proc/PID/net/tcp): a socket kept
// across a transaction keeps its inode.
func listenInodes(t *testing.T, pid int, ports ...int) map[int]string {
	t.Helper()
	out := map[int]string{}
	for _, l := range procListens(t, fmt.Sprintf("/proc/%d/net/tcp", pid)) {
		for _, port := range ports {
			if l.local == fmt.Sprintf("0100007F:%04X", port) {
				out[port] = l.inode
			}
		}
	}
	if len(out) != len(ports) {
		t.Fatalf("pid %d listens on %v of ports %v", pid, out, ports)
	}
	return out
}

// A table that binds on both instances commits on both, each at its own
// next generation, and both serve it.
func TestMultiCommitsOnBoth(t *testing.T) {
	p := newMultiPair(t)
	code, out, errs := runSluice(t, "ctl", "-s", p.host.sock, "-s", p.nsd.sock, "apply", p.next)
	if code != 0 {
		t.Fatalf("exit %d\n%s\n%s", code, out, errs)
	}
	for _, want := range []string{"== " + p.host.sock + " (generation 1)", "== " + p.nsd.sock + " (generation 1)",
		"verdict good on all 2 instances: committed on all 2",
		p.host.sock + ": committed generation 2", p.nsd.sock + ": committed generation 2"} {
		if !strings.Contains(out, want) {
			t.Errorf("stdout lacks %q:\n%s", want, out)
		}
	}
	for _, d := range []*liveDaemon{p.host, p.nsd} {
		d.wantList(2, healthRule(p.p0), healthRule(p.p2))
	}
	wantServing(t, "host", nil, []int{p.p0, p.p2}, p.p1)
	wantServing(t, "namespace", p.ns, []int{p.p0, p.p2}, p.p1)
}

// A port another process holds inside the namespace: the namespace's
// verdict is bad, and both instances roll back, keeping their tables and
// their very sockets (same inodes), which serve as before.
func TestMultiPortHeldRollsBackBoth(t *testing.T) {
	p := newMultiPair(t)
	p.ns.Listen(t, fmt.Sprintf("127.0.0.1:%d", p.p2)) // this test's process, inside the namespace
	hostPid, nsPid := p.host.cmd.Process.Pid, p.nsd.cmd.Process.Pid
	hostBefore, nsBefore := listenInodes(t, hostPid, p.p0, p.p1), listenInodes(t, nsPid, p.p0, p.p1)

	code, out, errs := runSluice(t, "ctl", "-s", p.host.sock, "-s", p.nsd.sock, "apply", p.next, "--json")
	if code != 3 {
		t.Fatalf("exit %d, want 3\n%s\n%s", code, out, errs)
	}
	var res struct {
		Outcome   string `json:"outcome"`
		StoppedAt string `json:"stopped_at"`
		Exit      int    `json:"exit"`
		Members   []struct {
			Socket     string `json:"socket"`
			Outcome    string `json:"outcome"`
			Generation uint64 `json:"generation"`
			Summary    struct {
				Verdict bool `json:"verdict"`
				Rules   []struct {
					Ports []struct {
						Port  int    `json:"port"`
						Errno int    `json:"errno"`
						Error string `json:"error"`
					} `json:"ports"`
				} `json:"rules"`
			} `json:"summary"`
		} `json:"members"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if res.Outcome != "rolled-back" || res.StoppedAt != "apply" || res.Exit != 3 || len(res.Members) != 2 {
		t.Fatalf("%+v\n%s", res, out)
	}
	host, ns := res.Members[0], res.Members[1]
	if !host.Summary.Verdict || ns.Summary.Verdict {
		t.Errorf("verdicts: host %v, namespace %v; want good, bad", host.Summary.Verdict, ns.Summary.Verdict)
	}
	if f := ns.Summary.Rules[1].Ports; len(f) != 1 || f[0].Port != p.p2 || f[0].Errno != int(syscall.EADDRINUSE) || f[0].Error != "address already in use" {
		t.Errorf("namespace failures %+v", f)
	}
	for _, m := range res.Members {
		if m.Outcome != "rolled-back" || m.Generation != 1 {
			t.Errorf("%s: %s at generation %d", m.Socket, m.Outcome, m.Generation)
		}
	}
	if !strings.Contains(errs, fmt.Sprintf("1 listen port failed to bind on %s: rolled back on all 2 instances", p.nsd.sock)) {
		t.Errorf("stderr:\n%s", errs)
	}
	for _, d := range []*liveDaemon{p.host, p.nsd} {
		d.wantList(1, healthRule(p.p0), healthRule(p.p1))
	}
	wantServing(t, "host", nil, []int{p.p0, p.p1}, p.p2)
	wantServing(t, "namespace", p.ns, []int{p.p0, p.p1})
	if after := listenInodes(t, hostPid, p.p0, p.p1); !maps.Equal(after, hostBefore) {
		t.Errorf("host sockets %v, before %v", after, hostBefore)
	}
	if after := listenInodes(t, nsPid, p.p0, p.p1); !maps.Equal(after, nsBefore) {
		t.Errorf("namespace sockets %v, before %v", after, nsBefore)
	}
}

// runMulti drives the transaction with the client library, the new table
// read from p.next, between called before each step; every call is
// bounded by timeout.
func (p *multiPair) runMulti(t *testing.T, timeout, confirm time.Duration, between func(ctl.Step)) *ctl.MultiResult {
	t.Helper()
	src, err := os.ReadFile(p.next)
	if err != nil {
		t.Fatal(err)
	}
	entries, err := rules.ParseFile(p.next, src)
	if err != nil {
		t.Fatal(err)
	}
	opt := ctl.MultiOptions{Options: ctl.Options{Name: "multi_test", Timeout: timeout}, Confirm: confirm, Between: between}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	res, err := ctl.Multi(ctx, p.socks(), opt, func(*ctl.Member) ([]*rules.Rule, error) {
		rs := make([]*rules.Rule, len(entries))
		for i, e := range entries {
			rs[i] = e.Rule
		}
		return rs, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// signalPid sends sig to the daemon, by its pid.
func (d *liveDaemon) signalPid(sig syscall.Signal) {
	d.t.Helper()
	if err := syscall.Kill(d.cmd.Process.Pid, sig); err != nil {
		d.t.Fatalf("kill -%d %d: %v", sig, d.cmd.Process.Pid, err)
	}
}

// procState is the state letter of /proc/PID/stat ('T': stopped).
func procState(t *testing.T, pid int) byte {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	i := strings.LastIndexByte(string(b), ')') // after "pid (comm"
	if i < 0 || i+2 >= len(b) {
		t.Fatalf("/proc/%d/stat: %q", pid, b)
	}
	return b[i+2]
}

// The namespace's instance is killed (SIGKILL) after every apply and
// before any commit: the check finds it gone, the host rolls back, and the
// killed one, restarted, serves its configured table.
func TestMultiKilledBeforeCommit(t *testing.T) {
	p := newMultiPair(t)
	res := p.runMulti(t, 5*time.Second, 0, func(s ctl.Step) {
		if s != ctl.StepCheck {
			return
		}
		p.nsd.signalPid(syscall.SIGKILL)
		select {
		case err := <-p.nsd.exited:
			p.nsd.exited <- err
		case <-time.After(10 * time.Second):
			t.Fatal("the killed daemon did not exit")
		}
	})
	host, ns := res.Members[0], res.Members[1]
	if res.Outcome != ctl.OutcomeRolledBack || res.Stopped != ctl.StepCheck {
		t.Fatalf("outcome %s stopped at %s\n%s\n%s", res.Outcome, res.Stopped, host.Report(), ns.Report())
	}
	if ns.Failed != ctl.StepCheck || ns.Outcome != ctl.OutcomeReleased || ns.Summary == nil || !strings.Contains(ns.Err.Error(), "closed the connection") {
		t.Fatalf("namespace: %s", ns.Report())
	}
	if want := p.nsd.sock + ": FAILED at check (after apply, before any commit)"; !strings.HasPrefix(ns.Report(), want) {
		t.Errorf("report %q, want it to start %q", ns.Report(), want)
	}
	if host.Err != nil || host.Outcome != ctl.OutcomeRolledBack || host.Restored == nil || host.Restored.Generation != 1 {
		t.Fatalf("host: %s", host.Report())
	}
	p.host.wantList(1, healthRule(p.p0), healthRule(p.p1))
	wantServing(t, "host", nil, []int{p.p0, p.p1}, p.p2)

	p.nsd = p.startNS(t)
	p.nsd.wantList(1, healthRule(p.p0), healthRule(p.p1))
	wantServing(t, "restarted namespace", p.ns, []int{p.p0, p.p1}, p.p2)
}

// The namespace's instance stops answering (SIGSTOP) mid-transaction: the
// client gives up on it within its timeout, never hangs.
//
//   - before any commit (at the check): the host rolls back; resumed, the
//     namespace finds its connection gone and rolls back too;
//   - at its own commit: the window two-phase commit cannot close. The host
//     (first in order) committed; the namespace's COMMIT is sent and not
//     answered: in doubt. Resumed within its confirm timeout, it reads the
//     COMMIT waiting in its socket and commits: "in doubt" meant "may have
//     committed", and it did.
func TestMultiStoppedMember(t *testing.T) {
	const timeout = time.Second
	cases := []struct {
		name    string
		at      ctl.Step
		outcome ctl.Outcome // of the whole
		host    ctl.Outcome
		ns      ctl.Outcome
		err     string // in the namespace's error or report
		gen     uint64 // of both afterwards
	}{
		{"at the check", ctl.StepCheck, ctl.OutcomeRolledBack, ctl.OutcomeRolledBack, ctl.OutcomeReleased,
			"did not answer a status request", 1},
		{"at its commit", ctl.StepCommit, ctl.OutcomePartial, ctl.OutcomeCommitted, ctl.OutcomeInDoubt,
			"generation 2 = committed, 1 = not", 2},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := newMultiPair(t)
			resume := func() {}
			start := time.Now()
			res := p.runMulti(t, timeout, time.Minute, func(s ctl.Step) {
				if s != c.at {
					return
				}
				p.nsd.signalPid(syscall.SIGSTOP)
				resumed := false
				resume = func() {
					if !resumed {
						resumed = true
						p.nsd.signalPid(syscall.SIGCONT)
					}
				}
				t.Cleanup(resume) // before the daemon's own cleanup stops it
				pid := p.nsd.cmd.Process.Pid
				waitFor(t, 10*time.Second, "the daemon to stop", func() bool { return procState(t, pid) == 'T' })
			})
			took := time.Since(start)
			resume()
			host, ns := res.Members[0], res.Members[1]
			if took > timeout+5*time.Second {
				t.Errorf("the transaction took %s with a %s timeout", took, timeout)
			}
			if res.Outcome != c.outcome || host.Outcome != c.host || host.Err != nil || ns.Outcome != c.ns || ns.Failed != c.at ||
				!strings.Contains(ns.Report(), c.err) {
				t.Fatalf("outcome %s\n%s\n%s", res.Outcome, host.Report(), ns.Report())
			}
			p.nsd.waitIdle()
			serving, refused := []int{p.p0, p.p1}, p.p2 // the configured table
			if c.gen == 2 {
				serving, refused = []int{p.p0, p.p2}, p.p1 // the new one
			}
			for _, d := range []*liveDaemon{p.host, p.nsd} {
				d.wantList(c.gen, healthRule(serving[0]), healthRule(serving[1]))
			}
			wantServing(t, "host", nil, serving, refused)
			wantServing(t, "namespace", p.ns, serving, refused)
		})
	}
}
