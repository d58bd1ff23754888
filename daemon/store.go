package daemon

// This file wires the fleet's store (store/etcd): the instance loop, made
// (its settings read) before the table, started once the control socket
// serves, stopped first at the stop; an
// assignment applied through transact, the reload's and ctl apply's
// transaction.

import (
	"context"
	"crypto/tls"
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
	id     string             // the instance's name
	cancel context.CancelFunc // nil until startStore ran it
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

// prepareStore makes the instance loop when store.etcd is set, without
// starting it: it is PhaseBind's, so that a setting that cannot work (the
// instance's name, the password file unreadable, the TLS files) fails the
// start before any rule's port accepts. Nothing here waits for etcd.
func (d *Daemon) prepareStore() error {
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
	pw, tc, err := storeFiles(sc)
	if err != nil {
		return fmt.Errorf("%sstore.etcd: %w", at(d.c, sc.Line), err)
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
		return fmt.Errorf("%s%w", at(d.c, sc.Line), err)
	}
	d.store = &storeLoop{in: in, id: id}
	return nil
}

// storeFiles reads what store.etcd names on disk, as the instance uses it:
// the password (password-file, else $SLUICE_ETCD_PASSWORD) and the TLS
// settings (ca, cert and key; nil for plain http). The error names the
// file and what is wrong with it.
func storeFiles(sc *config.Etcd) (string, *tls.Config, error) {
	pw, err := etcd.ReadPassword(sc.PasswordFile)
	if err != nil {
		return "", nil, err
	}
	tc, err := etcd.TLSConfig(sc.CA, sc.Cert, sc.Key)
	if err != nil {
		return "", nil, err
	}
	return pw, tc, nil
}

// CheckStore reads the files of store.etcd sc as run does, without
// connecting (sluice check): nil when they load. The error is run's without
// its FILE:LINE: (sc.Line is that line).
func CheckStore(sc *config.Etcd) error {
	_, _, err := storeFiles(sc)
	return err
}

// startStore starts the loop prepareStore made, once the control socket
// serves. It cannot fail: it never waits for etcd.
func (d *Daemon) startStore() {
	s := d.store
	if s == nil {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	s.wg.Add(1)
	go func() { defer s.wg.Done(); s.in.Run(ctx) }()
	in := s.in
	engine.SetStoreSource(func() engine.StoreStats {
		st := in.Stats()
		return engine.StoreStats{Enabled: true, Connected: st.Connected, Version: st.Version, LastApply: st.LastApply, Errors: st.Errors}
	})
	sc := d.c.Store.Etcd
	d.log.Info("following the fleet's store", zap.Strings("etcd", sc.Endpoints), zap.String("prefix", sc.Prefix), zap.String("instance", s.id))
}

// stopStore stops the instance loop and waits for it (a transaction it
// runs ends first): no assignment is applied during the drain.
func (d *Daemon) stopStore() {
	if d.store == nil || d.store.cancel == nil { // none, or made and never run
		return
	}
	d.store.cancel()
	d.store.wg.Wait()
	engine.SetStoreSource(nil)
}
