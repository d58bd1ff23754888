package daemon

import (
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/sluice-proxy/sluice/rules"
)

// The listen keys a hand-over names, both ways.
func TestKeyName(t *testing.T) {
	for _, tc := range []struct {
		k    rules.Key
		name string
	}{
		{rules.Key{Proto: rules.TCP, Addr: netip.MustParseAddr("127.0.0.1"), Port: 8080}, "tcp/host/127.0.0.1:8080"},
		{rules.Key{Proto: rules.UDP, Pif: "ns1", Addr: netip.MustParseAddr("::"), Port: 53}, "udp/ns1/[::]:53"},
		{rules.Key{Proto: rules.TCP, Pif: "a.b-c_d", Addr: netip.MustParseAddr("0.0.0.0"), Port: 0}, "tcp/a.b-c_d/0.0.0.0:0"},
	} {
		if got := keyName(tc.k); got != tc.name {
			t.Errorf("keyName(%v) = %q, want %q", tc.k, got, tc.name)
		}
		if k, err := parseKeyName(tc.name); err != nil || k != tc.k {
			t.Errorf("parseKeyName(%q) = %v, %v; want %v", tc.name, k, err, tc.k)
		}
	}
	for _, bad := range []string{"", "tcp", "tcp/host", "sctp/host/1.2.3.4:5", "tcp/host/1.2.3.4", "tcp/host/1.2.3.4:99999",
		"tcp/bad pif/1.2.3.4:5", "tcp//1.2.3.4:5", "tcp/" + strings.Repeat("n", 65) + "/1.2.3.4:5", "tcp/host/[::1]:5/x"} {
		if k, err := parseKeyName(bad); err == nil {
			t.Errorf("parseKeyName(%q) = %v, want an error", bad, k)
		}
	}
}

// SLUICE_UPGRADE_FDS and SLUICE_UPGRADE_FROM: what a predecessor writes
// parses; anything else is an error naming what is wrong.
func TestParseHandover(t *testing.T) {
	h, err := parseHandover("sync=3,stderr=4,table=5,ctl=6,tcp/host/127.0.0.1:8080=7,udp/ns1/[::]:53=8", "42")
	if err != nil {
		t.Fatal(err)
	}
	want := map[rules.Key]int{
		{Proto: rules.TCP, Addr: netip.MustParseAddr("127.0.0.1"), Port: 8080}:    7,
		{Proto: rules.UDP, Pif: "ns1", Addr: netip.MustParseAddr("::"), Port: 53}: 8,
	}
	if h.from != 42 || h.sync != 3 || h.stderr != 4 || h.table != 5 || h.ctl != 6 || len(h.listen) != 2 {
		t.Fatalf("parsed %+v", h)
	}
	for k, fd := range want {
		if h.listen[k] != fd {
			t.Fatalf("%s: fd %d, want %d", keyName(k), h.listen[k], fd)
		}
	}
	if got := h.all(); len(got) != 6 || got[3] != fdSync || got[7] != "tcp/host/127.0.0.1:8080" {
		t.Fatalf("all: %v", got)
	}
	if h, err := parseHandover("sync=3,table=4", "1"); err != nil || h.stderr != 0 || h.ctl != 0 || len(h.all()) != 2 {
		t.Fatalf("the least hand-over: %+v, %v", h, err)
	}
	for _, tc := range []struct{ spec, from, want string }{
		{"sync=3,table=4", "", "SLUICE_UPGRADE_FROM"},
		{"sync=3,table=4", "x", "SLUICE_UPGRADE_FROM"},
		{"sync=3,table=4", "-1", "SLUICE_UPGRADE_FROM"},
		{"sync=3", "1", "no sync or no table"},
		{"table=3", "1", "no sync or no table"},
		{"sync=3,table=4,", "1", `"": want NAME=FD`},
		{"sync=3,,table=4", "1", `"": want NAME=FD`},
		{"sync=2,table=4", "1", `"sync=2"`},
		{"sync=0,table=4", "1", `"sync=0"`},
		{"sync=-3,table=4", "1", `"sync=-3"`},
		{"sync=3,table=99999999999999999999", "1", "want NAME=FD"},
		{"sync=3,table=16777217", "1", "want NAME=FD"},
		{"sync,table=4", "1", `"sync"`},
		{"=3,table=4", "1", `"=3"`},
		{"sync=3,table=3", "1", `fd 3 named both "sync" and "table"`},
		{"sync=3,table=4,sync=5", "1", "sync named twice"},
		{"sync=3,table=4,ctl=5,ctl=6", "1", "ctl named twice"},
		{"sync=3,table=4,tcp/host/1.2.3.4:5=5,tcp/host/1.2.3.4:5=6", "1", "named twice"},
		{"sync=3,table=4,weird=5", "1", `"weird": want PROTO/PIF/ADDR:PORT`},
		{"sync=3,table=4,tcp/host/nowhere:5=5", "1", `"tcp/host/nowhere:5"`},
	} {
		h, err := parseHandover(tc.spec, tc.from)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.HasPrefix(err.Error(), "upgrade: ") {
			t.Errorf("parseHandover(%q, %q) = %+v, %v; want an error with %q", tc.spec, tc.from, h, err, tc.want)
		}
	}
}

// readHandover on a bad environment: a clear error, and the variables are
// gone either way.
func TestReadHandoverBad(t *testing.T) {
	// An fd number nothing holds: named by the predecessor, not handed.
	t.Setenv(envUpgradeFDs, "sync=1000000,table=1000001")
	t.Setenv(envUpgradeFrom, strconv.Itoa(os.Getppid()))
	if h, err := readHandover(); err == nil || !strings.Contains(err.Error(), "fd 1000000 (sync)") && !strings.Contains(err.Error(), "fd 1000001 (table)") {
		t.Fatalf("readHandover of fds not open: %+v, %v", h, err)
	}
	if _, ok := os.LookupEnv(envUpgradeFDs); ok {
		t.Fatalf("%s still set", envUpgradeFDs)
	}
	t.Setenv(envUpgradeFDs, "sync=3")
	t.Setenv(envUpgradeFrom, "1")
	if _, err := readHandover(); err == nil {
		t.Fatal("readHandover without a table: no error")
	}
	os.Unsetenv(envUpgradeFDs)
	if h, err := readHandover(); h != nil || err != nil {
		t.Fatalf("readHandover of no hand-over: %+v, %v", h, err)
	}
}

// LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES as sd_listen_fds_with_names(3)
// reads them.
func TestParseListenFDs(t *testing.T) {
	const self = 4242
	for _, tc := range []struct {
		what, pid, nfds, names string
		want                   []activated // nil: none
		err                    string
	}{
		{what: "nothing passed"},
		{what: "LISTEN_PID not ours", pid: "1", nfds: "2", names: "a:b"},
		{what: "LISTEN_PID unset", nfds: "2", names: "a:b"},
		{what: "LISTEN_PID not a number", pid: "me", nfds: "2"},
		{what: "LISTEN_FDS=0", pid: "4242", nfds: "0"},
		{what: "LISTEN_FDS=0 with names", pid: "4242", nfds: "0", names: "a"},
		{what: "one, unnamed", pid: "4242", nfds: "1", want: []activated{{3, ""}}},
		{what: "two, named", pid: "4242", nfds: "2", names: "web:ctl", want: []activated{{3, "web"}, {4, "ctl"}}},
		{what: "empty names kept", pid: "4242", nfds: "3", names: "::ctl", want: []activated{{3, ""}, {4, ""}, {5, "ctl"}}},
		{what: "the most", pid: "4242", nfds: "1024", want: make([]activated, 1024)},
		{what: "LISTEN_FDS not a number", pid: "4242", nfds: "two", err: `LISTEN_FDS="two": want 0 to 1024`},
		{what: "LISTEN_FDS negative", pid: "4242", nfds: "-1", err: "want 0 to 1024"},
		{what: "LISTEN_FDS too many", pid: "4242", nfds: "1025", err: "want 0 to 1024"},
		{what: "more names than fds", pid: "4242", nfds: "1", names: "web:ctl", err: `LISTEN_FDNAMES="web:ctl" names 2 sockets, LISTEN_FDS=1`},
		{what: "fewer names than fds", pid: "4242", nfds: "3", names: "web:ctl", err: "names 2 sockets, LISTEN_FDS=3"},
		{what: "two control sockets", pid: "4242", nfds: "2", names: "ctl:ctl", err: `more than one socket "ctl"`},
	} {
		got, err := parseListenFDs(tc.pid, tc.nfds, tc.names, self)
		if tc.what == "the most" {
			for i := range tc.want {
				tc.want[i].fd = 3 + i
			}
		}
		switch {
		case tc.err != "":
			if err == nil || !strings.Contains(err.Error(), tc.err) || !strings.HasPrefix(err.Error(), "socket activation: ") {
				t.Errorf("%s: %v, %v; want an error with %q", tc.what, got, err, tc.err)
			}
		case err != nil:
			t.Errorf("%s: %v", tc.what, err)
		case len(got) != len(tc.want) || (len(got) > 0 && !equalActivated(got, tc.want)):
			t.Errorf("%s: %v, want %v", tc.what, got, tc.want)
		}
	}
}

func equalActivated(a, b []activated) bool {
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// FuzzHandoverEnv: any SLUICE_UPGRADE_FDS, SLUICE_UPGRADE_FROM, LISTEN_FDS
// and LISTEN_FDNAMES parse or fail with an error, never a panic; what
// parses keeps the invariants, and its listen keys name themselves back.
func FuzzHandoverEnv(f *testing.F) {
	f.Add("sync=3,stderr=4,table=5,ctl=6,tcp/host/127.0.0.1:8080=7,udp/ns1/[::]:53=8", "42", "2", "web:ctl")
	f.Add("sync=3,table=4", "1", "1", "")
	f.Add("sync=3,table=3", "x", "0", "a")
	f.Add("tcp/host/[fe80::1%eth0]:80=9,sync=3,table=4", "7", "1025", "ctl:ctl")
	f.Fuzz(func(t *testing.T, spec, from, nfds, names string) {
		if h, err := parseHandover(spec, from); err == nil {
			if h.from <= 0 || h.sync < 3 || h.table < 3 {
				t.Fatalf("%q, %q: parsed %+v", spec, from, h)
			}
			all := h.all()
			if n := 2 + len(h.listen) + btoi(h.stderr != 0) + btoi(h.ctl != 0); len(all) != n {
				t.Fatalf("%q: %d distinct fds of %d handed", spec, len(all), n)
			}
			for k, fd := range h.listen {
				if fd < 3 || fd > maxHandedFD {
					t.Fatalf("%q: fd %d", spec, fd)
				}
				if k2, err := parseKeyName(keyName(k)); err != nil || k2 != k {
					t.Fatalf("%q: key %v names itself %q, which parses as %v, %v", spec, k, keyName(k), k2, err)
				}
			}
		} else if !strings.HasPrefix(err.Error(), "upgrade: ") {
			t.Fatalf("error without its subject: %v", err)
		}
		as, err := parseListenFDs("1", nfds, names, 1)
		if err != nil {
			if as != nil || !strings.HasPrefix(err.Error(), "socket activation: ") {
				t.Fatalf("%v, %v", as, err)
			}
			return
		}
		ctls := 0
		for i, a := range as {
			if a.fd != 3+i {
				t.Fatalf("fd %d at %d", a.fd, i)
			}
			if a.name == fdCtl {
				ctls++
			}
		}
		if len(as) > maxListenFDs || ctls > 1 || (names != "" && len(as) > 0 && len(as) != strings.Count(names, ":")+1) {
			t.Fatalf("%q %q: %v", nfds, names, as)
		}
	})
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}
