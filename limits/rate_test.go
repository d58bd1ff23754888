package limits

import (
	"net/netip"
	"testing"
)

func addr(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
}

func TestRateSlidingWindow(t *testing.T) {
	tb := NewRateTable(10, 1024)
	a := addr(1)
	now := int64(5e9)
	for i := 0; i < 10; i++ {
		if !tb.Allow(a, now) {
			t.Fatalf("conn %d refused", i)
		}
	}
	if tb.Allow(a, now) {
		t.Fatal("11th conn in the same second allowed")
	}
	// Half a second into the next second the previous one still weighs
	// half: 11 * 0.5 = 5.5 counted, so 4 more pass and the 5th does not.
	now = 6e9 + 5e8
	n := 0
	for tb.Allow(a, now) {
		n++
	}
	if n != 5 {
		t.Errorf("%d conns allowed half a second on, want 5", n)
	}
	if !tb.Allow(a, 9e9) {
		t.Error("refused after a quiet second")
	}
}

// A flood of distinct sources never grows the table past its bound, and a
// source seen recently is kept while old ones are evicted.
func TestRateTableBounded(t *testing.T) {
	const size = 256
	tb := NewRateTable(1, size)
	hot := netip.MustParseAddr("192.0.2.1")
	tb.Allow(hot, 0)
	for i := 0; i < 100000; i++ {
		tb.Allow(addr(i), int64(i)*1000)
		if i%100 == 0 {
			tb.Allow(hot, int64(i)*1000) // keeps it recent
		}
	}
	if n := tb.Len(); n > tb.Cap() || tb.Cap() != size {
		t.Fatalf("table holds %d sources, cap %d, want at most %d", n, tb.Cap(), size)
	}
	// The hot source was never evicted, so it is still over its limit.
	if tb.Allow(hot, 100000*1000) {
		t.Error("the hot source was forgotten")
	}
	// IPv4-mapped IPv6 is the same source as IPv4.
	m := netip.AddrFrom16(hot.As16())
	if tb.Allow(m, 100000*1000) {
		t.Error("a v4-mapped address is another source")
	}
}

func TestRateAllowDoesNotAllocate(t *testing.T) {
	tb := NewRateTable(1000, 1024)
	a := addr(7)
	tb.Allow(a, 0)
	if n := testing.AllocsPerRun(1000, func() { tb.Allow(a, 1) }); n != 0 {
		t.Errorf("%v allocations per Allow of a known source", n)
	}
}

// The table at the size a rule gets (65 536), flooded well past it: 200 000
// distinct sources in one second, one connection each, while four sources
// hammer at ten times their limit. Each new source gets its first
// connection; the table never holds more than its bound; the hammering
// sources, seen often, are never evicted, so they stay limited to their
// rate (a forgotten one would start again at zero); a source of the flood
// seen again soon after is still counted; and once full, taking a new
// source (an eviction) allocates nothing.
func TestRatePastSize(t *testing.T) {
	const size, limit, flood = 65536, 5, 200000
	tb := NewRateTable(limit, size)
	hammers := []netip.Addr{netip.MustParseAddr("127.255.0.1"), netip.MustParseAddr("127.255.0.2"),
		netip.MustParseAddr("127.255.0.3"), netip.MustParseAddr("::ffff:127.255.0.4")}
	allowed := make([]int, len(hammers))
	start := int64(10e9)
	for i := 0; i < flood; i++ {
		now := start + int64(i)*int64(1e9)/flood // the whole flood within one second
		if !tb.Allow(addr(i), now) {
			t.Fatalf("flood source %d (%s) refused its first connection", i, addr(i))
		}
		if i%(flood/(10*limit)) == 0 { // 50 attempts each in the second: ten times the limit
			for h, a := range hammers {
				if tb.Allow(a, now) {
					allowed[h]++
				}
			}
		}
		if i == size/2 { // a flood source seen again, soon after: still counted
			for range limit - 1 {
				tb.Allow(addr(i), now)
			}
			if tb.Allow(addr(i), now) {
				t.Errorf("a flood source over its limit was allowed: its entry was lost")
			}
		}
	}
	if n := tb.Len(); n != size || tb.Cap() != size {
		t.Errorf("the table holds %d sources (cap %d) after %d, want exactly %d", n, tb.Cap(), flood, size)
	}
	for h, n := range allowed {
		if n != limit {
			t.Errorf("hammering source %s: %d connections allowed in the second, want %d", hammers[h], n, limit)
		}
	}
	i := flood
	if n := testing.AllocsPerRun(10000, func() { tb.Allow(addr(i), start+2e9); i++ }); n != 0 {
		t.Errorf("%v allocations per Allow of a new source in a full table", n)
	}
}
