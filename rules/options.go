package rules

import (
	"fmt"
	"strings"
)

// OptionDoc is one rule option as `sluice help rules` prints it: its name,
// the form of its value ("" for a flag), its default and one line of help.
type OptionDoc struct {
	Name    string
	Value   string // "auto|on|off", "DUR", ""; "[=CIDR,…]" when the value is optional
	Default string
	Help    string
	Example string // a word that sets it, parsed by the test on a TCP rule with a target
}

// OptionDocs is every option a rule takes, in the README's order. The parser
// refuses an option that is not here (setOption), so an option cannot be
// taken without a help line; TestOptionDocs parses every Example.
var OptionDocs = []OptionDoc{
	{"splice", "auto|on|off", "auto", "move bytes with splice(2): always, never, or from the first read that fills a buffer", "splice=on"},
	{"timeout.connect", "DUR", "5s", "give up on a backend that has not answered; the pool's next is tried", "timeout.connect=2s"},
	{"timeout.idle", "DUR", "10m TCP, 60s UDP", "close a session (a UDP flow) with no byte either way for this long", "timeout.idle=1m"},
	{"timeout.handshake", "DUR", "5s", "bound on the whole incoming handshake (monitor, health, PROXY, rules, TLS hello)", "timeout.handshake=3s"},
	{"accept-proxy", "[=CIDR,…]", "off", "these sources (all, with no list) must start with a PROXY v1/v2 header", "accept-proxy=10.0.0.0/8"},
	{"send-proxy", "v1|v2", "off", "write a PROXY header to the backend before any payload", "send-proxy=v2"},
	{"health", "tcp|http", "off", "answer probes (OK / HTTP 200; DOWN / 503 when the pool is down or draining)", "health=http"},
	{"monitor", "CIDR,…", "none", "connections from these sources get the health reply", "monitor=127.0.0.1"},
	{"allow", "CIDR,…", "all allowed", "only these sources (after accept-proxy)", "allow=192.0.2.0/24"},
	{"deny", "CIDR,…", "none denied", "never these sources (deny wins over allow)", "deny=192.0.2.7"},
	{"rate", "N/s", "unlimited", "new connections per second per source", "rate=100/s"},
	{"maxconn", "N", "unlimited", "concurrent connections on the rule (all its ports)", "maxconn=1000"},
	{"sockbuf", "SIZE|auto", "1m", "TCP SO_SNDBUF and SO_RCVBUF of both sockets (4k to 64m); auto: the kernel's autotuning", "sockbuf=256k"},
	{"balance", "roundrobin|leastconn|source", "roundrobin", "which backend of the pool a session tries first", "balance=leastconn"},
	{"weak", "", "off", "ports that cannot be bound are skipped and reported instead of failing the table", "weak"},
	{"sni", "NAME,…", "none", "a route of its listen key by the ClientHello's server name (exact or *.suffix)", "sni=a.example.com"},
	{"alpn", "PROTO,…", "none", "a route by the ClientHello's offered ALPN protocols", "alpn=h2"},
	{"check", "tcp|http", "off", "active health checks of every backend of the pool", "check=tcp"},
	{"check.path", "PATH", "/", "the path of check=http", "check.path=/healthz"},
	{"check.port", "PORT", "the backend's", "the port checks go to", "check.port=8081"},
	{"check.interval", "DUR", "2s", "time between two checks of a backend", "check.interval=5s"},
	{"check.timeout", "DUR", "1s", "bound on one check (at most the interval)", "check.timeout=500ms"},
	{"check.rise", "N", "2", "successes in a row to go up (1-100)", "check.rise=3"},
	{"check.fall", "N", "3", "failures in a row to go down (1-100)", "check.fall=2"},
	{"tls.cert", "FILE", "none", "terminate TLS with this PEM chain (and key, unless tls.key)", "tls.cert=/etc/sluice/a.pem"},
	{"tls.key", "FILE", "in tls.cert", "the key of tls.cert", "tls.key=/etc/sluice/a.key"},
	{"tls.alpn", "PROTO,…", "none", "protocols offered when terminating", "tls.alpn=h2"},
	{"tls.min", "1.2|1.3", "1.2", "the lowest TLS version accepted when terminating", "tls.min=1.3"},
	{"tls.client-ca", "FILE", "none", "require client certificates verified against these CAs (mTLS)", "tls.client-ca=/etc/sluice/ca.pem"},
	{"tls.backend", "on|verify", "off", "TLS to the backend: verify checks its certificate, on only encrypts", "tls.backend=verify"},
	{"tls.backend-ca", "FILE", "system roots", "the CAs tls.backend=verify trusts", "tls.backend-ca=/etc/sluice/ca.pem"},
	{"tls.backend-name", "NAME", "the target", "the name tls.backend=verify checks", "tls.backend-name=b.example.com"},
	{"resolve", "DUR|off", "30s", "how often a target's host names are resolved again; off: once", "resolve=10s"},
}

// optionKnown reports whether name is an option of OptionDocs.
func optionKnown(name string) bool {
	for i := range OptionDocs {
		if OptionDocs[i].Name == name {
			return true
		}
	}
	return false
}

// Syntax is a rule's one-line syntax as `sluice help rules` and the man
// page show it.
const Syntax = "PROTO [PIF/]ADDR:PORT[-PORT] [-> [PIF/]TARGET[,TARGET…]] [OPTION…]"

// OptionHelp is `sluice help rules`: the rule syntax, then one line per
// option with its value and default, aligned.
func OptionHelp() string {
	var b strings.Builder
	b.WriteString("A rule: " + Syntax + "\n\noptions (default in brackets):\n")
	w := 0
	for _, o := range OptionDocs {
		w = max(w, len(o.Form()))
	}
	for _, o := range OptionDocs {
		fmt.Fprintf(&b, "  %-*s  %s [%s]\n", w, o.Form(), o.Help, o.Default)
	}
	return b.String()
}

// Form is how the option is written: "splice=auto|on|off", "weak",
// "accept-proxy[=CIDR,…]".
func (o OptionDoc) Form() string {
	switch {
	case o.Value == "":
		return o.Name
	case strings.HasPrefix(o.Value, "["):
		return o.Name + o.Value
	}
	return o.Name + "=" + o.Value
}
