package rules

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// CheckKind is a rule's active health check. The zero value is none.
type CheckKind uint8

const (
	CheckNone CheckKind = 0
	CheckTCP  CheckKind = 1 // connect, then close
	CheckHTTP CheckKind = 2 // GET PATH HTTP/1.1; a 2xx or 3xx status is up
)

func (k CheckKind) String() string {
	switch k {
	case CheckNone:
		return "none"
	case CheckTCP:
		return "tcp"
	case CheckHTTP:
		return "http"
	}
	return "check-" + strconv.Itoa(int(k))
}

// Defaults of the check options left at zero (Check.Effective applies them).
const (
	DefaultCheckPath     = "/"
	DefaultCheckInterval = 2 * time.Second
	DefaultCheckTimeout  = time.Second
	DefaultCheckRise     = 2
	DefaultCheckFall     = 3
	MaxCheckRiseFall     = 100 // check.rise and check.fall at most
	MaxCheckPathLen      = 1024
)

// Check is a rule's active health check: check= and the check.* options.
// The zero value of each field is its default; Kind CheckNone is no check
// (and then every other field is zero).
type Check struct {
	Kind     CheckKind
	Path     string        // check=http only; "" = "/"
	Port     uint16        // 0 = the backend's own port
	Interval time.Duration // 0 = DefaultCheckInterval
	Timeout  time.Duration // 0 = DefaultCheckTimeout
	Rise     int           // 0 = DefaultCheckRise
	Fall     int           // 0 = DefaultCheckFall
}

// Effective returns c with its defaults filled in.
func (c Check) Effective() Check {
	if c.Path == "" && c.Kind == CheckHTTP {
		c.Path = DefaultCheckPath
	}
	if c.Interval == 0 {
		c.Interval = DefaultCheckInterval
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultCheckTimeout
	}
	if c.Rise == 0 {
		c.Rise = DefaultCheckRise
	}
	if c.Fall == 0 {
		c.Fall = DefaultCheckFall
	}
	return c
}

// isCheckOption reports whether the option name is check= or a check.*.
func isCheckOption(name string) bool {
	return name == "check" || strings.HasPrefix(name, "check.")
}

// setCheckOption reads check= and the check.* options into r.Check.
func (r *Rule) setCheckOption(name, val string, hasVal bool) error {
	if !hasVal || val == "" {
		return fmt.Errorf("option %s needs a value (%s=...)", name, name)
	}
	c := &r.Check
	var err error
	switch name {
	case "check":
		switch val {
		case "tcp":
			c.Kind = CheckTCP
		case "http":
			c.Kind = CheckHTTP
		default:
			return fmt.Errorf("check=%s: want tcp or http", val)
		}
	case "check.path":
		if err := checkPathValid(val); err != nil {
			return err
		}
		c.Path = val
	case "check.port":
		var p uint16
		if p, err = parsePort(val); err == nil && p == 0 {
			err = errors.New("port 0 is not a port to check")
		}
		if err != nil {
			return fmt.Errorf("check.port=%s: %w", val, err)
		}
		c.Port = p
	case "check.interval":
		c.Interval, err = parseDuration(name, val)
	case "check.timeout":
		c.Timeout, err = parseDuration(name, val)
	case "check.rise":
		c.Rise, err = parseRiseFall(name, val)
	case "check.fall":
		c.Fall, err = parseRiseFall(name, val)
	default:
		return fmt.Errorf("unknown option %q", name)
	}
	return err
}

func parseRiseFall(opt, s string) (int, error) {
	n, err := parseCount(opt, s)
	if err == nil && n > MaxCheckRiseFall {
		err = fmt.Errorf("%s=%s: at most %d", opt, s, MaxCheckRiseFall)
	}
	return n, err
}

// checkPathValid says what is wrong with an HTTP check's path, or nil: it
// goes into a request line as is, so it starts with "/" and holds only
// printable ASCII without blanks.
func checkPathValid(p string) error {
	if !strings.HasPrefix(p, "/") {
		return fmt.Errorf("check.path=%s: want a path starting with \"/\"", p)
	}
	if len(p) > MaxCheckPathLen {
		return fmt.Errorf("check.path: %d bytes, at most %d", len(p), MaxCheckPathLen)
	}
	for i := 0; i < len(p); i++ {
		if c := p[i]; c <= ' ' || c >= 0x7f {
			return fmt.Errorf("check.path=%q: only printable ASCII without blanks (escape others as %%XX)", p)
		}
	}
	return nil
}

// validateCheck checks the check options against the rest of the rule.
func (r *Rule) validateCheck() error {
	c := r.Check
	if c.Kind == CheckNone {
		if c != (Check{}) {
			return errors.New("check.* options without check=tcp|http")
		}
		return nil
	}
	if c.Kind != CheckTCP && c.Kind != CheckHTTP {
		return fmt.Errorf("unknown check %s", c.Kind)
	}
	if len(r.Targets) == 0 {
		return fmt.Errorf("check=%s needs a target (\"-> TARGET\")", c.Kind)
	}
	if r.Proto != TCP {
		return fmt.Errorf("check=%s is for tcp rules only", c.Kind)
	}
	if c.Path != "" {
		if c.Kind != CheckHTTP {
			return errors.New("check.path needs check=http")
		}
		if err := checkPathValid(c.Path); err != nil {
			return err
		}
	}
	if c.Interval < 0 || c.Timeout < 0 || c.Rise < 0 || c.Fall < 0 || c.Rise > MaxCheckRiseFall || c.Fall > MaxCheckRiseFall {
		return errors.New("negative check interval, timeout, rise or fall, or rise or fall above 100")
	}
	// One check in flight per backend at a time: this bounds the fds checks
	// hold to the backends checked.
	if e := c.Effective(); e.Timeout > e.Interval {
		return fmt.Errorf("check.timeout=%s is longer than check.interval=%s: a check must end before the next one starts",
			FormatDuration(e.Timeout), FormatDuration(e.Interval))
	}
	return nil
}

// writeCheck writes the check options in their canonical order.
func writeCheck(b *strings.Builder, c Check) {
	if c.Kind == CheckNone {
		return
	}
	b.WriteString(" check=" + c.Kind.String())
	if c.Path != "" {
		b.WriteString(" check.path=" + c.Path)
	}
	if c.Port != 0 {
		b.WriteString(" check.port=" + strconv.Itoa(int(c.Port)))
	}
	writeDurOpt(b, "check.interval", c.Interval)
	writeDurOpt(b, "check.timeout", c.Timeout)
	if c.Rise != 0 {
		b.WriteString(" check.rise=" + strconv.Itoa(c.Rise))
	}
	if c.Fall != 0 {
		b.WriteString(" check.fall=" + strconv.Itoa(c.Fall))
	}
}
