// Package testpeer is the far end of sluice's tests: a backend and a client
// that exchange pseudo-random streams and check every byte by SHA-256, in both
// directions at once, across a half-close. It is test support, shared by the
// package tests and the integration tests; nothing in sluice imports it.
//
// The exchange: the client sends a 16-byte header (down size, seed), then
// "up" bytes of the seed's stream, then shuts its write side. The backend,
// from the header on, sends "down" bytes of the stream of seed+1 while it
// reads and hashes the upload; after both are done it sends the upload's
// SHA-256 (32 bytes) and closes. The client checks the download against the
// stream it expects and the trailer against its own upload's hash: a reply
// sent after the client's EOF proves the half-close.
package testpeer

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Stream returns the deterministic byte stream of a seed.
func Stream(seed uint64) io.Reader {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	return rand.NewChaCha8(key)
}

// Backend serves the exchange on a listener.
type Backend struct {
	ln       net.Listener
	wg       sync.WaitGroup
	mu       sync.Mutex
	conns    map[net.Conn]struct{}
	exchange func(net.Conn) error // serves one conn: nil, errProbe, or what went wrong
	Served   atomic.Int64         // exchanges completed
	Failures atomic.Int64         // exchanges that went wrong
	Probes   atomic.Int64         // conns closed before a byte was sent: readiness probes
	LastErr  atomic.Value         // error
}

// Listen starts a backend on addr ("127.0.0.1:0" for any port).
func Listen(addr string) (*Backend, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	return Serve(ln), nil
}

// Serve starts a backend on a listener the caller opened (one inside a
// network namespace, say); Close closes it.
func Serve(ln net.Listener) *Backend { return serveWith(ln, serveExchange) }

// ServeFunc starts a backend on ln that serves each conn with fn (a
// backend that floods, stalls, ...); the conn is closed when fn returns.
func ServeFunc(ln net.Listener, fn func(net.Conn) error) *Backend { return serveWith(ln, fn) }

// serveWith starts a backend that serves each conn with exchange (another
// exchange than this file's: the chaos one).
func serveWith(ln net.Listener, exchange func(net.Conn) error) *Backend {
	b := &Backend{ln: ln, conns: map[net.Conn]struct{}{}, exchange: exchange}
	b.wg.Add(1)
	go b.serve()
	return b
}

// Addr returns the backend's address.
func (b *Backend) Addr() string { return b.ln.Addr().String() }

// Close stops the backend and closes every conn it holds.
func (b *Backend) Close() {
	b.ln.Close()
	b.mu.Lock()
	for c := range b.conns {
		c.Close()
	}
	b.mu.Unlock()
	b.wg.Wait()
}

// Conns returns the number of connections the backend holds open.
func (b *Backend) Conns() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.conns)
}

func (b *Backend) serve() {
	defer b.wg.Done()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		b.mu.Lock()
		b.conns[c] = struct{}{}
		b.mu.Unlock()
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			err := b.exchange(c)
			if errors.Is(err, errProbe) {
				b.Probes.Add(1)
			} else if err != nil {
				b.Failures.Add(1)
				b.LastErr.Store(err)
			} else {
				b.Served.Add(1)
			}
			b.mu.Lock()
			delete(b.conns, c)
			b.mu.Unlock()
			c.Close()
		}()
	}
}

// errProbe is a conn that ended cleanly before its header: a readiness probe
// (a dial and close), not a failed exchange.
var errProbe = errors.New("probe: closed before any byte")

func serveExchange(c net.Conn) error {
	var hdr [16]byte
	if n, err := io.ReadFull(c, hdr[:]); err != nil {
		if n == 0 && err == io.EOF {
			return errProbe
		}
		return fmt.Errorf("backend: header: %w", err)
	}
	down := int64(binary.LittleEndian.Uint64(hdr[:8]))
	seed := binary.LittleEndian.Uint64(hdr[8:])
	sent := make(chan error, 1)
	go func() {
		_, err := io.CopyN(c, Stream(seed+1), down)
		sent <- err
	}()
	h := sha256.New()
	if _, err := io.Copy(h, c); err != nil {
		return fmt.Errorf("backend: reading upload: %w", err)
	}
	if err := <-sent; err != nil {
		return fmt.Errorf("backend: sending %d bytes: %w", down, err)
	}
	if _, err := c.Write(h.Sum(nil)); err != nil {
		return fmt.Errorf("backend: trailer: %w", err)
	}
	return nil
}

// Exchange runs one exchange on c: up bytes sent, down bytes expected back.
// It returns nil when both directions arrived whole and exact.
func Exchange(c net.Conn, up, down int64, seed uint64) error {
	return ExchangeSlow(c, up, down, seed, 0)
}

// ExchangeSlow is Exchange with a pause before the client starts reading, to
// make the proxy hold back a sender.
func ExchangeSlow(c net.Conn, up, down int64, seed uint64, readAfter time.Duration) error {
	var hdr [16]byte
	binary.LittleEndian.PutUint64(hdr[:8], uint64(down))
	binary.LittleEndian.PutUint64(hdr[8:], seed)
	upHash := make(chan []byte, 1)
	werr := make(chan error, 1)
	go func() {
		h := sha256.New()
		w := io.MultiWriter(c, h)
		if _, err := w.Write(hdr[:]); err != nil {
			werr <- err
			return
		}
		h.Reset()
		if _, err := io.CopyN(w, Stream(seed), up); err != nil {
			werr <- fmt.Errorf("client: sending: %w", err)
			return
		}
		upHash <- h.Sum(nil)
		if cw, ok := c.(interface{ CloseWrite() error }); ok {
			werr <- cw.CloseWrite()
			return
		}
		werr <- errors.New("client: conn cannot half-close")
	}()
	if readAfter > 0 {
		time.Sleep(readAfter)
	}
	r := bufio.NewReaderSize(c, 64<<10)
	if err := compare(r, Stream(seed+1), down); err != nil {
		return err
	}
	trailer := make([]byte, 33)
	n, err := io.ReadFull(r, trailer)
	if err != io.ErrUnexpectedEOF || n != 32 {
		return fmt.Errorf("client: trailer: %d bytes, %v (want 32 then EOF)", n, err)
	}
	if err := <-werr; err != nil {
		return err
	}
	if want := <-upHash; !bytes.Equal(trailer[:32], want) {
		return errors.New("client: the backend hashed a different upload")
	}
	return nil
}

// compare reads n bytes from r and checks them against want's first n.
func compare(r io.Reader, want io.Reader, n int64) error {
	a := make([]byte, 32<<10)
	b := make([]byte, 32<<10)
	var off int64
	for off < n {
		k := int64(len(a))
		if n-off < k {
			k = n - off
		}
		got, err := io.ReadFull(r, a[:k])
		if err != nil {
			return fmt.Errorf("client: download cut at %d of %d bytes: %w", off+int64(got), n, err)
		}
		io.ReadFull(want, b[:k])
		if !bytes.Equal(a[:k], b[:k]) {
			return fmt.Errorf("client: download differs in bytes %d-%d", off, off+k)
		}
		off += k
	}
	return nil
}

// Accept runs handle on each conn ln accepts, each in its own goroutine,
// until ln is closed. handle owns the conn and closes it.
func Accept(ln net.Listener, handle func(net.Conn)) {
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go handle(c)
		}
	}()
}

// Mute accepts every conn of ln and holds it, never reading or writing,
// until ln is closed, then closes them: a server that never answers.
func Mute(ln net.Listener) {
	go func() {
		var held []net.Conn
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			held = append(held, c)
		}
	}()
}
