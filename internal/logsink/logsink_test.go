package logsink

import (
	"bytes"
	"io"
	"os"
	"testing"
	"time"
)

// A pipe nobody reads: writes never block, what does not fit is dropped and
// counted, and Sync gives up after its bound.
func TestStuckReaderNeverBlocks(t *testing.T) {
	r, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer pw.Close()
	w := New(pw, 4096)
	before := Dropped()
	line := bytes.Repeat([]byte("x"), 99)
	line = append(line, '\n')
	t0 := time.Now()
	const n = 20000 // 2 MB: far more than the pipe (64 KiB) and the buffer hold
	for i := 0; i < n; i++ {
		w.Write(line)
	}
	took := time.Since(t0)
	d := Dropped() - before
	t.Logf("%d writes of %d bytes in %v to a pipe nobody reads: %d dropped", n, len(line), took, d)
	if took > 2*time.Second {
		t.Errorf("writes took %v: they waited for the reader", took)
	}
	if d == 0 || d >= n {
		t.Errorf("%d of %d writes dropped; want some kept, the rest dropped", d, n)
	}
	t0 = time.Now()
	w.Sync()
	if took := time.Since(t0); took > 3*syncWait {
		t.Errorf("Sync took %v with a stuck reader", took)
	}
}

// With a reader, every line arrives whole and in order, and Sync waits for
// them.
func TestWritesArrive(t *testing.T) {
	r, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	var got bytes.Buffer
	read := make(chan struct{})
	go func() { io.Copy(&got, r); close(read) }()
	w := New(pw, 0)
	var want bytes.Buffer
	for i := 0; i < 1000; i++ {
		line := []byte("line " + string(rune('a'+i%26)) + "\n")
		want.Write(line)
		w.Write(line)
	}
	w.Sync()
	pw.Close()
	<-read
	if !bytes.Equal(got.Bytes(), want.Bytes()) {
		t.Errorf("got %d bytes, want %d", got.Len(), want.Len())
	}
	if n := testing.AllocsPerRun(100, func() { w.Write([]byte("x\n")) }); n != 0 {
		t.Errorf("Write allocates %v times", n)
	}
}
