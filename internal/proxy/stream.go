package proxy

import (
	"bytes"
	"errors"
	"io"
	"net"
	"strconv"
	"sync"

	"github.com/valyala/fasthttp"

	"github.com/tokenproxy/tokenproxy/internal/transport"
)

// stream answers with the upstream's body as it arrives. A large body of known length keeps
// its length and goes out through fasthttp's copy loop. Server-sent events and bodies of
// unknown length are relayed: each upstream read goes out at once as its own chunk, so an event
// reaches the caller as soon as it exists. Either way the end of the body ends the call: the
// upstream connection is released or, if the stream was cut, closed.
func (h *Handler) stream(c *call, s *transport.Stream) {
	c.heldStream = s // until handedOver; closed by finish (discardHeld) if it never is
	if conn := c.fc.Conn(); conn != nil {
		// A caller that takes none of the stream for timeouts.stream_idle has the write that
		// waits on it fail (errCallerStalled): it holds the upstream's connection meanwhile.
		s.OnStalledReader(func() { conn.SetWriteDeadline(aLongTimeAgo) })
	}
	resp := &c.fc.Response
	n, events := resp.Header.ContentLength(), bytes.HasPrefix(resp.Header.ContentType(), []byte("text/event-stream"))
	body := &streamBody{h: h, c: c, s: s}
	if n >= 0 && !events {
		resp.SetBodyStream(body, n)
		c.handedOver()
		return
	}
	if h.streams != nil {
		h.detach(c, s)
		return
	}
	// Served without NewServer's server (in-process tests): fasthttp's copy loop relays.
	resp.ImmediateHeaderFlush = true
	resp.SetBodyStream(body, -1)
	c.handedOver()
}

// handedOver marks the call as its stream's to finish: until then, a panic on the way is the
// handler's to recover, and the stream is closed when the call finishes.
func (c *call) handedOver() { c.streaming, c.heldStream = true, nil }

// streamSeam, when set (by tests), runs where an event stream is about to be handed over (after
// its first event may have gone out), and where fasthttp reads a streamed body: it stands for a
// panic there.
var streamSeam func()

// relayBufs lends the buffers events are relayed through: a stream holds one only while an
// upstream read that filled its own small buffer goes on, never while it waits for the next
// event, so thousands of idle streams share a few.
var relayBufs = sync.Pool{New: func() any { b := make([]byte, relayBig); return &b }}

// A relay buffer holds a chunk's header (its size in hex and CRLF) before the data and the CRLF
// that ends it after.
const (
	relaySmall = 512
	relayBig   = 16 << 10
	chunkHead  = 8 // "3ff6\r\n" fits with room to spare
	chunkTail  = 2
)

// detach hands an event stream's connection over from the server to a goroutine of its own,
// which relays the stream and then closes the connection. The serving goroutine, its stack and
// the connection's read and write buffers are all let go, so an open stream holds little more
// than its two sockets, a 512-byte buffer and a small stack (see bench/README.md). The
// response says Connection: close, since nothing serves the connection after the stream.
func (h *Handler) detach(c *call, s *transport.Stream) {
	fc := c.fc
	hdr := &fc.Response.Header
	r := &relay{h: h, c: c, s: s, chunked: fc.Request.Header.IsHTTP11()}
	if r.chunked {
		hdr.SetContentLength(-1)
	} else {
		hdr.Del(fasthttp.HeaderTransferEncoding) // HTTP/1.0: the body ends where the connection does
	}
	hdr.SetConnectionClose()
	r.head = hdr.AppendBytes(make([]byte, 0, 1536)) // room for the first event, to go with it
	key := fc.Conn()
	if s.Buffered() > 0 {
		// The first event has come with the answer: it goes out now, with the head, rather
		// than after the hand-over. Nothing of the server's waits to be written before it:
		// with ReduceMemoryUsage the server flushes each response as it ends.
		r.ended, r.werr = r.step(key)
	}
	if streamSeam != nil {
		streamSeam()
	}
	c.handedOver()
	c.detach()
	h.streams.expect(key, r)
	fc.HijackSetNoResponse(true)
	fc.Hijack(func(hc net.Conn) {
		if u, ok := hc.(interface{ UnsafeConn() net.Conn }); ok {
			hc = u.UnsafeConn() // the connection itself, not the server's reader in front of it
		}
		conn, relayed, ok := h.streams.start(key, hc)
		switch {
		case !ok:
			conn.Close() // its stream has ended already (streamSet.closed)
		case relayed:
			go r.run(key, conn) // this returns, and the server takes back its buffers
		default:
			r.run(key, conn) // the server closes conn when this returns
		}
	})
}

// relay is an event stream being relayed to a caller's connection.
type relay struct {
	h       *Handler
	c       *call
	s       *transport.Stream
	conn    net.Conn // the caller's connection, once handed over (streamSet.start)
	head    []byte   // the response's status line and headers, until written
	chunked bool     // HTTP/1.1: chunked framing; HTTP/1.0: raw bytes, ended by the close
	eof     bool
	// ended: the stream ended with what detach wrote (werr: writing it to the caller failed).
	ended bool
	werr  error
	// small takes each upstream read first: an event usually fits, and a stream waiting for
	// the next one then holds this and no more.
	small [chunkHead + relaySmall + chunkTail]byte
}

// run relays the stream to conn, then ends the call, closes conn and tells the stream set the
// stream that key stands for is done.
func (r *relay) run(key, conn net.Conn) {
	var werr error
	defer func() {
		p := recover()
		r.end(werr)
		r.h.finish(r.c, p) // before the close: when the caller sees it, the call is logged
		conn.Close()
		r.h.streams.done(key)
	}()
	werr = r.copy(conn)
}

// copy writes the head, unless the handler has (detach), then each upstream read as it
// arrives, and the last chunk at the end. It returns the error writing to the caller failed
// with, if that is what stopped it.
func (r *relay) copy(w io.Writer) error {
	if r.ended {
		return r.werr
	}
	if len(r.head) > 0 && r.s.Buffered() == 0 { // no event yet: the caller sees the status while it waits
		if _, err := w.Write(r.head); err != nil {
			return err
		}
		r.head = nil
	}
	for {
		if end, werr := r.step(w); end {
			return werr
		}
	}
}

// step writes what one upstream read brings, with the head if it has yet to go, and reports
// whether the stream has ended: at its end, when the upstream failed, or when writing to the
// caller did (werr).
func (r *relay) step(w io.Writer) (end bool, werr error) {
	out, lent, err := r.read()
	defer r.lend(lent)
	if len(r.head) > 0 { // the headers go out with the first event if it has arrived
		if len(out) > 0 && len(r.head)+len(out) <= cap(r.head) {
			out = append(r.head, out...)
		} else if _, werr := w.Write(r.head); werr != nil {
			return true, werr
		}
		r.head = nil
	}
	if err == io.EOF && r.chunked {
		out = append(out, "0\r\n\r\n"...)
	}
	if len(out) > 0 {
		if _, werr := w.Write(out); werr != nil {
			return true, werr
		}
	}
	return err != nil, nil // io.EOF, or the upstream failed (noted by read)
}

// read reads what the upstream has sent into the small buffer, or, when that fills and more has
// already arrived, on into a borrowed big one, which it returns to be given back. out is the
// data framed as a chunk (or as is, for HTTP/1.0); empty if nothing arrived.
func (r *relay) read() (out []byte, lent *[]byte, err error) {
	buf := r.small[:]
	n, err := r.s.Read(buf[chunkHead : len(buf)-chunkTail])
	if err == nil && n == relaySmall && r.s.Buffered() > 0 {
		lent = relayBufs.Get().(*[]byte)
		big := *lent
		copy(big[chunkHead:], buf[chunkHead:chunkHead+n])
		var m int
		m, err = r.s.Read(big[chunkHead+n : len(big)-chunkTail])
		n += m
		buf = big
	}
	r.c.bytesOut += n
	switch err {
	case nil:
	case io.EOF:
		r.eof = true
	default:
		r.c.err = err // the upstream failed mid-stream; the caller's response is cut short
	}
	if n == 0 {
		return nil, lent, err
	}
	if !r.chunked {
		return buf[chunkHead : chunkHead+n], lent, err
	}
	// "<size in hex>\r\n" right before the data, "\r\n" right after.
	var size [chunkHead]byte
	h := strconv.AppendInt(size[:0], int64(n), 16)
	h = append(h, '\r', '\n')
	start := chunkHead - len(h)
	copy(buf[start:], h)
	end := chunkHead + n
	buf[end], buf[end+1] = '\r', '\n'
	return buf[start : end+2], lent, err
}

func (r *relay) lend(b *[]byte) {
	if b != nil {
		relayBufs.Put(b)
	}
}

// end closes the upstream side and notes how the stream ended; werr is why writing to the
// caller stopped, if it did.
func (r *relay) end(werr error) {
	r.s.Close()
	werr = stalled(r.s, werr)
	if !r.eof || werr != nil {
		r.c.aborted = true
		if r.c.err == nil && werr != nil {
			r.c.err = werr
		}
	}
}

// errCallerStalled is why a stream was cut when its caller took none of it for
// timeouts.stream_idle (transport.Stream.OnStalledReader).
var errCallerStalled = errors.New("the caller took none of the stream for timeouts.stream_idle")

// stalled is werr, the error writing to the caller failed with, or errCallerStalled if that
// was the stream's idle watch making it fail.
func stalled(s *transport.Stream, werr error) error {
	if werr != nil && s.ReaderStalled() {
		return errCallerStalled
	}
	return werr
}

// streamBody is the response body of a streamed call that fasthttp writes: one of known length,
// or any stream when the handler is served without NewServer's server.
type streamBody struct {
	h    *Handler
	c    *call
	s    *transport.Stream
	eof  bool
	once sync.Once
}

func (b *streamBody) Read(p []byte) (n int, err error) {
	// fasthttp calls this from its own goroutine, writing the answer, and recovers nothing:
	// a panic here is logged, and cuts the answer, rather than end the process.
	defer func() {
		if v := recover(); v != nil {
			b.h.logPanic(b.c, v)
			b.c.code, b.c.err = CodeInternal, errInternal
			n, err = 0, errInternal
		}
	}()
	if streamSeam != nil {
		streamSeam()
	}
	n, err = b.s.Read(p)
	b.c.bytesOut += n
	if err == io.EOF {
		b.eof = true
	} else if err != nil {
		b.c.err = err // the upstream failed mid-stream; the caller's response is cut short
	}
	return n, err
}

// Close implements io.Closer; fasthttp calls CloseWithError too, which does the work.
func (b *streamBody) Close() error { return nil }

// CloseWithError ends the call; err is why writing to the caller stopped, if it did.
func (b *streamBody) CloseWithError(err error) error {
	b.once.Do(func() {
		b.c.wait.waitAnswer() // for the server's last flush: the stream's watch ends here
		b.s.Close()
		err = stalled(b.s, err)
		if !b.eof || err != nil { // all read, but not all written: cut all the same
			b.c.aborted = true
			if b.c.err == nil && err != nil {
				b.c.err = err
			}
		}
		b.h.finish(b.c, nil)
	})
	return nil
}

// streamSet keeps account of the relayed streams, for Shutdown. They are known by the
// connection the server serves (fc.Conn()).
type streamSet struct {
	mu sync.Mutex
	// expected: streams whose connection the server has yet to hand over (it does unless the
	// connection fails first, and then closes it).
	expected map[net.Conn]*relay
	live     map[net.Conn]*relay
	empty    chan struct{} // closed when no stream is left, if someone waits for that
}

func newStreamSet() *streamSet {
	return &streamSet{expected: map[net.Conn]*relay{}, live: map[net.Conn]*relay{}}
}

func (s *streamSet) expect(conn net.Conn, r *relay) {
	s.mu.Lock()
	s.expected[conn] = r
	s.mu.Unlock()
}

// start moves key's stream from expected to live, reporting whether it was expected, and takes
// hc, the connection the server hands over, from the server (handOver): conn is what the relay
// writes to and closes, and relayed whether it may outlive the hijack handler.
func (s *streamSet) start(key, hc net.Conn) (conn net.Conn, relayed, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.expected[key]
	if !ok {
		return hc, false, false
	}
	delete(s.expected, key)
	// Under the lock, so that once Shutdown's close of key does nothing (handed over), cut
	// finds the stream live and closes conn.
	conn, relayed = handOver(hc)
	r.conn = conn
	s.live[key] = r
	return conn, relayed, true
}

// closed is told of every connection the server closes: a stream still expected on it will
// not be handed over, so it ends here, cut.
func (s *streamSet) closed(conn net.Conn) {
	s.mu.Lock()
	r, ok := s.expected[conn]
	delete(s.expected, conn)
	s.mu.Unlock()
	if ok {
		r.end(net.ErrClosed)
		r.h.finish(r.c, nil)
		s.settle()
	}
}

func (s *streamSet) done(conn net.Conn) {
	s.mu.Lock()
	delete(s.live, conn)
	s.mu.Unlock()
	s.settle()
}

// settle closes empty if no stream is left.
func (s *streamSet) settle() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.empty != nil && len(s.live)+len(s.expected) == 0 {
		close(s.empty)
		s.empty = nil
	}
}

// drained returns a channel closed once no stream is left.
func (s *streamSet) drained() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	ch := make(chan struct{})
	if len(s.live)+len(s.expected) == 0 {
		close(ch)
		return ch
	}
	if s.empty == nil {
		s.empty = make(chan struct{})
	}
	return s.empty
}

// cut ends the live streams, closing their connections and cancelling their upstream calls
// (a stream waiting for its next event would not see its connection close), and reports how
// many there were.
func (s *streamSet) cut() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range s.live {
		r.conn.Close()
		r.c.ctx.cancel()
	}
	return len(s.live)
}
