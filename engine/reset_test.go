package engine

import (
	"bytes"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/rules"
)

// resetVolume is what the side that resets sent first: more than one
// channel buffer, less than the loopback socket buffers on the way hold, so
// all of it can be in sluice when the reset comes.
const resetVolume = 256 << 10

// A side that sends its bytes and then resets (an HTTP server closing with
// unread input) does not cost the other side those bytes: what sluice was
// given reaches the healthy side, which then gets the reset, for both
// directions and both ways of moving bytes. The healthy side reads only
// after the reset, so the bytes sit in sluice's sockets and channel when it
// comes.
func TestResetDeliversHeldBytes(t *testing.T) {
	for _, mode := range []rules.SpliceMode{rules.SpliceOff, rules.SpliceOn} {
		for _, who := range []string{"server", "client"} {
			t.Run(who+"-resets/splice="+mode.String(), func(t *testing.T) { resetDelivers(t, who, mode) })
		}
	}
}

func resetDelivers(t *testing.T, who string, mode rules.SpliceMode) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	srvc := make(chan *net.TCPConn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(srvc)
			return
		}
		srvc <- c.(*net.TCPConn)
	}()
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+ln.Addr().String()+" splice="+mode.String(), Config{Loops: 1})
	cli := dial(t, addr)
	defer cli.Close()
	srv := <-srvc
	if srv == nil {
		t.Fatal("backend accept failed")
	}
	defer srv.Close()

	reset, healthy := srv, cli
	if who == "client" {
		reset, healthy = cli, srv
	}
	want := bytes.Repeat([]byte("0123456789abcdef"), resetVolume/16)
	if _, err := reset.Write(want); err != nil {
		t.Fatal(err)
	}
	// Reset only once every byte left: sluice's socket acknowledged it.
	deadline := time.Now().Add(5 * time.Second)
	for outq(t, reset) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d bytes still unacknowledged by sluice after 5s", outq(t, reset))
		}
		time.Sleep(5 * time.Millisecond)
	}
	reset.SetLinger(0)
	reset.Close()
	time.Sleep(100 * time.Millisecond) // sluice sees the reset before the healthy side reads

	healthy.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(healthy)
	t.Logf("%s reset: the other side read %d of %d bytes, then %v", who, len(got), len(want), err)
	if !bytes.Equal(got, want) {
		t.Errorf("the healthy side got %d of the %d bytes sent before the reset", len(got), len(want))
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("after the bytes: %v, want a connection reset (the abnormal end is signalled)", err)
	}
	waitIdle(t, e)
	code := who + "-reset"
	if n := e.Stats().Ended[code]; n != 1 {
		t.Errorf("ended %v, want one %s", e.Stats().Ended, code)
	}
}

// outq returns the bytes c's socket has not had acknowledged.
func outq(t *testing.T, c *net.TCPConn) int {
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	rc.Control(func(fd uintptr) { n, err = unix.IoctlGetInt(int(fd), unix.SIOCOUTQ) })
	if err != nil {
		t.Fatal(err)
	}
	return n
}
