package rules

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Parse reads one rule in the one-line syntax and validates it:
//
//	PROTO LISTEN [ "->" TARGET ] { OPTION }
//
// It returns the rule, or an error whose message says what is wrong and
// where in the line, without a file or line prefix (ParseFile adds those).
// A line with several problems (a bad listen and two bad options) gives a
// LineErrors with each of them, in the order of the line's words; one
// problem is returned alone, so its text is the same as ever.
func Parse(line string) (*Rule, error) {
	if len(line) > MaxLineLen {
		return nil, fmt.Errorf("rule is %d bytes long, at most %d allowed", len(line), MaxLineLen)
	}
	f := strings.Fields(line)
	if len(f) == 0 {
		return nil, errors.New("empty rule")
	}
	if len(f) < 2 {
		return nil, fmt.Errorf("rule %q: want PROTO LISTEN [-> TARGET] [OPTION...]", line)
	}
	r := &Rule{}
	var errs LineErrors
	var err error
	if r.Proto, err = parseProto(f[0]); err != nil {
		errs = append(errs, err)
	}
	if r.ListenPif, r.ListenAddr, r.ListenPorts, err = parseListen(f[1]); err != nil {
		errs = append(errs, err)
	}
	opts := f[2:]
	if len(opts) > 0 && opts[0] == "->" {
		if len(opts) < 2 {
			errs = append(errs, errors.New("\"->\" with no target after it"))
			opts = nil
		} else {
			if r.TargetPif, r.Targets, err = parseTarget(opts[1]); err != nil {
				errs = append(errs, err)
			}
			opts = opts[2:]
		}
	}
	if len(errs) > 0 && slices.Contains(opts, "->") {
		// The words are not where the syntax has them (a blank inside
		// LISTEN): reading the rest as options would only add noise.
		opts = nil
	}
	errs = append(errs, r.parseOptions(opts)...)
	if len(errs) == 0 {
		// Only a rule whose every word was read: the rule as a whole is
		// not what the user wrote when a word of it was refused.
		errs = append(errs, Errors(r.Validate())...)
	}
	if err := errs.Err(); err != nil {
		return nil, err
	}
	return r, nil
}

// LineErrors is every problem of one rule line (Parse), or of one rule
// (Validate), in the order found.
type LineErrors []error

// Error is the problems joined by "; ", for a caller that shows one line
// (ctl add, forward); a file's reader shows one per line (Errors).
func (l LineErrors) Error() string { return joinErrors(l, "; ") }

// joinErrors is the texts of errs joined by sep.
func joinErrors[E error](errs []E, sep string) string {
	var b strings.Builder
	for i, e := range errs {
		if i > 0 {
			b.WriteString(sep)
		}
		b.WriteString(e.Error())
	}
	return b.String()
}

func (l LineErrors) Unwrap() []error { return l }

// Err returns nil for no problem, the problem itself for one, else l.
func (l LineErrors) Err() error {
	switch len(l) {
	case 0:
		return nil
	case 1:
		return l[0]
	}
	return l
}

// Errors returns the problems err carries: each of a LineErrors, err
// alone otherwise, none for nil.
func Errors(err error) []error {
	var l LineErrors
	switch {
	case err == nil:
		return nil
	case errors.As(err, &l):
		return l
	}
	return []error{err}
}

// parseProto reads PROTO: tcp or udp.
func parseProto(s string) (Proto, error) {
	switch s {
	case "tcp":
		return TCP, nil
	case "udp":
		return UDP, nil
	}
	return 0, fmt.Errorf("unknown protocol %q: want tcp or udp", s)
}

// ParseForward builds the TCP rule of `sluice forward LISTEN TARGET
// [OPTION...]`: the parts of a one-line rule, given separately.
func ParseForward(listen, target string, opts []string) (*Rule, error) {
	for _, s := range append([]string{listen, target}, opts...) {
		if s == "" || strings.ContainsAny(s, " \t\r\n") {
			return nil, fmt.Errorf("%q: want one word of the rule syntax", s)
		}
	}
	return Parse("tcp " + listen + " -> " + target + " " + strings.Join(opts, " "))
}

// splitPif splits "PIF/REST" into its pif ("" for host) and the rest.
func splitPif(s string) (string, string, error) {
	pif, rest, found := strings.Cut(s, "/")
	if !found {
		return "", s, nil
	}
	if pif == "" {
		return "", "", errors.New("empty pif name before \"/\"")
	}
	if err := CheckPifName(pif); err != nil && pif != HostPif {
		return "", "", err
	}
	return ModelPif(pif), rest, nil
}

// CheckPifName returns what is wrong with the name of a declared pif, or
// nil: a name is what a network namespace's may be (letters, digits, '-',
// '_' and '.', up to 64 bytes), and "host" is reserved for the daemon's own
// namespace.
func CheckPifName(name string) error {
	switch {
	case name == "":
		return errors.New("pif name is empty")
	case name == HostPif:
		return fmt.Errorf("pif name %q is reserved for the daemon's own network namespace", name)
	case len(name) > 64:
		return fmt.Errorf("pif name %q is longer than 64 bytes", name)
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return fmt.Errorf("pif name %q: only letters, digits, '-', '_' and '.' are allowed", name)
		}
	}
	return nil
}

func parseListen(s string) (string, netip.Addr, PortRange, error) {
	pif, rest, err := splitPif(s)
	if err != nil {
		return "", netip.Addr{}, PortRange{}, err
	}
	addr, ports, err := parseAddrPorts(rest)
	if err != nil {
		return "", netip.Addr{}, PortRange{}, fmt.Errorf("listen %q: %w", s, err)
	}
	return pif, addr, ports, nil
}

func parseTarget(s string) (string, []Target, error) {
	pif, rest, err := splitPif(s)
	if err != nil {
		return "", nil, err
	}
	var ts []Target
	for _, part := range strings.Split(rest, ",") {
		if len(ts) == MaxTargets {
			return "", nil, fmt.Errorf("target %q: more than %d backends", s, MaxTargets)
		}
		t, err := parseTargetPart(part)
		if err != nil {
			return "", nil, fmt.Errorf("target %q: %w", s, err)
		}
		ts = append(ts, t)
	}
	return pif, ts, nil
}

// parseAddrPorts reads ADDR ":" PORTS, with an IPv6 ADDR in brackets.
func parseAddrPorts(s string) (netip.Addr, PortRange, error) {
	var host, ports string
	if strings.HasPrefix(s, "[") {
		end := strings.Index(s, "]")
		if end < 0 {
			return netip.Addr{}, PortRange{}, errors.New("missing \"]\" after an IPv6 address")
		}
		host = s[1:end]
		rest := s[end+1:]
		if !strings.HasPrefix(rest, ":") {
			return netip.Addr{}, PortRange{}, errors.New("want \":PORT\" after the address")
		}
		ports = rest[1:]
	} else {
		i := strings.LastIndexByte(s, ':')
		if i < 0 {
			return netip.Addr{}, PortRange{}, errors.New("want ADDR:PORT")
		}
		host, ports = s[:i], s[i+1:]
		if strings.Contains(host, ":") {
			return netip.Addr{}, PortRange{}, errors.New("an IPv6 address must be in brackets, as [::1]:80")
		}
	}
	addr, err := netip.ParseAddr(host)
	if err != nil {
		return netip.Addr{}, PortRange{}, fmt.Errorf("address %q: want an IP address", host)
	}
	if addr.Zone() != "" {
		return netip.Addr{}, PortRange{}, fmt.Errorf("address %q: zones are not supported", host)
	}
	if s[0] == '[' && addr.Is4() {
		return netip.Addr{}, PortRange{}, fmt.Errorf("address %q: an IPv4 address takes no brackets", host)
	}
	pr, err := parsePorts(ports)
	if err != nil {
		return netip.Addr{}, PortRange{}, err
	}
	// An IPv4-mapped IPv6 address is the IPv4 address: one listen key, one
	// socket family.
	return addr.Unmap(), pr, nil
}

func parsePorts(s string) (PortRange, error) {
	first, last, isRange := strings.Cut(s, "-")
	a, err := parsePort(first)
	if err != nil {
		return PortRange{}, err
	}
	if !isRange {
		return PortRange{a, a}, nil
	}
	b, err := parsePort(last)
	if err != nil {
		return PortRange{}, err
	}
	return PortRange{a, b}, nil
}

func parsePort(s string) (uint16, error) {
	if s == "" {
		return 0, errors.New("missing port")
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("port %q: want a number 0-65535", s)
		}
	}
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || (len(s) > 1 && s[0] == '0') {
		return 0, fmt.Errorf("port %q: want a number 0-65535", s)
	}
	return uint16(n), nil
}

// parseOptions reads the OPTION words into r, each of which may appear
// once. It returns the problem of every word refused, in order.
func (r *Rule) parseOptions(opts []string) []error {
	var errs []error
	seen := map[string]bool{}
	for _, o := range opts {
		name, val, hasVal := strings.Cut(o, "=")
		if seen[name] {
			errs = append(errs, fmt.Errorf("option %q given twice", name))
			continue
		}
		seen[name] = true
		if err := r.setOption(name, val, hasVal); err != nil {
			errs = append(errs, err)
		}
	}
	return errs
}

func (r *Rule) setOption(name, val string, hasVal bool) error {
	needVal := func() error {
		if !hasVal || val == "" {
			return fmt.Errorf("option %s needs a value (%s=...)", name, name)
		}
		return nil
	}
	if !optionKnown(name) { // OptionDocs: no option without a help line
		return fmt.Errorf("unknown option %q", name)
	}
	if isCheckOption(name) {
		return r.setCheckOption(name, val, hasVal)
	}
	if isTLSOption(name) {
		return r.setTLSOption(name, val, hasVal)
	}
	if name == "resolve" {
		return r.setResolveOption(val, hasVal)
	}
	var err error
	switch name {
	case "weak":
		if hasVal {
			return errors.New("option weak takes no value")
		}
		r.Weak = true
	case "accept-proxy":
		r.AcceptProxy = true
		if hasVal {
			if err = needVal(); err == nil {
				r.Trusted, err = parseCIDRs(name, val)
			}
		}
	case "send-proxy":
		if err = needVal(); err != nil {
			return err
		}
		switch val {
		case "v1":
			r.SendProxy = ProxyV1
		case "v2":
			r.SendProxy = ProxyV2
		default:
			return fmt.Errorf("send-proxy=%s: want v1 or v2", val)
		}
	case "health":
		if err = needVal(); err != nil {
			return err
		}
		switch val {
		case "tcp":
			r.Health = HealthTCP
		case "http":
			r.Health = HealthHTTP
		default:
			return fmt.Errorf("health=%s: want tcp or http", val)
		}
	case "monitor":
		if err = needVal(); err == nil {
			r.Monitor, err = parseCIDRs(name, val)
		}
	case "allow":
		if err = needVal(); err == nil {
			r.Allow, err = parseCIDRs(name, val)
		}
	case "deny":
		if err = needVal(); err == nil {
			r.Deny, err = parseCIDRs(name, val)
		}
	case "rate":
		if err = needVal(); err != nil {
			return err
		}
		n, ok := strings.CutSuffix(val, "/s")
		if !ok {
			return fmt.Errorf("rate=%s: want N/s, as rate=100/s", val)
		}
		if r.Rate, err = parseCount(name, n); err != nil {
			return err
		}
	case "maxconn":
		if err = needVal(); err != nil {
			return err
		}
		r.MaxConn, err = parseCount(name, val)
	case "splice":
		if err = needVal(); err != nil {
			return err
		}
		switch val {
		case "auto":
			r.Splice = SpliceAuto
		case "on":
			r.Splice = SpliceOn
		case "off":
			r.Splice = SpliceOff
		default:
			return fmt.Errorf("splice=%s: want auto, on or off", val)
		}
	case "balance":
		if err = needVal(); err != nil {
			return err
		}
		switch val {
		case "roundrobin":
			r.Balance = BalanceRoundRobin
		case "leastconn":
			r.Balance = BalanceLeastConn
		case "source":
			r.Balance = BalanceSource
		default:
			return fmt.Errorf("balance=%s: want roundrobin, leastconn or source", val)
		}
	case "sockbuf":
		if err = needVal(); err == nil {
			r.SockBuf, err = parseSockBuf(val)
		}
	case "timeout.connect":
		if err = needVal(); err == nil {
			r.ConnectTimeout, err = parseDuration(name, val)
		}
	case "timeout.idle":
		if err = needVal(); err == nil {
			r.IdleTimeout, err = parseDuration(name, val)
		}
	case "timeout.handshake":
		if err = needVal(); err == nil {
			r.HandshakeTimeout, err = parseDuration(name, val)
		}
	case "sni":
		if err = needVal(); err == nil {
			r.SNI, err = parseNames(val)
		}
	case "alpn":
		if err = needVal(); err == nil {
			r.ALPN, err = parseALPN(val)
		}
	default:
		return fmt.Errorf("unknown option %q", name)
	}
	return err
}

// parseCIDRs reads a comma-separated list of prefixes; a bare address is a
// one-host prefix. Prefixes are stored masked (10.1.2.3/8 is 10.0.0.0/8).
func parseCIDRs(opt, s string) ([]netip.Prefix, error) {
	parts := strings.Split(s, ",")
	if len(parts) > MaxCIDRs {
		return nil, fmt.Errorf("%s: more than %d prefixes", opt, MaxCIDRs)
	}
	out := make([]netip.Prefix, 0, len(parts))
	for _, p := range parts {
		var pfx netip.Prefix
		var err error
		if strings.Contains(p, "/") {
			pfx, err = netip.ParsePrefix(p)
		} else {
			var a netip.Addr
			if a, err = netip.ParseAddr(p); err == nil {
				pfx = netip.PrefixFrom(a, a.BitLen())
			}
		}
		if err != nil || pfx.Addr().Zone() != "" {
			return nil, fmt.Errorf("%s: %q is not a CIDR prefix or an address", opt, p)
		}
		out = append(out, pfx.Masked())
	}
	return out, nil
}

// parseSockBuf reads sockbuf's value: "auto" (SockBufAuto), or a size in
// bytes, KiB (k) or MiB (m) within [MinSockBuf, MaxSockBuf].
func parseSockBuf(s string) (int, error) {
	if s == "auto" {
		return SockBufAuto, nil
	}
	num, unit := s, 1
	if n, ok := strings.CutSuffix(s, "k"); ok {
		num, unit = n, 1<<10
	} else if n, ok := strings.CutSuffix(s, "m"); ok {
		num, unit = n, 1<<20
	}
	n, err := strconv.Atoi(num)
	if err != nil || num == "" || num[0] < '0' || num[0] > '9' || n > MaxSockBuf/unit || n*unit < MinSockBuf {
		return 0, fmt.Errorf("sockbuf=%s: want auto or a size from 4k to 64m, as 256k or 1m", s)
	}
	return n * unit, nil
}

// parseCount reads a positive count of at most 1e9.
func parseCount(opt, s string) (int, error) {
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 || n > 1e9 || s[0] == '+' {
		return 0, fmt.Errorf("%s=%s: want a whole number from 1 to 1000000000", opt, s)
	}
	return n, nil
}

// parseDuration reads a Go duration, positive and at most a day.
func parseDuration(opt, s string) (time.Duration, error) {
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("%s=%s: want a duration such as 500ms, 2s or 1m", opt, s)
	}
	if d <= 0 || d > 24*time.Hour {
		return 0, fmt.Errorf("%s=%s: want a duration above 0 and at most 24h", opt, s)
	}
	return d, nil
}
