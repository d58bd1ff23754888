package integration

import (
	"errors"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// prober dials addr over and over until stop, counting the connects that
// succeeded: a rule's port that listens completes a connect, accepted or
// not, so one success means the port was open to clients.
type prober struct {
	connected atomic.Int64
	tries     atomic.Int64
	quit      chan struct{}
	once      sync.Once
	wg        sync.WaitGroup
}

func probe(addr string) *prober {
	p := &prober{quit: make(chan struct{})}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			select {
			case <-p.quit:
				return
			default:
			}
			p.tries.Add(1)
			c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
			if err == nil {
				p.connected.Add(1)
				c.Close()
				continue
			}
			time.Sleep(time.Millisecond)
		}
	}()
	return p
}

// stop ends the probing and waits for it; a second call does nothing.
func (p *prober) stop() {
	p.once.Do(func() { close(p.quit) })
	p.wg.Wait()
}

// A start whose store step fails (store.etcd's settings cannot work) exits
// 1 with the error, and the rule's port never accepted: a client probing it
// all through the start never connects. The same configuration with
// settings that work (etcd unreachable only: the store never holds the
// start) does connect: the probe sees an open port.
func TestStartFailsBeforeAccepting(t *testing.T) {
	backend := hashBackend(t)
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing")
	for _, tc := range []struct {
		name  string
		store string // store.etcd's settings beyond endpoints, prefix, instance
		want  string // in stderr; "" = the start succeeds
	}{
		{"etcd ca missing", "ca: " + missing + ".pem", ":1: store.etcd: etcd ca: open " + missing + ".pem: no such file or directory"},
		{"etcd password file missing", "user: u, password-file: " + missing + ".pw", ":1: store.etcd: etcd password file: open " + missing + ".pw: no such file or directory"},
		{"settings that work", "ttl: 2s", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			listen := fmt.Sprintf("127.0.0.1:%d", freePort(t))
			cfg := writeFile(t, "s.yaml", fmt.Sprintf(
				"store: {etcd: {endpoints: [http://127.0.0.1:%d], prefix: /sluice/t, instance: a, %s}}\nrules:\n  - tcp %s -> %s\n",
				freePort(t), tc.store, listen, backend.Addr()))
			p := probe(listen)
			defer p.stop()
			for p.tries.Load() == 0 { // probing before the process exists
				time.Sleep(time.Millisecond)
			}
			d := startDaemon(t, forwardOpts{}, "run", "-c", cfg, "--log-level", "info")
			if tc.want == "" {
				deadline := time.Now().Add(10 * time.Second)
				for p.connected.Load() == 0 && time.Now().Before(deadline) {
					time.Sleep(5 * time.Millisecond)
				}
				if p.connected.Load() == 0 {
					t.Fatalf("the probe never connected to a daemon that started:\n%s", d.stderr.String())
				}
				if err := d.stop(5 * time.Second); err != nil {
					t.Errorf("stop: %v\n%s", err, d.stderr.String())
				}
				return
			}
			select {
			case <-d.done:
			case <-time.After(10 * time.Second):
				t.Fatalf("sluice still runs with a store that cannot work:\n%s", d.stderr.String())
			}
			p.stop()
			var ee *exec.ExitError
			if !errors.As(d.err, &ee) || ee.ExitCode() != 1 {
				t.Errorf("exit %v, want 1\n%s", d.err, d.stderr.String())
			}
			if !strings.Contains(d.stderr.String(), cfg+tc.want) {
				t.Errorf("stderr does not say %q:\n%s", cfg+tc.want, d.stderr.String())
			}
			if n := p.connected.Load(); n != 0 {
				t.Errorf("the rule's port took %d connects (of %d tries) during a start that failed:\n%s", n, p.tries.Load(), d.stderr.String())
			}
			if strings.Contains(d.stderr.String(), "listening") {
				t.Errorf("the log says a rule listened:\n%s", d.stderr.String())
			}
		})
	}
}
