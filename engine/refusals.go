package engine

import (
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/sluice-proxy/sluice/conn"
)

// The refusal log: a connection the proxy refused (its policy's P codes:
// allow/deny, rate, maxconn, a bad, missing or untrusted PROXY header, no
// route, a bad TLS hello; and no-backend) has its access-log line at debug,
// so that a flood is never a flood of lines. It still leaves an info line,
// at most one per rule every Config.RefusalLog: the first refusal after the
// interval is written with its reason and peer, and with how many of the
// rule's refusals (any reason) went unwritten since the line before. Those
// in between cost two atomic operations and nothing else.

// DefaultRefusalLog is the least time between two refusal lines of a rule.
const DefaultRefusalLog = time.Second

// refusalLog bounds the refusal lines of one rule: shared by its ports and
// every loop, lock-free.
type refusalLog struct {
	next       atomic.Int64  // engine clock (ns) before which no line is written; 0: none written yet
	suppressed atomic.Uint64 // refusals not written since the last line
}

// allow says whether the refusal at now (engine clock, ns) gets a line, a
// line at most every `every` ns.
//
// Return convention: (true, n) to write the line, n the refusals
// suppressed since the last one; (false, 0) when it is counted among the
// suppressed instead.
func (r *refusalLog) allow(now, every int64) (ok bool, suppressed uint64) {
	n := r.next.Load()
	if now < n || !r.next.CompareAndSwap(n, now+every) {
		// Within the interval, or another loop's refusal took this line.
		r.suppressed.Add(1)
		return false, 0
	}
	return true, r.suppressed.Swap(0)
}

// loggedRefusal says whether a session that ended with code was refused by
// the proxy, for the refusal log: the P termination codes and no-backend.
// A client's own failures (a reset, a timeout) and a stop are not.
func loggedRefusal(code conn.Code) bool {
	if code == conn.CodeNoBackend {
		return true
	}
	return int(code) < len(whoByCode) && whoByCode[code] == whoProxy
}

// logRefusal is finish's: s ended refused with code; at most one line per
// rule per interval (refusalLog.allow) is written, at info.
func (s *session) logRefusal(l *Loop, code conn.Code, t Term) {
	ok, n := s.ln.ctr.refusals.allow(l.now, int64(l.e.cfg.RefusalLog))
	if !ok {
		return
	}
	ce := l.log.Check(zap.InfoLevel, "connections refused")
	if ce == nil {
		return
	}
	orig := zap.Skip()
	if o := s.origSrc(); o.IsValid() {
		orig = zap.Stringer("orig_src", o)
	}
	ce.Write(
		zap.String("rule", s.ln.ruleName()),
		zap.Stringer("reason", code),
		zap.String("term", t.String()),
		zap.Stringer("src", s.cli.Src),
		orig,
		zap.Uint64("suppressed", n),
	)
}
