package main

import (
	"runtime/debug"
	"strings"
)

// version is this build's version as the go command stamped it: the module
// version (a tag, or a pseudo-version naming the commit), then the VCS
// revision, its time and "dirty" when the tree had uncommitted changes. A
// build without that information (go run of a file list) says "devel".
var version = versionOf(withRev(debug.ReadBuildInfo()))

// buildRev is the VCS revision the Makefile passes (-ldflags -X), for
// builds where the go command could not stamp it (-buildvcs=false, or git
// refusing a checkout owned by another user): "REV" or "REV-dirty".
var buildRev string

// withRev adds buildRev to bi's settings when the go command stamped none.
func withRev(bi *debug.BuildInfo, ok bool) (*debug.BuildInfo, bool) {
	if buildRev == "" {
		return bi, ok
	}
	if !ok || bi == nil {
		bi, ok = &debug.BuildInfo{}, true
	}
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" {
			return bi, ok
		}
	}
	rev, dirty := strings.CutSuffix(buildRev, "-dirty")
	c := *bi
	c.Settings = append(append([]debug.BuildSetting(nil), bi.Settings...), debug.BuildSetting{Key: "vcs.revision", Value: rev})
	if dirty {
		c.Settings = append(c.Settings, debug.BuildSetting{Key: "vcs.modified", Value: "true"})
	}
	return &c, true
}

// versionOf formats bi, the build information (ok false: none).
func versionOf(bi *debug.BuildInfo, ok bool) string {
	if !ok || bi == nil {
		return "devel"
	}
	v := bi.Main.Version
	if v == "" || v == "(devel)" {
		v = "devel"
	}
	var rev, at string
	dirty := false
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.time":
			at = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	var extra []string
	if rev != "" {
		if len(rev) > 12 {
			rev = rev[:12]
		}
		extra = append(extra, "rev "+rev)
	}
	if at != "" {
		extra = append(extra, at)
	}
	if dirty {
		extra = append(extra, "dirty")
	}
	if bi.GoVersion != "" {
		extra = append(extra, bi.GoVersion)
	}
	if len(extra) == 0 {
		return v
	}
	return v + " (" + strings.Join(extra, ", ") + ")"
}
