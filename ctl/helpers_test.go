package ctl

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/sluice-proxy/sluice/ctl/ctltest"
	"github.com/sluice-proxy/sluice/rules"
)

var _ Engine = (*ctltest.Engine)(nil)

// shortDir is a fresh directory with a short path: a unix socket's path
// must fit 107 bytes, and t.TempDir's may not.
func shortDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "ctl")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func testConfig() config {
	c := defaultConfig()
	c.software = "sluice"
	return c
}

// startServer serves eng on a socket in a fresh directory; mod changes the
// config first.
func startServer(t testing.TB, eng Engine, mod func(*config)) (*Server, string) {
	t.Helper()
	path := filepath.Join(shortDir(t), "run", "ctl.sock")
	cfg := testConfig()
	if mod != nil {
		mod(&cfg)
	}
	s, err := serve(context.Background(), path, eng, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, path
}

func mustRules(t testing.TB, lines ...string) []*rules.Rule {
	t.Helper()
	rs := make([]*rules.Rule, len(lines))
	for i, l := range lines {
		r, err := rules.Parse(l)
		if err != nil {
			t.Fatalf("%q: %v", l, err)
		}
		rs[i] = r
	}
	return rs
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// mustDial connects to the server at path; the caller closes the client.
func mustDial(t testing.TB, ctx context.Context, path string, opt Options) *Client {
	t.Helper()
	c, err := Dial(ctx, path, opt)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// dialWrite opens a writing transaction and reads pifs and the table.
func dialWrite(t testing.TB, path string, opt Options) (*Client, *Table) {
	t.Helper()
	return dialTable(t, path, opt, IntentWrite)
}

// dialTable opens a connection for intent (list or write) and reads pifs
// and the table.
func dialTable(t testing.TB, path string, opt Options, intent Intent) (*Client, *Table) {
	t.Helper()
	ctx := ctxT(t)
	c := mustDial(t, ctx, path, opt)
	t.Cleanup(func() { c.Close() })
	if err := c.Hello(ctx, intent); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Pifs(ctx); err != nil {
		t.Fatal(err)
	}
	tb, err := c.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return c, tb
}

// waitIdle waits until the server has no connection and no writer.
func waitIdle(t testing.TB, s *Server) {
	t.Helper()
	waitFor(t, "the server to be idle", func() bool {
		s.mu.Lock()
		n := len(s.conns)
		s.mu.Unlock()
		return n == 0 && !s.writer.Load()
	})
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func wantCode(t testing.TB, err error, code Code) *Error {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) || e.Code != code {
		t.Fatalf("error %v, want code %s", err, code)
	}
	return e
}

func wantLines(t testing.TB, eng *ctltest.Engine, want ...string) {
	t.Helper()
	got := eng.Lines()
	if len(got) != len(want) {
		t.Fatalf("active table %q, want %q", got, want)
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("active table %q, want %q", got, want)
		}
	}
}

// raw is a client that speaks frames by hand, to send what the library
// never would.
type raw struct {
	t    testing.TB
	conn *net.UnixConn
	fr   frameReader
	fw   frameWriter
	ver  uint8
}

// dialRaw connects; with readHello it reads the server hello too.
func dialRaw(t testing.TB, path string, readHello bool) *raw {
	t.Helper()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	r := &raw{t: t, conn: c, ver: Version1}
	r.fr.r = c
	r.fw.w = bufio.NewWriter(c)
	if readHello {
		r.expect(MsgHello)
	}
	return r
}

func (r *raw) send(b []byte) {
	r.t.Helper()
	_ = r.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := r.conn.Write(b); err != nil {
		r.t.Fatalf("write: %v", err)
	}
}

// do encodes and sends one message.
func (r *raw) do(write func(fw *frameWriter) error) {
	r.t.Helper()
	_ = r.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if err := write(&r.fw); err != nil {
		r.t.Fatal(err)
	}
	if err := r.fw.flush(); err != nil {
		r.t.Fatalf("write: %v", err)
	}
}

func (r *raw) read() (frame, error) {
	_ = r.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	return r.fr.read()
}

// expect reads a frame of type typ; an ERROR fails the test.
func (r *raw) expect(typ MsgType) frame {
	r.t.Helper()
	f, err := r.read()
	if err != nil {
		r.t.Fatalf("reading %s: %v", typ, err)
	}
	if f.typ == MsgError {
		e, _ := decodeError(f)
		r.t.Fatalf("got ERROR %v, want %s", e, typ)
	}
	if f.typ != typ {
		r.t.Fatalf("got %s, want %s", f.typ, typ)
	}
	return f
}

// expectError reads frames up to an ERROR of code, then the close.
func (r *raw) expectError(code Code) *Error {
	r.t.Helper()
	for {
		f, err := r.read()
		if err != nil {
			r.t.Fatalf("waiting for ERROR %s: %v", code, err)
		}
		if f.typ != MsgError {
			continue
		}
		e, err := decodeError(f)
		if err != nil {
			r.t.Fatal(err)
		}
		if e.Code != code {
			r.t.Fatalf("ERROR %v, want code %s", e, code)
		}
		r.expectClosed()
		return e
	}
}

// expectClosed checks that the server closed the connection.
func (r *raw) expectClosed() {
	r.t.Helper()
	f, err := r.read()
	if err == nil {
		r.t.Fatalf("got %s, want the connection closed", f.typ)
	}
	if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, errConnReset) {
		r.t.Fatalf("got %v, want the connection closed", err)
	}
}

// hello sends the client hello and, for intents that get PIFS and RULES,
// reads them; it returns the table's generation.
func (r *raw) hello(want uint8, intent Intent) uint64 {
	r.t.Helper()
	r.do(func(fw *frameWriter) error {
		return fw.writeClientHello(&ClientHello{Want: want, Intent: intent, Name: "raw"})
	})
	if intent != IntentWrite {
		return 0
	}
	f := r.expect(MsgPifs)
	r.ver = f.ver
	var gen uint64
	for {
		c, err := decodeTableChunk(r.expect(MsgRules))
		if err != nil {
			r.t.Fatal(err)
		}
		gen = c.gen
		if c.last {
			return gen
		}
	}
}

// openChunk sends a LOAD chunk that is not the last one.
func (r *raw) openChunk(gen uint64, pif uint16, lines ...string) {
	r.t.Helper()
	if err := r.tryChunk(gen, pif, lines...); err != nil {
		r.t.Fatalf("write: %v", err)
	}
}

// tryChunk sends a LOAD chunk that is not the last one, and reports a
// failed write rather than failing the test (the server may have cut the
// connection off).
func (r *raw) tryChunk(gen uint64, pif uint16, lines ...string) error {
	_ = r.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	r.fw.start(r.ver, MsgLoad)
	r.fw.u64(gen)
	r.fw.u16(pif)
	r.fw.u8(0)
	r.fw.u16(uint16(len(lines)))
	for _, l := range lines {
		r.fw.str(l, maxLine, "rule line")
	}
	if err := r.fw.finish(); err != nil {
		return err
	}
	return r.fw.flush()
}

func itoa(i int) string { return strconv.Itoa(i) }
