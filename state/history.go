package state

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
)

// maxEntry bounds one history line: a commit that changes a whole table of
// long lines, twice (removed and added), and its fields.
const maxEntry = 4 << 20

// Entry is one line of history.jsonl: one commit.
type Entry struct {
	Generation uint64    `json:"generation"`
	Time       time.Time `json:"time"`
	Who        Who       `json:"who"`
	Changes
}

// Changes is what a commit changed, line by line. Rules are matched by
// their listen part (protocol, pif, address, ports): a listen part in both
// tables with a different line is changed.
type Changes struct {
	Added   []string `json:"added,omitempty"`
	Removed []string `json:"removed,omitempty"`
	Changed []Change `json:"changed,omitempty"`
}

// Change is one rule whose line changed, its listen part kept.
type Change struct {
	Old string `json:"old"`
	New string `json:"new"`
}

// Empty reports whether nothing changed.
func (c Changes) Empty() bool { return len(c.Added)+len(c.Removed)+len(c.Changed) == 0 }

// Format writes the changes as `sluice ctl diff` prints them: "- line" for
// each removed rule, "~ old" and "  new" for each changed one, "+ line" for
// each added one, each line ended by a newline.
func (c Changes) Format() string {
	var b strings.Builder
	for _, l := range c.Removed {
		b.WriteString("- " + l + "\n")
	}
	for _, ch := range c.Changed {
		b.WriteString("~ " + ch.Old + "\n  " + ch.New + "\n")
	}
	for _, l := range c.Added {
		b.WriteString("+ " + l + "\n")
	}
	return b.String()
}

// listenPart is a canonical line's first two fields: PROTO LISTEN.
func listenPart(line string) string {
	f := strings.Fields(line)
	if len(f) < 2 {
		return line
	}
	return f[0] + " " + f[1]
}

// DiffLines compares two tables of canonical lines: added and changed in
// new's order, removed in old's.
func DiffLines(old, new []string) Changes {
	oldBy := make(map[string]string, len(old))
	for _, l := range old {
		oldBy[listenPart(l)] = l
	}
	var c Changes
	seen := make(map[string]bool, len(new))
	for _, l := range new {
		k := listenPart(l)
		seen[k] = true
		o, ok := oldBy[k]
		switch {
		case !ok:
			c.Added = append(c.Added, l)
		case o != l:
			c.Changed = append(c.Changed, Change{Old: o, New: l})
		}
	}
	for _, l := range old {
		if !seen[listenPart(l)] {
			c.Removed = append(c.Removed, l)
		}
	}
	return c
}

// Marshal writes e as one history line, newline included.
func (e *Entry) Marshal() ([]byte, error) {
	b, err := json.Marshal(e)
	if err != nil {
		return nil, fmt.Errorf("state: history entry: %w", err)
	}
	if len(b) > maxEntry {
		return nil, fmt.Errorf("state: history entry of %d bytes, at most %d", len(b), maxEntry)
	}
	return append(b, '\n'), nil
}

// ParseEntry reads one history line (without its newline). Unknown fields
// are refused, so that a line of another format is not taken for one.
func ParseEntry(line []byte) (*Entry, error) {
	if len(line) > maxEntry {
		return nil, fmt.Errorf("history line of %d bytes, at most %d", len(line), maxEntry)
	}
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	var e Entry
	if err := dec.Decode(&e); err != nil {
		return nil, fmt.Errorf("history line: %w", err)
	}
	if dec.More() {
		return nil, errors.New("history line: more after the object")
	}
	if e.Generation == 0 {
		return nil, errors.New("history line: no generation")
	}
	return &e, nil
}
