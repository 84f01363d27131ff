package proxy

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenproxy/tokenproxy/internal/transport"
)

type countingInterrupter struct{ n atomic.Int32 }

func (c *countingInterrupter) Interrupt() { c.n.Add(1) }

var _ transport.InterruptContext = (*callCtx)(nil)

func TestCallCtxCancels(t *testing.T) {
	var x callCtx
	done := x.Done()
	if x.Err() != nil {
		t.Fatal("a new context is cancelled")
	}
	var kept, removed, late countingInterrupter
	x.OnCancel(&kept)
	x.OnCancel(&removed)
	if !x.OffCancel(&removed) {
		t.Fatal("OffCancel before the cancellation reported false")
	}
	x.cancel()
	x.cancel()
	select {
	case <-done:
	default:
		t.Fatal("Done asked for before the cancellation is not closed")
	}
	<-x.Done()
	if !errors.Is(x.Err(), context.Canceled) {
		t.Fatalf("Err = %v, want context.Canceled", x.Err())
	}
	if kept.n.Load() != 1 || removed.n.Load() != 0 {
		t.Fatalf("interrupted %d and %d times, want 1 and 0", kept.n.Load(), removed.n.Load())
	}
	if x.OffCancel(&kept) {
		t.Fatal("OffCancel after the cancellation reported true")
	}
	x.OnCancel(&late)
	if late.n.Load() != 1 {
		t.Fatal("OnCancel on a cancelled context did not interrupt at once")
	}

	var y callCtx
	y.cancel()
	<-y.Done() // made after the cancellation: closed already
}

func TestCallCtxDerivedContexts(t *testing.T) {
	var x callCtx
	child, stop := context.WithTimeout(&x, time.Hour)
	defer stop()
	x.cancel()
	waitClosed(t, child.Done(), "a derived context was not cancelled with its parent")
	if !errors.Is(child.Err(), context.Canceled) {
		t.Fatalf("the derived context's Err = %v, want context.Canceled", child.Err())
	}

	var y callCtx
	ran := make(chan struct{})
	stopF := context.AfterFunc(&y, func() { close(ran) })
	context.AfterFunc(&y, func() { t.Error("a stopped AfterFunc ran") })()
	y.cancel()
	waitClosed(t, ran, "AfterFunc did not run on cancellation")
	if stopF() {
		t.Fatal("stop reported true after the function ran")
	}
	// An already cancelled context runs a new AfterFunc too, and a context derived from it
	// starts cancelled.
	again := make(chan struct{})
	context.AfterFunc(&y, func() { close(again) })
	waitClosed(t, again, "AfterFunc on a cancelled context did not run")
	if c, cancel := context.WithCancel(&y); c.Err() == nil {
		t.Fatal("a context derived from a cancelled one is not cancelled")
	} else {
		cancel()
	}
}

func waitClosed(t *testing.T, ch <-chan struct{}, failure string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatal(failure)
	}
}
