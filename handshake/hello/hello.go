// Package hello reads a TLS ClientHello without I/O: a Scanner follows the
// TLS records (content type 22) of the bytes a client sent so far and
// reassembles the one handshake message they carry, across any number of
// records and reads (RFC 8446 §5.1 lets a message span records); Parse reads
// its server_name and ALPN with cryptobyte, as crypto/tls does. It never
// blocks, keeps no goroutine and allocates nothing: the caller owns the
// bytes.
package hello

import (
	"errors"

	"golang.org/x/crypto/cryptobyte"
)

// Bounds. A ClientHello is a few hundred bytes, 1.5–2 KB with a
// post-quantum key share; Envoy caps it at 16 KiB too.
const (
	MaxMessage = 16 << 10 // handshake message body, header excluded
	// MaxRaw bounds the bytes read to find the message: record headers
	// included, so a hello cut into records so small that their framing
	// exceeds it is refused as oversized.
	MaxRaw    = 32 << 10
	MaxALPN   = 16 // ALPN protocols kept of a hello (further ones are ignored)
	recHdrLen = 5
	hsHdrLen  = 4
)

// Status is where a Scanner is.
type Status uint8

const (
	NeedMore  Status = iota // the message is not complete yet
	Complete                // the whole ClientHello is in the bytes scanned
	NotTLS                  // the first bytes are not a TLS handshake record
	Oversized               // the message (or its framing) is longer than allowed
	Bad                     // malformed framing: another record type, a bad length, not a ClientHello
)

var statusNames = [...]string{"need-more", "complete", "not-tls", "oversized", "bad"}

func (s Status) String() string {
	if int(s) < len(statusNames) {
		return statusNames[s]
	}
	return "status-?"
}

// Scanner follows the records of a client's first bytes. The zero value is
// ready. It holds offsets only, never the bytes.
type Scanner struct {
	off     int     // bytes of raw examined
	recLeft int     // bytes of the current record's body not yet examined; 0: a record header is next
	hdr     [4]byte // the handshake message header, as it arrives
	hdrN    int     // bytes of hdr received
	msgLen  int     // the message's length, header included (valid once hdrN == 4)
	got     int     // message bytes received, header included
	records int     // records that carried some of the message
	done    Status  // a final status, once reached (0: not yet)
}

// Records returns how many records carried the message so far.
func (s *Scanner) Records() int { return s.records }

// Len returns the message length, header included, once known (else 0).
func (s *Scanner) Len() int {
	if s.hdrN < hsHdrLen {
		return 0
	}
	return s.msgLen
}

// Scan goes on over raw: every byte the client sent so far, from its first
// (the bytes of the previous call and possibly more). It returns NeedMore
// until the message is complete (Complete) or the bytes cannot be a hello
// (NotTLS, Oversized, Bad); a final status is returned again by later calls.
// Bytes after the message are not examined.
func (s *Scanner) Scan(raw []byte) Status {
	if s.done != NeedMore {
		return s.done
	}
	s.done = s.scan(raw)
	return s.done
}

func (s *Scanner) scan(raw []byte) Status {
	if len(raw) > 0 && raw[0] != 22 {
		return NotTLS // not a handshake record: another protocol
	}
	if len(raw) > 1 && raw[1] != 3 {
		return NotTLS // no TLS version major 3: another protocol starting with 0x16
	}
	for s.off < len(raw) {
		if s.recLeft == 0 {
			if len(raw)-s.off < recHdrLen {
				break
			}
			h := raw[s.off : s.off+recHdrLen]
			n := int(h[3])<<8 | int(h[4])
			switch {
			case h[0] != 22 || h[1] != 3:
				return Bad // the hello is interleaved with another record type
			case n == 0 || n > 1<<14:
				return Bad // RFC 8446 §5.1: no empty handshake fragments, at most 2^14 bytes
			}
			s.off += recHdrLen
			s.recLeft = n
			s.records++
			continue
		}
		take := min(s.recLeft, len(raw)-s.off, s.need())
		for i := 0; i < take && s.hdrN < hsHdrLen; i++ {
			s.hdr[s.hdrN] = raw[s.off+i]
			s.hdrN++
			if s.hdrN == hsHdrLen {
				if s.hdr[0] != 1 {
					return Bad // the first handshake message must be a ClientHello
				}
				body := int(s.hdr[1])<<16 | int(s.hdr[2])<<8 | int(s.hdr[3])
				if body > MaxMessage {
					return Oversized
				}
				s.msgLen = hsHdrLen + body
			}
		}
		s.got += take
		s.off += take
		s.recLeft -= take
		if s.hdrN == hsHdrLen && s.got == s.msgLen {
			return Complete
		}
	}
	if s.off > MaxRaw || len(raw) >= MaxRaw {
		return Oversized
	}
	return NeedMore
}

// need returns how many message bytes are still wanted (header ones while
// the length is unknown).
func (s *Scanner) need() int {
	if s.hdrN < hsHdrLen {
		return hsHdrLen - s.hdrN
	}
	return s.msgLen - s.got
}

// Message returns the complete message, header included, of raw (the bytes
// Scan returned Complete on): a slice of raw when one record carries it all,
// else the record bodies joined into scratch, which must hold Len bytes. It
// returns nil when the scan is not Complete or scratch is too small.
func (s *Scanner) Message(raw, scratch []byte) []byte {
	if s.done != Complete {
		return nil
	}
	if s.records == 1 {
		return raw[recHdrLen : recHdrLen+s.msgLen]
	}
	if len(scratch) < s.msgLen {
		return nil
	}
	n, off := 0, 0
	for n < s.msgLen {
		rec := int(raw[off+3])<<8 | int(raw[off+4])
		off += recHdrLen
		// The record that ends the message may go on past it, and past
		// what the client sent so far: copy only what raw holds.
		end := min(off+rec, len(raw))
		n += copy(scratch[n:s.msgLen], raw[off:end])
		off = end
	}
	return scratch[:s.msgLen]
}

// Hello is what routing needs of a ClientHello. Its slices point into the
// message given to Parse.
type Hello struct {
	ServerName []byte // the server_name extension's host_name; nil when absent
	ALPN       [MaxALPN][]byte
	NALPN      int // protocols in ALPN
}

// Protocols returns the ALPN protocols offered, in the client's order.
func (h *Hello) Protocols() [][]byte { return h.ALPN[:h.NALPN] }

// ErrBad is the error of a message that is not a well-formed ClientHello.
var ErrBad = errors.New("malformed ClientHello")

// Extension numbers (RFC 6066, RFC 7301).
const (
	extServerName = 0
	extALPN       = 16
)

// Parse reads msg, a handshake message with its 4-byte header, as a
// ClientHello into h. It returns nil, or ErrBad. Under ECH the outer hello's
// name is the one read, as routing wants.
func Parse(msg []byte, h *Hello) error {
	*h = Hello{}
	in := cryptobyte.String(msg)
	var typ uint8
	var body cryptobyte.String
	if !in.ReadUint8(&typ) || typ != 1 || !in.ReadUint24LengthPrefixed(&body) || !in.Empty() {
		return ErrBad
	}
	var vers uint16
	var random, sid, suites, comp cryptobyte.String
	if !body.ReadUint16(&vers) || !body.ReadBytes((*[]byte)(&random), 32) ||
		!body.ReadUint8LengthPrefixed(&sid) || len(sid) > 32 ||
		!body.ReadUint16LengthPrefixed(&suites) || len(suites) == 0 || len(suites)%2 != 0 ||
		!body.ReadUint8LengthPrefixed(&comp) || len(comp) == 0 {
		return ErrBad
	}
	if body.Empty() {
		return nil // no extensions: an old client; no name, no ALPN
	}
	var exts cryptobyte.String
	if !body.ReadUint16LengthPrefixed(&exts) || !body.Empty() {
		return ErrBad
	}
	var seenName, seenALPN bool
	for !exts.Empty() {
		var ext uint16
		var data cryptobyte.String
		if !exts.ReadUint16(&ext) || !exts.ReadUint16LengthPrefixed(&data) {
			return ErrBad
		}
		switch ext {
		case extServerName:
			if seenName || !parseServerName(data, h) {
				return ErrBad
			}
			seenName = true
		case extALPN:
			if seenALPN || !parseALPN(data, h) {
				return ErrBad
			}
			seenALPN = true
		}
	}
	return nil
}

// parseServerName reads the server_name extension (RFC 6066 §3): a list of
// names, of which the host_name (type 0) is kept.
func parseServerName(data cryptobyte.String, h *Hello) bool {
	var list cryptobyte.String
	if !data.ReadUint16LengthPrefixed(&list) || !data.Empty() || list.Empty() {
		return false
	}
	for !list.Empty() {
		var typ uint8
		var name cryptobyte.String
		if !list.ReadUint8(&typ) || !list.ReadUint16LengthPrefixed(&name) {
			return false
		}
		if typ != 0 {
			continue
		}
		if len(name) == 0 || h.ServerName != nil {
			return false // RFC 6066: at most one name of a type
		}
		h.ServerName = name
	}
	return true
}

// parseALPN reads the ALPN extension (RFC 7301 §3.1): a non-empty list of
// non-empty protocol names.
func parseALPN(data cryptobyte.String, h *Hello) bool {
	var list cryptobyte.String
	if !data.ReadUint16LengthPrefixed(&list) || !data.Empty() || list.Empty() {
		return false
	}
	for !list.Empty() {
		var p cryptobyte.String
		if !list.ReadUint8LengthPrefixed(&p) || len(p) == 0 {
			return false
		}
		if h.NALPN < MaxALPN {
			h.ALPN[h.NALPN] = p
			h.NALPN++
		}
	}
	return true
}
