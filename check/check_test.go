package check

import (
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/balance"
	"github.com/sluice-proxy/sluice/internal/rawsys"
	"github.com/sluice-proxy/sluice/internal/testpeer"
	"github.com/sluice-proxy/sluice/rules"
)

// run drives one check to its end with poll(2), or reports it pending
// after wait.
func run(t *testing.T, addr netip.AddrPort, kind rules.CheckKind, req []byte, wait time.Duration) (bool, balance.Result, string) {
	t.Helper()
	fd, err := rawsys.Socket(unix.AF_INET, unix.SOCK_STREAM)
	if err != nil {
		t.Fatal(err)
	}
	var p Probe
	done, res, reason := p.Start(fd, addr, kind, req)
	deadline := time.Now().Add(wait)
	for !done && time.Now().Before(deadline) {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLOUT | unix.POLLRDHUP}}
		if _, err := unix.Poll(pfd, 50); err != nil && err != unix.EINTR {
			t.Fatal(err)
		}
		if pfd[0].Revents == 0 {
			continue
		}
		ev := uint32(0)
		for _, m := range [][2]int16{{unix.POLLIN, unix.EPOLLIN}, {unix.POLLOUT, unix.EPOLLOUT}, {unix.POLLERR, unix.EPOLLERR},
			{unix.POLLHUP, unix.EPOLLHUP}, {unix.POLLRDHUP, unix.EPOLLRDHUP}} {
			if pfd[0].Revents&m[0] != 0 {
				ev |= uint32(uint16(m[1]))
			}
		}
		done, res, reason = p.Event(ev)
	}
	if !done {
		p.Close()
		return false, 0, ""
	}
	if p.FD() != -1 {
		t.Error("done, but the probe still holds its fd")
	}
	s := ""
	if reason != nil {
		s = *reason
	}
	return true, res, s
}

func TestHTTPCheck(t *testing.T) {
	var status atomic.Int32
	status.Store(200)
	var gotReq atomic.Pointer[http.Request]
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotReq.Store(r)
		w.WriteHeader(int(status.Load()))
	}))
	defer srv.Close()
	addr := netip.MustParseAddrPort(srv.Listener.Addr().String())
	req := Request("/healthz?x=1", addr.String())
	for _, c := range []struct {
		status int32
		res    balance.Result
		reason string
	}{{200, balance.ResultOK, ""}, {302, balance.ResultOK, ""}, {503, balance.ResultFail, ReasonBadStatus}, {404, balance.ResultFail, ReasonBadStatus}} {
		status.Store(c.status)
		done, res, reason := run(t, addr, rules.CheckHTTP, req, 2*time.Second)
		if !done || res != c.res || reason != c.reason {
			t.Errorf("status %d: done %v %s %q, want %s %q", c.status, done, res, reason, c.res, c.reason)
		}
	}
	r := gotReq.Load()
	if r.URL.Path != "/healthz" || r.URL.RawQuery != "x=1" || r.Host != addr.String() || !r.Close || r.Proto != "HTTP/1.1" {
		t.Errorf("request %s %s host %q close %v", r.Proto, r.URL, r.Host, r.Close)
	}
}

func TestTCPCheck(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.MustParseAddrPort(ln.Addr().String())
	if done, res, _ := run(t, addr, rules.CheckTCP, nil, time.Second); !done || res != balance.ResultOK {
		t.Errorf("listening: %v %s", done, res)
	}
	ln.Close()
	if done, res, reason := run(t, addr, rules.CheckTCP, nil, time.Second); !done || res != balance.ResultFail || reason != ReasonRefused {
		t.Errorf("closed: %v %s %q", done, res, reason)
	}
}

// A backend that accepts and never answers leaves the check pending: the
// caller's timeout ends it.
func TestHTTPCheckSilentBackend(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	testpeer.Mute(ln)
	addr := netip.MustParseAddrPort(ln.Addr().String())
	if done, _, _ := run(t, addr, rules.CheckHTTP, Request("/", addr.String()), 300*time.Millisecond); done {
		t.Error("a silent backend's check ended by itself")
	}
	// Bytes that are not HTTP fail at once.
	ln2, _ := net.Listen("tcp", "127.0.0.1:0")
	defer ln2.Close()
	go func() {
		c, err := ln2.Accept()
		if err == nil {
			c.Write([]byte("SSH-2.0-OpenSSH_9.2\r\n"))
			time.Sleep(time.Second)
			c.Close()
		}
	}()
	a2 := netip.MustParseAddrPort(ln2.Addr().String())
	if done, res, reason := run(t, a2, rules.CheckHTTP, Request("/", a2.String()), 2*time.Second); !done || res != balance.ResultFail || reason != ReasonBadReply {
		t.Errorf("ssh banner: %v %s %q", done, res, reason)
	}
}

func TestJudgeAndOffset(t *testing.T) {
	for _, c := range []struct {
		in         string
		ok, judged bool
	}{{"HTTP/1.1 200 OK", true, true}, {"HTTP/1.0 301 M", true, true}, {"HTTP/1.1 500 x", false, true},
		{"HTTP/1.1 2x0 OK", false, false}, {"HTTP/2 200 OK..", false, false}, {"HTTP/1.1 20", false, false}} {
		if ok, judged := judge([]byte(c.in)); ok != c.ok || judged != c.judged {
			t.Errorf("judge(%q) = %v %v", c.in, ok, judged)
		}
	}
	if Offset(0, 1, time.Second) != 0 || Offset(5, 10, 2*time.Second) != time.Second || Offset(9999, 10000, 2*time.Second) != 1999800*time.Microsecond {
		t.Error("Offset")
	}
	if Addr(rules.Check{Port: 81}, netip.MustParseAddrPort("10.0.0.1:80")).Port() != 81 {
		t.Error("check.port")
	}
	for p := phaseIdle; p <= phaseReading; p++ {
		if p.String() == "phase-?" {
			t.Errorf("phase %d has no name", p)
		}
	}
}
