// Package watch calls back when files change. It watches the files' directories rather than the
// files: editors save by writing a new file and renaming it over the old one, and Kubernetes
// updates a mounted ConfigMap or Secret by swapping a symlink, and both would silently end a
// watch on the file itself. Bursts of events are coalesced.
package watch

import (
	"context"
	"errors"
	"path/filepath"
	"time"

	"github.com/fsnotify/fsnotify"
)

// Files calls onChange, at most once per debounce interval, after any of paths is created,
// written, renamed or removed, until ctx is done. It returns once the watch is set up.
func Files(ctx context.Context, paths []string, debounce time.Duration, onChange func()) error {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return err
	}
	want := map[string]bool{}
	dirs := map[string]bool{}
	for _, p := range paths {
		abs, err := filepath.Abs(p)
		if err != nil {
			w.Close()
			return err
		}
		want[abs] = true
		dirs[filepath.Dir(abs)] = true
	}
	for d := range dirs {
		if err := w.Add(d); err != nil {
			w.Close()
			return err
		}
	}
	go func() {
		defer w.Close()
		watchLoop(ctx, w.Events, w.Errors, want, debounce, onChange)
	}()
	return nil
}

// watchLoop calls onChange, debounced, for events on the wanted files, and for an overflow of
// the kernel's event queue (the events lost could be theirs), until ctx is done or events closes.
// Other errors are dropped: the watch goes on.
func watchLoop(ctx context.Context, events <-chan fsnotify.Event, errs <-chan error, want map[string]bool, debounce time.Duration, onChange func()) {
	var timer *time.Timer
	var fire <-chan time.Time
	changed := func() {
		if timer == nil {
			timer = time.NewTimer(debounce)
			fire = timer.C
		}
	}
	for {
		select {
		case <-ctx.Done():
			if timer != nil {
				timer.Stop()
			}
			return
		case ev, ok := <-events:
			if !ok {
				return
			}
			// A Kubernetes volume update renames ..data; any change in a watched
			// directory whose name starts with ".." concerns its files.
			if want[ev.Name] || isKubernetesSwap(ev.Name) {
				changed()
			}
		case err, ok := <-errs:
			if ok && errors.Is(err, fsnotify.ErrEventOverflow) {
				changed()
			}
		case <-fire:
			timer, fire = nil, nil
			onChange()
		}
	}
}

func isKubernetesSwap(name string) bool {
	b := filepath.Base(name)
	return len(b) > 2 && b[:2] == ".."
}
