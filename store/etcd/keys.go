// Package etcd is a fleet's source of truth in etcd: the keys of the
// contract, the instance loop that follows them (Instance), and the
// operator's side, rollout and fleet (Fleet).
//
// Under a prefix P:
//
//	P/tables/VERSION  a rules file (canonical lines), written once, never changed
//	P/assign/ID       the VERSION instance ID must run
//	P/status/ID       JSON Status, written by the instance under a lease (gone when it dies)
//	P/rollout         JSON Plan of the rollout in progress (the guard two operators share)
//
// An instance reads and watches P/assign/ only (never the other instances'
// statuses, never every table): what it needs, and what keeps a fleet of
// hundreds from sending each of them every write. It fetches the one
// table its assignment names.
package etcd

import (
	"errors"
	"fmt"
	"strings"
	"time"
)

// Bounds of what the store holds. A value over them is reported (a status
// invalid, an error counted), never applied.
const (
	MaxTableBytes  = 512 << 10 // a tables/VERSION value
	MaxAssignBytes = 256       // an assign/ID value: one VERSION
	MaxNameLen     = 128       // an instance ID or a VERSION
)

// KeyKind is what a key under the prefix is.
type KeyKind uint8

const (
	KeyOther   KeyKind = iota // not of the contract's shapes
	KeyTable                  // tables/VERSION
	KeyAssign                 // assign/ID
	KeyStatus                 // status/ID
	KeyRollout                // rollout
	keyKindEnd
)

var keyKindText = [...]string{"other", "table", "assign", "status", "rollout"}

func (k KeyKind) String() string {
	if k < keyKindEnd {
		return keyKindText[k]
	}
	return fmt.Sprintf("key-kind-%d", k)
}

// Keys names the keys under one prefix ("/sluice/NAME", no trailing slash).
type Keys struct{ Prefix string }

func (k Keys) Table(version string) string { return k.Prefix + "/tables/" + version }
func (k Keys) Assign(id string) string     { return k.Prefix + "/assign/" + id }
func (k Keys) Status(id string) string     { return k.Prefix + "/status/" + id }
func (k Keys) Rollout() string             { return k.Prefix + "/rollout" }

// AssignDir, StatusDir and All are the ranges of a prefix get or watch.
func (k Keys) AssignDir() string { return k.Prefix + "/assign/" }
func (k Keys) StatusDir() string { return k.Prefix + "/status/" }
func (k Keys) All() string       { return k.Prefix + "/" }

// Parse says what key is and the name it carries (the VERSION or ID;
// "" for the rollout key). A key of another shape (outside the prefix, a
// kind the contract does not have, a name CheckName refuses) is KeyOther.
func (k Keys) Parse(key string) (KeyKind, string) {
	rest, ok := strings.CutPrefix(key, k.All())
	if !ok {
		return KeyOther, ""
	}
	if rest == "rollout" {
		return KeyRollout, ""
	}
	dir, name, ok := strings.Cut(rest, "/")
	if !ok || CheckName(name) != nil {
		return KeyOther, ""
	}
	switch dir {
	case "tables":
		return KeyTable, name
	case "assign":
		return KeyAssign, name
	case "status":
		return KeyStatus, name
	}
	return KeyOther, ""
}

// CheckName returns nil when s is a valid instance ID or VERSION: 1 to
// MaxNameLen of A-Z a-z 0-9 . _ - and not "." or "..".
func CheckName(s string) error {
	if s == "" {
		return errors.New("empty name")
	}
	if len(s) > MaxNameLen {
		return fmt.Errorf("name of %d bytes, at most %d", len(s), MaxNameLen)
	}
	if s == "." || s == ".." {
		return fmt.Errorf("name %q", s)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("name %q: byte %q is not one of A-Z a-z 0-9 . _ -", s, c)
		}
	}
	return nil
}

// Outcome is what an instance did with its assignment.
type Outcome uint8

const (
	OutcomeNone       Outcome = iota // no assignment handled yet: the status says what runs
	OutcomeCommitted                 // applied and committed (or already the active table)
	OutcomeRolledBack                // applied, the verdict bad: rolled back, the old table serves
	OutcomeInvalid                   // not applied: the table is missing, too large, or does not validate
	outcomeEnd
)

var outcomeText = [...]string{"none", "committed", "rolled-back", "invalid"}

func (o Outcome) String() string {
	if o < outcomeEnd {
		return outcomeText[o]
	}
	return fmt.Sprintf("outcome-%d", o)
}

// MarshalText writes the outcome's name.
func (o Outcome) MarshalText() ([]byte, error) { return []byte(o.String()), nil }

// UnmarshalText reads a name of MarshalText; an unknown one is an error.
func (o *Outcome) UnmarshalText(b []byte) error {
	for i, s := range outcomeText {
		if s == string(b) {
			*o = Outcome(i)
			return nil
		}
	}
	return fmt.Errorf("unknown outcome %q", b)
}

// Status is the value of status/ID.
type Status struct {
	Instance   string    `json:"instance"`
	BootID     string    `json:"boot_id"` // 16 hex digits, new at each start of the daemon
	Version    string    `json:"version"` // the VERSION this status is about; "" before any assignment
	Generation uint64    `json:"generation"`
	Outcome    Outcome   `json:"outcome"`
	Verdict    string    `json:"verdict,omitempty"` // good or bad: the bind summary's; "" when nothing was applied
	Error      string    `json:"error,omitempty"`   // invalid: every FILE:LINE: message, one a line; rolled-back: the failed ports
	Summary    *Summary  `json:"summary,omitempty"` // the apply's bind summary; nil when nothing was applied
	Time       time.Time `json:"time"`
}

// Summary is the bind summary of an apply, as a status carries it.
type Summary struct {
	Kept    int      `json:"kept"`
	Added   int      `json:"added"`
	Removed int      `json:"removed"`
	Failed  []string `json:"failed,omitempty"` // "tcp 0.0.0.0:8080: port 8080: address already in use"
}
