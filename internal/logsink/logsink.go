// Package logsink is the gateway's log output. Lines are gathered in memory and written to the
// destination by a goroutine of its own, so a call never waits for the destination: a write(2)
// to a log file on a busy disk, or to a pipe a log collector drains slowly, takes milliseconds
// now and then, and a call that waited for it (and every other call logging meanwhile, behind
// the same lock) would take them on its latency. Nothing is dropped to spare the calls: if the
// destination falls so far behind that Limit bytes are waiting, writers wait for it. Only a
// destination that takes nothing at all for StallLimit (a log collector that stopped reading
// a pipe) has lines dropped, and counted, rather than hold every call, and the process's
// shutdown, for as long as it is stuck; Stalled tells a health check.
package logsink

import (
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"time"
)

// Options tune a Writer.
type Options struct {
	// FlushSize is how many gathered bytes start a write. If zero, 256 KiB.
	FlushSize int
	// Limit is how many gathered bytes make writers wait for the destination. If zero,
	// 32 × FlushSize. A single write larger than Limit is still taken, on its own.
	Limit int
	// Interval is the longest a gathered line waits to be written. If zero, one second.
	Interval time.Duration
	// StallLimit is how long one write to the destination may take before writers that would
	// wait for it drop their lines instead (counted in Lost), and Stop gives up on it. If
	// zero, 30 seconds.
	StallLimit time.Duration
}

func (o Options) stallLimit() time.Duration {
	if o.StallLimit <= 0 {
		return 30 * time.Second
	}
	return o.StallLimit
}

func (o Options) flushSize() int {
	if o.FlushSize <= 0 {
		return 256 << 10
	}
	return o.FlushSize
}

func (o Options) limit() int {
	if o.Limit <= 0 {
		return 32 * o.flushSize()
	}
	return max(o.Limit, o.flushSize())
}

func (o Options) interval() time.Duration {
	if o.Interval <= 0 {
		return time.Second
	}
	return o.Interval
}

// Writer gathers writes and hands them to its destination from a goroutine of its own. It is a
// zapcore.WriteSyncer: Sync writes what has been gathered and syncs the destination. Stop must
// be called before the process exits, or lines gathered since the last write are lost.
type Writer struct {
	dst         io.Writer
	size, limit int
	stall       time.Duration // Options.StallLimit

	mu      sync.Mutex
	room    sync.Cond // broadcast when the writing goroutine takes what was gathered
	buf     []byte    // gathered, not yet taken
	waiting int       // writers waiting for room
	stopped bool
	err     error // the first failed write since the last Sync

	lost    atomic.Uint64 // bytes the destination refused, or dropped while it stalled
	waits   atomic.Uint64 // writes that waited for room
	writing atomic.Int64  // when the write to the destination under way began (since epoch, +1); 0: none

	kick    chan struct{}   // the gathered bytes reached FlushSize (or a writer waits)
	syncReq chan chan error // Sync's requests
	stop    chan struct{}   // closed by Stop
	done    chan struct{}   // closed when the goroutine has written everything and ended
	direct  sync.Mutex      // orders writes made straight to dst once the goroutine has ended
}

// New starts a Writer to dst.
func New(dst io.Writer, o Options) *Writer {
	t := time.NewTicker(o.interval())
	w := newWriter(dst, o, t.C)
	go func() { <-w.done; t.Stop() }()
	return w
}

// newWriter starts a Writer that writes what is gathered whenever tick fires.
func newWriter(dst io.Writer, o Options, tick <-chan time.Time) *Writer {
	w := &Writer{
		dst: dst, size: o.flushSize(), limit: o.limit(), stall: o.stallLimit(), buf: make([]byte, 0, 2*o.flushSize()),
		kick: make(chan struct{}, 1), syncReq: make(chan chan error),
		stop: make(chan struct{}), done: make(chan struct{}),
	}
	w.room.L = &w.mu
	go w.run(tick)
	return w
}

// Write gathers p. It returns at once unless Limit bytes are already waiting for the
// destination; then it waits, unless the destination has stalled (Stalled reaches
// StallLimit), and p is dropped. It never fails: the destination's errors, and what is
// dropped, are counted (Lost), and the errors returned by the next Sync.
func (w *Writer) Write(p []byte) (int, error) {
	w.mu.Lock()
	for counted := false; !w.stopped && len(w.buf) > 0 && len(w.buf)+len(p) > w.limit; counted = true {
		if w.Stalled() >= w.stall {
			w.mu.Unlock()
			w.lost.Add(uint64(len(p)))
			return len(p), nil
		}
		if !counted {
			w.waits.Add(1)
		}
		w.waiting++
		w.wake()
		recheck := time.AfterFunc(w.stall, w.rouse) // to see whether the destination stalled
		w.room.Wait()
		recheck.Stop()
		w.waiting--
	}
	if w.stopped {
		w.mu.Unlock()
		return w.writeDirect(p)
	}
	w.buf = append(w.buf, p...)
	full := len(w.buf) >= w.size
	w.mu.Unlock()
	if full {
		w.wake()
	}
	return len(p), nil
}

// rouse has the writers waiting for room look again.
func (w *Writer) rouse() {
	w.mu.Lock()
	w.room.Broadcast()
	w.mu.Unlock()
}

// epoch is what the start of a write to the destination is measured from, on the monotonic
// clock: a step of the wall clock makes no write look stalled.
var epoch = time.Now()

// Stalled is how long the write to the destination under way has gone on: 0 if none is.
func (w *Writer) Stalled() time.Duration {
	if began := w.writing.Load(); began != 0 {
		return max(time.Since(epoch)-time.Duration(began-1), time.Nanosecond)
	}
	return 0
}

// ended waits for the goroutine to end, and reports whether it did: false once the write it is
// stuck in has gone on for StallLimit (it may never return).
func (w *Writer) ended() bool {
	for {
		wait := w.stall
		if d := w.Stalled(); d > 0 {
			if d >= w.stall {
				return false
			}
			wait = w.stall - d
		}
		t := time.NewTimer(wait)
		select {
		case <-w.done:
			t.Stop()
			return true
		case <-t.C:
		}
	}
}

// wake tells the goroutine there is something to write, without waiting for it.
func (w *Writer) wake() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// writeDirect writes p straight to the destination, after everything gathered before Stop;
// if the destination has stalled, p is dropped.
func (w *Writer) writeDirect(p []byte) (int, error) {
	if !w.ended() {
		w.lost.Add(uint64(len(p)))
		return len(p), nil
	}
	w.direct.Lock()
	defer w.direct.Unlock()
	return w.dst.Write(p)
}

// Sync writes everything gathered so far, then syncs the destination if it can be (an
// *os.File can). It returns the first write error since the last Sync, if any, or the sync's.
func (w *Writer) Sync() error {
	reply := make(chan error, 1)
	select {
	case w.syncReq <- reply:
		return <-reply
	case <-w.done:
		w.direct.Lock()
		defer w.direct.Unlock()
		return w.syncDst()
	}
}

// Stop writes everything gathered and ends the goroutine; later writes go straight to the
// destination. It returns what Sync would, or ErrStalled if the destination has taken nothing
// for StallLimit: what was gathered is then lost.
func (w *Writer) Stop() error {
	w.mu.Lock()
	already := w.stopped
	w.stopped = true
	w.room.Broadcast()
	w.mu.Unlock()
	if !already {
		close(w.stop)
	}
	if !w.ended() {
		return ErrStalled
	}
	w.direct.Lock()
	defer w.direct.Unlock()
	return w.syncDst()
}

// Lost is how many bytes the destination has refused (a write that failed loses what it held).
func (w *Writer) Lost() uint64 { return w.lost.Load() }

// Waits is how many writes have waited for the destination, Limit bytes behind.
func (w *Writer) Waits() uint64 { return w.waits.Load() }

func (w *Writer) run(tick <-chan time.Time) {
	defer close(w.done)
	var out []byte
	for {
		var reply chan error
		select {
		case <-w.kick:
		case <-tick:
		case reply = <-w.syncReq:
		case <-w.stop:
			w.put(w.take(out))
			return
		}
		out = w.take(out)
		w.put(out)
		if reply != nil {
			reply <- w.syncDst()
		}
	}
}

// take swaps the gathered bytes for out, emptied, and lets waiting writers on. Each buffer has
// room for twice FlushSize, so gathering does not grow it while the goroutine is on its way; one
// a burst grew past that is not kept.
func (w *Writer) take(out []byte) []byte {
	if out == nil || cap(out) > 2*w.size {
		out = make([]byte, 0, 2*w.size)
	}
	w.mu.Lock()
	out, w.buf = w.buf, out[:0]
	if w.waiting > 0 {
		w.room.Broadcast()
	}
	w.mu.Unlock()
	return out
}

// ErrStalled is Stop's error when the destination has taken nothing for StallLimit.
var ErrStalled = errors.New("logsink: the log's destination has taken nothing for its stall limit; what was gathered is lost")

// put writes b to the destination, counting what a failed write loses.
func (w *Writer) put(b []byte) {
	if len(b) == 0 {
		return
	}
	w.writing.Store(int64(time.Since(epoch)) + 1)
	n, err := w.dst.Write(b)
	w.writing.Store(0)
	if err != nil {
		w.lost.Add(uint64(len(b) - min(max(n, 0), len(b))))
		w.mu.Lock()
		if w.err == nil {
			w.err = err
		}
		w.mu.Unlock()
	}
}

// syncDst returns (and forgets) the first write error since the last call, or else the
// destination's Sync error.
func (w *Writer) syncDst() error {
	w.mu.Lock()
	err := w.err
	w.err = nil
	w.mu.Unlock()
	if s, ok := w.dst.(interface{ Sync() error }); ok {
		if serr := s.Sync(); err == nil {
			err = serr
		}
	}
	return err
}
