package engine

import (
	"maps"
	"testing"

	"go.uber.org/zap/zapcore"
	"golang.org/x/sys/unix"

	"github.com/sluice-proxy/sluice/handshake"
	"github.com/sluice-proxy/sluice/internal/testpeer"
	"github.com/sluice-proxy/sluice/rules"
)

// openFDs counts fds exactly: ten more after five pipes.
func TestOpenFDs(t *testing.T) {
	var fds [5][2]int
	for try := 0; ; try++ {
		before := openFDs()
		for i := range fds {
			if err := unix.Pipe2(fds[i][:], unix.O_CLOEXEC); err != nil {
				t.Fatal(err)
			}
		}
		after := openFDs()
		for i := range fds {
			unix.Close(fds[i][0])
			unix.Close(fds[i][1])
		}
		if before > 0 && after-before == 10 {
			return
		}
		if try == 5 { // another goroutine of the test binary opened or closed an fd meanwhile, every time
			t.Fatalf("openFDs: %d before five pipes, %d after", before, after)
		}
	}
}

// A port-0 rule is named by the port it got, so two do not share a name.
func TestPortZeroRuleNames(t *testing.T) {
	b := backend(t)
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+b.Addr(), Config{})
	r, _ := rules.Parse("tcp 127.0.0.1:0 -> " + b.Addr())
	lns, err := e.Listen(r)
	if err != nil {
		t.Fatal(err)
	}
	st := e.Stats()
	if len(st.Rules) != 2 || st.Rules[0].Listen != "tcp "+addr || st.Rules[1].Listen != "tcp "+lns[0].Addr().String() {
		t.Errorf("names %q, %q", st.Rules[0].Listen, st.Rules[1].Listen)
	}
}

// Totals follow the traffic.
func TestTotals(t *testing.T) {
	needCounters(t)
	b := backend(t)
	e, addr := start(t, "tcp 127.0.0.1:0 -> "+b.Addr(), Config{})
	c := dial(t, addr)
	if err := testpeer.Exchange(c, 500, 700, 3); err != nil {
		t.Fatal(err)
	}
	c.Close()
	waitIdle(t, e)
	if tot := e.Totals(); tot.Accepted != 1 || tot.BytesUp != 516 || tot.BytesDown != 732 || tot.Sessions != 0 {
		t.Errorf("totals %+v", tot)
	}
}

// The stop line's tally leaves zeros out, but not accepted: a rule that
// saw nothing says so instead of logging an empty object.
func TestStopCounters(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   handshake.Stats
		want map[string]any
	}{
		{"nothing", handshake.Stats{}, map[string]any{"accepted": uint64(0)}},
		{"some", handshake.Stats{Accepted: 3, Passed: 2, Refused: map[string]map[string]uint64{"gate": {"denied": 1, "rate-limited": 0}},
			Ended: map[string]uint64{"done": 2, "idle-timeout": 0}},
			map[string]any{"accepted": uint64(3), "passed": uint64(2), "refused.gate.denied": uint64(1), "ended.done": uint64(2)}},
	} {
		enc := zapcore.NewMapObjectEncoder()
		if err := stopCounters(tc.in).MarshalLogObject(enc); err != nil {
			t.Fatal(err)
		}
		if !maps.Equal(enc.Fields, tc.want) {
			t.Errorf("%s: stopCounters = %v, want %v", tc.name, enc.Fields, tc.want)
		}
	}
}
