package daemon

// This file wires the fleet's store (store/etcd): the instance loop,
// started once the control socket serves, stopped first at the stop; an
// assignment applied through transact, the reload's and ctl apply's
// transaction.

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"

	"go.uber.org/zap"

	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/ctl"
	"github.com/sluice-proxy/sluice/engine"
	"github.com/sluice-proxy/sluice/rules"
	"github.com/sluice-proxy/sluice/state"
	"github.com/sluice-proxy/sluice/store/etcd"
)

// storeLoop is the running instance loop.
type storeLoop struct {
	in     *etcd.Instance
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

var _ etcd.Applier = storeApplier{}

// storeApplier is the daemon as the store's instance loop drives it.
type storeApplier struct{ d *Daemon }

func (a storeApplier) Active() ([]string, uint64) {
	return state.Lines(a.d.e.Rules()), a.d.e.Generation()
}

// ApplyTable checks the table as a reload checks its file (pifs the daemon
// runs, names that resolve: invalid at its line), then runs transact.
func (a storeApplier) ApplyTable(file string, entries []rules.Entry) etcd.Result {
	d := a.d
	gen := d.e.Generation()
	c := &config.Config{File: file, Rules: entries}
	err := d.checkPifs(c)
	if err == nil {
		err = resolveNames(c, d.e)
	}
	if err != nil {
		return etcd.Result{Outcome: etcd.OutcomeInvalid, Generation: gen, Error: errText(err)}
	}
	res, err := d.transact(c.RuleList(), state.Self("store "+file), d.log, "store", "")
	switch {
	case err != nil && ctl.CodeOf(err) == ctl.CodeBusy:
		return etcd.Result{Busy: true}
	case err != nil:
		return etcd.Result{Outcome: etcd.OutcomeRolledBack, Generation: d.e.Generation(), Error: err.Error()}
	}
	out := etcd.Result{Outcome: etcd.OutcomeCommitted, Generation: res.Generation, Verdict: "good", Summary: &etcd.Summary{}}
	if s := res.Summary; s != nil {
		out.Summary = &etcd.Summary{Kept: s.Kept, Added: s.Added, Removed: s.Removed, Failed: s.Failures()}
		if !s.OK() {
			out.Verdict = "bad"
		}
	}
	if res.Outcome == ctl.ReloadRolledBack {
		out.Outcome = etcd.OutcomeRolledBack
		out.Error = strings.Join(out.Summary.Failed, "\n")
	}
	return out
}

// startStore starts the instance loop when store.etcd is set. It never
// waits for etcd: a start fails only on settings that cannot work (the
// password file unreadable, the TLS files, the instance's name).
func (d *Daemon) startStore() error {
	sc := d.c.Store.Etcd
	if sc == nil {
		return nil
	}
	id := sc.Instance
	if id == "" {
		h, err := os.Hostname()
		if err != nil {
			return fmt.Errorf("store.etcd.instance: not set, and the host name: %w", err)
		}
		id = h
	}
	pw, err := etcd.ReadPassword(sc.PasswordFile)
	if err != nil {
		return err
	}
	tc, err := etcd.TLSConfig(sc.CA, sc.Cert, sc.Key)
	if err != nil {
		return err
	}
	ttl := sc.TTL
	if ttl == 0 {
		ttl = config.DefaultStoreTTL
	}
	in, err := etcd.NewInstance(etcd.InstanceConfig{
		Conn:   etcd.Conn{Endpoints: sc.Endpoints, TLS: tc, User: sc.User, Password: pw},
		Prefix: sc.Prefix, Instance: id, BootID: d.bootID, TTL: ttl, Log: d.log,
	}, storeApplier{d})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &storeLoop{in: in, cancel: cancel}
	s.wg.Add(1)
	go func() { defer s.wg.Done(); in.Run(ctx) }()
	d.store = s
	engine.SetStoreSource(func() engine.StoreStats {
		st := in.Stats()
		return engine.StoreStats{Enabled: true, Connected: st.Connected, Version: st.Version, LastApply: st.LastApply, Errors: st.Errors}
	})
	d.log.Info("following the fleet's store", zap.Strings("etcd", sc.Endpoints), zap.String("prefix", sc.Prefix), zap.String("instance", id))
	return nil
}

// stopStore stops the instance loop and waits for it (a transaction it
// runs ends first): no assignment is applied during the drain.
func (d *Daemon) stopStore() {
	if d.store == nil {
		return
	}
	d.store.cancel()
	d.store.wg.Wait()
	engine.SetStoreSource(nil)
}
