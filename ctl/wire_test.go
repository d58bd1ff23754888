package ctl

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"github.com/sluice-proxy/sluice/observe"
	"io"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/rules"
)

// encodeFrames runs write against a fresh frameWriter and returns the bytes.
func encodeFrames(t testing.TB, write func(fw *frameWriter) error) []byte {
	t.Helper()
	var buf bytes.Buffer
	fw := frameWriter{w: bufio.NewWriter(&buf)}
	if err := write(&fw); err != nil {
		t.Fatal(err)
	}
	if err := fw.flush(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// readFrames splits b into frames.
func readFrames(t testing.TB, b []byte) []frame {
	t.Helper()
	fr := frameReader{r: bytes.NewReader(b)}
	var out []frame
	for {
		f, err := fr.read()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		f.payload = bytes.Clone(f.payload)
		out = append(out, f)
	}
}

func testHello() *ServerHello {
	return &ServerHello{Software: "sluice test", Features: []string{FeatureTxn, FeaturePeerCred},
		Limits: Limits{MaxPayload: MaxPayload, MaxRules: rules.MaxRules, MaxPorts: rules.MaxPorts, MaxPortsPerRule: rules.MaxPortsPerRule,
			MaxLineLen: rules.MaxLineLen, MaxPifs: MaxPifs, DefaultConfirm: 30 * time.Second, MaxConfirm: 10 * time.Minute,
			IOTimeout: 10 * time.Second, MaxClients: 64}}
}

func testSummary() *Summary {
	return &Summary{Generation: 9, OK: false, Kept: 1, Added: 2, Removed: 3, Detail: true, Rules: []RuleResult{
		{Rule: "tcp 0.0.0.0:8080", Listen: "tcp 0.0.0.0:8080", Requested: 1, Bound: 1},
		{Rule: "tcp 0.0.0.0:9000-9002 weak", Listen: "tcp 0.0.0.0:9000-9002", Weak: true, Requested: 3, Bound: 1, Failed: 2,
			Ports: []rules.PortError{{Port: 9000, Errno: syscall.EADDRINUSE, Msg: "address already in use"}, {Port: 9002, Errno: syscall.EACCES, Msg: "permission denied"}}},
	}}
}

// Every message decodes to what was encoded.
func TestMessagesRoundTrip(t *testing.T) {
	one := func(t *testing.T, write func(fw *frameWriter) error) frame {
		t.Helper()
		fs := readFrames(t, encodeFrames(t, write))
		if len(fs) != 1 {
			t.Fatalf("%d frames, want 1", len(fs))
		}
		return fs[0]
	}
	t.Run("hello", func(t *testing.T) {
		h := testHello()
		got, err := decodeHello(one(t, func(fw *frameWriter) error { return fw.writeHello(h) }))
		if err != nil || !reflect.DeepEqual(got, h) {
			t.Fatalf("got %+v, %v; want %+v", got, err, h)
		}
	})
	t.Run("client hello", func(t *testing.T) {
		h := &ClientHello{Want: 2, Intent: IntentWrite, Name: "test"}
		got, err := decodeClientHello(one(t, func(fw *frameWriter) error { return fw.writeClientHello(h) }))
		if err != nil || !reflect.DeepEqual(got, h) {
			t.Fatalf("got %+v, %v", got, err)
		}
	})
	t.Run("pifs", func(t *testing.T) {
		p := []Pif{{0, "host"}, {1, "ns1"}}
		got, err := decodePifs(one(t, func(fw *frameWriter) error { return fw.writePifs(2, p) }))
		if err != nil || !reflect.DeepEqual(got, p) {
			t.Fatalf("got %+v, %v", got, err)
		}
	})
	t.Run("loaded", func(t *testing.T) {
		l := &Loaded{Generation: 3, Rules: 4, Ports: 5, Kept: 6, Added: 7, Removed: 8}
		got, err := decodeLoaded(one(t, func(fw *frameWriter) error { return fw.writeLoaded(1, l) }))
		if err != nil || !reflect.DeepEqual(got, l) {
			t.Fatalf("got %+v, %v", got, err)
		}
	})
	t.Run("apply", func(t *testing.T) {
		got, err := decodeApply(one(t, func(fw *frameWriter) error { return fw.writeApply(1, 1234) }))
		if err != nil || got != 1234 {
			t.Fatalf("got %d, %v", got, err)
		}
	})
	t.Run("committed", func(t *testing.T) {
		got, err := decodeCommitted(one(t, func(fw *frameWriter) error { return fw.writeCommitted(1, 77) }))
		if err != nil || got != 77 {
			t.Fatalf("got %d, %v", got, err)
		}
	})
	t.Run("status", func(t *testing.T) {
		s := &Status{Generation: 5, Rules: 6, Ports: 7, Sessions: 8, Pifs: 2, Writer: true}
		got, err := decodeStatus(one(t, func(fw *frameWriter) error { return fw.writeStatus(1, s) }))
		if err != nil || !reflect.DeepEqual(got, s) {
			t.Fatalf("got %+v, %v", got, err)
		}
	})
	t.Run("error", func(t *testing.T) {
		for _, e := range []*Error{{Code: CodeBusy, Index: -1, Msg: "busy"}, {Code: CodeInvalidRule, Index: 3, Rule: "tcp x", Msg: "bad"}} {
			got, err := decodeError(one(t, func(fw *frameWriter) error { return fw.writeError(1, e) }))
			if err != nil || !reflect.DeepEqual(got, e) {
				t.Fatalf("got %+v, %v; want %+v", got, err, e)
			}
		}
	})
	t.Run("summary v2 and v1", func(t *testing.T) {
		s := testSummary()
		for _, ver := range []uint8{Version1, Version2} {
			f := one(t, func(fw *frameWriter) error { return fw.writeSummary(ver, s) })
			f.ver = ver
			c, err := decodeSummaryChunk(f)
			if err != nil {
				t.Fatal(err)
			}
			want := testSummary().Rules
			if ver == Version1 {
				for i := range want {
					want[i].Ports = nil
				}
			}
			if !c.last || c.gen != 9 || c.ok || c.kept != 1 || c.added != 2 || c.removed != 3 || c.total != 2 || !reflect.DeepEqual(c.results, want) {
				t.Fatalf("v%d: got %+v", ver, c)
			}
		}
	})
}

// A table that does not fit one frame is chunked: every chunk within the
// bound, pifs in order, the last flagged, nothing lost.
func TestTableChunking(t *testing.T) {
	long := "tcp 0.0.0.0:1 allow=" + strings.TrimSuffix(strings.Repeat("10.0.0.0/8,", 700), ",")
	var lines []tableLine
	for i := 0; i < 600; i++ {
		lines = append(lines, tableLine{pif: uint16(i / 200), line: long})
	}
	b := encodeFrames(t, func(fw *frameWriter) error { return fw.writeTable(2, MsgLoad, 42, lines) })
	fs := readFrames(t, b)
	if len(fs) < 6 { // three pifs of 200 lines of ~7.7 KB: 1 MiB holds ~135
		t.Fatalf("%d frames for 600 long lines in 3 pifs", len(fs))
	}
	var got []tableLine
	for i, f := range fs {
		if len(f.payload) > MaxPayload {
			t.Fatalf("frame %d: %d bytes", i, len(f.payload))
		}
		c, err := decodeTableChunk(f)
		if err != nil {
			t.Fatal(err)
		}
		if c.gen != 42 || c.last != (i == len(fs)-1) {
			t.Fatalf("chunk %d: gen %d last %v", i, c.gen, c.last)
		}
		for _, l := range c.lines {
			got = append(got, tableLine{c.pif, l})
		}
	}
	if !reflect.DeepEqual(got, lines) {
		t.Fatal("lines differ after chunking")
	}
	// An empty table is one chunk, pif 0, last.
	fs = readFrames(t, encodeFrames(t, func(fw *frameWriter) error { return fw.writeTable(1, MsgRules, 7, nil) }))
	c, err := decodeTableChunk(fs[0])
	if len(fs) != 1 || err != nil || !c.last || c.pif != 0 || len(c.lines) != 0 || c.gen != 7 {
		t.Fatalf("empty table: %d frames, %+v, %v", len(fs), c, err)
	}
	// Lines not grouped by pif are refused by the encoder.
	var buf bytes.Buffer
	fw := frameWriter{w: bufio.NewWriter(&buf)}
	if err := fw.writeTable(1, MsgLoad, 1, []tableLine{{1, "a"}, {0, "b"}}); err == nil {
		t.Fatal("ungrouped lines encoded")
	}
}

func header(ver uint8, typ MsgType, n uint32) []byte {
	h := []byte{'S', 'L', ver, byte(typ), 0, 0, 0, 0}
	binary.BigEndian.PutUint32(h[4:], n)
	return h
}

func withPayload(ver uint8, typ MsgType, p []byte) []byte {
	return append(header(ver, typ, uint32(len(p))), p...)
}

// Malformed frames and payloads get their defined code, never a panic.
func TestMalformed(t *testing.T) {
	cases := []struct {
		name   string
		in     []byte
		decode func(frame) error
		code   Code
		want   string // in the message, if set
	}{
		{"bad magic", []byte("GET / HTTP/1.0\r\n"), nil, CodeBadFrame, ""},
		{"version 0", header(0, MsgHello, 0), nil, CodeBadVersion, ""},
		{"a version past MaxVersion", header(MaxVersion+1, MsgHello, 0), nil, CodeBadVersion, ""},
		{"unknown type", header(1, 0x7f, 0), nil, CodeBadFrame, ""},
		{"type 0", header(1, 0, 0), nil, CodeBadFrame, ""},
		{"length over the bound", header(1, MsgLoad, MaxPayload+1), nil, CodeTooLarge, ""},
		{"length 4 GiB", header(1, MsgLoad, 0xffffffff), nil, CodeTooLarge, ""},
		{"short payload", withPayload(1, MsgApply, []byte{0, 0}), func(f frame) error { _, err := decodeApply(f); return err }, CodeBadFrame, ""},
		{"bytes left over", withPayload(1, MsgApply, []byte{0, 0, 0, 0, 9}), func(f frame) error { _, err := decodeApply(f); return err }, CodeBadFrame, ""},
		{"commit with a payload", withPayload(1, MsgCommit, []byte{1}), decodeEmpty, CodeBadFrame, ""},
		{"string over its bound", withPayload(1, MsgClientHello, []byte{2, 4, 0, 65, 'x'}), func(f frame) error { _, err := decodeClientHello(f); return err }, CodeTooLarge, ""},
		{"string past the end", withPayload(1, MsgClientHello, []byte{2, 4, 0, 5, 'x'}), func(f frame) error { _, err := decodeClientHello(f); return err }, CodeBadFrame, ""},
		{"count beyond the bytes", withPayload(1, MsgPifs, []byte{0x03, 0xff}), func(f frame) error { _, err := decodePifs(f); return err }, CodeBadFrame, ""},
		{"count over its bound", withPayload(1, MsgPifs, []byte{0xff, 0xff}), func(f frame) error { _, err := decodePifs(f); return err }, CodeTooLarge, ""},
		{"last not a bool", withPayload(1, MsgRules, []byte{0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 2, 0, 0}), func(f frame) error { _, err := decodeTableChunk(f); return err }, CodeBadFrame, ""},
		{"summary results over total", withPayload(2, MsgSummary, append(make([]byte, 21), 0, 0, 0, 1, 1, 0, 2)),
			func(f frame) error { _, err := decodeSummaryChunk(f); return err }, CodeTooLarge, ""},
		{"v2 ports not the failed count", withPayload(2, MsgSummary, append(append(make([]byte, 21), 0, 0, 0, 1, 1, 0, 1),
			0, 0 /* rule */, 0, 0 /* listen */, 0 /* weak */, 0, 0, 0, 1 /* requested */, 0, 0, 0, 0 /* bound */, 0, 0, 0, 1 /* failed */, 0, 0 /* no ports */)),
			func(f frame) error { _, err := decodeSummaryChunk(f); return err }, CodeBadFrame, "1 failed ports but 0 listed"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			fr := frameReader{r: bytes.NewReader(c.in)}
			f, err := fr.read()
			if err == nil && c.decode != nil {
				err = c.decode(f)
			}
			if got := CodeOf(err); got != c.code || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v (code %v), want code %v with %q", err, got, c.code, c.want)
			}
		})
	}
}

// A truncated frame is an unexpected EOF, not a clean end.
func TestTruncatedFrame(t *testing.T) {
	b := withPayload(1, MsgApply, []byte{0, 0, 0, 0})
	for n := 1; n < len(b); n++ {
		fr := frameReader{r: bytes.NewReader(b[:n])}
		_, err := fr.read()
		if !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("%d of %d bytes: %v, want unexpected EOF", n, len(b), err)
		}
	}
	fr := frameReader{r: bytes.NewReader(nil)}
	if _, err := fr.read(); err != io.EOF {
		t.Fatalf("empty stream: %v, want EOF", err)
	}
}

// A header that claims a large payload costs nothing until the bytes come:
// the reader grows its buffer with what arrives, not with what is claimed.
func TestReaderAllocatesWhatArrives(t *testing.T) {
	in := append(header(1, MsgLoad, MaxPayload), make([]byte, 100)...)
	fr := frameReader{r: bytes.NewReader(in)}
	if _, err := fr.read(); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("read: %v", err)
	}
	if cap(fr.buf) > 2*readStep {
		t.Fatalf("buffer of %d bytes for 100 that arrived", cap(fr.buf))
	}
	// Steady state: reading frames into the reused buffer allocates nothing.
	one := withPayload(1, MsgApply, []byte{0, 0, 0, 1})
	r := bytes.NewReader(nil)
	fr = frameReader{r: r}
	allocs := testing.AllocsPerRun(100, func() {
		r.Reset(one)
		if _, err := fr.read(); err != nil {
			t.Fatal(err)
		}
	})
	if allocs > 0 {
		t.Fatalf("%.1f allocations per frame read", allocs)
	}
}

// The encoder refuses what the decoder would refuse.
func TestEncoderBounds(t *testing.T) {
	var buf bytes.Buffer
	fw := frameWriter{w: bufio.NewWriter(&buf)}
	if err := fw.writeClientHello(&ClientHello{Want: 1, Intent: 1, Name: strings.Repeat("x", maxName+1)}); CodeOf(err) != CodeTooLarge {
		t.Fatalf("long name: %v", err)
	}
	if err := fw.writeTable(1, MsgLoad, 1, []tableLine{{0, strings.Repeat("x", maxLine+1)}}); CodeOf(err) != CodeTooLarge {
		t.Fatalf("long line: %v", err)
	}
	s := testSummary()
	s.Rules[1].Failed = 1
	if err := fw.writeSummary(2, s); err == nil {
		t.Fatal("summary with a failed count that differs from its ports encoded")
	}
	// Long texts in an ERROR or a port error are cut, at a rune boundary.
	b := encodeFrames(t, func(fw *frameWriter) error {
		return fw.writeError(1, &Error{Code: CodeInternal, Index: -1, Msg: strings.Repeat("é", maxErrMsg)})
	})
	e, err := decodeError(readFrames(t, b)[0])
	if err != nil || len(e.Msg) > maxErrMsg || !strings.HasPrefix(strings.Repeat("é", maxErrMsg), e.Msg) {
		t.Fatalf("long message: %v, %d bytes", err, len(e.Msg))
	}
}

// FuzzDecode feeds arbitrary bytes to the frame reader and every decoder:
// no panic, no unbounded allocation, and what decodes re-encodes to a frame
// that decodes the same.
func FuzzDecode(f *testing.F) {
	f.Add(encodeFrames(f, func(fw *frameWriter) error { return fw.writeHello(testHello()) }))
	f.Add(encodeFrames(f, func(fw *frameWriter) error { return fw.writeSummary(2, testSummary()) }))
	f.Add(encodeFrames(f, func(fw *frameWriter) error { return fw.writeSummary(1, testSummary()) }))
	f.Add(encodeFrames(f, func(fw *frameWriter) error {
		return fw.writeTable(2, MsgLoad, 3, []tableLine{{0, "tcp 0.0.0.0:80"}, {1, "tcp ns1/[::]:81"}})
	}))
	f.Add(encodeFrames(f, func(fw *frameWriter) error {
		return fw.writeError(1, &Error{Code: CodeInvalidRule, Index: 2, Rule: "tcp", Msg: "no"})
	}))
	f.Add(encodeFrames(f, func(fw *frameWriter) error { return fw.writePifs(1, []Pif{{0, "host"}, {1, "a"}}) }))
	f.Add(encodeFrames(f, func(fw *frameWriter) error {
		return fw.writeStatus(1, &Status{Generation: 1, Rules: 2, Ports: 3, Sessions: 4, Pifs: 1})
	}))
	f.Add(encodeFrames(f, func(fw *frameWriter) error {
		return fw.writeStatus(3, &Status{Generation: 1, BootID: 9, ConfirmGen: 2, ConfirmLeft: time.Second})
	}))
	f.Add(encodeFrames(f, func(fw *frameWriter) error {
		return fw.writeStatus(6, &Status{Generation: 1, Version: "v1.2.3 (rev abc)", PID: 42, Started: time.UnixMilli(1e12),
			Uptime: time.Hour, State: StateDraining, DrainLeft: time.Second})
	}))
	f.Add(encodeFrames(f, func(fw *frameWriter) error { return fw.writeRecent(3, 10) }))
	f.Add(encodeFrames(f, func(fw *frameWriter) error { return fw.writeHistory(3, []string{`{"generation":1}`, "{}"}) }))
	f.Add(encodeFrames(f, func(fw *frameWriter) error {
		return fw.writeReloaded(3, &Reload{Outcome: ReloadRolledBack, Generation: 4, Restart: []string{"loops"}})
	}))
	f.Add(encodeFrames(f, func(fw *frameWriter) error { return fw.writePending(3, &Pending{Generation: 5, Left: time.Minute}) }))
	f.Add(encodeFrames(f, func(fw *frameWriter) error { return fw.writeUpgrade(3, "/usr/local/bin/sluice", 30*time.Second) }))
	f.Add(encodeFrames(f, func(fw *frameWriter) error { return fw.writeUpgrade(3, "", 0) }))
	f.Add(encodeFrames(f, func(fw *frameWriter) error {
		return fw.writeUpgraded(3, &Upgraded{OldPID: 100, NewPID: 200, Generation: 7})
	}))
	f.Add(header(1, MsgLoad, MaxPayload+1))
	f.Fuzz(func(t *testing.T, in []byte) {
		fr := frameReader{r: bytes.NewReader(in)}
		for i := 0; i < 8; i++ {
			fm, err := fr.read()
			if err != nil {
				return
			}
			if len(fm.payload) > MaxPayload {
				t.Fatalf("payload of %d bytes", len(fm.payload))
			}
			fuzzOne(t, fm)
		}
	})
}

// fuzzOne decodes a frame as its type says and, if it decodes, checks that
// the re-encoding decodes to the same value.
func fuzzOne(t *testing.T, fm frame) {
	again := func(write func(fw *frameWriter) error) frame {
		var buf bytes.Buffer
		fw := frameWriter{w: bufio.NewWriter(&buf)}
		if err := write(&fw); err != nil {
			t.Fatalf("%s decoded but does not re-encode: %v", fm.typ, err)
		}
		_ = fw.flush()
		fs := readFrames(t, buf.Bytes())
		if len(fs) != 1 {
			t.Fatalf("%s re-encoded to %d frames", fm.typ, len(fs))
		}
		fs[0].ver = fm.ver
		return fs[0]
	}
	same := func(a, b any) {
		if !reflect.DeepEqual(a, b) {
			t.Fatalf("%s: %+v re-decodes as %+v", fm.typ, a, b)
		}
	}
	switch fm.typ {
	case MsgHello:
		if h, err := decodeHello(fm); err == nil {
			// Unknown limit ids are dropped and huge values clamped: compare
			// what this build keeps.
			h2, err := decodeHello(again(func(fw *frameWriter) error { return fw.writeHello(h) }))
			if err != nil {
				t.Fatal(err)
			}
			same(h, h2)
		}
	case MsgClientHello:
		if h, err := decodeClientHello(fm); err == nil {
			h2, err := decodeClientHello(again(func(fw *frameWriter) error { return fw.writeClientHello(h) }))
			if err != nil {
				t.Fatal(err)
			}
			same(h, h2)
		}
	case MsgPifs:
		if p, err := decodePifs(fm); err == nil {
			p2, err := decodePifs(again(func(fw *frameWriter) error { return fw.writePifs(fm.ver, p) }))
			if err != nil {
				t.Fatal(err)
			}
			same(p, p2)
		}
	case MsgRules, MsgLoad:
		if c, err := decodeTableChunk(fm); err == nil && len(c.lines) > 0 {
			lines := make([]tableLine, len(c.lines))
			for i, l := range c.lines {
				lines[i] = tableLine{c.pif, l}
			}
			c2, err := decodeTableChunk(again(func(fw *frameWriter) error { return fw.writeTable(fm.ver, fm.typ, c.gen, lines) }))
			if err != nil {
				t.Fatal(err)
			}
			c2.last = c.last
			same(c, c2)
		}
	case MsgSummary:
		if c, err := decodeSummaryChunk(fm); err == nil && c.last && c.total == len(c.results) {
			s := &Summary{Generation: c.gen, OK: c.ok, Kept: c.kept, Added: c.added, Removed: c.removed, Rules: c.results}
			c2, err := decodeSummaryChunk(again(func(fw *frameWriter) error { return fw.writeSummary(fm.ver, s) }))
			if err != nil {
				t.Fatal(err)
			}
			same(c, c2)
		}
	case MsgStatus:
		if s, err := decodeStatus(fm); err == nil && s.Sessions >= 0 {
			s2, err := decodeStatus(again(func(fw *frameWriter) error { return fw.writeStatus(fm.ver, s) }))
			if err != nil {
				t.Fatal(err)
			}
			same(s, s2)
		}
	case MsgError:
		if e, err := decodeError(fm); err == nil {
			e2, err := decodeError(again(func(fw *frameWriter) error { return fw.writeError(fm.ver, e) }))
			if err != nil {
				t.Fatal(err)
			}
			same(e, e2)
		}
	case MsgLoaded:
		_, _ = decodeLoaded(fm)
	case MsgApply:
		_, _ = decodeApply(fm)
	case MsgCommitted:
		_, _ = decodeCommitted(fm)
	case MsgCommit, MsgRollback:
		_ = decodeEmpty(fm)
	case MsgWatch:
		if g, err := decodeWatch(fm); err == nil {
			g2, err := decodeWatch(again(func(fw *frameWriter) error { return fw.writeWatch(fm.ver, g) }))
			if err != nil {
				t.Fatal(err)
			}
			same(g, g2)
		}
	case MsgQuery:
		if rule, max, err := decodeQuery(fm); err == nil {
			rule2, max2, err := decodeQuery(again(func(fw *frameWriter) error { return fw.writeQuery(fm.ver, rule, max) }))
			if err != nil {
				t.Fatal(err)
			}
			same([2]any{rule, max}, [2]any{rule2, max2})
		}
	case MsgEvent:
		_, _ = decodeEvent(fm)
	case MsgSessions:
		_, _ = decodeSessionsChunk(fm, &SessionList{}, true)
	case MsgStats:
		var cs []observe.Counter
		_, _ = decodeStatsChunk(fm, &cs)
	case MsgRecent:
		if n, err := decodeRecent(fm); err == nil {
			n2, err := decodeRecent(again(func(fw *frameWriter) error { return fw.writeRecent(fm.ver, n) }))
			if err != nil {
				t.Fatal(err)
			}
			same(n, n2)
		}
	case MsgHistory:
		var es []string
		if last, err := decodeHistoryChunk(fm, &es); err == nil && last {
			var es2 []string
			if _, err := decodeHistoryChunk(again(func(fw *frameWriter) error { return fw.writeHistory(fm.ver, es) }), &es2); err != nil {
				t.Fatal(err)
			}
			same(es, es2)
		}
	case MsgReloaded:
		if r, err := decodeReloaded(fm); err == nil {
			r2, err := decodeReloaded(again(func(fw *frameWriter) error {
				return fw.writeReloaded(fm.ver, &Reload{Outcome: r.Outcome, Generation: r.Generation, Restart: r.Restart})
			}))
			if err != nil {
				t.Fatal(err)
			}
			same(r, r2)
		}
	case MsgPending:
		if p, err := decodePending(fm); err == nil {
			p2, err := decodePending(again(func(fw *frameWriter) error { return fw.writePending(fm.ver, p) }))
			if err != nil {
				t.Fatal(err)
			}
			same(p, p2)
		}
	case MsgLeave:
		_ = decodeEmpty(fm)
	case MsgUpgrade:
		if bin, timeout, err := decodeUpgrade(fm); err == nil {
			bin2, timeout2, err := decodeUpgrade(again(func(fw *frameWriter) error { return fw.writeUpgrade(fm.ver, bin, timeout) }))
			if err != nil {
				t.Fatal(err)
			}
			same([2]any{bin, timeout}, [2]any{bin2, timeout2})
		}
	case MsgUpgraded:
		if u, err := decodeUpgraded(fm); err == nil {
			u2, err := decodeUpgraded(again(func(fw *frameWriter) error { return fw.writeUpgraded(fm.ver, u) }))
			if err != nil {
				t.Fatal(err)
			}
			same(u, u2)
		}
	default:
		t.Fatalf("the reader let through unknown type %s", fm.typ)
	}
}
