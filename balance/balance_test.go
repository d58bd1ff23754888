package balance

import (
	"net/netip"
	"testing"

	"github.com/sluice-proxy/sluice/rules"
)

func pool(mode rules.Balance, n int) *Pool {
	var ts []netip.AddrPort
	for i := 0; i < n; i++ {
		ts = append(ts, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(1000+i)))
	}
	return New(mode, ts)
}

var src = netip.MustParseAddr("192.0.2.1")

func TestRoundRobin(t *testing.T) {
	p := pool(rules.BalanceRoundRobin, 3)
	seen := map[int]int{}
	for i := 0; i < 30; i++ {
		s := p.Start(src, 0)
		seen[p.Next(s, 0, 0)]++
	}
	for i := 0; i < 3; i++ {
		if seen[i] != 10 {
			t.Errorf("backend %d chosen %d times of 30", i, seen[i])
		}
	}
}

// A failed backend is skipped until DownFor passes; with every backend down
// they are still tried; a connect brings one back.
func TestPassiveHealth(t *testing.T) {
	p := pool(rules.BalanceRoundRobin, 2)
	p.Failed(0, 0)
	for i := 0; i < 10; i++ {
		if got := p.Next(p.Start(src, 1), 0, 1); got != 1 {
			t.Fatalf("chose down backend %d", got)
		}
	}
	if p.AllDown(1) {
		t.Error("all down with one up")
	}
	p.Failed(1, 0)
	if !p.AllDown(1) {
		t.Error("not all down")
	}
	if got := p.Next(0, 0, 1); got != 0 {
		t.Errorf("every backend down: got %d, want a try of 0 anyway", got)
	}
	if got := p.Next(0, 1, 1); got != 1 {
		t.Errorf("after 0 tried: got %d", got)
	}
	if got := p.Next(0, 3, 1); got != -1 {
		t.Errorf("all tried: got %d", got)
	}
	if p.AllDown(int64(DownFor) + 1) {
		t.Error("still down after DownFor")
	}
	p.Connected(1)
	if p.AllDown(1) || p.Next(0, 0, 1) != 1 {
		t.Error("a connected backend is not up")
	}
	if st := p.Stats(1); st[0].Up || !st[1].Up || st[0].Failures != 1 {
		t.Errorf("stats %+v", st)
	}
}

func TestLeastConn(t *testing.T) {
	p := pool(rules.BalanceLeastConn, 3)
	p.Acquire(0)
	p.Acquire(0)
	p.Acquire(2)
	if got := p.Start(src, 0); got != 1 {
		t.Errorf("leastconn chose %d, want 1 (no sessions)", got)
	}
	p.Acquire(1)
	p.Acquire(1)
	if got := p.Start(src, 0); got != 2 {
		t.Errorf("leastconn chose %d, want 2", got)
	}
	p.Release(0)
	p.Release(0)
	p.Failed(0, 0)
	if got := p.Start(src, 1); got != 2 {
		t.Errorf("leastconn chose %d; 0 is down", got)
	}
}

func TestSourceIsSticky(t *testing.T) {
	p := pool(rules.BalanceSource, 8)
	first := p.Start(src, 0)
	for i := 0; i < 10; i++ {
		if p.Start(src, 0) != first {
			t.Fatal("same source, another backend")
		}
	}
	seen := map[int]bool{}
	for i := 0; i < 200; i++ {
		seen[p.Start(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), 0)] = true
	}
	if len(seen) < 6 {
		t.Errorf("200 sources spread over %d of 8 backends", len(seen))
	}
}
