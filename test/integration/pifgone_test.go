package integration

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/netnstest"
	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// A pif whose namespace is deleted (`ip netns del`) while rules use it
// (issue 15, "Also cover"). `ip netns del` removes the name, not the
// namespace: the daemon's pif thread holds it (setns), as do the sockets in
// it, so what runs in it goes on. The test checks that:
//   - a session into the namespace that spans the delete completes exactly,
//     and new ones still work while their backend (inside) lives;
//   - once that backend is gone (its container stopped), a new session
//     fails cleanly: the client gets an EOF at once, no byte, no hang, and
//     the daemon counts connect-refused;
//   - the other rules serve throughout, byte-exact;
//   - a ctl add of a new rule on the pif is refused (exit 1, "is gone":
//     a listener in the namespace only the daemon still holds would be
//     reachable by no one), and the other rules still serve after it;
//   - sluice_pif_up{pif="inner"} reads 1 before the delete, 0 after;
//   - a restart with the same file fails clearly: exit 1 naming the file's
//     line, the pif and the path.
func TestFaultPifNamespaceDeleted(t *testing.T) {
	ns := netnstest.New(t)
	inner := testpeer.Serve(ns.Listen(t, "127.0.0.1:0"))
	t.Cleanup(inner.Close)
	host := hashBackend(t)
	into, plain, in, added := freePort(t), freePort(t), freePort(t), freePort(t)
	mport := freePort(t)
	file := writeFile(t, "pifgone.yaml", fmt.Sprintf(`loops: 1
log: {level: info}
metrics: {listen: 127.0.0.1:%d}
pifs:
  - {name: inner, netns: %s}
rules:
  - tcp 127.0.0.1:%d -> inner/%s timeout.connect=2s
  - tcp 127.0.0.1:%d -> %s
  - tcp inner/127.0.0.1:%d -> %s
`, mport, ns.Path, into, inner.Addr(), plain, host.Addr(), in, host.Addr()))
	d := startRunCtl(t, forwardOpts{}, file)
	d.waitListening(fmt.Sprintf("127.0.0.1:%d", into))
	exchange := func(port int, size int64, seed uint64) error {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		return testpeer.Exchange(c, size, size, seed)
	}
	// Other rules' traffic all along.
	stop := make(chan struct{})
	other := make(chan [2]int, 1)
	go func() {
		ok, bad := 0, 0
		for i := uint64(100); ; i++ {
			select {
			case <-stop:
				other <- [2]int{ok, bad}
				return
			default:
			}
			if err := exchange(plain, 32<<10, i); err != nil {
				t.Errorf("the host rule during the fault: %v", err)
				bad++
			} else {
				ok++
			}
		}
	}()

	pifUp := func() float64 {
		_, text := httpGet(t, fmt.Sprintf("http://127.0.0.1:%d/metrics", mport))
		v, ok := metricValue(text, `sluice_pif_up{pif="inner"}`)
		if !ok {
			t.Fatalf("no sluice_pif_up for inner in:\n%s", text)
		}
		return v
	}
	if v := pifUp(); v != 1 {
		t.Errorf("sluice_pif_up before the delete: %v, want 1", v)
	}
	spanning := make(chan error, 1)
	go func() { spanning <- exchange(into, 16<<20, 1) }()
	time.Sleep(20 * time.Millisecond)
	if out, err := exec.Command("ip", "netns", "del", ns.Name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns del: %v %s", err, out)
	}
	if _, err := os.Stat(ns.Path); !os.IsNotExist(err) {
		t.Fatalf("%s still there after ip netns del: %v", ns.Path, err)
	}
	if v := pifUp(); v != 0 {
		t.Errorf("sluice_pif_up after the delete: %v, want 0", v)
	}
	if err := <-spanning; err != nil {
		t.Fatalf("the session that spans the delete: %v", err)
	}
	if err := exchange(into, 1<<20, 2); err != nil {
		t.Fatalf("a new session into the namespace, its backend alive: %v", err)
	}

	inner.Close() // the namespace's backend is gone
	const tries = 20
	for i := range tries {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", into), 2*time.Second)
		if err != nil {
			t.Fatalf("dial %d: %v (the listener is in the host: it must accept)", i, err)
		}
		start := time.Now()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		n, err := io.Copy(io.Discard, c)
		c.Close()
		if took := time.Since(start); n != 0 || err != nil || took > 2*time.Second {
			t.Fatalf("session %d into the pif with no backend: %d bytes, %v after %s; want a clean EOF at once", i, n, err, took)
		}
	}

	// A change touching the pif answers, and harms nothing else.
	code, out, errs := d.cli("add", fmt.Sprintf("tcp 127.0.0.1:%d -> inner/127.0.0.1:9", added))
	if code != 1 || !strings.Contains(errs, "pif inner: its namespace "+ns.Path+" is gone") {
		t.Fatalf("ctl add into the pif: exit %d, want 1 and the pif's namespace gone\n%s%s", code, out, errs)
	}
	addCode, addOutcome := code, strings.TrimSpace(lastLine(out+errs))
	if err := exchange(plain, 1<<20, 3); err != nil {
		t.Fatalf("the host rule after the add: %v", err)
	}
	close(stop)
	counts := <-other
	if err := d.stop(5 * time.Second); err != nil {
		t.Fatalf("stop: %v\n%s", err, d.stderr.String())
	}
	if want := fmt.Sprintf(`"ended.connect-refused": %d`, tries); !strings.Contains(d.stderr.String(), want) {
		t.Errorf("the daemon's counts do not say %s:\n%s", want, d.stderr.String())
	}
	if f := host.Failures.Load() + inner.Failures.Load(); f != 0 {
		t.Errorf("%d failed exchanges at the backends", f)
	}

	// A restart reads the path again: a clear error, at the pif's line.
	code, out, errs = runSluice(t, "run", "-c", file)
	if code != 1 || !strings.Contains(errs, "pifgone.yaml:5:") || !strings.Contains(errs, "pif inner") || !strings.Contains(errs, ns.Path) {
		t.Fatalf("restart: exit %d\n%s%s", code, out, errs)
	}
	t.Logf("host rule: %d exchanges, %d failed; %d sessions into the pif without a backend: clean EOF; add into it: exit %d %q; restart: %s",
		counts[0], counts[1], tries, addCode, addOutcome, strings.TrimSpace(errs))
}

// lastLine is s's last non-empty line.
func lastLine(s string) string {
	ls := strings.Split(strings.TrimSpace(s), "\n")
	return ls[len(ls)-1]
}
