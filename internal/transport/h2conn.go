package transport

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// h2Conn is an HTTP/2 client connection carrying many calls: the protocol's framing, header
// compression and flow control, on x/net/http2's framer. It runs one goroutine, which reads
// frames and hands each stream's data to the stream; a call has no goroutine of its own (a
// request body larger than the windows let go at once is the exception, sent by one while it
// waits for them). A request's HEADERS and DATA go out in one write.
//
// Locks: wmu (the writer and the header encoder) is taken before mu (the state), never after.
// The reading goroutine never holds mu while it writes.
type h2Conn struct {
	nc          net.Conn
	fr          *http2.Framer // ReadFrame by the reading goroutine only; Write* under wmu
	idleTimeout time.Duration

	wmu   sync.Mutex
	bw    *bufio.Writer
	henc  *hpack.Encoder
	hbuf  bytes.Buffer
	lower []byte    // a header name in lower case, while it is encoded
	wdue  time.Time // when the write deadline is to be pushed on (wlock)
	// The last :authority and Authorization values sent, shared by the calls that send the
	// same (a stream's head is encoded once, but a token is ≈ 1.1 KB and the same for all).
	authority, auth string

	mu        sync.Mutex
	streams   map[uint32]*h2Stream
	nextID    uint32
	reserved  int    // streams reserved (reserve) and not yet started
	peerMax   uint32 // the server's SETTINGS_MAX_CONCURRENT_STREAMS
	peerWin   int32  // the server's SETTINGS_INITIAL_WINDOW_SIZE: a new stream's send window
	peerFrame uint32 // the server's SETTINGS_MAX_FRAME_SIZE
	sendWin   int32  // what the connection may still send
	recvWin   int32  // what the server may still send on the connection
	unacked   int32  // bytes read from streams and not yet given back to the server
	goAway    bool   // the server sent GOAWAY, or the connection is closing: no new stream
	closing   bool   // close when the last stream ends (Transport.Close)
	err       error  // why the connection failed or closed; nil while it is up
	idleSince time.Time
	senders   sync.Cond // send windows grew, a stream ended, or the connection failed
	table     uint32    // a header table size the server asked for, for the next request (tableN)
	tableN    bool

	heard  atomic.Bool // a frame arrived since the last health check
	pinged bool        // under mu: a ping is out, unanswered
	health *time.Timer
}

// h2Stream is one call on an h2Conn. Its fields are guarded by the connection's mu.
type h2Stream struct {
	c    *h2Conn
	id   uint32
	hook cancelHook // the call's context interrupts the stream
	wake chan struct{}

	status  int
	fields  []hpack.HeaderField // the response's header fields, once they have come
	head    bool                // the response's head has come
	buf     []byte              // data come and not yet read
	ended   bool                // the server has sent all of the response (END_STREAM)
	sent    bool                // the request has been sent whole (END_STREAM)
	err     error               // reset, refused, malformed, or its connection lost
	stopped bool                // interrupted: the call's context was cancelled
	late    bool                // the response-header timeout passed
	closed  bool                // the call let go of the stream
	sendWin int32
	recvWin int32
	unacked int32
	length  int64 // the response's Content-Length; -1 if none
	want    int64 // the body's length, if it must be checked; -1 if not
	got     int64
	noBody  bool   // a HEAD request: its response has no body whatever its length says
	rest    []byte // the request body left to send, a copy of the call's
}

var (
	// errH2Refused: the server did not process the call (it sent GOAWAY below its stream or
	// refused it), or the connection stopped taking calls before it was sent, so it can go again.
	errH2Refused = errors.New("transport: the upstream did not take the call on its HTTP/2 connection")
	errH2Lost    = errors.New("transport: the HTTP/2 connection to the upstream was lost")
	errH2Length  = errors.New("transport: the upstream's body does not match its Content-Length")
)

// h2ResetError is a stream the server reset.
type h2ResetError struct{ code http2.ErrCode }

func (e h2ResetError) Error() string {
	return "transport: the upstream reset the call's HTTP/2 stream (" + e.code.String() + ")"
}

// newH2Conn starts HTTP/2 on nc, on which the server chose it, and waits (within timeout) for
// the server's settings, so that its stream limit is known before a call is put on it.
func newH2Conn(nc net.Conn, idleTimeout, timeout time.Duration) (*h2Conn, error) {
	c := &h2Conn{
		nc: nc, idleTimeout: idleTimeout, streams: map[uint32]*h2Stream{}, nextID: 1,
		peerMax: 100, peerWin: 65535, peerFrame: 16 << 10, sendWin: 65535, recvWin: h2ConnWindow,
		idleSince: time.Now(),
	}
	c.senders.L = &c.mu
	c.bw = bufio.NewWriterSize(nc, 16<<10)
	c.fr = http2.NewFramer(c.bw, bufio.NewReader(nc))
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.fr.MaxHeaderListSize = h2MaxHeaderBytes
	c.fr.SetReuseFrames()
	// Frames no larger than this side allows (SETTINGS_MAX_FRAME_SIZE, left at its default): the
	// framer's own bound is 16 MiB, and it keeps a buffer the size of the largest frame read for
	// the connection's life.
	c.fr.SetMaxReadFrameSize(h2MaxFrameSize)
	c.henc = hpack.NewEncoder(&c.hbuf)

	nc.SetDeadline(time.Now().Add(timeout))
	c.bw.WriteString(http2.ClientPreface)
	c.fr.WriteSettings(
		http2.Setting{ID: http2.SettingEnablePush, Val: 0},
		http2.Setting{ID: http2.SettingInitialWindowSize, Val: h2StreamWindow},
		http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: h2MaxHeaderBytes},
	)
	c.fr.WriteWindowUpdate(0, h2ConnWindow-65535)
	err := c.bw.Flush()
	var f http2.Frame
	if err == nil {
		f, err = c.fr.ReadFrame()
	}
	if err == nil {
		if sf, ok := f.(*http2.SettingsFrame); !ok || sf.IsAck() {
			err = errors.New("transport: the upstream did not start HTTP/2 with its settings")
		} else if err = c.onSettings(sf); err == nil {
			if err = c.fr.WriteSettingsAck(); err == nil {
				err = c.bw.Flush()
			}
		}
	}
	nc.SetDeadline(time.Time{})
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("transport: starting HTTP/2: %w", err)
	}
	c.health = time.AfterFunc(h2PingAfter, c.check)
	go c.readLoop()
	return c, nil
}

// reserve takes a place for one call, if the connection can carry one more.
func (c *h2Conn) reserve() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil || c.goAway || len(c.streams)+c.reserved >= int(min(h2MaxStreams, c.peerMax)) {
		return false
	}
	c.reserved++
	return true
}

// release gives back a place reserve took, for a call that did not start.
func (c *h2Conn) release() {
	c.mu.Lock()
	c.reserved--
	c.mu.Unlock()
}

// usable reports whether the connection can still take calls, now or once some end; one that
// cannot is closed by its pool. One with no call for idleTimeout cannot, nor one whose server
// allows no stream at all.
func (c *h2Conn) usable(now time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	quiet := len(c.streams) == 0 && c.reserved == 0
	return c.err == nil && !(quiet && (c.goAway || c.peerMax == 0 || now.Sub(c.idleSince) > c.idleTimeout))
}

// closeWhenIdle stops the connection taking calls and closes it once those it carries end.
func (c *h2Conn) closeWhenIdle() {
	c.mu.Lock()
	c.goAway, c.closing = true, true
	idle := len(c.streams) == 0
	c.mu.Unlock()
	if idle {
		c.close()
	}
}

// close closes the connection; the calls on it fail.
func (c *h2Conn) close() { c.fail(errors.New("transport: HTTP/2 connection closed")) }

// fail records err as the connection's end, fails its calls and closes it.
func (c *h2Conn) fail(err error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	c.err = err
	for id, s := range c.streams {
		if !s.ended {
			s.err = errH2Lost
		}
		delete(c.streams, id)
		s.signal()
	}
	c.senders.Broadcast()
	c.mu.Unlock()
	c.health.Stop()
	c.nc.Close()
}

// check is the connection's health check, every h2PingAfter: a connection carrying calls from
// which nothing has come since the last check is sent a ping, and closed if that goes
// unanswered until the next.
func (c *h2Conn) check() {
	heard := c.heard.Swap(false)
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	ping := false
	switch {
	case heard:
		c.pinged = false
	case c.pinged:
		c.mu.Unlock()
		c.fail(errors.New("transport: the upstream did not answer an HTTP/2 ping"))
		return
	case len(c.streams) > 0:
		c.pinged, ping = true, true
	}
	c.mu.Unlock()
	if ping {
		c.wlock()
		err := c.fr.WritePing(false, [8]byte{'h', 'e', 'a', 'l', 't', 'h'})
		c.flushLocked(&err)
		c.wmu.Unlock()
	}
	c.health.Reset(h2PingAfter)
}

// wlock takes wmu, with a write deadline h2WriteTimeout away at least half of it: a server that
// stops reading for that long fails the connection, instead of holding up its calls for ever.
// The deadline is moved on every h2WriteTimeout/2, not at each write.
func (c *h2Conn) wlock() {
	c.wmu.Lock()
	if now := time.Now(); now.After(c.wdue) {
		c.nc.SetWriteDeadline(now.Add(h2WriteTimeout))
		c.wdue = now.Add(h2WriteTimeout / 2)
	}
}

// flushLocked flushes what was written, unless *err is already set, and fails the connection
// if anything went wrong. wmu is held.
func (c *h2Conn) flushLocked(err *error) {
	if *err == nil {
		*err = c.bw.Flush()
	}
	if *err != nil {
		c.fail(*err)
	}
}

// writeControl writes a frame of the connection's own (settings ack, ping ack, window
// update, reset).
func (c *h2Conn) writeControl(write func(fr *http2.Framer) error) {
	c.wlock()
	err := write(c.fr)
	c.flushLocked(&err)
	c.wmu.Unlock()
}

// giveBack returns n bytes read (or dropped) to the server's windows: the connection's, and the
// stream's if s is still receiving. Updates go out when half a stream's window, or a quarter
// of the connection's, has been read, so that a window update is not sent per event. mu is
// held; the increments are written by the caller, after it lets go of mu.
func (c *h2Conn) giveBack(s *h2Stream, n int32) (conn, stream uint32) {
	c.unacked += n
	if c.unacked >= h2ConnWindow/4 {
		conn = uint32(c.unacked)
		c.recvWin += c.unacked
		c.unacked = 0
	}
	if s != nil && !s.ended && c.streams[s.id] == s {
		s.unacked += n
		if s.unacked >= h2StreamWindow/2 {
			stream = uint32(s.unacked)
			s.recvWin += s.unacked
			s.unacked = 0
		}
	}
	return conn, stream
}

// updateWindows writes the window updates giveBack decided on.
func (c *h2Conn) updateWindows(id, conn, stream uint32) {
	if conn == 0 && stream == 0 {
		return
	}
	c.wlock()
	var err error
	if conn > 0 {
		err = c.fr.WriteWindowUpdate(0, conn)
	}
	if stream > 0 && err == nil {
		err = c.fr.WriteWindowUpdate(id, stream)
	}
	c.flushLocked(&err)
	c.wmu.Unlock()
}

// forgetLocked takes s off the connection: it is done on the wire. mu is held. It reports
// whether the connection, closing, has no call left and should be closed.
// h2MaxFrameSize is the largest frame this side reads: SETTINGS_MAX_FRAME_SIZE's default, which
// it does not change.
const h2MaxFrameSize = 16 << 10

func (c *h2Conn) forgetLocked(s *h2Stream) bool {
	if c.streams[s.id] != s {
		return false
	}
	delete(c.streams, s.id)
	c.senders.Broadcast()
	if len(c.streams) == 0 {
		c.idleSince = time.Now()
		return c.closing
	}
	return false
}

func (c *h2Conn) readLoop() {
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) { // a malformed header block: only its stream fails
				c.resetStream(se.StreamID, se.Code, fmt.Errorf("transport: malformed HTTP/2 response headers (%v)", se.Code))
				continue
			}
			c.fail(err)
			return
		}
		c.heard.Store(true)
		if err := c.handle(f); err != nil {
			var ce http2.ConnectionError
			if errors.As(err, &ce) {
				c.writeControl(func(fr *http2.Framer) error {
					return fr.WriteGoAway(0, http2.ErrCode(ce), nil)
				})
			}
			c.fail(err)
			return
		}
	}
}

func (c *h2Conn) handle(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.MetaHeadersFrame:
		return c.onHeaders(f)
	case *http2.DataFrame:
		return c.onData(f)
	case *http2.RSTStreamFrame:
		c.onReset(f)
	case *http2.SettingsFrame:
		if f.IsAck() {
			return nil
		}
		if err := c.onSettings(f); err != nil {
			return err
		}
		c.writeControl(func(fr *http2.Framer) error { return fr.WriteSettingsAck() })
	case *http2.PingFrame:
		if !f.IsAck() {
			data := f.Data
			c.writeControl(func(fr *http2.Framer) error { return fr.WritePing(true, data) })
		}
	case *http2.GoAwayFrame:
		c.onGoAway(f)
	case *http2.WindowUpdateFrame:
		return c.onWindowUpdate(f)
	case *http2.PushPromiseFrame: // refused in the settings
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	return nil
}

// onSettings applies the server's settings (the acknowledgement is the caller's to send).
func (c *h2Conn) onSettings(f *http2.SettingsFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return f.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			return err
		}
		switch s.ID {
		case http2.SettingMaxConcurrentStreams:
			c.peerMax = s.Val
		case http2.SettingInitialWindowSize:
			delta := int32(s.Val) - c.peerWin
			for _, st := range c.streams {
				st.sendWin += delta
			}
			c.peerWin = int32(s.Val)
			c.senders.Broadcast()
		case http2.SettingMaxFrameSize:
			c.peerFrame = s.Val
		case http2.SettingHeaderTableSize: // applied by the next request's encoding (start)
			c.table, c.tableN = s.Val, true
		}
		return nil
	})
}

// onHeaders takes a response's head (or its trailers, which are dropped).
func (c *h2Conn) onHeaders(f *http2.MetaHeadersFrame) error {
	c.mu.Lock()
	s := c.streams[f.StreamID]
	if s == nil {
		unknown := f.StreamID >= c.nextID
		c.mu.Unlock()
		if unknown {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		return nil // a stream this side reset
	}
	if s.head { // trailers: they end the stream, and the relay has no use for them
		c.mu.Unlock()
		if !f.StreamEnded() {
			c.resetStream(s.id, http2.ErrCodeProtocol, errors.New("transport: HTTP/2 trailers that do not end the stream"))
			return nil
		}
		c.endStream(s)
		return nil
	}
	status, err := strconv.Atoi(f.PseudoValue("status"))
	switch {
	case f.Truncated:
		err = errors.New("transport: the upstream's response headers are too large")
	case err != nil || status < 100 || status > 999:
		err = errors.New("transport: the upstream sent an HTTP/2 response without a valid status")
	case status == 101:
		err = errors.New("transport: the upstream answered HTTP/2 with a protocol switch")
	case status < 200: // informational: the final head is still to come
		c.mu.Unlock()
		if f.StreamEnded() {
			c.resetStream(s.id, http2.ErrCodeProtocol, errors.New("transport: the upstream ended its HTTP/2 stream with no final response"))
		}
		return nil
	}
	if err == nil {
		s.length = -1
		for _, hf := range f.RegularFields() {
			if hf.Name == "content-length" {
				n, perr := strconv.ParseInt(hf.Value, 10, 64)
				if perr != nil || n < 0 || (s.length >= 0 && n != s.length) {
					err = errors.New("transport: the upstream sent an invalid Content-Length")
					break
				}
				s.length = n
			}
		}
		s.want = s.length
		if s.noBody || status == 204 || status == 304 {
			s.want = -1
		}
	}
	if err != nil {
		c.mu.Unlock()
		c.resetStream(s.id, http2.ErrCodeProtocol, err)
		return nil
	}
	s.status, s.fields, s.head = status, f.RegularFields(), true
	s.signal()
	c.mu.Unlock()
	if f.StreamEnded() {
		c.endStream(s)
	}
	return nil
}

// onData takes a stream's data, within the windows given.
func (c *h2Conn) onData(f *http2.DataFrame) error {
	n := int32(f.Length)
	data := f.Data()
	c.mu.Lock()
	if n > c.recvWin {
		c.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeFlowControl)
	}
	c.recvWin -= n
	s := c.streams[f.StreamID]
	if s == nil { // a stream that has ended or was reset leaves the map at once
		unknown := f.StreamID >= c.nextID
		conn, _ := c.giveBack(nil, n) // its data only counts for the connection
		c.mu.Unlock()
		if unknown {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		c.updateWindows(0, conn, 0)
		return nil
	}
	var err error
	code := http2.ErrCodeProtocol
	switch {
	case !s.head:
		err = errors.New("transport: HTTP/2 data before the response's headers")
	case n > s.recvWin:
		err = errors.New("transport: the upstream overran its HTTP/2 flow-control window")
		code = http2.ErrCodeFlowControl
	case s.want >= 0 && s.got+int64(len(data)) > s.want:
		err = errH2Length
	}
	if err != nil {
		conn, _ := c.giveBack(nil, n)
		c.mu.Unlock()
		c.resetStream(s.id, code, err)
		c.updateWindows(0, conn, 0)
		return nil
	}
	s.recvWin -= n
	s.got += int64(len(data))
	if len(data) > 0 {
		s.buf = append(s.buf, data...)
		s.signal()
	}
	var conn, stream uint32
	if pad := n - int32(len(data)); pad > 0 {
		conn, stream = c.giveBack(s, pad)
	}
	c.mu.Unlock()
	c.updateWindows(s.id, conn, stream)
	if f.StreamEnded() {
		c.endStream(s)
	}
	return nil
}

// endStream records the end of a stream's response.
func (c *h2Conn) endStream(s *h2Stream) {
	c.mu.Lock()
	if s.want >= 0 && s.got != s.want && s.err == nil {
		c.mu.Unlock()
		c.resetStream(s.id, http2.ErrCodeProtocol, errH2Length)
		return
	}
	s.ended = true
	s.signal()
	rst := !s.sent && c.streams[s.id] == s // the server needs no more of the request
	done := c.forgetLocked(s)
	c.mu.Unlock()
	if rst {
		c.writeControl(func(fr *http2.Framer) error { return fr.WriteRSTStream(s.id, http2.ErrCodeNo) })
	}
	if done {
		c.close()
	}
}

// resetStream fails a stream with err and resets it on the wire.
func (c *h2Conn) resetStream(id uint32, code http2.ErrCode, err error) {
	c.mu.Lock()
	s := c.streams[id]
	done := false
	if s != nil {
		if s.err == nil {
			s.err = err
		}
		s.signal()
		done = c.forgetLocked(s)
	}
	c.mu.Unlock()
	c.writeControl(func(fr *http2.Framer) error { return fr.WriteRSTStream(id, code) })
	if done {
		c.close()
	}
}

func (c *h2Conn) onReset(f *http2.RSTStreamFrame) {
	c.mu.Lock()
	s := c.streams[f.StreamID]
	done := false
	if s != nil {
		switch {
		case s.ended: // the response is whole: the server wants no more of the request
		case f.ErrCode == http2.ErrCodeRefusedStream && !s.head:
			s.err = errH2Refused
		default:
			s.err = h2ResetError{f.ErrCode}
		}
		s.signal()
		done = c.forgetLocked(s)
	}
	c.mu.Unlock()
	if done {
		c.close()
	}
}

// onGoAway stops the connection taking calls. Those the server will not process fail as
// refused; the others go on to their end.
func (c *h2Conn) onGoAway(f *http2.GoAwayFrame) {
	c.mu.Lock()
	c.goAway = true
	for id, s := range c.streams {
		if id > f.LastStreamID {
			s.err = errH2Refused
			if s.head { // answered already: the server did take it, and it must not go again
				s.err = errH2Lost
			}
			s.signal()
			c.forgetLocked(s)
		}
	}
	idle := len(c.streams) == 0
	c.mu.Unlock()
	if idle {
		c.close()
	}
}

func (c *h2Conn) onWindowUpdate(f *http2.WindowUpdateFrame) error {
	c.mu.Lock()
	done := false
	defer func() {
		c.mu.Unlock()
		if done { // the last stream of a connection told to close when idle
			c.close()
		}
	}()
	if f.StreamID == 0 {
		if int64(c.sendWin)+int64(f.Increment) > 1<<31-1 {
			return http2.ConnectionError(http2.ErrCodeFlowControl)
		}
		c.sendWin += int32(f.Increment)
	} else if s := c.streams[f.StreamID]; s != nil {
		if int64(s.sendWin)+int64(f.Increment) > 1<<31-1 {
			s.err = errors.New("transport: the upstream overflowed an HTTP/2 send window")
			s.signal()
			done = c.forgetLocked(s)
			id := s.id
			go c.writeControl(func(fr *http2.Framer) error { return fr.WriteRSTStream(id, http2.ErrCodeFlowControl) })
			return nil
		}
		s.sendWin += int32(f.Increment)
	}
	c.senders.Broadcast()
	return nil
}

// signal wakes whoever waits on the stream. mu is held.
func (s *h2Stream) signal() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Interrupt fails what waits on the stream: the call's context was cancelled.
func (s *h2Stream) Interrupt() {
	s.c.mu.Lock()
	s.stopped = true
	s.signal()
	s.c.senders.Broadcast()
	s.c.mu.Unlock()
}

// timeout fails what waits on the stream's head, or its body read whole: the response-header
// timeout passed. For a body relayed as it comes, the stream's idle watch cut it.
func (s *h2Stream) timeout() {
	s.c.mu.Lock()
	s.late = true
	s.signal()
	s.c.mu.Unlock()
}

// errLocked is why a wait on the stream must end, if it must. mu is held.
func (s *h2Stream) errLocked() error {
	switch {
	case s.stopped:
		return errStopped
	case s.late:
		return TimeoutError{}
	}
	return s.err
}

// errStopped stands for the call's context's error, which Stream and doH2 return instead.
var errStopped = errors.New("transport: call cancelled")

// awaitHead waits for the response's head.
func (s *h2Stream) awaitHead() error {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	for !s.head {
		if err := s.errLocked(); err != nil {
			return err
		}
		c.mu.Unlock()
		<-s.wake
		c.mu.Lock()
	}
	return nil
}

// Read reads the response body.
func (s *h2Stream) Read(p []byte) (int, error) {
	c := s.c
	c.mu.Lock()
	for len(s.buf) == 0 {
		if s.stopped {
			c.mu.Unlock()
			return 0, errStopped
		}
		if s.err != nil || s.ended {
			err := s.err
			c.mu.Unlock()
			if err == nil {
				err = io.EOF
			}
			return 0, err
		}
		if s.late { // the stream's idle watch cut it (Stream.lookIdle)
			c.mu.Unlock()
			return 0, TimeoutError{}
		}
		c.mu.Unlock()
		<-s.wake
		c.mu.Lock()
	}
	n := copy(p, s.buf)
	if s.buf = s.buf[n:]; len(s.buf) == 0 {
		s.buf = nil // an open stream holds no buffer between events
	}
	conn, stream := c.giveBack(s, int32(n))
	c.mu.Unlock()
	c.updateWindows(s.id, conn, stream)
	return n, nil
}

// buffered reports how much of the response body has come and waits to be read.
func (s *h2Stream) buffered() int {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return len(s.buf)
}

// readAll writes the whole response body to w, within the response-header timeout.
func (s *h2Stream) readAll(w io.Writer) error {
	c := s.c
	c.mu.Lock()
	for {
		if len(s.buf) > 0 {
			data := s.buf
			s.buf = nil
			conn, stream := c.giveBack(s, int32(len(data)))
			c.mu.Unlock()
			c.updateWindows(s.id, conn, stream)
			w.Write(data)
			c.mu.Lock()
			continue
		}
		if err := s.errLocked(); err != nil {
			c.mu.Unlock()
			return err
		}
		if s.ended {
			c.mu.Unlock()
			return nil
		}
		c.mu.Unlock()
		<-s.wake
		c.mu.Lock()
	}
}

// close lets go of the stream. One still open on the wire is reset, and what it holds unread is
// given back to the connection's window.
func (s *h2Stream) close() {
	c := s.c
	c.mu.Lock()
	if s.closed {
		c.mu.Unlock()
		return
	}
	s.closed = true
	s.stopped = true // a Read blocked on the stream, in another goroutine, returns
	s.signal()
	s.hook.release()
	open := c.streams[s.id] == s
	s.rest = nil
	conn, _ := c.giveBack(nil, int32(len(s.buf)))
	s.buf = nil
	done := false
	if open {
		done = c.forgetLocked(s)
	}
	c.mu.Unlock()
	if open {
		c.wlock()
		err := c.fr.WriteRSTStream(s.id, http2.ErrCodeCancel)
		if conn > 0 && err == nil {
			err = c.fr.WriteWindowUpdate(0, conn)
		}
		c.flushLocked(&err)
		c.wmu.Unlock()
	} else {
		c.updateWindows(0, conn, 0)
	}
	if done {
		c.close()
	}
}
