package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// The harness's own load and backends run as roles: this binary re-run with
// roleEnv set, pinned by taskset like the other tools. A server role prints
// its listen address on stdout, then serves until its stdin closes; a client
// role prints one JSON line of results (and an idle client then holds its
// sessions until its stdin closes). Every role ends when the harness does,
// since its stdin closes then.
const roleEnv = "SLUICE_BENCH_ROLE"

func runRole(role string, args []string) int {
	var err error
	switch role {
	case "echo":
		err = serveEcho(false)
	case "rttecho":
		err = serveEcho(true)
	case "rttclient":
		err = rttClient(args)
	case "idleclient":
		err = idleClient(args)
	case "tlsclient":
		err = tlsClient(args)
	case "tlshs":
		err = tlsHSClient(args)
	case "tlsbulk":
		err = tlsBulkClient(args)
	case "sink":
		err = serveSink()
	case "replayserver":
		err = replayServer(args)
	case "replayclient":
		err = replayClient(args)
	default:
		err = fmt.Errorf("unknown role %q", role)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "role %s: %v\n", role, err)
		return 1
	}
	return 0
}

// serveEcho echoes every byte back. The plain echo serves thousands of idle
// sessions with a goroutine each and a small buffer (io.Copy between TCP
// conns would splice through a pipe per conn and exhaust the fds). The
// blocking one, for round-trip times, gives each conn an OS thread doing
// blocking read(2)/write(2): no poller between the wake-up and the reply.
func serveEcho(blocking bool) error {
	if blocking {
		return serveConns(echoBlocking)
	}
	return serveConns(echoConn)
}

// serveConns is a server role's body: it listens on loopback, prints the
// address, serves each connection with handle on its own goroutine, and
// returns when stdin closes.
func serveConns(handle func(net.Conn)) error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				time.Sleep(10 * time.Millisecond) // EMFILE and the like: back off, go on
				continue
			}
			go handle(c)
		}
	}()
	fmt.Println(ln.Addr())
	io.Copy(io.Discard, os.Stdin)
	return ln.Close()
}

func echoConn(c net.Conn) {
	defer c.Close()
	buf := make([]byte, 512)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, err := c.Write(buf[:n]); err != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func echoBlocking(c net.Conn) {
	f, err := c.(*net.TCPConn).File()
	c.Close()
	if err != nil {
		return
	}
	defer f.Close()
	runtime.LockOSThread()
	fd := int(f.Fd())
	unix.SetNonblock(fd, false)
	unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	buf := make([]byte, 4096)
	for {
		n, err := unix.Read(fd, buf)
		if n <= 0 || err != nil {
			return
		}
		if writeAll(fd, buf[:n]) != nil {
			return
		}
	}
}

func writeAll(fd int, p []byte) error {
	for len(p) > 0 {
		n, err := unix.Write(fd, p)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		p = p[n:]
	}
	return nil
}

// rttResult is what rttclient prints.
type rttResult struct {
	N     int     `json:"n"`
	P50us float64 `json:"p50_us"`
	P99us float64 `json:"p99_us"`
	Mean  float64 `json:"mean_us"`
	Err   string  `json:"err,omitempty"`
}

// maxRTTSamples bounds a round-trip run by count as well as by time.
const maxRTTSamples = 4 << 20

// rttClient ADDR DURATION SIZE: one session, SIZE bytes there and back,
// again and again for DURATION (after 200 warm-up round trips), on a
// blocking socket from one OS thread.
func rttClient(args []string) error {
	if len(args) != 3 {
		return fmt.Errorf("usage: rttclient ADDR DURATION SIZE")
	}
	d, err := time.ParseDuration(args[1])
	if err != nil {
		return err
	}
	size, err := strconv.Atoi(args[2])
	if err != nil || size <= 0 || size > 1<<16 {
		return fmt.Errorf("bad size %q", args[2])
	}
	res := rttRun(args[0], d, size)
	return json.NewEncoder(os.Stdout).Encode(res)
}

func rttRun(addr string, d time.Duration, size int) (res rttResult) {
	runtime.LockOSThread()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return rttResult{Err: err.Error()}
	}
	f, err := c.(*net.TCPConn).File()
	c.Close()
	if err != nil {
		return rttResult{Err: err.Error()}
	}
	defer f.Close()
	fd := int(f.Fd())
	unix.SetNonblock(fd, false)
	unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	// A stuck proxy must not hang the run: every read gives up after 5 s.
	tv := unix.Timeval{Sec: 5}
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	out := make([]byte, size)
	in := make([]byte, size)
	trip := func(i int) error {
		out[0] = byte(i)
		if err := writeAll(fd, out); err != nil {
			return err
		}
		for got := 0; got < size; {
			n, err := unix.Read(fd, in[got:])
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return err
			}
			if n == 0 {
				return io.ErrUnexpectedEOF
			}
			got += n
		}
		if in[0] != byte(i) {
			return fmt.Errorf("round trip %d: got a reply to another", i)
		}
		return nil
	}
	for i := 0; i < 200; i++ {
		if err := trip(i); err != nil {
			return rttResult{Err: "warm-up: " + err.Error()}
		}
	}
	samples := make([]time.Duration, 0, 1<<16)
	end := time.Now().Add(d)
	for i := 0; len(samples) < maxRTTSamples; i++ {
		t0 := time.Now()
		if !t0.Before(end) {
			break
		}
		if err := trip(i); err != nil {
			res.Err = err.Error()
			break
		}
		samples = append(samples, time.Since(t0))
	}
	unix.Shutdown(fd, unix.SHUT_WR)
	if len(samples) == 0 {
		if res.Err == "" {
			res.Err = "no round trips"
		}
		return res
	}
	slices.Sort(samples)
	var sum time.Duration
	for _, s := range samples {
		sum += s
	}
	us := func(d time.Duration) float64 { return float64(d) / 1e3 }
	res.N = len(samples)
	res.P50us = us(samples[len(samples)/2])
	res.P99us = us(samples[len(samples)*99/100])
	res.Mean = us(sum) / float64(len(samples))
	return res
}

// idleResult is what idleclient prints once its sessions are open.
type idleResult struct {
	Held   int     `json:"held"`
	Failed int     `json:"failed"`
	Err    string  `json:"err,omitempty"`
	Secs   float64 `json:"secs"`
}

// idleClient ADDR N: opens up to N sessions, 64 at a time, each with one
// byte there and back so both directions of the proxy have run, prints how
// many it holds, and holds them until stdin closes. It stops opening at the
// first failure (a proxy out of fds), keeping those it has.
func idleClient(args []string) error {
	if len(args) != 2 {
		return fmt.Errorf("usage: idleclient ADDR N")
	}
	n, err := strconv.Atoi(args[1])
	if err != nil || n <= 0 || n > 19000 {
		return fmt.Errorf("bad session count %q", args[1])
	}
	addr := args[0]
	var (
		mu     sync.Mutex
		conns  = make([]net.Conn, 0, n)
		failed int
		first  error
		wg     sync.WaitGroup
	)
	sem := make(chan struct{}, 64)
	began := time.Now()
	for i := 0; i < n; i++ {
		mu.Lock()
		stop := failed > 0
		mu.Unlock()
		if stop {
			break
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c, err := pingOnce(addr)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				failed++
				if first == nil {
					first = err
				}
				return
			}
			conns = append(conns, c)
		}()
	}
	wg.Wait()
	res := idleResult{Held: len(conns), Failed: failed, Secs: time.Since(began).Seconds()}
	if first != nil {
		res.Err = first.Error()
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		return err
	}
	io.Copy(io.Discard, os.Stdin)
	for _, c := range conns {
		c.Close()
	}
	return nil
}

// pingOnce opens a session and makes one round trip of one byte, within 5 s.
func pingOnce(addr string) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	var b [1]byte
	if _, err := c.Write([]byte("p")); err != nil {
		c.Close()
		return nil, err
	}
	if _, err := io.ReadFull(c, b[:]); err != nil {
		c.Close()
		return nil, err
	}
	c.SetDeadline(time.Time{})
	return c, nil
}
