package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/ctl"
	"github.com/sluice-proxy/sluice/internal/testpeer"
	"github.com/sluice-proxy/sluice/rules"
)

// Every phase has its own name; one without falls back to "phase-N".
func TestPhaseNames(t *testing.T) {
	seen := map[string]bool{}
	for p := PhaseEngine; p < phaseEnd; p++ {
		name := p.String()
		if strings.HasPrefix(name, "phase-") || seen[name] {
			t.Errorf("phase %d: name %q missing or repeated", p, name)
		}
		seen[name] = true
	}
	if got := phaseEnd.String(); got != "phase-"+strconv.Itoa(int(phaseEnd)) {
		t.Errorf("a phase past the names: %q", got)
	}
}

// echoBackend is a TCP echo server on loopback.
func echoBackend(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	testpeer.Accept(ln, func(c net.Conn) {
		defer c.Close()
		_, _ = io.Copy(c, c)
	})
	return ln.Addr().String()
}

// taken is a loopback TCP address something listens on until the test ends.
func taken(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln.Addr().String()
}

// freeAddr is a loopback TCP address nothing listens on (just now).
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// parse is a configuration file "t.yaml" of lines.
func parse(t *testing.T, lines ...string) *config.Config {
	t.Helper()
	c, err := config.Parse("t.yaml", []byte(strings.Join(lines, "\n")+"\n"))
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	return c
}

func observed() (*zap.Logger, *observer.ObservedLogs) {
	core, logs := observer.New(zap.InfoLevel)
	return zap.New(core), logs
}

// session opens a session through the proxy at addr and makes sure it is
// live end to end (one echoed round trip).
func session(t *testing.T, addr netip.AddrPort) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr.String(), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo through the proxy: %q, %v", buf, err)
	}
	_ = c.SetDeadline(time.Time{})
	return c
}

// refused reports whether nothing accepts TCP connections at addr.
func refused(addr netip.AddrPort) bool {
	c, err := net.DialTimeout("tcp", addr.String(), time.Second)
	if err != nil {
		return true
	}
	c.Close()
	return false
}

// parts is what the test sees of a daemon's parts from outside, to check
// that each stop phase begins with the others in the state it promises.
type parts struct {
	d       *Daemon
	ctlPath string         // "" = no control socket
	rule    netip.AddrPort // the first rule's listener
	metrics netip.AddrPort // invalid = no metrics endpoint
}

// state is "ctl=… engine=… table=… metrics=…": "-" for a part not set up.
func (p *parts) state() string {
	ctlState := "-"
	if p.ctlPath != "" {
		ctlState = "closed"
		if c, err := net.DialTimeout("unix", p.ctlPath, time.Second); err == nil {
			c.Close()
			ctlState = "up"
			if st, err := ctlStatus(p.ctlPath); err != nil {
				ctlState = "status: " + err.Error()
			} else if st.State == ctl.StateDraining {
				ctlState = "draining"
			}
		} else if _, err := os.Stat(p.ctlPath); err == nil {
			ctlState = "stale-file"
		}
	}
	// Dialing the rule would start a session; the engine's own word is
	// enough until it drains.
	st := p.d.Engine().Stats()
	engState := "running"
	switch {
	case st.Draining && refused(p.rule):
		engState = "stopped"
	case st.Draining:
		engState = "draining"
	}
	table := fmt.Sprintf("gen%d", st.Table.Generation)
	if st.Table.Pending {
		table += "+pending"
	}
	mState := "-"
	if p.metrics.IsValid() {
		mState = "closed"
		hc := http.Client{Timeout: 2 * time.Second}
		if resp, err := hc.Get("http://" + p.metrics.String() + "/metrics"); err == nil {
			resp.Body.Close()
			mState = fmt.Sprint(resp.StatusCode)
		}
	}
	return fmt.Sprintf("ctl=%s engine=%s table=%s metrics=%s", ctlState, engState, table, mState)
}

// ctlStatus reads the daemon's STATUS on its control socket.
func ctlStatus(path string) (*ctl.Status, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return ctl.QueryStatus(ctx, path, ctl.Options{})
}

// openTxn applies one more rule through the control socket and leaves the
// transaction open (applied, not committed).
func openTxn(t *testing.T, path, backend string) *ctl.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := ctl.Dial(ctx, path, ctl.Options{Name: "daemon test", Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.Hello(ctx, ctl.IntentWrite); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Pifs(ctx); err != nil {
		t.Fatal(err)
	}
	tb, err := c.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	rs, err := tb.Rules()
	if err != nil {
		t.Fatal(err)
	}
	extra, err := rules.Parse("tcp " + freeAddr(t) + " -> " + backend)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Load(ctx, tb.Generation, append(rs, extra)); err != nil {
		t.Fatal(err)
	}
	if sum, err := c.Apply(ctx, time.Minute); err != nil || !sum.OK {
		t.Fatalf("apply: %+v, %v", sum, err)
	}
	return c
}

// Start takes its phases in order, and Stop its own: the control socket
// goes read-only first (an open transaction rolled back, the engine still
// running; STATUS says draining), then the engine drains and stops, the
// control socket closes, the metrics endpoint, which answered all along,
// last. No binary is started: the real parts run on
// loopback.
func TestStartStopOrder(t *testing.T) {
	be := echoBackend(t)
	start := []Phase{PhaseEngine, PhasePifs, PhaseLoops, PhaseBind, PhaseTable}
	for _, tc := range []struct {
		name         string
		ctl, metrics bool
		txn          bool // a transaction is open at Stop
		want         []string
	}{
		{"engine only", false, false, false, []string{
			"drain: ctl=- engine=running table=gen1 metrics=-",
			"stopped: ctl=- engine=stopped table=gen1 metrics=-",
		}},
		{"ctl", true, false, false, []string{
			"ctl", "ctl-read-only: ctl=up engine=running table=gen1 metrics=-",
			"drain: ctl=draining engine=running table=gen1 metrics=-",
			"close-ctl: ctl=draining engine=stopped table=gen1 metrics=-",
			"stopped: ctl=closed engine=stopped table=gen1 metrics=-",
		}},
		{"metrics", false, true, false, []string{
			"metrics", "drain: ctl=- engine=running table=gen1 metrics=200",
			"close-metrics: ctl=- engine=stopped table=gen1 metrics=200",
			"stopped: ctl=- engine=stopped table=gen1 metrics=closed",
		}},
		{"ctl and metrics", true, true, false, []string{
			"ctl", "metrics", "ctl-read-only: ctl=up engine=running table=gen1 metrics=200",
			"drain: ctl=draining engine=running table=gen1 metrics=200",
			"close-ctl: ctl=draining engine=stopped table=gen1 metrics=200",
			"close-metrics: ctl=closed engine=stopped table=gen1 metrics=200",
			"stopped: ctl=closed engine=stopped table=gen1 metrics=closed",
		}},
		{"open transaction rolled back before the drain", true, true, true, []string{
			"ctl", "metrics", "ctl-read-only: ctl=up engine=running table=gen1+pending metrics=200",
			"drain: ctl=draining engine=running table=gen1 metrics=200",
			"close-ctl: ctl=draining engine=stopped table=gen1 metrics=200",
			"close-metrics: ctl=closed engine=stopped table=gen1 metrics=200",
			"stopped: ctl=closed engine=stopped table=gen1 metrics=closed",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lines := []string{"loops: 1", "drain: 5s", "rules:", "  - tcp 127.0.0.1:0 -> " + be}
			if tc.metrics {
				lines = append(lines, "metrics: {listen: 127.0.0.1:0}")
			}
			opt := Options{Config: parse(t, lines...), Signals: make(chan os.Signal)}
			if tc.ctl {
				opt.CtlPath = ctlSocket(t)
			}
			log, logs := observed()
			opt.Log = log
			var got []string
			p := &parts{ctlPath: opt.CtlPath}
			opt.trace = func(d *Daemon, ph Phase) {
				if ph < PhaseCtlReadOnly {
					got = append(got, ph.String())
					return
				}
				p.d = d
				got = append(got, ph.String()+": "+p.state())
			}
			d, err := Start(opt)
			if err != nil {
				t.Fatalf("Start: %v (phases %q)", err, got)
			}
			p.d, p.rule = d, d.Engine().Listeners()[0].Addr()
			if m := d.Metrics(); m != nil {
				p.metrics = m.Addr()
			}
			session(t, p.rule).Close() // it forwards
			if tc.txn {
				openTxn(t, opt.CtlPath, be)
			}
			if err := d.Stop(context.Background()); err != nil {
				t.Fatalf("Stop: %v", err)
			}
			got = append(got, "stopped: "+p.state())
			want := append([]string{}, phaseNames(start)...)
			want = append(want, tc.want...)
			if !slices.Equal(got, want) {
				t.Errorf("phases:\n  %s\nwant\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
			}
			// The messages the integration tests and the users read.
			wantMsgs := []string{"listening", "stopping: no new connections; draining live sessions", "stopped"}
			if tc.metrics {
				wantMsgs = slices.Insert(wantMsgs, 1, "metrics listening")
			}
			if tc.ctl {
				wantMsgs = slices.Insert(wantMsgs, len(wantMsgs)-1, "control socket closed")
			}
			if msgs := messages(logs); !subsequence(msgs, wantMsgs) || msgs[len(msgs)-1] != "stopped" {
				t.Errorf("log messages %q, want %q in order and \"stopped\" last", msgs, wantMsgs)
			}
			if err := d.Stop(context.Background()); err != nil {
				t.Errorf("a second Stop: %v", err)
			}
		})
	}
}

func phaseNames(ps []Phase) []string {
	out := make([]string, len(ps))
	for i, p := range ps {
		out[i] = p.String()
	}
	return out
}

func messages(logs *observer.ObservedLogs) []string {
	var out []string
	for _, e := range logs.All() {
		out = append(out, e.Message)
	}
	return out
}

// subsequence reports whether want appear in got in order.
func subsequence(got, want []string) bool {
	i := 0
	for _, g := range got {
		if i < len(want) && g == want[i] {
			i++
		}
	}
	return i == len(want)
}

// A step of Start that fails undoes the steps before it: the control
// socket is closed and removed, the engine stopped, its ports free.
func TestStartUndo(t *testing.T) {
	be := echoBackend(t)
	rule := "  - tcp 127.0.0.1:0 -> " + be
	for _, tc := range []struct {
		name string
		// setup returns the configuration's lines and what the error says
		setup func(t *testing.T, ctlPath string) (lines []string, err string)
		want  []Phase
	}{
		{"pif", func(t *testing.T, _ string) ([]string, string) {
			return []string{"pifs:", "  - {name: ns1, netns: /nonexistent/netns}", "rules:", rule},
				"t.yaml:3: pif ns1 (netns /nonexistent/netns): "
		}, []Phase{PhaseEngine, PhasePifs, PhaseDrain}},
		{"table", func(t *testing.T, _ string) ([]string, string) {
			addr := taken(t)
			_, port, _ := strings.Cut(addr, ":")
			return []string{"rules:", rule, "  - tcp " + addr + " -> " + be},
				fmt.Sprintf("t.yaml:4: tcp %s: port %s: address already in use", addr, port)
		}, []Phase{PhaseEngine, PhasePifs, PhaseLoops, PhaseBind, PhaseTable, PhaseDrain}},
		{"ctl socket held by another daemon", func(t *testing.T, ctlPath string) ([]string, string) {
			ln, err := net.Listen("unix", ctlPath)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { ln.Close() })
			return []string{"rules:", rule}, "control socket: "
		}, []Phase{PhaseEngine, PhasePifs, PhaseLoops, PhaseBind, PhaseDrain}}, // bound before the table: no rule's port ever accepted
		{"metrics address in use", func(t *testing.T, _ string) ([]string, string) {
			addr := taken(t)
			return []string{"metrics: {listen: " + addr + "}", "rules:", rule}, "metrics listen " + addr + ": "
		}, []Phase{PhaseEngine, PhasePifs, PhaseLoops, PhaseBind, PhaseDrain}}, // as the ctl socket's
		{"store settings", func(t *testing.T, _ string) ([]string, string) {
			ca := filepath.Join(t.TempDir(), "no-such-ca.pem")
			return []string{"store: {etcd: {endpoints: [http://127.0.0.1:1], prefix: /sluice/t, instance: a, ca: " + ca + "}}", "rules:", rule},
				"t.yaml:2: store.etcd: etcd ca: open " + ca + ": no such file or directory"
		}, []Phase{PhaseEngine, PhasePifs, PhaseLoops, PhaseBind, PhaseDrain}}, // read before the table, as the binds
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctlPath := ctlSocket(t)
			lines, wantErr := tc.setup(t, ctlPath)
			var got []Phase
			var ruleAddr netip.AddrPort // the first rule's listener, once bound
			held := socketExists(ctlPath)
			opt := Options{Config: parse(t, append([]string{"loops: 1"}, lines...)...), CtlPath: ctlPath, Signals: make(chan os.Signal),
				trace: func(d *Daemon, p Phase) {
					got = append(got, p)
					if p <= PhaseTable || p >= PhaseCtlReadOnly {
						return
					}
					if lns := d.Engine().Listeners(); len(lns) > 0 {
						ruleAddr = lns[0].Addr()
					}
				}}
			d, err := Start(opt)
			if err == nil {
				d.Stop(context.Background())
				t.Fatal("Start succeeded")
			}
			if d != nil || !strings.Contains(err.Error(), wantErr) {
				t.Errorf("Start = %v, %v; want an error with %q", d, err, wantErr)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("phases %v, want %v", got, tc.want)
			}
			if ruleAddr.IsValid() && !refused(ruleAddr) {
				t.Errorf("the rule's port %s still accepts after a failed start", ruleAddr)
			}
			if socketExists(ctlPath) != held {
				t.Errorf("control socket file exists: %v, want %v (only another daemon's stays)", !held, held)
			}
		})
	}
}

// ctlSocket is a control socket's path in a directory of its own (0700).
func ctlSocket(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "run")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, "ctl.sock")
}

func socketExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// The drain is honoured: a live session holds Stop until it ends, or until
// the drain deadline (or Stop's context) closes it, with a warning.
func TestDrainHonoured(t *testing.T) {
	be := echoBackend(t)
	const never = time.Duration(0)
	for _, tc := range []struct {
		name    string
		drain   string
		session bool
		endAt   time.Duration // the client ends its session after this; never
		ctx     time.Duration // Stop's context ends after this; 0 = never
		min     time.Duration // Stop takes at least this
		max     time.Duration // and at most this
		warn    bool          // "drain deadline passed" logged
	}{
		{"no session", "1m", false, never, 0, 0, 3 * time.Second, false},
		{"session ends before the deadline", "1m", true, 400 * time.Millisecond, 0, 350 * time.Millisecond, 5 * time.Second, false},
		{"deadline closes the session", "600ms", true, never, 0, 550 * time.Millisecond, 5 * time.Second, true},
		{"context closes the session", "1m", true, never, 400 * time.Millisecond, 350 * time.Millisecond, 5 * time.Second, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			log, logs := observed()
			d, err := Start(Options{Config: parse(t, "loops: 1", "drain: "+tc.drain, "rules:", "  - tcp 127.0.0.1:0 -> "+be),
				Log: log, Signals: make(chan os.Signal)})
			if err != nil {
				t.Fatal(err)
			}
			var c net.Conn
			if tc.session {
				c = session(t, d.Engine().Listeners()[0].Addr())
				if tc.endAt != never {
					time.AfterFunc(tc.endAt, func() { c.Close() })
				}
			}
			ctx := context.Background()
			if tc.ctx > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tc.ctx)
				defer cancel()
			}
			begin := time.Now()
			err = d.Stop(ctx)
			took := time.Since(begin)
			if err != nil {
				t.Errorf("Stop: %v", err)
			}
			if took < tc.min || took > tc.max {
				t.Errorf("Stop took %v, want %v to %v", took, tc.min, tc.max)
			}
			if warned := logs.FilterMessage("drain deadline passed; remaining sessions closed").Len() == 1; warned != tc.warn {
				t.Errorf("drain deadline warning logged: %v, want %v", warned, tc.warn)
			}
			if tc.session && tc.endAt == never {
				_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
				if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
					t.Errorf("the session outlived the drain: read %v", err)
				}
			}
		})
	}
}

// Run stops on the first signal and drains; a second signal ends the drain
// at once. A Stop from elsewhere ends Run too.
func TestRunSignals(t *testing.T) {
	be := echoBackend(t)
	t.Run("second signal stops at once", func(t *testing.T) {
		log, logs := observed()
		sig := make(chan os.Signal, 2)
		d, err := Start(Options{Config: parse(t, "loops: 1", "drain: 1m", "rules:", "  - tcp 127.0.0.1:0 -> "+be),
			Log: log, Signals: sig})
		if err != nil {
			t.Fatal(err)
		}
		session(t, d.Engine().Listeners()[0].Addr())
		ran := make(chan error, 1)
		go func() { ran <- d.Run() }()
		sig <- syscall.SIGTERM
		deadline := time.Now().Add(5 * time.Second)
		for !d.Engine().Draining() && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		select {
		case err := <-ran:
			t.Fatalf("Run returned during the drain of a live session: %v", err)
		case <-time.After(300 * time.Millisecond):
		}
		sig <- syscall.SIGINT
		select {
		case err := <-ran:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Run still draining 5s after the second signal")
		}
		stopping := logs.FilterMessage("stopping: no new connections; draining live sessions").All()
		if len(stopping) != 1 || stopping[0].ContextMap()["signal"] != "terminated" || stopping[0].ContextMap()["sessions"] != int64(1) {
			t.Errorf("stopping logged %+v, want once with signal terminated and 1 session", stopping)
		}
		if logs.FilterMessage("drain deadline passed; remaining sessions closed").Len() != 1 {
			t.Error("no drain deadline warning after the second signal")
		}
	})
	t.Run("Stop ends Run", func(t *testing.T) {
		d, err := Start(Options{Config: parse(t, "loops: 1", "rules:", "  - tcp 127.0.0.1:0 -> "+be), Signals: make(chan os.Signal)})
		if err != nil {
			t.Fatal(err)
		}
		ran := make(chan error, 1)
		go func() { ran <- d.Run() }()
		if err := d.Stop(context.Background()); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-ran:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Run still waiting after Stop")
		}
	})
}
