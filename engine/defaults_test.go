package engine

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/handshake"
	"github.com/sluice-proxy/sluice/rules"
)

// The defaults `sluice help rules`, the man page and README print are the
// ones the code applies: each OptionDocs default that is a constant is
// compared with it here (durations by value: "60s" is "1m"), so changing
// one without the other fails.
func TestOptionDocDefaults(t *testing.T) {
	want := map[string][]any{
		"timeout.connect":   {DefaultConnectTimeout},
		"timeout.idle":      {DefaultIdleTimeout, "TCP", DefaultUDPIdleTimeout, "UDP"},
		"timeout.handshake": {handshake.DefaultTimeout},
		"sockbuf":           {rules.FormatSockBuf(DefaultSockBuf)},
		"check.path":        {rules.DefaultCheckPath},
		"check.interval":    {rules.DefaultCheckInterval},
		"check.timeout":     {rules.DefaultCheckTimeout},
		"check.rise":        {fmt.Sprint(rules.DefaultCheckRise)},
		"check.fall":        {fmt.Sprint(rules.DefaultCheckFall)},
		"resolve":           {rules.DefaultResolve},
	}
	for _, d := range rules.OptionDocs {
		w, ok := want[d.Name]
		if !ok {
			continue
		}
		delete(want, d.Name)
		words := strings.Fields(strings.ReplaceAll(d.Default, ",", " "))
		if len(words) != len(w) {
			t.Errorf("OptionDocs %s: default %q, the code's is %v", d.Name, d.Default, w)
			continue
		}
		for i, v := range w {
			match := words[i] == fmt.Sprint(v)
			if dur, isDur := v.(time.Duration); isDur {
				got, err := time.ParseDuration(words[i])
				match = err == nil && got == dur
			}
			if !match {
				t.Errorf("OptionDocs %s: default %q, the code's is %v", d.Name, d.Default, w)
				break
			}
		}
	}
	for name := range want {
		t.Errorf("OptionDocs has no %s", name)
	}
}
