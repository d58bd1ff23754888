package engine

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/observe"
	"github.com/sluice-proxy/sluice/rules"
)

// fakeNames is a lookup the test changes (the integration tests use
// /etc/hosts and Go's resolver).
type fakeNames struct {
	mu sync.Mutex
	m  map[string][]netip.Addr
}

func (n *fakeNames) set(host string, addrs ...string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	var as []netip.Addr
	for _, a := range addrs {
		as = append(as, netip.MustParseAddr(a))
	}
	n.m[host] = as
}

func (n *fakeNames) lookup(_ context.Context, host string) ([]netip.Addr, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if as := n.m[host]; len(as) > 0 {
		return as, nil
	}
	return nil, errors.New("no such host")
}

// A name's pool follows its addresses on the same listening socket; a name
// that stops resolving keeps its last addresses; a name that does not
// resolve at load is refused with the rule.
func TestNamesFollowResolution(t *testing.T) {
	a := newHTTPBackend(t, "a") // 127.0.0.1:P
	port := a.srv.Listener.Addr().(*net.TCPAddr).Port
	bl, err := net.Listen("tcp", fmt.Sprintf("127.0.0.2:%d", port))
	if err != nil {
		t.Skipf("127.0.0.2:%d: %v", port, err)
	}
	newHTTPBackendOn(t, "b", bl)

	names := &fakeNames{m: map[string][]netip.Addr{}}
	names.set("web", "127.0.0.1")
	e, err := New(Config{Loops: 2})
	if err != nil {
		t.Fatal(err)
	}
	e.names.lookup = names.lookup
	e.Start()
	defer e.Shutdown(context.Background())
	if _, err := e.Listen(mustRule(t, "tcp 127.0.0.1:0 -> nosuch:80")); err == nil || !strings.Contains(err.Error(), "target nosuch: no such host") {
		t.Fatalf("an unresolvable name at load: %v", err)
	}
	lns, err := e.Listen(mustRule(t, fmt.Sprintf("tcp 127.0.0.1:0 -> web:%d resolve=1s check=tcp check.interval=100ms check.timeout=50ms", port)))
	if err != nil {
		t.Fatal(err)
	}
	addr := lns[0].Addr().String()
	fd := lns[0].fd
	sub, _ := e.Watch(observe.GroupHealth, 16)
	defer sub.Close()
	if got := via(t, addr); got != "a" {
		t.Fatalf("web = 127.0.0.1: %q", got)
	}
	names.set("web", "127.0.0.2", "127.0.0.1")
	waitWithin(t, 3*time.Second, "pool of two", func() bool { return e.Listeners()[0].Pool().Len() == 2 })
	names.set("web", "127.0.0.2")
	took := waitWithin(t, 3*time.Second, "traffic to the new address", func() bool { return onlyTo(t, addr, "b", 3) })
	t.Logf("pool followed the name within %s (resolve=1s)", took)
	ln := e.Listeners()[0]
	if ln.fd != fd || ln.Pool().Len() != 1 {
		t.Errorf("listener fd %d (was %d), pool %d", ln.fd, fd, ln.Pool().Len())
	}
	e.mu.Lock()
	nc := len(e.chk.byLine[ln.rule.String()].list)
	e.mu.Unlock()
	if nc != 1 {
		t.Errorf("%d checkers, want the one of the address that stays", nc)
	}
	names.set("web")
	deadline := time.After(3 * time.Second)
	for failed := false; !failed; {
		select {
		case ev := <-sub.Events():
			failed = ev.Type == "resolve-failed"
		case <-deadline:
			t.Fatal("no resolve-failed event")
		}
	}
	if got := via(t, addr); got != "b" {
		t.Errorf("name gone: %q, want the last address kept", got)
	}
}

func mustRule(t *testing.T, line string) *rules.Rule {
	t.Helper()
	r, err := rules.Parse(line)
	if err != nil {
		t.Fatal(err)
	}
	return r
}
