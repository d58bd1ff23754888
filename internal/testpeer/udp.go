package testpeer

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"sync"
	"time"
)

// UDPEcho sends every datagram it receives on pc back to its source,
// unchanged, until pc is closed. The returned func closes pc and waits.
func UDPEcho(pc net.PacketConn) (stop func()) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 65535)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(buf[:n], from)
		}
	}()
	return func() { pc.Close(); wg.Wait() }
}

// Datagram returns the test datagram number seq of client id: size bytes,
// starting with id and seq so a misrouted or mixed-up reply is caught.
func Datagram(id, seq, size int) []byte {
	if size < 8 {
		size = 8
	}
	b := make([]byte, size)
	binary.BigEndian.PutUint32(b, uint32(id))
	binary.BigEndian.PutUint32(b[4:], uint32(seq))
	for i := 8; i < size; i++ {
		b[i] = byte(id*31 + seq*7 + i)
	}
	return b
}

// UDPPingPong sends n datagrams of the given sizes (cycled) on c, one at a
// time, and checks that each comes back whole and unchanged within timeout.
func UDPPingPong(c net.Conn, id, n int, sizes []int, timeout time.Duration) error {
	buf := make([]byte, 65535)
	for seq := 0; seq < n; seq++ {
		want := Datagram(id, seq, sizes[seq%len(sizes)])
		if _, err := c.Write(want); err != nil {
			return fmt.Errorf("client %d datagram %d: write: %w", id, seq, err)
		}
		c.SetReadDeadline(time.Now().Add(timeout))
		got, err := c.Read(buf)
		if err != nil {
			return fmt.Errorf("client %d datagram %d (%d bytes): %w", id, seq, len(want), err)
		}
		if !bytes.Equal(buf[:got], want) {
			return fmt.Errorf("client %d datagram %d: got %d bytes, want %d, content differs or another client's", id, seq, got, len(want))
		}
	}
	return nil
}
