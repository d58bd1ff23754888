package rules

import (
	"errors"
	"fmt"
	"slices"
	"strings"
)

// Routes. Several rules may share one listen key when each has sni= and/or
// alpn= and at most one has neither (the key's default route); each is a
// route of the key's one listening socket. The options that act before
// routing are the listener's and must be equal on every route (SameListener).
// Routes of a key list the same listen ports, so a key's routes are the
// rules with the same listen part.

// Limits of the routing options.
const (
	MaxNames  = 256 // names in one sni= list
	MaxProtos = 64  // protocols in one alpn= list
)

// IsRoute reports whether r routes by the ClientHello (has sni= or alpn=).
func (r *Rule) IsRoute() bool { return len(r.SNI) > 0 || len(r.ALPN) > 0 }

// routeWords returns r's routing options as the canonical line writes them
// (" sni=a.example.com alpn=h2"), or "".
func (r *Rule) routeWords() string {
	var b strings.Builder
	if len(r.SNI) > 0 {
		b.WriteString(" sni=" + strings.Join(r.SNI, ","))
	}
	if len(r.ALPN) > 0 {
		b.WriteString(" alpn=" + strings.Join(r.ALPN, ","))
	}
	return b.String()
}

// RouteString is the rule's name in metrics, logs and the status page: its
// listen part followed by its routing words ("tcp 0.0.0.0:443
// sni=a.example.com"); for a rule that does not route, its listen part.
func (r *Rule) RouteString() string { return r.listenString() + r.routeWords() }

// NormalizeName is a server name as routes compare it: lowercase, without
// a trailing dot.
func NormalizeName(s string) string {
	return strings.ToLower(strings.TrimSuffix(s, "."))
}

// parseNames reads sni=NAME{,NAME}: DNS names, "*." allowed as the first
// label only, stored normalized. A name given twice is an error.
func parseNames(val string) ([]string, error) {
	parts := strings.Split(val, ",")
	if len(parts) > MaxNames {
		return nil, fmt.Errorf("sni: more than %d names", MaxNames)
	}
	out := make([]string, 0, len(parts))
	for _, p := range parts {
		n := NormalizeName(p)
		if err := checkName(n); err != nil {
			return nil, fmt.Errorf("sni: %q: %w", p, err)
		}
		if slices.Contains(out, n) {
			return nil, fmt.Errorf("sni: %q given twice", p)
		}
		out = append(out, n)
	}
	return out, nil
}

// checkName returns what is wrong with a normalized sni= name, or nil.
func checkName(n string) error {
	host := strings.TrimPrefix(n, "*.")
	switch {
	case host == "":
		return errors.New("empty name")
	case len(n) > 253:
		return errors.New("longer than 253 bytes")
	}
	for _, label := range strings.Split(host, ".") {
		if label == "" || len(label) > 63 {
			return errors.New("labels are 1 to 63 bytes, separated by single dots")
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return errors.New("only letters, digits, '-' and '_' in a label; \"*.\" only as the first label")
			}
		}
	}
	return nil
}

// parseALPN reads alpn=PROTO{,PROTO}: protocol names of 1 to 255 printable
// ASCII bytes (no comma), compared exactly.
func parseALPN(val string) ([]string, error) {
	parts := strings.Split(val, ",")
	if len(parts) > MaxProtos {
		return nil, fmt.Errorf("alpn: more than %d protocols", MaxProtos)
	}
	for i, p := range parts {
		if p == "" || len(p) > 255 {
			return nil, fmt.Errorf("alpn: %q: a protocol name is 1 to 255 bytes", p)
		}
		for j := 0; j < len(p); j++ {
			if p[j] <= ' ' || p[j] > '~' {
				return nil, fmt.Errorf("alpn: %q: printable ASCII only", p)
			}
		}
		if slices.Contains(parts[:i], p) {
			return nil, fmt.Errorf("alpn: %q given twice", p)
		}
	}
	return parts, nil
}

// validateRoute checks the routing options of one rule.
func (r *Rule) validateRoute() error {
	if !r.IsRoute() {
		return nil
	}
	if r.Proto != TCP {
		return errors.New("sni= and alpn= route tcp rules only")
	}
	if len(r.Targets) == 0 {
		return errors.New("a route (sni= or alpn=) needs a target (\"-> TARGET\")")
	}
	return nil
}

// listenerDiff names the first option that acts before routing and differs
// between a and b, or returns "".
func listenerDiff(a, b *Rule) string {
	switch {
	case a.Weak != b.Weak:
		return "weak"
	case a.AcceptProxy != b.AcceptProxy || !slices.Equal(a.Trusted, b.Trusted):
		return "accept-proxy"
	case !slices.Equal(a.Monitor, b.Monitor):
		return "monitor"
	case a.Health != b.Health:
		return "health"
	case !slices.Equal(a.Allow, b.Allow):
		return "allow"
	case !slices.Equal(a.Deny, b.Deny):
		return "deny"
	case a.Rate != b.Rate:
		return "rate"
	case a.MaxConn != b.MaxConn:
		return "maxconn"
	case a.SockBuf != b.SockBuf:
		return "sockbuf" // the listening socket's, which accepted sockets inherit
	case a.HandshakeTimeout != b.HandshakeTimeout:
		return "timeout.handshake"
	}
	return ""
}

// routeClash says why routes a and b of one key are ambiguous, or returns
// "": they share an sni= name (or both have none) and either both lack
// alpn= or their alpn= lists share a protocol.
func routeClash(a, b *Rule) string {
	name := ""
	switch {
	case len(a.SNI) == 0 && len(b.SNI) == 0:
		name = "no sni="
	default:
		for _, n := range a.SNI {
			if slices.Contains(b.SNI, n) {
				name = "sni " + n
				break
			}
		}
	}
	if name == "" {
		return ""
	}
	if len(a.ALPN) == 0 && len(b.ALPN) == 0 {
		if name == "no sni=" {
			return "both are the default route (no sni= and no alpn=)"
		}
		return "both match " + name + " without alpn="
	}
	for _, p := range a.ALPN {
		if slices.Contains(b.ALPN, p) {
			return "both match " + name + " with alpn " + p
		}
	}
	return ""
}

// validateRoutes checks the keys shared by several rules: every rule of a
// shared key must route the same way on the same listener. groups maps a
// listen part to the rules having it, in table order.
func validateRoutes(rs []*Rule, name func(i int) string) []TableError {
	var errs []TableError
	groups := map[string][]int{}
	var order []string
	for i, r := range rs {
		if r.ListenPorts.First == 0 {
			continue // any free port: its own key
		}
		k := r.listenString()
		if _, ok := groups[k]; !ok {
			order = append(order, k)
		}
		groups[k] = append(groups[k], i)
	}
	for _, k := range order {
		g := groups[k]
		if len(g) < 2 || !slices.ContainsFunc(g, func(i int) bool { return rs[i].IsRoute() }) {
			continue // rules that do not route: ValidateTable's key check says they collide
		}
		for gi, i := range g {
			r := rs[i]
			if opt := listenerDiff(rs[g[0]], r); opt != "" && gi > 0 {
				errs = append(errs, TableError{i, fmt.Sprintf("routes of %s must agree on %s: this rule and %s differ", k, opt, name(g[0]))})
				continue
			}
			for _, j := range g[:gi] {
				if why := routeClash(rs[j], r); why != "" {
					errs = append(errs, TableError{i, fmt.Sprintf("route of %s clashes with %s: %s", k, name(j), why)})
					break
				}
			}
		}
	}
	return errs
}

// sameRoutes reports whether a and b are routes of one key
// (the same listen part), which ValidateTable checks apart.
func sameRoutes(a, b *Rule) bool {
	return a.ListenPif == b.ListenPif && a.Proto == b.Proto && a.ListenAddr == b.ListenAddr && a.ListenPorts == b.ListenPorts
}

// RouteGroups groups the rules of a valid table by listen part, in table
// order: each group is the routes of its keys (a rule that shares its key
// with none is a group of one). Port-0 rules are groups of one.
func RouteGroups(rs []*Rule) [][]*Rule {
	var out [][]*Rule
	idx := map[string]int{}
	for _, r := range rs {
		if r.ListenPorts.First == 0 {
			out = append(out, []*Rule{r})
			continue
		}
		k := r.listenString()
		if i, ok := idx[k]; ok {
			out[i] = append(out[i], r)
			continue
		}
		idx[k] = len(out)
		out = append(out, []*Rule{r})
	}
	return out
}

// Router chooses the route of a listen key for a ClientHello. Built once
// per key from its routes (a valid group, table order); Choose allocates
// nothing. Safe for concurrent use.
type Router struct {
	routes []*Rule
	exact  map[string][]int // name -> routes listing it
	wild   map[string][]int // ".b.example.com" -> routes listing "*.b.example.com"
	any    []int            // routes without sni=
	def    int              // the default route (no sni=, no alpn=), or -1
}

// NewRouter builds the router of one key's routes.
func NewRouter(routes []*Rule) *Router {
	rt := &Router{routes: routes, exact: map[string][]int{}, wild: map[string][]int{}, def: -1}
	for i, r := range routes {
		if len(r.SNI) == 0 {
			rt.any = append(rt.any, i)
			if len(r.ALPN) == 0 {
				rt.def = i
			}
		}
		for _, n := range r.SNI {
			if suf, ok := strings.CutPrefix(n, "*"); ok {
				rt.wild[suf] = append(rt.wild[suf], i)
			} else {
				rt.exact[n] = append(rt.exact[n], i)
			}
		}
	}
	return rt
}

// Routes returns the routes the router chooses among, in table order.
func (rt *Router) Routes() []*Rule { return rt.routes }

// Default returns the index of the default route, or -1 when the key has
// none: where a conn that is not TLS goes.
func (rt *Router) Default() int { return rt.def }

// Choose returns the index of the route for a hello offering server name
// name (as sent: any case, maybe a trailing dot; nil: none) and the ALPN
// protocols alpn, or -1 when no route matches (no-route). The most specific
// level wins: the exact name, then the longest wildcard, then the routes
// without sni=; within a level, a route whose alpn= matched beats one
// without alpn=, and a level where neither is found is passed over.
func (rt *Router) Choose(name []byte, alpn [][]byte) int {
	var low [253]byte
	if n := len(name); n > 0 && name[n-1] == '.' {
		name = name[:n-1]
	}
	if len(name) > 0 && len(name) <= len(low) {
		for i, c := range name {
			if c >= 'A' && c <= 'Z' {
				c += 'a' - 'A'
			}
			low[i] = c
		}
		n := low[:len(name)]
		if i := rt.pick(rt.exact[string(n)], alpn); i >= 0 {
			return i
		}
		// Longest wildcard first: the suffixes from each dot, left to right;
		// "*." stands for at least one label, so the suffix starts past
		// the first byte.
		for j := 1; j < len(n); j++ {
			if n[j] == '.' {
				if i := rt.pick(rt.wild[string(n[j:])], alpn); i >= 0 {
					return i
				}
			}
		}
	}
	return rt.pick(rt.any, alpn)
}

// pick returns, of the routes cands, the first whose alpn= list holds a
// protocol of alpn, else the first without alpn=, else -1.
func (rt *Router) pick(cands []int, alpn [][]byte) int {
	plain := -1
	for _, i := range cands {
		r := rt.routes[i]
		if len(r.ALPN) == 0 {
			if plain < 0 {
				plain = i
			}
			continue
		}
		for _, p := range r.ALPN {
			for _, o := range alpn {
				if string(o) == p {
					return i
				}
			}
		}
	}
	return plain
}

// ParseName reads a rule's name as RouteString writes it, "PROTO LISTEN
// [sni=…] [alpn=…]" (blanks between words of any length), and returns it
// canonical: the form ctl's del and sessions --rule compare with
// RouteString. It returns an error that says what is wrong when s is not a
// name (a target or another option in it, a bad address).
func ParseName(s string) (string, error) {
	f := strings.Fields(s)
	if len(f) < 2 {
		return "", fmt.Errorf("%q: want a rule's name, PROTO LISTEN [sni=…] [alpn=…] (as \"tcp 0.0.0.0:8080\")", s)
	}
	r := &Rule{}
	var err error
	if r.Proto, err = parseProto(f[0]); err != nil {
		return "", fmt.Errorf("%q: %w", s, err)
	}
	if r.ListenPif, r.ListenAddr, r.ListenPorts, err = parseListen(f[1]); err != nil {
		return "", fmt.Errorf("%q: %w", s, err)
	}
	for _, o := range f[2:] {
		if name, _, _ := strings.Cut(o, "="); name != "sni" && name != "alpn" {
			return "", fmt.Errorf("%q: %q is not part of a rule's name (only sni= and alpn= are)", s, o)
		}
	}
	if err := LineErrors(r.parseOptions(f[2:])).Err(); err != nil {
		return "", fmt.Errorf("%q: %w", s, err)
	}
	return r.RouteString(), nil
}
