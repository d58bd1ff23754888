// Package bitnames prints flag words: the set bits by name, joined by '|',
// the unknown ones in hex. Every package with flag bits (conn, channel,
// handshake, engine) keeps its own table of names and formats through here.
package bitnames

import "strconv"

// Bits is any unsigned flag word.
type Bits interface {
	~uint8 | ~uint16 | ~uint32 | ~uint64
}

// Name names one bit (or a group of bits printed as one).
type Name[T Bits] struct {
	Bit  T
	Name string
}

// Format names every set bit of v found in names, in the table's order,
// joined by '|'; bits without a name are shown last as one hex number. The
// zero word is "0".
func Format[T Bits](v T, names []Name[T]) string {
	if v == 0 {
		return "0"
	}
	var b []byte
	for _, n := range names {
		if n.Bit != 0 && v&n.Bit == n.Bit {
			if len(b) > 0 {
				b = append(b, '|')
			}
			b = append(b, n.Name...)
			v &^= n.Bit
		}
	}
	if v != 0 {
		if len(b) > 0 {
			b = append(b, '|')
		}
		b = append(b, "0x"...)
		b = strconv.AppendUint(b, uint64(v), 16)
	}
	return string(b)
}

// Missing returns the bits of all that no entry of names covers: a test of
// a flag type asserts it is 0, so a bit added without a name fails it.
func Missing[T Bits](all T, names []Name[T]) T {
	for _, n := range names {
		all &^= n.Bit
	}
	return all
}
