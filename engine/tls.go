package engine

import (
	"crypto/tls"
	"sync/atomic"
	"time"

	"github.com/sluice-proxy/sluice/channel"
	"github.com/sluice-proxy/sluice/conn"
	"github.com/sluice-proxy/sluice/rules"
	"github.com/sluice-proxy/sluice/tlsconf"
)

// TLS sessions (docs/architecture.md, "TLS"): the client conn's TLS server
// handshake runs after the route is chosen and before the backend is
// dialled; the backend conn's client handshake (tls.backend) after connect
// and send-proxy. Each handshake runs on a goroutine (conn.TLS.Start, at
// most conn.MaxHandshakes at once) and posts its end to the session's loop;
// the record layer then runs on the loop through the conns' data layers,
// with buffer channels (channel.InitLayers). A plain session never comes
// here.

// sessionTLS is what a TLS session keeps past its handshakes.
type sessionTLS struct {
	up, down channel.Layers // the channels' data layers
	version  uint16         // the client side's (0: not terminated)
	cipher   uint16
	resumed  bool
	hsTook   time.Duration
}

// loadTLS reads the TLS files of every rule of rs that has tls.* options.
// It returns the loaded TLS by rule, or the index of the first rule whose
// files do not load and why.
func loadTLS(rs []*rules.Rule) (map[*rules.Rule]*tlsconf.Loaded, int, error) {
	var m map[*rules.Rule]*tlsconf.Loaded
	for i, r := range rs {
		l, err := tlsconf.Load(r)
		if err != nil {
			return nil, i, err
		}
		if l != nil {
			if m == nil {
				m = map[*rules.Rule]*tlsconf.Loaded{}
			}
			m[r] = l
		}
	}
	return m, -1, nil
}

// CheckTLS reads and checks the TLS files of rs (a table being loaded): it
// returns (-1, nil) when every rule's files load, else the index of the
// first rule whose files do not and why ("tls.cert /a.pem: open /a.pem: no
// such file or directory"). Resolve calls it, so a load checks both.
func (e *Engine) CheckTLS(rs []*rules.Rule) (int, error) {
	_, i, err := loadTLS(rs)
	return i, err
}

// tlsDigest is the digest of a rule's loaded files ("" when none): part of
// a listener's signature, so a changed file is a changed rule.
func tlsDigest(m map[*rules.Rule]*tlsconf.Loaded, r *rules.Rule) string {
	if l := m[r]; l != nil {
		return " #tls:" + l.Digest // as handshake.Policy.TLSDigest
	}
	return ""
}

// tlsAccept starts the client conn's TLS server handshake with the route's
// certificate, fed first with the hello the sni stage read. The handshake
// timeout armed at accept bounds it.
func (s *session) tlsAccept(l *Loop) {
	t := conn.NewTLSServer(&s.cli, s.ln.policy.TLS().Server, s.hs.TakeHello())
	s.state = stTLSAccept
	s.startTLS(l, t, s.ln.policy.Timeout()-time.Duration(l.now-s.start))
}

// tlsConnect starts the backend conn's TLS client handshake, bounded by
// timeout.connect.
func (s *session) tlsConnect(l *Loop) {
	lt := s.ln.policy.TLS()
	host := s.srv.Dst.Addr().String() // checked against the certificate's IP addresses
	if ts := s.ln.rule.Targets; len(ts) == 1 && ts[0].Host != "" {
		host = ts[0].Host
	}
	t := conn.NewTLSClient(&s.srv, lt.ClientFor(host))
	s.state = stTLSConnect
	l.arm(&s.tmr, s.connectTimeout())
	s.startTLS(l, t, s.connectTimeout())
}

func (s *session) startTLS(l *Loop, t *conn.TLS, d time.Duration) {
	st := s.state
	s.flags |= sfTLS // the goroutine below holds s: never recycled
	err := t.Start(time.Now().Add(d), func() {
		l.post(func(l *Loop) { s.tlsDone(l, t, st) })
	})
	if err != nil {
		s.finish(l, conn.CodeResource, true)
	}
}

// tlsDone runs on the loop when a handshake started in state st ended.
func (s *session) tlsDone(l *Loop, t *conn.TLS, st sessionState) {
	if s.state != st {
		return // the session ended meanwhile (its Close aborted the handshake)
	}
	err, timedOut := t.Finish()
	x := s.tlsExt()
	if st == stTLSAccept {
		l.e.tlsHandshake(err == nil, t)
		if err != nil {
			code := conn.CodeTLSHandshake
			if timedOut {
				code = conn.CodeHandshakeTimeout
			}
			s.ln.policy.Refuse(code)
			s.finish(l, code, true)
			return
		}
		cs := t.State()
		x.version, x.cipher, x.resumed, x.hsTook = cs.Version, cs.CipherSuite, cs.DidResume, t.Took
		if cs.ServerName != "" || cs.NegotiatedProtocol != "" {
			e := s.extra()
			if e.sni == "" {
				e.sni = cs.ServerName
			}
			if cs.NegotiatedProtocol != "" {
				e.alpn = cs.NegotiatedProtocol
			}
		}
		if s.ln.rule.SendProxy == rules.ProxyV2 {
			s.hs.AddTLS(&cs) // PP2_TYPE_SSL and the SNI as authority
		}
		s.hsUs = sinceUs(l.now, s.start)
		s.pickBackend(l)
		return
	}
	l.wheel.del(&s.tmr)
	if err != nil {
		code := conn.CodeTLSBackend
		if timedOut {
			code = conn.CodeConnectTimeout
		}
		s.finish(l, code, true)
		return
	}
	s.forward(l)
}

// tlsExt returns the session's TLS part, allocated on first use.
func (s *session) tlsExt() *sessionTLS {
	x := s.extra()
	if x.tls == nil {
		x.tls = new(sessionTLS)
	}
	return x.tls
}

// initTLSChannels sets up the channels of a session with a TLS side.
func (s *session) initTLSChannels() {
	x := s.tlsExt()
	if t := s.cli.TLS(); t != nil {
		x.up.In, x.down.Out = t, t
	}
	if t := s.srv.TLS(); t != nil {
		x.up.Out, x.down.In = t, t
	}
	s.up.InitLayers(s.cli.FD(), s.srv.FD(), &x.up)
	s.down.InitLayers(s.srv.FD(), s.cli.FD(), &x.down)
}

// tlsInfo returns what the access log and ctl sessions show of a
// terminated session: version and cipher names, resumed ("" when not
// terminated).
func (s *session) tlsInfo() (version, cipher string, resumed bool) {
	if s.ext == nil || s.ext.tls == nil || s.ext.tls.version == 0 {
		return "", "", false
	}
	x := s.ext.tls
	return tls.VersionName(x.version), tls.CipherSuiteName(x.cipher), x.resumed
}

// tlsCounters are the engine's TLS handshake counts (metrics: by result
// and version; resumptions; the handshake time histogram).
type tlsCounters struct {
	ok, failed, resumed atomic.Uint64
	byVersion           [2]atomic.Uint64 // TLS 1.2, TLS 1.3 (successful)
	took                Histogram
}

// tlsHandshake counts a client side handshake's end.
func (e *Engine) tlsHandshake(ok bool, t *conn.TLS) {
	c := &e.tlsc
	if !ok {
		c.failed.Add(1)
		return
	}
	c.ok.Add(1)
	cs := t.State()
	if cs.DidResume {
		c.resumed.Add(1)
	}
	if cs.Version == tls.VersionTLS13 {
		c.byVersion[1].Add(1)
	} else {
		c.byVersion[0].Add(1)
	}
	c.took.observe(uint64(t.Took.Microseconds()))
}

// TLSStats are the client side TLS handshakes of every terminating route,
// since start.
type TLSStats struct {
	OK, Failed    uint64 // handshakes by result (a timeout is a failure)
	TLS12, TLS13  uint64 // successful handshakes by version
	Resumed       uint64 // successful handshakes that resumed a session (a ticket)
	HandshakeTime HistogramSnapshot
}

func (c *tlsCounters) stats() TLSStats {
	return TLSStats{OK: c.ok.Load(), Failed: c.failed.Load(), TLS12: c.byVersion[0].Load(), TLS13: c.byVersion[1].Load(),
		Resumed: c.resumed.Load(), HandshakeTime: c.took.Snapshot()}
}

// CertInfo is a terminating rule's certificate as the status page and
// the expiry gauge show it.
type CertInfo struct {
	Subject string
	Expiry  time.Time // NotAfter
}

// certInfo returns l's certificate, or nil when l does not terminate.
func certInfo(l *tlsconf.Loaded) *CertInfo {
	if l == nil || l.Server == nil || l.Leaf == nil {
		return nil
	}
	return &CertInfo{Subject: l.Subject(), Expiry: l.Expiry()}
}
