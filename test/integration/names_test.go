package integration

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// hostsMu serializes the tests that edit /etc/hosts.
var hostsMu sync.Mutex

// editHosts gives the test a way to set its own lines at the end of
// /etc/hosts; the file is put back byte for byte when the test ends, failed
// or not. (Written in place: /etc/hosts is often a bind mount that a rename
// would not replace.)
func editHosts(t *testing.T) func(lines ...string) {
	t.Helper()
	hostsMu.Lock()
	orig, err := os.ReadFile("/etc/hosts")
	if err != nil {
		hostsMu.Unlock()
		t.Skipf("/etc/hosts: %v", err)
	}
	st, _ := os.Stat("/etc/hosts")
	t.Cleanup(func() {
		defer hostsMu.Unlock()
		if err := os.WriteFile("/etc/hosts", orig, st.Mode().Perm()); err != nil {
			t.Errorf("restoring /etc/hosts: %v", err)
		}
		if now, _ := os.ReadFile("/etc/hosts"); string(now) != string(orig) {
			t.Errorf("/etc/hosts not restored: %q, was %q", now, orig)
		}
	})
	return func(lines ...string) {
		t.Helper()
		b := append([]byte(nil), orig...)
		if len(b) > 0 && b[len(b)-1] != '\n' {
			b = append(b, '\n')
		}
		for _, l := range lines {
			b = append(b, l+"\n"...)
		}
		if err := os.WriteFile("/etc/hosts", b, st.Mode().Perm()); err != nil {
			t.Fatalf("writing /etc/hosts: %v", err)
		}
	}
}

// listenInode returns the inode of the daemon's socket listening on addr.
func listenInode(t *testing.T, d *daemon, addr string) string {
	t.Helper()
	ap := netip.MustParseAddrPort(addr)
	a4 := ap.Addr().As4()
	local := fmt.Sprintf("%08X:%04X", binary.LittleEndian.Uint32(a4[:]), ap.Port())
	for _, l := range procListens(t, fmt.Sprintf("/proc/%d/net/tcp", d.cmd.Process.Pid)) {
		if l.local == local {
			return l.inode
		}
	}
	t.Fatalf("no socket listening on %s", addr)
	return ""
}

// A target by name, from /etc/hosts entries the test writes: the pool
// follows a change within resolve= (plus the Go resolver's 5 s hosts-file
// cache) on the same listening socket; a name that stops resolving keeps
// its last addresses and says so; the canonical line keeps the name; a name
// that does not resolve at load stops the daemon's start, naming the rule.
func TestNamesFromEtcHosts(t *testing.T) {
	setHosts := editHosts(t)
	const name = "sluice-it-web.test"
	setHosts("127.0.0.1 " + name)

	a := serveHealth(t, "a", listenLoopback(t))
	_, p, _ := net.SplitHostPort(a.addr)
	bl, err := net.Listen("tcp", "127.0.0.2:"+p)
	if err != nil {
		t.Skipf("127.0.0.2:%s: %v", p, err)
	}
	serveHealth(t, "b", bl)

	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	file := writeFile(t, "names.yaml", fmt.Sprintf(`loops: 1
log: {level: info}
rules:
  - tcp %s -> %s:%s resolve=1s check=tcp check.interval=200ms check.timeout=100ms
`, addr, name, p))
	d := startDaemon(t, forwardOpts{}, "run", "-c", file)
	d.waitListening(addr)
	inode := listenInode(t, d, addr)
	if got := fetch(t, addr); got != "a" {
		t.Fatalf("%s = 127.0.0.1: %q\n%s", name, got, d.stderr.String())
	}
	code, out, _ := runSluice(t, "ctl", "-s", d.Ctl, "list")
	if code != 0 || !strings.Contains(out, "-> "+name+":"+p+" ") {
		t.Errorf("ctl list (%d): %q, want the name kept", code, out)
	}

	setHosts("127.0.0.2 " + name)
	took := within(t, 10*time.Second, "the pool follows the name", func() bool { return fetch(t, addr) == "b" && fetch(t, addr) == "b" })
	t.Logf("pool followed /etc/hosts after %s (resolve=1s; Go re-reads /etc/hosts at most every 5s)", took)
	if got := listenInode(t, d, addr); got != inode {
		t.Errorf("listening socket changed: inode %s, was %s", got, inode)
	}
	if !strings.Contains(d.stderr.String(), "name resolved to new addresses") {
		t.Errorf("no log line of the change\n%s", d.stderr.String())
	}

	setHosts() // the name is gone
	within(t, 10*time.Second, "the failure said", func() bool {
		return strings.Contains(d.stderr.String(), "name does not resolve; keeping its last addresses")
	})
	if got := fetch(t, addr); got != "b" {
		t.Errorf("name gone: %q, want its last address", got)
	}

	bad := writeFile(t, "bad.yaml", fmt.Sprintf("rules:\n  - tcp 127.0.0.1:%d -> nosuch-sluice-it.test:80\n", freePort(t)))
	code, _, stderr := runSluice(t, "run", "-c", bad)
	if code == 0 || !strings.Contains(stderr, "target nosuch-sluice-it.test") {
		t.Errorf("unresolvable name at start: exit %d\n%s", code, stderr)
	}
}
