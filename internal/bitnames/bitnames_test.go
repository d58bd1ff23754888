package bitnames

import "testing"

type flags uint16

var names = []Name[flags]{{0x1, "A"}, {0x2, "B"}, {0x8, "D"}}

func TestFormat(t *testing.T) {
	for _, tc := range []struct {
		v    flags
		want string
	}{
		{0, "0"}, {0x1, "A"}, {0x3, "A|B"}, {0xb, "A|B|D"}, {0x4, "0x4"}, {0x15, "A|0x14"},
	} {
		if got := Format(tc.v, names); got != tc.want {
			t.Errorf("Format(%#x) = %q, want %q", tc.v, got, tc.want)
		}
	}
	if m := Missing(flags(0xf), names); m != 0x4 {
		t.Errorf("Missing = %#x, want 0x4", m)
	}
}
