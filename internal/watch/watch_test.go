package watch

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/fsnotify/fsnotify"
)

func TestFiles(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "proxy.yaml")
	other := filepath.Join(dir, "unrelated.txt")
	os.WriteFile(cfg, []byte("a"), 0o600)
	changes := make(chan struct{}, 10)
	if err := Files(t.Context(), []string{cfg}, 20*time.Millisecond, func() { changes <- struct{}{} }); err != nil {
		t.Fatal(err)
	}
	expect := func(what string) {
		t.Helper()
		select {
		case <-changes:
		case <-time.After(10 * time.Second):
			t.Fatalf("no callback after %s", what)
		}
	}

	os.WriteFile(cfg, []byte("b"), 0o600)
	expect("a write")

	// An editor's save: write a temporary file, rename it over the original.
	tmp := filepath.Join(dir, ".proxy.yaml.swp")
	os.WriteFile(tmp, []byte("c"), 0o600)
	os.Rename(tmp, cfg)
	expect("a rename over the file")

	// A burst is one callback; an unrelated file is none.
	for range 5 {
		os.WriteFile(cfg, []byte("d"), 0o600)
	}
	expect("a burst")
	os.WriteFile(other, []byte("x"), 0o600)
	select {
	case <-changes:
		// The burst may have straddled the debounce; allow one more, then require quiet.
		os.WriteFile(other, []byte("y"), 0o600)
		select {
		case <-changes:
			t.Error("an unrelated file triggered a callback")
		case <-time.After(200 * time.Millisecond):
		}
	case <-time.After(200 * time.Millisecond):
	}

	// A Kubernetes volume update: ..data is a symlink swapped to a new timestamped directory.
	kdir := t.TempDir()
	os.Mkdir(filepath.Join(kdir, "..2026_01"), 0o700)
	os.WriteFile(filepath.Join(kdir, "..2026_01", "keys"), []byte("1"), 0o600)
	os.Symlink("..2026_01", filepath.Join(kdir, "..data"))
	os.Symlink("..data/keys", filepath.Join(kdir, "keys"))
	if err := Files(t.Context(), []string{filepath.Join(kdir, "keys")}, 20*time.Millisecond, func() { changes <- struct{}{} }); err != nil {
		t.Fatal(err)
	}
	os.Mkdir(filepath.Join(kdir, "..2026_02"), 0o700)
	os.WriteFile(filepath.Join(kdir, "..2026_02", "keys"), []byte("2"), 0o600)
	os.Symlink("..2026_02", filepath.Join(kdir, "..data_tmp"))
	os.Rename(filepath.Join(kdir, "..data_tmp"), filepath.Join(kdir, "..data"))
	expect("a Kubernetes symlink swap")
}

func TestAnOverflowIsTakenForAChange(t *testing.T) {
	// When the kernel's queue overflows, the events lost may be the wanted files': reload.
	events, errs := make(chan fsnotify.Event), make(chan error)
	changes := make(chan struct{}, 1)
	go watchLoop(t.Context(), events, errs, map[string]bool{"/etc/proxy.yaml": true}, time.Millisecond, func() { changes <- struct{}{} })
	errs <- errors.New("some other error")
	errs <- fsnotify.ErrEventOverflow
	select {
	case <-changes:
	case <-time.After(10 * time.Second): // a bound, not a wait
		t.Fatal("no callback after an overflow")
	}
}
