// Package limits holds bounded per-source state for connection rules: a
// table of new-connection rates keyed by source address, like HAProxy's stick
// tables. Its memory is bounded whatever the number of distinct sources: when
// full, the least recently seen source is forgotten (an entry older than two
// seconds no longer counts anyway, and such entries are the first evicted).
package limits

import (
	"hash/maphash"
	"net/netip"
	"sync"
)

const shards = 16 // independent locks, so loops rarely contend

// RateTable counts new connections per source over a sliding one-second
// window and says whether one more is within the limit. Safe for concurrent
// use; one lock (of 16) is taken per new connection, never per packet.
type RateTable struct {
	limit  uint64
	seed   maphash.Seed
	shards [shards]shard
}

type shard struct {
	mu   sync.Mutex
	max  int
	idx  map[netip.Addr]int32
	ents []entry
	head int32 // most recently seen; -1 when empty
	tail int32 // least recently seen
}

// entry is one source's counts: cur in second sec, prev in second sec-1.
type entry struct {
	key        netip.Addr
	prev, next int32 // LRU list
	sec        int64
	cur, last  uint32
}

// NewRateTable returns a table allowing limit new connections per second per
// source and tracking at most size sources (at least one per shard).
func NewRateTable(limit, size int) *RateTable {
	t := &RateTable{limit: uint64(limit), seed: maphash.MakeSeed()}
	per := max(size/shards, 1)
	for i := range t.shards {
		s := &t.shards[i]
		s.max, s.head, s.tail = per, -1, -1
		s.idx = make(map[netip.Addr]int32, min(per, 1024))
	}
	return t
}

// Len returns the number of sources tracked.
func (t *RateTable) Len() int {
	n := 0
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		n += len(s.idx)
		s.mu.Unlock()
	}
	return n
}

// Cap returns the most sources the table tracks.
func (t *RateTable) Cap() int { return t.shards[0].max * shards }

// Allow counts one new connection from src at time now (nanoseconds on any
// monotonic clock shared by the callers) and reports whether the source's
// rate, this one included, is within the limit. Refused attempts count too,
// so a source that keeps hammering stays refused.
//
// The rate is HAProxy's sliding estimate: the previous second's count
// weighted by how much of it still overlaps the last second, plus this
// second's count.
func (t *RateTable) Allow(src netip.Addr, now int64) bool {
	src = src.Unmap()
	s := &t.shards[maphash.Comparable(t.seed, src)%shards]
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.get(src)
	sec, frac := now/1e9, uint64(now%1e9)
	if e.sec != sec {
		if e.sec == sec-1 {
			e.last = e.cur
		} else {
			e.last = 0
		}
		e.cur, e.sec = 0, sec
	}
	est := uint64(e.last)*(1e9-frac)/1e9 + uint64(e.cur)
	if e.cur < ^uint32(0) {
		e.cur++
	}
	return est < t.limit
}

// get returns src's entry, made most recent; a new one evicts the least
// recently seen source when the shard is full.
func (s *shard) get(src netip.Addr) *entry {
	if i, ok := s.idx[src]; ok {
		s.touch(i)
		return &s.ents[i]
	}
	var i int32
	if len(s.ents) < s.max {
		s.ents = append(s.ents, entry{})
		i = int32(len(s.ents) - 1)
	} else {
		i = s.tail
		s.unlink(i)
		delete(s.idx, s.ents[i].key)
	}
	s.ents[i] = entry{key: src, prev: -1, next: -1, sec: -2}
	s.idx[src] = i
	s.pushFront(i)
	return &s.ents[i]
}

func (s *shard) touch(i int32) {
	if s.head == i {
		return
	}
	s.unlink(i)
	s.pushFront(i)
}

func (s *shard) unlink(i int32) {
	e := &s.ents[i]
	if e.prev >= 0 {
		s.ents[e.prev].next = e.next
	} else {
		s.head = e.next
	}
	if e.next >= 0 {
		s.ents[e.next].prev = e.prev
	} else {
		s.tail = e.prev
	}
	e.prev, e.next = -1, -1
}

func (s *shard) pushFront(i int32) {
	e := &s.ents[i]
	e.prev, e.next = -1, s.head
	if s.head >= 0 {
		s.ents[s.head].prev = i
	}
	s.head = i
	if s.tail < 0 {
		s.tail = i
	}
}
