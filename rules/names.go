package rules

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"
)

// Backends by name: a target's address may be a host name, resolved by the
// engine when a table is loaded and again every resolve= (names.go of
// package engine). The model keeps the name; the addresses are the
// engine's.

// DefaultResolve is how often names are resolved again when resolve= is
// not given; ResolveOff (resolve=off) resolves once, at load.
const (
	DefaultResolve               = 30 * time.Second
	ResolveOff     time.Duration = -1
	MaxHostName                  = 253
)

// isHostName reports whether s is a host name as a target may give one:
// dot-separated labels of letters, digits and '-' (not at a label's ends),
// 1 to 63 bytes each, 253 at most in all, not all digits (that is an
// address, or a typo of one).
func isHostName(s string) bool {
	if s == "" || len(s) > MaxHostName {
		return false
	}
	digitsOnly := true
	for _, label := range strings.Split(s, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			switch {
			case c >= '0' && c <= '9':
			case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c == '-':
				digitsOnly = false
			default:
				return false
			}
		}
	}
	return !digitsOnly
}

// parseTargetPart reads one backend of a target: ADDR ":" PORTS, where ADDR
// may be a host name (kept lower case; a trailing dot dropped).
func parseTargetPart(s string) (Target, error) {
	if !strings.HasPrefix(s, "[") {
		if i := strings.LastIndexByte(s, ':'); i > 0 {
			host := strings.TrimSuffix(s[:i], ".")
			if _, err := netip.ParseAddr(host); err != nil && isHostName(host) {
				pr, err := parsePorts(s[i+1:])
				if err != nil {
					return Target{}, err
				}
				return Target{Host: strings.ToLower(host), Ports: pr}, nil
			}
		}
	}
	addr, ports, err := parseAddrPorts(s)
	if err != nil {
		if strings.Contains(err.Error(), "want an IP address") {
			err = fmt.Errorf("%w or a host name", err)
		}
		return Target{}, err
	}
	return Target{Addr: addr, Ports: ports}, nil
}

// setResolveOption reads resolve=DUR|off.
func (r *Rule) setResolveOption(val string, hasVal bool) error {
	if !hasVal || val == "" {
		return errors.New("option resolve needs a value (resolve=...)")
	}
	if val == "off" {
		r.Resolve = ResolveOff
		return nil
	}
	d, err := parseDuration("resolve", val)
	if err == nil && d < time.Second {
		err = fmt.Errorf("resolve=%s: at least 1s", val)
	}
	r.Resolve = d
	return err
}

// Hosts returns the host names of the rule's targets, each once, in order.
func (r *Rule) Hosts() []string {
	var out []string
	for _, t := range r.Targets {
		if t.Host != "" && !slices.Contains(out, t.Host) {
			out = append(out, t.Host)
		}
	}
	return out
}

// ResolveEvery returns how often the rule's names are resolved again: 0
// for never (resolve=off, or no names).
func (r *Rule) ResolveEvery() time.Duration {
	switch {
	case len(r.Hosts()) == 0 || r.Resolve == ResolveOff:
		return 0
	case r.Resolve == 0:
		return DefaultResolve
	}
	return r.Resolve
}

// validateNames checks resolve= against the targets.
func (r *Rule) validateNames() error {
	if r.Resolve != 0 && len(r.Hosts()) == 0 {
		return errors.New("resolve= with no host name in the target")
	}
	if r.Resolve < 0 && r.Resolve != ResolveOff {
		return errors.New("negative resolve interval")
	}
	return nil
}

func writeResolve(b *strings.Builder, d time.Duration) {
	switch {
	case d == ResolveOff:
		b.WriteString(" resolve=off")
	case d > 0:
		writeDurOpt(b, "resolve", d)
	}
}

// TargetForAddrs is TargetFor with host names: lookup gives a name's
// addresses (each one a backend, in lookup's order); a name lookup has
// none for, or a nil lookup, gives no backend. The pool is at most
// MaxTargets backends.
func (r *Rule) TargetForAddrs(i int, lookup func(host string) []netip.Addr) []netip.AddrPort {
	if len(r.Targets) == 0 {
		return nil
	}
	pool := make([]netip.AddrPort, 0, len(r.Targets))
	for _, t := range r.Targets {
		port := t.Ports.First
		if t.Ports.Len() > 1 {
			port += uint16(i)
		}
		if t.Host == "" {
			pool = append(pool, netip.AddrPortFrom(t.Addr, port))
			continue
		}
		if lookup == nil {
			continue
		}
		for _, a := range lookup(t.Host) {
			if len(pool) == MaxTargets {
				break
			}
			ap := netip.AddrPortFrom(a.Unmap(), port)
			if !slices.Contains(pool, ap) {
				pool = append(pool, ap)
			}
		}
	}
	return pool
}
