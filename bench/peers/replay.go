package main

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/sluice-proxy/sluice/internal/testpeer"
)

// The sni-replay scenario: the sni scenario's byte flow without its
// cryptography at the ends. In sni the Go TLS client and the nginx TLS
// backend saturate the load CPU while the proxy idles at a fifth to a third
// of its own, and a figure per proxy core taken that far from saturation
// swings with how the wake-ups happen to batch. Here one real TLS 1.3
// exchange (Go's default post-quantum hello for sniName, a Go TLS server
// with sniName's self-signed certificate and no tickets, GET / and its
// reply) is recorded once, as its flights, and a cheap client and backend
// replay those bytes: the proxy receives the same hello and passes on the
// same flights in the same order, and both ends check every byte, so what
// it does per connection is what it does in sni, at a rate that saturates
// it.
var sniReplayScenario = scenario{name: "sni-replay",
	title: "sni-replay: the sni scenario's recorded TLS flights replayed by a cheap client and backend (the proxy saturated), 50 in flight",
	unit:  "conn/s", latency: true,
	skip: sniScenario.skip,
	backend: func(h *harness) (string, *proc, error) {
		path := flightsPath(h)
		if err := recordFlights(path); err != nil {
			return "", nil, fmt.Errorf("record the TLS flights: %w", err)
		}
		return h.startRole("replayserver", h.opt.loadCPU, path)
	},
	route: startRouter,
	measure: func(h *harness, t target) (map[string]float64, error) {
		secs := h.secs(h.opt.duration)
		return connRole(h, t, "replayclient", secs, t.addr, flightsPath(h), (time.Duration(secs) * time.Second).String(), strconv.Itoa(sniConc))
	}}

func flightsPath(h *harness) string { return filepath.Join(h.dir, "sni-flights") }

// flights are the bytes of one TLS connection, alternately the client's
// and the server's, the client's first: its hello, the server's flight,
// its Finished and request, the reply and the server's close_notify. The
// server closes after its last flight (an HTTP/1.0 reply), as nginx does.
type flights [][]byte

// recordFlights records one exchange of a Go TLS client and server over an
// in-memory pipe and writes its flights to path (each a big-endian uint32
// length and the bytes).
func recordFlights(path string) error {
	cert, err := testpeer.SelfSigned(sniName)
	if err != nil {
		return err
	}
	cp, sp := net.Pipe()
	var rec recorder
	srvErr := make(chan error, 1)
	go func() {
		s := tls.Server(&recConn{Conn: sp, rec: &rec, side: 1}, &tls.Config{
			Certificates: []tls.Certificate{cert}, SessionTicketsDisabled: true})
		defer sp.Close()
		r := bufio.NewReader(s)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				srvErr <- err
				return
			}
			if line == "\r\n" {
				break
			}
		}
		body := sniName + "\n"
		_, err := fmt.Fprintf(s, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(body), body)
		if err == nil {
			err = s.Close() // close_notify, then the pipe
		}
		srvErr <- err
	}()
	c := tls.Client(&recConn{Conn: cp, rec: &rec, side: 0}, &tls.Config{ServerName: sniName, InsecureSkipVerify: true})
	c.SetDeadline(time.Now().Add(10 * time.Second))
	reply, err := func() ([]byte, error) {
		if _, err := io.WriteString(c, "GET / HTTP/1.0\r\nHost: "+sniName+"\r\n\r\n"); err != nil {
			return nil, err
		}
		return io.ReadAll(c)
	}()
	cp.Close() // without the client's close_notify: the server has gone
	if serr := <-srvErr; err == nil {
		err = serr
	}
	if err != nil {
		return err
	}
	if !strings.HasPrefix(string(reply), "HTTP/1.1 200") || !strings.HasSuffix(string(reply), sniName+"\n") {
		return fmt.Errorf("reply %.60q", reply)
	}
	f := rec.flights()
	if len(f) != 4 || len(f[0]) < 5 || f[0][0] != 22 {
		return fmt.Errorf("%d flights (want 4, a handshake record first)", len(f))
	}
	var b bytes.Buffer
	for _, x := range f {
		b.Write(binary.BigEndian.AppendUint32(nil, uint32(len(x))))
		b.Write(x)
	}
	return os.WriteFile(path, b.Bytes(), 0o644)
}

// readFlights reads what recordFlights wrote.
func readFlights(path string) (flights, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var f flights
	for len(b) > 0 {
		if len(b) < 4 || uint32(len(b)-4) < binary.BigEndian.Uint32(b) {
			return nil, fmt.Errorf("%s: truncated", path)
		}
		n := binary.BigEndian.Uint32(b)
		f, b = append(f, b[4:4+n]), b[4+n:]
	}
	if len(f) != 4 {
		return nil, fmt.Errorf("%s: %d flights, want 4", path, len(f))
	}
	return f, nil
}

// recorder keeps the bytes written on both sides of a connection, in order,
// consecutive writes of one side joined into one flight.
type recorder struct {
	mu   sync.Mutex
	last int // side of the last flight
	f    flights
}

func (r *recorder) add(side int, p []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.f) == 0 || r.last != side {
		r.f, r.last = append(r.f, nil), side
	}
	r.f[len(r.f)-1] = append(r.f[len(r.f)-1], p...)
}

func (r *recorder) flights() flights {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.f
}

// recConn records what is written through it (side 0 the client, 1 the
// server) before it is written: on a synchronous pipe a side writes only
// after it has read what it answers, so the order of the records is the
// order of the exchange.
type recConn struct {
	net.Conn
	rec  *recorder
	side int
}

func (c *recConn) Write(p []byte) (int, error) {
	c.rec.add(c.side, p)
	return c.Conn.Write(p)
}

// replayServer FLIGHTS: for each connection, read the client's flights and
// answer each with the server's, checking every byte; close after the last.
func replayServer(args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("usage: replayserver FLIGHTS")
	}
	f, err := readFlights(args[0])
	if err != nil {
		return err
	}
	return serveConns(func(c net.Conn) {
		defer c.Close()
		buf := make([]byte, max(len(f[0]), len(f[2])))
		for i := 0; i < len(f); i += 2 {
			if expect(c, buf, f[i]) != nil {
				return
			}
			if _, err := c.Write(f[i+1]); err != nil {
				return
			}
		}
	})
}

// replayClient ADDR FLIGHTS DURATION CONC: CONC workers, each again and
// again for DURATION: connect, send the client's flights, each after the
// server's answer to the one before has arrived whole and unchanged, then
// the server's last flight and its close, and close.
func replayClient(args []string) error {
	if len(args) != 4 {
		return fmt.Errorf("usage: replayclient ADDR FLIGHTS DURATION CONC")
	}
	f, err := readFlights(args[1])
	if err != nil {
		return err
	}
	d, conc, err := loadArgs(args[2], args[3])
	if err != nil {
		return err
	}
	addr := args[0]
	res := connLoop(d, conc, func() func() error {
		buf := make([]byte, max(len(f[1]), len(f[3]))+1)
		dialer := net.Dialer{Timeout: 5 * time.Second}
		return func() error {
			c, err := dialer.Dial("tcp", addr)
			if err != nil {
				return err
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			for i := 0; i < len(f); i += 2 {
				if _, err := c.Write(f[i]); err != nil {
					return err
				}
				if err := expect(c, buf, f[i+1]); err != nil {
					return err
				}
			}
			if n, err := c.Read(buf[:1]); n != 0 || err != io.EOF {
				return fmt.Errorf("after the last flight: %d bytes, %v (want the server's close)", n, err)
			}
			return nil
		}
	})
	return json.NewEncoder(os.Stdout).Encode(res)
}

// expect reads len(want) bytes from c into buf and checks they are want.
func expect(c net.Conn, buf, want []byte) error {
	got := buf[:len(want)]
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if !bytes.Equal(got, want) {
		return errors.New("the bytes differ from the recorded flight")
	}
	return nil
}
