package engine

import (
	"net/netip"

	"golang.org/x/sys/unix"
)

// family is the socket family for a: AF_INET for a v4 or v4-mapped address
// (the form rawsys sends it in), AF_INET6 otherwise. Addresses themselves are
// coded and decoded by rawsys alone.
func family(a netip.Addr) int {
	if a.Is4() || a.Is4In6() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

func netipAddrPort(a netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(a, port) }
