package transport

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/valyala/fasthttp"
)

// HTTP/2 to an origin that offers it (Origin.WithHTTP2): calls share a few TLS connections, so
// a new stream needs no dial and no handshake, and an open one holds no connection or TLS state
// of its own, and one cut short costs a stream reset, not its connection. The protocol is Go's
// own (net/http's HTTP/2 client connections), over connections this package dials: the same
// proxy tunnel, CAs and session cache as HTTP/1.1. The server chooses in the TLS handshake
// (ALPN); one that does not choose h2 is spoken to in HTTP/1.1 as before.
//
// Flow control bounds what a connection holds for calls whose callers read slower than the
// upstream sends: each stream's window is h2StreamWindow and a connection carries at most
// h2MaxStreams calls, whose windows together stay under the connection's, so callers that stop
// reading never hold up the other calls on their connection.
const (
	h2StreamWindow = 64 << 10         // the protocol's own default window
	h2ConnWindow   = 4<<20 - 1        // the largest net/http accepts
	h2MaxStreams   = 60               // 60 × 64 KiB < 4 MiB
	h2PingAfter    = 30 * time.Second // silence after which a connection is checked with a ping
)

// What the server chose in the handshake, where HTTP/2 is offered (pool.chose).
const (
	choseNone int32 = iota
	choseH1
	choseH2
)

// h2Conns are a pool's HTTP/2 connections.
type h2Conns struct {
	mu      sync.Mutex
	conns   []*http.ClientConn
	dialing chan struct{}          // closed when the dial in flight ends; nil if none
	auth    atomic.Pointer[string] // the last Authorization value sent (see h2Request)
}

// handoff carries a connection this package dialled to newH2Transport's DialTLSContext.
type handoff struct{}

// errNotH2 reports that a connection dialled for HTTP/2 came back speaking HTTP/1.1.
var errNotH2 = errors.New("transport: the server no longer chooses HTTP/2")

// newH2Transport returns the net/http transport that wraps this package's connections in
// HTTP/2 client connections. It dials nothing itself.
func newH2Transport(o Options) *http.Transport {
	var protos http.Protocols
	protos.SetHTTP2(true)
	return &http.Transport{
		Protocols: &protos,
		HTTP2: &http.HTTP2Config{
			MaxReceiveBufferPerStream:     h2StreamWindow,
			MaxReceiveBufferPerConnection: h2ConnWindow,
			SendPingTimeout:               h2PingAfter,
		},
		DialTLSContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			if c, ok := ctx.Value(handoff{}).(net.Conn); ok {
				return c, nil
			}
			return nil, errors.New("transport: no connection handed over")
		},
		DisableCompression:     true, // bodies pass through as the upstream sends them
		IdleConnTimeout:        o.idleTimeout(),
		MaxResponseHeaderBytes: 64 << 10,
	}
}

// adoptH2 makes c, on which the server chose HTTP/2, one of the pool's HTTP/2 connections.
func (p *pool) adoptH2(c *conn) error {
	ctx := context.WithValue(context.Background(), handoff{}, c.nc)
	cc, err := p.t.h2.NewClientConn(ctx, "https", p.origin.addr)
	if err != nil {
		c.nc.Close()
		return err
	}
	p.chose.Store(choseH2)
	p.h2.mu.Lock()
	p.h2.conns = append(p.h2.conns, cc)
	p.h2.mu.Unlock()
	if p.t.isClosed() {
		p.closeH2(false)
	}
	return nil
}

// h2Conn returns a connection with a stream reserved for one call, dialling one if none can
// take it. Calls that find none wait for one dial rather than each making its own. A call
// dials twice at most: a server that lets a new connection take no call at all (it may set
// its stream limit to 0) is an error, not a reason to dial on and on.
func (p *pool) h2Conn(ctx context.Context) (*http.ClientConn, error) {
	for dials := 0; ; {
		if p.t.isClosed() {
			return nil, errors.New("transport: closed")
		}
		if p.chose.Load() == choseH1 { // chosen while this call waited
			return nil, errNotH2
		}
		p.h2.mu.Lock()
		cc := p.reserveLocked()
		if cc != nil {
			p.h2.mu.Unlock()
			return cc, nil
		}
		if wait := p.h2.dialing; wait != nil {
			p.h2.mu.Unlock()
			select {
			case <-wait:
				continue
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		if dials == 2 {
			p.h2.mu.Unlock()
			return nil, errors.New("transport: no HTTP/2 connection to the upstream takes a call")
		}
		dials++
		done := make(chan struct{})
		p.h2.dialing = done
		p.h2.mu.Unlock()
		err := p.dialH2(ctx)
		p.h2.mu.Lock()
		p.h2.dialing = nil
		p.h2.mu.Unlock()
		close(done)
		if err != nil {
			return nil, err
		}
	}
}

// reserveLocked reserves a stream on the first connection that can take one, letting go of
// connections that can no longer be used. p.h2.mu is held.
func (p *pool) reserveLocked() *http.ClientConn {
	p.pruneLocked()
	for _, cc := range p.h2.conns {
		if cc.InFlight() < h2MaxStreams && cc.Reserve() == nil {
			return cc
		}
	}
	return nil
}

// dialH2 dials a connection for HTTP/2. One on which the server chooses HTTP/1.1 after all goes
// to the idle pool, and the pool back to HTTP/1.1 (errNotH2).
func (p *pool) dialH2(ctx context.Context) error {
	c, err := p.dial(ctx)
	if err != nil {
		return err
	}
	if !c.h2 { // dial has recorded the choice
		p.put(c, time.Now())
		return errNotH2
	}
	return p.adoptH2(c)
}

// closeH2 closes the HTTP/2 connections: all of them, or (when the transport closes) those
// carrying no call, the others being closed as their last call ends.
func (p *pool) closeH2(all bool) {
	p.h2.mu.Lock()
	conns := p.h2.conns
	p.h2.conns = nil
	p.h2.mu.Unlock()
	for _, cc := range conns {
		if all {
			cc.Close()
			continue
		}
		cc.SetStateHook(func(cc *http.ClientConn) {
			if cc.InFlight() == 0 {
				go cc.Close()
			}
		})
		if cc.InFlight() == 0 {
			cc.Close()
		}
	}
}

// h2Count reports the HTTP/2 connections still open, letting go of those that have closed.
func (p *pool) h2Count() int {
	p.h2.mu.Lock()
	defer p.h2.mu.Unlock()
	p.pruneLocked()
	return len(p.h2.conns)
}

// pruneLocked lets go of the HTTP/2 connections that can no longer be used (net/http closes
// idle ones after IdleTimeout, and those the server closes or sends away). p.h2.mu is held.
func (p *pool) pruneLocked() {
	live := p.h2.conns[:0]
	for _, cc := range p.h2.conns {
		if cc.Err() != nil {
			cc.Close()
			continue
		}
		live = append(live, cc)
	}
	clear(p.h2.conns[len(live):])
	p.h2.conns = live
}

// doH2 sends req over one of the pool's HTTP/2 connections and reads the response into resp as
// Do does.
func (p *pool) doH2(ctx context.Context, req *fasthttp.Request, resp *fasthttp.Response) (*Stream, error) {
	cc, err := p.h2Conn(ctx)
	if err != nil {
		return nil, err
	}
	// The response-header timeout cancels the call's own context, which then lives as long as
	// the stream does.
	rctx, cancel := ctx, context.CancelCauseFunc(nil)
	var timer *time.Timer
	if d := p.t.opts.ResponseHeaderTimeout; d > 0 {
		rctx, cancel = context.WithCancelCause(ctx)
		timer = time.AfterFunc(d, func() { cancel(TimeoutError{}) })
	}
	end := func() {
		if timer != nil {
			timer.Stop()
			cancel(nil)
		}
	}
	fail := func(err error) (*Stream, error) {
		end()
		switch {
		case ctx.Err() != nil:
			return nil, ctx.Err()
		case context.Cause(rctx) == (TimeoutError{}):
			return nil, TimeoutError{}
		}
		return nil, err
	}
	body := &h2Body{b: req.Body()}
	hreq, err := h2Request(rctx, p.origin, req, body, &p.h2.auth)
	if err != nil {
		cc.Release()
		return fail(err)
	}
	hresp, err := cc.RoundTrip(hreq)
	// The request's body buffer is the caller's again once Do returns; what HTTP/2 still has
	// to send of it (a server may answer before reading it all) is copied first.
	body.detach()
	if err != nil {
		return fail(err)
	}
	resp.SetStatusCode(hresp.StatusCode)
	for k, vv := range hresp.Header {
		if k == "Content-Length" {
			continue // set below, from what HTTP/2 checked
		}
		for _, v := range vv {
			resp.Header.Add(k, v)
		}
	}
	cl := hresp.ContentLength
	status := hresp.StatusCode
	if req.Header.IsHead() || status == fasthttp.StatusNoContent || status == fasthttp.StatusNotModified {
		resp.SkipBody = true
		if cl >= 0 {
			resp.Header.SetContentLength(int(cl))
		}
		hresp.Body.Close()
		end()
		return nil, nil
	}
	if cl >= 0 && cl <= int64(p.t.opts.bufferLimit()) && !bytes.HasPrefix(resp.Header.ContentType(), eventStream) {
		err := readH2Body(resp, hresp.Body)
		hresp.Body.Close()
		if err != nil {
			return fail(err)
		}
		resp.Header.SetContentLength(int(cl))
		end()
		return nil, nil
	}
	if timer != nil {
		timer.Stop() // a stream is not bounded: its events may come minutes apart
		if rctx.Err() != nil {
			hresp.Body.Close()
			return fail(rctx.Err())
		}
	}
	resp.Header.SetContentLength(max(int(cl), -1)) // unknown: relayed in chunks
	// Go's client keeps the response for as long as the stream is open; its headers and the
	// request it points to are copied or sent by now.
	hresp.Header, hresp.Request = nil, nil
	return &Stream{ctx: ctx, h2: &h2Stream{body: hresp.Body, cancel: cancel}}, nil
}

// h2Request builds the net/http request for req. The hop-by-hop headers of HTTP/1.1 have no
// place in HTTP/2, and Go's client adds no User-Agent the call did not have.
//
// The Authorization value, the same token for every call until it is renewed, is shared
// through auth rather than copied for each: a request is kept as long as its stream is open.
func h2Request(ctx context.Context, o Origin, req *fasthttp.Request, body *h2Body, auth *atomic.Pointer[string]) (*http.Request, error) {
	path, query, _ := bytes.Cut(req.Header.RequestURI(), []byte("?"))
	if len(path) == 0 || path[0] != '/' || bytes.HasPrefix(path, []byte("//")) {
		return nil, errors.New("transport: the request path must start with a single /")
	}
	hreq := &http.Request{
		Method:        string(req.Header.Method()),
		URL:           &url.URL{Scheme: "https", Host: o.u.Host, Opaque: string(path), RawQuery: string(query)},
		Host:          string(req.Host()),
		Header:        make(http.Header, req.Header.Len()),
		ContentLength: int64(len(body.b)),
		Body:          http.NoBody,
	}
	if len(body.b) > 0 {
		hreq.Body = body
	}
	for k, v := range req.Header.All() {
		if notForH2(k) {
			continue
		}
		key := string(k)
		var val string
		if key == fasthttp.HeaderAuthorization {
			if last := auth.Load(); last != nil && *last == string(v) {
				val = *last
			} else {
				val = string(v)
				auth.Store(&val)
			}
		} else {
			val = string(v)
		}
		hreq.Header[key] = append(hreq.Header[key], val)
	}
	if _, ok := hreq.Header["User-Agent"]; !ok {
		hreq.Header["User-Agent"] = []string{""} // none, as over HTTP/1.1
	}
	return hreq.WithContext(ctx), nil
}

// notH2 are the request headers HTTP/2 has no place for: hop-by-hop ones (RFC 9113 §8.2.2), and
// those it carries otherwise (Host as :authority, the length in its framing).
var notH2 = [][]byte{[]byte("Host"), []byte("Content-Length"), []byte("Connection"), []byte("Keep-Alive"),
	[]byte("Proxy-Connection"), []byte("Transfer-Encoding"), []byte("Upgrade"), []byte("Te"), []byte("Trailer")}

func notForH2(k []byte) bool {
	for _, n := range notH2 {
		if bytes.EqualFold(k, n) {
			return true
		}
	}
	return false
}

// h2Body is a request body HTTP/2 sends from a goroutine of its own. It reads from the
// request's buffer until detach, which copies what is left, so that the buffer can go back to
// its owner when Do returns.
type h2Body struct {
	mu  sync.Mutex
	b   []byte
	own bool
}

func (b *h2Body) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.b) == 0 {
		return 0, io.EOF
	}
	n := copy(p, b.b)
	b.b = b.b[n:]
	return n, nil
}

func (b *h2Body) Close() error {
	b.mu.Lock()
	b.b, b.own = nil, true
	b.mu.Unlock()
	return nil
}

func (b *h2Body) detach() {
	b.mu.Lock()
	if !b.own && len(b.b) > 0 {
		b.b = bytes.Clone(b.b)
	}
	b.own = true
	b.mu.Unlock()
}

// h2Bufs copy bodies read whole into responses.
var h2Bufs = sync.Pool{New: func() any { b := make([]byte, 16<<10); return &b }}

// readH2Body reads a body of known length (HTTP/2 checks it against Content-Length) into resp.
func readH2Body(resp *fasthttp.Response, r io.Reader) error {
	bp := h2Bufs.Get().(*[]byte)
	defer h2Bufs.Put(bp)
	w := resp.BodyWriter()
	for {
		n, err := r.Read(*bp)
		w.Write((*bp)[:n])
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// h2Stream is a body streamed over HTTP/2. Closed before its end, it resets its stream only:
// the connection goes on carrying the others.
type h2Stream struct {
	body   io.ReadCloser
	cancel context.CancelCauseFunc // the response-header timeout's context, if there is one
}

func (s *h2Stream) close() {
	s.body.Close()
	if s.cancel != nil {
		s.cancel(nil)
	}
}
