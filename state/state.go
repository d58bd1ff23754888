// Package state keeps the daemon's committed table on disk, so that nothing
// committed is forgotten at a restart: DIR/table.rules, the table as
// canonical rule lines under a header, rewritten atomically at every commit,
// and DIR/history.jsonl, one JSON line per commit, the last MaxHistory kept.
// It also makes the start-up decision (Decide) between the saved table and
// the configuration file's.
//
// table.rules is a rules file (its header lines are comments), so `sluice
// check -r DIR/table.rules` reads it too:
//
//	# sluice state v1
//	# generation: 7
//	# time: 2024-05-01T10:00:00.123456789Z
//	# who: uid=0 pid=4242 name="sluice-ctl"
//	# config-rules: sha256:3b1f…
//	# rules: 2
//	tcp 0.0.0.0:8080 -> 127.0.0.1:80
//	tcp 0.0.0.0:8443 -> 127.0.0.1:443 weak
//
// Invariant: a crash at any instant leaves table.rules whole, the old one or
// the new one (Dir.Commit: temporary file, fsync, rename, fsync of the
// directory). history.jsonl is appended after the table is written: a crash
// between the two loses that commit's history line, never the table.
package state

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/sluice-proxy/sluice/rules"
)

// File names inside the state directory.
const (
	TableFile   = "table.rules"
	PrevFile    = "table.rules.prev" // the saved table the configuration file won over
	HistoryFile = "history.jsonl"
	magic       = "# sluice state v1"
)

// MaxHistory is how many commits history.jsonl keeps. The file is trimmed
// back to MaxHistory lines once it holds historySlack more, so a commit
// rarely rewrites it.
const (
	MaxHistory   = 1000
	historySlack = 100
)

// MaxTableSize bounds table.rules: a table of rules.MaxRules lines of
// rules.MaxLineLen bytes, and its header.
const MaxTableSize = rules.MaxRules*(rules.MaxLineLen+1) + 4096

// Who made a commit: the control client's peer credentials and the name it
// gave in its hello, or the daemon itself (its own uid and pid, and a name
// such as "start" or "reload").
type Who struct {
	UID  uint32 `json:"uid"`
	PID  int32  `json:"pid"`
	Name string `json:"name"`
}

func (w Who) String() string {
	return fmt.Sprintf("uid=%d pid=%d name=%s", w.UID, w.PID, strconv.Quote(w.Name))
}

// Self is the daemon as the author of a commit: its own uid and pid.
func Self(name string) Who {
	return Who{UID: uint32(os.Getuid()), PID: int32(os.Getpid()), Name: name}
}

// Header is what table.rules says about its table.
type Header struct {
	Generation uint64
	Time       time.Time
	Who        Who
	Digest     string // of the configuration's rules the table grew from (Digest)
}

// Table is a saved table: its header and its canonical lines.
type Table struct {
	Header
	Lines []string
}

// Rules parses the table's lines.
func (t *Table) Rules() ([]*rules.Rule, error) {
	rs := make([]*rules.Rule, len(t.Lines))
	for i, l := range t.Lines {
		r, err := rules.Parse(l)
		if err != nil {
			return nil, fmt.Errorf("rule %d %q: %w", i+1, l, err)
		}
		rs[i] = r
	}
	return rs, nil
}

// Lines returns the canonical lines of rs.
func Lines(rs []*rules.Rule) []string {
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = r.String()
	}
	return out
}

// Digest identifies a configuration's rules: "sha256:" and the hex SHA-256
// of their canonical lines, each ended by a newline. Reformatting the file
// (comments, spacing, option order) does not change it; changing a rule
// does.
func Digest(rs []*rules.Rule) string {
	h := sha256.New()
	for _, r := range rs {
		io.WriteString(h, r.String())
		h.Write([]byte{'\n'})
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}

// Format writes t as table.rules holds it.
func Format(t *Table) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s\n# generation: %d\n# time: %s\n# who: %s\n# config-rules: %s\n# rules: %d\n",
		magic, t.Generation, t.Time.UTC().Format(time.RFC3339Nano), t.Who, t.Digest, len(t.Lines))
	for _, l := range t.Lines {
		b.WriteString(l)
		b.WriteByte('\n')
	}
	return b.Bytes()
}

// Parse reads table.rules. Every header field must be there, in order, and
// the rule count must match the lines that follow, each of which must parse
// as a rule: a file that is not exactly what Format writes is an error.
func Parse(src []byte) (*Table, error) {
	if len(src) > MaxTableSize {
		return nil, fmt.Errorf("larger than %d bytes", MaxTableSize)
	}
	if len(src) == 0 || src[len(src)-1] != '\n' {
		return nil, errors.New("not ended by a newline: cut short")
	}
	lines := strings.Split(string(src[:len(src)-1]), "\n")
	if lines[0] != magic {
		return nil, fmt.Errorf("line 1: want %q", magic)
	}
	const nHead = 6
	if len(lines) < nHead {
		return nil, fmt.Errorf("the header has %d of its %d lines", len(lines), nHead)
	}
	field := func(i int, name string) (string, error) {
		v, ok := strings.CutPrefix(lines[i], "# "+name+": ")
		if !ok {
			return "", fmt.Errorf("line %d: want %q", i+1, "# "+name+": …")
		}
		return v, nil
	}
	t := &Table{}
	var err error
	var v string
	if v, err = field(1, "generation"); err != nil {
		return nil, err
	}
	if t.Generation, err = strconv.ParseUint(v, 10, 64); err != nil {
		return nil, fmt.Errorf("line 2: generation %q: want a whole number", v)
	}
	if v, err = field(2, "time"); err != nil {
		return nil, err
	}
	if t.Time, err = time.Parse(time.RFC3339Nano, v); err != nil {
		return nil, fmt.Errorf("line 3: time %q: %w", v, err)
	}
	if v, err = field(3, "who"); err != nil {
		return nil, err
	}
	if t.Who, err = parseWho(v); err != nil {
		return nil, fmt.Errorf("line 4: who: %w", err)
	}
	if t.Digest, err = field(4, "config-rules"); err != nil {
		return nil, err
	}
	if !validDigest(t.Digest) {
		return nil, fmt.Errorf("line 5: config-rules %q: want sha256: and 64 hex digits", t.Digest)
	}
	if v, err = field(5, "rules"); err != nil {
		return nil, err
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 || n > rules.MaxRules {
		return nil, fmt.Errorf("line 6: rules %q: want 0 to %d", v, rules.MaxRules)
	}
	body := lines[nHead:]
	if len(body) != n {
		return nil, fmt.Errorf("the header counts %d rules, the file has %d lines after it", n, len(body))
	}
	for i, l := range body {
		if _, err := rules.Parse(l); err != nil {
			return nil, fmt.Errorf("line %d: %w", nHead+i+1, err)
		}
	}
	t.Lines = body
	return t, nil
}

func validDigest(s string) bool {
	h, ok := strings.CutPrefix(s, "sha256:")
	if !ok || len(h) != 64 {
		return false
	}
	_, err := hex.DecodeString(h)
	return err == nil
}

// parseWho reads what Who.String writes: uid=N pid=N name="…".
func parseWho(s string) (Who, error) {
	var w Who
	u, rest, ok := strings.Cut(s, " ")
	p, name, ok2 := strings.Cut(rest, " ")
	if !ok || !ok2 {
		return w, fmt.Errorf("%q: want uid=N pid=N name=\"…\"", s)
	}
	uv, ok := strings.CutPrefix(u, "uid=")
	pv, ok2 := strings.CutPrefix(p, "pid=")
	nv, ok3 := strings.CutPrefix(name, "name=")
	if !ok || !ok2 || !ok3 {
		return w, fmt.Errorf("%q: want uid=N pid=N name=\"…\"", s)
	}
	uid, err := strconv.ParseUint(uv, 10, 32)
	if err != nil {
		return w, fmt.Errorf("uid %q: %w", uv, err)
	}
	pid, err := strconv.ParseInt(pv, 10, 32)
	if err != nil {
		return w, fmt.Errorf("pid %q: %w", pv, err)
	}
	n, err := strconv.Unquote(nv)
	if err != nil {
		return w, fmt.Errorf("name %s: not a quoted string", nv)
	}
	return Who{UID: uint32(uid), PID: int32(pid), Name: n}, nil
}

// Dir is an open state directory. Its methods are safe for concurrent use
// (a commit is written whole before the next starts).
type Dir struct {
	path string

	mu      sync.Mutex
	history int // lines in history.jsonl
}

// Open opens the state directory at path, creating it (owner-only) if it
// does not exist, and checks that a file can be made in it (a daemon that
// could not save its commits would find out only after its start). A
// history.jsonl cut short by a crash (no final newline) is cut back to its
// last whole line.
func Open(path string) (*Dir, error) {
	if err := os.MkdirAll(path, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	f, err := os.CreateTemp(path, ".probe.tmp*")
	if err != nil {
		return nil, fmt.Errorf("state dir %s: not writable: %w", path, err)
	}
	f.Close()
	os.Remove(f.Name())
	d := &Dir{path: path}
	n, err := d.repairHistory()
	if err != nil {
		return nil, err
	}
	d.history = n
	return d, nil
}

// Path is the directory's path.
func (d *Dir) Path() string { return d.path }

// TablePath is the path of table.rules.
func (d *Dir) TablePath() string { return filepath.Join(d.path, TableFile) }

// Load reads the saved table. It returns nil and no error when there is
// none; a file that cannot be read or parsed is an error naming its path.
func (d *Dir) Load() (*Table, error) {
	p := d.TablePath()
	f, err := os.Open(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	src, err := io.ReadAll(io.LimitReader(f, MaxTableSize+1))
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", p, err)
	}
	t, err := Parse(src)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", p, err)
	}
	return t, nil
}

// KeepPrev renames table.rules to table.rules.prev (replacing an older
// one), durably: for a file that does not parse, kept as it was.
func (d *Dir) KeepPrev() error {
	if err := os.Rename(d.TablePath(), filepath.Join(d.path, PrevFile)); err != nil {
		return fmt.Errorf("keeping the saved table: %w", err)
	}
	return syncDir(d.path)
}

// SavePrev writes t as table.rules.prev, atomically: the saved table kept
// when the configuration's rules win over it. table.rules stays until the
// next Commit replaces it, so a crash in between loses nothing.
func (d *Dir) SavePrev(t *Table) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return writeAtomic(d.path, PrevFile, Format(t))
}

// Commit records a commit: t becomes table.rules (atomically: see the
// package comment), then its history line is appended, with the changes
// from the table old (canonical lines) to t's.
func (d *Dir) Commit(t *Table, old []string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := writeAtomic(d.path, TableFile, Format(t)); err != nil {
		return err
	}
	e := Entry{Generation: t.Generation, Time: t.Time.UTC(), Who: t.Who, Changes: DiffLines(old, t.Lines)}
	return d.appendHistory(e)
}

// writeAtomic replaces dir/name by data: a temporary file in dir, written
// and fsynced, renamed over name, then dir fsynced so the rename is on
// disk too.
func writeAtomic(dir, name string, data []byte) error {
	f, err := os.CreateTemp(dir, "."+name+".tmp*")
	if err != nil {
		return fmt.Errorf("state: %w", err)
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("state: writing %s: %w", tmp, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("state: fsync %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("state: closing %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		return fmt.Errorf("state: %w", err)
	}
	ok = true
	return syncDir(dir)
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("state: %w", err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("state: fsync of %s: %w", dir, err)
	}
	return nil
}

// Decision is the start-up's choice between the saved table and the
// configuration file's rules.
type Decision uint8

const (
	First    Decision = iota + 1 // no saved table: the file's rules, generation 1
	Resume                       // the saved table, its generation: the file's rules are still the ones it grew from
	FileWins                     // the file's rules changed since: they win, the saved table is kept as table.rules.prev
	Fresh                        // --fresh: the file's rules, the generation continues
	decisionEnd
)

var decisionText = [...]string{"", "first", "resume", "file-wins", "fresh"}

func (d Decision) String() string {
	if d > 0 && d < decisionEnd {
		return decisionText[d]
	}
	return "decision-" + strconv.Itoa(int(d))
}

// Decide chooses, from the saved table (nil: none), the digest of the
// configuration's rules and --fresh, what the daemon starts with.
func Decide(saved *Table, digest string, fresh bool) Decision {
	switch {
	case saved == nil:
		return First
	case fresh:
		return Fresh
	case saved.Digest == digest:
		return Resume
	}
	return FileWins
}

// openHistory reads history.jsonl's bytes; none is no error.
func (d *Dir) readHistory() ([]byte, error) {
	b, err := os.ReadFile(filepath.Join(d.path, HistoryFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	return b, err
}

// repairHistory cuts a last line left without its newline and returns the
// number of lines.
func (d *Dir) repairHistory() (int, error) {
	b, err := d.readHistory()
	if err != nil {
		return 0, fmt.Errorf("state: %w", err)
	}
	if len(b) > 0 && b[len(b)-1] != '\n' {
		cut := bytes.LastIndexByte(b, '\n') + 1
		if err := os.Truncate(filepath.Join(d.path, HistoryFile), int64(cut)); err != nil {
			return 0, fmt.Errorf("state: cutting a torn history line: %w", err)
		}
		b = b[:cut]
	}
	return bytes.Count(b, []byte{'\n'}), nil
}

// appendHistory appends e as one line (one write, then fsync), and trims
// the file to the last MaxHistory lines once it holds historySlack more.
func (d *Dir) appendHistory(e Entry) error {
	line, err := e.Marshal()
	if err != nil {
		return err
	}
	p := filepath.Join(d.path, HistoryFile)
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("state: %w", err)
	}
	_, err = f.Write(line)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("state: appending to %s: %w", p, err)
	}
	d.history++
	if d.history < MaxHistory+historySlack {
		return nil
	}
	b, err := d.readHistory()
	if err != nil {
		return fmt.Errorf("state: %w", err)
	}
	lines := bytes.SplitAfter(b, []byte{'\n'})
	if n := len(lines); n > 0 && len(lines[n-1]) == 0 {
		lines = lines[:n-1]
	}
	if len(lines) > MaxHistory {
		lines = lines[len(lines)-MaxHistory:]
	}
	if err := writeAtomic(d.path, HistoryFile, bytes.Join(lines, nil)); err != nil {
		return err
	}
	d.history = len(lines)
	return nil
}

// History returns the last n commits (n <= 0: all kept), oldest first, and
// how many lines could not be read (skipped).
func (d *Dir) History(n int) ([]Entry, int, error) {
	d.mu.Lock()
	b, err := d.readHistory()
	d.mu.Unlock()
	if err != nil {
		return nil, 0, fmt.Errorf("state: %w", err)
	}
	var out []Entry
	bad := 0
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(nil, maxEntry+1)
	for sc.Scan() {
		e, err := ParseEntry(sc.Bytes())
		if err != nil {
			bad++
			continue
		}
		out = append(out, *e)
	}
	if err := sc.Err(); err != nil {
		return nil, bad, fmt.Errorf("state: reading %s: %w", HistoryFile, err)
	}
	if n > 0 && len(out) > n {
		out = out[len(out)-n:]
	}
	return out, bad, nil
}

// HistoryLines returns the last n history lines as stored (n <= 0: all),
// each a JSON object without its newline; lines that do not parse are
// left out.
func (d *Dir) HistoryLines(n int) ([]string, error) {
	es, _, err := d.History(n)
	if err != nil {
		return nil, err
	}
	out := make([]string, 0, len(es))
	for i := range es {
		b, err := es[i].Marshal()
		if err != nil {
			return nil, err
		}
		out = append(out, string(bytes.TrimSuffix(b, []byte{'\n'})))
	}
	return out, nil
}
