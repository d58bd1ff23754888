package etcd

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Fleet is the operator's side: read what every instance runs (Read), move
// a table across them (Rollout).
type Fleet struct {
	cli  *clientv3.Client
	keys Keys
}

// OpenFleet connects to etcd for the keys under prefix.
func OpenFleet(c Conn, prefix string) (*Fleet, error) {
	cli, err := c.dial()
	if err != nil {
		return nil, err
	}
	return &Fleet{cli: cli, keys: Keys{prefix}}, nil
}

// Close ends the connection.
func (f *Fleet) Close() error { return f.cli.Close() }

// Member is one instance as the store shows it.
type Member struct {
	Instance  string  `json:"instance"`
	Assigned  string  `json:"assigned,omitempty"` // "" none
	AssignRev int64   `json:"-"`                  // the assign key's mod revision; 0 none
	Status    *Status `json:"status,omitempty"`   // nil: no status key (down, or never started)
	Bad       string  `json:"bad_status,omitempty"`
}

// View is the whole prefix at one revision.
type View struct {
	Revision int64    `json:"revision"`
	Members  []Member `json:"instances"` // by ID
	Rollout  *Plan    `json:"rollout,omitempty"`
	Tables   int      `json:"tables"`
	Other    []string `json:"other_keys,omitempty"` // keys of another shape
}

// Member returns the member id, or nil.
func (v *View) Member(id string) *Member {
	i, ok := slices.BinarySearchFunc(v.Members, id, func(m Member, id string) int { return strings.Compare(m.Instance, id) })
	if !ok {
		return nil
	}
	return &v.Members[i]
}

// Read reads the prefix: assignments, statuses, the rollout in progress,
// the keys of another shape (the tables' values are not fetched).
func (f *Fleet) Read(ctx context.Context) (*View, error) {
	resp, err := f.cli.Get(ctx, f.keys.All(), clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, fmt.Errorf("get %s: %w", f.keys.All(), err)
	}
	rev := resp.Header.Revision
	v := &View{Revision: rev}
	members := map[string]*Member{}
	member := func(id string) *Member {
		if m := members[id]; m != nil {
			return m
		}
		m := &Member{Instance: id}
		members[id] = m
		return m
	}
	for _, kv := range resp.Kvs {
		switch kind, _ := f.keys.Parse(string(kv.Key)); kind {
		case KeyTable:
			v.Tables++
		case KeyOther:
			v.Other = append(v.Other, string(kv.Key))
		}
	}
	vals, err := f.cli.Txn(ctx).Then(
		clientv3.OpGet(f.keys.AssignDir(), clientv3.WithPrefix(), clientv3.WithRev(rev)),
		clientv3.OpGet(f.keys.StatusDir(), clientv3.WithPrefix(), clientv3.WithRev(rev)),
		clientv3.OpGet(f.keys.Rollout(), clientv3.WithRev(rev)),
	).Commit()
	if err != nil {
		return nil, fmt.Errorf("get %s: %w", f.keys.All(), err)
	}
	for _, kv := range vals.Responses[0].GetResponseRange().Kvs {
		if kind, id := f.keys.Parse(string(kv.Key)); kind == KeyAssign {
			m := member(id)
			m.Assigned, m.AssignRev = string(kv.Value), kv.ModRevision
		}
	}
	for _, kv := range vals.Responses[1].GetResponseRange().Kvs {
		if kind, id := f.keys.Parse(string(kv.Key)); kind == KeyStatus {
			m := member(id)
			var st Status
			if err := json.Unmarshal(kv.Value, &st); err != nil {
				m.Bad = err.Error()
				continue
			}
			m.Status = &st
		}
	}
	if kvs := vals.Responses[2].GetResponseRange().Kvs; len(kvs) > 0 {
		var p Plan
		if err := json.Unmarshal(kvs[0].Value, &p); err != nil {
			v.Other = append(v.Other, f.keys.Rollout()+" (does not parse: "+err.Error()+")")
		} else {
			p.rev = kvs[0].ModRevision
			v.Rollout = &p
		}
	}
	for _, m := range members {
		v.Members = append(v.Members, *m)
	}
	slices.SortFunc(v.Members, func(a, b Member) int { return strings.Compare(a.Instance, b.Instance) })
	return v, nil
}

// PlanState is where a rollout is.
type PlanState uint8

const (
	PlanRunning   PlanState = iota + 1 // batches being assigned and awaited
	PlanReverting                      // halted: the moved instances being assigned back
	planStateEnd
)

var planStateText = [...]string{"", "running", "reverting"}

func (s PlanState) String() string {
	if s > 0 && s < planStateEnd {
		return planStateText[s]
	}
	return fmt.Sprintf("plan-state-%d", s)
}

func (s PlanState) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

func (s *PlanState) UnmarshalText(b []byte) error {
	for i := PlanRunning; i < planStateEnd; i++ {
		if i.String() == string(b) {
			*s = i
			return nil
		}
	}
	return fmt.Errorf("unknown rollout state %q", b)
}

// Plan is the value of the rollout key: the rollout in progress, enough
// for another process to resume or revert it.
type Plan struct {
	Version  string            `json:"version"`
	Holder   string            `json:"holder"` // who runs it: user@host pid N
	Started  time.Time         `json:"started"`
	Updated  time.Time         `json:"updated"`
	Batches  [][]string        `json:"batches"`
	Previous map[string]string `json:"previous"` // each instance's assignment before ("" none)
	Done     int               `json:"done"`     // batches all committed
	State    PlanState         `json:"state"`
	rev      int64             // the key's mod revision, as read
}

// HeldError refuses a rollout while another is in progress.
type HeldError struct{ Plan *Plan }

func (e *HeldError) Error() string {
	p := e.Plan
	return fmt.Sprintf("a rollout of %s is in progress (%s, %d of %d batches done), held by %s since %s: sluice ctl rollout --resume or --revert takes it over",
		p.Version, p.State, p.Done, len(p.Batches), p.Holder, p.Started.Format(time.RFC3339))
}

// RolloutOptions set up a rollout.
type RolloutOptions struct {
	Instances []string      // nil: every instance with a status or an assignment
	Batch     int           // instances per batch; 0: one, then the rest
	Timeout   time.Duration // for each batch to report; 0 = 60s
	Holder    string        // who, for the guard's message
	Resume    bool          // take over the rollout in progress and carry it on
	Revert    bool          // take over the rollout in progress and assign back the previous versions
}

// RolloutOutcome is how a rollout ended.
type RolloutOutcome uint8

const (
	RolloutCommitted RolloutOutcome = iota + 1 // every instance committed the version
	RolloutHalted                              // an instance did not: the moved ones were assigned back
	RolloutReverted                            // --revert: the moved ones were assigned back
	rolloutOutcomeEnd
)

var rolloutOutcomeText = [...]string{"", "committed", "halted", "reverted"}

func (o RolloutOutcome) String() string {
	if o > 0 && o < rolloutOutcomeEnd {
		return rolloutOutcomeText[o]
	}
	return fmt.Sprintf("rollout-outcome-%d", o)
}

func (o RolloutOutcome) MarshalText() ([]byte, error) { return []byte(o.String()), nil }

// Report is what a rollout did, instance by instance.
type Report struct {
	Version   string           `json:"version"`
	Outcome   RolloutOutcome   `json:"outcome"`
	Batches   int              `json:"batches"`
	Halted    int              `json:"halted_at_batch,omitempty"` // 1-based
	Instances []InstanceReport `json:"instances"`
}

// InstanceReport is one instance's part of a rollout.
type InstanceReport struct {
	Instance string  `json:"instance"`
	Batch    int     `json:"batch"` // 1-based
	Moved    bool    `json:"moved"` // assigned the version
	Previous string  `json:"previous,omitempty"`
	Status   *Status `json:"status,omitempty"` // its report of the version; nil: none within the timeout
	// Reverted: assigned its previous version again; RevertStatus its
	// report of it (nil: none within the timeout, or no previous version).
	Reverted     bool    `json:"reverted,omitempty"`
	RevertStatus *Status `json:"revert_status,omitempty"`
}

// Line is the instance's line of the report.
func (r *InstanceReport) Line(version string) string {
	var b strings.Builder
	b.WriteString(r.Instance + ": ")
	switch {
	case !r.Moved:
		fmt.Fprintf(&b, "not moved (runs %s)", orNone(r.Previous))
		return b.String()
	case r.Status == nil:
		fmt.Fprintf(&b, "%s: no report within the timeout", version)
	default:
		fmt.Fprintf(&b, "%s %s (generation %d)", version, r.Status.Outcome, r.Status.Generation)
		if r.Status.Error != "" {
			b.WriteString(": " + strings.ReplaceAll(r.Status.Error, "\n", "; "))
		}
	}
	if r.Reverted {
		switch {
		case r.Previous == "":
			b.WriteString("; no previous version: its assignment removed, it keeps what it runs")
		case r.RevertStatus == nil:
			fmt.Fprintf(&b, "; reverted to %s: no report within the timeout", r.Previous)
		default:
			fmt.Fprintf(&b, "; reverted to %s: %s (generation %d)", r.Previous, r.RevertStatus.Outcome, r.RevertStatus.Generation)
		}
	}
	return b.String()
}

func orNone(s string) string {
	if s == "" {
		return "no assigned version"
	}
	return s
}

// NewVersion names a table's version: the UTC time and the start of its
// SHA-256, so that names sort by time and two tables never share one.
func NewVersion(table []byte, now time.Time) string {
	h := sha256.Sum256(table)
	return now.UTC().Format("20060102T150405Z") + "-" + hex.EncodeToString(h[:4])
}

// ErrNoInstances: nothing to roll out to.
var ErrNoInstances = errors.New("no instances: none has a status or an assignment under the prefix (give --instances)")

// Rollout stores table (canonical lines) as a new version and assigns it
// batch by batch, waiting each time until every instance of the batch
// reports it committed; the first that reports anything else, or nothing
// within the timeout, halts it: every instance moved so far is assigned
// its previous version again. Writes are guarded: the rollout key is taken
// with a transaction (a second rollout gets a *HeldError), and each batch's
// assignments are written only if neither they nor the rollout key changed
// since read. With Resume or Revert, table is ignored: the rollout in
// progress is taken over. It returns the report (nil only with an error).
func (f *Fleet) Rollout(ctx context.Context, table []byte, opt RolloutOptions) (*Report, error) {
	if opt.Timeout == 0 {
		opt.Timeout = 60 * time.Second
	}
	view, err := f.Read(ctx)
	if err != nil {
		return nil, err
	}
	var plan *Plan
	if opt.Resume || opt.Revert {
		if view.Rollout == nil {
			return nil, errors.New("no rollout in progress to take over")
		}
		plan = view.Rollout
		plan.Holder, plan.Updated = opt.Holder, time.Now().UTC()
		if opt.Revert {
			plan.State = PlanReverting
		}
		if err := f.putPlan(ctx, plan); err != nil {
			return nil, err
		}
	} else {
		if view.Rollout != nil {
			return nil, &HeldError{view.Rollout}
		}
		if plan, err = f.newPlan(ctx, view, table, opt); err != nil {
			return nil, err
		}
	}
	rep := &Report{Version: plan.Version, Batches: len(plan.Batches)}
	for i, b := range plan.Batches {
		for _, id := range b {
			r := InstanceReport{Instance: id, Batch: i + 1, Previous: plan.Previous[id]}
			if m := view.Member(id); m != nil && m.Assigned == plan.Version {
				r.Moved = true // a resumed or reverted rollout's: what it reported so far
				if st := m.Status; st != nil && st.Version == plan.Version {
					r.Status = st
				}
			}
			rep.Instances = append(rep.Instances, r)
		}
	}
	if plan.State == PlanReverting {
		if err := f.revert(ctx, plan, rep, opt.Timeout); err != nil {
			return rep, err
		}
		rep.Outcome = RolloutReverted
		return rep, f.release(ctx, plan)
	}
	for i := plan.Done; i < len(plan.Batches); i++ {
		ok, err := f.batch(ctx, plan, i, rep, opt.Timeout)
		if err != nil {
			return rep, err
		}
		if !ok {
			rep.Halted = i + 1
			plan.State = PlanReverting
			if err := f.putPlan(ctx, plan); err != nil {
				return rep, err
			}
			if err := f.revert(ctx, plan, rep, opt.Timeout); err != nil {
				return rep, err
			}
			rep.Outcome = RolloutHalted
			return rep, f.release(ctx, plan)
		}
		plan.Done = i + 1
		if err := f.putPlan(ctx, plan); err != nil {
			return rep, err
		}
	}
	rep.Outcome = RolloutCommitted
	return rep, f.release(ctx, plan)
}

// newPlan stores the table, plans the batches and takes the rollout key.
func (f *Fleet) newPlan(ctx context.Context, view *View, table []byte, opt RolloutOptions) (*Plan, error) {
	if len(table) > MaxTableBytes {
		return nil, fmt.Errorf("the table is %d bytes, over the limit of %d", len(table), MaxTableBytes)
	}
	ids := slices.Clone(opt.Instances)
	if len(ids) == 0 {
		for _, m := range view.Members {
			ids = append(ids, m.Instance)
		}
	}
	if len(ids) == 0 {
		return nil, ErrNoInstances
	}
	for _, id := range ids {
		if err := CheckName(id); err != nil {
			return nil, fmt.Errorf("instance %q: %w", id, err)
		}
	}
	now := time.Now().UTC()
	p := &Plan{Version: NewVersion(table, now), Holder: opt.Holder, Started: now, Updated: now,
		Previous: map[string]string{}, State: PlanRunning}
	for _, id := range ids {
		if m := view.Member(id); m != nil {
			p.Previous[id] = m.Assigned
		} else {
			p.Previous[id] = ""
		}
	}
	n := opt.Batch
	if n <= 0 {
		p.Batches = append(p.Batches, ids[:1])
		if len(ids) > 1 {
			p.Batches = append(p.Batches, ids[1:])
		}
	} else {
		for b := range slices.Chunk(ids, n) {
			p.Batches = append(p.Batches, b)
		}
	}
	b, err := json.Marshal(p)
	if err != nil {
		return nil, err
	}
	tk := f.keys.Table(p.Version)
	resp, err := f.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(f.keys.Rollout()), "=", 0),
			clientv3.Compare(clientv3.CreateRevision(tk), "=", 0)).
		Then(clientv3.OpPut(tk, string(table)), clientv3.OpPut(f.keys.Rollout(), string(b))).
		Else(clientv3.OpGet(f.keys.Rollout())).
		Commit()
	if err != nil {
		return nil, fmt.Errorf("storing %s: %w", tk, err)
	}
	if !resp.Succeeded {
		if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
			var other Plan
			if json.Unmarshal(kvs[0].Value, &other) == nil {
				return nil, &HeldError{&other}
			}
			return nil, fmt.Errorf("%s holds a value that does not parse: delete it if no rollout runs", f.keys.Rollout())
		}
		return nil, fmt.Errorf("%s exists already (a version of the same name and time): try again", tk)
	}
	p.rev = resp.Header.Revision
	return p, nil
}

// errLost: the rollout key changed under us.
var errLost = errors.New("the rollout key changed under this rollout (another operator took it over, or deleted it): stopping here")

// putPlan writes the plan if the rollout key is still ours.
func (f *Fleet) putPlan(ctx context.Context, p *Plan) error {
	p.Updated = time.Now().UTC()
	b, err := json.Marshal(p)
	if err != nil {
		return err
	}
	resp, err := f.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(f.keys.Rollout()), "=", p.rev)).
		Then(clientv3.OpPut(f.keys.Rollout(), string(b))).Commit()
	if err != nil {
		return fmt.Errorf("put %s: %w", f.keys.Rollout(), err)
	}
	if !resp.Succeeded {
		return errLost
	}
	p.rev = resp.Header.Revision
	return nil
}

// release deletes the rollout key if it is still ours.
func (f *Fleet) release(ctx context.Context, p *Plan) error {
	resp, err := f.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(f.keys.Rollout()), "=", p.rev)).
		Then(clientv3.OpDelete(f.keys.Rollout())).Commit()
	if err != nil {
		return fmt.Errorf("delete %s: %w", f.keys.Rollout(), err)
	}
	if !resp.Succeeded {
		return errLost
	}
	return nil
}

// txnChunk bounds the instances of one assignment transaction: etcd
// refuses a transaction of more than --max-txn-ops operations a side
// (default 128), and one compare is the rollout key's.
const txnChunk = 100

// assign writes want[id] (delete when "") for ids, one transaction per
// txnChunk of them, each guarded by the rollout key's revision and its
// assignments' (as read now: a guard against a writer between this read
// and the write). A batch over several transactions is not atomic, and
// need not be: an operator lost between two leaves its moved instances
// assigned the plan's version, which --resume and --revert see.
func (f *Fleet) assign(ctx context.Context, p *Plan, ids []string, want func(id string) string) error {
	for chunk := range slices.Chunk(ids, txnChunk) {
		if err := f.assignTxn(ctx, p, chunk, want); err != nil {
			return err
		}
	}
	return nil
}

// assignTxn is one transaction of assign.
func (f *Fleet) assignTxn(ctx context.Context, p *Plan, ids []string, want func(id string) string) error {
	ops := make([]clientv3.Op, 0, len(ids))
	for _, id := range ids {
		ops = append(ops, clientv3.OpGet(f.keys.Assign(id)))
	}
	cur, err := f.cli.Txn(ctx).Then(ops...).Commit()
	if err != nil {
		return fmt.Errorf("reading the assignments: %w", err)
	}
	cmps := []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(f.keys.Rollout()), "=", p.rev)}
	ops = ops[:0]
	for i, id := range ids {
		rev := int64(0)
		if kvs := cur.Responses[i].GetResponseRange().Kvs; len(kvs) > 0 {
			rev = kvs[0].ModRevision
		}
		k := f.keys.Assign(id)
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(k), "=", rev))
		if v := want(id); v != "" {
			ops = append(ops, clientv3.OpPut(k, v))
		} else {
			ops = append(ops, clientv3.OpDelete(k))
		}
	}
	resp, err := f.cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
	if err != nil {
		return fmt.Errorf("writing the assignments: %w", err)
	}
	if !resp.Succeeded {
		return errLost
	}
	return nil
}

// batch assigns batch i and waits for it. It returns whether every
// instance of it committed.
func (f *Fleet) batch(ctx context.Context, p *Plan, i int, rep *Report, timeout time.Duration) (bool, error) {
	ids := p.Batches[i]
	if err := f.assign(ctx, p, ids, func(string) string { return p.Version }); err != nil {
		return false, err
	}
	for j := range rep.Instances {
		if rep.Instances[j].Batch == i+1 {
			rep.Instances[j].Moved = true
		}
	}
	got, err := f.wait(ctx, ids, p.Version, timeout, true)
	if err != nil {
		return false, err
	}
	ok := true
	for j := range rep.Instances {
		r := &rep.Instances[j]
		if r.Batch != i+1 {
			continue
		}
		r.Status = got[r.Instance]
		ok = ok && r.Status != nil && r.Status.Outcome == OutcomeCommitted
	}
	return ok, nil
}

// revert assigns every moved instance its previous version (removes its
// assignment when it had none) and waits for those with one to report it.
func (f *Fleet) revert(ctx context.Context, p *Plan, rep *Report, timeout time.Duration) error {
	var ids, waitFor []string
	for j := range rep.Instances {
		if r := &rep.Instances[j]; r.Moved {
			r.Reverted = true
			ids = append(ids, r.Instance)
			if r.Previous != "" {
				waitFor = append(waitFor, r.Instance)
			}
		}
	}
	if len(ids) == 0 {
		return nil
	}
	if err := f.assign(ctx, p, ids, func(id string) string { return p.Previous[id] }); err != nil {
		return err
	}
	got := map[string]*Status{}
	for _, id := range waitFor { // each its own version: one wait per version
		g, err := f.wait(ctx, []string{id}, p.Previous[id], timeout, false)
		if err != nil {
			return err
		}
		got[id] = g[id]
	}
	for j := range rep.Instances {
		if r := &rep.Instances[j]; r.Reverted {
			r.RevertStatus = got[r.Instance]
		}
	}
	return nil
}

// wait reads the statuses of ids, then watches them, until each reports version — committed, or, with final,
// any outcome — or the timeout passes, or, with final, the first instance
// reports something else than committed (the batch has failed: no need to
// wait for the rest). It returns the reports by ID (absent: none).
func (f *Fleet) wait(ctx context.Context, ids []string, version string, timeout time.Duration, final bool) (map[string]*Status, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	want := map[string]bool{}
	for _, id := range ids {
		want[id] = true
	}
	got := map[string]*Status{}
	// take records one status value; it returns true when waiting is over.
	take := func(key string, val []byte) bool {
		kind, id := f.keys.Parse(key)
		if kind != KeyStatus || !want[id] {
			return false
		}
		var st Status
		if json.Unmarshal(val, &st) != nil || st.Version != version {
			return false
		}
		if st.Outcome != OutcomeCommitted && !final {
			return false
		}
		got[id] = &st
		return len(got) == len(want) || (final && st.Outcome != OutcomeCommitted)
	}
	resp, err := f.cli.Get(ctx, f.keys.StatusDir(), clientv3.WithPrefix(), clientv3.WithRev(0))
	if err != nil {
		return nil, fmt.Errorf("get %s: %w", f.keys.StatusDir(), err)
	}
	for _, kv := range resp.Kvs {
		if take(string(kv.Key), kv.Value) {
			return got, nil
		}
	}
	wch := f.cli.Watch(clientv3.WithRequireLeader(ctx), f.keys.StatusDir(), clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
	for w := range wch {
		if err := w.Err(); err != nil {
			if ctx.Err() != nil {
				break
			}
			return nil, fmt.Errorf("watch %s: %w", f.keys.StatusDir(), err)
		}
		for _, ev := range w.Events {
			if ev.Type == clientv3.EventTypePut && take(string(ev.Kv.Key), ev.Kv.Value) {
				return got, nil
			}
		}
	}
	return got, nil
}
