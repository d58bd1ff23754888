package integration

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// peerCountEnv tells a "slowloris" peer how many conns to hold.
const peerCountEnv = "SLUICE_IT_PEER_COUNT"

// slowloris opens n conns to target and sends each one byte of a PROXY v1
// header per second, never finishing (the header is 40 bytes). It returns
// how many conns it opened and a function that closes them.
func slowloris(target, count string) (int, func(), error) {
	n, err := strconv.Atoi(count)
	if err != nil || n <= 0 {
		return 0, nil, fmt.Errorf("slowloris: count %q", count)
	}
	hdr := []byte("PROXY TCP4 192.0.2.1 192.0.2.2 1000 80\r\n")
	conns := make([]net.Conn, 0, n)
	for i := 0; i < n; i++ {
		c, err := net.DialTimeout("tcp", target, 5*time.Second)
		if err != nil {
			for _, c := range conns {
				c.Close()
			}
			return 0, nil, fmt.Errorf("slowloris: conn %d: %w", i, err)
		}
		c.(*net.TCPConn).SetNoDelay(true)
		conns = append(conns, c)
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for i := 0; i < len(hdr)-2; i++ {
			for _, c := range conns {
				c.Write(hdr[i : i+1]) // errors: sluice closed it, as it should in time
			}
			select {
			case <-done:
				return
			case <-t.C:
			}
		}
	}()
	return n, func() {
		close(done)
		wg.Wait()
		for _, c := range conns {
			c.Close()
		}
	}, nil
}

// ruleCounters finds the "rule counters" line a stopped daemon logged (json
// log format) and returns its counters.
func ruleCounters(t *testing.T, d *daemon) map[string]any {
	t.Helper()
	if err := d.stop(10 * time.Second); err != nil {
		t.Errorf("stop: %v", err)
	}
	for _, line := range strings.Split(d.stderr.String(), "\n") {
		if !strings.Contains(line, `"rule counters"`) {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("%v: %s", err, line)
		}
		if c, ok := m["counters"].(map[string]any); ok {
			return c
		}
	}
	t.Fatalf("no rule counters logged:\n%s", tail(d.stderr.String(), 3000))
	return nil
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// refusedCount reads counters."refused.STEP.CODE" (0 when absent: zeros
// are not logged).
func refusedCount(c map[string]any, step, code string) float64 {
	n, _ := c["refused."+step+"."+code].(float64)
	return n
}

// transfer runs one checked exchange through sluice with a PROXY header from
// a chosen source, and returns the throughput in MiB/s each way.
func transfer(t *testing.T, addr string, size int64, seed uint64) float64 {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	began := time.Now()
	if _, err := c.Write([]byte("PROXY TCP4 127.0.0.9 127.0.0.1 5555 80\r\n")); err != nil {
		t.Fatal(err)
	}
	if err := testpeer.Exchange(c, size, size, seed); err != nil {
		t.Fatalf("exchange: %v", err)
	}
	return float64(size) / (1 << 20) / time.Since(began).Seconds()
}

// closedBySluice reports whether sluice closes (or resets) a conn that sent
// b, within 3 s; fin also shuts the client's write side after b.
func closedBySluice(addr string, b []byte, fin bool) error {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	c.Write(b)
	if fin {
		c.(*net.TCPConn).CloseWrite()
	}
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, err := c.Read(make([]byte, 64))
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return fmt.Errorf("still open after 3s")
	}
	if n > 0 {
		return fmt.Errorf("got %d bytes back", n)
	}
	return nil
}

// Malformed, truncated, oversized, missing and slow PROXY headers are each
// closed and counted, and 2 000 slow handshakes held open at once do not
// slow a normal client's transfer.
func TestHostileHeaders(t *testing.T) {
	const slow = 2000
	const size = 32 << 20
	hash := startPeer(t, "hash")
	d := startForward(t, hash.Addr, "accept-proxy", "timeout.handshake=6s", "--log-level", "info", "--log-format", "json")
	pid := d.cmd.Process.Pid

	base := transfer(t, d.Addr, size, 1)

	bad := []struct {
		name string
		b    []byte
		fin  bool
	}{
		{"proxy-bad", []byte("PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n"), false},
		{"proxy-bad", []byte("PROXY TCP4 1.2.3.4\r\nGET / HTTP/1.0\r\n\r\n"), false},
		{"proxy-truncated", []byte("PROXY TCP4 1.2.3"), true},
		{"proxy-truncated", []byte("\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c\x01\x02"), true},
		{"proxy-oversized", append([]byte("PROXY TCP4 "), []byte(strings.Repeat("1", 200))...), false},
		{"proxy-oversized", []byte("\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff"), false},
		{"proxy-missing", []byte("GET / HTTP/1.0\r\n\r\n"), false},
	}
	want := map[string]float64{}
	for _, c := range bad {
		if err := closedBySluice(d.Addr, c.b, c.fin); err != nil {
			t.Errorf("%s %q: %v", c.name, c.b, err)
		}
		want[c.name]++
	}

	t.Setenv(peerTargetEnv, d.Addr)
	t.Setenv(peerCountEnv, strconv.Itoa(slow))
	began := time.Now()
	sl := startPeer(t, "slowloris")
	opened := time.Since(began)
	// The peer is ready once its connects completed; sluice accepts from its
	// backlog a moment later.
	held := fdKinds(t, pid)["socket"]
	for wait := time.Now().Add(3 * time.Second); held < slow && time.Now().Before(wait); held = fdKinds(t, pid)["socket"] {
		time.Sleep(20 * time.Millisecond)
	}
	if held < slow {
		t.Fatalf("sluice holds %d sockets; want the %d slow handshakes open", held, slow)
	}
	loaded := transfer(t, d.Addr, size, 2)
	during := time.Since(began)
	t.Logf("%d slow handshakes opened in %v; transfer of 2 x %d MiB: %.0f MiB/s alone, %.0f MiB/s with them held (sluice sockets: %d)",
		slow, opened.Round(time.Millisecond), size>>20, base, loaded, held)
	if during > 5*time.Second {
		t.Errorf("opening the slow handshakes and the transfer took %v; they must run while the slow ones are held (timeout 6s)", during)
	}
	// Loopback speed varies with the machine's load; a ceiling of a third
	// only fails when the slow conns really stall the loops.
	if loaded < base/3 {
		t.Errorf("transfer at %.0f MiB/s with slow handshakes held, %.0f MiB/s without", loaded, base)
	}
	// The slow ones end by timeout.handshake, well before their header would.
	deadline := time.Now().Add(15 * time.Second)
	for fdKinds(t, pid)["socket"] > held-slow+10 && time.Now().Before(deadline) {
		time.Sleep(200 * time.Millisecond)
	}
	if n := fdKinds(t, pid)["socket"]; n > held-slow+10 {
		t.Errorf("%d sockets still open after the handshake timeout", n)
	}
	sl.stdin.Close()

	c := ruleCounters(t, d)
	for code, n := range want {
		if got := refusedCount(c, "accept-proxy", code); got < n {
			t.Errorf("accept-proxy refused %s: %v, want %v", code, got, n)
		}
	}
	if got := refusedCount(c, "accept-proxy", "handshake-timeout"); got < slow {
		t.Errorf("handshake timeouts counted: %v, want %d", got, slow)
	}
	if got, _ := c["proxy_v1"].(float64); got != 2 {
		t.Errorf("PROXY v1 headers accepted: %v, want the 2 transfers'", got)
	}
}

// readLine reads one line from c within 5 s.
func readLine(c net.Conn) (string, error) {
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	s, err := bufio.NewReader(c).ReadString('\n')
	if err == io.EOF && s != "" {
		err = nil
	}
	return strings.TrimSpace(s), err
}
