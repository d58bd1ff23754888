package conn

import (
	"strconv"
	"sync/atomic"
)

// Code says why a conn or session ended. Codes are stable numbers shown by
// logs, metrics and ctl: they are only ever added, never renumbered.
type Code uint16

const (
	CodeNone              Code = 0  // still running, or no reason recorded
	CodeDone              Code = 1  // both directions ended cleanly
	CodeProxyTruncated    Code = 2  // PROXY header cut short by the client
	CodeProxyBad          Code = 3  // PROXY header malformed
	CodeProxyNotTrusted   Code = 4  // PROXY header from a source not trusted to send one
	CodeDenied            Code = 5  // refused by allow/deny
	CodeRateLimited       Code = 6  // refused by rate= or maxconn=
	CodeHandshakeTimeout  Code = 7  // handshake chain did not finish in time
	CodeConnectRefused    Code = 8  // every backend refused
	CodeConnectTimeout    Code = 9  // no backend answered within timeout.connect
	CodeClientReset       Code = 10 // the client reset or failed
	CodeServerReset       Code = 11 // the backend reset or failed
	CodeIdleTimeout       Code = 12 // no byte either way within timeout.idle
	CodeConnectError      Code = 13 // connect failed otherwise (unreachable, no fd)
	CodeStopping          Code = 14 // the daemon stopped before the session ended
	CodeResource          Code = 15 // out of a resource (fds, memory) mid-session
	CodeHealth            Code = 16 // answered as a health probe
	CodeProxyOversized    Code = 17 // PROXY header longer than allowed (v1: no CRLF in 107 bytes; v2: length over 4096)
	CodeProxyMissing      Code = 18 // a source that must send a PROXY header sent other bytes first
	CodeNoRoute           Code = 19 // no route of the listen key matched the ClientHello (or not TLS, and no default route)
	CodeTLSHelloOversized Code = 20 // the ClientHello is longer than 16 KiB (or its framing than 32 KiB)
	CodeTLSHelloBad       Code = 21 // the ClientHello is malformed, or the client ended its stream inside it
	CodeTLSHandshake      Code = 22 // the client's TLS handshake failed (an alert, no certificate for mTLS, not TLS at all)
	CodeTLSBackend        Code = 23 // the backend's TLS handshake failed (an expired, untrusted or misnamed certificate)
	CodeNoBackend         Code = 24 // every backend of a checked pool is down by its checks
	codeCount                  = 25
)

// reservedCode reports numbers given to codes of other work, not in this
// build yet: they print as "code-N" until they come. None is reserved now.
func reservedCode(Code) bool { return false }

var codeNames = [codeCount]string{
	CodeNone:              "none",
	CodeDone:              "done",
	CodeProxyTruncated:    "proxy-truncated",
	CodeProxyBad:          "proxy-bad",
	CodeProxyNotTrusted:   "proxy-not-trusted",
	CodeDenied:            "denied",
	CodeRateLimited:       "rate-limited",
	CodeHandshakeTimeout:  "handshake-timeout",
	CodeConnectRefused:    "connect-refused",
	CodeConnectTimeout:    "connect-timeout",
	CodeClientReset:       "client-reset",
	CodeServerReset:       "server-reset",
	CodeIdleTimeout:       "idle-timeout",
	CodeConnectError:      "connect-error",
	CodeStopping:          "stopping",
	CodeResource:          "resource",
	CodeHealth:            "health",
	CodeProxyOversized:    "proxy-oversized",
	CodeProxyMissing:      "proxy-missing",
	CodeNoRoute:           "no-route",
	CodeTLSHelloOversized: "tls-hello-oversized",
	CodeTLSHelloBad:       "tls-hello-bad",
	CodeTLSHandshake:      "tls-handshake",
	CodeTLSBackend:        "tls-backend",
	CodeNoBackend:         "no-backend",
}

// String returns the code's stable name, or "code-N" for a number this
// build does not know.
func (c Code) String() string {
	if int(c) < len(codeNames) && codeNames[c] != "" {
		return codeNames[c]
	}
	return "code-" + strconv.Itoa(int(c))
}

// CountsByName returns counts read by code name, for stats: counts[i]
// counts Code(i). Zero counts are left out; the map is never nil.
func CountsByName(counts []atomic.Uint64) map[string]uint64 {
	m := map[string]uint64{}
	for i := range counts {
		if n := counts[i].Load(); n > 0 {
			m[Code(i).String()] = n
		}
	}
	return m
}
