package rules

import (
	"strings"
	"testing"
	"time"
)

// checkLines parse, and print as their canonical form ("" = canonical).
var checkLines = []lineCase{
	{"tcp 0.0.0.0:80 -> 127.0.0.1:8080 check=tcp", ""},
	{"tcp 0.0.0.0:80 -> 127.0.0.1:8080,127.0.0.2:8080 check=http check.path=/healthz check.port=8081", ""},
	{"tcp 0.0.0.0:80 -> 127.0.0.1:8080 check.fall=5 check.rise=1 check.timeout=500ms check.interval=1s check=http",
		"tcp 0.0.0.0:80 -> 127.0.0.1:8080 check=http check.interval=1s check.timeout=500ms check.rise=1 check.fall=5"},
	{"tcp 0.0.0.0:80 -> 127.0.0.1:8080 check=http check.path=/a?b=c&d=%20", ""},
	{"tcp 0.0.0.0:9000-9099 -> 127.0.0.1:19000-19099 check=tcp check.interval=2s", ""},
	{"tcp 0.0.0.0:80 -> 127.0.0.1:8080 health=http monitor=10.0.0.0/8 check=tcp", ""},
}

func TestCheckOptionsRoundTrip(t *testing.T) {
	roundTrip(t, checkLines)
	r, _ := Parse("tcp 0.0.0.0:80 -> 127.0.0.1:8080 check=http check.port=81 check.rise=4")
	want := Check{Kind: CheckHTTP, Path: "/", Port: 81, Interval: 2 * time.Second, Timeout: time.Second, Rise: 4, Fall: 3}
	if got := r.Check.Effective(); got != want {
		t.Errorf("Effective = %+v, want %+v", got, want)
	}
}

func TestCheckOptionErrors(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"tcp 0.0.0.0:80 -> 127.0.0.1:80 check=udp", "want tcp or http"},
		{"tcp 0.0.0.0:80 -> 127.0.0.1:80 check", "needs a value"},
		{"tcp 0.0.0.0:80 -> 127.0.0.1:80 check.path=/x", "without check="},
		{"tcp 0.0.0.0:80 -> 127.0.0.1:80 check=tcp check.path=/x", "check.path needs check=http"},
		{"tcp 0.0.0.0:80 -> 127.0.0.1:80 check=http check.path=x", "starting with"},
		{"tcp 0.0.0.0:80 -> 127.0.0.1:80 check=http check.path=/a\x01", "printable"},
		{"tcp 0.0.0.0:80 -> 127.0.0.1:80 check=tcp check.port=0", "port 0"},
		{"tcp 0.0.0.0:80 -> 127.0.0.1:80 check=tcp check.port=70000", "0-65535"},
		{"tcp 0.0.0.0:80 -> 127.0.0.1:80 check=tcp check.interval=0s", "above 0"},
		{"tcp 0.0.0.0:80 -> 127.0.0.1:80 check=tcp check.rise=0", "whole number"},
		{"tcp 0.0.0.0:80 -> 127.0.0.1:80 check=tcp check.fall=101", "at most 100"},
		{"tcp 0.0.0.0:80 -> 127.0.0.1:80 check=tcp check.timeout=3s", "longer than check.interval=2s"},
		{"tcp 0.0.0.0:80 -> 127.0.0.1:80 check=tcp check.interval=500ms", "check.timeout=1s is longer"},
		{"tcp 0.0.0.0:80 -> 127.0.0.1:80 check=tcp check=http", "given twice"},
		{"tcp 0.0.0.0:80 health=http check=tcp", "needs a target"},
		{"udp 0.0.0.0:53 -> 127.0.0.1:53 check=tcp", "tcp rules only"},
		{"tcp 0.0.0.0:80 -> 127.0.0.1:80 check.bogus=1", "unknown option"},
	} {
		_, err := Parse(tc.in)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Parse(%q) = %v, want an error with %q", tc.in, err, tc.want)
		}
	}
	if CheckKind(9).String() != "check-9" || CheckHTTP.String() != "http" || CheckNone.String() != "none" {
		t.Error("CheckKind names")
	}
}
