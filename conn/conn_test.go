package conn

import (
	"errors"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestEveryFlagBitHasAName(t *testing.T) {
	for bit := Flags(1); bit != 0 && bit <= allFlags; bit <<= 1 {
		if allFlags&bit == 0 {
			continue
		}
		if s := bit.String(); strings.HasPrefix(s, "0x") {
			t.Errorf("flag bit %#x has no name", uint32(bit))
		}
	}
	if got := (FDAlloc | CtrlShutW | 0x80000000).String(); got != "FD_ALLOC|CTRL_SHUTW|0x80000000" {
		t.Errorf("String = %q", got)
	}
}

func TestEveryCodeHasAName(t *testing.T) {
	seen := map[string]Code{}
	for c := Code(0); c < codeCount; c++ {
		name := c.String()
		if reservedCode(c) {
			continue
		}
		if strings.HasPrefix(name, "code-") {
			t.Errorf("code %d has no name", c)
		}
		if prev, dup := seen[name]; dup {
			t.Errorf("codes %d and %d share the name %q", prev, c, name)
		}
		seen[name] = c
	}
	if got := Code(999).String(); got != "code-999" {
		t.Errorf("unknown code String = %q", got)
	}
}

// Codes are a stable, public numbering: a renumbering must fail here.
func TestCodeNumbersAreStable(t *testing.T) {
	want := map[Code]string{0: "none", 1: "done", 2: "proxy-truncated", 3: "proxy-bad", 4: "proxy-not-trusted",
		5: "denied", 6: "rate-limited", 7: "handshake-timeout", 8: "connect-refused", 9: "connect-timeout",
		10: "client-reset", 11: "server-reset", 12: "idle-timeout", 13: "connect-error", 14: "stopping",
		15: "resource", 16: "health", 17: "proxy-oversized", 18: "proxy-missing", 24: "no-backend"}
	for c, name := range want {
		if c.String() != name {
			t.Errorf("code %d = %q, want %q", c, c.String(), name)
		}
	}
}

func TestStepTransitions(t *testing.T) {
	ops := []Flags{OpAcceptProxy, OpSendProxy, OpDataAccept, OpDataConnect}
	steps := []struct {
		s               Step
		wanted, pending bool
		name            string
	}{
		{StepNone, false, false, "none"},
		{StepWanted, true, true, "wanted"},
		{StepStarted, true, true, "started"},
		{StepDone, true, false, "done"},
	}
	for _, op := range ops {
		var c Conn
		c.Init(-1, nil, true)
		base := c.Flags()
		for _, st := range steps {
			c.SetOp(op, st.s)
			if got := c.Op(op); got != st.s {
				t.Errorf("op %v: set %v, got %v", op, st.s, got)
			}
			if st.s.Wanted() != st.wanted || st.s.Pending() != st.pending || st.s.String() != st.name {
				t.Errorf("step %v: wanted=%v pending=%v name=%q", st.s, st.s.Wanted(), st.s.Pending(), st.s.String())
			}
			// Other operations and the layer bits are untouched.
			if c.Flags()&^op != base {
				t.Errorf("op %v step %v changed other bits: %v", op, st.s, c.Flags()&^op)
			}
		}
		// started -> done clears the "not finished" bit only.
		c.SetOp(op, StepStarted)
		c.SetOp(op, StepDone)
		if c.Op(op).Pending() {
			t.Errorf("op %v still pending after done", op)
		}
	}
}

// agains is a data layer whose ShutW and Close say EAGAIN a given number of
// times before they complete, as TLS does on a full socket buffer.
type agains struct{ shutw, close, shutwCalls, closeCalls int }

func (a *agains) ShutW(*Conn) error {
	a.shutwCalls++
	if a.shutw > 0 {
		a.shutw--
		return unix.EAGAIN
	}
	return nil
}

func (a *agains) Close(*Conn) error {
	a.closeCalls++
	if a.close > 0 {
		a.close--
		return unix.EAGAIN
	}
	return nil
}

func socketpair(t *testing.T) (int, int) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fds[1]) })
	return fds[0], fds[1]
}

func TestShutWSequenceResumesAfterEAGAIN(t *testing.T) {
	a, b := socketpair(t)
	layer := &agains{shutw: 2}
	var c Conn
	c.Init(a, layer, true)
	for i := 0; i < 2; i++ {
		if err := c.ShutW(); err != unix.EAGAIN {
			t.Fatalf("call %d: %v, want EAGAIN", i, err)
		}
		if c.Flags()&(DataShutW|CtrlShutW|FDShutW) != 0 {
			t.Fatalf("call %d: steps recorded before the data layer finished: %v", i, c.Flags())
		}
	}
	if err := c.ShutW(); err != nil {
		t.Fatal(err)
	}
	if !c.Has(DataShutW | CtrlShutW | FDShutW) {
		t.Fatalf("flags %v", c.Flags())
	}
	// The peer sees EOF: the CTRL step really called shutdown(2).
	var buf [1]byte
	if n, err := unix.Read(b, buf[:]); n != 0 || err != nil {
		t.Fatalf("peer read %d, %v; want EOF", n, err)
	}
	// Done steps are not repeated.
	calls := layer.shutwCalls
	if err := c.ShutW(); err != nil || layer.shutwCalls != calls {
		t.Fatalf("second ShutW: %v, calls %d -> %d", err, calls, layer.shutwCalls)
	}
	if err := c.Close(false); err != nil {
		t.Fatal(err)
	}
}

func TestCloseSequence(t *testing.T) {
	t.Run("eagain then close", func(t *testing.T) {
		a, _ := socketpair(t)
		layer := &agains{close: 1}
		var c Conn
		c.Init(a, layer, true)
		if err := c.Close(false); err != unix.EAGAIN {
			t.Fatalf("%v, want EAGAIN", err)
		}
		if c.FD() != a {
			t.Fatal("fd released before the data layer closed")
		}
		if err := c.Close(false); err != nil {
			t.Fatal(err)
		}
		if c.FD() != -1 || !c.Has(Closed) || c.Has(FDAlloc) {
			t.Fatalf("after close: fd %d flags %v", c.FD(), c.Flags())
		}
		if err := c.Close(false); err != nil { // idempotent
			t.Fatal(err)
		}
		if err := c.ShutW(); !errors.Is(err, errClosed) {
			t.Fatalf("ShutW after close: %v", err)
		}
	})
	t.Run("abort resets the peer", func(t *testing.T) {
		ln, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(ln)
		if err := unix.Bind(ln, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
			t.Fatal(err)
		}
		unix.Listen(ln, 1)
		sa, _ := unix.Getsockname(ln)
		cl, _ := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
		defer unix.Close(cl)
		if err := unix.Connect(cl, sa); err != nil {
			t.Fatal(err)
		}
		fd, _, err := unix.Accept(ln)
		if err != nil {
			t.Fatal(err)
		}
		var c Conn
		c.Init(fd, nil, true)
		if err := c.Close(true); err != nil {
			t.Fatal(err)
		}
		var buf [1]byte
		if _, err := unix.Read(cl, buf[:]); err != unix.ECONNRESET {
			t.Fatalf("peer read: %v, want ECONNRESET", err)
		}
	})
}
