package bench

import "testing"

// One stream through the engine by socket buffer size (sockbuf=): the
// default must cost nothing against the kernel's autotuning (auto).
func BenchmarkEngineStreamSockBufAuto(b *testing.B)          { benchStream(b, "splice=on sockbuf=auto") }
func BenchmarkEngineStreamSockBuf256k(b *testing.B)          { benchStream(b, "splice=on sockbuf=256k") }
func BenchmarkEngineStreamSockBuf1m(b *testing.B)            { benchStream(b, "splice=on sockbuf=1m") }
func BenchmarkEngineStreamSockBufDefault(b *testing.B)       { benchStream(b, "splice=on") }
func BenchmarkEngineStreamSockBufAutoBuffer(b *testing.B)    { benchStream(b, "splice=off sockbuf=auto") }
func BenchmarkEngineStreamSockBufDefaultBuffer(b *testing.B) { benchStream(b, "splice=off") }
