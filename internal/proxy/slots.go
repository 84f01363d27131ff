package proxy

import (
	"math/rand/v2"
	"sync/atomic"
)

// slotPairs is a fixed table that remembers values by a hash of theirs (the caches of values
// that are no key, and of metric series). A value may be kept in either of two slots, taken from
// two parts of its hash: it is looked for in both, and put in an empty one, else in either at
// random. Two slots rather than one, so that two values used on every call which share a slot do
// not push each other out on every call: with one slot, ten values in 64 slots share one about
// half the time, five in 256 a few per cent of the time (the hash's seed changes each run).
type slotPairs[T any] []atomic.Pointer[T]

// newSlotPairs returns a table of n slots; n is a power of two, so that a slot is a mask away.
func newSlotPairs[T any](n int) slotPairs[T] {
	if n <= 0 || n&(n-1) != 0 {
		panic("slotPairs: the number of slots is not a power of two")
	}
	return make(slotPairs[T], n)
}

// pair returns the two slots of a value with hash h (they can be the same slot).
func (t slotPairs[T]) pair(h uint64) (a, b *atomic.Pointer[T]) {
	mask := uint64(len(t) - 1)
	return &t[h&mask], &t[(h>>32)&mask]
}

// put keeps v in one of the two slots of hash h.
func (t slotPairs[T]) put(h uint64, v *T) {
	a, b := t.pair(h)
	switch {
	case a.CompareAndSwap(nil, v), b.CompareAndSwap(nil, v):
	case rand.IntN(2) == 0:
		a.Store(v)
	default:
		b.Store(v)
	}
}
