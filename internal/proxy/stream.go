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
	resp.SetBodyStream(body, -1)
}

// streamBody is the response body of a streamed call.
type streamBody struct {
	h      *Handler
	c      *call
	s      *transport.Stream
	upResp *fasthttp.Response
	eof    bool
	once   sync.Once
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
