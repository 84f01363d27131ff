package proxy

import (
	"net"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// disconnectInterval paces the checks for a caller that went away while its call waits on the
// upstream (a slow reasoning model can take minutes to answer) or while its stream waits for
// the next event. A call is first checked once it has waited between one and two intervals,
// then every interval.
const disconnectInterval = time.Second

// watched is a call's place in the list of calls watched for their caller going away. The
// server does not read from a connection while its handler runs, so nothing else would notice
// until a response byte is written. One goroutine polls the connections of the calls that have
// waited long enough, all in one poll(2), for a hang-up (POLLRDHUP: the peer closed its side)
// without reading from them, so a pipelined request is left alone. A fast call is only linked
// into the list and out of it: no timer, goroutine or allocation of its own.
type watched struct {
	prev, next *watched // in watching's ring; nil when not in it
	conn       net.Conn
	raw        syscall.RawConn // conn's, made at the first check
	ctx        *callCtx        // cancelled if the caller goes away
	tick       uint64          // watching.tick when the call joined
}

// start watches conn for the caller going away, which cancels ctx. A call is watched once:
// starting it again does nothing.
func (w *watched) start(conn net.Conn, ctx *callCtx) {
	if w.ctx != nil {
		return
	}
	w.conn, w.ctx = conn, ctx
	watching.add(w)
}

// stop ends the watch; it may be called more than once, or without start.
func (w *watched) stop() {
	if w.ctx != nil { // only this call's goroutine sets it
		watching.remove(w)
	}
}

// watchList is the ring of watched calls, oldest first, and the goroutine that checks them,
// which runs while the ring is not empty.
type watchList struct {
	mu      sync.Mutex
	ring    watched // sentinel
	tick    uint64
	running bool

	// The checking goroutine's own, reused from one check to the next.
	raws []syscall.RawConn
	ctxs []*callCtx
	fds  []unix.PollFd
}

var watching watchList

func (l *watchList) add(w *watched) {
	l.mu.Lock()
	if l.ring.next == nil {
		l.ring.next, l.ring.prev = &l.ring, &l.ring
	}
	w.tick = l.tick
	w.prev, w.next = l.ring.prev, &l.ring
	l.ring.prev.next = w
	l.ring.prev = w
	if !l.running {
		l.running = true
		go l.loop()
	}
	l.mu.Unlock()
}

func (l *watchList) remove(w *watched) {
	l.mu.Lock()
	if w.next != nil {
		w.prev.next, w.next.prev = w.next, w.prev
		w.prev, w.next = nil, nil
	}
	w.conn, w.raw, w.ctx = nil, nil, nil
	l.mu.Unlock()
}

func (l *watchList) loop() {
	t := time.NewTicker(disconnectInterval)
	defer t.Stop()
	for range t.C {
		if !l.check() {
			return
		}
	}
}

// check cancels the calls, among those watched for a whole interval or more, whose caller has
// hung up. It reports false, and the goroutine ends, once nothing is watched.
func (l *watchList) check() bool {
	l.mu.Lock()
	l.tick++
	if l.ring.next == &l.ring {
		l.running = false
		l.mu.Unlock()
		return false
	}
	l.raws, l.ctxs = l.raws[:0], l.ctxs[:0]
	for w := l.ring.next; w != &l.ring && l.tick-w.tick >= 2; w = w.next {
		if w.raw == nil {
			if w.raw = rawConn(w.conn); w.raw == nil {
				continue
			}
		}
		l.raws, l.ctxs = append(l.raws, w.raw), append(l.ctxs, w.ctx)
	}
	l.mu.Unlock()
	if len(l.raws) == 0 {
		return true
	}
	// A call may end, and its connection close, from here on: its connection then reports an
	// error to Control and is skipped, and a late cancel of an ended call does nothing.
	l.fds = l.fds[:0]
	for _, raw := range l.raws {
		fd := int32(-1) // poll ignores it
		raw.Control(func(s uintptr) { fd = int32(s) })
		l.fds = append(l.fds, unix.PollFd{Fd: fd, Events: unix.POLLRDHUP})
	}
	if n, err := unix.Poll(l.fds, 0); err == nil && n > 0 {
		for i, p := range l.fds {
			if p.Revents&(unix.POLLRDHUP|unix.POLLHUP|unix.POLLERR) != 0 {
				l.ctxs[i].cancel()
			}
		}
	}
	clear(l.raws)
	clear(l.ctxs)
	return true
}

func rawConn(c net.Conn) syscall.RawConn {
	if tc, ok := c.(interface{ NetConn() net.Conn }); ok { // TLS
		c = tc.NetConn()
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return raw
}
