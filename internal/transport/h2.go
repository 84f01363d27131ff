package transport

import (
	"bytes"
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/valyala/fasthttp"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// HTTP/2 to an origin that offers it (Origin.WithHTTP2): calls share a few TLS connections, so
// a new stream needs no dial and no handshake, and an open one holds no connection or TLS state
// of its own, and one cut short costs a stream reset, not its connection. The protocol is this
// package's own client (h2conn.go), over connections this package dials: the same proxy
// tunnel, CAs and session cache as HTTP/1.1. The server chooses in the TLS handshake (ALPN); one
// that does not choose h2 is spoken to in HTTP/1.1 as before.
//
// Flow control bounds what a connection holds for calls whose callers read slower than the
// upstream sends: each stream's window is h2StreamWindow and a connection carries at most
// h2MaxStreams calls, whose windows together stay under the connection's, so callers that stop
// reading never hold up the other calls on their connection.
const (
	h2StreamWindow   = 64 << 10         // the protocol's own default window
	h2ConnWindow     = 4<<20 - 1        // the connection's window
	h2MaxStreams     = 60               // 60 × 64 KiB < 4 MiB
	h2PingAfter      = 30 * time.Second // silence after which a connection is checked with a ping
	h2MaxHeaderBytes = 64 << 10         // the largest response head taken
	h2WriteTimeout   = 30 * time.Second // a write blocked this long fails its connection
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
	conns   []*h2Conn
	dialing chan struct{} // closed when the dial in flight ends; nil if none
}

// errNotH2 reports that a connection dialled for HTTP/2 came back speaking HTTP/1.1.
var errNotH2 = errors.New("transport: the server no longer chooses HTTP/2")

// adoptH2 makes c, on which the server chose HTTP/2, one of the pool's HTTP/2 connections.
func (p *pool) adoptH2(c *conn) error {
	cc, err := newH2Conn(c.nc, p.t.opts.idleTimeout(), p.t.opts.handshakeTimeout())
	if err != nil {
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
func (p *pool) h2Conn(ctx context.Context) (*h2Conn, error) {
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
func (p *pool) reserveLocked() *h2Conn {
	p.pruneLocked()
	for _, cc := range p.h2.conns {
		if cc.reserve() {
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
			cc.close()
		} else {
			cc.closeWhenIdle()
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

// pruneLocked lets go of the HTTP/2 connections that can no longer be used: closed, sent away
// and done, or idle longer than IdleTimeout. p.h2.mu is held.
func (p *pool) pruneLocked() {
	now := time.Now()
	live := p.h2.conns[:0]
	for _, cc := range p.h2.conns {
		if !cc.usable(now) {
			cc.close()
			continue
		}
		live = append(live, cc)
	}
	clear(p.h2.conns[len(live):])
	p.h2.conns = live
}

// doH2 sends req over one of the pool's HTTP/2 connections and reads the response into resp as
// Do does. A call the server did not take (it went away first, or refused the stream) goes
// once more, on another connection.
func (p *pool) doH2(ctx context.Context, req message, authorization string, resp *fasthttp.Response) (*Stream, error) {
	path, _, _ := bytes.Cut(req.target(), []byte("?"))
	if len(path) == 0 || path[0] != '/' || bytes.HasPrefix(path, []byte("//")) {
		return nil, errors.New("transport: the request path must start with a single /")
	}
	for attempt := 0; ; attempt++ {
		cc, err := p.h2Conn(ctx)
		if err != nil {
			return nil, err
		}
		s, err := cc.roundTrip(ctx, req, authorization, resp, p.t.opts)
		if err == errH2Refused && attempt == 0 && ctx.Err() == nil {
			continue // resp is untouched: a refused call has no answer (see Do)
		}
		return s, err
	}
}

// roundTrip sends req on a stream of its own and reads the response's head into resp, with its
// body when it is read whole (see Do); otherwise the body is returned as a Stream.
func (c *h2Conn) roundTrip(ctx context.Context, req message, authorization string, resp *fasthttp.Response, o Options) (*Stream, error) {
	s := &h2Stream{c: c, wake: make(chan struct{}, 1), recvWin: h2StreamWindow, length: -1, want: -1,
		noBody: isHead(req)}
	s.hook = onCancel(ctx, s)
	if err := c.start(s, req, authorization); err != nil {
		s.hook.release()
		return nil, err
	}
	var timer *time.Timer
	if d := o.ResponseHeaderTimeout; d > 0 {
		timer = time.AfterFunc(d, s.timeout)
	}
	end := func() {
		if timer != nil {
			timer.Stop()
		}
		s.close()
	}
	fail := func(err error) (*Stream, error) {
		end()
		if err == errStopped {
			return nil, ctx.Err()
		}
		return nil, err
	}
	if err := s.awaitHead(); err != nil {
		return fail(err)
	}
	// The head is s's own from here: the connection does not touch it once it has come.
	resp.SetStatusCode(s.status)
	for _, hf := range s.fields {
		// The length is set below, from what was checked. Connection, which no HTTP/2 answer
		// should hold, is kept: the headers it names go with it where the answer is cleaned, as
		// over HTTP/1.1.
		if hf.Name == "content-length" || hf.Name != "connection" && notForH2(hf.Name) {
			continue
		}
		resp.Header.Add(hf.Name, hf.Value)
	}
	s.fields = nil
	cl := s.length
	if s.noBody || s.status == fasthttp.StatusNoContent || s.status == fasthttp.StatusNotModified {
		resp.SkipBody = true
		if cl >= 0 {
			resp.Header.SetContentLength(int(cl))
		}
		end()
		return nil, nil
	}
	if cl >= 0 && cl <= int64(o.bufferLimit()) && !bytes.HasPrefix(resp.Header.ContentType(), eventStream) {
		if err := s.readAll(resp.BodyWriter()); err != nil {
			return fail(err)
		}
		resp.Header.SetContentLength(int(cl))
		end()
		return nil, nil
	}
	if timer != nil && !timer.Stop() { // a stream's events may come minutes apart: StreamIdleTimeout bounds it
		return fail(TimeoutError{})
	}
	resp.Header.SetContentLength(max(int(cl), -1)) // unknown: relayed in chunks
	return &Stream{ctx: ctx, h2: s}, nil
}

// start opens s with req's head and sends its body, or as much of it as the windows let go at
// once, in one write; the rest is copied (req's buffer is its owner's again when Do returns)
// and sent as the server gives window. A call that finds the connection no longer taking
// calls gets errH2Refused: nothing was sent.
func (c *h2Conn) start(s *h2Stream, req message, authorization string) error {
	body := req.body()
	c.wlock()
	defer c.wmu.Unlock()
	c.mu.Lock()
	c.reserved--
	if c.nextID > 1<<31-1 { // stream IDs run out: the connection takes no more calls
		c.goAway = true
	}
	if c.err != nil || c.goAway {
		c.mu.Unlock()
		return errH2Refused
	}
	s.id = c.nextID
	c.nextID += 2
	c.streams[s.id] = s
	s.sendWin = c.peerWin
	send := min(int64(len(body)), int64(max(s.sendWin, 0)), int64(max(c.sendWin, 0)))
	s.sendWin -= int32(send)
	c.sendWin -= int32(send)
	s.sent = send == int64(len(body))
	if !s.sent {
		s.rest = bytes.Clone(body[send:])
	}
	frame := int(c.peerFrame)
	if c.tableN {
		c.henc.SetMaxDynamicTableSizeLimit(c.table)
		c.tableN = false
	}
	c.mu.Unlock()

	c.encodeHead(req, authorization, len(body))
	hb := c.hbuf.Bytes()
	first := hb[:min(len(hb), frame)]
	err := c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: s.id, BlockFragment: first,
		EndStream: len(body) == 0, EndHeaders: len(first) == len(hb)})
	for hb = hb[len(first):]; len(hb) > 0 && err == nil; {
		n := min(len(hb), frame)
		err = c.fr.WriteContinuation(s.id, n == len(hb), hb[:n])
		hb = hb[n:]
	}
	for data := body[:send]; len(data) > 0 && err == nil; {
		n := min(len(data), frame)
		err = c.fr.WriteData(s.id, n == len(data) && s.sent, data[:n])
		data = data[n:]
	}
	c.flushLocked(&err)
	if err != nil {
		return errH2Lost
	}
	if !s.sent {
		go c.sendRest(s)
	}
	return nil
}

// sendRest sends what start left of a request body as the server's windows allow, until it is
// sent or the stream ends.
func (c *h2Conn) sendRest(s *h2Stream) {
	for {
		c.mu.Lock()
		for c.streams[s.id] == s && !s.stopped && (s.sendWin <= 0 || c.sendWin <= 0) {
			c.senders.Wait()
		}
		if c.streams[s.id] != s || s.stopped || len(s.rest) == 0 {
			c.mu.Unlock()
			return
		}
		n := min(len(s.rest), int(s.sendWin), int(c.sendWin), int(c.peerFrame))
		s.sendWin -= int32(n)
		c.sendWin -= int32(n)
		data := s.rest[:n]
		s.rest = s.rest[n:]
		c.mu.Unlock()

		c.wlock()
		c.mu.Lock()
		open := c.streams[s.id] == s // a stream reset meanwhile is not written to
		last := len(s.rest) == 0
		if open && last {
			s.sent = true // before the write: the response may end as soon as it is out
			s.rest = nil
		}
		c.mu.Unlock()
		var err error
		if open {
			err = c.fr.WriteData(s.id, last, data)
			c.flushLocked(&err)
		}
		c.wmu.Unlock()
		if !open || last || err != nil {
			return
		}
	}
}

// encodeHead encodes req's head into c.hbuf, with authorization (if not empty) as its
// Authorization header (see Do). The hop-by-hop headers of HTTP/1.1 have no place in HTTP/2,
// and no User-Agent is added that the call did not have. wmu is held.
func (c *h2Conn) encodeHead(req message, authorization string, bodyLen int) {
	c.hbuf.Reset()
	e := c.henc
	method := methodName(req.method())
	e.WriteField(hpack.HeaderField{Name: ":method", Value: method})
	e.WriteField(hpack.HeaderField{Name: ":scheme", Value: "https"})
	c.authority = req.authority(c.authority)
	e.WriteField(hpack.HeaderField{Name: ":authority", Value: c.authority})
	e.WriteField(hpack.HeaderField{Name: ":path", Value: string(req.target())})
	for k, v := range req.fields() {
		if notForH2(k) {
			continue
		}
		name := c.lowerName(k)
		var value string
		if name == "authorization" { // the same token for every call until it is renewed (Do has
			// removed it from req when it is given as authorization)
			if string(v) != c.auth {
				c.auth = string(v)
			}
			value = c.auth
		} else {
			value = string(v)
		}
		e.WriteField(hpack.HeaderField{Name: name, Value: value})
	}
	if authorization != "" {
		if authorization != c.auth {
			c.auth = authorization
		}
		e.WriteField(hpack.HeaderField{Name: "authorization", Value: c.auth})
	}
	if bodyLen > 0 || method == "POST" || method == "PUT" || method == "PATCH" {
		e.WriteField(hpack.HeaderField{Name: "content-length", Value: strconv.Itoa(bodyLen)})
	}
}

// lowerName is a header name in lower case, as HTTP/2 has them: a constant for the usual ones.
func (c *h2Conn) lowerName(k []byte) string {
	if name, ok := h2Names[string(k)]; ok {
		return name
	}
	c.lower = append(c.lower[:0], k...)
	for i, b := range c.lower {
		if 'A' <= b && b <= 'Z' {
			c.lower[i] = b + 'a' - 'A'
		}
	}
	return string(c.lower)
}

// h2Names are the usual request header names, as fasthttp spells them and in lower case.
var h2Names = func() map[string]string {
	m := map[string]string{}
	for _, n := range []string{"Accept", "Accept-Encoding", "Accept-Language", "Authorization", "Content-Type",
		"User-Agent", "X-Ms-Client-Request-Id", "X-Request-Id", "Traceparent", "Tracestate", "Openai-Organization",
		"X-Stainless-Lang", "X-Stainless-Package-Version", "X-Stainless-Os", "X-Stainless-Arch",
		"X-Stainless-Runtime", "X-Stainless-Runtime-Version", "X-Stainless-Retry-Count", "X-Stainless-Timeout",
		"X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "Forwarded", "Cookie", "Api-Key"} {
		m[n] = strings.ToLower(n)
	}
	return m
}()

// methodName is the method as a string, a constant for the usual ones.
func methodName(m []byte) string {
	switch string(m) {
	case "POST":
		return "POST"
	case "GET":
		return "GET"
	case "DELETE":
		return "DELETE"
	case "PUT":
		return "PUT"
	case "PATCH":
		return "PATCH"
	case "HEAD":
		return "HEAD"
	}
	return string(m)
}

// notH2 are the headers HTTP/2 has no place for: hop-by-hop ones (RFC 9113 §8.2.2), and those
// it carries otherwise (Host as :authority, the length in its framing).
var notH2 = []string{"Host", "Content-Length", "Connection", "Keep-Alive", "Proxy-Connection",
	"Transfer-Encoding", "Upgrade", "Te", "Trailer"}

func notForH2[T string | []byte](k T) bool {
	for _, n := range notH2 {
		if len(k) == len(n) && strings.EqualFold(string(k), n) {
			return true
		}
	}
	return false
}
