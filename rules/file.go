package rules

import (
	"bufio"
	"bytes"
	"fmt"
	"slices"
	"strings"
)

// Error is a validation error tied to a place in a file. It prints as
// "FILE:LINE: message", the path as given.
type Error struct {
	File string
	Line int
	Msg  string
}

func (e *Error) Error() string {
	if e.File == "" && e.Line == 0 {
		return e.Msg // a rule given on the command line: no place to name
	}
	if e.File == "" {
		return fmt.Sprintf("line %d: %s", e.Line, e.Msg)
	}
	return fmt.Sprintf("%s:%d: %s", e.File, e.Line, e.Msg)
}

// ErrorList is every error found in a file, in line order.
type ErrorList []*Error

func (l ErrorList) Error() string { return joinErrors(l, "\n") }

// Entry is a rule and the line of the file it came from.
type Entry struct {
	Rule *Rule
	Line int
}

// RulesOf returns the rules of entries, in order.
func RulesOf(entries []Entry) []*Rule {
	rs := make([]*Rule, len(entries))
	for i, e := range entries {
		rs[i] = e.Rule
	}
	return rs
}

// ParseFile reads a rules file: one rule per line, blank lines skipped, '#'
// starting a comment. It checks every rule and then the table as a whole.
// It returns the entries, or an ErrorList with every problem found (the
// entries are then nil); file is the name used in messages.
func ParseFile(file string, src []byte) ([]Entry, error) {
	var entries []Entry
	var errs ErrorList
	sc := bufio.NewScanner(bytes.NewReader(src))
	sc.Buffer(make([]byte, 0, 4096), MaxLineLen+1)
	line := 0
	for sc.Scan() {
		line++
		text, _, _ := strings.Cut(sc.Text(), "#")
		if strings.TrimSpace(text) == "" {
			continue
		}
		r, err := Parse(text)
		if err != nil {
			errs = append(errs, LineErrorsAt(file, line, err)...)
			continue
		}
		entries = append(entries, Entry{r, line})
	}
	if err := sc.Err(); err != nil {
		errs = append(errs, &Error{file, line + 1, fmt.Sprintf("line longer than %d bytes", MaxLineLen)})
	}
	errs = append(errs, CheckEntries(file, entries)...)
	if len(errs) > 0 {
		slices.SortStableFunc(errs, func(a, b *Error) int { return a.Line - b.Line })
		return nil, errs
	}
	return entries, nil
}

// LineErrorsAt places each problem err carries (Errors) at line of file,
// one Error each: a line with two bad options prints two lines.
func LineErrorsAt(file string, line int, err error) ErrorList {
	var out ErrorList
	for _, e := range Errors(err) {
		out = append(out, &Error{file, line, e.Error()})
	}
	return out
}

// CheckEntries runs ValidateTable over entries, naming rules by their line.
func CheckEntries(file string, entries []Entry) ErrorList {
	rs := RulesOf(entries)
	var errs ErrorList
	for _, te := range ValidateTable(rs, func(i int) string { return fmt.Sprintf("line %d", entries[i].Line) }) {
		line := 0
		if te.Index < len(entries) {
			line = entries[te.Index].Line
		}
		errs = append(errs, &Error{file, line, te.Msg})
	}
	return errs
}

// Format writes rules as a rules file, one canonical line each.
func Format(rs []*Rule) string {
	var b strings.Builder
	for _, r := range rs {
		b.WriteString(r.String())
		b.WriteByte('\n')
	}
	return b.String()
}
