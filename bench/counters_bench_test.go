package bench

import (
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/engine"
	"github.com/sluice-proxy/sluice/rules"
)

// The cost of the per-rule metrics on the forwarding path, end to end
// through the engine. Run these twice, with and without the counters:
//
//	go test -run '^$' -bench 'Engine' -count 10 ./bench/
//	go test -run '^$' -bench 'Engine' -count 10 -tags sluice_nocounters ./bench/
//
// (the tag compiles the data path's per-rule counting out; see
// engine/counters.go). The engine's own micro-benchmarks of the counting
// functions are in engine/counters_test.go (BenchmarkCount*).

// engineTo starts an engine with one loop and one rule to target; it
// returns the rule's address.
func engineTo(b *testing.B, target string, opts string) string {
	b.Helper()
	e, err := engine.New(engine.Config{Loops: 1})
	if err != nil {
		b.Fatal(err)
	}
	e.Start()
	b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		e.Shutdown(ctx)
	})
	return listenTo(b, e, target, opts)
}

// listenTo adds a rule on a free loopback port to target to e; it returns
// the rule's address.
func listenTo(b *testing.B, e *engine.Engine, target, opts string) string {
	b.Helper()
	r, err := rules.Parse("tcp 127.0.0.1:0 -> " + target + " " + opts)
	if err != nil {
		b.Fatal(err)
	}
	lns, err := e.Listen(r)
	if err != nil {
		b.Fatal(err)
	}
	return lns[0].Addr().String()
}

// serveTCP runs handle on each conn accepted on a loopback listener.
func serveTCP(b *testing.B, handle func(net.Conn)) string {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); handle(c) }()
		}
	}()
	return ln.Addr().String()
}

// Short sessions: connect, 64 bytes there and back, close. Per session the
// counting is one add at accept and, at the end, the termination code and
// three histogram observations.
func BenchmarkEngineShortSessions(b *testing.B) {
	addr := engineTo(b, serveTCP(b, func(c net.Conn) { io.Copy(c, c) }), "")
	msg := make([]byte, 64)
	reply := make([]byte, 64)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := c.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, reply); err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}

// One long session, 16 KiB writes one way through buffers: the counting is
// per event that moved bytes (up to three atomic adds on the loop's shard).
func BenchmarkEngineStreamBuffer(b *testing.B) { benchStream(b, "splice=off") }

// The same through splice pipes.
func BenchmarkEngineStreamSplice(b *testing.B) { benchStream(b, "splice=on") }

func benchStream(b *testing.B, opts string) {
	const chunk = 16 << 10
	done := make(chan int64, 1)
	addr := engineTo(b, serveTCP(b, func(c net.Conn) {
		n, _ := io.Copy(io.Discard, c)
		done <- n
	}), opts)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, chunk)
	b.SetBytes(chunk)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	c.(*net.TCPConn).CloseWrite()
	if n := <-done; n != int64(b.N)*chunk {
		b.Fatalf("backend got %d bytes, want %d", n, int64(b.N)*chunk)
	}
	b.StopTimer()
	c.Close()
}
