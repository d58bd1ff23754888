// Package daemon owns the sluice daemon's life, apart from the command line
// and the output, which stay in cmd/sluice.
//
// Start brings the parts up in order: the engine's loops, its pifs, the
// loops running, the control socket and the metrics address bound (not
// served) and the store's settings read, the configuration's table as
// generation 1 (through the same apply, commit and rollback as the
// control socket), the control socket served, the store's loop started,
// the metrics endpoint served. A step that fails undoes the steps before
// it, so a daemon that did not start holds no port and no socket; and
// every step that can fail comes before the table, so no rule's port
// accepts a connection a failed start then drops: what follows the table
// cannot fail (a successor's metrics, bound once its predecessor let go,
// apart).
//
// Run serves until the first signal (SIGINT or SIGTERM, or a value on
// Options.Signals), then stops; Stop stops at once. Stopping goes in its
// own order, not the reverse of the start's:
//
//  1. the control socket goes read-only (ctl.Server.Drain): no table change
//     during the drain, an open transaction rolls back through the engine
//     while it still runs, and status, sessions, stats, list and watch are
//     served on, so an operator sees what holds the stop up;
//  2. the engine drains: no new connection, live sessions may finish until
//     the drain deadline (Config.Drain; a second signal ends it at once),
//     then the rest are closed and the loops stop;
//  3. the control socket closes;
//  4. the metrics endpoint closes last: scrapes go on during the drain.
//
// After an upgrade the control socket is the successor's: the old
// process's closes first, its connections ended at once.
//
// With a state dir (Options.StateDir, package state) every commit — the
// initial table, each control transaction — is written there before it is
// acknowledged, and the start decides between the saved table and the
// file's rules (state.Decide; see start.go).
//
// SIGHUP (when the daemon catches its own signals) reloads the
// configuration file: Reload, reload.go.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/ctl"
	"github.com/sluice-proxy/sluice/engine"
	"github.com/sluice-proxy/sluice/metrics"
	"github.com/sluice-proxy/sluice/rules"
	"github.com/sluice-proxy/sluice/state"
)

// The engine is what the control socket drives.
var (
	_ ctl.Engine      = (*engine.Engine)(nil)
	_ ctl.TxnObserver = (*engine.Engine)(nil)
)

// Phase is one step of the daemon's life, in the order Start and then Stop
// take them. A phase whose part is not configured (no control socket, no
// metrics endpoint) is skipped.
type Phase uint8

const (
	PhaseEngine       Phase = iota + 1 // the engine's loops created
	PhasePifs                          // every pif of the configuration added
	PhaseLoops                         // the loops running; from here on the signals are caught
	PhaseBind                          // the control socket and the metrics address bound, not served, the store's loop made: what can fail fails before anything accepts
	PhaseTable                         // the first table applied and committed: the saved one or the configuration's (start.go)
	PhaseCtl                           // the control socket served (then the store's loop started)
	PhaseMetrics                       // the metrics endpoint served
	PhaseCtlReadOnly                   // the control socket read-only, first: no table change during the drain, the reads served on
	PhaseDrain                         // the engine drained, its remaining sessions closed, its loops stopped
	PhaseCloseCtl                      // the control socket closed (first, after an upgrade: the socket is the successor's)
	PhaseCloseMetrics                  // the metrics endpoint closed, last: scrapes go on during the drain
	phaseEnd                           // past the last: the names test stops here
)

var phaseText = [...]string{"", "engine", "pifs", "loops", "bind", "table", "ctl", "metrics", "ctl-read-only", "drain", "close-ctl", "close-metrics"}

func (p Phase) String() string {
	if int(p) < len(phaseText) && p != 0 {
		return phaseText[p]
	}
	return fmt.Sprintf("phase-%d", p)
}

// Options set up a daemon.
type Options struct {
	Config  *config.Config // validated; the daemon reads it and never changes it
	CtlPath string         // the control socket; "" = none
	Log     *zap.Logger    // nil: no logs
	Version string         // the software's version, on the status page
	// StateDir keeps the committed table across restarts ("" = nothing
	// kept); Fresh starts from the configuration's rules whatever it holds.
	StateDir string
	Fresh    bool
	// Signals stops the daemon (Run): the first value starts the drain, a
	// second one ends it at once. nil: SIGINT and SIGTERM, caught from
	// PhaseLoops on.
	Signals <-chan os.Signal
	// Reload reads the configuration file again, the command line's flags
	// applied over it, for SIGHUP and `sluice ctl reload`; nil: no file to
	// reload. Level, when set, is the logger's level: a reload changes it.
	Reload func() (*config.Config, error)
	Level  *zap.AtomicLevel
	// Environ lets the environment in: the notify protocol to systemd
	// ($NOTIFY_SOCKET), its sockets (socket activation, $LISTEN_FDS), and
	// the sockets of a predecessor when this process is an upgrade's
	// successor (systemd.go, upgrade.go). Executable and Args are what
	// `sluice ctl upgrade` starts by default: the path this process was
	// started from ("" = os.Executable at start) and its arguments.
	Environ    bool
	Executable string
	Args       []string

	// trace, for tests, is called before each phase begins, on the
	// goroutine that runs it.
	trace func(*Daemon, Phase)
}

// Daemon is a started daemon. Its parts are set once Start returns and
// never change; Stop, Run and the accessors may be called from any
// goroutine.
type Daemon struct {
	opt     Options
	c       *config.Config
	log     *zap.Logger
	e       *engine.Engine  // nil until PhaseEngine succeeded
	ctl     *ctl.Server     // nil without a control socket
	metrics *metrics.Server // nil without metrics.listen
	// Bound in PhaseBind, served after the table (nil once served, or
	// when not configured): nothing accepts before every bind succeeded.
	ctlBound   *ctl.Bound
	metricsLn  net.Listener
	metricsReg *prometheus.Registry // made in PhaseBind; nil without metrics.listen
	store      *storeLoop           // nil without store.etcd (store.go)
	sig        <-chan os.Signal
	hup        chan os.Signal // SIGHUP: a reload; nil when Options.Signals was given
	unwatch    func()         // stops catching the signals; nil when Options.Signals was given
	bootID     uint64         // this run's id, in the control socket's hello
	started    time.Time      // when Start began, in ctl status

	st     *state.Dir    // nil without a state dir
	recMu  sync.Mutex    // orders the commits written to st, and guards digest
	digest string        // of the configuration's rules the active table grew from
	drain  time.Duration // the drain deadline: the file's, as last reloaded

	notify    *notifier    // systemd's notify socket; nil or disabled: none
	ready     atomic.Bool  // READY=1 was sent: a stop says STOPPING=1
	activated []activated  // sockets from systemd (socket activation)
	actCtl    *os.File     // of those, the control socket; nil: none
	handed    *handover    // what a predecessor handed this process; nil: not an upgrade's successor
	exe       string       // what an upgrade starts by default
	up        upgradeState // upgrade.go
	upSync    *os.File     // after an upgrade: the successor's sync socket, open until exit

	once sync.Once
	done chan struct{} // closed when Stop has ended
	err  error         // Stop's result, set before done closes
}

// Start starts a daemon on opt.Config, part by part (see the package
// comment). On an error every part it had started is stopped again and the
// error names the step: "starting the engine: …", "FILE:LINE: pif NAME
// (netns PATH): …", one line "FILE:LINE: LISTEN: port N: …" per port the
// table could not bind, "control socket: …", "metrics listen ADDR: …",
// "FILE:LINE: store.etcd: …".
func Start(opt Options) (*Daemon, error) {
	if opt.Config == nil {
		return nil, errors.New("daemon: no configuration")
	}
	d := &Daemon{opt: opt, c: opt.Config, log: opt.Log, sig: opt.Signals, done: make(chan struct{}), bootID: newBootID(), started: time.Now(),
		drain: opt.Config.Drain, exe: opt.Executable, up: upgradeState{upgraded: make(chan struct{})}}
	if d.log == nil {
		d.log = zap.NewNop()
	}
	if d.exe == "" {
		d.exe, _ = os.Executable()
	}
	if err := d.start(); err != nil {
		// As the daemon failed to start, no drain: whatever started stops.
		_ = d.halt(context.Background(), false)
		d.stopSignals()
		d.notify.close()
		return nil, err
	}
	d.serving()
	return d, nil
}

// serving is the end of a start: a successor takes over from its
// predecessor (upgrade.go), then systemd hears READY=1, and the watchdog
// starts when systemd asked for one.
func (d *Daemon) serving() {
	if d.handed != nil {
		d.takeOver()
	}
	d.notify.send(notifyReady)
	d.ready.Store(d.notify.enabled())
	if every := watchdogInterval(); every > 0 && d.notify.enabled() {
		go d.notify.watchdog(every, d.done)
	}
}

// environ reads what the environment hands the daemon (Options.Environ):
// the notify socket, a predecessor's hand-over, systemd's sockets.
func (d *Daemon) environ() error {
	d.notify = newNotifier(d.log)
	h, err := readHandover()
	if err != nil {
		return err
	}
	d.handed = h
	if d.activated, err = listenFDs(); err != nil {
		return err
	}
	return nil
}

func (d *Daemon) start() (err error) {
	c, log := d.c, d.log
	defer func() {
		if err != nil { // halt stops what was served; this, what was only bound
			d.closeBound()
		}
	}()
	if d.opt.Environ {
		if err := d.environ(); err != nil {
			return err
		}
	}
	d.phase(PhaseEngine)
	e, err := engine.New(engine.Config{Loops: c.Loops, BusyPoll: c.BusyPoll, Log: log})
	if err != nil {
		return fmt.Errorf("starting the engine: %w", err)
	}
	d.e = e
	if err := d.offerSockets(); err != nil {
		return err
	}
	d.phase(PhasePifs)
	for _, p := range c.Pifs {
		if err := e.AddPif(p.Name, p.Netns); err != nil {
			return fmt.Errorf("%spif %s (netns %s): %w", at(c, p.Line), p.Name, p.Netns, err)
		}
		log.Info("pif added", zap.String("pif", p.Name), zap.String("netns", p.Netns))
	}
	d.phase(PhaseLoops)
	e.Start()
	if d.sig == nil {
		sig, hup := make(chan os.Signal, 2), make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
		signal.Notify(hup, syscall.SIGHUP)
		d.sig, d.hup, d.unwatch = sig, hup, func() { signal.Stop(sig); signal.Stop(hup) }
	}
	if err := d.bind(); err != nil {
		return err
	}
	d.phase(PhaseTable)
	if d.handed != nil {
		err = d.handedTable()
	} else {
		err = d.startTable()
	}
	if err != nil {
		return err
	}
	for _, ln := range e.Listeners() {
		log.Info("listening", zap.Stringer("rule", ln.Rule()), zap.Stringer("addr", ln.Addr()))
	}
	if len(c.Rules) == 0 {
		log.Warn("the configuration has no rules: nothing to forward")
	}
	if d.ctlBound != nil {
		// A successor's socket is held: no table change until its
		// predecessor stopped.
		d.phase(PhaseCtl)
		held := d.handed != nil && d.handed.ctl != nil
		s, release, err := d.ctlBound.ServeFile(context.Background(), ctlEngine{e, d}, log, held)
		d.ctlBound = nil
		if err != nil {
			return fmt.Errorf("control socket: %w", err)
		}
		d.ctl = s
		if held {
			d.handed.release = release
		}
	}
	d.startStore()
	if d.handed != nil {
		return nil // metrics once the predecessor closed its own (takeOver)
	}
	return d.startMetricsPhase()
}

// bind is PhaseBind: every start-up step that can fail and does not need
// the table, taken before it so that its failure comes before any rule's
// port accepts: the control socket bound at Options.CtlPath, or the one a
// predecessor or systemd handed over checked (not served); the metrics
// address bound (not for a successor: its predecessor holds it until
// takeOver) and its registry made; the store's instance loop made, not run
// (its settings read: store.go).
func (d *Daemon) bind() error {
	d.phase(PhaseBind)
	switch {
	case d.handed != nil && d.handed.ctl != nil:
		b, err := ctl.BindFile(d.handed.ctl)
		d.handed.ctl.Close()
		if err != nil {
			return fmt.Errorf("control socket: %w", err)
		}
		d.ctlBound = b
	case d.actCtl != nil:
		b, err := ctl.BindFile(d.actCtl)
		d.actCtl.Close()
		if err != nil {
			return fmt.Errorf("control socket (socket activation): %w", err)
		}
		d.ctlBound = b
	case d.opt.CtlPath != "":
		b, err := ctl.Bind(d.opt.CtlPath)
		if err != nil {
			if errors.Is(err, ctl.ErrInUse) {
				return fmt.Errorf("control socket: %w (set ctl.socket, or stop the daemon that holds it)", err)
			}
			return fmt.Errorf("control socket: %w", err)
		}
		d.ctlBound = b
	}
	if d.c.Metrics.Listen.IsValid() {
		reg, err := metrics.NewRegistry(d.e.Stats)
		if err != nil {
			return err
		}
		d.metricsReg = reg
		if d.handed == nil {
			ln, err := metrics.Listen(d.c.Metrics.Listen)
			if err != nil {
				return err
			}
			d.metricsLn = ln
		}
	}
	return d.prepareStore()
}

// closeBound closes the sockets bind bound and start did not serve.
func (d *Daemon) closeBound() {
	if d.ctlBound != nil {
		d.ctlBound.Close()
		d.ctlBound = nil
	}
	if d.metricsLn != nil {
		d.metricsLn.Close()
		d.metricsLn = nil
	}
}

// startMetricsPhase serves the metrics endpoint, if configured: on the
// listener bind bound, else (a successor's, after takeOver) on one bound
// now.
func (d *Daemon) startMetricsPhase() error {
	c := d.c
	if !c.Metrics.Listen.IsValid() {
		return nil
	}
	d.phase(PhaseMetrics)
	ln := d.metricsLn
	d.metricsLn = nil
	if ln == nil {
		var err error
		if ln, err = metrics.Listen(c.Metrics.Listen); err != nil {
			return err
		}
	}
	m := startMetrics(c, d.e, d.log, d.opt.Version, ln, d.metricsReg)
	d.metrics = m
	d.log.Info("metrics listening", zap.String("url", "http://"+m.Addr().String()+"/metrics"))
	return nil
}

// closeMetrics closes the metrics endpoint now (an upgrade: the successor
// serves it).
func (d *Daemon) closeMetrics() {
	if d.metrics == nil {
		return
	}
	mctx, mcancel := context.WithTimeout(context.Background(), time.Second)
	defer mcancel()
	if err := d.metrics.Close(mctx); err != nil {
		d.log.Warn("metrics server close", zap.Error(err))
	}
	d.metrics = nil
}

// phase reports p to the test's trace.
func (d *Daemon) phase(p Phase) {
	if d.opt.trace != nil {
		d.opt.trace(d, p)
	}
}

// Engine is the daemon's engine.
func (d *Daemon) Engine() *engine.Engine { return d.e }

// Ctl is the control socket's server; nil without one.
func (d *Daemon) Ctl() *ctl.Server { return d.ctl }

// Metrics is the metrics endpoint; nil without metrics.listen.
func (d *Daemon) Metrics() *metrics.Server { return d.metrics }

// Log is the daemon's logger.
func (d *Daemon) Log() *zap.Logger { return d.log }

// Run serves until the first signal, then stops as Stop does, the drain
// ended at once by a second signal. It returns Stop's result; when Stop is
// called elsewhere first, Run returns once that Stop has ended.
func (d *Daemon) Run() error {
	for {
		select {
		case <-d.hup:
			if d.opt.Reload == nil {
				d.log.Warn("SIGHUP: no configuration file to reload; ignored")
				continue
			}
			d.log.Info("SIGHUP: reloading the configuration file")
			// Reload logs its outcome; the daemon serves on whatever it is.
			_, _ = d.Reload(state.Self("reload (SIGHUP)"))
			continue
		case s := <-d.sig:
			return d.serveStop(s)
		case <-d.up.upgraded:
			// The successor serves: drain, exit; a signal ends the drain.
			return d.serveStop(nil)
		case <-d.done:
			return d.err
		}
	}
}

// serveStop is Run's stop on signal s, a second signal ending the drain
// at once.
func (d *Daemon) serveStop(s os.Signal) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { // a second signal stops at once
		select {
		case <-d.sig:
			cancel()
		case <-ctx.Done():
		}
	}()
	return d.stop(ctx, s)
}

// Stop stops the daemon in order (see the package comment). Live sessions
// may finish until the drain deadline (Config.Drain) or until ctx ends,
// whichever comes first; then the rest are closed, with a warning. It
// returns nil once stopped; later calls wait for the first one and return
// what it did.
func (d *Daemon) Stop(ctx context.Context) error { return d.stop(ctx, nil) }

// stop is Stop, sig the signal that asked for it (nil: none).
func (d *Daemon) stop(ctx context.Context, sig os.Signal) error {
	d.once.Do(func() {
		fields := make([]zap.Field, 0, 3)
		if sig != nil {
			fields = append(fields, zap.Stringer("signal", sig))
		}
		d.recMu.Lock()
		drain := d.drain
		d.recMu.Unlock()
		fields = append(fields, zap.Int64("sessions", d.e.Stats().Sessions), zap.Duration("deadline", drain))
		upgraded := d.up.isDone()
		if upgraded {
			d.log.Info("upgraded: the successor serves; draining live sessions", fields...)
		} else {
			if d.ready.Load() {
				d.notify.send(notifyStopping)
			}
			d.log.Info("stopping: no new connections; draining live sessions", fields...)
		}
		ctx, cancel := context.WithTimeout(ctx, drain)
		defer cancel()
		if upgraded {
			d.drainHanded(ctx)
		}
		err := d.halt(ctx, !upgraded)
		if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
			d.log.Warn("drain deadline passed; remaining sessions closed")
			err = nil
		}
		d.log.Info("stopped")
		d.stopSignals()
		d.notify.close()
		if d.upSync != nil {
			d.upSync.Close() // the successor's sign that we are gone
		}
		d.err = err
		close(d.done)
	})
	<-d.done
	return d.err
}

// halt stops the parts that started, in the stop order: the control
// socket read-only (readOnly; else closed at once), the engine (its drain
// bounded by ctx), the control socket closed, the metrics endpoint. It
// returns the engine's Shutdown error: ctx's when sessions were cut.
func (d *Daemon) halt(ctx context.Context, readOnly bool) error {
	d.stopStore()
	if d.ctl != nil && readOnly {
		d.phase(PhaseCtlReadOnly)
		deadline, ok := ctx.Deadline()
		if !ok {
			deadline = time.Now()
		}
		d.ctl.Drain(deadline)
	} else if d.ctl != nil {
		d.phase(PhaseCloseCtl)
		_ = d.ctl.Close()
	}
	var err error
	if d.e != nil {
		d.phase(PhaseDrain)
		err = d.e.Shutdown(ctx)
	}
	if d.ctl != nil && readOnly {
		d.phase(PhaseCloseCtl)
		_ = d.ctl.Close()
	}
	if d.metrics != nil {
		d.phase(PhaseCloseMetrics)
		// Scrapes went on during the drain; the last ones may finish.
		mctx, mcancel := context.WithTimeout(context.Background(), time.Second)
		if merr := d.metrics.Close(mctx); merr != nil {
			d.log.Warn("metrics server close", zap.Error(merr))
		}
		mcancel()
	}
	return err
}

// stopSignals stops catching the signals the daemon caught itself.
func (d *Daemon) stopSignals() {
	if d.unwatch != nil {
		d.unwatch()
	}
}

// at names where a rule or pif of c comes from: "FILE:LINE: ", or "" for
// one given on the command line.
func at(c *config.Config, line int) string {
	if c.File == "" {
		return ""
	}
	return fmt.Sprintf("%s:%d: ", c.File, line)
}

// applyTable installs rs as the first table, through the same
// transaction, and the same decision (ctl.Decide, never forced), as the
// control socket's: every port is bound or the daemon does not start, and
// each failure names its rule (where(i), then "tcp 0.0.0.0:8080: port 8080:
// address already in use"); the failed ports of weak rules are logged, not
// fatal. It returns the committed generation.
func applyTable(e *engine.Engine, rs []*rules.Rule, where func(i int) string) (uint64, error) {
	sum, err := e.Apply(rs)
	if err != nil {
		return 0, err
	}
	var msgs []string
	for i, res := range sum.Rules {
		for _, f := range res.Failed {
			msgs = append(msgs, fmt.Sprintf("%s%s: port %d: %s", where(i), res.Listen, f.Port, f.Msg))
		}
	}
	if !ctl.Decide(sum.OK(), false).Commits() {
		if _, err := e.Rollback(); err != nil {
			return 0, err
		}
		return 0, errors.New(strings.Join(msgs, "\n"))
	}
	gen, err := e.Commit()
	if err != nil {
		return 0, err
	}
	for _, m := range msgs {
		e.Log().Warn("weak rule: port not bound", zap.String("failure", m))
	}
	return gen, nil
}

// startMetrics serves /metrics on ln (which it owns) from reg (bind made it
// from e's counters) and the status page (the server's Close stops the
// page's sampler).
func startMetrics(c *config.Config, e *engine.Engine, log *zap.Logger, version string, ln net.Listener, reg *prometheus.Registry) *metrics.Server {
	page := metrics.NewStatusPage(e, metrics.StatusInfo{Version: version, Config: c.File})
	return metrics.ServeOn(ln, reg, page, log)
}
