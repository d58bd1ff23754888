package main

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/testcert"
)

// runCaptured is run(args) with what it writes to stdout and stderr.
func runCaptured(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	read := func(f *os.File) <-chan string {
		ch := make(chan string, 1)
		go func() { b, _ := io.ReadAll(f); ch <- string(b) }()
		return ch
	}
	or, ow, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	er, ew, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	outc, errc := read(or), read(er)
	saveOut, saveErr := os.Stdout, os.Stderr
	os.Stdout, os.Stderr = ow, ew
	code = run(args)
	os.Stdout, os.Stderr = saveOut, saveErr
	ow.Close()
	ew.Close()
	return code, <-outc, <-errc
}

// sluice check prints every problem of every line, each at its line, exit
// 2; it reads the rules' TLS files as run does, a problem at the rule's
// line in run's words (FILE:LINE: RULE: tls.cert FILE: …).
func TestCheck(t *testing.T) {
	dir := t.TempDir()
	ca := testcert.NewCA(t, dir)
	crt, key := ca.Leaf(t, "a", "a.example.com")
	_, otherKey := ca.Leaf(t, "b", "b.example.com")
	oldCrt, oldKey := ca.LeafValid(t, "old", "old.example.com", time.Now().Add(-48*time.Hour), time.Now().Add(-24*time.Hour))
	missing := filepath.Join(dir, "gone.pem")
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, tc := range []struct {
		name, ext, body string
		code            int
		want            []string // stderr's lines (FILE: is the file), or stdout's one for 0
	}{
		{"two bad options", "rules", "tcp 127.0.0.1:1 -> 127.0.0.1:2 splice=maybe send-proxy=v3\n", 2, []string{
			"FILE:1: splice=maybe: want auto, on or off", "FILE:1: send-proxy=v3: want v1 or v2"}},
		{"two bad options in YAML", "yaml", "rules:\n  - tcp 127.0.0.1:1 -> 127.0.0.1:2\n  - tcp 127.0.0.1:3 -> 127.0.0.1:2 rate=5 maxconn=0\n", 2, []string{
			"FILE:3: rate=5: want N/s, as rate=100/s", "FILE:3: maxconn=0: want a whole number from 1 to 1000000000"}},
		{"one bad option", "rules", "tcp 127.0.0.1:1 -> 127.0.0.1:2 balance=first\n", 2, []string{
			"FILE:1: balance=first: want roundrobin, leastconn or source"}},
		{"good TLS", "rules", "tcp 127.0.0.1:1 -> 127.0.0.1:2 tls.cert=" + crt + " tls.key=" + key + " tls.client-ca=" + ca.File + "\n", 0, []string{
			"FILE: ok: 1 rule, 1 listen port"}},
		// run loads an expired certificate as it is (its expiry is on the
		// status page and in a metric, no warning), and so does check
		{"expired certificate", "rules", "tcp 127.0.0.1:1 -> 127.0.0.1:2 tls.cert=" + oldCrt + " tls.key=" + oldKey + "\n", 0, []string{
			"FILE: ok: 1 rule, 1 listen port"}},
		{"TLS files", "rules", "# certificates\n" +
			"tcp 127.0.0.1:1 -> 127.0.0.1:2 tls.cert=" + missing + "\n" +
			"tcp 127.0.0.1:3 -> 127.0.0.1:2 tls.cert=" + crt + " tls.key=" + otherKey + "\n" +
			"tcp 127.0.0.1:4 -> 127.0.0.1:2 tls.cert=" + crt + " tls.key=" + key + " tls.client-ca=" + key + "\n" +
			"tcp 127.0.0.1:5 -> 127.0.0.1:2 tls.backend=verify tls.backend-ca=" + missing + "\n", 2, []string{
			"FILE:2: tcp 127.0.0.1:1 -> 127.0.0.1:2 tls.cert=" + missing + ": tls.cert " + missing + ": open " + missing + ": no such file or directory",
			"FILE:3: tcp 127.0.0.1:3 -> 127.0.0.1:2 tls.cert=" + crt + " tls.key=" + otherKey + ": tls.key " + otherKey + ": the key does not match the certificate",
			"FILE:4: tcp 127.0.0.1:4 -> 127.0.0.1:2 tls.cert=" + crt + " tls.key=" + key + " tls.client-ca=" + key + ": tls.client-ca " + key + ": no PEM certificate in the file",
			"FILE:5: tcp 127.0.0.1:5 -> 127.0.0.1:2 tls.backend=verify tls.backend-ca=" + missing + ": tls.backend-ca " + missing + ": open " + missing + ": no such file or directory"}},
		// the files store.etcd names, read as run reads them, at the etcd
		// mapping's line (as run gives it); etcd itself is not contacted
		{"store files", "yaml", "store:\n  etcd:\n    endpoints: [http://127.0.0.1:1]\n    prefix: /sluice/a\n" +
			"    user: u\n    password-file: " + missing + "\nrules:\n  - tcp 127.0.0.1:1 -> 127.0.0.1:2\n", 2, []string{
			"FILE:3: store.etcd: etcd password file: open " + missing + ": no such file or directory"}},
		{"store CA", "yaml", "store:\n  etcd:\n    endpoints: [https://127.0.0.1:1]\n    prefix: /sluice/a\n" +
			"    ca: " + key + "\nrules:\n  - tcp 127.0.0.1:1 -> 127.0.0.1:2\n", 2, []string{
			"FILE:3: store.etcd: etcd ca " + key + ": no PEM certificate in it"}},
		{"store client pair", "yaml", "store:\n  etcd:\n    endpoints: [https://127.0.0.1:1]\n    prefix: /sluice/a\n" +
			"    ca: " + ca.File + "\n    cert: " + crt + "\n    key: " + otherKey + "\nrules:\n  - tcp 127.0.0.1:1 -> 127.0.0.1:2\n", 2, []string{
			"FILE:3: store.etcd: etcd client certificate: tls: private key does not match public key"}},
		{"store files good", "yaml", "store:\n  etcd:\n    endpoints: [https://127.0.0.1:1]\n    prefix: /sluice/a\n" +
			"    ca: " + ca.File + "\n    cert: " + crt + "\n    key: " + key + "\n    user: u\n    password-file: " + write("pw", "secret\n") + "\nrules:\n  - tcp 127.0.0.1:1 -> 127.0.0.1:2\n", 0, []string{
			"FILE: ok: 1 rule, 1 listen port, 0 pifs"}},
		{"TLS files in YAML", "yaml", "rules:\n  - tcp 127.0.0.1:1 -> 127.0.0.1:2 tls.cert=" + crt + "\n", 2, []string{
			"FILE:2: tcp 127.0.0.1:1 -> 127.0.0.1:2 tls.cert=" + crt + ": tls.cert " + crt + ": no private key (PEM PRIVATE KEY block) in the file: give tls.key"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			file := write(strings.ReplaceAll(tc.name, " ", "-")+"."+tc.ext, tc.body)
			flag := map[string]string{"rules": "-r", "yaml": "-c"}[tc.ext]
			code, stdout, stderr := runCaptured(t, "check", flag, file)
			got := stderr
			if tc.code == 0 {
				got = stdout
			}
			want := strings.ReplaceAll(strings.Join(tc.want, "\n")+"\n", "FILE", file)
			if code != tc.code || got != want {
				t.Errorf("sluice check %s %s: exit %d\nstdout:\n%sstderr:\n%swant exit %d and\n%s", flag, file, code, stdout, stderr, tc.code, want)
			}
		})
	}
}
