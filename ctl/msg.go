package ctl

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"syscall"
	"time"

	"github.com/sluice-proxy/sluice/rules"
)

// Bounds of the payload fields, as docs/ctl-protocol.md gives them.
const (
	maxSoftware   = 64
	maxName       = 64 // a client's name, a pif's name
	maxFeature    = 32 // bytes in a feature name
	maxFeatures   = 32
	maxLimits     = 32
	MaxPifs       = 1024 // pifs in PIFS, host included
	maxLine       = rules.MaxLineLen
	maxListen     = 128
	maxPortText   = 128
	maxPortDetail = rules.MaxPortsPerRule
	maxErrMsg     = 1024
	maxVersionStr = 256 // the daemon's version in STATUS
	maxChunkItems = 0xffff
	noIndex       = 0xffffffff
)

// Limits are the server's bounds, sent in its hello. A zero field was not
// given by the server.
type Limits struct {
	MaxPayload      int
	MaxRules        int
	MaxPorts        int
	MaxPortsPerRule int
	MaxLineLen      int
	MaxPifs         int
	DefaultConfirm  time.Duration
	MaxConfirm      time.Duration
	IOTimeout       time.Duration
	MaxClients      int
	// BootID is not a bound: it names this run of the daemon (a new one at
	// every start; 0 = not sent). It rides in the limits list, which a
	// client skips the ids it does not know of, so every client reads the
	// hello as before.
	BootID uint64
	// LoadTimeout bounds a whole load (step 5), MaxWatchers the watch
	// connections, which do not count against MaxClients.
	LoadTimeout time.Duration
	MaxWatchers int
}

// limitField ties a limit id to its field: a count, or a duration carried
// in milliseconds.
type limitField struct {
	id LimitID
	n  *int
	d  *time.Duration
	u  *uint64 // a value carried whole (the boot id)
}

// fields lists l's limits with their ids, in id order.
func (l *Limits) fields() []limitField {
	return []limitField{
		{LimitMaxPayload, &l.MaxPayload, nil, nil},
		{LimitMaxRules, &l.MaxRules, nil, nil},
		{LimitMaxPorts, &l.MaxPorts, nil, nil},
		{LimitMaxPortsPerRule, &l.MaxPortsPerRule, nil, nil},
		{LimitMaxLineLen, &l.MaxLineLen, nil, nil},
		{LimitMaxPifs, &l.MaxPifs, nil, nil},
		{LimitDefaultConfirmMs, nil, &l.DefaultConfirm, nil},
		{LimitMaxConfirmMs, nil, &l.MaxConfirm, nil},
		{LimitIOTimeoutMs, nil, &l.IOTimeout, nil},
		{LimitMaxClients, &l.MaxClients, nil, nil},
		{LimitBootID, nil, nil, &l.BootID},
		{LimitLoadTimeoutMs, nil, &l.LoadTimeout, nil},
		{LimitMaxWatchers, &l.MaxWatchers, nil, nil},
	}
}

func (f limitField) get() uint64 {
	if f.u != nil {
		return *f.u
	}
	if f.d != nil {
		return uint64(max(*f.d, 0) / time.Millisecond)
	}
	return uint64(max(*f.n, 0))
}

// set stores v, clamped to what the field holds.
func (f limitField) set(v uint64) {
	if f.u != nil {
		*f.u = v
		return
	}
	if f.d != nil {
		*f.d = time.Duration(min(v, uint64(math.MaxInt64/int64(time.Millisecond)))) * time.Millisecond
		return
	}
	*f.n = int(min(v, math.MaxInt32))
}

// ServerHello is step 1: who the server is, its limits and its features.
type ServerHello struct {
	Software string
	Limits   Limits
	Features []string
}

// Has reports whether the server lists feature f.
func (h ServerHello) Has(f string) bool {
	for _, g := range h.Features {
		if g == f {
			return true
		}
	}
	return false
}

// ClientHello is step 2.
type ClientHello struct {
	Want   uint8  // the highest version the client speaks
	Intent Intent // what the connection is for
	Name   string // for the server's logs
}

// Pif is a place where sockets live, as PIFS lists it: index 0 is host.
type Pif struct {
	Index int
	Name  string
}

// Loaded is step 6: the shadow table validated, and what applying it would
// change.
type Loaded struct {
	Generation uint64 // the base generation, the active one
	Rules      int
	Ports      int
	Kept       int // listen keys whose socket would move
	Added      int // listen keys to bind
	Removed    int // listen keys to pause, and close at commit
}

// RuleResult is one rule's line of a summary.
type RuleResult struct {
	Rule      string // canonical line
	Listen    string // its listen part, "tcp 0.0.0.0:8080"
	Weak      bool
	Requested int // ports the rule listens on
	Bound     int // ports serving after the apply
	Failed    int // ports that failed
	// Ports lists each failed port: version 2 only (Summary.Detail).
	Ports []rules.PortError
}

// Summary is step 8 (and step 9 after a rollback): the bind summary per
// rule and the verdict.
type Summary struct {
	Generation uint64 // the table's generation once committed; after a rollback, the restored one's
	OK         bool   // the verdict, the server's
	Kept       int
	Added      int
	Removed    int
	Rules      []RuleResult
	Detail     bool // version 2: RuleResult.Ports is filled
}

// Failures lists the failed ports. With the version 2 detail each line is
// the contract's "tcp 0.0.0.0:8080: port 8080: address already in use"
// (rules.Summary.Failures); in version 1 a rule's line only counts them.
func (s *Summary) Failures() []string {
	if s.Detail {
		rs := rules.Summary{Rules: make([]rules.RuleResult, len(s.Rules))}
		for i, r := range s.Rules {
			rs.Rules[i] = rules.RuleResult{Listen: r.Listen, Failed: r.Ports}
		}
		return rs.Failures()
	}
	var out []string
	for _, r := range s.Rules {
		if r.Failed > 0 {
			out = append(out, fmt.Sprintf("%s: %d of %d ports failed (no per-port detail in protocol version 1)", r.Listen, r.Failed, r.Requested))
		}
	}
	return out
}

// summaryFrom converts the engine's summary for the wire.
func summaryFrom(s *rules.Summary) *Summary {
	out := &Summary{Generation: s.Generation, OK: s.OK(), Kept: s.Kept, Added: s.Added, Removed: s.Removed,
		Rules: make([]RuleResult, len(s.Rules)), Detail: true}
	for i, r := range s.Rules {
		out.Rules[i] = RuleResult{Rule: r.Rule, Listen: r.Listen, Weak: r.Weak, Requested: r.Requested,
			Bound: r.Bound, Failed: len(r.Failed), Ports: r.Failed}
	}
	return out
}

// Status answers intent status.
type Status struct {
	Generation uint64
	Rules      int
	Ports      int
	Sessions   int64
	Pifs       int  // host included
	Writer     bool // a writing transaction is open
	// Version 3 only (zero from an older server):
	BootID      uint64        // this run of the daemon (the hello's boot-id)
	ConfirmGen  uint64        // a commit-confirmed apply is pending: the generation it gets if confirmed; 0 = none
	ConfirmLeft time.Duration // until that one rolls back by itself
	// Version 4 only: an apply awaits its commit (a commit-confirmed one
	// included). Generation, Rules and Ports above are the committed
	// table's; these are the applied one's, which the sockets serve.
	PendingGen   uint64 // the generation it gets if committed; 0 = none pending
	PendingRules int
	PendingPorts int
	// Version 6 only: the daemon's process and what it is doing.
	Version   string        // as `sluice version` prints it; "" = not known (a bare server)
	PID       int           // the daemon's process id
	Started   time.Time     // when the daemon started (millisecond precision)
	Uptime    time.Duration // since then, by the daemon's monotonic clock (a wall clock step does not change it)
	State     RunState      // serving or draining; 0 from an older server
	DrainLeft time.Duration // draining: until the drain deadline cuts the sessions left
}

// tableLine is one rule line of RULES or LOAD with its listen pif's index.
type tableLine struct {
	pif  uint16
	line string
}

// tableChunk is one frame of RULES or LOAD.
type tableChunk struct {
	gen   uint64
	pif   uint16
	last  bool
	lines []string
}

// summaryChunk is one frame of SUMMARY.
type summaryChunk struct {
	gen     uint64 // gen to total: equal in every chunk of a message
	ok      bool
	kept    int
	added   int
	removed int
	total   int
	last    bool
	results []RuleResult
}

// --- encoding ---

func (fw *frameWriter) writeHello(h *ServerHello) error {
	fw.start(Version1, MsgHello)
	fw.str(h.Software, maxSoftware, "software")
	lims := h.Limits.fields()
	n := 0
	for _, l := range lims {
		if l.get() != 0 {
			n++
		}
	}
	fw.u8(uint8(n))
	for _, l := range lims {
		if v := l.get(); v != 0 {
			fw.u16(uint16(l.id))
			fw.u64(v)
		}
	}
	if len(h.Features) > maxFeatures {
		fw.fail(errorf(CodeTooLarge, "%d features, at most %d allowed", len(h.Features), maxFeatures))
	}
	fw.u8(uint8(len(h.Features)))
	for _, f := range h.Features {
		fw.str(f, maxFeature, "feature")
	}
	return fw.finish()
}

func (fw *frameWriter) writeClientHello(h *ClientHello) error {
	fw.start(Version1, MsgClientHello)
	fw.u8(h.Want)
	fw.u8(uint8(h.Intent))
	fw.str(h.Name, maxName, "client name")
	return fw.finish()
}

func (fw *frameWriter) writePifs(ver uint8, pifs []Pif) error {
	fw.start(ver, MsgPifs)
	if len(pifs) > MaxPifs {
		fw.fail(errorf(CodeTooLarge, "%d pifs, at most %d allowed", len(pifs), MaxPifs))
	}
	fw.u16(uint16(len(pifs)))
	for _, p := range pifs {
		fw.u16(uint16(p.Index))
		fw.str(p.Name, maxName, "pif name")
	}
	return fw.finish()
}

// writeTable writes RULES or LOAD: lines grouped by pif in non-decreasing
// pif order, chunked to fit frames.
func (fw *frameWriter) writeTable(ver uint8, typ MsgType, gen uint64, lines []tableLine) error {
	c := chunker{fw: fw, ver: ver, typ: typ}
	var head [10]byte // gen, pif
	binary.BigEndian.PutUint64(head[:], gen)
	if err := c.setHead(head[:]); err != nil {
		return err
	}
	for i, l := range lines {
		if i > 0 && l.pif < lines[i-1].pif {
			return fmt.Errorf("%s: lines are not grouped by pif (pif %d after %d)", typ, l.pif, lines[i-1].pif)
		}
		binary.BigEndian.PutUint16(head[8:], l.pif)
		if err := c.setHead(head[:]); err != nil {
			return err
		}
		if err := c.add(func(e *enc) { e.str(l.line, maxLine, "rule line") }); err != nil {
			return err
		}
	}
	return c.end()
}

func (fw *frameWriter) writeLoaded(ver uint8, l *Loaded) error {
	fw.start(ver, MsgLoaded)
	fw.u64(l.Generation)
	fw.count32(l.Rules, "rules")
	fw.count32(l.Ports, "ports")
	fw.count32(l.Kept, "kept")
	fw.count32(l.Added, "added")
	fw.count32(l.Removed, "removed")
	return fw.finish()
}

func (fw *frameWriter) writeApply(ver uint8, confirmMs uint32) error {
	fw.start(ver, MsgApply)
	fw.u32(confirmMs)
	return fw.finish()
}

// writeSummary writes SUMMARY, with the per-port detail in version 2.
func (fw *frameWriter) writeSummary(ver uint8, s *Summary) error {
	var e enc
	e.u64(s.Generation)
	e.bool(s.OK)
	e.count32(s.Kept, "kept")
	e.count32(s.Added, "added")
	e.count32(s.Removed, "removed")
	e.count32(len(s.Rules), "results")
	if e.err != nil {
		return e.err
	}
	c := chunker{fw: fw, ver: ver, typ: MsgSummary, head: e.b} // e.b is ours alone
	for i := range s.Rules {
		r := &s.Rules[i]
		err := c.add(func(e *enc) {
			e.str(r.Rule, maxLine, "rule line")
			e.str(r.Listen, maxListen, "listen")
			e.bool(r.Weak)
			e.count32(r.Requested, "requested")
			e.count32(r.Bound, "bound")
			e.count32(r.Failed, "failed")
			if ver < Version2 {
				return
			}
			if len(r.Ports) != r.Failed {
				e.fail(fmt.Errorf("summary of %s: %d failed ports but %d listed", r.Listen, r.Failed, len(r.Ports)))
				return
			}
			if len(r.Ports) > maxPortDetail {
				e.fail(errorf(CodeTooLarge, "summary of %s: %d failed ports, at most %d allowed", r.Listen, len(r.Ports), maxPortDetail))
				return
			}
			e.u16(uint16(len(r.Ports)))
			for _, p := range r.Ports {
				e.u16(p.Port)
				e.u32(uint32(p.Errno))
				e.str(truncate(p.Msg, maxPortText), maxPortText, "port error text")
			}
		})
		if err != nil {
			return err
		}
	}
	return c.end()
}

func (fw *frameWriter) writeCommitted(ver uint8, gen uint64) error {
	fw.start(ver, MsgCommitted)
	fw.u64(gen)
	return fw.finish()
}

// writeEmpty writes a message without fields: COMMIT, ROLLBACK.
func (fw *frameWriter) writeEmpty(ver uint8, typ MsgType) error {
	fw.start(ver, typ)
	return fw.finish()
}

func (fw *frameWriter) writeStatus(ver uint8, s *Status) error {
	fw.start(ver, MsgStatus)
	fw.u64(s.Generation)
	fw.count32(s.Rules, "rules")
	fw.count32(s.Ports, "ports")
	fw.u64(uint64(max(s.Sessions, 0)))
	fw.u16(uint16(min(s.Pifs, math.MaxUint16)))
	fw.bool(s.Writer)
	if ver >= Version3 {
		fw.u64(s.BootID)
		fw.u64(s.ConfirmGen)
		fw.u64(uint64(max(s.ConfirmLeft, 0) / time.Millisecond))
	}
	if ver >= Version4 {
		fw.u64(s.PendingGen)
		fw.count32(s.PendingRules, "pending rules")
		fw.count32(s.PendingPorts, "pending ports")
	}
	if ver >= Version6 {
		fw.str(truncate(s.Version, maxVersionStr), maxVersionStr, "version")
		fw.u32(uint32(max(s.PID, 0)))
		fw.u64(uint64(max(s.Started.UnixMilli(), 0)))
		fw.u64(uint64(max(s.Uptime, 0) / time.Millisecond))
		fw.u8(uint8(s.State))
		fw.u64(uint64(max(s.DrainLeft, 0) / time.Millisecond))
	}
	return fw.finish()
}

func (fw *frameWriter) writeError(ver uint8, e *Error) error {
	fw.start(ver, MsgError)
	fw.u16(uint16(e.Code))
	if e.Index < 0 || e.Index >= noIndex {
		fw.u32(noIndex)
	} else {
		fw.u32(uint32(e.Index))
	}
	fw.str(truncate(e.Rule, maxLine), maxLine, "rule")
	fw.str(truncate(e.Msg, maxErrMsg), maxErrMsg, "message")
	return fw.finish()
}

// truncate cuts s to at most n bytes, at a UTF-8 boundary.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && n < len(s) && s[n]&0xc0 == 0x80 {
		n--
	}
	return s[:n]
}

// chunker writes a list as a run of frames of one type. Each frame holds
// the message's fixed fields (head), a last byte and a u16 count, then the
// items that fit in it.
type chunker struct {
	fw     *frameWriter
	ver    uint8
	typ    MsgType
	head   []byte
	open   bool
	lastAt int // offset of the last byte in the open frame
	n      int // items in the open frame
}

func (c *chunker) begin() {
	c.fw.start(c.ver, c.typ)
	c.fw.b = append(c.fw.b, c.head...)
	c.lastAt = len(c.fw.b)
	c.fw.b = append(c.fw.b, 0, 0, 0)
	c.n = 0
	c.open = true
}

func (c *chunker) flush(last bool) error {
	if last {
		c.fw.b[c.lastAt] = 1
	}
	binary.BigEndian.PutUint16(c.fw.b[c.lastAt+1:], uint16(c.n))
	c.open = false
	return c.fw.finish()
}

// setHead changes the fixed fields; a frame open with others is sent first.
func (c *chunker) setHead(h []byte) error {
	if c.head != nil && bytes.Equal(h, c.head) {
		return nil
	}
	if c.open {
		if err := c.flush(false); err != nil {
			return err
		}
	}
	c.head = append(c.head[:0], h...) // a copy: h may be the caller's scratch
	return nil
}

// add appends one item, written by put, starting a new frame when the open
// one is full.
func (c *chunker) add(put func(e *enc)) error {
	if c.open && c.n == maxChunkItems {
		if err := c.flush(false); err != nil {
			return err
		}
	}
	if !c.open {
		c.begin()
	}
	mark := len(c.fw.b)
	put(&c.fw.enc)
	if c.fw.err != nil {
		return c.fw.err
	}
	if len(c.fw.b)-headerLen > MaxPayload {
		if c.n == 0 {
			return errorf(CodeTooLarge, "one %s item of %d bytes does not fit a frame", c.typ, len(c.fw.b)-mark)
		}
		item := bytes.Clone(c.fw.b[mark:])
		c.fw.b = c.fw.b[:mark]
		if err := c.flush(false); err != nil {
			return err
		}
		c.begin()
		c.fw.b = append(c.fw.b, item...)
	}
	c.n++
	return nil
}

func (c *chunker) end() error {
	if !c.open {
		c.begin()
	}
	return c.flush(true)
}

// --- decoding ---

func decodeHello(f frame) (*ServerHello, error) {
	d := newDec(f)
	h := &ServerHello{Software: d.str(maxSoftware, "software")}
	n := d.count(int(d.u8("limit count")), maxLimits, 10, "limits")
	lims := h.Limits.fields()
	for i := 0; i < n; i++ {
		id, v := LimitID(d.u16("limit id")), d.u64("limit value")
		for _, l := range lims { // ids this build does not know are skipped
			if l.id == id {
				l.set(v)
			}
		}
	}
	n = d.count(int(d.u8("feature count")), maxFeatures, 2, "features")
	if n > 0 {
		h.Features = make([]string, n)
	}
	for i := range h.Features {
		h.Features[i] = d.str(maxFeature, "feature")
	}
	return h, d.end()
}

func decodeClientHello(f frame) (*ClientHello, error) {
	d := newDec(f)
	h := &ClientHello{Want: d.u8("want"), Intent: Intent(d.u8("intent")), Name: d.str(maxName, "client name")}
	return h, d.end()
}

func decodePifs(f frame) ([]Pif, error) {
	d := newDec(f)
	n := d.count(int(d.u16("pif count")), MaxPifs, 4, "pifs")
	pifs := make([]Pif, n)
	for i := range pifs {
		pifs[i] = Pif{Index: int(d.u16("pif index")), Name: d.str(maxName, "pif name")}
	}
	return pifs, d.end()
}

func decodeTableChunk(f frame) (*tableChunk, error) {
	d := newDec(f)
	c := &tableChunk{gen: d.u64("generation"), pif: d.u16("pif"), last: d.bool("last")}
	n := d.count(int(d.u16("line count")), maxChunkItems, 2, "lines")
	if n > 0 {
		c.lines = make([]string, n)
	}
	for i := range c.lines {
		c.lines[i] = d.str(maxLine, "rule line")
	}
	return c, d.end()
}

func decodeLoaded(f frame) (*Loaded, error) {
	d := newDec(f)
	l := &Loaded{Generation: d.u64("generation"), Rules: int(d.u32("rules")), Ports: int(d.u32("ports")),
		Kept: int(d.u32("kept")), Added: int(d.u32("added")), Removed: int(d.u32("removed"))}
	return l, d.end()
}

func decodeApply(f frame) (uint32, error) {
	d := newDec(f)
	ms := d.u32("confirm-ms")
	return ms, d.end()
}

func decodeSummaryChunk(f frame) (*summaryChunk, error) {
	d := newDec(f)
	c := &summaryChunk{}
	c.gen = d.u64("generation")
	c.ok = d.bool("verdict")
	c.kept = int(d.u32("kept"))
	c.added = int(d.u32("added"))
	c.removed = int(d.u32("removed"))
	c.total = int(d.u32("total"))
	c.last = d.bool("last")
	minItem := 2 + 2 + 1 + 12 // two empty strings, weak, three counts
	if f.ver >= Version2 {
		minItem += 2
	}
	n := d.count(int(d.u16("result count")), min(c.total, maxChunkItems), minItem, "results")
	if n > 0 {
		c.results = make([]RuleResult, n)
	}
	for i := range c.results {
		r := &c.results[i]
		r.Rule = d.str(maxLine, "rule line")
		r.Listen = d.str(maxListen, "listen")
		r.Weak = d.bool("weak")
		r.Requested = int(d.u32("requested"))
		r.Bound = int(d.u32("bound"))
		r.Failed = int(d.u32("failed"))
		if f.ver < Version2 {
			continue
		}
		np := d.count(int(d.u16("port count")), maxPortDetail, 8, "failed ports")
		if d.err == nil && np != r.Failed {
			d.fail(CodeBadFrame, "result of %s: %d failed ports but %d listed", r.Listen, r.Failed, np)
		}
		if np > 0 {
			r.Ports = make([]rules.PortError, np)
		}
		for j := range r.Ports {
			r.Ports[j] = rules.PortError{Port: d.u16("port"), Errno: syscall.Errno(d.u32("errno")), Msg: d.str(maxPortText, "port error text")}
		}
	}
	return c, d.end()
}

func decodeCommitted(f frame) (uint64, error) {
	d := newDec(f)
	g := d.u64("generation")
	return g, d.end()
}

func decodeEmpty(f frame) error { return newDec(f).end() }

func decodeStatus(f frame) (*Status, error) {
	d := newDec(f)
	s := &Status{Generation: d.u64("generation"), Rules: int(d.u32("rules")), Ports: int(d.u32("ports"))}
	sessions := d.u64("sessions")
	s.Sessions = int64(min(sessions, math.MaxInt64))
	s.Pifs = int(d.u16("pifs"))
	s.Writer = d.bool("writer")
	if f.ver >= Version3 {
		s.BootID = d.u64("boot-id")
		s.ConfirmGen = d.u64("confirm-generation")
		s.ConfirmLeft = time.Duration(min(d.u64("confirm-left-ms"), uint64(MaxConfirm/time.Millisecond))) * time.Millisecond
	}
	if f.ver >= Version4 {
		s.PendingGen = d.u64("pending-generation")
		s.PendingRules = int(d.u32("pending rules"))
		s.PendingPorts = int(d.u32("pending ports"))
	}
	if f.ver >= Version6 {
		s.Version = d.str(maxVersionStr, "version")
		s.PID = int(d.u32("pid"))
		s.Started = time.UnixMilli(int64(min(d.u64("started"), math.MaxInt64/2))).UTC()
		s.Uptime = msDuration(d.u64("uptime-ms"))
		s.State = RunState(d.u8("state"))
		s.DrainLeft = msDuration(d.u64("drain-left-ms"))
	}
	return s, d.end()
}

// msDuration is ms milliseconds, capped where a Duration would overflow.
func msDuration(ms uint64) time.Duration {
	return time.Duration(min(ms, uint64(math.MaxInt64/int64(time.Millisecond)))) * time.Millisecond
}

func decodeError(f frame) (*Error, error) {
	d := newDec(f)
	e := &Error{Code: Code(d.u16("code"))}
	idx := d.u32("index")
	e.Rule = d.str(maxLine, "rule")
	e.Msg = d.str(maxErrMsg, "message")
	if idx == noIndex {
		e.Index = -1
	} else {
		e.Index = int(min(idx, math.MaxInt32))
	}
	return e, d.end()
}
