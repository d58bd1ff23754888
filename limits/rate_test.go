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
