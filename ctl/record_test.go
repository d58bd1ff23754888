package ctl

import (
	"os"
	"sync"
	"testing"

	"github.com/sluice-proxy/sluice/ctl/ctltest"
)

// recEngine records commits and names its boot.
type recEngine struct {
	*ctltest.Engine
	mu      sync.Mutex
	commits []Commit
}

var (
	_ CommitRecorder = (*recEngine)(nil)
	_ Booted         = (*recEngine)(nil)
)

func (e *recEngine) BootID() uint64 { return 0xfeedface }

func (e *recEngine) Committed(c Commit) {
	e.mu.Lock()
	e.commits = append(e.commits, c)
	e.mu.Unlock()
}

// The hello carries the boot id; a commit is recorded, with its author,
// before COMMITTED reaches the client; a rolled back one is not.
func TestCommitRecordedBeforeAnswer(t *testing.T) {
	eng := &recEngine{Engine: ctltest.New(3, nil, mustRules(t, "tcp 0.0.0.0:8080 -> 127.0.0.1:80")...)}
	s, path := startServer(t, eng, nil)
	c, tb := dialWrite(t, path, Options{Name: "rec-test"})
	if c.Server().Limits.BootID != 0xfeedface {
		t.Fatalf("boot id %x", c.Server().Limits.BootID)
	}
	ctx := ctxT(t)
	rs := mustRules(t, "tcp 0.0.0.0:9090 -> 127.0.0.1:90")
	if _, err := c.Load(ctx, tb.Generation, rs); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Apply(ctx, 0); err != nil {
		t.Fatal(err)
	}
	gen, err := c.Commit(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	eng.mu.Lock()
	got := append([]Commit(nil), eng.commits...)
	eng.mu.Unlock()
	if len(got) != 1 {
		t.Fatalf("%d commits recorded", len(got))
	}
	r := got[0]
	if r.Generation != gen || r.Who.Name != "rec-test" || r.Who.PID != int32(os.Getpid()) || r.Who.UID != uint32(os.Getuid()) ||
		len(r.Old) != 1 || r.Old[0].String() != "tcp 0.0.0.0:8080 -> 127.0.0.1:80" || len(r.New) != 1 || r.New[0].String() != rs[0].String() {
		t.Fatalf("recorded %+v", r)
	}
	// Rolled back: not recorded.
	c, tb = dialWrite(t, path, Options{})
	if _, err := c.Load(ctx, tb.Generation, mustRules(t, "tcp 0.0.0.0:9091 -> 127.0.0.1:90")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Apply(ctx, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	c.Close()
	waitIdle(t, s)
	eng.mu.Lock()
	defer eng.mu.Unlock()
	if len(eng.commits) != 1 {
		t.Fatalf("%d commits recorded after a rollback", len(eng.commits))
	}
}

// Hold takes the writer slot: a writer is told busy meanwhile.
func TestHoldSlot(t *testing.T) {
	eng := ctltest.New(1, nil)
	s, path := startServer(t, eng, nil)
	release, err := s.Hold()
	if err != nil {
		t.Fatal("slot not free:", err)
	}
	if _, err := s.Hold(); CodeOf(err) != CodeBusy {
		t.Fatal("slot taken twice:", err)
	}
	c := mustDial(t, ctxT(t), path, Options{})
	err = c.Hello(ctxT(t), IntentWrite)
	if err == nil {
		_, err = c.Pifs(ctxT(t))
	}
	wantCode(t, err, CodeBusy)
	c.Close()
	release()
	c2, _ := dialWrite(t, path, Options{})
	c2.Close()
}
