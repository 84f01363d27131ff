package logsink

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"
)

var _ zapcore.WriteSyncer = (*Writer)(nil)

// dest is a destination that records what it is given. While gate is set, each Write first
// reports on entered and then waits for gate to be closed.
type dest struct {
	mu     sync.Mutex
	buf    bytes.Buffer
	writes int
	syncs  int
	fail   error // returned (once) by the next Write, which takes nothing

	gate    chan struct{}
	entered chan struct{}
	wrote   chan struct{} // signalled (without waiting) after each Write
}

func newDest() *dest {
	return &dest{entered: make(chan struct{}, 100), wrote: make(chan struct{}, 100)}
}

func (d *dest) Write(p []byte) (int, error) {
	d.mu.Lock()
	gate := d.gate
	d.mu.Unlock()
	if gate != nil {
		d.entered <- struct{}{}
		<-gate
	}
	d.mu.Lock()
	defer func() {
		d.mu.Unlock()
		select {
		case d.wrote <- struct{}{}:
		default:
		}
	}()
	d.writes++
	if err := d.fail; err != nil {
		d.fail = nil
		return 0, err
	}
	return d.buf.Write(p)
}

func (d *dest) Sync() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.syncs++
	return nil
}

func (d *dest) String() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.buf.String()
}

func (d *dest) block() chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.gate = make(chan struct{})
	return d.gate
}

func (d *dest) unblock(gate chan struct{}) {
	d.mu.Lock()
	d.gate = nil
	d.mu.Unlock()
	close(gate)
}

// within fails the test if done is not closed within a generous bound: the bound only turns a
// hang into a failure.
func within(t *testing.T, done <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s did not finish", what)
	}
}

// awaitWaiting returns once n writes wait for room in w, and fails the test if that does not
// come within a generous bound. It polls: waiting for room leaves nothing else to wait on.
func awaitWaiting(t *testing.T, w *Writer, n int) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; runtime.Gosched() {
		w.mu.Lock()
		waiting := w.waiting
		w.mu.Unlock()
		if waiting == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d writes wait for room, want %d", waiting, n)
		}
	}
}

func noTick() <-chan time.Time { return nil }

func TestWritesArriveWholeAndInOrder(t *testing.T) {
	d := newDest()
	w := newWriter(d, Options{FlushSize: 100, Limit: 400}, noTick())
	const writers, lines = 8, 500
	var wg sync.WaitGroup
	for g := range writers {
		wg.Go(func() {
			for i := range lines {
				fmt.Fprintf(w, "writer %d line %d\n", g, i)
			}
		})
	}
	wg.Wait()
	if err := w.Stop(); err != nil {
		t.Fatalf("Stop() = %v", err)
	}
	next := make([]int, writers)
	got := strings.Split(strings.TrimSuffix(d.String(), "\n"), "\n")
	for _, l := range got {
		var g, i int
		if _, err := fmt.Sscanf(l, "writer %d line %d", &g, &i); err != nil {
			t.Fatalf("line %q is not whole: %v", l, err)
		}
		if i != next[g] {
			t.Fatalf("writer %d: got line %d, want %d", g, i, next[g])
		}
		next[g]++
	}
	if len(got) != writers*lines {
		t.Fatalf("got %d lines, want %d", len(got), writers*lines)
	}
	if d.writes >= writers*lines/2 {
		t.Errorf("the destination got %d writes for %d lines: lines were not gathered", d.writes, len(got))
	}
}

// A call logs and goes on while the destination is stuck in a write.
func TestWriteDoesNotWaitForTheDestination(t *testing.T) {
	d := newDest()
	w := newWriter(d, Options{FlushSize: 10, Limit: 1000}, noTick())
	gate := d.block()
	w.Write([]byte("0123456789\n")) // FlushSize reached: the goroutine starts a write
	within(t, d.entered, "the first write")
	wrote := make(chan struct{})
	go func() {
		defer close(wrote)
		for i := range 50 {
			fmt.Fprintf(w, "line %02d\n", i) // 8 bytes each: 400 in all, under Limit
		}
	}()
	within(t, wrote, "writing while the destination is stuck")
	if got := w.Waits(); got != 0 {
		t.Errorf("Waits() = %d under Limit, want 0", got)
	}
	if got := d.String(); got != "" {
		t.Fatalf("the destination has %q before its first write returned", got)
	}
	d.unblock(gate)
	if err := w.Stop(); err != nil {
		t.Fatalf("Stop() = %v", err)
	}
	want := "0123456789\n"
	for i := range 50 {
		want += fmt.Sprintf("line %02d\n", i)
	}
	if got := d.String(); got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

// Past Limit, writers wait for the destination rather than lose lines or grow without bound.
func TestWritersWaitPastLimit(t *testing.T) {
	d := newDest()
	w := newWriter(d, Options{FlushSize: 10, Limit: 30}, noTick())
	gate := d.block()
	w.Write([]byte("aaaaaaaaaa")) // taken by the goroutine, which is then stuck
	within(t, d.entered, "the first write")
	w.Write([]byte("bbbbbbbbbb"))
	w.Write([]byte("cccccccccc"))
	w.Write([]byte("dddddddddd")) // 30 bytes wait: Limit
	wrote := make(chan struct{})
	go func() {
		defer close(wrote)
		w.Write([]byte("eeeeeeeeee"))
	}()
	awaitWaiting(t, w, 1)
	select {
	case <-wrote:
		t.Fatal("a write past Limit returned while the destination was stuck")
	default:
	}
	d.unblock(gate)
	within(t, wrote, "the waiting write")
	if err := w.Stop(); err != nil {
		t.Fatalf("Stop() = %v", err)
	}
	if got := w.Waits(); got != 1 {
		t.Errorf("Waits() = %d, want 1", got)
	}
	if got, want := d.String(), "aaaaaaaaaabbbbbbbbbbccccccccccddddddddddeeeeeeeeee"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

// A line too big for Limit is still taken, on its own.
func TestLineLargerThanLimit(t *testing.T) {
	d := newDest()
	w := newWriter(d, Options{FlushSize: 4, Limit: 8}, noTick())
	big := strings.Repeat("x", 100)
	w.Write([]byte(big))
	w.Write([]byte("y"))
	w.Stop()
	if got := d.String(); got != big+"y" {
		t.Errorf("got %q, want %q", got, big+"y")
	}
}

func TestTickWritesWhatWasGathered(t *testing.T) {
	d := newDest()
	tick := make(chan time.Time)
	w := newWriter(d, Options{FlushSize: 1 << 20}, tick)
	defer w.Stop()
	w.Write([]byte("short line\n"))
	tick <- time.Time{} // received: the goroutine now writes what is gathered
	within(t, d.wrote, "the write after a tick")
	if got := d.String(); got != "short line\n" {
		t.Errorf("after a tick, got %q, want %q", got, "short line\n")
	}
	tick <- time.Time{} // nothing gathered: nothing written
	w.Write([]byte("more\n"))
	if err := w.Sync(); err != nil {
		t.Fatalf("Sync() = %v", err)
	}
	if d.writes != 2 {
		t.Errorf("the destination got %d writes, want 2 (a tick with nothing gathered writes nothing)", d.writes)
	}
}

func TestSyncAndErrors(t *testing.T) {
	d := newDest()
	w := newWriter(d, Options{FlushSize: 1 << 20}, noTick())
	w.Write([]byte("one\n"))
	if err := w.Sync(); err != nil {
		t.Fatalf("Sync() = %v", err)
	}
	if got := d.String(); got != "one\n" || d.syncs != 1 {
		t.Fatalf("after Sync: got %q and %d syncs, want %q and 1", got, d.syncs, "one\n")
	}

	refused := errors.New("disk full")
	d.mu.Lock()
	d.fail = refused
	d.mu.Unlock()
	if n, err := w.Write([]byte("lost\n")); n != 5 || err != nil {
		t.Fatalf("Write() = %d, %v; want 5, nil (errors wait for Sync)", n, err)
	}
	if err := w.Sync(); !errors.Is(err, refused) {
		t.Fatalf("Sync() = %v, want %v", err, refused)
	}
	if got := w.Lost(); got != 5 {
		t.Errorf("Lost() = %d, want 5", got)
	}
	w.Write([]byte("two\n"))
	if err := w.Sync(); err != nil {
		t.Fatalf("Sync() after the error was reported = %v, want nil", err)
	}
	if got := d.String(); got != "one\ntwo\n" {
		t.Errorf("got %q, want %q", got, "one\ntwo\n")
	}
}

func TestAfterStop(t *testing.T) {
	d := newDest()
	w := newWriter(d, Options{}, noTick())
	w.Write([]byte("before\n"))
	if err := w.Stop(); err != nil {
		t.Fatalf("Stop() = %v", err)
	}
	if got := d.String(); got != "before\n" {
		t.Fatalf("Stop wrote %q, want %q", got, "before\n")
	}
	w.Write([]byte("after\n")) // straight to the destination
	if got := d.String(); got != "before\nafter\n" {
		t.Errorf("got %q, want %q", got, "before\nafter\n")
	}
	if err := w.Sync(); err != nil {
		t.Errorf("Sync() after Stop = %v", err)
	}
	if err := w.Stop(); err != nil {
		t.Errorf("a second Stop() = %v", err)
	}
}

// A writer waiting for room when Stop comes still gets its line out, after what was gathered.
func TestStopReleasesWaitingWriters(t *testing.T) {
	d := newDest()
	w := newWriter(d, Options{FlushSize: 5, Limit: 5}, noTick())
	gate := d.block()
	w.Write([]byte("11111"))
	within(t, d.entered, "the first write")
	w.Write([]byte("22222"))
	wrote := make(chan struct{})
	go func() {
		defer close(wrote)
		w.Write([]byte("33333"))
	}()
	awaitWaiting(t, w, 1)
	stopped := make(chan struct{})
	go func() { defer close(stopped); w.Stop() }()
	d.unblock(gate)
	within(t, stopped, "Stop")
	within(t, wrote, "the waiting write")
	if got, want := d.String(), "111112222233333"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

// BenchmarkWrite writes an access-log-sized line per iteration on one P, yielding once after
// each as a call does (it waits on sockets several times), against zap's BufferedWriteSyncer,
// which writes in the caller when its buffer fills. Both write to io.Discard, so this is the
// cost of gathering, not of the destination.
func BenchmarkWrite(b *testing.B) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	line := []byte(`{"level":"info","ts":"2026-11-24T03:10:35.123Z","logger":"access","msg":"call","request_id":"6a1b2c3d-0000-4000-8000-000000000000","caller":"bench","deployment":"gpt-4.1-mini","status":200,"duration_ms":0.412}` + "\n")
	b.Run("logsink", func(b *testing.B) {
		w := New(io.Discard, Options{})
		defer w.Stop()
		b.ReportAllocs()
		for b.Loop() {
			w.Write(line)
			runtime.Gosched()
		}
	})
	b.Run("zap-buffered", func(b *testing.B) {
		w := &zapcore.BufferedWriteSyncer{WS: zapcore.AddSync(io.Discard), Size: 256 << 10, FlushInterval: time.Second}
		defer w.Stop()
		b.ReportAllocs()
		for b.Loop() {
			w.Write(line)
			runtime.Gosched()
		}
	})
}

// A destination that takes nothing for StallLimit has the lines that would wait for it dropped
// and counted, rather than hold every caller (and the process's shutdown) for as long as it is
// stuck; Stop gives up on it.
func TestAStalledDestinationDropsRatherThanHolds(t *testing.T) {
	d := newDest()
	w := newWriter(d, Options{FlushSize: 10, Limit: 30, StallLimit: 50 * time.Millisecond}, noTick())
	gate := d.block()
	defer d.unblock(gate)         // lets the stuck goroutine end
	w.Write([]byte("aaaaaaaaaa")) // taken by the goroutine, which is then stuck
	within(t, d.entered, "the first write")
	if w.Stalled() <= 0 {
		t.Errorf("Stalled() = %v while a write is under way", w.Stalled())
	}
	w.Write([]byte("bbbbbbbbbbbbbbbbbbbbbbbbbbbbbb")) // 30 bytes wait: Limit
	wrote := make(chan struct{})
	go func() {
		defer close(wrote)
		w.Write([]byte("cccccccccc")) // waits, then is dropped once the write has gone on 50 ms
	}()
	within(t, wrote, "a write while the destination is stuck")
	if got := w.Lost(); got != 10 {
		t.Errorf("Lost() = %d, want the 10 bytes dropped", got)
	}
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		if err := w.Stop(); !errors.Is(err, ErrStalled) {
			t.Errorf("Stop() = %v, want ErrStalled", err)
		}
		w.Write([]byte("after")) // after Stop, dropped too
	}()
	within(t, stopped, "Stop")
	if got := w.Lost(); got != 15 {
		t.Errorf("Lost() = %d, want 15", got)
	}
}
