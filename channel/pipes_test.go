package channel

import (
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// pipeChildEnv makes the test binary the unprivileged child of
// TestPipesUnprivileged.
const pipeChildEnv = "SLUICE_PIPE_CHILD"

// asNobody re-runs this test binary, test name run, as the user nobody
// (setpriv, no capabilities left), with pipeChildEnv set, and returns its
// output. The binary is copied where nobody may run it.
func asNobody(t *testing.T, run string) (string, error) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED: needs root to switch to the user nobody")
	}
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Skip("SKIPPED: needs setpriv (util-linux)")
	}
	dir := t.TempDir()
	for d := dir; d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
		os.Chmod(d, 0o755)
	}
	bin := filepath.Join(dir, "channel.test")
	src, err := os.Open(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(bin, os.O_CREATE|os.O_WRONLY, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	dst.Close()
	cmd := exec.Command(setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all",
		bin, "-test.run=^"+run+"$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), pipeChildEnv+"=1")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// Unprivileged, every pipe counts against pipe-user-pages-soft; past it the
// kernel gives new pipes 2 slots (8 KiB) and refuses to grow them, and
// splice through them crawls. A busy process (four loops' pools, 300 pipes
// wanted at once) must never be handed such a pipe: the budget stops short
// of the soft limit. Once the pipes come back, the pools keep only the
// budget's few free ones and close the rest, so idle pipes never hold the
// user's pipe pages.
func TestPipesUnprivileged(t *testing.T) {
	if os.Getenv(pipeChildEnv) == "" {
		out, err := asNobody(t, t.Name())
		t.Logf("child as nobody:\n%s", out)
		if err != nil || !strings.Contains(out, "--- PASS") {
			t.Fatalf("the unprivileged child failed: %v", err)
		}
		return
	}
	if os.Geteuid() == 0 {
		t.Fatal("the child runs as root")
	}
	budget := defaultTestBudget()
	pools := make([]*Pools, 4)
	for i := range pools {
		pools[i] = NewPools(0, 0, budget)
	}
	var got []*Pipe
	small := 0
	for i := 0; i < 300; i++ {
		p := pools[i%len(pools)]
		pp := p.getPipe()
		if pp == nil {
			continue // the budget said no: the channel stays on a buffer
		}
		sz, err := unix.FcntlInt(uintptr(pp.w), unix.F_GETPIPE_SZ, 0)
		if err != nil || sz != DefaultPipeSize || pp.size != sz {
			small++
			if small <= 3 {
				t.Errorf("pipe %d: F_GETPIPE_SZ %d (%v), pool says %d; want %d", i, sz, err, pp.size, DefaultPipeSize)
			}
		}
		got = append(got, pp)
	}
	t.Logf("handed out %d pipes (%d short of %d bytes), budget open %d denied %d", len(got), small, DefaultPipeSize, budget.Open(), budget.Denied())
	if small > 0 {
		t.Errorf("%d pipes were smaller than %d bytes", small, DefaultPipeSize)
	}
	if len(got) == 0 {
		t.Fatal("no pipe at all")
	}
	for i, pp := range got {
		pools[i%len(pools)].putPipe(pp)
	}
	var free int64
	for _, p := range pools {
		free += p.Stats().PipesFree
	}
	t.Logf("after return: %d free in the pools, %d open", free, budget.Open())
	if free != budget.Open() {
		t.Errorf("%d pipes open but %d free: pipes leaked", budget.Open(), free)
	}
	if limit := maxFreeFor(len(got)); free > int64(limit) {
		t.Errorf("the pools keep %d free pipes, want at most %d (a quarter of the %d handed out): surplus must be closed", free, limit, len(got))
	}
	for _, p := range pools {
		p.Close()
	}
	if budget.Open() != 0 {
		t.Errorf("after Close, %d pipes open", budget.Open())
	}
}

// defaultTestBudget is the budget the engine makes by default: an eighth
// of the fd limit, within the user's pipe allowance (MaxPipes, as engine.New).
func defaultTestBudget() *PipeBudget {
	var rl unix.Rlimit
	unix.Getrlimit(unix.RLIMIT_NOFILE, &rl)
	return NewPipeBudget(MaxPipes(0, int(rl.Cur), DefaultPipeSize))
}

func maxFreeFor(n int) int { return max(n/4, 1) }
