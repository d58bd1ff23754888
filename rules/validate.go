package rules

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Validate checks one rule on its own. It returns nil, or the problems
// found: the first one of the listen part and the targets alone (past it
// the rest would be noise), else one per concern of the options (each
// naming its option), as LineErrors when there are several.
func (r *Rule) Validate() error {
	if r.Proto != TCP && r.Proto != UDP {
		return fmt.Errorf("unknown protocol %s", r.Proto)
	}
	if !r.ListenAddr.IsValid() {
		return errors.New("no listen address")
	}
	lp := r.ListenPorts
	if lp.Last < lp.First {
		return fmt.Errorf("port range %d-%d is reversed", lp.First, lp.Last)
	}
	if lp.First == 0 && lp.Last != 0 {
		return fmt.Errorf("port range %s: port 0 (any free port) cannot start a range", lp)
	}
	if lp.Len() > MaxPortsPerRule {
		return fmt.Errorf("port range %s has %d ports, at most %d allowed in one rule", lp, lp.Len(), MaxPortsPerRule)
	}
	if len(r.Targets) > MaxTargets {
		return fmt.Errorf("%d backends, at most %d allowed", len(r.Targets), MaxTargets)
	}
	if r.TargetPif != "" && len(r.Targets) == 0 {
		return errors.New("target pif with no target")
	}
	for _, t := range r.Targets {
		if err := r.validateTarget(t); err != nil {
			return err
		}
	}
	if len(r.Targets) == 0 && r.Health == HealthNone {
		return errors.New("no target: give \"-> TARGET\", or health=tcp|http for a rule that answers probes itself")
	}
	var errs LineErrors
	add := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	if len(r.Targets) == 0 {
		if opt := r.targetOnlyOption(); opt != "" {
			add(fmt.Errorf("option %s needs a target (\"-> TARGET\")", opt))
		}
	} else if r.Health != HealthNone && len(r.Monitor) == 0 {
		add(fmt.Errorf("health=%s with a target: say which sources get the health reply with monitor=CIDR, or drop the target", r.Health))
	}
	if r.Proto == UDP {
		if opt := r.tcpOnlyOption(); opt != "" {
			add(fmt.Errorf("option %s is for tcp rules only", opt))
		}
	}
	add(r.validateRoute())
	if len(r.Trusted) > 0 && !r.AcceptProxy {
		add(errors.New("trusted sources without accept-proxy"))
	}
	add(r.validateCIDRs())
	if r.SockBuf != 0 && r.SockBuf != SockBufAuto && (r.SockBuf < MinSockBuf || r.SockBuf > MaxSockBuf) {
		add(fmt.Errorf("sockbuf %d: want auto or a size from 4k to 64m", r.SockBuf))
	}
	if r.Rate < 0 || r.MaxConn < 0 || r.ConnectTimeout < 0 || r.IdleTimeout < 0 || r.HandshakeTimeout < 0 {
		add(errors.New("negative rate, maxconn or timeout"))
	}
	add(r.validateCheck())
	add(r.validateTLS())
	add(r.validateNames())
	return errs.Err()
}

// validateCIDRs checks the prefix lists' lengths and that each is masked.
func (r *Rule) validateCIDRs() error {
	for _, l := range [...]struct {
		name string
		ps   []netip.Prefix
	}{{"accept-proxy", r.Trusted}, {"monitor", r.Monitor}, {"allow", r.Allow}, {"deny", r.Deny}} {
		if len(l.ps) > MaxCIDRs {
			return fmt.Errorf("%s: more than %d prefixes", l.name, MaxCIDRs)
		}
		for _, p := range l.ps {
			if !p.IsValid() || p != p.Masked() {
				return fmt.Errorf("%s: %s is not a masked CIDR prefix", l.name, p)
			}
		}
	}
	return nil
}

func (r *Rule) validateTarget(t Target) error {
	if t.Host != "" {
		if t.Addr.IsValid() || !isHostName(t.Host) || t.Host != strings.ToLower(t.Host) {
			return fmt.Errorf("target %q: not a lower-case host name without an address", t.Host)
		}
	} else if !t.Addr.IsValid() {
		return errors.New("target with no address")
	}
	if t.Host == "" && t.Addr.IsUnspecified() {
		return fmt.Errorf("target %s: an unspecified address is not a place to connect to", t.Addr)
	}
	if t.Ports.Last < t.Ports.First {
		return fmt.Errorf("port range %d-%d is reversed", t.Ports.First, t.Ports.Last)
	}
	if t.Ports.First == 0 {
		if t.Host != "" {
			return fmt.Errorf("target %s:0: port 0 is not a port to connect to", t.Host)
		}
		return fmt.Errorf("target %s: port 0 is not a port to connect to", netip.AddrPortFrom(t.Addr, 0))
	}
	if n := t.Ports.Len(); n != 1 && n != r.ListenPorts.Len() {
		return fmt.Errorf("target range %s has %d ports but the listen range %s has %d: a target range must have the listen range's length, or be one port",
			t.Ports, n, r.ListenPorts, r.ListenPorts.Len())
	}
	return nil
}

// targetOnlyOption names a set option that only means something with a target.
func (r *Rule) targetOnlyOption() string {
	switch {
	case r.SendProxy != ProxyNone:
		return "send-proxy"
	case r.Splice != SpliceAuto:
		return "splice"
	case r.Balance != BalanceRoundRobin:
		return "balance"
	case r.SockBuf != 0:
		return "sockbuf"
	case r.ConnectTimeout != 0:
		return "timeout.connect"
	case r.IdleTimeout != 0:
		return "timeout.idle"
	}
	return ""
}

// tcpOnlyOption names a set option that UDP rules cannot have.
func (r *Rule) tcpOnlyOption() string {
	switch {
	case r.AcceptProxy:
		return "accept-proxy"
	case r.SendProxy != ProxyNone:
		return "send-proxy"
	case r.Health != HealthNone:
		return "health"
	case len(r.Monitor) > 0:
		return "monitor"
	case r.Splice != SpliceAuto:
		return "splice"
	case r.MaxConn != 0:
		return "maxconn"
	case r.SockBuf != 0:
		return "sockbuf"
	case r.ConnectTimeout != 0:
		return "timeout.connect"
	case r.HandshakeTimeout != 0:
		return "timeout.handshake"
	}
	return ""
}

// TableError is a problem of a whole table, tied to the rule (by index) it
// was found on.
type TableError struct {
	Index int
	Msg   string
}

// ValidateTable checks what no single rule can: the table's size limits,
// listen keys that collide, and the routes of a shared key (routes.go). Each rule is assumed valid on its own. name(i)
// says how messages refer to rule i ("line 7"); nil gives "rule i+1".
// It returns the problems in rule order, or nil.
func ValidateTable(rs []*Rule, name func(i int) string) []TableError {
	if name == nil {
		name = func(i int) string { return fmt.Sprintf("rule %d", i+1) }
	}
	var errs []TableError
	if len(rs) > MaxRules {
		errs = append(errs, TableError{MaxRules, fmt.Sprintf("%d rules, at most %d allowed in a table", len(rs), MaxRules)})
	}
	// A wildcard address and a specific one of the same family on the same
	// port collide as well: the kernel refuses the second bind.
	type portKey struct {
		pif   string
		proto Proto
		is6   bool
		wild  bool
		port  uint16
	}
	routed := map[string]bool{} // listen parts some route has: validateRoutes checks those keys
	for _, r := range rs {
		if r.IsRoute() {
			routed[r.listenString()] = true
		}
	}
	exact := map[Key]int{}
	byPort := map[portKey]int{}
	total := 0
	counted := map[string]bool{} // listen parts whose ports are in total: a key's routes share them
	for i, r := range rs {
		add := 0
		if k := r.listenString(); r.ListenPorts.First == 0 || !counted[k] {
			counted[k] = true
			add = r.ListenPorts.Len()
		}
		total += add
		if total > MaxPorts && total-add <= MaxPorts {
			errs = append(errs, TableError{i, fmt.Sprintf("the table listens on more than %d ports", MaxPorts)})
		}
		if r.ListenPorts.First == 0 {
			continue // any free port: never collides
		}
		is6 := r.ListenAddr.Is6()
		wild := r.ListenAddr.IsUnspecified()
		for p := int(r.ListenPorts.First); p <= int(r.ListenPorts.Last); p++ {
			k := Key{Pif: r.ListenPif, Proto: r.Proto, Addr: r.ListenAddr, Port: uint16(p)}
			if j, dup := exact[k]; dup && j != i && !(sameRoutes(rs[j], r) && routed[r.listenString()]) {
				errs = append(errs, TableError{i, fmt.Sprintf("listen %s is also %s's", k, name(j))})
				break
			}
			exact[k] = i
			other := portKey{r.ListenPif, r.Proto, is6, !wild, uint16(p)}
			if j, clash := byPort[other]; clash && j != i {
				errs = append(errs, TableError{i, fmt.Sprintf("listen %s overlaps %s (%s): a wildcard and a specific address cannot share port %d",
					k, name(j), rs[j].listenString(), p)})
				break
			}
			if _, ok := byPort[portKey{r.ListenPif, r.Proto, is6, wild, uint16(p)}]; !ok {
				byPort[portKey{r.ListenPif, r.Proto, is6, wild, uint16(p)}] = i
			}
		}
	}
	errs = append(errs, validateRoutes(rs, name)...)
	slices.SortStableFunc(errs, func(a, b TableError) int { return a.Index - b.Index })
	return errs
}

// ListenString returns the rule's listen part as the canonical line writes
// it, pif included ("tcp ns1/10.0.0.1:8000-8010"): the rule's name in
// metrics, logs and the status page.
func (r *Rule) ListenString() string { return r.listenString() }

func (r *Rule) listenString() string {
	var b strings.Builder
	b.WriteString(r.Proto.String() + " ")
	writePif(&b, r.ListenPif)
	writeAddrPorts(&b, r.ListenAddr, r.ListenPorts)
	return b.String()
}
