// Package tlsconf turns a rule's tls.* options into crypto/tls
// configurations: it reads the PEM files the options name (the chain and its
// key, the client CAs, the backend CAs), checks them, and says what a
// listener shows of its certificate (subject, expiry) and whether a file
// changed since the last read (Digest).
//
// Files are read when a table is loaded and again at every apply, so a
// replaced certificate is picked up by an apply of the unchanged table: a
// rule whose files changed has a new Digest, and the engine treats it as a
// changed rule (its listening socket kept).
//
// Session tickets are on, sealed with one key set for the whole process
// (sealTickets), so a ticket outlives the Config that issued it, and bound
// to the route that issued it.
package tlsconf

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"time"

	"github.com/sluice-proxy/sluice/rules"
)

// MaxFileSize bounds a PEM file read: a chain of a few certificates is a few
// KiB; a CA bundle (the system's) a few hundred.
const MaxFileSize = 4 << 20

// Loaded is one rule's TLS, read from its files. Server is nil when the rule
// does not terminate, Client when it does not originate.
type Loaded struct {
	Server *tls.Config
	Client *tls.Config // ServerName unset when tls.backend-name is: per backend (ClientFor)
	Leaf   *x509.Certificate
	Digest string // sha256 of every file read, in TLSFiles order: a change is a changed rule

	name string // tls.backend-name
}

// Subject is the certificate's subject as the status page shows it.
func (l *Loaded) Subject() string {
	if l == nil || l.Leaf == nil {
		return ""
	}
	return l.Leaf.Subject.String()
}

// Expiry is the certificate's NotAfter (zero when the rule does not
// terminate).
func (l *Loaded) Expiry() time.Time {
	if l == nil || l.Leaf == nil {
		return time.Time{}
	}
	return l.Leaf.NotAfter
}

// Load reads and checks the files of r's tls.* options. It returns nil, nil
// for a rule without any, else the configurations, or an error naming the
// option and its file first ("tls.cert /etc/sluice/a.pem: open …: no such
// file or directory"; "tls.key /k.pem: the key does not match the
// certificate").
func Load(r *rules.Rule) (*Loaded, error) {
	if r.TLSZero() {
		return nil, nil
	}
	t := &r.TLS
	l := &Loaded{name: t.BackendName}
	h := sha256.New()
	read := func(opt, path string) ([]byte, error) {
		b, err := readFile(path)
		if err != nil {
			return nil, fmt.Errorf("%s %s: %w", opt, path, err)
		}
		h.Write([]byte(opt + "\x00" + path + "\x00"))
		h.Write(b)
		return b, nil
	}
	if t.Cert != "" {
		certPEM, err := read("tls.cert", t.Cert)
		if err != nil {
			return nil, err
		}
		keyPEM, keyOpt, keyPath := certPEM, "tls.cert", t.Cert
		if t.Key != "" {
			if keyPEM, err = read("tls.key", t.Key); err != nil {
				return nil, err
			}
			keyOpt, keyPath = "tls.key", t.Key
		}
		cert, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			return nil, fmt.Errorf("%s %s: %w", keyOpt, keyPath, pairError(err))
		}
		l.Leaf = cert.Leaf
		if l.Leaf == nil {
			if l.Leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
				return nil, fmt.Errorf("tls.cert %s: %w", t.Cert, err)
			}
		}
		cfg := &tls.Config{
			Certificates: []tls.Certificate{cert},
			MinVersion:   tls.VersionTLS12,
			NextProtos:   t.ALPN,
		}
		if t.Min == rules.TLSMin13 {
			cfg.MinVersion = tls.VersionTLS13
		}
		var clientCA []byte
		if t.ClientCA != "" {
			b, err := read("tls.client-ca", t.ClientCA)
			if err != nil {
				return nil, err
			}
			pool, err := certPool(b)
			if err != nil {
				return nil, fmt.Errorf("tls.client-ca %s: %w", t.ClientCA, err)
			}
			cfg.ClientCAs = pool
			cfg.ClientAuth = tls.RequireAndVerifyClientCert
			clientCA = b
		}
		sealTickets(cfg, ticketRoute(r, clientCA))
		l.Server = cfg
	}
	if t.Backend != rules.TLSBackendOff {
		cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: t.BackendName}
		if t.Backend == rules.TLSBackendOn {
			cfg.InsecureSkipVerify = true
		} else if t.BackendCA != "" {
			b, err := read("tls.backend-ca", t.BackendCA)
			if err != nil {
				return nil, err
			}
			if cfg.RootCAs, err = certPool(b); err != nil {
				return nil, fmt.Errorf("tls.backend-ca %s: %w", t.BackendCA, err)
			}
		}
		cfg.ClientSessionCache = tls.NewLRUClientSessionCache(256)
		l.Client = cfg
	}
	l.Digest = hex.EncodeToString(h.Sum(nil))
	return l, nil
}

// ticketer seals the session tickets of every server Config Load makes.
// Its keys are crypto/tls's automatic ones (a new key every day, each
// accepted for a week), one set for the process: every apply reads the
// files again and makes new Configs, and with keys of their own (crypto/tls's
// default) each apply would refuse every ticket issued before it, so that
// every client's next connection paid a full handshake.
var ticketer = &tls.Config{}

// ticketPrefix starts the SessionState.Extra entry that binds a ticket to
// its route (crypto/tls asks that an entry be recognisable by a prefix of
// its own, other layers may append theirs).
const ticketPrefix = "sluice-route-v1:"

// ticketRoute is what a ticket of r's route carries: a hash of the route
// (its listen key and routing words) and of its client CAs. A route made
// anew by an apply has the same (its certificate may have been renewed);
// another route, or the same one trusting other client CAs, has another.
func ticketRoute(r *rules.Rule, clientCA []byte) []byte {
	h := sha256.New()
	h.Write([]byte(r.RouteString() + "\x00"))
	h.Write(clientCA)
	return append([]byte(ticketPrefix), h.Sum(nil)...)
}

// sealTickets makes cfg seal its tickets with ticketer's keys and route's
// entry, and resume only a ticket that carries that same entry: a client
// certificate verified against one route's tls.client-ca never resumes a
// session on a route that trusts other CAs, as it could with a key set
// shared and nothing more (crypto/tls does not verify a resumed session's
// certificate again).
func sealTickets(cfg *tls.Config, route []byte) {
	cfg.WrapSession = func(cs tls.ConnectionState, ss *tls.SessionState) ([]byte, error) {
		ss.Extra = slices.DeleteFunc(ss.Extra, func(e []byte) bool { return bytes.HasPrefix(e, []byte(ticketPrefix)) })
		ss.Extra = append(ss.Extra, route)
		return ticketer.EncryptTicket(cs, ss)
	}
	cfg.UnwrapSession = func(identity []byte, cs tls.ConnectionState) (*tls.SessionState, error) {
		ss, err := ticketer.DecryptTicket(identity, cs)
		if ss == nil || err != nil {
			return nil, err // (nil, nil): not ours or expired, a full handshake
		}
		if !slices.ContainsFunc(ss.Extra, func(e []byte) bool { return bytes.Equal(e, route) }) {
			return nil, nil // another route's
		}
		return ss, nil
	}
}

// ClientFor returns the client configuration for a backend whose host (a
// name, or an address written out) is host: tls.backend-name when given,
// else host is the name checked and sent.
func (l *Loaded) ClientFor(host string) *tls.Config {
	if l.name != "" || l.Client.InsecureSkipVerify && host == "" {
		return l.Client
	}
	c := l.Client.Clone()
	c.ServerName = host
	return c
}

// readFile reads a PEM file of at most MaxFileSize bytes.
func readFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err == nil && len(b) > MaxFileSize {
		err = fmt.Errorf("larger than %d bytes", MaxFileSize)
	}
	return b, err
}

// certPool reads PEM certificates into a pool; none is an error.
func certPool(b []byte) (*x509.CertPool, error) {
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(b) {
		return nil, errors.New("no PEM certificate in the file")
	}
	return p, nil
}

// pairError rewords crypto/tls's key pair errors for an operator.
func pairError(err error) error {
	switch s := err.Error(); {
	case s == "tls: private key does not match public key":
		return errors.New("the key does not match the certificate")
	case s == "tls: failed to find any PEM data in certificate input" || s == "tls: failed to find certificate PEM data in certificate input, but did find a private key; PEM inputs may have been switched":
		return errors.New("no certificate (PEM CERTIFICATE block) in the file")
	case s == "tls: failed to find any PEM data in key input" || len(s) > 40 && s[:40] == "tls: found a certificate rather than a k":
		return errors.New("no private key (PEM PRIVATE KEY block) in the file: give tls.key")
	}
	return err
}
