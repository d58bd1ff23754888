package ctl

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/sluice-proxy/sluice/observe"
)

// The read-only intents beyond the transaction: watch (event groups),
// sessions (the live sessions) and stats (the engine's counters). See
// docs/ctl-protocol.md, "Watching, sessions and stats".

// Bounds of their fields.
const (
	maxGroups     = 8
	maxGroupName  = 32
	maxEventType  = 32
	maxEventData  = 32768 // bytes of an event's JSON object
	maxQueryRule  = maxListen
	maxAddr       = 64
	maxState      = 16
	maxSNI        = 255 // a server name or an ALPN protocol in SESSIONS (version 3)
	maxTLSName    = 64  // a TLS version or cipher suite name in SESSIONS (version 5)
	maxStatName   = 256
	watchBatch    = 64 // events written before a flush
	sessionMinLen = 2 + 2 + 2 + 2 + 2 + 8 + 8 + 8 + 1
	statMinLen    = 2 + 8
)

// MaxSessions bounds the sessions one SESSIONS message lists.
const MaxSessions = 10000

// Event is one event as a watcher receives it.
type Event struct {
	Group string          // rules, binds, health, sessions
	Type  string          // "state" for the current state sent first; else what happened
	Time  time.Time       // when it happened
	Data  json.RawMessage // the event's fields, a JSON object
}

// JSON is the event as one JSON object: group, type and time (RFC 3339,
// nanoseconds, UTC) first, then the event's fields.
func (ev *Event) JSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteString(`{"group":`)
	g, _ := json.Marshal(ev.Group)
	b.Write(g)
	b.WriteString(`,"type":`)
	t, _ := json.Marshal(ev.Type)
	b.Write(t)
	b.WriteString(`,"time":`)
	ts, _ := json.Marshal(ev.Time.UTC().Format(time.RFC3339Nano))
	b.Write(ts)
	data := bytes.TrimSpace(ev.Data)
	if len(data) < 2 || data[0] != '{' || !json.Valid(data) {
		return nil, fmt.Errorf("ctl: event %s/%s: fields are not a JSON object", ev.Group, ev.Type)
	}
	if inner := bytes.TrimSpace(data[1 : len(data)-1]); len(inner) > 0 {
		b.WriteByte(',')
		b.Write(inner)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

// Uint returns the unsigned integer field key of the event's data.
func (ev *Event) Uint(key string) (uint64, bool) {
	var m map[string]json.RawMessage
	if json.Unmarshal(ev.Data, &m) != nil {
		return 0, false
	}
	v, err := strconv.ParseUint(string(m[key]), 10, 64)
	return v, err == nil
}

// fieldsJSON encodes fields as a JSON object, in their order.
func fieldsJSON(b []byte, fs []observe.Field) []byte {
	b = append(b, '{')
	for i, f := range fs {
		if i > 0 {
			b = append(b, ',')
		}
		b = strconv.AppendQuote(b, f.Key)
		b = append(b, ':')
		switch v := f.Value.(type) {
		case string:
			k, _ := json.Marshal(v)
			b = append(b, k...)
		case bool:
			b = strconv.AppendBool(b, v)
		case int:
			b = strconv.AppendInt(b, int64(v), 10)
		case int64:
			b = strconv.AppendInt(b, v, 10)
		case uint64:
			b = strconv.AppendUint(b, v, 10)
		case uint16:
			b = strconv.AppendUint(b, uint64(v), 10)
		default:
			k, err := json.Marshal(v)
			if err != nil {
				k, _ = json.Marshal(fmt.Sprint(v))
			}
			b = append(b, k...)
		}
	}
	return append(b, '}')
}

// SessionList is what SESSIONS carries.
type SessionList struct {
	Sessions []observe.Session
	Total    int // sessions that matched: more than len(Sessions) when truncated
}

// Truncated reports whether the daemon had more sessions than it listed.
func (l *SessionList) Truncated() bool { return l.Total > len(l.Sessions) }

// --- encoding ---

func (fw *frameWriter) writeWatch(ver uint8, groups []string) error {
	fw.start(ver, MsgWatch)
	if len(groups) > maxGroups {
		fw.fail(errorf(CodeTooLarge, "%d groups, at most %d allowed", len(groups), maxGroups))
	}
	fw.u8(uint8(len(groups)))
	for _, g := range groups {
		fw.str(g, maxGroupName, "group")
	}
	return fw.finish()
}

func (fw *frameWriter) writeEvent(ver uint8, ev *observe.Event, scratch []byte) ([]byte, error) {
	fw.start(ver, MsgEvent)
	fw.str(ev.Group.String(), maxGroupName, "group")
	fw.str(truncate(ev.Type, maxEventType), maxEventType, "event type")
	fw.u64(uint64(max(ev.Time.UnixNano(), 0)))
	scratch = fieldsJSON(scratch[:0], ev.Fields)
	fw.str(string(scratch), maxEventData, "event data")
	return scratch, fw.finish()
}

func (fw *frameWriter) writeQuery(ver uint8, rule string, max int) error {
	fw.start(ver, MsgQuery)
	fw.str(rule, maxQueryRule, "rule")
	fw.u32(uint32(min(max, math.MaxUint32)))
	return fw.finish()
}

func addrText(a netip.AddrPort) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

func (fw *frameWriter) writeSessions(ver uint8, l *observe.Sessions) error {
	var head [5]byte
	binary.BigEndian.PutUint32(head[:], uint32(min(l.Total, math.MaxUint32)))
	if l.Total > len(l.List) {
		head[4] = 1
	}
	c := chunker{fw: fw, ver: ver, typ: MsgSessions, head: head[:]}
	for i := range l.List {
		s := &l.List[i]
		if err := c.add(func(e *enc) {
			e.str(truncate(s.Rule, maxQueryRule), maxQueryRule, "rule")
			e.str(addrText(s.Source), maxAddr, "source")
			e.str(addrText(s.Peer), maxAddr, "peer")
			e.str(addrText(s.Target), maxAddr, "target")
			e.str(truncate(s.State, maxState), maxState, "state")
			e.u64(uint64(max(s.Age, 0) / time.Millisecond))
			e.u64(s.Up)
			e.u64(s.Down)
			e.bool(s.Splice)
			if ver >= Version3 { // a version 2 client reads a session without them
				e.str(truncate(s.SNI, maxSNI), maxSNI, "sni")
				e.str(truncate(s.ALPN, maxSNI), maxSNI, "alpn")
			}
			if ver >= Version5 { // an older client reads a session without them
				e.str(truncate(s.TLSVersion, maxTLSName), maxTLSName, "tls-version")
				e.str(truncate(s.TLSCipher, maxTLSName), maxTLSName, "tls-cipher")
				e.bool(s.TLSResumed)
			}
		}); err != nil {
			return err
		}
	}
	return c.end()
}

func (fw *frameWriter) writeStats(ver uint8, cs []observe.Counter) error {
	c := chunker{fw: fw, ver: ver, typ: MsgStats, head: []byte{}}
	for _, s := range cs {
		if err := c.add(func(e *enc) {
			e.str(truncate(s.Name, maxStatName), maxStatName, "counter name")
			e.u64(uint64(s.Value))
		}); err != nil {
			return err
		}
	}
	return c.end()
}

// --- decoding ---

func decodeWatch(f frame) ([]string, error) {
	d := newDec(f)
	n := d.count(int(d.u8("group count")), maxGroups, 2, "groups")
	gs := make([]string, 0, n)
	for i := 0; i < n; i++ {
		gs = append(gs, d.str(maxGroupName, "group"))
	}
	return gs, d.end()
}

func decodeEvent(f frame) (*Event, error) {
	d := newDec(f)
	ev := &Event{Group: d.str(maxGroupName, "group"), Type: d.str(maxEventType, "event type")}
	ev.Time = time.Unix(0, int64(min(d.u64("time"), math.MaxInt64)))
	data := d.str(maxEventData, "event data")
	if err := d.end(); err != nil {
		return nil, err
	}
	if !json.Valid([]byte(data)) || len(data) == 0 || data[0] != '{' {
		return nil, errorf(CodeBadFrame, "EVENT %s/%s: data is not a JSON object", ev.Group, ev.Type)
	}
	ev.Data = json.RawMessage(data)
	return ev, nil
}

func decodeQuery(f frame) (string, int, error) {
	d := newDec(f)
	rule := d.str(maxQueryRule, "rule")
	n := d.u32("max")
	return rule, int(min(n, math.MaxInt32)), d.end()
}

func parseAddr(d *dec, what string) netip.AddrPort {
	s := d.str(maxAddr, what)
	if s == "" || d.err != nil {
		return netip.AddrPort{}
	}
	a, err := netip.ParseAddrPort(s)
	if err != nil {
		d.fail(CodeBadFrame, "%s %q: %v", what, s, err)
	}
	return a
}

// decodeSessionsChunk decodes one SESSIONS frame into l; it reports
// whether it was the last.
func decodeSessionsChunk(f frame, l *SessionList, first bool) (bool, error) {
	d := newDec(f)
	total := int(d.u32("total"))
	truncated := d.bool("truncated")
	last := d.bool("last")
	if first {
		l.Total = total
	} else if d.err == nil && total != l.Total {
		d.fail(CodeBadFrame, "SESSIONS chunks disagree: total %d after %d", total, l.Total)
	}
	n := d.count(int(d.u16("session count")), maxChunkItems, sessionMinLen, "sessions")
	for i := 0; i < n && d.err == nil; i++ {
		s := observe.Session{Rule: d.str(maxQueryRule, "rule")}
		s.Source = parseAddr(d, "source")
		s.Peer = parseAddr(d, "peer")
		s.Target = parseAddr(d, "target")
		s.State = d.str(maxState, "state")
		s.Age = time.Duration(min(d.u64("age"), math.MaxInt64/uint64(time.Millisecond))) * time.Millisecond
		s.Up, s.Down = d.u64("up"), d.u64("down")
		s.Splice = d.bool("splice")
		if f.ver >= Version3 {
			s.SNI, s.ALPN = d.str(maxSNI, "sni"), d.str(maxSNI, "alpn")
		}
		if f.ver >= Version5 {
			s.TLSVersion, s.TLSCipher = d.str(maxTLSName, "tls-version"), d.str(maxTLSName, "tls-cipher")
			s.TLSResumed = d.bool("tls-resumed")
		}
		l.Sessions = append(l.Sessions, s)
	}
	if err := d.end(); err != nil {
		return false, err
	}
	if last && truncated != l.Truncated() {
		return false, errorf(CodeBadFrame, "SESSIONS says truncated=%v with %d of %d sessions listed", truncated, len(l.Sessions), l.Total)
	}
	if len(l.Sessions) > MaxSessions {
		return false, errorf(CodeTooLarge, "SESSIONS lists more than %d sessions", MaxSessions)
	}
	return last, nil
}

func decodeStatsChunk(f frame, out *[]observe.Counter) (bool, error) {
	d := newDec(f)
	last := d.bool("last")
	n := d.count(int(d.u16("counter count")), maxChunkItems, statMinLen, "counters")
	for i := 0; i < n && d.err == nil; i++ {
		*out = append(*out, observe.Counter{Name: d.str(maxStatName, "counter name"), Value: int64(d.u64("value"))})
	}
	return last, d.end()
}

// --- server ---

// pifsThen sends PIFS, the answer to the hello, then reads the client's
// request, which must be of type want.
func (cc *ctlConn) pifsThen(want MsgType) (frame, error) {
	pifs, err := cc.s.pifs()
	if err != nil {
		return frame{}, err
	}
	if err := cc.send(func() error { return cc.w.writePifs(cc.ver, pifs) }); err != nil {
		return frame{}, err
	}
	f, err := cc.readNext()
	if err != nil {
		return frame{}, err
	}
	if f.typ != want {
		return frame{}, errorf(CodeUnexpected, "%s where %s was expected", f.typ, want)
	}
	return f, nil
}

// watch serves intent watch: PIFS, then the client's WATCH; the watcher is
// subscribed, then sent the current state, then every event as it comes,
// until the client closes or falls behind by more than the queue
// (slow-watcher) or the server closes.
func (cc *ctlConn) watch() error {
	s := cc.s
	f, err := cc.pifsThen(MsgWatch)
	if err != nil {
		return err
	}
	names, err := decodeWatch(f)
	if err != nil {
		return err
	}
	var groups observe.Group
	for _, n := range names {
		g, ok := observe.ParseGroup(n)
		if !ok {
			return errorf(CodeBadValue, "unknown event group %q (want %v)", n, observe.Names())
		}
		groups |= g
	}
	if groups == 0 {
		groups = observe.AllGroups
	}
	sub, state := s.eng.Watch(groups, s.cfg.watchQueue)
	defer sub.Close()
	cc.log.Debug("watching", zap.Stringer("groups", groups))
	var scratch []byte
	for i := range state {
		if scratch, err = cc.w.writeEvent(cc.ver, &state[i], scratch); err != nil {
			return err
		}
	}
	if err := cc.send(func() error { return nil }); err != nil {
		return err
	}
	// The client says nothing more: a read that returns means it closed
	// (or broke the protocol), or the server is closing.
	gone := make(chan error, 1)
	go func() {
		if err := cc.setReadDeadline(time.Time{}); err != nil {
			gone <- err
			return
		}
		var b [1]byte
		n, err := cc.r.r.Read(b[:])
		if n > 0 {
			err = errorf(CodeUnexpected, "a watcher sent data after WATCH")
		}
		gone <- err
	}()
	slow := func() error {
		return errorf(CodeSlowWatcher, "more than %d events queued for this watcher: it reads too slowly and was cut off", s.cfg.watchQueue)
	}
	for {
		select {
		case <-sub.Overflowed():
			return slow()
		default:
		}
		select {
		case <-sub.Overflowed():
			return slow()
		case err := <-gone:
			if cc.isClosing() {
				return errClosing
			}
			var e *Error
			if errors.As(err, &e) {
				return e
			}
			cc.log.Debug("watcher left", zap.Error(err))
			return nil
		case ev := <-sub.Events():
			if scratch, err = cc.w.writeEvent(cc.ver, &ev, scratch); err != nil {
				return err
			}
		batch:
			for i := 1; i < watchBatch; i++ {
				select {
				case ev := <-sub.Events():
					if scratch, err = cc.w.writeEvent(cc.ver, &ev, scratch); err != nil {
						return err
					}
				default:
					break batch
				}
			}
			if err := cc.send(func() error { return nil }); err != nil {
				return err
			}
		}
	}
}

// sessions serves intent sessions: PIFS, the client's QUERY, SESSIONS.
func (cc *ctlConn) sessions() error {
	s := cc.s
	f, err := cc.pifsThen(MsgQuery)
	if err != nil {
		return err
	}
	rule, n, err := decodeQuery(f)
	if err != nil {
		return err
	}
	if n == 0 || n > MaxSessions {
		n = MaxSessions
	}
	l := s.eng.SessionList(rule, n)
	if len(l.List) > n {
		l.List = l.List[:n]
	}
	l.Total = max(l.Total, len(l.List))
	return cc.send(func() error { return cc.w.writeSessions(cc.ver, &l) })
}

// stats serves intent stats: STATS.
func (cc *ctlConn) stats() error {
	cs := cc.s.eng.Counters()
	return cc.send(func() error { return cc.w.writeStats(cc.ver, cs) })
}

// --- client ---

// Watch asks for the event groups (none: every group) on a connection that
// said IntentWatch and read its Pifs. Events follow: NextEvent.
func (c *Client) Watch(ctx context.Context, groups []string) error {
	return c.call(ctx, stepPifs, func() error {
		if c.intent != IntentWatch {
			return fmt.Errorf("ctl: Watch on a connection for %s", c.intent)
		}
		for _, g := range groups {
			if _, ok := observe.ParseGroup(g); !ok {
				return fmt.Errorf("ctl: unknown event group %q (want %v)", g, observe.Names())
			}
		}
		if err := c.send(func() error { return c.w.writeWatch(c.ver, groups) }); err != nil {
			return err
		}
		c.step = stepWatching
		return nil
	})
}

// NextEvent waits for the next event: first the current state (Type
// "state"), then what happens. A watcher that fell behind gets an *Error
// with CodeSlowWatcher.
//
// NextEvent waits as long as ctx allows: a watch may be quiet for hours, so
// Options.Timeout does not bound it.
func (c *Client) NextEvent(ctx context.Context) (*Event, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, time.Now().AddDate(100, 0, 0))
		defer cancel()
	}
	var ev *Event
	err := c.call(ctx, stepWatching, func() error {
		f, err := c.expect(MsgEvent)
		if err != nil {
			return err
		}
		ev, err = decodeEvent(f)
		return err
	})
	return ev, err
}

// Sessions lists the live sessions of the rule whose listen key is rule
// ("" = every rule), at most max (0 = MaxSessions), on a connection that
// said IntentSessions and read its Pifs.
func (c *Client) Sessions(ctx context.Context, rule string, max int) (*SessionList, error) {
	l := &SessionList{}
	err := c.call(ctx, stepPifs, func() error {
		if c.intent != IntentSessions {
			return fmt.Errorf("ctl: Sessions on a connection for %s", c.intent)
		}
		if err := c.send(func() error { return c.w.writeQuery(c.ver, rule, max) }); err != nil {
			return err
		}
		for first := true; ; first = false {
			f, err := c.expect(MsgSessions)
			if err != nil {
				return err
			}
			last, err := decodeSessionsChunk(f, l, first)
			if err != nil {
				return err
			}
			if last {
				c.step = stepDone
				return nil
			}
		}
	})
	return l, err
}

// Stats returns the engine's counters on a connection that said
// IntentStats.
func (c *Client) Stats(ctx context.Context) ([]observe.Counter, error) {
	var out []observe.Counter
	err := c.call(ctx, stepHello, func() error {
		if c.intent != IntentStats {
			return fmt.Errorf("ctl: Stats on a connection for %s", c.intent)
		}
		f := *c.next
		c.next = nil
		for {
			last, err := decodeStatsChunk(f, &out)
			if err != nil {
				return err
			}
			if last {
				c.step = stepDone
				return nil
			}
			if f, err = c.expect(MsgStats); err != nil {
				return err
			}
		}
	})
	return out, err
}
