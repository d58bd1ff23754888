package rules

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// TLSVersion is the lowest TLS version a terminating rule accepts
// (tls.min). The zero value is the default, TLS 1.2.
type TLSVersion uint8

const (
	TLSMin12 TLSVersion = 0 // the default
	TLSMin13 TLSVersion = 1
)

func (v TLSVersion) String() string {
	switch v {
	case TLSMin12:
		return "1.2"
	case TLSMin13:
		return "1.3"
	}
	return "tls-" + strconv.Itoa(int(v))
}

// TLSBackend says whether, and how, the backend connection is TLS
// (tls.backend). The zero value is plain.
type TLSBackend uint8

const (
	TLSBackendOff    TLSBackend = 0
	TLSBackendOn     TLSBackend = 1 // encrypted, the certificate not checked (labs, tests)
	TLSBackendVerify TLSBackend = 2 // checked against tls.backend-ca (or the system roots) for tls.backend-name
)

func (b TLSBackend) String() string {
	switch b {
	case TLSBackendOff:
		return "off"
	case TLSBackendOn:
		return "on"
	case TLSBackendVerify:
		return "verify"
	}
	return "tls-backend-" + strconv.Itoa(int(b))
}

// MaxTLSPathLen bounds a file name of a tls.* option.
const MaxTLSPathLen = 4096

// TLS is a rule's TLS options: termination (Cert, with Key, ALPN,
// ClientCA, Min) and origination (Backend, BackendCA, BackendName). The
// zero value is neither. Files are names only: rules does no I/O; they are
// read and checked when a table is loaded (package tlsconf).
type TLS struct {
	Cert     string     // PEM chain (and the key when Key is ""); "": the rule does not terminate
	Key      string     // PEM private key; "": in Cert
	ALPN     []string   // protocols offered when terminating
	ClientCA string     // PEM CAs: client certificates required and verified
	Min      TLSVersion // lowest version accepted

	Backend     TLSBackend
	BackendCA   string // PEM CAs for verify; "": the system roots
	BackendName string // name checked (and sent as SNI); "": the backend's host
}

// Terminates reports whether the rule terminates TLS (tls.cert).
func (r *Rule) Terminates() bool { return r.TLS.Cert != "" }

// TLSFiles returns the files the rule's TLS options name, each with its
// option, in the canonical order: what a load reads.
func (r *Rule) TLSFiles() [][2]string {
	var out [][2]string
	t := &r.TLS
	for _, f := range [...][2]string{{"tls.cert", t.Cert}, {"tls.key", t.Key}, {"tls.client-ca", t.ClientCA}, {"tls.backend-ca", t.BackendCA}} {
		if f[1] != "" {
			out = append(out, f)
		}
	}
	return out
}

// isTLSOption reports whether the option name is a tls.* one.
func isTLSOption(name string) bool { return strings.HasPrefix(name, "tls.") }

// setTLSOption reads a tls.* option into r.TLS.
func (r *Rule) setTLSOption(name, val string, hasVal bool) error {
	if !hasVal || val == "" {
		return fmt.Errorf("option %s needs a value (%s=...)", name, name)
	}
	t := &r.TLS
	path := func(dst *string) error {
		if err := tlsPathValid(name, val); err != nil {
			return err
		}
		*dst = val
		return nil
	}
	switch name {
	case "tls.cert":
		return path(&t.Cert)
	case "tls.key":
		return path(&t.Key)
	case "tls.client-ca":
		return path(&t.ClientCA)
	case "tls.backend-ca":
		return path(&t.BackendCA)
	case "tls.alpn":
		var err error
		if t.ALPN, err = parseALPN(val); err != nil {
			return fmt.Errorf("tls.%w", err)
		}
	case "tls.min":
		switch val {
		case "1.2":
			t.Min = TLSMin12
		case "1.3":
			t.Min = TLSMin13
		default:
			return fmt.Errorf("tls.min=%s: want 1.2 or 1.3", val)
		}
	case "tls.backend":
		switch val {
		case "on":
			t.Backend = TLSBackendOn
		case "verify":
			t.Backend = TLSBackendVerify
		default:
			return fmt.Errorf("tls.backend=%s: want on or verify", val)
		}
	case "tls.backend-name":
		n := strings.TrimSuffix(strings.ToLower(val), ".")
		if !isHostName(n) {
			return fmt.Errorf("tls.backend-name=%s: not a host name", val)
		}
		t.BackendName = n
	default:
		return fmt.Errorf("unknown option %q", name)
	}
	return nil
}

// tlsPathValid says what is wrong with a file name of option opt, or nil:
// it is written in a rule line as is, so it has no blanks, '#' or ',' and
// no control bytes.
func tlsPathValid(opt, p string) error {
	if len(p) > MaxTLSPathLen {
		return fmt.Errorf("%s: a path of %d bytes, at most %d", opt, len(p), MaxTLSPathLen)
	}
	for i := 0; i < len(p); i++ {
		if c := p[i]; c <= ' ' || c == 0x7f || c == '#' || c == '=' {
			return fmt.Errorf("%s=%q: a path without blanks, '#', '=' or control bytes", opt, p)
		}
	}
	return nil
}

// validateTLS checks the tls.* options against the rest of the rule.
func (r *Rule) validateTLS() error {
	t := &r.TLS
	if t.Min > TLSMin13 {
		return fmt.Errorf("unknown tls.min %s", t.Min)
	}
	if t.Backend > TLSBackendVerify {
		return fmt.Errorf("unknown tls.backend %s", t.Backend)
	}
	for _, f := range r.TLSFiles() {
		if err := tlsPathValid(f[0], f[1]); err != nil {
			return err
		}
	}
	if t.Cert == "" {
		switch {
		case t.Key != "":
			return errors.New("tls.key needs tls.cert")
		case len(t.ALPN) > 0:
			return errors.New("tls.alpn needs tls.cert")
		case t.ClientCA != "":
			return errors.New("tls.client-ca needs tls.cert")
		case t.Min != TLSMin12:
			return errors.New("tls.min needs tls.cert")
		}
	}
	if t.Backend == TLSBackendOff && (t.BackendCA != "" || t.BackendName != "") {
		return errors.New("tls.backend-ca and tls.backend-name need tls.backend=on|verify")
	}
	if t.Backend != TLSBackendVerify && t.BackendCA != "" {
		return errors.New("tls.backend-ca needs tls.backend=verify")
	}
	if t.BackendName != "" && !isHostName(t.BackendName) {
		return fmt.Errorf("tls.backend-name %q: not a host name", t.BackendName)
	}
	if len(t.ALPN) > 0 {
		if _, err := parseALPN(strings.Join(t.ALPN, ",")); err != nil {
			return fmt.Errorf("tls.%w", err)
		}
	}
	if !r.TLSZero() {
		if r.Proto != TCP {
			return errors.New("tls.* options are for tcp rules only")
		}
		if len(r.Targets) == 0 {
			return errors.New("tls.* options need a target (\"-> TARGET\")")
		}
	}
	return nil
}

// TLSZero reports whether the rule has no tls.* option.
func (r *Rule) TLSZero() bool {
	t := &r.TLS
	return t.Cert == "" && t.Key == "" && len(t.ALPN) == 0 && t.ClientCA == "" && t.Min == TLSMin12 &&
		t.Backend == TLSBackendOff && t.BackendCA == "" && t.BackendName == ""
}

// writeTLS writes the tls.* options in their canonical order.
func writeTLS(b *strings.Builder, t TLS) {
	opt := func(name, v string) {
		if v != "" {
			b.WriteString(" " + name + "=" + v)
		}
	}
	opt("tls.cert", t.Cert)
	opt("tls.key", t.Key)
	opt("tls.alpn", strings.Join(t.ALPN, ","))
	opt("tls.client-ca", t.ClientCA)
	if t.Min != TLSMin12 {
		opt("tls.min", t.Min.String())
	}
	if t.Backend != TLSBackendOff {
		opt("tls.backend", t.Backend.String())
	}
	opt("tls.backend-ca", t.BackendCA)
	opt("tls.backend-name", t.BackendName)
}
