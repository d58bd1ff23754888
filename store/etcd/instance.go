package etcd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/sluice-proxy/sluice/rules"
	"github.com/sluice-proxy/sluice/state"
)

type mvccKV = mvccpb.KeyValue

// Applier is the daemon's side of an assignment: the same transaction as
// `sluice ctl apply` (load, validate, apply, verdict, commit or roll back,
// the commit recorded in the state dir).
type Applier interface {
	// ApplyTable runs one transaction on the table's entries (parsed from
	// the key named file: FILE:LINE in its errors). Busy (nothing done: a
	// ctl writer holds the writer slot) is retried later.
	ApplyTable(file string, entries []rules.Entry) Result
	// Active is the active table's canonical lines and its generation.
	Active() ([]string, uint64)
}

// Result is what ApplyTable did.
type Result struct {
	Outcome    Outcome // committed, rolled-back or invalid
	Busy       bool    // nothing done: another writer holds the slot
	Generation uint64  // the active table's generation after it
	Verdict    string  // good or bad; "" when nothing was applied
	Error      string  // invalid: FILE:LINE: message lines; else the failures
	Summary    *Summary
}

// InstanceConfig sets up an instance loop.
type InstanceConfig struct {
	Conn     Conn
	Prefix   string
	Instance string
	BootID   uint64
	TTL      time.Duration // the status key's lease; 0 = 10s
	Log      *zap.Logger
	// Backoff is the first and the longest wait between tries while etcd is
	// unreachable; zero values: 200ms and 5s.
	Backoff [2]time.Duration
}

// Stats are the instance's numbers for sluice_store_*.
type Stats struct {
	Connected bool
	Version   string // the version that runs (its last committed assignment); "" none
	LastApply int64  // unix time of the last transaction run for an assignment; 0 none
	Errors    uint64 // unreachable etcd, lost leases, compactions, bad input
}

// Instance follows its assignment in etcd. Run drives it; Stats may be
// read from any goroutine.
//
// Invariant: the goroutine of Run alone touches the fields below mu's
// group; the atomics are its published numbers.
type Instance struct {
	cfg  InstanceConfig
	keys Keys
	app  Applier
	log  *zap.Logger

	connected atomic.Bool
	lastApply atomic.Int64
	errors    atomic.Uint64
	mu        sync.Mutex
	version   string // guarded by mu: Stats reads it

	want     string          // the assignment's VERSION; "" none
	done     string          // the last VERSION a transaction ran for (or found invalid)
	last     *Status         // the last status written: put again under each new lease
	reported map[string]bool // keys of another shape already logged (bounded)

	// afterGet, for tests, runs between the get and the watch.
	afterGet func()
}

// NewInstance makes an instance loop for app; Run starts it.
func NewInstance(cfg InstanceConfig, app Applier) (*Instance, error) {
	if err := CheckName(cfg.Instance); err != nil {
		return nil, fmt.Errorf("store.etcd.instance: %w", err)
	}
	if cfg.TTL == 0 {
		cfg.TTL = 10 * time.Second
	}
	if cfg.Backoff[0] == 0 {
		cfg.Backoff[0] = 200 * time.Millisecond
	}
	if cfg.Backoff[1] == 0 {
		cfg.Backoff[1] = 5 * time.Second
	}
	log := cfg.Log
	if log == nil {
		log = zap.NewNop()
	}
	log = log.With(zap.String("store", "etcd"), zap.String("instance", cfg.Instance))
	return &Instance{cfg: cfg, keys: Keys{cfg.Prefix}, app: app, log: log, reported: map[string]bool{}}, nil
}

// Stats returns the instance's numbers now.
func (in *Instance) Stats() Stats {
	in.mu.Lock()
	v := in.version
	in.mu.Unlock()
	return Stats{Connected: in.connected.Load(), Version: v, LastApply: in.lastApply.Load(), Errors: in.errors.Load()}
}

// errResync ends a session to read the keys again at once (a compaction
// passed the watch's revision).
var errResync = errors.New("watch compacted: reading the keys again")

// Run follows the assignment until ctx ends. It never blocks the daemon:
// the table serves whatever etcd does; while etcd is unreachable it keeps
// the table and tries again with back-off, saying so once per outage.
func (in *Instance) Run(ctx context.Context) {
	wait := in.cfg.Backoff[0]
	down := false
	for ctx.Err() == nil {
		up, err := in.session(ctx)
		in.connected.Store(false)
		if ctx.Err() != nil {
			return
		}
		if up {
			wait = in.cfg.Backoff[0]
		}
		in.errors.Add(1)
		switch {
		case errors.Is(err, errResync):
			in.log.Warn("store: the watch's revision was compacted; reading the keys again")
			continue
		case !down || up:
			in.log.Warn("store: etcd unreachable; the active table keeps serving, retrying with back-off", zap.Error(err))
		}
		down = true
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		wait = min(2*wait, in.cfg.Backoff[1])
	}
}

// session is one connection's life: lease, get, watch until something
// fails. It returns whether etcd answered at all (the back-off restarts)
// and why it ended.
func (in *Instance) session(ctx context.Context) (up bool, err error) {
	cli, err := in.cfg.Conn.dial()
	if err != nil {
		return false, err
	}
	defer cli.Close()
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	probe := max(in.cfg.TTL/4, 250*time.Millisecond)

	tctx, tcancel := context.WithTimeout(sctx, probe+time.Second)
	lease, err := cli.Grant(tctx, int64(in.cfg.TTL/time.Second))
	tcancel()
	if err != nil {
		return false, fmt.Errorf("lease: %w", err)
	}
	ka, err := cli.KeepAlive(sctx, lease.ID)
	if err != nil {
		return true, fmt.Errorf("lease keep-alive: %w", err)
	}
	tctx, tcancel = context.WithTimeout(sctx, probe+time.Second)
	resp, err := cli.Get(tctx, in.keys.AssignDir(), clientv3.WithPrefix())
	tcancel()
	if err != nil {
		return true, fmt.Errorf("get %s: %w", in.keys.AssignDir(), err)
	}
	in.connected.Store(true)
	in.log.Info("store: connected", zap.Strings("endpoints", in.cfg.Conn.Endpoints), zap.Int64("revision", resp.Header.Revision))
	seen := false
	for _, kv := range resp.Kvs {
		seen = in.assignKV(sctx, cli, lease.ID, kv) || seen
	}
	if !seen {
		in.want = ""
	}
	if in.last == nil {
		_, gen := in.app.Active()
		in.last = &Status{Instance: in.cfg.Instance, Outcome: OutcomeNone, Generation: gen}
	}
	if err := in.putStatus(sctx, cli, lease.ID, in.last); err != nil {
		return true, err
	}
	if in.afterGet != nil {
		in.afterGet()
	}
	if err := in.reconcile(sctx, cli, lease.ID); err != nil {
		return true, err
	}
	wch := cli.Watch(clientv3.WithRequireLeader(sctx), in.keys.AssignDir(), clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
	tick := time.NewTicker(probe)
	defer tick.Stop()
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return true, ctx.Err()
		case _, ok := <-ka:
			if !ok {
				return true, errors.New("the status key's lease was lost")
			}
		case w, ok := <-wch:
			if !ok {
				return true, errors.New("watch ended")
			}
			if w.CompactRevision != 0 {
				return true, errResync
			}
			if err := w.Err(); err != nil {
				return true, fmt.Errorf("watch: %w", err)
			}
			for _, ev := range w.Events {
				if ev.Type == clientv3.EventTypeDelete {
					if k, id := in.keys.Parse(string(ev.Kv.Key)); k == KeyAssign && id == in.cfg.Instance {
						in.log.Info("store: the assignment was deleted; the active table keeps serving", zap.String("was", in.want))
						in.want = ""
					}
					continue
				}
				in.assignKV(sctx, cli, lease.ID, ev.Kv)
			}
		case <-tick.C:
			tctx, tcancel := context.WithTimeout(sctx, probe+time.Second)
			_, err := cli.Get(tctx, in.keys.Assign(in.cfg.Instance), clientv3.WithCountOnly())
			tcancel()
			if err != nil {
				return true, fmt.Errorf("probe: %w", err)
			}
		case <-retry.C:
		}
		if err := in.reconcile(sctx, cli, lease.ID); err != nil {
			return true, err
		}
		if in.want != "" && in.want != in.done {
			retry.Reset(time.Second) // busy: another writer held the slot
		}
	}
}

// assignKV takes one key of assign/: its own sets want; one of another
// shape, or a value that is no VERSION, is reported (logged once, counted).
// It returns whether kv was this instance's assignment.
func (in *Instance) assignKV(ctx context.Context, cli *clientv3.Client, lease clientv3.LeaseID, kv *mvccKV) bool {
	key := string(kv.Key)
	kind, id := in.keys.Parse(key)
	if kind != KeyAssign {
		in.bad(key, "a key of another shape under assign/ (want assign/ID); ignored")
		return false
	}
	if id != in.cfg.Instance {
		return false
	}
	v := string(kv.Value)
	if len(kv.Value) > MaxAssignBytes {
		v = ""
	}
	if err := CheckName(v); err != nil {
		msg := fmt.Sprintf("%s: the value (%d bytes) is not a VERSION: %v", key, len(kv.Value), err)
		in.errors.Add(1)
		in.log.Error("store: bad assignment; the active table keeps serving", zap.String("error", msg))
		_, gen := in.app.Active()
		in.want, in.done = "", ""
		in.last = &Status{Instance: in.cfg.Instance, Outcome: OutcomeInvalid, Generation: gen, Error: msg}
		_ = in.putStatus(ctx, cli, lease, in.last)
		return true
	}
	in.want = v
	return true
}

// bad reports a key of another shape once.
func (in *Instance) bad(key, what string) {
	in.errors.Add(1)
	if in.reported[key] || len(in.reported) >= 1000 {
		return
	}
	in.reported[key] = true
	in.log.Warn("store: "+what, zap.String("key", key))
}

// reconcile runs the transaction when the assignment names a version not
// handled yet. It returns an error only when etcd failed (the session
// ends); what the table or the apply did is the status.
func (in *Instance) reconcile(ctx context.Context, cli *clientv3.Client, lease clientv3.LeaseID) error {
	v := in.want
	if v == "" || v == in.done {
		return nil
	}
	key := in.keys.Table(v)
	tctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	resp, err := cli.Get(tctx, key)
	cancel()
	if err != nil {
		return fmt.Errorf("get %s: %w", key, err)
	}
	st := &Status{Instance: in.cfg.Instance, Version: v}
	res := in.run(key, resp)
	if res.Busy {
		return nil
	}
	st.Outcome, st.Generation, st.Verdict, st.Error, st.Summary = res.Outcome, res.Generation, res.Verdict, res.Error, res.Summary
	in.done = v
	in.lastApply.Store(time.Now().Unix())
	if st.Outcome == OutcomeCommitted {
		in.mu.Lock()
		in.version = v
		in.mu.Unlock()
		in.log.Info("store: assignment committed", zap.String("version", v), zap.Uint64("generation", st.Generation))
	} else {
		in.errors.Add(1)
		in.log.Error("store: assignment not committed; the active table keeps serving", zap.String("version", v),
			zap.Stringer("outcome", st.Outcome), zap.String("error", st.Error))
	}
	in.last = st
	return in.putStatus(ctx, cli, lease, st)
}

// run checks the table of resp and applies it (invalid when it is missing,
// over MaxTableBytes or does not validate; committed without a
// transaction when it is the active table already: a restart resumed it).
func (in *Instance) run(key string, resp *clientv3.GetResponse) Result {
	_, gen := in.app.Active()
	invalid := func(msg string) Result { return Result{Outcome: OutcomeInvalid, Generation: gen, Error: msg} }
	if len(resp.Kvs) == 0 {
		return invalid(key + ": no such key: the assignment names a version that was never stored")
	}
	val := resp.Kvs[0].Value
	if len(val) > MaxTableBytes {
		return invalid(fmt.Sprintf("%s: %d bytes, over the limit of %d", key, len(val), MaxTableBytes))
	}
	entries, err := rules.ParseFile(key, val)
	if err != nil {
		return invalid(err.Error())
	}
	lines, _ := in.app.Active()
	if slices.Equal(lines, state.Lines(rules.RulesOf(entries))) {
		return Result{Outcome: OutcomeCommitted, Generation: gen, Verdict: "good", Summary: &Summary{}}
	}
	return in.app.ApplyTable(key, entries)
}

// putStatus writes st (time set now) under the lease.
func (in *Instance) putStatus(ctx context.Context, cli *clientv3.Client, lease clientv3.LeaseID, st *Status) error {
	st.Instance = in.cfg.Instance
	st.BootID = fmt.Sprintf("%016x", in.cfg.BootID)
	st.Time = time.Now().UTC()
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	tctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := cli.Put(tctx, in.keys.Status(in.cfg.Instance), string(b), clientv3.WithLease(lease)); err != nil {
		return fmt.Errorf("put %s: %w", in.keys.Status(in.cfg.Instance), err)
	}
	return nil
}
