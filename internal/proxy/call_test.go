package proxy

import (
	"testing"

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
