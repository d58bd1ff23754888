package ctl

import "strconv"

// Protocol versions. Version1 is the base; Version2 adds the per-port
// detail of a SUMMARY; Version3 adds the boot id and a pending
// commit-confirmed transaction to STATUS; Version4 adds an apply that
// awaits its commit to STATUS; Version5 adds a terminated session's TLS
// version, cipher and resumption to SESSIONS; Version6 adds the daemon's
// version, pid, start and uptime, and its state (serving, draining) to
// STATUS. See docs/ctl-protocol.md.
const (
	Version1 uint8 = 1
	Version2 uint8 = 2
	Version3 uint8 = 3
	Version4 uint8 = 4
	Version5 uint8 = 5
	Version6 uint8 = 6
	// MaxVersion is the highest version this build speaks.
	MaxVersion = Version6
)

// MsgType is a frame's message type. The numbers are the wire's.
type MsgType uint8

const (
	MsgHello       MsgType = 0x01 // server → client, step 1
	MsgClientHello MsgType = 0x02 // client → server, step 2
	MsgPifs        MsgType = 0x03 // server → client, step 3
	MsgRules       MsgType = 0x04 // server → client, step 4 (chunked)
	MsgLoad        MsgType = 0x05 // client → server, step 5 (chunked)
	MsgLoaded      MsgType = 0x06 // server → client, step 6
	MsgApply       MsgType = 0x07 // client → server, step 7
	MsgSummary     MsgType = 0x08 // server → client, steps 8 and 9 (chunked)
	MsgCommit      MsgType = 0x09 // client → server, step 9
	MsgCommitted   MsgType = 0x0a // server → client, step 9
	MsgRollback    MsgType = 0x0b // client → server, step 9
	MsgStatus      MsgType = 0x0c // server → client, intent status
	MsgError       MsgType = 0x0d // server → client, any step
	MsgWatch       MsgType = 0x0e // client → server, intent watch: the groups
	MsgEvent       MsgType = 0x0f // server → client, intent watch: one event
	MsgQuery       MsgType = 0x10 // client → server, intent sessions: which sessions
	MsgSessions    MsgType = 0x11 // server → client, intent sessions (chunked)
	MsgStats       MsgType = 0x12 // server → client, intent stats
	MsgRecent      MsgType = 0x13 // client → server, intent history: how many commits
	MsgHistory     MsgType = 0x14 // server → client, intent history (chunked)
	MsgReloaded    MsgType = 0x15 // server → client, intent reload: the outcome
	MsgLeave       MsgType = 0x16 // client → server, step 9: leave the apply pending (commit-confirmed)
	MsgPending     MsgType = 0x17 // server → client, step 9: the apply stays pending until its deadline
	MsgUpgrade     MsgType = 0x18 // client → server, intent upgrade: the binary and the timeout
	MsgUpgraded    MsgType = 0x19 // server → client, intent upgrade: the successor serves
	msgTypeCount           = 0x1a
)

var msgNames = [msgTypeCount]string{
	MsgHello:       "HELLO",
	MsgClientHello: "CLIENT_HELLO",
	MsgPifs:        "PIFS",
	MsgRules:       "RULES",
	MsgLoad:        "LOAD",
	MsgLoaded:      "LOADED",
	MsgApply:       "APPLY",
	MsgSummary:     "SUMMARY",
	MsgCommit:      "COMMIT",
	MsgCommitted:   "COMMITTED",
	MsgRollback:    "ROLLBACK",
	MsgStatus:      "STATUS",
	MsgError:       "ERROR",
	MsgWatch:       "WATCH",
	MsgEvent:       "EVENT",
	MsgQuery:       "QUERY",
	MsgSessions:    "SESSIONS",
	MsgStats:       "STATS",
	MsgRecent:      "RECENT",
	MsgHistory:     "HISTORY",
	MsgReloaded:    "RELOADED",
	MsgLeave:       "LEAVE",
	MsgPending:     "PENDING",
	MsgUpgrade:     "UPGRADE",
	MsgUpgraded:    "UPGRADED",
}

// Known reports whether t is a message type of the protocol.
func (t MsgType) Known() bool { return int(t) < len(msgNames) && msgNames[t] != "" }

func (t MsgType) String() string {
	if t.Known() {
		return msgNames[t]
	}
	return "type-" + strconv.Itoa(int(t))
}

// Intent is what a connection is for, said in the client hello.
type Intent uint8

const (
	IntentStatus      Intent = 1  // STATUS, then close
	IntentPifs        Intent = 2  // PIFS, then close
	IntentList        Intent = 3  // PIFS and RULES, then close
	IntentWrite       Intent = 4  // the writing transaction, steps 3-10
	IntentWatch       Intent = 5  // PIFS, WATCH, then EVENTs until either side closes
	IntentSessions    Intent = 6  // PIFS, QUERY, SESSIONS, then close
	IntentStats       Intent = 7  // STATS, then close
	IntentHistory     Intent = 8  // PIFS, RECENT, HISTORY, then close
	IntentReload      Intent = 9  // the configuration file re-read and applied: SUMMARY and RELOADED, then close
	IntentConfirm     Intent = 10 // the pending commit-confirmed apply committed: COMMITTED, then close
	IntentRollback    Intent = 11 // the pending commit-confirmed apply rolled back: SUMMARY, then close
	IntentListPending Intent = 12 // PIFS and RULES of the applied table that awaits its commit, then close
	IntentUpgrade     Intent = 13 // PIFS, UPGRADE, UPGRADED once the successor serves, then close
	intentCount              = 14
)

var intentNames = [intentCount]string{
	IntentStatus:      "status",
	IntentPifs:        "pifs",
	IntentList:        "list",
	IntentWrite:       "write",
	IntentWatch:       "watch",
	IntentSessions:    "sessions",
	IntentStats:       "stats",
	IntentHistory:     "history",
	IntentReload:      "reload",
	IntentConfirm:     "confirm",
	IntentRollback:    "rollback",
	IntentListPending: "list-pending",
	IntentUpgrade:     "upgrade",
}

// Known reports whether i is an intent of the protocol.
func (i Intent) Known() bool { return int(i) < len(intentNames) && intentNames[i] != "" }

func (i Intent) String() string {
	if i.Known() {
		return intentNames[i]
	}
	return "intent-" + strconv.Itoa(int(i))
}

// Code is a protocol error code: a stable number, only ever added, never
// renumbered. It travels in ERROR frames and names the client library's
// errors.
type Code uint16

const (
	CodeBadFrame         Code = 1  // bad magic, unknown type, a payload that does not decode
	CodeTooLarge         Code = 2  // a length or count beyond its bound
	CodeBadVersion       Code = 3  // a frame's version is not the agreed one
	CodeUnexpected       Code = 4  // a message not valid at this step
	CodeTimeout          Code = 5  // a frame not read or written within the I/O timeout
	CodeBusy             Code = 6  // another writing transaction holds the socket
	CodeStaleGeneration  Code = 7  // a load built on a generation that is not the active one
	CodeInvalidRule      Code = 8  // a rule line does not parse
	CodeInvalidTable     Code = 9  // the table as a whole does not validate
	CodeUnknownPif       Code = 10 // a pif the daemon does not have
	CodeBadValue         Code = 11 // a field outside its range
	CodeApplyFailed      Code = 12 // the engine refused the apply; nothing changed
	CodeCommitFailed     Code = 13 // the engine refused the commit; rolled back
	CodeRollbackFailed   Code = 14 // the engine's rollback failed
	CodeConfirmTimeout   Code = 15 // no commit within the confirm timeout: rolled back
	CodeShuttingDown     Code = 16 // the daemon is stopping
	CodePermissionDenied Code = 17 // the peer's uid is neither the daemon's nor root
	CodeTooManyClients   Code = 18 // the server's connection limit is reached
	CodeInternal         Code = 19 // the engine reported a state the server cannot describe
	CodeSlowWatcher      Code = 20 // a watcher's event queue overflowed: it was cut off
	CodeNoState          Code = 21 // the daemon keeps no state dir: no history
	CodeNoPending        Code = 22 // confirm or rollback, but no commit-confirmed apply is pending; list-pending, but no apply awaits its commit
	CodeNoReload         Code = 23 // the daemon has no configuration file to reload
	CodeEmptyChunk       Code = 24 // a LOAD chunk with no line that is not the last
	CodeUpgradeFailed    Code = 25 // the new process did not become ready: stopped; the old one serves on
	CodeUpgrading        Code = 26 // an upgrade is under way, or the process it replaced still drains
	CodeDraining         Code = 27 // the daemon drains its sessions before it exits: read-only intents only
	codeCount                 = 28
)

var codeNames = [codeCount]string{
	CodeBadFrame:         "bad-frame",
	CodeTooLarge:         "too-large",
	CodeBadVersion:       "bad-version",
	CodeUnexpected:       "unexpected",
	CodeTimeout:          "timeout",
	CodeBusy:             "busy",
	CodeStaleGeneration:  "stale-generation",
	CodeInvalidRule:      "invalid-rule",
	CodeInvalidTable:     "invalid-table",
	CodeUnknownPif:       "unknown-pif",
	CodeBadValue:         "bad-value",
	CodeApplyFailed:      "apply-failed",
	CodeCommitFailed:     "commit-failed",
	CodeRollbackFailed:   "rollback-failed",
	CodeConfirmTimeout:   "confirm-timeout",
	CodeShuttingDown:     "shutting-down",
	CodePermissionDenied: "permission-denied",
	CodeTooManyClients:   "too-many-clients",
	CodeInternal:         "internal",
	CodeSlowWatcher:      "slow-watcher",
	CodeNoState:          "no-state",
	CodeNoPending:        "no-pending",
	CodeNoReload:         "no-reload",
	CodeEmptyChunk:       "empty-chunk",
	CodeUpgradeFailed:    "upgrade-failed",
	CodeUpgrading:        "upgrading",
	CodeDraining:         "draining",
}

// String returns the code's stable name, or "code-N" for a number this
// build does not know.
func (c Code) String() string {
	if int(c) < len(codeNames) && codeNames[c] != "" {
		return codeNames[c]
	}
	return "code-" + strconv.Itoa(int(c))
}

// RunState is what the daemon is doing, as STATUS (version 6) says it. The
// numbers are the wire's; 0 is an older server's STATUS, which has none.
type RunState uint8

const (
	StateServing  RunState = 1 // serving: every intent
	StateDraining RunState = 2 // stopping: sessions drain until the drain deadline; read-only intents only
	runStateCount          = 3
)

var runStateNames = [runStateCount]string{
	StateServing:  "serving",
	StateDraining: "draining",
}

// String returns the state's stable name, "" for none (an older server),
// or "state-N" for a number this build does not know.
func (r RunState) String() string {
	switch {
	case r == 0:
		return ""
	case int(r) < len(runStateNames) && runStateNames[r] != "":
		return runStateNames[r]
	}
	return "state-" + strconv.Itoa(int(r))
}

// LimitID names one of the server's limits in the hello.
type LimitID uint16

const (
	LimitMaxPayload       LimitID = 1  // bytes in one frame's payload
	LimitMaxRules         LimitID = 2  // rules in a table
	LimitMaxPorts         LimitID = 3  // listen ports of a table
	LimitMaxPortsPerRule  LimitID = 4  // listen ports of one rule
	LimitMaxLineLen       LimitID = 5  // bytes in one rule line
	LimitMaxPifs          LimitID = 6  // pifs in PIFS, host included
	LimitDefaultConfirmMs LimitID = 7  // confirm timeout when APPLY asks for 0
	LimitMaxConfirmMs     LimitID = 8  // the longest confirm timeout
	LimitIOTimeoutMs      LimitID = 9  // each frame read or written within this
	LimitMaxClients       LimitID = 10 // connections served at once
	LimitBootID           LimitID = 11 // not a bound: the id of this run of the daemon, new at every start
	LimitLoadTimeoutMs    LimitID = 12 // a whole load (step 5) within this
	LimitMaxWatchers      LimitID = 13 // watch connections at once, apart from max-clients
	limitCount                    = 14
)

var limitNames = [limitCount]string{
	LimitMaxPayload:       "max-payload",
	LimitMaxRules:         "max-rules",
	LimitMaxPorts:         "max-ports",
	LimitMaxPortsPerRule:  "max-ports-per-rule",
	LimitMaxLineLen:       "max-line-len",
	LimitMaxPifs:          "max-pifs",
	LimitDefaultConfirmMs: "default-confirm-ms",
	LimitMaxConfirmMs:     "max-confirm-ms",
	LimitIOTimeoutMs:      "io-timeout-ms",
	LimitMaxClients:       "max-clients",
	LimitBootID:           "boot-id",
	LimitLoadTimeoutMs:    "load-timeout-ms",
	LimitMaxWatchers:      "max-watchers",
}

func (l LimitID) String() string {
	if int(l) < len(limitNames) && limitNames[l] != "" {
		return limitNames[l]
	}
	return "limit-" + strconv.Itoa(int(l))
}

// Features a server may list in its hello: the capability probe.
const (
	FeatureTxn            = "txn"             // the writing transaction (intent write) is served
	FeatureConfirmTimeout = "confirm-timeout" // APPLY's confirm timeout is honoured
	FeatureConcurrentRead = "concurrent-read" // status, pifs, list are served beside a writer
	FeaturePeerCred       = "peer-cred"       // peers are checked with SO_PEERCRED
	FeatureWatch          = "watch"           // intent watch: event groups, state first
	FeatureSessions       = "sessions"        // intent sessions: the live sessions
	FeatureStats          = "stats"           // intent stats: the engine's counters
	FeatureHistory        = "history"         // intent history: the last commits of the state dir
	FeatureReload         = "reload"          // intent reload: the configuration file applied again
	FeatureConfirmLater   = "confirm-later"   // LEAVE at step 9, intents confirm and rollback
	FeatureListPending    = "list-pending"    // intent list-pending; list and status tell the committed table from a pending one
	FeatureUpgrade        = "upgrade"         // intent upgrade: the binary replaced, no socket closed
)
