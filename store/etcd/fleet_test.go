package etcd

import (
	"context"
	"fmt"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/sluice-proxy/sluice/internal/etcdtest"
)

// A batch of more instances than etcd takes operations in one
// transaction (--max-txn-ops, 128 by default) is assigned in several, and
// reverted so: 150 instances that never report halt it at the timeout,
// every one is assigned back (no previous version: the key deleted).
func TestRolloutBatchOverTxnLimit(t *testing.T) {
	srv := etcdtest.Start(t)
	f, err := OpenFleet(Conn{Endpoints: []string{srv.URL}}, "/sluice/big")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ids := make([]string, 150)
	for i := range ids {
		ids[i] = fmt.Sprintf("i%03d", i)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rep, err := f.Rollout(ctx, []byte("tcp 127.0.0.1:1 -> 127.0.0.1:2\n"), RolloutOptions{Instances: ids, Batch: len(ids), Timeout: time.Second, Holder: "test"})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Outcome != RolloutHalted || rep.Halted != 1 || len(rep.Instances) != len(ids) {
		t.Fatalf("report: %s halted at %d, %d instances", rep.Outcome, rep.Halted, len(rep.Instances))
	}
	for _, r := range rep.Instances {
		if !r.Moved || !r.Reverted || r.Status != nil {
			t.Fatalf("%+v: want moved, no report, reverted", r)
		}
	}
	resp, err := f.cli.Get(ctx, f.keys.AssignDir(), clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil || resp.Count != 0 {
		t.Errorf("assignments left after the revert: %v %v", resp.Count, err)
	}
}
