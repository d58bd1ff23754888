package engine

import (
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/rules"
)

func fdInode(t *testing.T, fd int) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// An offered socket is the one Apply uses for its key: no bind (the port
// is the offered socket's inode); ListenFiles hands it on with its key;
// Release closes the engine's copy without a shutdown, so a copy held
// elsewhere still listens and queues connections.
func TestInheritApplyRelease(t *testing.T) {
	e := newEngine(t)
	fd, bound, err := listenSocket(nil, rules.TCP, netip.MustParseAddrPort("127.0.0.1:0"))
	if err != nil {
		t.Fatal(err)
	}
	ino := fdInode(t, fd)
	r := mustRule(t, fmt.Sprintf("tcp 127.0.0.1:%d -> 127.0.0.1:1", bound.Port()))
	key := r.ListenKeys()[0]
	if err := e.Inherit(rules.Key{Proto: rules.UDP, Addr: key.Addr, Port: key.Port}, fd); err == nil {
		t.Fatal("a tcp socket offered as udp was taken")
	}
	if err := e.Inherit(key, fd); err != nil {
		t.Fatal(err)
	}
	sum, err := e.Apply([]*rules.Rule{r})
	if err != nil || !sum.OK() {
		t.Fatalf("apply: %v %+v", err, sum)
	}
	if _, err := e.Commit(); err != nil {
		t.Fatal(err)
	}
	lns := e.Listeners()
	if len(lns) != 1 || lns[0].fd != fd || fdInode(t, lns[0].fd) != ino {
		t.Fatalf("the listener is not the offered socket")
	}
	if left := e.CloseInherited(); len(left) != 0 {
		t.Fatalf("left over: %v", left)
	}
	files, err := e.ListenFiles()
	if err != nil || len(files) != 1 || files[0].Key != key {
		t.Fatalf("ListenFiles: %v %v", files, err)
	}
	copyFd := int(files[0].File.Fd())
	defer files[0].File.Close()
	if fdInode(t, copyFd) != ino {
		t.Fatal("the handed file is another socket")
	}
	e.Release()
	if len(e.Listeners()) != 0 {
		t.Fatal("listeners left after Release")
	}
	// The copy still listens: a connect is queued, and accepted from it.
	c, err := net.DialTimeout("tcp", bound.String(), 2*time.Second)
	if err != nil {
		t.Fatalf("connect after Release: %v", err)
	}
	defer c.Close()
	if v, err := unix.GetsockoptInt(copyFd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || v != 1 {
		t.Fatalf("the socket left LISTEN after Release (SO_ACCEPTCONN %d, %v)", v, err)
	}
	unix.SetNonblock(copyFd, false)
	nfd, _, err := unix.Accept(copyFd)
	if err != nil {
		t.Fatalf("accept from the copy: %v", err)
	}
	unix.Close(nfd)
}
