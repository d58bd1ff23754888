// Package config reads sluice's YAML configuration file: the daemon's
// settings (loops, busy-poll, log, ctl, metrics, state, store, drain), its pifs and its rule table.
// Every problem found is reported, each as "FILE:LINE: message" through
// rules.Error and rules.ErrorList. It does no I/O beyond reading the file.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"go.yaml.in/yaml/v3"

	"github.com/sluice-proxy/sluice/rules"
)

// Defaults of the settings a file leaves out.
const (
	DefaultLogLevel  = "info"
	DefaultLogFormat = "console"
	DefaultDrain     = 10 * time.Second
)

// Limits of a configuration file.
const (
	MaxFileSize = 16 << 20 // bytes
	MaxLoops    = 1024
	MaxDrain    = 24 * time.Hour
	MaxBusyPoll = time.Second
	MaxPifs     = 256
	// maxSocketPath is the longest path a unix socket address holds
	// (sun_path is 108 bytes with its terminating NUL).
	maxSocketPath = 107
)

// LogLevels and LogFormats are the values log.level and log.format take.
var (
	LogLevels  = []string{"debug", "info", "warn", "error"}
	LogFormats = []string{"console", "json"}
)

// Config is a parsed and validated configuration.
type Config struct {
	File  string // the path as given, for messages
	Loops int    // event loops; 0 = one per CPU
	// BusyPoll is how long a loop polls without sleeping after its last
	// event (engine.Config.BusyPoll); 0, the default: it sleeps at once.
	BusyPoll time.Duration
	Log      Log           //
	Ctl      Ctl           //
	Metrics  Metrics       //
	State    State         //
	Store    Store         //
	Drain    time.Duration // on SIGTERM/SIGINT, how long live sessions may finish
	Pifs     []Pif         // named network namespaces; host is implicit
	Rules    []rules.Entry // the table, each rule with its line
}

// Log sets the daemon's logger.
type Log struct {
	Level  string // one of LogLevels
	Format string // one of LogFormats
}

// Ctl sets the control socket.
type Ctl struct {
	Socket string // "" = DefaultCtlSocket()
}

// State sets where the daemon keeps its committed table and its history
// (package state).
type State struct {
	Dir string // absolute; "" = nothing is kept
}

// Store sets the fleet's source of truth the instance follows (package
// store/etcd). The zero value: none.
type Store struct {
	Etcd *Etcd // nil: no etcd
}

// Etcd is store.etcd: where the fleet's keys are and who this instance is.
// The password is never in the file: PasswordFile names a file holding it,
// else the environment's SLUICE_ETCD_PASSWORD is used (read at start).
type Etcd struct {
	Endpoints    []string      // http:// or https:// URLs, at least one
	Prefix       string        // "/sluice/NAME": absolute, no trailing slash
	Instance     string        // "": the host name
	CA           string        // absolute paths of the TLS client settings; "" = none
	Cert, Key    string        // both or neither
	User         string        // "": no authentication
	PasswordFile string        // absolute; "": $SLUICE_ETCD_PASSWORD
	TTL          time.Duration // the status key's lease; 0 = DefaultStoreTTL
	Line         int           // of the etcd key, for messages
}

// Bounds of store.etcd.
const (
	DefaultStoreTTL = 10 * time.Second
	MinStoreTTL     = 2 * time.Second
	MaxStoreTTL     = 10 * time.Minute
)

// Metrics sets the Prometheus endpoint.
type Metrics struct {
	Listen netip.AddrPort // the zero value: no endpoint
}

// Pif is a named network namespace rules may listen in or target.
type Pif struct {
	Name  string
	Netns string // path of the namespace: /run/netns/NAME, /proc/PID/ns/net
	Line  int
}

// Default returns the configuration of an empty file.
func Default() *Config {
	return &Config{Log: Log{DefaultLogLevel, DefaultLogFormat}, Drain: DefaultDrain}
}

// CtlSocket returns the control socket's path: ctl.socket if the file sets
// it, else DefaultCtlSocket().
func (c *Config) CtlSocket() string {
	if c.Ctl.Socket != "" {
		return c.Ctl.Socket
	}
	return DefaultCtlSocket()
}

// DefaultCtlSocket is $XDG_RUNTIME_DIR/sluice/ctl.sock, else
// /run/sluice/ctl.sock for root, else a per-user directory under the
// temporary directory.
func DefaultCtlSocket() string {
	if d := os.Getenv("XDG_RUNTIME_DIR"); filepath.IsAbs(d) {
		return filepath.Join(d, "sluice", "ctl.sock")
	}
	if os.Geteuid() == 0 {
		return "/run/sluice/ctl.sock"
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("sluice-%d", os.Geteuid()), "ctl.sock")
}

// RuleList returns the table's rules in file order.
func (c *Config) RuleList() []*rules.Rule {
	return rules.RulesOf(c.Rules)
}

// Ports returns the number of listen ports of the table.
func (c *Config) Ports() int {
	return rules.ListenPortCount(c.RuleList())
}

// Load reads and parses the file at path (named as given in messages). A
// file that cannot be read is an error naming the path; a file that does not
// validate returns a rules.ErrorList.
func Load(path string) (*Config, error) {
	src, err := ReadFile(path)
	if err != nil {
		return nil, err
	}
	return Parse(path, src)
}

// ReadFile reads a configuration or rules file of at most MaxFileSize
// bytes. Its errors name the path.
func ReadFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err // *PathError names the file
	}
	defer f.Close()
	src, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	if len(src) > MaxFileSize {
		return nil, fmt.Errorf("%s: larger than %d bytes", path, MaxFileSize)
	}
	return src, nil
}

// Parse reads a configuration. file is the name used in messages. It
// returns the configuration, or a rules.ErrorList with every problem found,
// in line order.
func Parse(file string, src []byte) (*Config, error) {
	p := &parser{file: file}
	c := Default()
	c.File = file
	if len(src) > MaxFileSize {
		p.errs = append(p.errs, &rules.Error{File: file, Line: 1, Msg: fmt.Sprintf("file is larger than %d bytes", MaxFileSize)})
		return nil, p.errs
	}
	// YAML's line breaks are "\r\n", "\r" and "\n"; make them all "\n" so
	// that every line count here agrees with the parser's.
	src = bytes.ReplaceAll(bytes.ReplaceAll(src, []byte("\r\n"), []byte("\n")), []byte("\r"), []byte("\n"))
	if line, msg := badBytes(src); msg != "" {
		p.errs = append(p.errs, &rules.Error{File: file, Line: line, Msg: msg})
		return nil, p.errs
	}
	root, err := decode(src)
	if err != nil {
		line, msg := syntaxError(src, err)
		p.errs = append(p.errs, &rules.Error{File: file, Line: line, Msg: msg})
		return nil, p.errs
	}
	if root != nil && !isNull(root) { // "---" alone is an empty document
		p.top(c, root)
	}
	if len(p.errs) > 0 {
		slices.SortStableFunc(p.errs, func(a, b *rules.Error) int { return a.Line - b.Line })
		return nil, p.errs
	}
	return c, nil
}

// decode parses src as one YAML document and returns its root node, nil
// for a document with no content.
func decode(src []byte) (*yaml.Node, error) {
	dec := yaml.NewDecoder(bytes.NewReader(src))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, nil
		}
		return nil, err
	}
	var next yaml.Node
	switch err := dec.Decode(&next); {
	case errors.Is(err, io.EOF):
	case err != nil:
		return nil, err
	default:
		return nil, &secondDocError{line: next.Line}
	}
	if doc.Kind != yaml.DocumentNode || len(doc.Content) == 0 {
		return nil, nil
	}
	return doc.Content[0], nil
}

type secondDocError struct{ line int }

func (e *secondDocError) Error() string {
	return "a second YAML document: a configuration is one document"
}

// syntaxError turns a YAML parser error into a line and a message. The
// parser leaves the line out when it is the first one.
func syntaxError(src []byte, err error) (int, string) {
	var second *secondDocError
	if errors.As(err, &second) {
		line := second.line
		// The node's line is that of its content; the separator is before it.
		for l := line; l >= 1; l-- {
			if strings.HasPrefix(lineText(src, l), "---") {
				line = l
				break
			}
		}
		return max(line, 1), err.Error()
	}
	msg := strings.TrimPrefix(err.Error(), "yaml: ")
	if rest, ok := strings.CutPrefix(msg, "line "); ok {
		if num, text, ok := strings.Cut(rest, ": "); ok {
			if n, err := strconv.Atoi(num); err == nil {
				return n, "YAML: " + text
			}
		}
	}
	if name, ok := strings.CutPrefix(msg, "unknown anchor '"); ok {
		name, _, _ = strings.Cut(name, "'")
		if line := findLine(src, "*"+name); line > 0 {
			return line, "YAML: " + msg
		}
	}
	return 1, "YAML: " + msg
}

// lineText returns line n (1-based) of src.
func lineText(src []byte, n int) string {
	for i, l := range strings.Split(string(src), "\n") {
		if i+1 == n {
			return l
		}
	}
	return ""
}

// findLine returns the first line holding s, or 0.
func findLine(src []byte, s string) int {
	i := bytes.Index(src, []byte(s))
	if i < 0 {
		return 0
	}
	return bytes.Count(src[:i], []byte("\n")) + 1
}

// badBytes finds what the YAML parser rejects without saying where:
// invalid UTF-8 and control characters. It returns their line and a message.
func badBytes(src []byte) (int, string) {
	line := 1
	for i := 0; i < len(src); {
		r, size := utf8.DecodeRune(src[i:])
		switch {
		case r == utf8.RuneError && size <= 1:
			return line, fmt.Sprintf("byte 0x%02x is not valid UTF-8", src[i])
		case r == '\n':
			line++
		case r == '\t':
		case r < 0x20 || r == 0x7f || r >= 0x80 && r < 0xa0 || r == 0xfeff && i > 0 || r == 0xfffe || r == 0xffff:
			return line, fmt.Sprintf("control character %U is not allowed", r)
		case r == 0x2028 || r == 0x2029:
			// YAML counts them as line breaks and most editors do not: every
			// line number after one would be off.
			return line, fmt.Sprintf("line separator %U is not allowed", r)
		}
		i += size
	}
	return 0, ""
}

// parser walks the YAML tree and collects every error.
type parser struct {
	file string
	errs rules.ErrorList
}

func (p *parser) errorf(n *yaml.Node, format string, a ...any) {
	p.errorAt(n.Line, format, a...)
}

func (p *parser) errorAt(line int, format string, a ...any) {
	p.errs = append(p.errs, &rules.Error{File: p.file, Line: max(line, 1), Msg: fmt.Sprintf(format, a...)})
}

// field is one key of a mapping and what to do with its value.
type field struct {
	key string
	set func(v *yaml.Node)
}

// resolve follows an alias to the node it names.
func resolve(n *yaml.Node) *yaml.Node {
	if n.Kind == yaml.AliasNode && n.Alias != nil {
		return n.Alias
	}
	return n
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}

// describe names what a node is, for "want X, got Y" messages.
func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a sequence"
	case yaml.ScalarNode:
		if isNull(n) {
			return "nothing"
		}
		return quoteShort(n.Value)
	}
	return "something else"
}

// quoteShort quotes s, cut to its first line and at most 60 bytes.
func quoteShort(s string) string {
	line, _, multi := strings.Cut(s, "\n")
	if len(line) > 60 {
		line, multi = strings.ToValidUTF8(line[:60], ""), true
	}
	if multi {
		return strconv.Quote(line) + "..."
	}
	return strconv.Quote(line)
}

// mapping reads a mapping node whose keys are fields. A key given twice or
// not among fields is an error; a null value is a key left out. where names
// the mapping in messages ("" for the top level).
func (p *parser) mapping(n *yaml.Node, where string, fields []field) {
	n = resolve(n)
	keys := make([]string, len(fields))
	for i, f := range fields {
		keys[i] = f.key
	}
	if n.Kind != yaml.MappingNode {
		if where == "" {
			p.errorf(n, "want a mapping of %s, got %s", strings.Join(keys, ", "), describe(n))
		} else {
			p.errorf(n, "%s: want a mapping of %s, got %s", where, strings.Join(keys, ", "), describe(n))
		}
		return
	}
	prefix := ""
	if where != "" {
		prefix = where + ": "
	}
	seen := map[string]int{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := resolve(n.Content[i]), resolve(n.Content[i+1])
		if k.Kind != yaml.ScalarNode {
			p.errorf(k, "%swant a plain word as a key, got %s", prefix, describe(k))
			continue
		}
		if first, dup := seen[k.Value]; dup {
			p.errorf(k, "%skey %q given twice (first at line %d)", prefix, k.Value, first)
			continue
		}
		seen[k.Value] = k.Line
		j := slices.Index(keys, k.Value)
		if j < 0 {
			p.errorf(k, "%sunknown key %q: want %s", prefix, k.Value, orList(keys))
			continue
		}
		if isNull(v) {
			continue
		}
		fields[j].set(v)
	}
}

// orList writes "a", "a or b", "a, b or c".
func orList(words []string) string {
	if len(words) < 2 {
		return strings.Join(words, "")
	}
	return strings.Join(words[:len(words)-1], ", ") + " or " + words[len(words)-1]
}

// scalar returns the text of a scalar node, or reports what the node is.
func (p *parser) scalar(n *yaml.Node, name, want string) (string, bool) {
	if n.Kind != yaml.ScalarNode {
		p.errorf(n, "%s: want %s, got %s", name, want, describe(n))
		return "", false
	}
	return n.Value, true
}

// sequence returns the items of a sequence node, or reports what it is.
func (p *parser) sequence(n *yaml.Node, name, want string) ([]*yaml.Node, bool) {
	n = resolve(n)
	if n.Kind != yaml.SequenceNode {
		p.errorf(n, "%s: want %s, got %s", name, want, describe(n))
		return nil, false
	}
	return n.Content, true
}

// choice reads a scalar that must be one of words.
func (p *parser) choice(n *yaml.Node, name string, words []string, dst *string) {
	want := orList(words)
	s, ok := p.scalar(n, name, want)
	if !ok {
		return
	}
	if !slices.Contains(words, s) {
		p.errorf(n, "%s: want %s, got %q", name, want, s)
		return
	}
	*dst = s
}

// absPath reads a scalar that must be an absolute path.
func (p *parser) absPath(n *yaml.Node, name string) (string, bool) {
	s, ok := p.scalar(n, name, "an absolute path")
	if !ok {
		return "", false
	}
	if !filepath.IsAbs(s) {
		p.errorf(n, "%s: want an absolute path, got %q", name, s)
		return "", false
	}
	return s, true
}

func (p *parser) top(c *Config, root *yaml.Node) {
	var pifs, rulesNode *yaml.Node
	p.mapping(root, "", []field{
		{"loops", func(v *yaml.Node) { p.loops(c, v) }},
		{"busy-poll", func(v *yaml.Node) { p.busyPoll(c, v) }},
		{"log", func(v *yaml.Node) {
			p.mapping(v, "log", []field{
				{"level", func(v *yaml.Node) { p.choice(v, "log.level", LogLevels, &c.Log.Level) }},
				{"format", func(v *yaml.Node) { p.choice(v, "log.format", LogFormats, &c.Log.Format) }},
			})
		}},
		{"ctl", func(v *yaml.Node) {
			p.mapping(v, "ctl", []field{{"socket", func(v *yaml.Node) { p.ctlSocket(c, v) }}})
		}},
		{"metrics", func(v *yaml.Node) { p.metrics(c, v) }},
		{"state", func(v *yaml.Node) {
			p.mapping(v, "state", []field{{"dir", func(v *yaml.Node) {
				if s, ok := p.absPath(v, "state.dir"); ok {
					c.State.Dir = s
				}
			}}})
		}},
		{"store", func(v *yaml.Node) {
			p.mapping(v, "store", []field{{"etcd", func(v *yaml.Node) { p.etcd(c, v) }}})
		}},
		{"drain", func(v *yaml.Node) { p.drain(c, v) }},
		{"pifs", func(v *yaml.Node) { pifs = v }},
		{"rules", func(v *yaml.Node) { rulesNode = v }},
	})
	if pifs != nil {
		p.pifs(c, pifs)
	}
	if rulesNode != nil {
		p.rules(c, rulesNode)
	}
}

func (p *parser) loops(c *Config, v *yaml.Node) {
	want := fmt.Sprintf("a whole number from 0 (one per CPU) to %d", MaxLoops)
	s, ok := p.scalar(v, "loops", want)
	if !ok {
		return
	}
	var n int
	if v.ShortTag() != "!!int" || v.Decode(&n) != nil || n < 0 || n > MaxLoops {
		p.errorf(v, "loops: want %s, got %q", want, s)
		return
	}
	c.Loops = n
}

func (p *parser) ctlSocket(c *Config, v *yaml.Node) {
	s, ok := p.absPath(v, "ctl.socket")
	if !ok {
		return
	}
	if len(s) > maxSocketPath {
		p.errorf(v, "ctl.socket: path is %d bytes long, a unix socket path has at most %d", len(s), maxSocketPath)
		return
	}
	c.Ctl.Socket = s
}

func (p *parser) metrics(c *Config, v *yaml.Node) {
	var listen *yaml.Node
	p.mapping(v, "metrics", []field{{"listen", func(v *yaml.Node) { listen = v }}})
	if resolve(v).Kind != yaml.MappingNode {
		return
	}
	if listen == nil {
		p.errorf(v, "metrics: no listen address (metrics: {listen: 127.0.0.1:9901}); leave metrics out for no endpoint")
		return
	}
	const want = "IP:PORT such as 127.0.0.1:9901 or [::1]:9901"
	s, ok := p.scalar(listen, "metrics.listen", want)
	if !ok {
		return
	}
	ap, err := netip.ParseAddrPort(s)
	if err != nil || ap.Addr().Zone() != "" {
		p.errorf(listen, "metrics.listen: want %s, got %q", want, s)
		return
	}
	c.Metrics.Listen = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

func (p *parser) etcd(c *Config, v *yaml.Node) {
	e := &Etcd{Line: v.Line}
	var endpoints, prefix *yaml.Node
	path := func(name string, dst *string) field {
		return field{name, func(v *yaml.Node) {
			if s, ok := p.absPath(v, "store.etcd."+name); ok {
				*dst = s
			}
		}}
	}
	word := func(name string, dst *string) field {
		return field{name, func(v *yaml.Node) {
			if s, ok := p.scalar(v, "store.etcd."+name, "a name"); ok {
				if s == "" || strings.ContainsAny(s, " \t\n/") || !utf8.ValidString(s) {
					p.errorf(v, "store.etcd.%s: want a name without blanks or /, got %q", name, s)
					return
				}
				*dst = s
			}
		}}
	}
	p.mapping(v, "store.etcd", []field{
		{"endpoints", func(v *yaml.Node) { endpoints = v }},
		{"prefix", func(v *yaml.Node) { prefix = v }},
		word("instance", &e.Instance),
		path("ca", &e.CA), path("cert", &e.Cert), path("key", &e.Key),
		word("user", &e.User),
		path("password-file", &e.PasswordFile),
		{"password", func(v *yaml.Node) {
			p.errorf(v, "store.etcd.password: the password is never in the file: give password-file: PATH, or set SLUICE_ETCD_PASSWORD")
		}},
		{"ttl", func(v *yaml.Node) {
			want := "a duration from " + rules.FormatDuration(MinStoreTTL) + " to " + rules.FormatDuration(MaxStoreTTL)
			s, ok := p.scalar(v, "store.etcd.ttl", want)
			if !ok {
				return
			}
			d, err := time.ParseDuration(s)
			if err != nil || d < MinStoreTTL || d > MaxStoreTTL || d%time.Second != 0 {
				p.errorf(v, "store.etcd.ttl: want %s in whole seconds, got %q", want, s)
				return
			}
			e.TTL = d
		}},
	})
	if resolve(v).Kind != yaml.MappingNode {
		return
	}
	bad := false
	if endpoints == nil {
		p.errorf(v, "store.etcd: no endpoints (endpoints: [http://127.0.0.1:2379])")
		bad = true
	} else if items, ok := p.sequence(endpoints, "store.etcd.endpoints", "a sequence of URLs"); ok {
		for _, it := range items {
			s, ok := p.scalar(it, "store.etcd.endpoints", "a URL")
			if !ok {
				bad = true
				continue
			}
			if !(strings.HasPrefix(s, "http://") || strings.HasPrefix(s, "https://")) || len(s) < len("http://x") {
				p.errorf(it, "store.etcd.endpoints: want http://HOST:PORT or https://HOST:PORT, got %q", s)
				bad = true
				continue
			}
			e.Endpoints = append(e.Endpoints, s)
		}
		if len(items) == 0 {
			p.errorf(endpoints, "store.etcd.endpoints: want at least one URL")
			bad = true
		}
	} else {
		bad = true
	}
	if prefix == nil {
		p.errorf(v, "store.etcd: no prefix (prefix: /sluice/NAME)")
		bad = true
	} else if s, ok := p.scalar(prefix, "store.etcd.prefix", "a key prefix such as /sluice/NAME"); ok {
		if !strings.HasPrefix(s, "/") || strings.HasSuffix(s, "/") || len(s) < 2 || strings.ContainsAny(s, " \t\n") || !utf8.ValidString(s) {
			p.errorf(prefix, "store.etcd.prefix: want a key prefix such as /sluice/NAME (starting with /, not ending with one, no blanks), got %q", s)
			bad = true
		}
		e.Prefix = s
	} else {
		bad = true
	}
	if (e.Cert == "") != (e.Key == "") {
		p.errorf(v, "store.etcd: cert and key go together: give both or neither")
		bad = true
	}
	if e.PasswordFile != "" && e.User == "" {
		p.errorf(v, "store.etcd: password-file without user")
		bad = true
	}
	if !bad {
		c.Store.Etcd = e
	}
}

// duration sets *dst from v, a Go duration from 0s to max; want says what
// the key takes (in its error).
func (p *parser) duration(v *yaml.Node, key, want string, max time.Duration, dst *time.Duration) {
	s, ok := p.scalar(v, key, want)
	if !ok {
		return
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 || d > max {
		p.errorf(v, "%s: want %s, got %q", key, want, s)
		return
	}
	*dst = d
}

func (p *parser) busyPoll(c *Config, v *yaml.Node) {
	p.duration(v, "busy-poll", "a duration from 0s (off) to "+rules.FormatDuration(MaxBusyPoll)+" such as 200us", MaxBusyPoll, &c.BusyPoll)
}

func (p *parser) drain(c *Config, v *yaml.Node) {
	p.duration(v, "drain", "a duration from 0s to "+rules.FormatDuration(MaxDrain)+" such as 10s", MaxDrain, &c.Drain)
}

func (p *parser) pifs(c *Config, v *yaml.Node) {
	items, ok := p.sequence(v, "pifs", "a sequence of {name: NAME, netns: PATH}")
	if !ok {
		return
	}
	first := map[string]int{}
	for _, item := range items {
		item = resolve(item)
		if item.Kind != yaml.MappingNode {
			p.errorf(item, "pifs: want {name: NAME, netns: PATH}, got %s", describe(item))
			continue
		}
		pif := Pif{Line: item.Line}
		var nameNode, netnsNode *yaml.Node
		p.mapping(item, "pif", []field{
			{"name", func(v *yaml.Node) { nameNode = v }},
			{"netns", func(v *yaml.Node) { netnsNode = v }},
		})
		if nameNode == nil {
			p.errorf(item, "pif: no name (name: NAME)")
			continue
		}
		name, ok := p.scalar(nameNode, "pif name", "a name")
		if !ok {
			continue
		}
		if err := rules.CheckPifName(name); err != nil {
			p.errorf(nameNode, "%s", err)
			continue
		}
		if line, dup := first[name]; dup {
			p.errorf(nameNode, "pif %q is declared twice (first at line %d)", name, line)
			continue
		}
		first[name] = nameNode.Line
		pif.Name = name
		if netnsNode == nil {
			p.errorf(item, "pif %q: no netns (netns: /run/netns/NAME or /proc/PID/ns/net)", name)
			continue
		}
		if pif.Netns, ok = p.absPath(netnsNode, fmt.Sprintf("pif %q: netns", name)); !ok {
			continue
		}
		if len(c.Pifs) == MaxPifs {
			p.errorf(item, "more than %d pifs", MaxPifs)
			return
		}
		c.Pifs = append(c.Pifs, pif)
	}
}

func (p *parser) rules(c *Config, v *yaml.Node) {
	items, ok := p.sequence(v, "rules", "a sequence of rule lines")
	if !ok {
		return
	}
	declared := map[string]bool{}
	for _, pif := range c.Pifs {
		declared[pif.Name] = true
	}
	var entries []rules.Entry
	for _, item := range items {
		line := item.Line // an alias's own line, not its anchor's
		item = resolve(item)
		if item.Kind != yaml.ScalarNode || isNull(item) {
			// "- tcp ... -> ... opt: x" is a mapping; say so.
			p.errorAt(line, "rules: want a rule line (PROTO LISTEN [-> TARGET] [OPTION...]), got %s", describe(item))
			continue
		}
		r, err := rules.Parse(item.Value)
		if err != nil {
			for _, e := range rules.Errors(err) { // each problem of the line on a line of its own
				p.errorAt(line, "%s", e.Error())
			}
			continue
		}
		bad := false
		for _, name := range []string{r.ListenPif, r.TargetPif} {
			if name != "" && !declared[name] {
				p.errorAt(line, "unknown pif %q", name)
				bad = true
				if r.ListenPif == r.TargetPif {
					break
				}
			}
		}
		if !bad {
			entries = append(entries, rules.Entry{Rule: r, Line: line})
		}
	}
	p.errs = append(p.errs, rules.CheckEntries(p.file, entries)...)
	c.Rules = entries
}
