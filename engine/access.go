package engine

import (
	"net/netip"
	"strconv"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/handshake"
)

// The access log: one line per session at its end, with a two-letter
// termination code in the manner of HAProxy's. The first letter says who
// ended the session, the second in which phase:
//
//	who   -  ended normally (both directions closed, or a health probe served)
//	      C  the client: it reset, or closed before its PROXY header ended
//	      c  a client-side timeout: the handshake, or timeout.idle
//	      S  the server: it refused, reset, or could not be reached
//	      s  a server-side timeout: timeout.connect
//	      P  the proxy's policy: allow/deny, rate, maxconn, a bad or missing PROXY header
//	      R  a resource ran out: file descriptors, memory
//	      I  internal: the daemon was stopping
//	      ?  a code this table does not know (a newer build's)
//	phase R  request: the incoming handshake (accept-proxy, rules)
//	      H  health: a conn that got (or was getting) the health reply
//	      C  connect: to the backend, including send-proxy and waiting for an fd
//	      D  data: forwarding
//
// A normal end in the data phase is written "--", as HAProxy does. The table
// is derived from the end code (conn.Code) and the session's state when it
// ended; README.md lists the codes a session can show.

// Term is a termination code.
type Term struct{ who, phase uint8 }

const (
	whoNormal uint8 = iota
	whoClient
	whoClientTimeout
	whoServer
	whoServerTimeout
	whoProxy
	whoResource
	whoInternal
	whoUnknown
	whoCount
)

const (
	phaseRequest uint8 = iota
	phaseHealth
	phaseConnect
	phaseData
	phaseCount
)

const (
	whoLetters   = "-CcSsPRI?"
	phaseLetters = "RHCD"
)

// whoByCode says who ended a session, by its end code.
var whoByCode = [...]uint8{
	conn.CodeNone:              whoInternal, // ended with no reason recorded: the engine's own doing
	conn.CodeDone:              whoNormal,
	conn.CodeProxyTruncated:    whoClient,
	conn.CodeProxyBad:          whoProxy,
	conn.CodeProxyNotTrusted:   whoProxy,
	conn.CodeDenied:            whoProxy,
	conn.CodeRateLimited:       whoProxy,
	conn.CodeHandshakeTimeout:  whoClientTimeout,
	conn.CodeConnectRefused:    whoServer,
	conn.CodeConnectTimeout:    whoServerTimeout,
	conn.CodeClientReset:       whoClient,
	conn.CodeServerReset:       whoServer,
	conn.CodeIdleTimeout:       whoClientTimeout,
	conn.CodeConnectError:      whoServer,
	conn.CodeStopping:          whoInternal,
	conn.CodeResource:          whoResource,
	conn.CodeHealth:            whoNormal,
	conn.CodeProxyOversized:    whoProxy,
	conn.CodeProxyMissing:      whoProxy,
	conn.CodeNoRoute:           whoProxy,
	conn.CodeTLSHelloOversized: whoProxy,
	conn.CodeTLSHelloBad:       whoProxy,
	conn.CodeTLSHandshake:      whoClient, // the client's handshake failed, HAProxy's CR
	conn.CodeTLSBackend:        whoServer, // the server's certificate or handshake, HAProxy's SC
	conn.CodeNoBackend:         whoServer, // no server available, HAProxy's SC
}

// phaseByState says in which phase a session in state st is.
var phaseByState = [...]uint8{
	stHandshake:  phaseRequest,
	stConnecting: phaseConnect,
	stSendProxy:  phaseConnect,
	stForwarding: phaseData,
	stClosed:     phaseData,
	stWaitFd:     phaseConnect,
	stDraining:   phaseData,
	stTLSAccept:  phaseRequest, // the client's handshake: HAProxy's R
	stTLSConnect: phaseConnect,
}

// termNames are the codes' two letters, made once so logging one costs no
// allocation.
var termNames = func() (n [whoCount][phaseCount]string) {
	for w := range n {
		for p := range n[w] {
			n[w][p] = whoLetters[w:w+1] + phaseLetters[p:p+1]
		}
	}
	n[whoNormal][phaseData] = "--"
	return n
}()

func (t Term) String() string { return termNames[t.who][t.phase] }

// termOf derives the termination code of a session that ends with code in
// state st; health says the conn was a health probe.
func termOf(code conn.Code, st sessionState, health bool) Term {
	t := Term{who: whoUnknown, phase: phaseRequest}
	if int(code) < len(whoByCode) {
		t.who = whoByCode[code]
	}
	if int(st) < len(phaseByState) {
		t.phase = phaseByState[st]
	}
	if t.phase == phaseRequest && health {
		t.phase = phaseHealth
	}
	return t
}

// term is the termination code of s ending now with code: call it before
// finish changes the state or gives the handshake back.
func (s *session) term(code conn.Code) Term {
	return termOf(code, s.state, s.hs != nil && s.hs.Has(handshake.Health))
}

// keepOrig remembers the client's own address, src, once a PROXY header has
// replaced it. The copy keeps the parameter on the stack: taking &src would
// move it to the heap on every call, PROXY'd or not.
func (s *session) keepOrig(src netip.AddrPort) {
	if (s.ext == nil || !s.ext.orig.IsValid()) && s.cli.Src != src {
		s.extra().orig = src
	}
}

// logEnd writes the session's access-log line: at info once it passed the
// incoming chain, at debug for a health reply or a refused conn, so a flood
// of those is never a flood of log lines. Fields:
//
//	id          the session's id, unique within the daemon's run: its loop,
//	            its loop clock at accept (base 36) and its client fd
//	start       the accept's time
//	rule        the rule's listen part, pif included
//	listen      the address the listener is bound to
//	src, dst    the client and the address it reached (after PROXY, if any)
//	orig_src    the client's own address, when a PROXY header replaced it
//	backend     the backend last dialed (absent if none was)
//	sni, alpn   a routed session's hello: server name, ALPN protocol (absent if none)
//	bytes_up    client to backend; bytes_down: backend to client
//	spliced     of both, through splice pipes
//	handshake   accept to the end of the incoming chain (sessions that passed it)
//	connect     from there to the backend connected (sessions that connected)
//	duration    accept to end
//	term        the two-letter termination code; end, code: the end code
//
// bytes_up, bytes_down and spliced are named by RuleDefs, beside the rule's
// sums of them.
func (s *session) logEnd(l *Loop, code conn.Code, t Term, cliFD int) {
	ce := l.log.Check(s.logLevel(), "session")
	if ce == nil {
		return
	}
	orig, backend, hs, connect := zap.Skip(), zap.Skip(), zap.Skip(), zap.Skip()
	if o := s.origSrc(); o.IsValid() {
		orig = zap.Stringer("orig_src", o)
	}
	sni, alpn := zap.Skip(), zap.Skip()
	if n, p := s.seen(); n != "" || p != "" {
		if n != "" {
			sni = zap.String("sni", n)
		}
		if p != "" {
			alpn = zap.String("alpn", p)
		}
	}
	if s.srv.Dst.IsValid() {
		backend = zap.Stringer("backend", s.srv.Dst)
	}
	tv, tc, tr := zap.Skip(), zap.Skip(), zap.Skip()
	if v, c, resumed := s.tlsInfo(); v != "" {
		tv, tc, tr = zap.String("tls_version", v), zap.String("tls_cipher", c), zap.Bool("tls_resumed", resumed)
	}
	if s.flags&sfPassed != 0 {
		hs = zap.Duration("handshake", time.Duration(s.hsUs)*time.Microsecond)
	}
	if s.flags&sfConnected != 0 {
		connect = zap.Duration("connect", time.Duration(s.connUs-min(s.hsUs, s.connUs))*time.Microsecond)
	}
	ce.Write(
		zap.String("id", s.id(l, cliFD)),
		zap.Time("start", l.base.Add(time.Duration(s.start))),
		zap.String("rule", s.ln.ruleName()),
		zap.Stringer("listen", s.ln.addr),
		zap.Stringer("src", s.cli.Src),
		orig,
		zap.Stringer("dst", s.cli.Dst),
		backend,
		sni,
		alpn,
		tv, tc, tr,
		zap.Uint64(logBytesUp, s.up.Bytes),
		zap.Uint64(logBytesDown, s.down.Bytes),
		zap.Uint64(logSpliced, s.up.Spliced+s.down.Spliced),
		hs,
		connect,
		zap.Duration("duration", time.Duration(l.now-s.start)),
		zap.String("term", t.String()),
		zap.Stringer("end", code),
		zap.Uint16("code", uint16(code)),
	)
}

// logLevel is the level of the session's access line: info for a session
// that passed the incoming chain, debug for one refused or gone before.
func (s *session) logLevel() zapcore.Level {
	if s.flags&sfPassed == 0 {
		return zapcore.DebugLevel
	}
	return zapcore.InfoLevel
}

// id is the session's id in the access log: "LOOP-START-FD", unique within
// the daemon's run (two sessions of one loop that share the clock of a
// wake-up have two fds).
func (s *session) id(l *Loop, cliFD int) string {
	b := strconv.AppendInt(make([]byte, 0, 24), int64(l.id), 10)
	b = append(b, '-')
	b = strconv.AppendInt(b, s.start, 36)
	b = append(b, '-')
	b = strconv.AppendInt(b, int64(cliFD), 10)
	return string(b)
}
