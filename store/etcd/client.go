package etcd

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// PasswordEnv is the environment variable the password is read from when
// no password file is given.
const PasswordEnv = "SLUICE_ETCD_PASSWORD"

// Conn is how to reach etcd: the client settings the instance and the
// operator's commands share.
type Conn struct {
	Endpoints []string
	TLS       *tls.Config // nil: plain http
	User      string      // "": no authentication
	Password  string
	// DialTimeout bounds the first connection (and, with User, the
	// authentication New does); 0 = 5s.
	DialTimeout time.Duration
}

// ReadPassword returns the password: the file's first line when file is
// given, else $SLUICE_ETCD_PASSWORD. It is never in a configuration file.
func ReadPassword(file string) (string, error) {
	if file == "" {
		return os.Getenv(PasswordEnv), nil
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return "", fmt.Errorf("etcd password file: %w", err)
	}
	line, _, _ := strings.Cut(string(b), "\n")
	return strings.TrimRight(line, "\r"), nil
}

// TLSConfig builds the client's TLS settings from PEM files: ca verifies
// the server ("" = the system's roots), cert and key are the client's own
// ("" = none). All three "" returns nil: plain http.
func TLSConfig(ca, cert, key string) (*tls.Config, error) {
	if ca == "" && cert == "" && key == "" {
		return nil, nil
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12}
	if ca != "" {
		pem, err := os.ReadFile(ca)
		if err != nil {
			return nil, fmt.Errorf("etcd ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("etcd ca %s: no PEM certificate in it", ca)
		}
		c.RootCAs = pool
	}
	if cert != "" || key != "" {
		if cert == "" || key == "" {
			return nil, errors.New("etcd cert and key go together")
		}
		kp, err := tls.LoadX509KeyPair(cert, key)
		if err != nil {
			return nil, fmt.Errorf("etcd client certificate: %w", err)
		}
		c.Certificates = []tls.Certificate{kp}
	}
	return c, nil
}

// dial makes a client. Without a user it returns at once, connecting in
// the background; with one it authenticates within DialTimeout.
func (c Conn) dial() (*clientv3.Client, error) {
	dt := c.DialTimeout
	if dt == 0 {
		dt = 5 * time.Second
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   c.Endpoints,
		TLS:         c.TLS,
		Username:    c.User,
		Password:    c.Password,
		DialTimeout: dt,
		// The client's own logs are per retry: ours say what matters once.
		Logger:               zap.NewNop(),
		DialKeepAliveTime:    2 * time.Second,
		DialKeepAliveTimeout: 2 * time.Second,
		MaxCallRecvMsgSize:   4 << 20,
	})
	if err != nil {
		return nil, fmt.Errorf("etcd %s: %w", strings.Join(c.Endpoints, ","), err)
	}
	return cli, nil
}
