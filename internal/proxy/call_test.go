package proxy

import (
	"testing"
	"time"
	"unsafe"

	"github.com/google/uuid"
)

// TestNewID checks the request IDs a call generates: canonical version 4 UUIDs, as
// uuid.NewString makes, each call's its own.
func TestNewID(t *testing.T) {
	for _, u := range []uuid.UUID{{}, uuid.Max, uuid.MustParse("6a1b2c3d-0e4f-4a5b-8c6d-7e8f90a1b2c3")} {
		var b [36]byte
		formatUUID(&b, u)
		if string(b[:]) != u.String() {
			t.Errorf("formatUUID(%v) = %q", u, b[:])
		}
	}
	seen := map[string]bool{}
	calls := make([]*call, 100)
	for i := range calls {
		c := &call{}
		c.newID()
		u, err := uuid.Parse(c.id)
		if err != nil || u.Version() != 4 || u.Variant() != uuid.RFC4122 || u.String() != c.id {
			t.Fatalf("request ID %q is not a canonical version 4 UUID (%v)", c.id, err)
		}
		if seen[c.id] {
			t.Fatalf("request ID %q made twice", c.id)
		}
		seen[c.id] = true
		calls[i] = c
	}
	for _, c := range calls { // each ID stays its call's own after the others are made
		if !seen[c.id] || len(c.id) != 36 {
			t.Fatalf("request ID changed to %q", c.id)
		}
		delete(seen, c.id)
	}
}

// TestCallNow checks the call's clock: it runs on from the call's start by the monotonic clock,
// and tells the wall time as time.Now does.
func TestCallNow(t *testing.T) {
	c := &call{start: time.Now()}
	prev := c.start
	for range 1000 {
		now := c.now()
		if now.Before(prev) {
			t.Fatalf("the call's clock went back: %v after %v", now, prev)
		}
		prev = now
	}
	before := time.Now()
	now := c.now()
	after := time.Now()
	if now.Before(before) || now.After(after) { // compared by their monotonic readings
		t.Fatalf("the call's clock read %v, between %v and %v", now, before, after)
	}
	// The wall time, as a timestamp in the access log: off from time.Now's only if the system's
	// wall clock was stepped during the test.
	if d := now.Round(0).Sub(before.Round(0)); d < -time.Second || d > time.Second {
		t.Errorf("the call's wall time is %v off the system's", d)
	}
}

func TestCallSize(t *testing.T) {
	// Every call allocates one; it is 0.6 KB of the 0.75 KB BenchmarkHandler reports. An object
	// with pointers of more than 512 bytes carries an 8-byte header, so the call stays in the
	// runtime's 640-byte size class only up to 632 bytes; the next class is 704.
	if n := unsafe.Sizeof(call{}); n+8 > 640 {
		t.Errorf("call is %d bytes, %d with its header: past the 640-byte size class (reorder its fields, or say why it must grow)", n, n+8)
	}
}
