package metrics

import (
	"html"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"

	"github.com/sluice-proxy/sluice/engine"
	"github.com/sluice-proxy/sluice/internal/testpeer"
	"github.com/sluice-proxy/sluice/rules"
)

// A scripted workload, then one scrape over HTTP: N sessions served, M
// refused by deny, K PROXY errors, one apply rolled back. The scrape shows
// exactly those counts, per rule and engine-wide.
func TestScrapeAfterWorkload(t *testing.T) {
	if !engine.CountersEnabled {
		t.Skip("built with -tags sluice_nocounters: no per-rule counters to check")
	}
	const (
		N       = 5    // served sessions, each 16+up bytes in and down+32 out (testpeer.Exchange)
		M       = 3    // refused by deny
		Kbad    = 2    // malformed PROXY headers
		Kmiss   = 2    // no PROXY header where one is required
		up      = 1000 // bytes a client sends after its header
		down    = 3000 // bytes the backend sends back
		headers = N + M
	)
	e, b := startEngine(t)
	held, err := net.Listen("tcp", "127.0.0.1:0") // a port the rolled-back apply cannot bind
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	port := freePort(t)
	addr := "127.0.0.1:" + strconv.Itoa(port)
	listen := "tcp " + addr
	line := listen + " -> " + b.Addr() + " accept-proxy deny=203.0.113.0/24"
	parse := func(lines ...string) []*rules.Rule {
		var rs []*rules.Rule
		for _, l := range lines {
			r, err := rules.Parse(l)
			if err != nil {
				t.Fatal(err)
			}
			rs = append(rs, r)
		}
		return rs
	}
	if sum, err := e.Apply(parse(line)); err != nil || !sum.OK() {
		t.Fatalf("apply: %v %v", err, sum.Failures())
	}
	if _, err := e.Commit(); err != nil {
		t.Fatal(err)
	}
	e.Transactions().Committed.Add(1) // what the control server counts for it

	srv := serveEngine(t, e, "workload")

	withHeader := func(src string) net.Conn {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		h := proxyproto.HeaderProxyFromAddrs(1, &net.TCPAddr{IP: net.ParseIP(src), Port: 5555}, &net.TCPAddr{IP: net.IPv4(198, 51, 100, 1), Port: 443})
		if _, err := h.WriteTo(c); err != nil {
			t.Fatal(err)
		}
		return c
	}
	closedBySluice := func(c net.Conn, send string) {
		t.Helper()
		if send != "" {
			if _, err := io.WriteString(c, send); err != nil {
				t.Fatal(err)
			}
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := c.Read(make([]byte, 1)); err == nil || isTimeout(err) {
			t.Fatalf("sluice did not close the conn: read %d, %v", n, err)
		}
		c.Close()
	}
	for i := range N {
		c := withHeader("192.0.2." + strconv.Itoa(10+i))
		if err := testpeer.Exchange(c, up, down, uint64(i)); err != nil {
			t.Fatalf("session %d: %v", i, err)
		}
		c.Close()
	}
	for i := range M {
		closedBySluice(withHeader("203.0.113."+strconv.Itoa(10+i)), "")
	}
	for range Kbad {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		closedBySluice(c, "PROXY TCP4 not-an-address\r\n")
	}
	for range Kmiss {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		closedBySluice(c, "GET / HTTP/1.0\r\n\r\n")
	}
	sum, err := e.Apply(parse(line, "tcp "+held.Addr().String()+" -> "+b.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	if sum.OK() {
		t.Fatal("an apply binding a held port passed")
	}
	if _, err := e.Rollback(); err != nil {
		t.Fatal(err)
	}
	e.Transactions().RolledBack.Add(1)

	lb := "pif=host,rule=" + listen
	want := map[string]float64{
		"sluice_rule_connections_total{" + lb + "}":                                                      N + M + Kbad + Kmiss,
		"sluice_rule_refused_total{pif=host,reason=denied,rule=" + listen + ",step=rules}":               M,
		"sluice_rule_refused_total{pif=host,reason=proxy-bad,rule=" + listen + ",step=accept-proxy}":     Kbad,
		"sluice_rule_refused_total{pif=host,reason=proxy-missing,rule=" + listen + ",step=accept-proxy}": Kmiss,
		"sluice_rule_terminations_total{" + lb + ",term=--}":                                             N,
		"sluice_rule_terminations_total{" + lb + ",term=PR}":                                             M + Kbad + Kmiss,
		"sluice_rule_proxy_headers_total{" + lb + ",version=v1}":                                         headers,
		"sluice_rule_proxy_headers_total{" + lb + ",version=v2}":                                         0,
		"sluice_rule_sessions{" + lb + "}":                                                               0,
		"sluice_rule_bytes_total{direction=in," + lb + "}":                                               N * (16 + up),
		"sluice_rule_bytes_total{direction=out," + lb + "}":                                              N * (down + 32),
		"sluice_rule_connect_errors_total{" + lb + "}":                                                   0,
		"sluice_rule_connect_retries_total{" + lb + "}":                                                  0,
		"sluice_rule_handshake_seconds_count{" + lb + "}":                                                N,
		"sluice_rule_connect_seconds_count{" + lb + "}":                                                  N,
		"sluice_rule_session_seconds_count{" + lb + "}":                                                  N,
		"sluice_rule_ports{" + lb + ",state=bound}":                                                      1,
		"sluice_rule_ports{" + lb + ",state=failed}":                                                     0,
		"sluice_sessions": 0,
		`sluice_sessions_ended_total{code=1,reason=done}`:           N,
		`sluice_sessions_ended_total{code=5,reason=denied}`:         M,
		`sluice_sessions_ended_total{code=3,reason=proxy-bad}`:      Kbad,
		`sluice_sessions_ended_total{code=18,reason=proxy-missing}`: Kmiss,
		"sluice_connect_errors_total":                               0,
		"sluice_table_generation":                                   1,
		"sluice_table_pending":                                      0,
		"sluice_table_operations_total{op=apply}":                   2,
		"sluice_table_operations_total{op=commit}":                  1,
		"sluice_table_operations_total{op=rollback}":                1,
		"sluice_table_apply_seconds_count":                          2,
		"sluice_ctl_transactions_total{outcome=committed}":          1,
		"sluice_ctl_transactions_total{outcome=rolled_back}":        1,
		"sluice_ctl_transactions_total{outcome=failed}":             0,
		"sluice_buffers{state=in_use}":                              0,
		"sluice_pipes{state=in_use}":                                0,
	}
	got := scrapeWant(t, srv.Addr(), want)
	// Nothing else was refused or ended otherwise, and the rolled-back rule
	// left no series behind.
	for k, v := range got {
		_, expected := want[k]
		switch {
		case strings.Contains(k, held.Addr().String()):
			t.Errorf("the rolled-back rule left %s = %v", k, v)
		case strings.HasPrefix(k, "sluice_rule_refused_total"), strings.HasPrefix(k, "sluice_rule_terminations_total"):
			if !expected {
				t.Errorf("unexpected sample %s = %v", k, v)
			}
		case strings.HasPrefix(k, "sluice_sessions_ended_total") && v != 0 && !expected:
			t.Errorf("unexpected sample %s = %v", k, v)
		}
	}
	moved := got["sluice_rule_bytes_moved_total{"+lb+",via=splice}"] + got["sluice_rule_bytes_moved_total{"+lb+",via=buffer}"]
	if moved != N*(16+up+down+32) {
		t.Errorf("bytes moved by splice and buffer: %v, want %v", moved, N*(16+up+down+32))
	}
	if fds := got["sluice_fds_open"]; fds < 10 || fds != got["process_open_fds"] && fds < got["process_open_fds"]-5 {
		t.Errorf("sluice_fds_open %v, process_open_fds %v", fds, got["process_open_fds"])
	}

	resp, err := http.Get("http://" + srv.Addr().String() + "/")
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, s := range []string{line, "rollback", "commit", "address already in use", b.Addr(), "listening"} {
		if !strings.Contains(string(page), html.EscapeString(s)) {
			t.Errorf("status page lacks %q", s)
		}
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}
