package integration

import (
	"bufio"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// startExt runs a third-party daemon (HAProxy, nginx) in the foreground, as
// the shared daemon helper runs sluice (output collected, stopped by its PID
// when the test ends), and waits until addr accepts connections.
func startExt(t *testing.T, addr string, name string, args ...string) *daemon {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s is not installed (scripts/test-deps.sh installs it): %v", name, err)
	}
	d := startDaemon(t, forwardOpts{prog: path}, args...)
	d.waitListening(addr)
	return d
}

// startNginxEcho runs nginx's stream module on a loopback port with
// proxy_protocol; per conn it answers the address the PROXY header carried,
// "$proxy_protocol_addr:$proxy_protocol_port", and closes.
func startNginxEcho(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	// nginx reads a relative -c against its -p prefix: give it the full path.
	conf := absPath(t, writeFile(t, "nginx.conf", fmt.Sprintf(`
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
master_process off;
worker_processes 1;
pid %s/nginx.pid;
error_log stderr notice;
events { worker_connections 256; }
stream {
	server {
		listen %s proxy_protocol;
		return "$proxy_protocol_addr:$proxy_protocol_port\n";
	}
}
`, dir, addr)))
	startExt(t, addr, "nginx", "-p", dir, "-c", conf, "-e", "stderr")
	return addr
}

// dialFrom connects to addr from a chosen loopback source address.
func dialFrom(t *testing.T, src, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// sluice's send-proxy=v1|v2 to nginx: nginx reads the client's own address.
func TestSendProxyToNginx(t *testing.T) {
	ng := startNginxEcho(t)
	for _, v := range []string{"v1", "v2"} {
		t.Run(v, func(t *testing.T) {
			d := startForward(t, ng, "send-proxy="+v)
			c := dialFrom(t, "127.0.0.7", d.Addr)
			defer c.Close()
			got, err := readLine(c)
			if want := c.LocalAddr().String(); err != nil || got != want {
				t.Fatalf("nginx saw %q (%v), want the client's %q", got, err, want)
			}
		})
	}
}

// HAProxy (send-proxy and send-proxy-v2) -> sluice accept-proxy -> sluice
// send-proxy=v1|v2 -> nginx: the client's chosen 127.0.0.x source address
// and port arrive intact at the end of the chain.
func TestHAProxyThroughSluiceToNginx(t *testing.T) {
	ng := startNginxEcho(t)
	sl := map[string]*daemon{}
	for _, v := range []string{"v1", "v2"} {
		sl[v] = startForward(t, ng, "accept-proxy=127.0.0.1/32", "send-proxy="+v)
	}
	type route struct{ haSend, slSend, front string }
	var routes []route
	var cfg strings.Builder
	fmt.Fprintf(&cfg, `global
	maxconn 200
defaults
	mode tcp
	timeout connect 2s
	timeout client 10s
	timeout server 10s
`)
	for _, ha := range []string{"send-proxy", "send-proxy-v2"} {
		for _, v := range []string{"v1", "v2"} {
			r := route{ha, v, fmt.Sprintf("127.0.0.1:%d", freePort(t))}
			routes = append(routes, r)
			fmt.Fprintf(&cfg, "listen l_%s_%s\n\tbind %s\n\tserver s %s %s\n",
				strings.ReplaceAll(ha, "-", "_"), v, r.front, sl[v].Addr, ha)
		}
	}
	conf := absPath(t, writeFile(t, "haproxy.cfg", cfg.String()))
	startExt(t, routes[0].front, "haproxy", "-f", conf, "-db")
	for i, r := range routes {
		src := fmt.Sprintf("127.0.0.%d", 20+i)
		c := dialFrom(t, src, r.front)
		got, err := readLine(c)
		want := c.LocalAddr().String()
		c.Close()
		if err != nil || got != want {
			t.Errorf("HAProxy %s -> sluice send-proxy=%s -> nginx: nginx saw %q (%v), want %q",
				r.haSend, r.slSend, got, err, want)
		}
	}
}

// haproxyServerStatus asks HAProxy's stats socket for server srv of backend
// be: its status and the result of its last check, "UP L7OK", "DOWN L7RSP"...
// (a server starts UP before any check, so the check result is what proves
// a check passed).
func haproxyServerStatus(t *testing.T, sock, be, srv string) string {
	t.Helper()
	c, err := net.DialTimeout("unix", sock, 2*time.Second)
	if err != nil {
		return "no-socket"
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	fmt.Fprintf(c, "show stat\n")
	sc := bufio.NewScanner(c)
	status, check := -1, -1
	for sc.Scan() {
		f := strings.Split(sc.Text(), ",")
		if strings.HasPrefix(sc.Text(), "# ") {
			for i, name := range f {
				switch name {
				case "status":
					status = i
				case "check_status":
					check = i
				}
			}
			continue
		}
		if status >= 0 && check >= 0 && len(f) > max(status, check) && f[0] == be && f[1] == srv {
			return f[status] + " " + f[check]
		}
	}
	return "missing"
}

// HAProxy's own health checks — option httpchk, a plain tcp connect check,
// and a tcp-check expecting "OK" — see sluice's health ports (monitor source
// 127.0.0.1) as UP; an http check of the tcp reply is the control that must
// fail; curl gets the 200.
func TestHAProxyChecksSeeHealthUp(t *testing.T) {
	echo := startPeer(t, "echo")
	h := startForward(t, echo.Addr, "health=http", "monitor=127.0.0.1/32")
	tc := startForward(t, echo.Addr, "health=tcp", "monitor=127.0.0.1/32")
	dir := t.TempDir()
	sock := filepath.Join(dir, "stats.sock")
	front := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	conf := writeFile(t, "haproxy.cfg", fmt.Sprintf(`global
	stats socket %s mode 600 level admin
defaults
	mode tcp
	timeout connect 2s
	timeout client 10s
	timeout server 10s
	timeout check 2s
frontend f
	bind %s
	default_backend b_http
backend b_http
	mode http
	option httpchk GET /
	http-check expect status 200
	server s %s check inter 200ms fall 1 rise 1
backend b_tcp
	server s %s check inter 200ms fall 1 rise 1
backend b_tcp_expect
	option tcp-check
	tcp-check connect
	tcp-check expect string OK
	server s %s check inter 200ms fall 1 rise 1
backend b_control
	mode http
	option httpchk GET /
	http-check expect status 200
	server s %s check inter 200ms fall 1 rise 1
`, sock, front, h.Addr, tc.Addr, tc.Addr, tc.Addr))
	hp := startExt(t, front, "haproxy", "-f", conf, "-db")
	want := map[string]string{"b_http": "UP L7OK", "b_tcp": "UP L4OK", "b_tcp_expect": "UP L7OK", "b_control": "DOWN L7RSP"}
	got := map[string]string{}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		for be := range want {
			got[be] = haproxyServerStatus(t, sock, be, "s")
		}
		if fmt.Sprint(got) == fmt.Sprint(want) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("HAProxy sees %v, want %v\n%s", got, want, hp.stderr.String())
	}
	t.Logf("HAProxy sees (status, last check): %v", got)
	out, err := exec.Command("curl", "-s", "-i", "--max-time", "5", "http://"+h.Addr+"/").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "HTTP/1.0 200 OK") {
		t.Fatalf("curl: %v\n%s", err, out)
	}
}

// A draining daemon answers 503 on its health port until its live sessions
// end; then it exits.
func TestDrainedDaemonAnswers503(t *testing.T) {
	echo := startPeer(t, "echo")
	d := startForward(t, echo.Addr, "health=http", "monitor=127.0.0.1/32", "--drain-timeout", "20s")
	curl := func() string {
		out, _ := exec.Command("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3", "http://"+d.Addr+"/").Output()
		return string(out)
	}
	if got := curl(); got != "200" {
		t.Fatalf("before the drain: %q", got)
	}
	// A live session from a non-monitor source holds the drain open.
	c := dialFrom(t, "127.0.0.2", d.Addr)
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("ping\n")); err != nil {
		t.Fatal(err)
	}
	if got, err := readLine(c); err != nil || got != "ping" {
		t.Fatalf("session: %q %v", got, err)
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	var got string
	deadline := time.Now().Add(5 * time.Second)
	for got = curl(); got != "503" && time.Now().Before(deadline); got = curl() {
		time.Sleep(50 * time.Millisecond)
	}
	if got != "503" {
		t.Fatalf("while draining: %q, want 503\n%s", got, d.stderr.String())
	}
	// New non-probe conns are not served while draining.
	if _, err := c.Write([]byte("still\n")); err != nil {
		t.Fatalf("the live session was cut by the drain: %v", err)
	}
	if got, err := readLine(c); err != nil || got != "still" {
		t.Fatalf("live session while draining: %q %v", got, err)
	}
	c.Close()
	select {
	case err := <-d.exited:
		d.exited <- err
		if err != nil {
			t.Errorf("exit: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("did not exit after its last session ended\n%s", d.stderr.String())
	}
}
