package secretscan

import "testing"

func TestFind(t *testing.T) {
	secrets := []string{"", "tpk_abcdefghijklmnopqrstuvwxyz", "short"}
	for _, tt := range []struct {
		text      string
		at, which int
	}{
		{"nothing here", -1, -1},
		{"key=tpk_abcdefghijklmnopqrstuvwxyz", 4, 1},
		{"truncated: tpk_abcdefgh…", 11, 1},
		{"cut at 11: tpk_abcdefg", -1, -1},
		{"a short one", 2, 2},
	} {
		if at, which := Find(tt.text, secrets); at != tt.at || which != tt.which {
			t.Errorf("Find(%q) = %d, %d; want %d, %d", tt.text, at, which, tt.at, tt.which)
		}
	}
}
