package bench

import (
	"context"
	"io"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/engine"
)

// One loop, one bulk stream and 50 ping-pong sessions (issue 15 item 4):
// the ping-pong round trips' p50 and p99 with the pump budget (the default)
// and without (Config.Budget < 0), which lets the bulk stream's pump run
// until EAGAIN while the ping-pong sessions' events wait.
//
//	go test -run '^$' -bench PingPongUnderBulk -benchtime 10000x -count 5 ./bench/
//
// b.N is the round trips of all 50 sessions together. Each session sends
// its 64 bytes every 20 ms (2 500 round trips a second in all), so a round
// trip measures how long the loop kept its events waiting, not how many the
// machine can do: flat out, 50 sessions saturate the loop and every round
// trip waits for the others, budget or not.
func BenchmarkPingPongUnderBulkBudget(b *testing.B)   { benchPingPongUnderBulk(b, 0) }
func BenchmarkPingPongUnderBulkNoBudget(b *testing.B) { benchPingPongUnderBulk(b, -1) }

func benchPingPongUnderBulk(b *testing.B, budget int) {
	const sessions, msg, every = 50, 64, 20 * time.Millisecond
	e, err := engine.New(engine.Config{Loops: 1, Budget: budget})
	if err != nil {
		b.Fatal(err)
	}
	e.Start()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		e.Shutdown(ctx)
	}()
	echo := listenTo(b, e, serveTCP(b, func(c net.Conn) { io.Copy(c, c) }), "")
	var bulkBytes atomic.Int64
	sink := listenTo(b, e, serveTCP(b, func(c net.Conn) {
		n, _ := io.Copy(io.Discard, c)
		bulkBytes.Add(n)
	}), "")

	// The bulk stream: writes as fast as the loop takes them.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	bulk, err := net.Dial("tcp", sink)
	if err != nil {
		b.Fatal(err)
	}
	var bulkSent atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 256<<10)
		for {
			select {
			case <-stop:
				bulk.Close()
				return
			default:
			}
			n, err := bulk.Write(buf)
			bulkSent.Add(int64(n))
			if err != nil {
				return
			}
		}
	}()

	conns := make([]net.Conn, sessions)
	for i := range conns {
		if conns[i], err = net.Dial("tcp", echo); err != nil {
			b.Fatal(err)
		}
		defer conns[i].Close()
	}
	time.Sleep(100 * time.Millisecond) // the bulk stream at speed
	lat := make([][]time.Duration, sessions)
	var left atomic.Int64
	left.Store(int64(b.N))
	b.ResetTimer()
	start := time.Now()
	sent0 := bulkSent.Load()
	var pp sync.WaitGroup
	for i, c := range conns {
		pp.Add(1)
		go func() {
			defer pp.Done()
			out, in := make([]byte, msg), make([]byte, msg)
			time.Sleep(every * time.Duration(i) / sessions) // spread over the period
			tick := time.NewTicker(every)
			defer tick.Stop()
			for left.Add(-1) >= 0 {
				<-tick.C
				t0 := time.Now()
				if _, err := c.Write(out); err != nil {
					b.Error(err)
					return
				}
				if _, err := io.ReadFull(c, in); err != nil {
					b.Error(err)
					return
				}
				lat[i] = append(lat[i], time.Since(t0))
			}
		}()
	}
	pp.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	moved := bulkSent.Load() - sent0
	close(stop)
	wg.Wait()

	all := slices.Concat(lat...)
	slices.Sort(all)
	if len(all) == 0 {
		b.Fatal("no round trip")
	}
	q := func(p float64) float64 { return float64(all[int(p*float64(len(all)-1))].Microseconds()) }
	b.ReportMetric(q(0.50), "p50-µs")
	b.ReportMetric(q(0.99), "p99-µs")
	b.ReportMetric(float64(all[len(all)-1].Microseconds()), "max-µs")
	b.ReportMetric(float64(moved)/elapsed.Seconds()/1e6, "bulk-MB/s")
	b.ReportMetric(float64(e.PumpRequeues())/elapsed.Seconds(), "requeues/s")
}
