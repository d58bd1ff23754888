package engine

import (
	"errors"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/sluice-proxy/sluice/conn"
)

// The limiter writes the first refusal, then one per interval, each with
// the count suppressed since the line before.
func TestRefusalLogAllow(t *testing.T) {
	const every = int64(time.Second)
	type step struct {
		now        int64
		ok         bool
		suppressed uint64
	}
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{"the first is written", []step{{5, true, 0}}},
		{"at clock zero too", []step{{0, true, 0}, {1, false, 0}}},
		{"within the interval suppressed", []step{{10, true, 0}, {11, false, 0}, {every, false, 0}, {every + 9, false, 0}}},
		{"the next line counts them", []step{{10, true, 0}, {11, false, 0}, {12, false, 0}, {every + 10, true, 2}, {every + 11, false, 0}}},
		{"a quiet rule's next line has none", []step{{0, true, 0}, {5 * every, true, 0}, {9 * every, true, 0}}},
		{"the interval runs from the line, not the refusal", []step{{0, true, 0}, {every - 1, false, 0}, {every, true, 1}, {2*every - 1, false, 0}, {2 * every, true, 1}}},
		{"an earlier clock (another loop's wake-up) is suppressed", []step{{every, true, 0}, {every - 5, false, 0}, {2 * every, true, 1}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var r refusalLog
			for i, s := range tc.steps {
				ok, n := r.allow(s.now, every)
				if ok != s.ok || n != s.suppressed {
					t.Errorf("step %d (now %d): allow = %v, %d; want %v, %d", i, s.now, ok, n, s.ok, s.suppressed)
				}
			}
		})
	}
}

// A refusal suppressed costs no allocation.
func TestRefusalLogAllocs(t *testing.T) {
	var r refusalLog
	r.allow(1, int64(time.Hour))
	now := int64(2)
	if n := testing.AllocsPerRun(1000, func() { now++; r.allow(now, int64(time.Hour)) }); n != 0 {
		t.Errorf("allow allocates %.1f times per suppressed refusal", n)
	}
}

// The proxy's own refusals are logged; a client's failures and a stop are not.
func TestLoggedRefusal(t *testing.T) {
	for code, want := range map[conn.Code]bool{
		conn.CodeDenied: true, conn.CodeRateLimited: true, conn.CodeProxyNotTrusted: true, conn.CodeProxyBad: true,
		conn.CodeProxyMissing: true, conn.CodeProxyOversized: true, conn.CodeNoRoute: true, conn.CodeTLSHelloBad: true,
		conn.CodeTLSHelloOversized: true, conn.CodeNoBackend: true,
		conn.CodeDone: false, conn.CodeHealth: false, conn.CodeHandshakeTimeout: false, conn.CodeClientReset: false,
		conn.CodeProxyTruncated: false, conn.CodeStopping: false, conn.CodeConnectRefused: false, conn.CodeResource: false,
		conn.Code(200): false, // a code past the table
	} {
		if got := loggedRefusal(code); got != want {
			t.Errorf("loggedRefusal(%v) = %v, want %v", code, got, want)
		}
	}
}

// A flood of refused connections is a bounded number of info lines: at
// most one per interval, the lines' suppressed counts adding up, with the
// written ones every refusal of the flood.
func TestRefusalFlood(t *testing.T) {
	const every = 100 * time.Millisecond
	const flood = 300
	b := backend(t)
	log, logs := observed(zap.NewAtomicLevelAt(zap.InfoLevel))
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+b.Addr()+" deny=127.0.0.0/8", Config{Log: log, RefusalLog: every})
	refuse := func() {
		c, err := net.Dial("tcp", addr)
		if errors.Is(err, syscall.ECONNRESET) {
			return // refused before connect returned (loopback is that fast)
		}
		if err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Fatal("a denied client read a byte")
		}
		c.Close()
	}
	began := time.Now()
	for range flood {
		refuse()
	}
	took := time.Since(began)
	time.Sleep(2 * every)
	refuse() // past the interval: its line counts what the flood's lines left out
	var lines, suppressed uint64
	deadline := time.Now().Add(5 * time.Second)
	for {
		lines, suppressed = 0, 0
		for _, en := range logs.FilterMessage("connections refused").All() {
			lines++
			f := en.ContextMap()
			suppressed += f["suppressed"].(uint64)
			if f["reason"] != "denied" || f["term"] != "PR" || !strings.HasPrefix(f["rule"].(string), "tcp 127.0.0.1:") || en.Level != zap.InfoLevel {
				t.Fatalf("line %v %v", en.Level, f)
			}
			if src, err := netip.ParseAddrPort(f["src"].(string)); err != nil || src.Addr() != netip.MustParseAddr("127.0.0.1") {
				t.Fatalf("src %v: %v", f["src"], err)
			}
		}
		if lines+suppressed == flood+1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if lines+suppressed != flood+1 {
		t.Errorf("%d lines + %d suppressed, want the %d refusals", lines, suppressed, flood+1)
	}
	if max := uint64(took/every) + 2; lines < 2 || lines > max {
		t.Errorf("%d lines for %d refusals in %v and one more: want 2 to %d", lines, flood, took, max)
	}
	if n := e.Listeners()[0].Policy().Stats().Refused["rules"]["denied"]; n != flood+1 {
		t.Errorf("counted %d denied, want %d", n, flood+1)
	}
}
