package main

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/observe"
)

func TestCtlStatsVerb(t *testing.T) {
	eng, sock := ctlServer(t, ruleA)
	eng.SetCounters([]observe.Counter{{Name: "sessions", Value: 2}, {Name: "rule.tcp 0.0.0.0:8080.bytes_in", Value: 12345}})
	code, out, errOut := sluiceCtl(t, "-s", sock, "stats")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	if len(lines) != 2 || strings.Fields(lines[0])[0] != "sessions" || strings.Fields(lines[0])[1] != "2" ||
		strings.Fields(lines[1])[0] != "rule.tcp_0.0.0.0:8080.bytes_in" || !strings.HasSuffix(strings.TrimSpace(lines[1]), "12345") {
		t.Fatalf("stats output:\n%s", out)
	}
	code, out, errOut = sluiceCtl(t, "-s", sock, "stats", "--json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	var m map[string]int64
	if err := json.Unmarshal([]byte(out), &m); err != nil || m["sessions"] != 2 || m["rule.tcp_0.0.0.0:8080.bytes_in"] != 12345 {
		t.Fatalf("stats --json %q: %v", out, err)
	}
}

func TestCtlSessionsVerb(t *testing.T) {
	eng, sock := ctlServer(t, ruleA)
	eng.SetSessionList([]observe.Session{
		{Rule: "tcp 0.0.0.0:8080", Source: netip.MustParseAddrPort("192.0.2.7:40001"), Target: netip.MustParseAddrPort("127.0.0.1:80"),
			State: "forwarding", Age: 2 * time.Second, Up: 1000, Down: 3000, SNI: "a.example.com", ALPN: "h2",
			TLSVersion: "TLS 1.3", TLSCipher: "TLS_AES_128_GCM_SHA256", TLSResumed: true},
		{Rule: "tcp 0.0.0.0:9090", Source: netip.MustParseAddrPort("192.0.2.8:40002"), State: "handshake", Splice: true},
	})
	code, out, errOut := sluiceCtl(t, "-s", sock, "sessions", "--rule", "tcp 0.0.0.0:8080")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "RULE") || lines[2] != "# 1 session" {
		t.Fatalf("sessions output:\n%s", out)
	}
	f := strings.Fields(lines[1])
	if want := []string{"tcp", "0.0.0.0:8080", "192.0.2.7:40001", "-", "127.0.0.1:80", "forwarding", "2s", "1000", "3000", "buffer", "a.example.com", "h2", "TLS", "1.3", "TLS_AES_128_GCM_SHA256", "resumed"}; strings.Join(f, " ") != strings.Join(want, " ") {
		t.Fatalf("session line %q, want %q", f, want)
	}
	code, out, errOut = sluiceCtl(t, "-s", sock, "sessions", "--json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	var rows []map[string]any
	for _, l := range strings.Split(strings.TrimRight(out, "\n"), "\n") {
		var r map[string]any
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatalf("line %q: %v", l, err)
		}
		rows = append(rows, r)
	}
	if len(rows) != 2 || rows[0]["bytes_up"] != float64(1000) || rows[1]["mode"] != "splice" || rows[1]["target"] != "-" ||
		rows[0]["tls_cipher"] != "TLS_AES_128_GCM_SHA256" || rows[0]["tls_resumed"] != true || rows[1]["tls_version"] != "" {
		t.Fatalf("sessions --json: %s", out)
	}
	// A --rule of the wrong form, or naming no rule: no such rule, exit 2;
	// a name with other blanks is the rule's.
	for _, r := range []string{"tcp 0.0.0.0:7777", "0.0.0.0:8080", "tcp 0.0.0.0:8080 -> 127.0.0.1:80"} {
		code, out, errOut := sluiceCtl(t, "-s", sock, "sessions", "--rule", r)
		if code != exitUsage || !strings.Contains(errOut, "no such rule") || out != "" {
			t.Fatalf("sessions --rule %q: exit %d, stdout %q, stderr %q; want exit 2, no such rule", r, code, out, errOut)
		}
	}
	if code, out, errOut := sluiceCtl(t, "-s", sock, "sessions", "--rule", " tcp  0.0.0.0:8080"); code != 0 || !strings.Contains(out, "192.0.2.7:40001") {
		t.Fatalf("sessions --rule with blanks: exit %d\n%s%s", code, out, errOut)
	}
	if code, _, _ := sluiceCtl(t, "-s", sock, "stats", "--rule", "x"); code != exitUsage {
		t.Fatalf("stats --rule: exit %d, want %d", code, exitUsage)
	}
	if code, _, _ := sluiceCtl(t, "-s", sock, "watch", "nope"); code != exitUsage {
		t.Fatalf("watch of an unknown group: exit %d, want %d", code, exitUsage)
	}
}

// watch prints the state, then an apply and a rollback, as JSON lines.
func TestCtlWatchVerb(t *testing.T) {
	eng, sock := ctlServer(t, ruleA)
	var wg sync.WaitGroup
	var code int
	var out, errOut string
	wg.Add(1)
	go func() {
		defer wg.Done()
		code, out, errOut = sluiceCtlNoT("-s", sock, "watch", "rules", "--count", "3")
	}()
	// Once the watcher is subscribed, an add is two events: applied,
	// committed.
	deadline := time.Now().Add(10 * time.Second)
	for !eng.Watched(observe.GroupRules) {
		if time.Now().After(deadline) {
			t.Fatal("the watcher never subscribed")
		}
		time.Sleep(time.Millisecond)
	}
	if c, _, e := sluiceCtlNoT("-s", sock, "add", ruleB); c != 0 {
		t.Fatalf("add: exit %d: %s", c, e)
	}
	wg.Wait()
	if code != 0 {
		t.Fatalf("watch: exit %d: %s", code, errOut)
	}
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	types := []string{"state", "applied", "committed"}
	gens := []float64{1, 2, 2}
	if len(lines) != 3 {
		t.Fatalf("watch output:\n%s", out)
	}
	for i, l := range lines {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("line %q: %v", l, err)
		}
		if m["group"] != "rules" || m["type"] != types[i] || m["generation"] != gens[i] || m["time"] == nil {
			t.Fatalf("line %d %s, want rules/%s generation %v", i, l, types[i], gens[i])
		}
	}
}

// sluiceCtlNoT runs `sluice ctl ARGS` in process, from any goroutine.
func sluiceCtlNoT(args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	code = runCtlWith(args, &out, &errb, nil)
	return code, out.String(), errb.String()
}

// Counts read as English: one of a thing is singular.
func TestPlurals(t *testing.T) {
	for _, c := range []struct{ got, want string }{
		{count(1, "session"), "1 session"}, {count(0, "session"), "0 sessions"}, {count(2, "rule"), "2 rules"},
		{allOf(1) + " " + plural(1, "instance"), "the one instance"}, {allOf(3) + " " + plural(3, "instance"), "all 3 instances"},
		{statKey("rule.tcp 0.0.0.0:443 sni=a.example.com.bytes_in"), "rule.tcp_0.0.0.0:443_sni=a.example.com.bytes_in"},
	} {
		if c.got != c.want {
			t.Errorf("%q, want %q", c.got, c.want)
		}
	}
}
