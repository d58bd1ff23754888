package handshake

import (
	"testing"
	"unsafe"
)

// What a routed session keeps of its hello: the route's own strings when
// they are what the hello said (no copy), else a lower-cased copy.
func TestSeenStrings(t *testing.T) {
	names := []string{"a.example.com", "*.b.example.com"}
	for _, tc := range []struct {
		name, want string
		shared     bool // the route's own string
	}{
		{"a.example.com", "a.example.com", true},
		{"A.Example.COM.", "a.example.com", true},
		{"X.b.Example.com", "x.b.example.com", false},
		{"", "", false},
	} {
		got := seenName(names, []byte(tc.name))
		if got != tc.want {
			t.Errorf("seenName(%q) = %q, want %q", tc.name, got, tc.want)
		}
		if shared := got != "" && unsafe.StringData(got) == unsafe.StringData(names[0]); shared != tc.shared {
			t.Errorf("seenName(%q): the route's string %v, want %v", tc.name, shared, tc.shared)
		}
	}
	if n := testing.AllocsPerRun(100, func() { seenName(names, []byte("A.EXAMPLE.com")) }); n != 0 {
		t.Errorf("an exact name costs %v allocations, want none", n)
	}

	offered := [][]byte{[]byte("http/1.1"), []byte("h2")}
	for _, tc := range []struct {
		route   []string
		offered [][]byte
		want    string
	}{
		{[]string{"h2"}, offered, "h2"},                 // the protocol that chose the route
		{nil, offered, "http/1.1"},                      // else the client's first
		{nil, [][]byte{[]byte("x-custom")}, "x-custom"}, // copied
		{nil, nil, ""},
	} {
		if got := seenProto(tc.route, tc.offered); got != tc.want {
			t.Errorf("seenProto(%q, %q) = %q, want %q", tc.route, tc.offered, got, tc.want)
		}
	}
	if n := testing.AllocsPerRun(100, func() { seenProto(nil, offered) }); n != 0 {
		t.Errorf("a common protocol costs %v allocations, want none", n)
	}
}
