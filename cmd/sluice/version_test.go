package main

import (
	"runtime/debug"
	"testing"
)

func TestVersionOf(t *testing.T) {
	for _, tc := range []struct {
		name string
		bi   *debug.BuildInfo
		ok   bool
		want string
	}{
		{"no build info", nil, false, "devel"},
		{"devel, no vcs", &debug.BuildInfo{Main: debug.Module{Version: "(devel)"}}, true, "devel"},
		{"a tag", &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: "v1.2.3"}}, true, "v1.2.3 (go1.26.8)"},
		{"a pseudo-version from a dirty tree", &debug.BuildInfo{
			GoVersion: "go1.26.8",
			Main:      debug.Module{Version: "v0.0.0-20261202134812-d7c1008abcde+dirty"},
			Settings: []debug.BuildSetting{
				{Key: "vcs.revision", Value: "d7c1008abcdef0123456789"},
				{Key: "vcs.time", Value: "2026-12-02T13:48:12Z"},
				{Key: "vcs.modified", Value: "true"},
			}}, true,
			"v0.0.0-20261202134812-d7c1008abcde+dirty (rev d7c1008abcde, 2026-12-02T13:48:12Z, dirty, go1.26.8)"},
	} {
		if got := versionOf(tc.bi, tc.ok); got != tc.want {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}
}

func TestWithRev(t *testing.T) {
	defer func(r string) { buildRev = r }(buildRev)
	buildRev = "d7c1008abcde-dirty"
	bi, ok := withRev(&debug.BuildInfo{Main: debug.Module{Version: "(devel)"}}, true)
	if got, want := versionOf(bi, ok), "devel (rev d7c1008abcde, dirty)"; got != want {
		t.Errorf("from the Makefile's revision: %q, want %q", got, want)
	}
	stamped := &debug.BuildInfo{Settings: []debug.BuildSetting{{Key: "vcs.revision", Value: "0123456789ab"}}}
	if bi, _ := withRev(stamped, true); versionOf(bi, true) != "devel (rev 0123456789ab)" {
		t.Errorf("the go command's stamp must win: %q", versionOf(bi, true))
	}
	buildRev = ""
	if got := versionOf(withRev(nil, false)); got != "devel" {
		t.Errorf("no information: %q", got)
	}
}
