package integration

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/ctl"
	"github.com/sluice-proxy/sluice/rules"
)

// A ctl client killed during a transaction across two instances, at each
// step (issue 15, "Also cover"). The client is this test binary run again
// as a process of its own (multiClientEnv): ctl.Multi over both control
// sockets, printing each step as it starts (MultiOptions.Between) and
// parking at the step it is told to die at, where the test SIGKILLs it by
// its pid. docs/ctl-protocol.md promises all or nothing until the first
// COMMIT is sent: every kill point here is before it, so both daemons must
// end with their old table at their old generation, its sockets serving and
// nothing else listening, the writer slot free; and the next transaction
// commits on both.

// multiClientEnv names the step the client process dies at; with it set
// the test binary is that client (init, before TestMain builds anything).
const (
	multiClientEnv   = "SLUICE_IT_MULTI_CLIENT"
	multiClientSocks = "SLUICE_IT_MULTI_SOCKS" // the control sockets, comma-separated
	multiClientFile  = "SLUICE_IT_MULTI_FILE"  // the new table, a rules file
)

func init() {
	if at := os.Getenv(multiClientEnv); at != "" {
		os.Exit(runMultiClient(at))
	}
}

// runMultiClient runs the transaction, printing "step NAME" before each
// step, and waits to be killed at the step named at. It returns the exit
// code (the transaction ran to its end: 0 if it committed).
func runMultiClient(at string) int {
	path := os.Getenv(multiClientFile)
	src, err := os.ReadFile(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	entries, err := rules.ParseFile(path, src)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	opt := ctl.MultiOptions{Options: ctl.Options{Name: "multikill", Timeout: 5 * time.Second}, Between: func(s ctl.Step) {
		fmt.Printf("step %s\n", s)
		if s.String() == at {
			time.Sleep(time.Hour) // the test kills us here
		}
	}}
	res, err := ctl.Multi(context.Background(), strings.Split(os.Getenv(multiClientSocks), ","), opt, func(*ctl.Member) ([]*rules.Rule, error) {
		rs := make([]*rules.Rule, len(entries))
		for i, e := range entries {
			rs[i] = e.Rule
		}
		return rs, nil
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Printf("outcome %s\n", res.Outcome)
	if res.Outcome != ctl.OutcomeCommitted {
		return 1
	}
	return 0
}

// killMultiClient starts the client process, waits until it reached step
// at (or ended), and SIGKILLs it. It returns the steps the client started.
func (p *multiPair) killMultiClient(t *testing.T, at ctl.Step) []string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), multiClientEnv+"="+at.String(),
		multiClientSocks+"="+strings.Join(p.socks(), ","), multiClientFile+"="+p.next)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string)
	go func() {
		defer close(lines)
		for sc := bufio.NewScanner(out); sc.Scan(); {
			lines <- sc.Text()
		}
	}()
	var steps []string
	timeout := time.After(30 * time.Second)
wait:
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				break wait
			}
			if s, ok := strings.CutPrefix(l, "step "); ok {
				steps = append(steps, s)
				if s == at.String() {
					break wait
				}
			}
		case <-timeout:
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("the client did not reach %s in 30 s (steps %v)", at, steps)
		}
	}
	if err := syscall.Kill(cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill %d: %v", cmd.Process.Pid, err)
	}
	for range lines { // the pipe closes with the process
	}
	if err := cmd.Wait(); err == nil || !strings.Contains(err.Error(), "killed") {
		t.Fatalf("the client at %s: %v, want killed (steps %v)", at, err, steps)
	}
	return steps
}

func TestMultiClientKilledAtEachStep(t *testing.T) {
	p := newMultiPair(t)
	steps := []ctl.Step{ctl.StepHello, ctl.StepList, ctl.StepLoad, ctl.StepApply, ctl.StepCheck, ctl.StepCommit}
	n := rounds(t, 50, func(round int) {
		for _, at := range steps {
			start := time.Now()
			seen := p.killMultiClient(t, at)
			// Both daemons see the connection gone: an open transaction
			// rolls back, the writer slot is free again.
			p.host.waitIdle()
			p.nsd.waitIdle()
			took := time.Since(start)
			for _, d := range []*liveDaemon{p.host, p.nsd} {
				d.wantList(1, healthRule(p.p0), healthRule(p.p1))
			}
			wantServing(t, "host after a kill at "+at.String(), nil, []int{p.p0, p.p1}, p.p2)
			wantServing(t, "namespace after a kill at "+at.String(), p.ns, []int{p.p0, p.p1}, p.p2)
			listenInodes(t, p.host.cmd.Process.Pid, p.p0, p.p1)
			listenInodes(t, p.nsd.cmd.Process.Pid, p.p0, p.p1)
			if round == 0 {
				t.Logf("killed at %s (steps %v): both at generation 1, serving it, in %s", at, seen, took.Round(time.Millisecond))
			}
		}
	})
	// Nothing was left behind: the next transaction commits on both.
	res := p.runMulti(t, 5*time.Second, 0, nil)
	if res.Outcome != ctl.OutcomeCommitted {
		t.Fatalf("after the kills: outcome %s\n%s\n%s", res.Outcome, res.Members[0].Report(), res.Members[1].Report())
	}
	for _, d := range []*liveDaemon{p.host, p.nsd} {
		d.wantList(2, healthRule(p.p0), healthRule(p.p2))
	}
	wantServing(t, "host", nil, []int{p.p0, p.p2}, p.p1)
	wantServing(t, "namespace", p.ns, []int{p.p0, p.p2}, p.p1)
	t.Logf("%d rounds of %d kills; then committed on both", n, len(steps))
}
