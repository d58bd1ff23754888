package engine

import (
	"sort"
	"sync"
	"time"

	"github.com/sluice-proxy/sluice/observe"
)

// MaxSessionList bounds the sessions SessionList copies, whatever the
// caller asks for.
const MaxSessionList = 10000

// SessionList copies up to max (at most MaxSessionList) live sessions whose
// rule's listen key is rule ("" = every rule), oldest first. Each loop
// copies its own sessions, on its own goroutine (onLoops): no session field
// is read from another goroutine. Total counts every match. A draining
// engine lists the sessions that hold its stop up; one whose loops stop
// lists nothing.
func (e *Engine) SessionList(rule string, max int) observe.Sessions {
	if max <= 0 || max > MaxSessionList {
		max = MaxSessionList
	}
	var mu sync.Mutex
	var out observe.Sessions
	// e.mu held: Shutdown cannot stop the loops while they copy (it marks
	// the engine halted under e.mu first). While it drains, the loops run
	// and their sessions are listed.
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.started || e.halted {
		return out
	}
	e.onLoops(func(l *Loop) {
		now := int64(time.Since(l.base))
		var mine []observe.Session
		matched := 0
		for fd, h := range l.table {
			s, ok := h.(*session)
			if !ok || s.cli.FD() != fd || s.state == stClosed {
				continue // a listener, a flow, or the session's backend fd
			}
			name := s.ln.ruleName()
			if rule != "" && name != rule {
				continue
			}
			matched++
			if len(mine) >= max {
				continue
			}
			v := observe.Session{Rule: name, Source: s.cli.Src, State: s.state.String(), Age: time.Duration(now - s.start),
				Up: s.up.Bytes, Down: s.down.Bytes, Splice: s.up.Spliced+s.down.Spliced > 0 || s.up.Piped() || s.down.Piped()}
			v.Peer = s.origSrc()
			v.SNI, v.ALPN = s.seen()
			v.TLSVersion, v.TLSCipher, v.TLSResumed = s.tlsInfo()
			if s.state != stHandshake {
				v.Target = s.srv.Dst
			}
			mine = append(mine, v)
		}
		mu.Lock()
		out.Total += matched
		out.List = append(out.List, mine...)
		mu.Unlock()
	})
	sort.Slice(out.List, func(i, j int) bool { return out.List[i].Age > out.List[j].Age })
	if len(out.List) > max {
		out.List = out.List[:max]
	}
	return out
}
