package integration

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/handshake"
	"github.com/sluice-proxy/sluice/internal/testcert"
	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// captureProxy accepts conns that start with a PROXY header, answers
// "ok\n" and sends each header's bytes after the address block (the TLVs,
// as written) on the returned channel.
func captureProxy(t *testing.T) (string, <-chan []byte) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ch := make(chan []byte, 8)
	testpeer.Accept(ln, func(c net.Conn) {
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		var b []byte
		buf := make([]byte, 4096)
		for {
			n, err := c.Read(buf)
			b = append(b, buf[:n]...)
			if l, _ := handshake.HeaderLen(b); l > 0 && len(b) >= l {
				const v4 = 16 + 12 // signature, length, IPv4 addresses and ports
				ch <- bytes.Clone(b[v4:l])
				c.Write([]byte("ok\n"))
				return
			}
			if err != nil {
				ch <- nil
				return
			}
		}
	})
	return ln.Addr().String(), ch
}

// send-proxy=v2 on a terminating route writes PP2_TYPE_AUTHORITY (the SNI)
// and PP2_TYPE_SSL (client flags, verify, version, the client
// certificate's CN, cipher) byte for byte as HAProxy does with
// "proxy-v2-options ssl,cert-cn,ssl-cipher,authority" for the same client
// (TLS 1.2 and 1.3, pinned suites), on a full handshake and on a session
// resumed from a ticket (the certificate the session's, not the conn's,
// its CN still written); and HAProxy with accept-proxy behind
// sluice reads the authority (fc_pp_authority, echoed by http-request
// return).
func TestTLSSendProxySSL(t *testing.T) {
	dir := t.TempDir()
	ca := testcert.NewCA(t, dir)
	crt, key := ca.Leaf(t, "a", "a.example.com")
	ccrt, ckey := ca.Leaf(t, "client", "client one")
	combined := combinedPEM(t, crt, key)

	slCap, slCh := captureProxy(t)
	haCap, haCh := captureProxy(t)
	haFront := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	haPP := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	conf := absPath(t, writeFile(t, "haproxy.cfg", fmt.Sprintf(`global
	maxconn 100
defaults
	timeout connect 2s
	timeout client 10s
	timeout server 10s
listen term
	mode tcp
	bind %s ssl crt %s ca-file %s verify required
	server s %s send-proxy-v2 proxy-v2-options ssl,cert-cn,ssl-cipher,authority
listen pp
	mode http
	bind %s accept-proxy
	http-request return status 200 content-type text/plain lf-string "authority=%%[fc_pp_authority]\n"
`, haFront, combined, ca.File, haCap, haPP)))
	startExt(t, haFront, "haproxy", "-f", conf, "-db")

	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	addr2 := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	d := startRules(t, addr,
		"tcp "+addr+" -> "+slCap+" tls.cert="+crt+" tls.key="+key+" tls.client-ca="+ca.File+" send-proxy=v2",
		"tcp "+addr2+" -> "+haPP+" tls.cert="+crt+" tls.key="+key+" send-proxy=v2")
	d.waitListening(addr2)

	pair, err := tls.LoadX509KeyPair(ccrt, ckey)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	var suite uint16                 // the last dial's
	var didResume bool               // the last dial's
	var cache tls.ClientSessionCache // the next dials' (nil: none)
	dial := func(to string, v uint16, withCert bool) string {
		cfg := &tls.Config{ServerName: "a.example.com", RootCAs: pool, MinVersion: v, MaxVersion: v,
			CipherSuites: []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256}, ClientSessionCache: cache}
		if withCert {
			cfg.Certificates = []tls.Certificate{pair}
		}
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", to, cfg)
		if err != nil {
			t.Fatalf("dial %s: %v\n%s", to, err, d.stderr.String())
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		suite, didResume = c.ConnectionState().CipherSuite, c.ConnectionState().DidResume
		if withCert {
			b, err := io.ReadAll(c)
			if err != nil && !strings.Contains(err.Error(), "reset") {
				t.Logf("read %s: %v", to, err)
			}
			return string(b)
		}
		fmt.Fprintf(c, "GET / HTTP/1.0\r\nHost: a.example.com\r\n\r\n")
		b, _ := io.ReadAll(c)
		return string(b)
	}
	wait := func(ch <-chan []byte, who string) []byte {
		select {
		case b := <-ch:
			return b
		case <-time.After(5 * time.Second):
			t.Fatalf("no PROXY header from %s", who)
			return nil
		}
	}
	for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		// TLS 1.3's suites cannot be pinned by a Go client and the two
		// servers prefer different ones: each header must name the suite
		// its client saw (1.3 names are the same in OpenSSL and Go), the
		// rest must be the same bytes.
		if out := dial(addr, v, true); out != "ok\n" {
			t.Errorf("through sluice: %q", out)
		}
		sl := maskSuite(t, wait(slCh, "sluice"), v, suite)
		if out := dial(haFront, v, true); out != "ok\n" {
			t.Errorf("through HAProxy: %q", out)
		}
		ha := maskSuite(t, wait(haCh, "HAProxy"), v, suite)
		if !bytes.Equal(sl, ha) {
			t.Errorf("%s: sluice's TLVs differ from HAProxy's\nsluice  %q\nHAProxy %q", tls.VersionName(v), sl, ha)
		}
		for _, want := range []string{"a.example.com", "client one", "TLSv1."} {
			if !bytes.Contains(sl, []byte(want)) {
				t.Errorf("%s: no %q in %q", tls.VersionName(v), want, sl)
			}
		}
	}
	// A resumed session (a ticket from the conn before, which presented
	// the client certificate): both write the certificate as the
	// session's, not the conn's, and still its verified CN, byte for byte
	// the same TLVs.
	for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		var hdr [2][]byte
		for i, to := range []string{addr, haFront} {
			cache = tls.NewLRUClientSessionCache(4)
			ch := []<-chan []byte{slCh, haCh}[i]
			for try := 0; try < 2; try++ {
				if out := dial(to, v, true); out != "ok\n" {
					t.Errorf("%s via %s, conn %d: %q", tls.VersionName(v), to, try, out)
				}
				hdr[i] = maskSuite(t, wait(ch, to), v, suite)
			}
			if !didResume {
				t.Fatalf("%s via %s: the second conn did not resume", tls.VersionName(v), to)
			}
		}
		cache = nil
		if !bytes.Equal(hdr[0], hdr[1]) {
			t.Errorf("%s resumed: sluice's TLVs differ from HAProxy's\nsluice  %q\nHAProxy %q", tls.VersionName(v), hdr[0], hdr[1])
		}
		if !bytes.Contains(hdr[0], []byte("client one")) {
			t.Errorf("%s resumed: no CN in %q", tls.VersionName(v), hdr[0])
		}
	}
	if out := dial(addr2, tls.VersionTLS13, false); !strings.Contains(out, "authority=a.example.com\n") {
		t.Errorf("HAProxy accept-proxy behind sluice: %q\n%s", out, d.stderr.String())
	}
}

// maskSuite replaces a TLS 1.3 suite's name in b by a placeholder of the
// same length, after checking it is there.
func maskSuite(t *testing.T, b []byte, v, suite uint16) []byte {
	t.Helper()
	if v != tls.VersionTLS13 {
		return b
	}
	name := []byte(tls.CipherSuiteName(suite))
	if !bytes.Contains(b, name) {
		t.Errorf("no %s in %q", name, b)
	}
	return bytes.ReplaceAll(b, name, bytes.Repeat([]byte{'*'}, len(name)))
}

// tlsSerial dials addr for name and returns the serial number of the
// certificate it got, after one echoed line.
func tlsSerial(t *testing.T, addr, name string, pool *x509.CertPool) string {
	t.Helper()
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, &tls.Config{ServerName: name, RootCAs: pool})
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	echoLine(t, c, "hello")
	return c.ConnectionState().PeerCertificates[0].SerialNumber.String()
}

// tlsResumed dials addr for a.example.com with the session cache tickets,
// echoes a line (a TLS 1.3 ticket arrives after the handshake, read with
// it) and reports whether the conn resumed a session.
func tlsResumed(t *testing.T, addr string, pool *x509.CertPool, tickets tls.ClientSessionCache) bool {
	t.Helper()
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr,
		&tls.Config{ServerName: "a.example.com", RootCAs: pool, ClientSessionCache: tickets})
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	echoLine(t, c, "hello")
	return c.ConnectionState().DidResume
}

func echoLine(t *testing.T, c net.Conn, s string) {
	t.Helper()
	if _, err := fmt.Fprintln(c, s); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, len(s)+1)
	if _, err := io.ReadFull(c, b); err != nil || string(b) != s+"\n" {
		t.Fatalf("echo: %q, %v", b, err)
	}
}

// A new certificate file is picked up by an apply of the unchanged table,
// on the same listening socket (same inode), a session established before
// it keeps going and a ticket issued before it resumes; a certificate file that has disappeared fails the
// apply at the rule's line, naming the option and the file, and the
// running table keeps serving with the certificate it loaded.
func TestTLSCertReloadOnApply(t *testing.T) {
	dir := t.TempDir()
	ca := testcert.NewCA(t, dir)
	crt, key := ca.Leaf(t, "a", "a.example.com")
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	port := freePort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	tb := liveTable{lines: []string{"tcp " + addr + " -> " + echoPlain(t) + " tls.cert=" + crt + " tls.key=" + key}}
	d := startLive(t, tb)
	d.waitListening(addr)
	inode := d.listenInodes()[port]
	first := tlsSerial(t, addr, "a.example.com", pool)
	tickets := tls.NewLRUClientSessionCache(4) // a client resuming across the apply
	if tlsResumed(t, addr, pool, tickets) {
		t.Fatal("the first conn resumed")
	}

	old, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, &tls.Config{ServerName: "a.example.com", RootCAs: pool})
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	old.SetDeadline(time.Now().Add(30 * time.Second))
	echoLine(t, old, "before")
	if code, out, _ := d.cli("sessions"); code != 0 || !strings.Contains(out, "TLS 1.3 TLS_") {
		t.Errorf("ctl sessions: exit %d, no TLS 1.3 session:\n%s", code, out)
	}

	// A new pair in place of the old files (renamed over them, as a
	// certificate manager does).
	crt2, key2 := ca.Leaf(t, "a2", "a.example.com")
	for from, to := range map[string]string{crt2: crt, key2: key} {
		if err := os.Rename(from, to); err != nil {
			t.Fatal(err)
		}
	}
	same := tb.file(t, "same.rules")
	if code, out, errs := d.cli("apply", same); code != 0 {
		t.Fatalf("apply of the unchanged table: exit %d\n%s%s", code, out, errs)
	}
	if got := tlsSerial(t, addr, "a.example.com", pool); got == first {
		t.Errorf("after the apply, still the old certificate (serial %s)", got)
	}
	// The apply made the route's TLS anew: its tickets from before resume.
	if !tlsResumed(t, addr, pool, tickets) {
		t.Error("after the apply, a ticket from before it did not resume")
	}
	if got := d.listenInodes()[port]; got != inode {
		t.Errorf("listening socket inode %s, was %s: the socket was reopened", got, inode)
	}
	echoLine(t, old, "after the apply")
	served := tlsSerial(t, addr, "a.example.com", pool)

	// The certificate file disappears: the apply fails at the rule's line.
	if err := os.Remove(crt); err != nil {
		t.Fatal(err)
	}
	code, out, errs := d.cli("apply", same)
	if want := same + ":2: "; code != 2 || !strings.Contains(errs, want) || !strings.Contains(errs, "tls.cert "+crt+": ") {
		t.Errorf("apply with the certificate gone: exit %d\nstdout:\n%s\nstderr:\n%s\nwant exit 2, %q and tls.cert %s", code, out, errs, want, crt)
	}
	if got := tlsSerial(t, addr, "a.example.com", pool); got != served {
		t.Errorf("after the refused apply: serial %s, want %s (the running table's)", got, served)
	}
	if got := d.listenInodes()[port]; got != inode {
		t.Errorf("listening socket inode %s after the refused apply, was %s", got, inode)
	}
	echoLine(t, old, "after the refused apply")
}

// clientHello returns the first record a Go crypto/tls client writes for
// name: its whole ClientHello.
func clientHello(t *testing.T, name string) []byte {
	t.Helper()
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	go tls.Client(a, &tls.Config{ServerName: name, InsecureSkipVerify: true}).Handshake()
	b.SetDeadline(time.Now().Add(5 * time.Second))
	head := make([]byte, 5)
	if _, err := io.ReadFull(b, head); err != nil {
		t.Fatal(err)
	}
	rec := make([]byte, 5+int(head[3])<<8|int(head[4]))
	copy(rec, head)
	if _, err := io.ReadFull(b, rec[5:]); err != nil {
		t.Fatal(err)
	}
	return rec
}

// 2 000 handshakes left half done at once — 1 000 whole hellos that never
// send their Finished (each server handshake waits on its goroutine), 1 000
// hellos cut in half (the sni stage waits on the loop) — while a good
// client is served promptly; every one of them is closed by
// timeout.handshake, and counted as a failed handshake.
func TestTLSHalfDoneHandshakes(t *testing.T) {
	dir := t.TempDir()
	ca := testcert.NewCA(t, dir)
	crt, key := ca.Leaf(t, "a", "a.example.com")
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	const hsTimeout = 6 * time.Second
	d := startLive(t, liveTable{lines: []string{"tcp " + addr + " -> " + echoPlain(t) + " tls.cert=" + crt + " tls.key=" + key +
		" timeout.handshake=" + hsTimeout.String()}})
	d.waitListening(addr)
	hello := clientHello(t, "a.example.com")

	const n = 2000
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	start := time.Now()
	for i := 0; i < n; i++ {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		conns = append(conns, c)
		b := hello
		if i%2 == 1 {
			b = hello[:len(hello)/2]
		}
		if _, err := c.Write(b); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
	opened := time.Since(start)
	t0 := time.Now()
	tlsSerial(t, addr, "a.example.com", pool)
	if took := time.Since(t0); took > 2*time.Second {
		t.Errorf("the good client took %v among %d half-done handshakes", took, n)
	}
	t.Logf("%d half-done handshakes opened in %v; a good client served in %v", n, opened, time.Since(t0))
	if time.Since(start) > hsTimeout-time.Second {
		t.Fatalf("too slow to open the conns (%v) to check they were still open", time.Since(start))
	}

	// Each is closed by the daemon within timeout.handshake (plus slack for
	// a loaded machine), whatever it had sent.
	var wg sync.WaitGroup
	var closed, hung atomic.Int64
	limit := start.Add(hsTimeout + 10*time.Second)
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.SetReadDeadline(limit)
			_, err := io.Copy(io.Discard, c)
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				hung.Add(1)
				return
			}
			closed.Add(1)
		}()
	}
	wg.Wait()
	if hung.Load() != 0 || closed.Load() != n {
		t.Errorf("%d closed by the daemon, %d still open %v after they started", closed.Load(), hung.Load(), hsTimeout+10*time.Second)
	}
	t.Logf("all closed %v after the first", time.Since(start))
	code, out, errs := d.cli("stats")
	if code != 0 {
		t.Fatalf("ctl stats: exit %d %s", code, errs)
	}
	var failed int
	for _, l := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(l, "tls.handshakes_failed "); ok {
			fmt.Sscan(v, &failed)
		}
	}
	t.Logf("tls.handshakes_failed %d", failed)
	if failed < n/2 {
		t.Errorf("tls.handshakes_failed %d, want at least %d (the whole hellos')\n%s", failed, n/2, out)
	}
}

// Memory per idle TLS session: N sessions terminated by sluice (TLS 1.3,
// ECDSA P-256, a session ticket sent), one round trip each, then silence;
// the daemon's RSS delta / N. HAProxy (OpenSSL) terminating with the same
// certificate in front of the same echo backend is the anchor, measured
// the same way. SLUICE_IDLE_TLS_SESSIONS sets N (default 3 000).
func TestIdleTLSSessionsMemory(t *testing.T) {
	n := envInt("SLUICE_IDLE_TLS_SESSIONS", 3000)
	dir := t.TempDir()
	ca := testcert.NewCA(t, dir)
	crt, key := ca.Leaf(t, "a", "a.example.com")
	combined := combinedPEM(t, crt, key)
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	echo := startPeer(t, "echo")
	tlsPing := func(addr string) func() net.Conn {
		return func() net.Conn {
			c, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", addr, &tls.Config{ServerName: "a.example.com", RootCAs: pool})
			if err != nil {
				t.Error(err)
				return nil
			}
			return roundTrip(t, c)
		}
	}

	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	d := startRules(t, addr, "tcp "+addr+" -> "+echo.Addr+" tls.cert="+crt+" tls.key="+key)
	h := holdIdleBy(t, tlsPing(addr), d.cmd.Process.Pid, n)
	sl := h.perSession()
	t.Logf("sluice: %d idle TLS sessions opened in %v; RSS %d KiB -> %d KiB: %.0f bytes per idle TLS session; fds %v -> %v",
		n, h.opened.Round(time.Millisecond), h.rssBefore>>10, h.rssAfter>>10, sl, h.fdsBefore, h.fdsAfter)
	if got := h.fdsAfter["socket"] - h.fdsBefore["socket"]; got != 2*n {
		t.Errorf("daemon holds %d more sockets, want %d (two per session: no handshake's dup left)", got, 2*n)
	}
	h.close()

	haAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	conf := absPath(t, writeFile(t, "haproxy.cfg", fmt.Sprintf(`global
	maxconn %d
defaults
	mode tcp
	timeout connect 5s
	timeout client 60s
	timeout server 60s
listen term
	bind %s ssl crt %s
	server s %s
`, 2*n+100, haAddr, combined, echo.Addr)))
	ha := startExt(t, haAddr, "haproxy", "-f", conf, "-db")
	hh := holdIdleBy(t, tlsPing(haAddr), ha.cmd.Process.Pid, n)
	hp := hh.perSession()
	t.Logf("HAProxy: %d idle TLS sessions; RSS %d KiB -> %d KiB: %.0f bytes per idle TLS session",
		n, hh.rssBefore>>10, hh.rssAfter>>10, hp)
	hh.close()
	t.Logf("per idle TLS session: sluice %.0f B, HAProxy %.0f B (%.2f×)", sl, hp, sl/hp)
}

// combinedPEM writes the certificate and key files in one, as HAProxy's
// crt wants them, and returns its path.
func combinedPEM(t *testing.T, crt, key string) string {
	t.Helper()
	cb, err1 := os.ReadFile(crt)
	kb, err2 := os.ReadFile(key)
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}
	f := crt + ".combined.pem"
	if err := os.WriteFile(f, append(cb, kb...), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}
