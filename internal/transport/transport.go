// Package transport is the gateway's HTTP/1.1 and HTTP/2 client to upstreams, built for a
// proxy's hot path: a request goes as a head its caller has rendered (Request, Send), or as a
// fasthttp request (Do), and the answer is parsed into a fasthttp response (zero-allocation
// parsing and writing).
//
// Profiles of net/http's Transport under load showed two costs this avoids: it writes a
// request's headers and body in separate syscalls, and it hands every request between the
// caller's goroutine and per-connection read and write goroutines. Here a request is written
// with one buffered flush and its response read on the caller's goroutine; a cancelled context
// interrupts the connection through context.AfterFunc (or, for an InterruptContext, its own
// registration, which allocates nothing), with no goroutine per request. Unlike
// fasthttp's own client, a context cancels a call at any point, and the response-header
// timeout does not limit a long stream. Connections are pooled per origin (keep-alive), TLS is
// verified with the system roots or a given pool, and HTTPS proxies are reached with CONNECT.
// HTTP/2 is offered to the origins that ask for it (Origin.WithHTTP2, see h2.go and h2conn.go:
// a request goes in one write there too, and a call has no goroutine of its own); elsewhere a
// stream cut short costs its connection, and the next one a dial (see bench/README.md).
package transport

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/valyala/fasthttp"
)

// Options configure a Transport. Zero values pick the defaults named.
type Options struct {
	// DialTimeout bounds connecting (and the proxy CONNECT). If zero, 10s.
	DialTimeout time.Duration
	// TLSHandshakeTimeout bounds the TLS handshake. If zero, 10s.
	TLSHandshakeTimeout time.Duration
	// ResponseHeaderTimeout bounds the wait for response headers after the request is written,
	// and for a body read whole (of known length, up to the buffer limit, not an event stream),
	// the wait for the body too, to within an eighth more (see conn.do); a body relayed as it
	// comes is bounded by StreamIdleTimeout instead. If zero, there is none.
	ResponseHeaderTimeout time.Duration
	// StreamIdleTimeout cuts a body relayed as it comes (a Stream) when nothing of it arrives
	// for this long while a read waits, to within a quarter more (see Stream.watchIdle): its
	// Read then fails with StreamIdleError. A reader away from the stream for as long (stuck
	// writing what it read) is reported to Stream.OnStalledReader's function. If zero, neither.
	StreamIdleTimeout time.Duration
	// IdleTimeout closes pooled connections idle for longer. If zero, 90s.
	IdleTimeout time.Duration
	// MaxIdlePerHost caps pooled idle connections per origin. If zero, 256.
	MaxIdlePerHost int
	// Spares is how many connections to an origin are kept dialled ahead of need: when a call
	// takes the pool's last idle connection, or finds none, another is dialled in the
	// background (while fewer than Spares are idle or being dialled), so the next new call or
	// stream finds one open and does not wait for a connect and a TLS handshake. Spares are
	// made only as calls use the pool, and close like any idle connection. If zero, none.
	Spares int
	// BufferLimit is the largest response body (of known length) read into the response;
	// larger ones, and those of unknown length or of type text/event-stream, are streamed.
	// If zero, 1 MiB.
	BufferLimit int
	// TLSConfig is the base TLS configuration; ServerName is set per origin. If nil, the
	// system roots and TLS 1.2 or later are used.
	TLSConfig *tls.Config
	// Proxy picks the proxy for an https origin (e.g. from HTTPS_PROXY); it is reached with
	// CONNECT. If nil, or if it returns nil, the origin is dialled directly.
	Proxy func(origin *url.URL) (*url.URL, error)
}

func (o Options) dialTimeout() time.Duration { return orDefault(o.DialTimeout, 10*time.Second) }
func (o Options) handshakeTimeout() time.Duration {
	return orDefault(o.TLSHandshakeTimeout, 10*time.Second)
}
func (o Options) idleTimeout() time.Duration { return orDefault(o.IdleTimeout, 90*time.Second) }

func (o Options) maxIdle() int {
	if o.MaxIdlePerHost <= 0 {
		return 256
	}
	return o.MaxIdlePerHost
}

func (o Options) bufferLimit() int {
	if o.BufferLimit <= 0 {
		return 1 << 20
	}
	return o.BufferLimit
}

func orDefault(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

// Origin is where requests go: http or https, host and port. Build it once per upstream.
type Origin struct {
	u          *url.URL
	key, addr  string
	serverName string
	tls        bool
	roots      *x509.CertPool // if set, the CAs the server's certificate must chain to
	h2         bool           // offer HTTP/2 (https only)
}

// WithHTTP2 returns the origin with HTTP/2 offered in the TLS handshake: if the server chooses
// it, calls share multiplexed connections (see h2.go); if not, they go over HTTP/1.1. It has no
// effect on a plain-http origin, where nothing negotiates a protocol.
func (o Origin) WithHTTP2() Origin {
	if o.tls && !o.h2 {
		o.h2 = true
		o.key += "#h2"
	}
	return o
}

// WithRoots returns the origin with its own CAs, instead of the transport's, for verifying the
// server's certificate (a private endpoint behind a corporate CA). id names the CA set, so
// origins with different CAs never share connections.
func (o Origin) WithRoots(pool *x509.CertPool, id string) Origin {
	o.roots = pool
	o.key += "#ca=" + id
	return o
}

// NewOrigin parses an upstream URL (its path and query are ignored).
func NewOrigin(raw string) (Origin, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return Origin{}, err
	}
	if u.Scheme != "http" && u.Scheme != "https" || u.Host == "" {
		return Origin{}, fmt.Errorf("transport: %q is not an http(s) origin", raw)
	}
	port := u.Port()
	if port == "" {
		port = map[string]string{"http": "80", "https": "443"}[u.Scheme]
	}
	addr := net.JoinHostPort(u.Hostname(), port)
	return Origin{
		u:          &url.URL{Scheme: u.Scheme, Host: u.Host},
		key:        u.Scheme + "://" + addr,
		addr:       addr,
		serverName: u.Hostname(),
		tls:        u.Scheme == "https",
	}, nil
}

// Host is the value for the Host header: the origin's host[:port] as written.
func (o Origin) Host() string { return o.u.Host }

// Transport is an HTTP/1.1 client with a keep-alive pool per origin.
type Transport struct {
	opts   Options
	tlsCfg *tls.Config

	mu     sync.Mutex
	pools  map[string]*pool
	closed bool
	stop   chan struct{}
	reaped sync.WaitGroup

	// Spare connections are dialled under ctx, which Close cancels, and counted in spares.
	ctx    context.Context
	cancel context.CancelFunc
	spares sync.WaitGroup
}

// New returns a Transport. Close it to release its connections and its idle-connection reaper.
func New(opts Options) *Transport {
	cfg := opts.TLSConfig
	if cfg == nil {
		cfg = &tls.Config{MinVersion: tls.VersionTLS12}
	} else {
		cfg = cfg.Clone()
	}
	cfg.NextProtos = []string{"http/1.1"}
	t := &Transport{opts: opts, tlsCfg: cfg, pools: map[string]*pool{}, stop: make(chan struct{})}
	t.ctx, t.cancel = context.WithCancel(context.Background())
	t.reaped.Go(t.reap)
	return t
}

// Close closes every idle connection, stops the reaper and any spare being dialled (see
// Options.Spares). Connections in use (an HTTP/2 connection carrying calls) are closed when
// their response (their last call) is done.
func (t *Transport) Close() {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return
	}
	t.closed = true
	pools := t.pools
	t.mu.Unlock()
	close(t.stop)
	t.cancel()
	t.reaped.Wait()
	t.spares.Wait()
	for _, p := range pools {
		p.closeIdle(time.Time{})
		p.closeH2(false)
	}
}

func (t *Transport) isClosed() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.closed
}

func (t *Transport) reap() {
	tick := time.NewTicker(t.opts.idleTimeout() / 2)
	defer tick.Stop()
	for {
		select {
		case <-t.stop:
			return
		case now := <-tick.C:
			t.closeExpired(now)
		}
	}
}

// closeExpired closes the connections that have been idle longer than IdleTimeout at now.
func (t *Transport) closeExpired(now time.Time) {
	t.mu.Lock()
	pools := slices.Collect(maps.Values(t.pools))
	t.mu.Unlock()
	for _, p := range pools {
		p.closeIdle(now.Add(-t.opts.idleTimeout()))
		p.h2Count() // lets go of the HTTP/2 connections that have closed
	}
}

// Do sends req to origin and reads the response into resp. req must carry its request URI
// (path and query) and Host header; its body is sent with a Content-Length.
//
// authorization, when not empty, is sent as the request's Authorization header, in place of
// any req has: the gateway's bearer token, ≈ 1.5 KB, goes straight into the request's head as
// it is written (fasthttp would copy a header value twice, and scan it twice, on the way into
// req). It must be a valid field value, with no control characters; the broker refuses tokens
// that are not.
//
// A response body of known length up to BufferLimit is read into resp and the returned Stream
// is nil. Any other body (server-sent events, unknown length, large) is returned as a Stream,
// which must be read to EOF or closed; resp then holds the headers only.
//
// A request on a reused connection that the server had closed while it sat idle is retried
// once on a new connection (the body is in req, so it can be sent again) when no response byte
// had arrived.
//
// On an origin that offers HTTP/2 (Origin.WithHTTP2) and whose server chose it, the call goes
// over a shared HTTP/2 connection instead.
func (t *Transport) Do(ctx context.Context, origin Origin, req *fasthttp.Request, authorization string, resp *fasthttp.Response) (*Stream, error) {
	if authorization != "" {
		req.Header.Del(fasthttp.HeaderAuthorization)
	}
	return t.send(ctx, time.Time{}, origin, fastRequest{req}, authorization, resp)
}

// Send is Do for a request whose head the caller has rendered (see Request): what the gateway
// uses on its hot path. now is the time the caller read as it called, which spares Send a
// reading of its own (zero: Send reads the clock).
func (t *Transport) Send(ctx context.Context, now time.Time, origin Origin, req *Request, authorization string, resp *fasthttp.Response) (*Stream, error) {
	return t.send(ctx, now, origin, req, authorization, resp)
}

func (t *Transport) send(ctx context.Context, start time.Time, origin Origin, req message, authorization string, resp *fasthttp.Response) (*Stream, error) {
	s, err := t.sendOnce(ctx, start, origin, req, authorization, resp)
	if s != nil && t.opts.StreamIdleTimeout > 0 {
		s.watchIdle(t.opts.StreamIdleTimeout)
	}
	return s, err
}

func (t *Transport) sendOnce(ctx context.Context, start time.Time, origin Origin, req message, authorization string, resp *fasthttp.Response) (*Stream, error) {
	if err := ctx.Err(); err != nil {
		return nil, err // nobody waits for the answer: the upstream is not asked
	}
	p, err := t.pool(origin)
	if err != nil {
		return nil, err
	}
	// Until the server has chosen HTTP/1.1, a call to an origin that offers HTTP/2 goes the HTTP/2
	// way: the calls that start together before the first connection is up then wait for that
	// one, instead of each dialling its own. A server that chooses HTTP/1.1 leaves the connection
	// in the idle pool, where the call below finds it.
	if p.origin.h2 && p.chose.Load() != choseH1 {
		s, err := p.doH2(ctx, req, authorization, resp)
		if err != errNotH2 {
			return s, err
		}
	}
	for attempt := 0; ; attempt++ {
		// One reading of the clock serves the pool's idle check, the header deadline and, for
		// a buffered response, the time the connection goes idle (off by the call's length):
		// the caller's, on the first attempt, if it gave one.
		now := start
		if attempt > 0 || now.IsZero() {
			now = time.Now()
		}
		c, reused, err := p.get(ctx, now)
		if err != nil {
			return nil, err
		}
		if c.h2 { // a new connection, on which the server chose HTTP/2
			if err := p.adoptH2(c); err != nil {
				return nil, err
			}
			return p.doH2(ctx, req, authorization, resp)
		}
		if !reused {
			now = time.Now() // the header timeout starts after the dial
		}
		stream, err := c.do(ctx, now, req, authorization, resp, t.opts.ResponseHeaderTimeout, t.opts.bufferLimit())
		if err == nil {
			return stream, nil
		}
		c.close()
		var stale *staleConnError
		if attempt == 0 && reused && errors.As(err, &stale) && ctx.Err() == nil {
			// No byte of an answer came, so resp is as it was given: it is not reset, which
			// would clear what its owner set on it (the gateway's is the caller's response).
			continue
		}
		return nil, unwrapStale(err)
	}
}

func (t *Transport) pool(o Origin) (*pool, error) {
	if o.u == nil {
		return nil, errors.New("transport: zero Origin")
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, errors.New("transport: closed")
	}
	p, ok := t.pools[o.key]
	if !ok {
		p = &pool{t: t, origin: o}
		if o.tls {
			p.tlsCfg = t.tlsCfg.Clone()
			p.tlsCfg.ServerName = o.serverName
			if o.h2 {
				p.tlsCfg.NextProtos = []string{"h2", "http/1.1"}
			}
			if o.roots != nil {
				p.tlsCfg.RootCAs = o.roots
			}
			// Sessions resume, so a new connection (a stream needs one of its own) skips the
			// server's certificate and its verification. The cache is the pool's own: a
			// resumed session rests on the verification of the handshake that made it, so one
			// verified with an origin's CAs is never offered on behalf of another's.
			p.tlsCfg.ClientSessionCache = tls.NewLRUClientSessionCache(4)
		}
		t.pools[o.key] = p
	}
	return p, nil
}

// pool holds the idle connections to one origin.
type pool struct {
	t      *Transport
	origin Origin
	tlsCfg *tls.Config // for an https origin: the transport's, for this server

	// Connections dialled: over a resumed TLS session, or not (plain, or a full handshake).
	// Each is counted once, in one of the two, so both only ever grow.
	opened, resumed atomic.Uint64
	// Spares whose dial failed (not counting those Close stopped).
	spareFailed atomic.Uint64

	mu      sync.Mutex
	idle    []*conn // most recently used last
	dialing int     // spares being dialled

	// chose is the protocol the server chose on the last connection dialled, where HTTP/2 is
	// offered (Origin.WithHTTP2): calls go over h2's connections unless it chose HTTP/1.1. Only
	// then do calls reach get, and with it spares: one HTTP/2 connection carries many calls.
	chose atomic.Int32 // choseNone, choseH1 or choseH2
	h2    h2Conns
}

// spareLocked starts dialling spares in the background while the pool holds fewer than Spares
// idle connections, counting those being dialled. p.mu is held; t.mu is taken inside it here,
// and nothing takes p.mu inside t.mu.
func (p *pool) spareLocked() {
	n := p.t.opts.Spares - p.dialing - len(p.idle)
	if n <= 0 {
		return
	}
	p.t.mu.Lock()
	if p.t.closed {
		p.t.mu.Unlock()
		return
	}
	p.t.spares.Add(n)
	p.t.mu.Unlock()
	p.dialing += n
	for range n {
		go p.dialSpare()
	}
}

// dialSpare dials a connection for the pool to keep. One that fails is let go: the next call
// that finds no idle connection dials for itself, and reports what goes wrong.
func (p *pool) dialSpare() {
	defer p.t.spares.Done()
	c, err := p.dial(p.t.ctx)
	if err != nil {
		p.mu.Lock()
		p.dialing--
		p.mu.Unlock()
		if p.t.ctx.Err() == nil {
			p.spareFailed.Add(1)
		}
		return
	}
	if c.h2 {
		p.mu.Lock()
		p.dialing--
		p.mu.Unlock()
		p.adoptH2(c) // a failure closes c, and the next call dials
		return
	}
	p.keep(c, time.Now(), true)
}

// get returns an idle connection (reused) or a new one.
func (p *pool) get(ctx context.Context, now time.Time) (*conn, bool, error) {
	cutoff := now.Add(-p.t.opts.idleTimeout())
	p.mu.Lock()
	for n := len(p.idle); n > 0; n = len(p.idle) {
		c := p.idle[n-1]
		p.idle[n-1] = nil
		p.idle = p.idle[:n-1]
		if c.idleSince.Before(cutoff) {
			c.nc.Close()
			continue
		}
		p.spareLocked()
		p.mu.Unlock()
		return c, true, nil
	}
	p.spareLocked()
	p.mu.Unlock()
	c, err := p.dial(ctx)
	return c, false, err
}

func (p *pool) put(c *conn, now time.Time) { p.keep(c, now, false) }

// keep adds c to the idle connections, or closes it if there are enough. A spare stops counting
// as being dialled in the same step, so that no call in between starts one more.
func (p *pool) keep(c *conn, now time.Time, spare bool) {
	c.idleSince = now
	p.mu.Lock()
	if spare {
		p.dialing--
	}
	if len(p.idle) < p.t.opts.maxIdle() {
		p.idle = append(p.idle, c)
		p.mu.Unlock()
		p.t.mu.Lock()
		closed := p.t.closed
		p.t.mu.Unlock()
		if closed {
			p.closeIdle(time.Time{})
		}
		return
	}
	p.mu.Unlock()
	c.nc.Close()
}

// closeIdle closes idle connections unused since before cutoff (all of them if cutoff is zero).
func (p *pool) closeIdle(cutoff time.Time) {
	p.mu.Lock()
	keep := p.idle[:0]
	var drop []*conn
	for _, c := range p.idle {
		if cutoff.IsZero() || c.idleSince.Before(cutoff) {
			drop = append(drop, c)
		} else {
			keep = append(keep, c)
		}
	}
	for i := len(keep); i < len(p.idle); i++ {
		p.idle[i] = nil
	}
	p.idle = keep
	p.mu.Unlock()
	for _, c := range drop {
		c.nc.Close()
	}
}

func (p *pool) dial(ctx context.Context) (*conn, error) {
	o := p.t.opts
	d := net.Dialer{Timeout: o.dialTimeout(), KeepAlive: 30 * time.Second}
	var proxy *url.URL
	if p.origin.tls && o.Proxy != nil {
		var err error
		if proxy, err = o.Proxy(p.origin.u); err != nil {
			return nil, fmt.Errorf("choosing a proxy: %w", err)
		}
	}
	target := p.origin.addr
	if proxy != nil {
		target = proxyAddr(proxy)
	}
	nc, err := d.DialContext(ctx, "tcp", target)
	if err != nil {
		return nil, err
	}
	if proxy != nil {
		if err := connectTunnel(ctx, nc, proxy, p.origin.addr, o.dialTimeout()); err != nil {
			nc.Close()
			return nil, err
		}
	}
	count, h2 := &p.opened, false
	if p.origin.tls {
		tc := tls.Client(nc, p.tlsCfg)
		hctx, cancel := context.WithTimeout(ctx, o.handshakeTimeout())
		err := tc.HandshakeContext(hctx)
		cancel()
		if err != nil {
			nc.Close()
			return nil, err
		}
		state := tc.ConnectionState()
		if state.DidResume {
			count = &p.resumed
		}
		nc = tc
		h2 = state.NegotiatedProtocol == "h2"
		if p.origin.h2 && !h2 {
			p.chose.Store(choseH1)
		}
	}
	count.Add(1)
	return &conn{p: p, nc: nc, h2: h2}, nil
}

// PoolStats is what the connections to one origin have done, for metrics.
type PoolStats struct {
	Origin  string // scheme://host:port
	TLS     bool
	Opened  uint64 // connections opened plainly or, for https, with a full handshake
	Resumed uint64 // connections opened over a resumed TLS session (not in Opened)
	Idle    int    // idle connections kept now
	HTTP2   int    // HTTP/2 connections open now (Origin.WithHTTP2), each carrying many calls
	// SpareFailures counts spares (Options.Spares) that could not be dialled. A call that then
	// finds no idle connection dials for itself, and its failure is the call's.
	SpareFailures uint64
}

// Stats returns one PoolStats per pool. An origin reached with more than one CA set has a pool
// for each.
func (t *Transport) Stats() []PoolStats {
	t.mu.Lock()
	pools := slices.Collect(maps.Values(t.pools))
	t.mu.Unlock()
	out := make([]PoolStats, 0, len(pools))
	for _, p := range pools {
		p.mu.Lock()
		idle := len(p.idle)
		p.mu.Unlock()
		out = append(out, PoolStats{
			Origin: p.origin.u.Scheme + "://" + p.origin.addr, TLS: p.origin.tls,
			Opened: p.opened.Load(), Resumed: p.resumed.Load(), Idle: idle, HTTP2: p.h2Count(),
			SpareFailures: p.spareFailed.Load(),
		})
	}
	return out
}

func proxyAddr(u *url.URL) string {
	port := u.Port()
	if port == "" {
		port = map[string]string{"http": "80", "https": "443"}[u.Scheme]
	}
	return net.JoinHostPort(u.Hostname(), port)
}

// connectTunnel asks an HTTP proxy for a tunnel to addr.
func connectTunnel(ctx context.Context, nc net.Conn, proxy *url.URL, addr string, timeout time.Duration) error {
	if proxy.Scheme != "http" {
		return fmt.Errorf("transport: proxy scheme %q is not supported (use http://)", proxy.Scheme)
	}
	deadline := time.Now().Add(timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	nc.SetDeadline(deadline)
	defer nc.SetDeadline(time.Time{})
	req := "CONNECT " + addr + " HTTP/1.1\r\nHost: " + addr + "\r\n"
	if u := proxy.User; u != nil {
		pw, _ := u.Password()
		req += "Proxy-Authorization: Basic " + base64.StdEncoding.EncodeToString([]byte(u.Username()+":"+pw)) + "\r\n"
	}
	if _, err := io.WriteString(nc, req+"\r\n"); err != nil {
		return fmt.Errorf("connecting through proxy %s: %w", proxy.Host, err)
	}
	br := bufio.NewReader(nc)
	var resp fasthttp.ResponseHeader
	if err := resp.Read(br); err != nil {
		return fmt.Errorf("connecting through proxy %s: %w", proxy.Host, err)
	}
	if resp.StatusCode() != http.StatusOK {
		return fmt.Errorf("proxy %s refused the tunnel to %s: HTTP %d", proxy.Host, addr, resp.StatusCode())
	}
	if br.Buffered() > 0 {
		return fmt.Errorf("proxy %s sent data before the tunnel was up", proxy.Host)
	}
	return nil
}

// conn is one keep-alive connection.
type conn struct {
	p         *pool
	nc        net.Conn
	br        *bufio.Reader  // borrowed from readers while a response's headers and buffered body are read
	src       countingReader // what br reads: nc, its reads counted (see do)
	idleSince time.Time
	h2        bool // the server chose HTTP/2 in the handshake: the connection goes to p.h2
	// deadline is the read deadline set on nc for response headers (zero: none); see do.
	deadline time.Time
	// wdeadline is the write deadline set on nc for writing requests (zero: none); see do.
	wdeadline time.Time
}

// readers buffer responses on their way in. A connection borrows one for a call's headers (and
// its body, when that is buffered) and gives it back before the call ends or the body streams,
// so idle connections and open streams hold none (see Stream).
var readers = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, 16<<10) }}

// streamReaders read streamed bodies. One is small: a relay reads 512 bytes or more at a time,
// which bufio passes straight through, so this buffer only takes chunk headers and the ends
// of chunks.
var streamReaders = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, 512) }}

func (c *conn) borrowReader() {
	c.br = readers.Get().(*bufio.Reader)
	c.src.r = c.nc
	c.br.Reset(&c.src)
}

// countingReader counts the reads made of r.
type countingReader struct {
	r     io.Reader
	reads uint32
}

func (c *countingReader) Read(p []byte) (int, error) {
	c.reads++
	return c.r.Read(p)
}

// returnReader gives the borrowed reader back; what it still held is dropped.
func (c *conn) returnReader() {
	if c.br != nil {
		c.br.Reset(nil)
		readers.Put(c.br)
		c.br = nil
	}
}

// writers buffer requests on their way out. A request is written and flushed in one go, so a
// connection needs a writer only for that moment, not while it streams a response or idles.
var writers = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 16<<10) }}

// write sends req in one flush.
func (c *conn) write(req message, authorization string) error {
	bw := writers.Get().(*bufio.Writer)
	bw.Reset(c.nc)
	err := req.writeH1(bw, authorization)
	if err == nil {
		err = bw.Flush()
	}
	bw.Reset(nil)
	writers.Put(bw)
	return err
}

// writeRequest writes req to bw, with authorization (if not empty) as its Authorization header.
// A request as the gateway builds them (Host and request URI set in its headers, the body in
// memory) has its head rendered straight into bw's buffer and the header appended to it, last;
// one whose body is a stream, or that has no Host (or a head fasthttp renders otherwise than
// expected), goes through fasthttp's own writer, with the header set in req first. (A body set through fasthttp's form API is not sent: req.Body() is.)
func writeRequest(bw *bufio.Writer, req *fasthttp.Request, authorization string) error {
	if authorization == "" {
		return req.Write(bw)
	}
	viaFasthttp := func() error {
		req.Header.Set(fasthttp.HeaderAuthorization, authorization)
		return req.Write(bw)
	}
	if req.IsBodyStream() || len(req.Header.Host()) == 0 {
		return viaFasthttp()
	}
	body := req.Body()
	if len(body) > 0 || !req.Header.IsGet() && !req.Header.IsHead() {
		req.Header.SetContentLength(len(body)) // as fasthttp's writer does
	}
	head := req.Header.AppendBytes(bw.AvailableBuffer())
	if !bytes.HasSuffix(head, []byte("\r\n\r\n")) { // the blank line that ends the head
		return viaFasthttp()
	}
	head = append(head[:len(head)-2], "Authorization: "...)
	head = append(head, authorization...)
	head = append(head, "\r\n\r\n"...)
	if _, err := bw.Write(head); err != nil {
		return err
	}
	_, err := bw.Write(body)
	return err
}

// Interrupt makes what the connection is blocked on return at once (InterruptContext).
func (c *conn) Interrupt() { c.nc.SetDeadline(aLongTimeAgo) }

// An InterruptContext is a context that interrupts what registers with it when it is
// cancelled. Do uses it, when the context it is given is one, instead of context.AfterFunc,
// which allocates a context, a closure and its parent's map of children on every call.
type InterruptContext interface {
	context.Context
	// OnCancel has i.Interrupt called once the context is cancelled: at once if it is already.
	OnCancel(i Interrupter)
	// OffCancel undoes OnCancel. It reports false if Interrupt has been called or is about to
	// be (the context was cancelled first), as the stop function of context.AfterFunc does.
	OffCancel(i Interrupter) bool
}

// An Interrupter has something to interrupt when a context is cancelled.
type Interrupter interface{ Interrupt() }

// cancelHook is a connection's (or an HTTP/2 stream's) registration with its call's context,
// for the call.
type cancelHook struct {
	ctx  InterruptContext // when the context is one; otherwise stop
	i    Interrupter
	stop func() bool // context.AfterFunc's
}

func onCancel(ctx context.Context, i Interrupter) cancelHook {
	if ic, ok := ctx.(InterruptContext); ok {
		ic.OnCancel(i)
		return cancelHook{ctx: ic, i: i}
	}
	return cancelHook{stop: context.AfterFunc(ctx, i.Interrupt)}
}

// release ends the registration, reporting false if the context was cancelled first (the
// connection's deadline may then be poisoned).
func (h cancelHook) release() bool {
	if h.ctx != nil {
		return h.ctx.OffCancel(h.i)
	}
	return h.stop()
}

func (c *conn) close() {
	c.returnReader()
	c.nc.Close()
}

// aLongTimeAgo is a deadline in the past, which makes blocked reads and writes return at once.
var aLongTimeAgo = time.Unix(1, 0)

// staleConnError marks a failure that happened before the server sent anything on a
// connection it may have closed while it sat idle.
type staleConnError struct{ err error }

func (e *staleConnError) Error() string { return e.err.Error() }
func (e *staleConnError) Unwrap() error { return e.err }

func unwrapStale(err error) error {
	var s *staleConnError
	if errors.As(err, &s) {
		return s.err
	}
	return err
}

// TimeoutError is returned when the response headers, or a body read whole, do not arrive
// within ResponseHeaderTimeout. It is a net.Error whose Timeout is true.
type TimeoutError struct{}

func (TimeoutError) Error() string   { return "timeout awaiting the response" }
func (TimeoutError) Timeout() bool   { return true }
func (TimeoutError) Temporary() bool { return true }

var eventStream = []byte("text/event-stream")

// do writes req and reads the response on this connection.
func (c *conn) do(ctx context.Context, now time.Time, req message, authorization string, resp *fasthttp.Response, headerTimeout time.Duration, bufferLimit int) (*Stream, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	// Cancelling the call interrupts whatever the connection is blocked on.
	stop := onCancel(ctx, c)
	fail := func(err error) (*Stream, error) {
		stop.release()
		switch {
		case ctx.Err() != nil:
			return nil, ctx.Err()
		case isTimeout(err):
			return nil, TimeoutError{}
		}
		return nil, err
	}
	// Writing the request is bounded as the wait for the answer's head is, from the call's
	// start: an upstream that takes the head and stops reading the body (or answers early and
	// never reads it) must not hold the call. The deadline is moved as the read deadline is,
	// below.
	if want := now.Add(headerTimeout); headerTimeout > 0 && c.wdeadline.Before(want) {
		c.wdeadline = want.Add(headerTimeout / 8)
		c.nc.SetWriteDeadline(c.wdeadline)
	}
	if err := c.write(req, authorization); err != nil {
		if isTimeout(err) {
			return fail(err) // the upstream took the connection and stopped reading: not stale
		}
		return fail(&staleConnError{err})
	}
	// The answer is hardly ever in yet: a read now would find nothing, a system call (≈ 1.8 µs
	// on the machines bench/ runs on) wasted before the wait. Under load, letting the other
	// calls' goroutines run first gives it time to arrive, and the read finds it; with nothing
	// else to run, this returns at once. See bench/README.md for what it gave, and why the
	// server does not do the same before reading a caller's next request.
	runtime.Gosched()
	c.borrowReader()
	// The deadline in force is moved only when it would end before this call's, and then an
	// eighth of the timeout further, so calls in a row on a busy connection move it about once
	// in each eighth of the timeout instead of each time (≈ 180 ns a move: five clock readings
	// and a runtime timer). A call waits at least the timeout, and at most an eighth longer.
	if want := now.Add(headerTimeout); headerTimeout > 0 && c.deadline.Before(want) {
		c.deadline = want.Add(headerTimeout / 8)
		c.nc.SetReadDeadline(c.deadline)
	}
	// Waiting for the first byte on its own tells a connection the server closed while idle
	// (nothing at all arrives) from a response cut short.
	if _, err := c.br.Peek(1); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
			err = &staleConnError{err}
		}
		return fail(err)
	}
	// What the reader holds now, and whether it has to read again for the head, tells what
	// the head was (see below).
	held, _ := c.br.Peek(c.br.Buffered())
	reads := c.src.reads
	if err := readHeader(c.br, &resp.Header); err != nil {
		return fail(err)
	}
	// The deadline stays for a body read whole: one that stalls after its headers would
	// otherwise hold the call until its caller gives up. A connection that goes back to the
	// pool keeps it; the next call on it sets its own before reading.
	reusable := !resp.Header.ConnectionClose() && !req.closes()
	status := resp.StatusCode()
	if isHead(req) || status == fasthttp.StatusNoContent || status == fasthttp.StatusNotModified {
		resp.SkipBody = true
		return nil, c.finish(stop, reusable, now)
	}
	cl := resp.Header.ContentLength()
	if cl == -1 {
		// An answer framed both by Content-Length and as chunked is how a response is
		// smuggled past one reader of it into another (RFC 9112, section 6.3: "ought to be
		// handled as an error"); fasthttp keeps one of the two and says nothing. The head is
		// checked where it still lies whole in the reader's buffer. One that came in pieces
		// cannot be, and its connection is not trusted with another call.
		switch {
		case c.src.reads != reads:
			reusable = false
		case hasContentLength(held[:len(held)-c.br.Buffered()]):
			return fail(errTwoLengths)
		}
	}
	if cl >= 0 && cl <= bufferLimit && !bytes.HasPrefix(resp.Header.ContentType(), eventStream) {
		if err := resp.ReadBody(c.br, bufferLimit); err != nil {
			return fail(err)
		}
		return nil, c.finish(stop, reusable, now)
	}
	// A stream's events may come minutes apart: StreamIdleTimeout bounds it, not this deadline.
	if headerTimeout > 0 {
		c.nc.SetReadDeadline(time.Time{})
		c.deadline = time.Time{}
		if ctx.Err() != nil { // cancelled before the deadline was cleared: honour it
			return fail(ctx.Err())
		}
	}
	// The body streams through a small reader of its own, after what the borrowed one holds.
	s := &Stream{c: c, stop: stop, ctx: ctx, reusable: reusable && cl != -2}
	if n := c.br.Buffered(); n > 0 {
		b, _ := c.br.Peek(n)
		s.rest.buf = bytes.Clone(b)
	}
	c.returnReader()
	s.rest.src = c.nc
	s.br = streamReaders.Get().(*bufio.Reader)
	s.br.Reset(&s.rest)
	s.body.r = s.br
	switch {
	case cl >= 0:
		s.body.mode, s.body.left = length, int64(cl)
	case cl == -1:
		s.body.mode = chunked
	default:
		s.body.mode = untilClose
	}
	return s, nil
}

// rest reads the bytes that arrived with a streamed response's headers, then the connection.
type rest struct {
	buf []byte
	src io.Reader
}

func (r *rest) Read(p []byte) (int, error) {
	if len(r.buf) == 0 {
		return r.src.Read(p)
	}
	n := copy(p, r.buf)
	if r.buf = r.buf[n:]; len(r.buf) == 0 {
		r.buf = nil
	}
	return n, nil
}

// readHeader reads the final response header, skipping informational ones (100 Continue,
// 103 Early Hints). A 101 is refused: the gateway never asks to switch protocols (it drops
// Upgrade), and what followed would be taken for the answer's body.
func readHeader(br *bufio.Reader, h *fasthttp.ResponseHeader) error {
	for range 100 {
		if err := h.Read(br); err != nil {
			return headError(err)
		}
		switch s := h.StatusCode(); {
		case s == fasthttp.StatusSwitchingProtocols:
			return errSwitchingProtocols
		case s < 100 || s > 199:
			return nil
		}
	}
	return errors.New("transport: too many informational responses")
}

var (
	errSwitchingProtocols = errors.New("transport: the upstream answered 101 Switching Protocols, which was not asked for")
	errMalformedHead      = errors.New("transport: the upstream's response head is malformed")
	errHeadTooLarge       = errors.New("transport: the upstream's response head is too large")
	errHeadCut            = errors.New("transport: the upstream's response head was cut short")
	errTwoLengths         = errors.New("transport: the upstream's response has both Content-Length and Transfer-Encoding")
)

// hasContentLength reports whether the last of the response heads in heads, each ended by an
// empty line, has a Content-Length field.
func hasContentLength(heads []byte) bool {
	found := false
	for len(heads) > 0 {
		line, rest, _ := bytes.Cut(heads, []byte("\n"))
		heads = rest
		line = bytes.TrimSuffix(line, []byte("\r"))
		if len(line) == 0 { // the end of a head; another may follow
			found = found && len(heads) == 0
			continue
		}
		name, _, ok := bytes.Cut(line, []byte(":"))
		found = found || ok && bytes.EqualFold(bytes.TrimRight(name, " \t"), []byte("Content-Length"))
	}
	return found
}

// headError is what the gateway says of a failed read of a response head. fasthttp's errors
// quote what was read (a header's value, up to 400 bytes of the head): an upstream, or a box in
// front of it, that echoes the request's Authorization header into a malformed head would put
// the bearer token into the error, and so into the access log. Timeouts stay timeouts.
func headError(err error) error {
	var small *fasthttp.ErrSmallBuffer
	switch {
	case isTimeout(err):
		return os.ErrDeadlineExceeded
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNRESET):
		return errHeadCut
	case errors.As(err, &small):
		return errHeadTooLarge
	}
	return errMalformedHead
}

// finish ends a call whose body is fully read: the connection goes back to the pool if it can.
func (c *conn) finish(stop cancelHook, reusable bool, now time.Time) error {
	stopped := stop.release() // false: the context was cancelled and the deadline is poisoned
	if stopped && reusable && c.br.Buffered() == 0 {
		c.returnReader()
		c.p.put(c, now)
		return nil
	}
	c.close()
	return nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// Stream is a response body being read from the upstream. At EOF its connection returns to
// the pool; closed earlier, the connection is closed (over HTTP/2, only the stream is reset).
type Stream struct {
	h2       *h2Stream // over HTTP/2; then c, body, br and rest are unused
	c        *conn
	body     body
	br       *bufio.Reader // what body reads from: a small reader over rest
	rest     rest
	stop     cancelHook
	ctx      context.Context
	reusable bool
	mu       sync.Mutex
	done     bool // the body has ended, or the stream was cut or closed
	closed   bool // Close was called

	// progress counts the reads that brought data, and reading is set while a read waits, for
	// the idle watch (watchIdle), which sets idleCut when it cuts the stream, or readerStalled
	// when it reports the reader stuck elsewhere; idle is the watch's own state, under mu.
	progress      atomic.Uint32
	reading       atomic.Bool
	idleCut       atomic.Bool
	readerStalled atomic.Bool
	idle          *idleWatch
}

// StreamIdleError is returned by a Stream's Read when nothing of the body arrived for
// Options.StreamIdleTimeout. It is a net.Error whose Timeout is true.
type StreamIdleError struct{ After time.Duration }

func (e StreamIdleError) Error() string {
	return "the upstream sent nothing of the body for " + e.After.String() + " (timeouts.stream_idle)"
}
func (StreamIdleError) Timeout() bool   { return true }
func (StreamIdleError) Temporary() bool { return true }

// idleWatch is a stream's idle watch: a timer that looks at the stream's progress every
// quarter of the timeout. When four looks in a row found none while a read waited, the
// upstream has gone quiet, and the stream is cut. When four found none and no read waiting,
// the reader is stuck elsewhere (writing what it read to a caller that takes nothing), which is
// not the upstream's silence: that is reported to stalled, if set. Either comes between the
// timeout and a quarter more after the last data. A stream that goes on costs three atomic
// operations a read and a timer a quarter of the timeout: no clock reading, no deadline moved.
type idleWatch struct {
	timeout time.Duration
	timer   *time.Timer
	seen    uint32 // progress at the last look
	quiet   int    // looks in a row that found no progress and a read waiting
	away    int    // looks in a row that found no progress and no read waiting
	stalled func()
}

const idleLooks = 4

// watchIdle starts the stream's idle watch.
func (s *Stream) watchIdle(timeout time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done || s.idle != nil {
		return
	}
	s.idle = &idleWatch{timeout: timeout}
	s.idle.timer = time.AfterFunc(timeout/idleLooks, s.lookIdle)
}

// lookIdle is the idle watch's look at the stream (on the timer's goroutine). Once the body
// has ended, the reader may still be writing its last bytes on: until the stream is closed, the
// watch looks for that write stalling, and for nothing else.
func (s *Stream) lookIdle() {
	s.mu.Lock()
	defer s.mu.Unlock()
	w := s.idle
	if s.closed || s.done && w.stalled == nil {
		return
	}
	switch p := s.progress.Load(); {
	case p != w.seen:
		w.seen, w.quiet, w.away = p, 0, 0
	case s.reading.Load() && !s.done:
		w.away = 0
		if w.quiet++; w.quiet >= idleLooks {
			// The stream still holds its connection (not done, under mu): the read blocked
			// on it fails, and the stream ends, cut, never to give the connection back.
			s.idleCut.Store(true)
			if s.h2 != nil {
				s.h2.timeout()
			} else {
				s.c.nc.SetReadDeadline(aLongTimeAgo)
			}
			return
		}
	default:
		w.quiet = 0
		if w.away++; w.away >= idleLooks && w.stalled != nil {
			s.readerStalled.Store(true)
			w.stalled()
			return
		}
	}
	w.timer.Reset(w.timeout / idleLooks)
}

// OnStalledReader sets what the idle watch calls, once, from a goroutine of its own, if the
// stream's reader is away from it for the idle timeout with nothing read: stuck, most likely,
// writing what it read to someone who takes nothing; that includes the last of it, after the
// body's end, until the stream is closed. f should make that write fail. Nothing is called
// once the stream is closed, nor if there is no idle timeout. The reader is counted away from
// the call on.
func (s *Stream) OnStalledReader(f func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.idle != nil {
		s.idle.stalled = f
		s.idle.away = 0 // the reader is counted away from here on
	}
}

// ReaderStalled reports whether the idle watch found the reader stalled (OnStalledReader).
func (s *Stream) ReaderStalled() bool { return s.readerStalled.Load() }

// Read reads the body. After the context is cancelled it returns the context's error; if the
// server hangs up before a framed body's end, it returns io.ErrUnexpectedEOF.
func (s *Stream) Read(p []byte) (int, error) {
	var n int
	var err error
	s.reading.Store(true)
	if s.h2 != nil {
		n, err = s.h2.Read(p)
	} else {
		n, err = s.body.Read(p)
	}
	s.reading.Store(false)
	if n > 0 {
		s.progress.Add(1)
	}
	if err == nil {
		return n, nil
	}
	if err == io.EOF {
		s.finish(true)
		return n, io.EOF
	}
	s.finish(false)
	switch {
	case s.ctx.Err() != nil:
		return n, s.ctx.Err()
	case s.idleCut.Load():
		return n, StreamIdleError{s.idle.timeout}
	}
	return n, err
}

// Buffered reports how many bytes of the upstream's answer have arrived and wait to be read:
// while it is above zero, a Read will most likely not wait on the network. Over HTTP/1.1 they
// include the framing, and may be framing only, so a Read can still wait; over HTTP/2 they are
// data, and a Read does not wait. It is 0 once the stream is done.
func (s *Stream) Buffered() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.done:
		return 0
	case s.h2 != nil:
		return s.h2.buffered()
	}
	return s.br.Buffered() + len(s.rest.buf)
}

// Close ends the stream; a body not read to EOF takes its connection with it.
func (s *Stream) Close() error {
	s.mu.Lock()
	s.closed = true
	if s.idle != nil {
		s.idle.timer.Stop()
	}
	s.mu.Unlock()
	s.finish(false)
	return nil
}

func (s *Stream) finish(eof bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done {
		return
	}
	s.done = true
	if s.idle != nil && !eof { // at the end, the watch goes on until Close (lookIdle)
		s.idle.timer.Stop()
	}
	if s.h2 != nil {
		s.h2.close()
		return
	}
	stopped := s.stop.release()
	clean := s.br.Buffered() == 0 && len(s.rest.buf) == 0
	s.releaseReader()
	if eof && stopped && s.reusable && clean && !s.idleCut.Load() {
		s.c.p.put(s.c, time.Now())
		return
	}
	s.c.close()
}

func (s *Stream) releaseReader() {
	s.br.Reset(nil)
	streamReaders.Put(s.br)
	s.br = nil
}
