package proxy

import (
	"bytes"
	"io"
	"sync"

	"github.com/valyala/fasthttp"

	"github.com/tokenproxy/tokenproxy/internal/transport"
)

// stream answers with the upstream's body as it arrives. Server-sent events and bodies of
// unknown length go out chunked, each upstream read flushed as its own chunk, so an event
// reaches the caller as soon as it exists; a large body of known length keeps its length.
// fasthttp closes the body when the response is done or the caller has gone, which ends the
// call: the upstream connection is released or, if the stream was cut, closed.
func (h *Handler) stream(c *call, s *transport.Stream, upResp *fasthttp.Response) {
	c.streaming = true
	resp := &c.fc.Response
	body := &streamBody{h: h, c: c, s: s, upResp: upResp}
	if n := upResp.Header.ContentLength(); n >= 0 && !bytes.HasPrefix(upResp.Header.ContentType(), []byte("text/event-stream")) {
		resp.SetBodyStream(body, n)
		return
	}
	resp.ImmediateHeaderFlush = true // the caller sees the status before the first event
	body.relay = true
	resp.SetBodyStream(body, -1)
}

// relayBufs lends the buffers events are relayed through: a stream holds one only while an
// upstream read that filled its own small buffer goes on, never while it waits for the next
// event, so thousands of idle streams share a few.
var relayBufs = sync.Pool{New: func() any { b := make([]byte, 16<<10); return &b }}

// streamBody is the response body of a streamed call.
type streamBody struct {
	h      *Handler
	c      *call
	s      *transport.Stream
	upResp *fasthttp.Response
	eof    bool
	once   sync.Once
	// relay: the body goes out chunked through WriteTo, each upstream read its own chunk.
	relay bool
	// small takes each upstream read first: an event usually fits, and a stream waiting for
	// the next one then holds this and no more (fasthttp's own copy loop holds 4 KiB).
	small [512]byte
}

var _ fasthttp.BodyWriterTo = (*streamBody)(nil)

// SupportsBodyWriteTo tells fasthttp to send a chunked body through WriteTo (not Read), which
// lets the stream wait for each event with only its small buffer. Bodies of known length keep
// fasthttp's copy loop.
func (b *streamBody) SupportsBodyWriteTo() bool { return b.relay }

// WriteTo relays the body to w, one Write per upstream read, as fasthttp's copy loop would; w
// frames and flushes each as a chunk. A read that fills the small buffer is continued, into a
// borrowed buffer, with what has already arrived.
func (b *streamBody) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for {
		n, err := b.Read(b.small[:])
		out := b.small[:n]
		var lent *[]byte
		if err == nil && n == len(b.small) && b.s.Buffered() > 0 {
			lent = relayBufs.Get().(*[]byte)
			buf := *lent
			copy(buf, out)
			var m int
			m, err = b.Read(buf[n:])
			out = buf[:n+m]
		}
		if len(out) > 0 {
			wn, werr := w.Write(out)
			total += int64(wn)
			if werr != nil {
				err = werr
			}
		}
		if lent != nil {
			relayBufs.Put(lent)
		}
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

func (b *streamBody) Read(p []byte) (int, error) {
	n, err := b.s.Read(p)
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
		b.s.Close()
		fasthttp.ReleaseResponse(b.upResp)
		if !b.eof {
			b.c.aborted = true
			if b.c.err == nil && err != nil {
				b.c.err = err
			}
		}
		b.h.finish(b.c, nil)
	})
	return nil
}
