package integration

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// startNginxTLS runs one nginx (its http and ssl modules) with a TLS
// listener per name, each with a self-signed certificate for its name made
// here, answering "NAME\n" to any request. Each listener has a single
// server, so nginx answers its own name whatever the hello says: which one
// answers is sluice's routing alone. It returns the address of each name.
func startNginxTLS(t *testing.T, names ...string) map[string]string {
	t.Helper()
	dir := t.TempDir()
	addrs := make(map[string]string, len(names))
	var servers strings.Builder
	for _, name := range names {
		crt, kf, err := testpeer.WriteSelfSigned(dir, name)
		if err != nil {
			t.Fatal(err)
		}
		addrs[name] = fmt.Sprintf("127.0.0.1:%d", freePort(t))
		fmt.Fprintf(&servers, `
	server {
		listen %s ssl;
		ssl_certificate %s;
		ssl_certificate_key %s;
		default_type text/plain;
		location / { return 200 "%s\n"; }
	}`, addrs[name], crt, kf, name)
	}
	// Temporary paths in the test's directory: Debian's defaults are under
	// /var/lib/nginx, which a test should not need.
	conf := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf(`
daemon off;
master_process off;
worker_processes 1;
pid %[1]s/nginx.pid;
error_log stderr notice;
events { worker_connections 256; }
http {
	access_log off;
	client_body_temp_path %[1]s/body;
	proxy_temp_path %[1]s/proxy;
	fastcgi_temp_path %[1]s/fastcgi;
	uwsgi_temp_path %[1]s/uwsgi;
	scgi_temp_path %[1]s/scgi;
%[2]s
}
`, dir, servers.String())), 0o644); err != nil {
		t.Fatal(err)
	}
	d := startExt(t, addrs[names[0]], "nginx", "-p", dir, "-c", conf, "-e", "stderr")
	for _, name := range names[1:] {
		d.waitListening(addrs[name])
	}
	return addrs
}

// run runs a client program with a deadline and returns its stdout.
func run(t *testing.T, stdin string, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdin = strings.NewReader(stdin)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		err = fmt.Errorf("%s: %w: %s", name, err, stderr.String())
	}
	return string(out), err
}

// splitFirstWrite is a client socket whose first write (a TLS client's
// whole first flight: its hello) goes out as two writes with a pause
// between, so the hello spans two TCP segments whatever the MTU.
type splitFirstWrite struct {
	net.Conn
	once  sync.Once
	first int // the first write's length
}

func (c *splitFirstWrite) Write(b []byte) (int, error) {
	split := false
	c.once.Do(func() { split = true })
	if !split || len(b) < 2 {
		return c.Conn.Write(b)
	}
	c.first = len(b)
	n, err := c.Conn.Write(b[:len(b)/2])
	if err != nil {
		return n, err
	}
	time.Sleep(50 * time.Millisecond) // Go's sockets are TCP_NODELAY: a segment each
	m, err := c.Conn.Write(b[len(b)/2:])
	return n + m, err
}

// goGet makes one HTTPS/1.0 request with a Go crypto/tls client (its
// default, post-quantum hello) whose hello spans two segments, and returns
// the body and the hello's length.
func goGet(t *testing.T, addr, name string) (string, int, error) {
	raw, err := net.DialTimeout("tcp", addr, 3*time.Second)
	if err != nil {
		return "", 0, err
	}
	sc := &splitFirstWrite{Conn: raw}
	c := tls.Client(sc, &tls.Config{ServerName: name, InsecureSkipVerify: true})
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "GET / HTTP/1.0\r\nHost: "+name+"\r\n\r\n"); err != nil {
		return "", sc.first, err
	}
	b, err := io.ReadAll(c)
	resp := string(b)
	if i := strings.Index(resp, "\r\n\r\n"); i >= 0 {
		resp = resp[i+4:]
	}
	return resp, sc.first, err
}

// Real peers: nginx TLS servers behind sluice, reached by name from curl,
// openssl s_client and a Go client whose post-quantum hello spans two
// segments. The backends terminate TLS; sluice only routes.
func TestSNINginxCurlOpenSSL(t *testing.T) {
	ng := startNginxTLS(t, "a", "b", "default")
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	_, port, _ := net.SplitHostPort(addr)
	d := startRules(t, addr,
		"tcp "+addr+" -> "+ng["a"]+" sni=a.example.com",
		"tcp "+addr+" -> "+ng["b"]+" sni=*.b.example.com",
		"tcp "+addr+" -> "+ng["default"])
	for _, tc := range []struct{ name, want string }{
		{"a.example.com", "a"},
		{"x.b.example.com", "b"},
		{"c.example.com", "default"},
	} {
		out, err := run(t, "", "curl", "-sS", "-k", "--max-time", "5",
			"--resolve", tc.name+":"+port+":127.0.0.1", "https://"+tc.name+":"+port+"/")
		if err != nil || out != tc.want+"\n" {
			t.Errorf("curl %s: %q (%v), want %q\n%s", tc.name, out, err, tc.want, d.stderr.String())
		}

		out, err = run(t, "GET / HTTP/1.0\r\nHost: "+tc.name+"\r\n\r\n", "openssl", "s_client",
			"-connect", addr, "-servername", tc.name, "-quiet")
		if err != nil || !strings.HasSuffix(out, "\r\n\r\n"+tc.want+"\n") {
			t.Errorf("openssl s_client -servername %s: %q (%v), want the body %q\n%s", tc.name, out, err, tc.want, d.stderr.String())
		}

		body, n, err := goGet(t, addr, tc.name)
		if err != nil || body != tc.want+"\n" {
			t.Errorf("Go client %s: %q (%v), want %q\n%s", tc.name, body, err, tc.want, d.stderr.String())
		}
		// X25519MLKEM768's key share alone is 1 216 bytes.
		if n < 1400 {
			t.Errorf("Go client's hello is %d bytes: not a post-quantum one", n)
		}
	}
	// No server name at all: the default route.
	out, err := run(t, "GET / HTTP/1.0\r\n\r\n", "openssl", "s_client", "-connect", addr, "-noservername", "-quiet")
	if err != nil || !strings.HasSuffix(out, "\r\n\r\ndefault\n") {
		t.Errorf("openssl s_client -noservername: %q (%v), want the default route\n%s", out, err, d.stderr.String())
	}
}

// heldHellos is how many connections hold half a hello.
func heldHellos() int { return envInt("SLUICE_HELD_HELLOS", 2000) }

// Connections that send half a hello and wait hold the daemon's pooled
// hello buffer each, and do not stop a normal client; the memory each costs
// the daemon is reported (RSS and PSS delta / N).
func TestSNIHeldHalfHellos(t *testing.T) {
	n := heldHellos()
	good := tlsBackend(t, "good")
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	d := startRules(t, addr, "tcp "+addr+" -> "+good+" sni=good.example.com timeout.handshake=60s")
	pid := d.cmd.Process.Pid
	deadline := time.Now().Add(60 * time.Second) // the whole test's bound
	for i := 0; i < 20; i++ {
		if got, err := whoAnswers(t, addr, "good.example.com"); got != "good" {
			t.Fatalf("warm-up: %q %v", got, err)
		}
	}
	half := captureHello(t, "good.example.com")
	half = half[:len(half)/2]
	time.Sleep(300 * time.Millisecond)
	rss0, pss0 := procStatus(t, pid, "VmRSS"), procField(t, pid, "smaps_rollup", "Pss")

	conns := make([]net.Conn, n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	began := time.Now()
	for i := range conns {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c, err := net.DialTimeout("tcp", addr, 10*time.Second)
			if err != nil {
				t.Error(err)
				return
			}
			conns[i] = c
			c.SetWriteDeadline(deadline)
			if _, err := c.Write(half); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}()
	if t.Failed() || time.Now().After(deadline) {
		t.Fatalf("opening %d held connections took %v", n, time.Since(began))
	}
	opened := time.Since(began)
	time.Sleep(500 * time.Millisecond) // the daemon reads what they sent
	rss1, pss1 := procStatus(t, pid, "VmRSS"), procField(t, pid, "smaps_rollup", "Pss")
	perRSS, perPSS := float64(rss1-rss0)/float64(n), float64(pss1-pss0)/float64(n)
	t.Logf("%d connections holding %d bytes of hello, opened in %v: daemon RSS %d -> %d KiB (%.0f bytes each), PSS %d -> %d KiB (%.0f bytes each)",
		n, len(half), opened.Round(time.Millisecond), rss0>>10, rss1>>10, perRSS, pss0>>10, pss1>>10, perPSS)

	// A normal client meanwhile is served promptly.
	t0 := time.Now()
	if got, err := whoAnswers(t, addr, "good.example.com"); got != "good" {
		t.Fatalf("normal client among %d held: %q %v\n%s", n, got, err, d.stderr.String())
	}
	if took := time.Since(t0); took > 2*time.Second {
		t.Errorf("normal client among %d held served in %v", n, took)
	}
	// The held ones are still waiting (not refused to make room).
	for _, i := range []int{0, n / 2, n - 1} {
		conns[i].SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if _, err := conns[i].Read(make([]byte, 1)); !isTimeout(err) {
			t.Errorf("held connection %d: %v, want it still open", i, err)
		}
	}
	// A buffer of the largest tier per connection would be 16 KiB and more;
	// the smallest tier is 2 KiB, the State and the session about 1 KiB.
	if perRSS > 12<<10 {
		t.Errorf("%.0f bytes per held connection", perRSS)
	}
}

// What the hello said is seen everywhere: the access log's sni and alpn,
// ctl sessions, the per-route counters (ctl stats, metrics, the hello size
// histogram) and the status page's list of a listener's routes.
func TestSNISeenEverywhere(t *testing.T) {
	// A backend that holds its sessions open, so ctl sessions sees them.
	hold, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer hold.Close()
	go func() {
		for {
			c, err := hold.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(io.Discard, c); c.Close() }()
		}
	}()
	def := tlsBackend(t, "default")
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	metricsPort := freePort(t)
	d := startRulesWith(t, fmt.Sprintf("log: {level: info}\nmetrics: {listen: 127.0.0.1:%d}\n", metricsPort), addr,
		"tcp "+addr+" -> "+hold.Addr().String()+" sni=a.example.com alpn=h2",
		"tcp "+addr+" -> "+hold.Addr().String()+" sni=*.w.example.com",
		"tcp "+addr+" -> "+def)
	base := fmt.Sprintf("http://127.0.0.1:%d/", metricsPort)

	// Two held sessions, one exact (by reference to the route's name), one
	// by wildcard (the client's name, lower-cased), each with a raw hello.
	var held []net.Conn
	for _, h := range []struct{ name string }{{"A.Example.com"}, {"x.W.example.com"}} {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		cfg := &tls.Config{ServerName: h.name, NextProtos: []string{"h2", "http/1.1"}, InsecureSkipVerify: true}
		go tls.Client(c, cfg).Handshake() // the backend never answers: the hello is all it sends
		held = append(held, c)
	}
	var out string
	waitFor(t, 5*time.Second, "both sessions forwarding", func() bool {
		_, out, _ = runSluice(t, "ctl", "-s", d.Ctl, "sessions", "--json")
		return strings.Count(out, `"forwarding"`) == 2
	})
	for _, want := range []string{`"sni":"a.example.com"`, `"alpn":"h2"`, `"sni":"x.w.example.com"`} {
		if !strings.Contains(out, want) {
			t.Errorf("ctl sessions --json lacks %s:\n%s", want, out)
		}
	}
	_, table, _ := runSluice(t, "ctl", "-s", d.Ctl, "sessions")
	if !strings.Contains(table, "SNI") || !strings.Contains(table, "a.example.com") {
		t.Errorf("ctl sessions:\n%s", table)
	}
	// A default-route session and a refused hello (no route: it matches the
	// default) for the counters; then the held ones end.
	if got, err := whoAnswers(t, addr, "nobody.example.com"); got != "default" {
		t.Errorf("default route: %q %v", got, err)
	}
	for _, c := range held {
		c.Close()
	}
	waitFor(t, 5*time.Second, "the access log lines", func() bool {
		return strings.Count(d.stderr.String(), `"sni":`) >= 3
	})
	log := d.stderr.String()
	for _, want := range []string{`"sni": ?"a.example.com", ?"alpn": ?"h2"`, `"sni": ?"x.w.example.com", ?"alpn": ?"h2"`, `"sni": ?"nobody.example.com"`} {
		if !regexp.MustCompile(want).MatchString(log) {
			t.Errorf("access log lacks %s:\n%s", want, log)
		}
	}

	// A malformed hello: refused by the sni stage, counted on the key's
	// first route.
	bad, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	bad.Write([]byte{22, 3, 1, 0, 8, 2, 0, 0, 4, 0, 0, 0, 0})
	bad.SetReadDeadline(time.Now().Add(3 * time.Second))
	bad.Read(make([]byte, 1))
	bad.Close()

	a := "tcp " + addr + " sni=a.example.com alpn=h2"
	var text string
	waitFor(t, 5*time.Second, "the refusal counted", func() bool {
		_, text = httpGet(t, base+"metrics")
		v, _ := metricValue(text, `sluice_rule_refused_total{pif="host",reason="tls-hello-bad",rule="`+a+`",step="sni"}`)
		return v == 1
	})
	for _, sample := range []string{
		`sluice_rule_connections_total{pif="host",rule="` + a + `"}`,
		`sluice_rule_tls_hello_bytes_count{pif="host",rule="` + a + `"}`,
		`sluice_rule_tls_hello_bytes_count{pif="host",rule="tcp ` + addr + ` sni=*.w.example.com"}`,
		`sluice_rule_tls_hello_bytes_count{pif="host",rule="tcp ` + addr + `"}`,
	} {
		if v, ok := metricValue(text, sample); !ok || v != 1 {
			t.Errorf("%s = %v (%v), want 1", sample, v, ok)
		}
	}
	if v, ok := metricValue(text, `sluice_rule_tls_hello_bytes_bucket{pif="host",rule="`+a+`",le="1024"}`); !ok || v != 0 {
		t.Errorf("a post-quantum hello is in the 1024-byte bucket (%v %v)", v, ok)
	}
	_, stats, _ := runSluice(t, "ctl", "-s", d.Ctl, "stats")
	if !regexp.MustCompile(regexp.QuoteMeta("rule."+strings.ReplaceAll(a, " ", "_")+".refused.sni.tls-hello-bad") + ` +1\n`).MatchString(stats) {
		t.Errorf("ctl stats has no refusal by the sni stage on route %q:\n%s", a, stats)
	}
	_, page := httpGet(t, base)
	if !strings.Contains(page, "routes of this listener") || !strings.Contains(page, "sni=*.w.example.com") {
		t.Errorf("the status page does not list the listener's routes")
	}
}
