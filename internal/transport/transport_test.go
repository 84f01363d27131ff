package transport

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// countingServer counts the connections its clients open.
func countingServer(t *testing.T, h http.HandlerFunc) (*httptest.Server, *atomic.Int32) {
	t.Helper()
	var conns atomic.Int32
	srv := httptest.NewUnstartedServer(h)
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	return srv, &conns
}

func newTransport(t *testing.T, o Options) *Transport {
	t.Helper()
	tr := New(o)
	t.Cleanup(tr.Close)
	return tr
}

// result is a response and, for a streamed body, its stream.
type result struct {
	resp   *fasthttp.Response
	stream *Stream
}

// body returns the response body, reading the stream if there is one.
func (r result) body(t *testing.T) string {
	t.Helper()
	if r.stream == nil {
		return string(r.resp.Body())
	}
	b, err := io.ReadAll(r.stream)
	r.stream.Close()
	if err != nil {
		t.Fatalf("reading body: %v", err)
	}
	return string(b)
}

func (r result) header(k string) string { return string(r.resp.Header.Peek(k)) }

// request builds a request for srvURL+path as the gateway does.
func request(t testing.TB, method, rawURL, body string) (Origin, *fasthttp.Request) {
	t.Helper()
	u, err := url.Parse(rawURL)
	if err != nil {
		t.Fatal(err)
	}
	o, err := NewOrigin(u.Scheme + "://" + u.Host)
	if err != nil {
		t.Fatal(err)
	}
	req := &fasthttp.Request{}
	req.Header.SetMethod(method)
	req.Header.SetRequestURI(u.RequestURI())
	req.Header.SetHost(o.Host())
	if body != "" || method == "POST" {
		req.SetBodyString(body)
	}
	return o, req
}

func do(t *testing.T, tr *Transport, ctx context.Context, method, rawURL, body string) (result, error) {
	t.Helper()
	o, req := request(t, method, rawURL, body)
	resp := &fasthttp.Response{}
	stream, err := tr.Do(ctx, o, req, "", resp)
	return result{resp, stream}, err
}

func post(t *testing.T, tr *Transport, ctx context.Context, rawURL, body string) (result, error) {
	t.Helper()
	return do(t, tr, ctx, "POST", rawURL, body)
}

func TestRoundTripAndKeepAlive(t *testing.T) {
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		w.Header().Set("X-Host", r.Host)
		w.Header().Set("X-Len", r.Header.Get("Content-Length"))
		w.Header().Set("X-Auth", r.Header.Get("Authorization"))
		w.Header().Set("X-Query", r.URL.RawQuery)
		io.WriteString(w, r.Method+" "+r.URL.Path+" "+string(b))
	})
	tr := newTransport(t, Options{})
	for i := range 20 {
		o, req := request(t, "POST", srv.URL+"/openai/deployments/d/chat/completions?api-version=1&x=%20y", "hello")
		req.Header.Set("Authorization", "Bearer tok")
		resp := &fasthttp.Response{}
		stream, err := tr.Do(t.Context(), o, req, "", resp)
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		r := result{resp, stream}
		if stream != nil {
			t.Fatal("a small response of known length was streamed")
		}
		if got := r.body(t); got != "POST /openai/deployments/d/chat/completions hello" {
			t.Fatalf("got body %q", got)
		}
		for h, want := range map[string]string{"X-Host": strings.TrimPrefix(srv.URL, "http://"), "X-Len": "5", "X-Auth": "Bearer tok", "X-Query": "api-version=1&x=%20y"} {
			if got := r.header(h); got != want {
				t.Errorf("%s = %q, want %q", h, got, want)
			}
		}
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("20 sequential requests opened %d connections, want 1 (keep-alive)", n)
	}
	want := []PoolStats{{Origin: srv.URL, Opened: 1, Idle: 1}}
	if got := tr.Stats(); !slices.Equal(got, want) {
		t.Errorf("stats %+v, want %+v", got, want)
	}
}

func TestBodylessRequests(t *testing.T) {
	srv, _ := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, r.Method+" len="+r.Header.Get("Content-Length")+" te="+strings.Join(r.TransferEncoding, ","))
	})
	tr := newTransport(t, Options{})
	for _, tt := range []struct{ method, want string }{
		{"GET", "GET len= te="}, {"POST", "POST len=0 te="}, {"DELETE", "DELETE len=0 te="},
	} {
		r, err := do(t, tr, t.Context(), tt.method, srv.URL+"/x", "")
		if err != nil {
			t.Fatal(err)
		}
		if got := r.body(t); got != tt.want {
			t.Errorf("got %q, want %q", got, tt.want)
		}
	}
	// HEAD has no body to wait for, and the connection stays usable.
	r, err := do(t, tr, t.Context(), "HEAD", srv.URL+"/x", "")
	if err != nil || r.stream != nil || len(r.resp.Body()) != 0 {
		t.Fatalf("HEAD: %v", err)
	}
	if r, err = do(t, tr, t.Context(), "GET", srv.URL+"/x", ""); err != nil || r.body(t) != "GET len= te=" {
		t.Errorf("GET after HEAD: %v", err)
	}
}

func TestBufferedAndStreamedBodies(t *testing.T) {
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/small":
			io.WriteString(w, "small")
		case "/large":
			w.Header().Set("Content-Length", "3000")
			io.WriteString(w, strings.Repeat("L", 3000))
		case "/chunked":
			io.WriteString(w, "part one,")
			w.(http.Flusher).Flush()
			io.WriteString(w, "part two")
		case "/sse":
			w.Header().Set("Content-Type", "text/event-stream")
			w.Header().Set("Content-Length", "11")
			io.WriteString(w, "data: x\n\n\n\n")
		}
	})
	tr := newTransport(t, Options{BufferLimit: 1000})
	for _, tt := range []struct {
		path, want string
		streamed   bool
	}{
		{"/small", "small", false},
		{"/large", strings.Repeat("L", 3000), true},
		{"/chunked", "part one,part two", true},
		{"/sse", "data: x\n\n\n\n", true},
		{"/small", "small", false},
	} {
		r, err := do(t, tr, t.Context(), "GET", srv.URL+tt.path, "")
		if err != nil {
			t.Fatal(err)
		}
		if (r.stream != nil) != tt.streamed {
			t.Errorf("%s: streamed = %v, want %v", tt.path, r.stream != nil, tt.streamed)
		}
		if got := r.body(t); got != tt.want {
			t.Errorf("%s: got %q, want %q", tt.path, got, tt.want)
		}
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("got %d connections, want 1: streams read to EOF give their connection back", n)
	}
}

// flakyServer answers each request and then closes the connection without saying so, as a
// server whose idle timeout fired would: the next request on that connection finds it dead.
func flakyServer(t *testing.T) (string, *atomic.Int32) {
	return rawServer(t, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false)
}

// rawServer answers every request with the bytes of answer, on as many requests per connection
// as come if keepAlive, else on one, and counts the connections it accepts.
func rawServer(t *testing.T, answer string, keepAlive bool) (string, *atomic.Int32) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	conns := serveRaw(t, ln, func(c net.Conn) { io.WriteString(c, answer) }, keepAlive)
	return "http://" + ln.Addr().String(), conns
}

// serveRaw answers every request ln's connections bring with answer, on as many requests per
// connection as come if keepAlive, else on one, and counts the connections it accepts.
func serveRaw(t *testing.T, ln net.Listener, answer func(net.Conn), keepAlive bool) *atomic.Int32 {
	var conns atomic.Int32
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			wg.Go(func() {
				defer c.Close()
				br := bufio.NewReader(c)
				for {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					io.Copy(io.Discard, req.Body)
					answer(c)
					if !keepAlive {
						return
					}
				}
			})
		}
	})
	return &conns
}

func TestStaleConnectionIsRetriedOnce(t *testing.T) {
	url, conns := flakyServer(t)
	tr := newTransport(t, Options{})
	for i := range 3 {
		r, err := post(t, tr, t.Context(), url, "body")
		if err != nil {
			t.Fatalf("request %d on a connection the server dropped: %v", i, err)
		}
		if got := r.body(t); got != "ok" {
			t.Fatalf("got %q", got)
		}
	}
	if n := conns.Load(); n != 3 {
		t.Errorf("got %d connections, want 3 (each stale one replaced)", n)
	}
}

func TestResponseHeaderTimeout(t *testing.T) {
	release := make(chan struct{})
	srv, _ := countingServer(t, func(w http.ResponseWriter, r *http.Request) { <-release })
	defer close(release)
	tr := newTransport(t, Options{ResponseHeaderTimeout: 50 * time.Millisecond})
	_, err := post(t, tr, t.Context(), srv.URL, "x")
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() || !errors.As(err, new(TimeoutError)) {
		t.Errorf("got %v, want a timeout error", err)
	}
}

// TestSendTimesFromTheCallersClock: Send judges its pool's idle connections by the time its
// caller read (which spares the transport a reading of its own), and by its own reading when
// none is given. A connection idle for a moment looks idle past the timeout to a call whose time,
// as given, is an hour on, and is replaced.
func TestSendTimesFromTheCallersClock(t *testing.T) {
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	o, err := NewOrigin(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	tr := newTransport(t, Options{IdleTimeout: time.Minute})
	for i, tt := range []struct {
		name  string
		now   time.Time
		conns int32 // dialled so far, after the call
	}{
		{"the first", time.Time{}, 1},
		{"none given", time.Time{}, 1},
		{"just read", time.Now(), 1},
		{"an hour on", time.Now().Add(time.Hour), 2},
		{"just read again", time.Now(), 2},
	} {
		req := &Request{Method: []byte("GET"), Target: []byte("/"), Host: o.Host()}
		resp := &fasthttp.Response{}
		if _, err := tr.Send(t.Context(), tt.now, o, req, "", resp); err != nil || string(resp.Body()) != "ok" {
			t.Fatalf("call %d (%s): got %v, %q; want the answer", i, tt.name, err, resp.Body())
		}
		if n := conns.Load(); n != tt.conns {
			t.Fatalf("call %d (%s): %d connections dialled, want %d", i, tt.name, n, tt.conns)
		}
	}
}

// TestStalledBodyTimesOut: the header timeout bounds a body read whole too, and a connection
// that answered within it is reused, its deadline renewed for the next call.
func TestStalledBodyTimesOut(t *testing.T) {
	release := make(chan struct{})
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "100")
		w.Header().Set("Content-Type", "application/json")
		if r.URL.Path == "/stall" {
			io.WriteString(w, `{"partial":`)
			w.(http.Flusher).Flush()
			<-release
			return
		}
		io.WriteString(w, strings.Repeat(" ", 100))
	})
	defer close(release)
	const timeout = 300 * time.Millisecond
	tr := newTransport(t, Options{ResponseHeaderTimeout: timeout})
	for range 3 { // each call renews the pooled connection's deadline
		r, err := post(t, tr, t.Context(), srv.URL+"/whole", "x")
		if err != nil {
			t.Fatal(err)
		}
		r.body(t)
		<-time.After(timeout / 2) // longer than the calls take together: a stale deadline would fire (the wait is the behaviour under test)
	}
	if n := conns.Load(); n != 1 {
		t.Fatalf("%d connections for calls in a row, want 1", n)
	}
	o, req := request(t, "POST", srv.URL+"/stall", "x")
	got := make(chan error, 1)
	go func() {
		_, err := tr.Do(t.Context(), o, req, "", &fasthttp.Response{})
		got <- err
	}()
	select {
	case err := <-got:
		if !errors.As(err, new(TimeoutError)) {
			t.Fatalf("a body that stalls after its headers: got %v, want a timeout", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a body that stalls after its headers holds the call past the timeout")
	}
}

// TestResponseHeaderDeadlineMoves: a pooled connection's read deadline, which calls move only
// when it would end before theirs, never cuts a call short: not after the connection sat idle
// past it, not when an earlier call's deadline is near, and a stalled answer is waited for the
// whole timeout. (The waits here are the behaviour under test.)
func TestResponseHeaderDeadlineMoves(t *testing.T) {
	const timeout = 200 * time.Millisecond
	release := make(chan struct{})
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/slow": // answers within the timeout, but after an earlier call's deadline
			<-time.After(timeout * 3 / 4)
		case "/stall":
			<-release
		}
		io.WriteString(w, "ok")
	})
	defer close(release)
	tr := newTransport(t, Options{ResponseHeaderTimeout: timeout})
	call := func(path string) error {
		r, err := post(t, tr, t.Context(), srv.URL+path, "x")
		if err == nil {
			r.body(t)
		}
		return err
	}
	if err := call("/"); err != nil {
		t.Fatal(err)
	}
	<-time.After(timeout * 3 / 2) // idle past the deadline the first call set
	if err := call("/"); err != nil {
		t.Fatalf("after the connection sat idle past its deadline: %v", err)
	}
	<-time.After(timeout / 2) // the deadline that call set is now less than a timeout away
	if err := call("/slow"); err != nil {
		t.Fatalf("an answer within the timeout, after the deadline an earlier call set: %v", err)
	}
	if n := conns.Load(); n != 1 {
		t.Fatalf("%d connections for calls in a row, want 1", n)
	}
	start := time.Now()
	if err := call("/stall"); !errors.As(err, new(TimeoutError)) {
		t.Fatalf("a stalled answer: got %v, want a timeout", err)
	}
	if waited := time.Since(start); waited < timeout {
		t.Errorf("a stalled answer timed out after %v, before the timeout (%v)", waited, timeout)
	}
}

// interruptCtx is a cancellable context that is also an InterruptContext, as the gateway's
// calls are.
type interruptCtx struct {
	context.Context
	mu        sync.Mutex
	hooks     map[Interrupter]bool
	cancelled bool
}

func withInterrupt(parent context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(parent)
	x := &interruptCtx{Context: ctx, hooks: map[Interrupter]bool{}}
	return x, func() {
		x.mu.Lock()
		x.cancelled = true
		hooks := x.hooks
		x.hooks = nil
		x.mu.Unlock()
		cancel()
		for i := range hooks {
			i.Interrupt()
		}
	}
}

func (x *interruptCtx) OnCancel(i Interrupter) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.cancelled {
		i.Interrupt()
		return
	}
	x.hooks[i] = true
}

func (x *interruptCtx) OffCancel(i Interrupter) bool {
	x.mu.Lock()
	defer x.mu.Unlock()
	delete(x.hooks, i)
	return !x.cancelled
}

// cancellable names the two kinds of context Do is given: a plain one, interrupted through
// context.AfterFunc, and an InterruptContext.
var cancellable = map[string]func(context.Context) (context.Context, context.CancelFunc){
	"context.WithCancel": context.WithCancel,
	"InterruptContext":   withInterrupt,
}

func TestCancelWhileWaitingForHeaders(t *testing.T) {
	for name, withCancel := range cancellable {
		t.Run(name, func(t *testing.T) { testCancelWhileWaitingForHeaders(t, withCancel) })
	}
}

func testCancelWhileWaitingForHeaders(t *testing.T, withCancel func(context.Context) (context.Context, context.CancelFunc)) {
	release := make(chan struct{})
	arrived := make(chan struct{})
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			close(arrived)
			<-release
		}
	})
	defer close(release)
	tr := newTransport(t, Options{})
	ctx, cancel := withCancel(t.Context())
	go func() { <-arrived; cancel() }()
	_, err := post(t, tr, ctx, srv.URL+"/slow", "x")
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
	// The interrupted connection is not pooled: the next call dials afresh and works.
	r, err := post(t, tr, t.Context(), srv.URL+"/fast", "x")
	if err != nil {
		t.Fatal(err)
	}
	r.body(t)
	if n := conns.Load(); n != 2 {
		t.Errorf("got %d connections, want 2", n)
	}
}

func TestStreamingAndCancelMidBody(t *testing.T) {
	for name, withCancel := range cancellable {
		t.Run(name, func(t *testing.T) { testStreamingAndCancelMidBody(t, withCancel) })
	}
}

func testStreamingAndCancelMidBody(t *testing.T, withCancel func(context.Context) (context.Context, context.CancelFunc)) {
	next := make(chan struct{})
	done := make(chan struct{})
	srv, _ := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		defer close(done)
		w.Header().Set("Content-Type", "text/event-stream")
		for i := 0; ; i++ {
			if _, err := io.WriteString(w, "data: chunk\n\n"); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			select {
			case <-next:
			case <-r.Context().Done():
				return
			}
		}
	})
	const headerTimeout = 50 * time.Millisecond
	tr := newTransport(t, Options{ResponseHeaderTimeout: headerTimeout})
	ctx, cancel := withCancel(t.Context())
	r, err := post(t, tr, ctx, srv.URL, "x")
	if err != nil {
		t.Fatal(err)
	}
	if r.stream == nil {
		t.Fatal("an event stream was not streamed")
	}
	br := bufio.NewReader(r.stream)
	for i := range 3 {
		line, err := br.ReadString('\n')
		if err != nil || line != "data: chunk\n" {
			t.Fatalf("event %d: got %q, %v", i, line, err)
		}
		br.ReadString('\n')
		if i == 1 {
			// The header timeout bounds only the wait for headers: a stream that goes quiet
			// for longer than it lives on. (This wait is the behaviour under test.)
			<-time.After(3 * headerTimeout)
		}
		next <- struct{}{}
	}
	cancel()
	if _, err := io.ReadAll(br); !errors.Is(err, context.Canceled) {
		t.Errorf("reading after cancel got %v, want context.Canceled", err)
	}
	r.stream.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the upstream handler did not see the stream end")
	}
}

func TestCutStreamIsNotAnEnd(t *testing.T) {
	// A chunked stream whose server hangs up between chunks must not read as complete.
	srv, _ := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: one\n\n")
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler) // drop the connection
	})
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	tr := newTransport(t, Options{})
	r, err := post(t, tr, t.Context(), srv.URL, "x")
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(r.stream)
	r.stream.Close()
	if string(b) != "data: one\n\n" || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("got %q, %v; want the first event, then io.ErrUnexpectedEOF", b, err)
	}
}

func TestInformationalResponsesAreSkipped(t *testing.T) {
	srv, _ := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Link", "</style.css>; rel=preload")
		w.WriteHeader(http.StatusEarlyHints)
		w.Header().Del("Link")
		w.WriteHeader(http.StatusCreated)
		io.WriteString(w, "made")
	})
	tr := newTransport(t, Options{})
	r, err := post(t, tr, t.Context(), srv.URL, "x")
	if err != nil {
		t.Fatal(err)
	}
	if body := r.body(t); r.resp.StatusCode() != 201 || body != "made" {
		t.Errorf("got %d %q, want 201 made", r.resp.StatusCode(), body)
	}
}

func TestConnectionCloseIsHonoured(t *testing.T) {
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Connection", "close")
		io.WriteString(w, "bye")
	})
	tr := newTransport(t, Options{})
	for range 3 {
		r, err := post(t, tr, t.Context(), srv.URL, "x")
		if err != nil {
			t.Fatal(err)
		}
		r.body(t)
	}
	if n := conns.Load(); n != 3 {
		t.Errorf("got %d connections, want 3: a closed connection must not be reused", n)
	}
}

func TestUnreadBodyIsNotReused(t *testing.T) {
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, strings.Repeat("x", 100000))
	})
	tr := newTransport(t, Options{})
	for range 2 {
		r, err := post(t, tr, t.Context(), srv.URL, "x")
		if err != nil {
			t.Fatal(err)
		}
		r.stream.Close() // abandoned half-read
	}
	if n := conns.Load(); n != 2 {
		t.Errorf("got %d connections, want 2: a connection with unread data must not be reused", n)
	}
}

func TestTLS(t *testing.T) {
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, r.TLS.NegotiatedProtocol+" "+r.Proto)
	}))
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // the refused handshake below is expected
	srv.StartTLS()
	defer srv.Close()
	pool := x509.NewCertPool()
	pool.AddCert(srv.Certificate())

	tr := newTransport(t, Options{TLSConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}})
	r, err := post(t, tr, t.Context(), srv.URL, "x")
	if err != nil {
		t.Fatal(err)
	}
	if got := r.body(t); got != "http/1.1 HTTP/1.1" {
		t.Errorf("got %q, want HTTP/1.1 negotiated by ALPN", got)
	}

	// Without the CA the certificate is refused: there is no switch to turn verification off.
	untrusting := newTransport(t, Options{})
	if _, err := post(t, untrusting, t.Context(), srv.URL, "x"); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("got %v, want a certificate verification error", err)
	}

	// The CA can instead belong to the origin (an upstream's ca_file).
	o, req := request(t, "POST", srv.URL, "x")
	resp := &fasthttp.Response{}
	if _, err := untrusting.Do(t.Context(), o.WithRoots(pool, "test-ca"), req, "", resp); err != nil {
		t.Errorf("with the origin's own CA: %v", err)
	}
}

func TestTLSSessionsResume(t *testing.T) {
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, r.TLS.DidResume)
	}))
	srv.StartTLS()
	defer srv.Close()
	pool := x509.NewCertPool()
	pool.AddCert(srv.Certificate())
	tr := newTransport(t, Options{TLSConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}})

	// Each call closes its connection, as a stream cut short does, so each one dials.
	call := func(o Origin) string {
		t.Helper()
		_, req := request(t, "POST", srv.URL, "x")
		req.Header.SetConnectionClose()
		resp := &fasthttp.Response{}
		stream, err := tr.Do(t.Context(), o, req, "", resp)
		if err != nil {
			t.Fatal(err)
		}
		return result{resp, stream}.body(t)
	}
	o, _ := request(t, "POST", srv.URL, "")
	if got := call(o); got != "false" {
		t.Fatalf("first connection: resumed = %s, want a full handshake", got)
	}
	for i := range 2 {
		if got := call(o); got != "true" {
			t.Errorf("connection %d after the first: resumed = %s, want the session resumed", i+2, got)
		}
	}
	// The same server under other CAs is another pool: a session verified with one CA set is
	// not offered on behalf of another.
	if got := call(o.WithRoots(pool, "other-ca")); got != "false" {
		t.Errorf("origin with its own CAs: resumed = %s, want a full handshake", got)
	}

	// Stats count them, a pool for each CA set.
	var opened, resumed uint64
	stats := tr.Stats()
	for _, s := range stats {
		if want := "https://" + o.addr; s.Origin != want || !s.TLS || s.Idle != 0 {
			t.Errorf("stats %+v, want origin %s, TLS, no idle connection", s, want)
		}
		opened, resumed = opened+s.Opened, resumed+s.Resumed
	}
	if len(stats) != 2 || opened != 2 || resumed != 2 {
		t.Errorf("%d pools, %d connections opened with a full handshake, %d resumed; want 2, 2 and 2", len(stats), opened, resumed)
	}
}

// acceptAll serves each connection ln accepts, in a goroutine of its own. When the test ends,
// the listener and the connections (with any others handed to keep) are closed, and the
// goroutines waited for.
func acceptAll(t testing.TB, ln net.Listener, serve func(c net.Conn, keep func(net.Conn))) {
	var wg sync.WaitGroup
	var mu sync.Mutex
	var open []net.Conn
	keep := func(c net.Conn) {
		mu.Lock()
		open = append(open, c)
		mu.Unlock()
	}
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range open {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			keep(c)
			wg.Go(func() {
				defer c.Close()
				serve(c, keep)
			})
		}
	})
}

// connectProxy is a minimal HTTP CONNECT proxy that records the Proxy-Authorization it got.
func connectProxy(t *testing.T) (*url.URL, *atomic.Value) {
	t.Helper()
	var auth atomic.Value
	auth.Store("")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	acceptAll(t, ln, func(c net.Conn, keep func(net.Conn)) {
		br := bufio.NewReader(c)
		req, err := http.ReadRequest(br)
		if err != nil || req.Method != http.MethodConnect {
			io.WriteString(c, "HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
			return
		}
		auth.Store(req.Header.Get("Proxy-Authorization"))
		up, err := net.Dial("tcp", req.Host)
		if err != nil {
			io.WriteString(c, "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
			return
		}
		keep(up)
		io.WriteString(c, "HTTP/1.1 200 Connection Established\r\n\r\n")
		go func() { io.Copy(up, br); up.Close() }()
		io.Copy(c, up)
	})
	u := &url.URL{Scheme: "http", Host: ln.Addr().String(), User: url.UserPassword("user", "pass")}
	return u, &auth
}

func TestHTTPSThroughConnectProxy(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "through") }))
	defer srv.Close()
	pool := x509.NewCertPool()
	pool.AddCert(srv.Certificate())
	proxyURL, auth := connectProxy(t)
	tr := newTransport(t, Options{
		TLSConfig: &tls.Config{RootCAs: pool},
		Proxy:     func(*url.URL) (*url.URL, error) { return proxyURL, nil },
	})
	defer tr.Close() // before the servers: the tunnel is an idle pooled connection
	r, err := post(t, tr, t.Context(), srv.URL, "x")
	if err != nil {
		t.Fatal(err)
	}
	if got := r.body(t); got != "through" {
		t.Errorf("got %q", got)
	}
	if got := auth.Load().(string); got != "Basic dXNlcjpwYXNz" {
		t.Errorf("proxy saw Proxy-Authorization %q, want the proxy URL's credentials", got)
	}
}

func TestIdleConnectionsExpire(t *testing.T) {
	var closed atomic.Int32
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateClosed {
			closed.Add(1)
		}
	}
	srv.Start()
	defer srv.Close()
	tr := New(Options{IdleTimeout: time.Minute})
	r, err := post(t, tr, t.Context(), srv.URL, "x")
	if err != nil {
		t.Fatal(err)
	}
	r.body(t)

	tr.closeExpired(time.Now()) // not idle for a minute yet: kept
	if r, err = post(t, tr, t.Context(), srv.URL, "x"); err != nil {
		t.Fatal(err)
	}
	r.body(t)
	tr.closeExpired(time.Now().Add(2 * time.Minute)) // what the reaper does a minute on
	for closed.Load() != 1 {
		runtime.Gosched() // the server notices the close on its own goroutine
	}

	tr.Close()
	if _, err := post(t, tr, t.Context(), srv.URL, "x"); err == nil {
		t.Error("a closed transport still sends requests")
	}
}

func TestConcurrentRequests(t *testing.T) {
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		w.Write(b)
	})
	// With room in the pool for every worker's connection, none is ever closed, and a new one
	// is dialled only when all live ones are busy: at most one connection per worker.
	tr := newTransport(t, Options{MaxIdlePerHost: 32})
	var wg sync.WaitGroup
	for i := range 32 {
		wg.Go(func() {
			for j := range 50 {
				body := strings.Repeat(string(rune('a'+i%26)), 10+j)
				r, err := post(t, tr, t.Context(), srv.URL, body)
				if err != nil {
					t.Error(err)
					return
				}
				if got := r.body(t); got != body {
					t.Errorf("got %q, want %q: responses crossed", got, body)
				}
			}
		})
	}
	wg.Wait()
	if n := conns.Load(); n > 32 {
		t.Errorf("1600 requests from 32 workers opened %d connections", n)
	}
}

func TestIdlePoolIsCapped(t *testing.T) {
	const calls, maxIdle = 4, 2
	arrived := make(chan struct{}, calls)
	release := make(chan struct{})
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		arrived <- struct{}{}
		<-release
		io.WriteString(w, "ok")
	})
	tr := newTransport(t, Options{MaxIdlePerHost: maxIdle})
	var wg sync.WaitGroup
	for range calls {
		wg.Go(func() {
			r, err := post(t, tr, t.Context(), srv.URL, "x")
			if err != nil {
				t.Error(err)
				return
			}
			r.body(t)
		})
	}
	for range calls {
		<-arrived // every call holds its own connection at once
	}
	close(release)
	wg.Wait()
	if n := conns.Load(); n != calls {
		t.Fatalf("%d concurrent calls opened %d connections", calls, n)
	}
	tr.mu.Lock()
	var idle int
	for _, p := range tr.pools {
		p.mu.Lock()
		idle += len(p.idle)
		p.mu.Unlock()
	}
	tr.mu.Unlock()
	if idle != maxIdle {
		t.Errorf("pool keeps %d idle connections, want MaxIdlePerHost=%d", idle, maxIdle)
	}
}

func TestReadBuffersAreBorrowed(t *testing.T) {
	// Connections borrow their 16 KiB read buffer for a call's headers and buffered body only:
	// an idle connection holds none, and a streamed body reads through a 512-byte one.
	release := make(chan struct{})
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/small" {
			io.WriteString(w, "small")
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: 1\n\n")
		w.(http.Flusher).Flush()
		<-release
		io.WriteString(w, "data: 2\n\n")
	})
	tr := newTransport(t, Options{})
	idleReaders := func() (n int) {
		tr.mu.Lock()
		defer tr.mu.Unlock()
		for _, p := range tr.pools {
			p.mu.Lock()
			for _, c := range p.idle {
				if c.br != nil {
					n++
				}
			}
			p.mu.Unlock()
		}
		return n
	}
	r, err := do(t, tr, t.Context(), "GET", srv.URL+"/small", "")
	if err != nil || r.stream != nil || string(r.resp.Body()) != "small" {
		t.Fatalf("got %v %q", err, r.resp.Body())
	}
	if n := idleReaders(); n != 0 {
		t.Errorf("%d idle connections hold a read buffer", n)
	}
	r, err = do(t, tr, t.Context(), "GET", srv.URL+"/sse", "")
	if err != nil || r.stream == nil {
		t.Fatalf("got %v, want a stream", err)
	}
	if r.stream.c.br != nil || r.stream.br.Size() != 512 {
		t.Errorf("a waiting stream holds its connection's buffer (%v) or a %d-byte one, want only 512 bytes", r.stream.c.br != nil, r.stream.br.Size())
	}
	close(release)
	if got := r.body(t); got != "data: 1\n\ndata: 2\n\n" {
		t.Errorf("got %q", got)
	}
	if n := idleReaders(); n != 0 {
		t.Errorf("%d idle connections hold a read buffer", n)
	}
	if _, err := do(t, tr, t.Context(), "GET", srv.URL+"/small", ""); err != nil {
		t.Fatal(err)
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("got %d connections, want 1: the stream's connection is reused", n)
	}
}

func TestBytesAfterAStreamAreNotReused(t *testing.T) {
	// Bytes after a stream's last chunk are not the next response: the connection is closed.
	url, conns := rawServer(t, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"+
		"9\r\ndata: 1\n\n\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n", true)
	tr := newTransport(t, Options{})
	for range 2 {
		r, err := do(t, tr, t.Context(), "GET", url+"/sse", "")
		if err != nil || r.stream == nil {
			t.Fatalf("got %v, want a stream", err)
		}
		if got := r.body(t); got != "data: 1\n\n" {
			t.Errorf("got %q", got)
		}
	}
	if n := conns.Load(); n != 2 {
		t.Errorf("got %d connections, want 2: a connection with bytes after the body must not be reused", n)
	}
}

// TestStreamIdleTimeout: a body relayed as it comes is cut once nothing of it has arrived for
// StreamIdleTimeout, over HTTP/1.1 and over HTTP/2, and not before: gaps shorter than the
// timeout, in a stream that lasts longer than it, go on. A connection so cut is not reused, and
// an HTTP/2 stream so cut is reset. (The upstream's pacing is the behaviour under test.)
func TestStreamIdleTimeout(t *testing.T) {
	const timeout = 200 * time.Millisecond
	const events = 4
	handler := func(ended chan<- struct{}) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/event-stream")
			for i := range events {
				if i > 0 {
					<-time.After(timeout / 2)
				}
				fmt.Fprintf(w, "data: %d\n\n", i)
				w.(http.Flusher).Flush()
			}
			<-r.Context().Done() // stalls until the gateway gives up on it
			ended <- struct{}{}
		}
	}
	read := func(t *testing.T, r result, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		got := make(chan error, 1)
		var body []byte
		go func() {
			var err error
			body, err = io.ReadAll(r.stream)
			got <- err
		}()
		select {
		case err := <-got:
			var ie StreamIdleError
			if !errors.As(err, &ie) || ie.After != timeout || !isTimeout(err) {
				t.Fatalf("a stalled stream ended with %v, want StreamIdleError", err)
			}
			if want := "data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\n"; string(body) != want {
				t.Fatalf("got %q before the cut, want %q", body, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("a stalled stream is not cut")
		}
	}
	t.Run("http1", func(t *testing.T) {
		ended := make(chan struct{}, 1)
		srv, conns := countingServer(t, handler(ended))
		tr := newTransport(t, Options{StreamIdleTimeout: timeout})
		r, err := post(t, tr, t.Context(), srv.URL, "x")
		read(t, r, err)
		srv.CloseClientConnections()
		<-ended
		r, err = post(t, tr, t.Context(), srv.URL, "x")
		read(t, r, err)
		if n := conns.Load(); n != 2 {
			t.Errorf("%d connections, want 2: a connection cut is not reused", n)
		}
	})
	t.Run("a reader away is no silence", func(t *testing.T) {
		// The reader is away (writing to a slow caller, say) for longer than the timeout,
		// while the whole body waits for it: the stream is not cut, and the reader is
		// reported stalled.
		headed, sent := make(chan struct{}), make(chan struct{})
		srv, _ := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/event-stream")
			w.(http.Flusher).Flush()
			<-headed // the event comes after the head, into the socket, not with it
			io.WriteString(w, "data: 0\n\n")
			close(sent)
		})
		tr := newTransport(t, Options{StreamIdleTimeout: timeout})
		r, err := post(t, tr, t.Context(), srv.URL, "x")
		if err != nil {
			t.Fatal(err)
		}
		stalled := make(chan struct{})
		r.stream.OnStalledReader(func() { close(stalled) })
		close(headed)
		<-sent
		<-time.After(2 * timeout) // away past the timeout (the wait is the behaviour under test)
		select {
		case <-stalled:
		case <-time.After(10 * time.Second):
			t.Fatal("a reader away past the timeout is not reported stalled")
		}
		if !r.stream.ReaderStalled() {
			t.Error("ReaderStalled is false once reported")
		}
		if body := r.body(t); body != "data: 0\n\n" {
			t.Fatalf("got %q", body)
		}
	})
	t.Run("a reader stuck after the end is reported", func(t *testing.T) {
		// The body has ended, and the reader, stuck writing its last bytes, has not closed
		// the stream: it is reported stalled all the same.
		srv, _ := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/event-stream")
			io.WriteString(w, "data: 0\n\n")
		})
		tr := newTransport(t, Options{StreamIdleTimeout: timeout})
		r, err := post(t, tr, t.Context(), srv.URL, "x")
		if err != nil {
			t.Fatal(err)
		}
		stalled := make(chan struct{})
		r.stream.OnStalledReader(func() { close(stalled) })
		if b, err := io.ReadAll(r.stream); err != nil || string(b) != "data: 0\n\n" {
			t.Fatalf("got %q, %v", b, err)
		}
		select {
		case <-stalled:
		case <-time.After(10 * time.Second): // a bound, not a wait
			t.Fatal("a reader stuck after the body's end is not reported")
		}
		r.stream.Close()
	})
	t.Run("http2", func(t *testing.T) {
		ended := make(chan struct{}, 1)
		srv, roots, _ := h2Server(t, false, handler(ended))
		tr := newTransport(t, Options{StreamIdleTimeout: timeout})
		r, err := h2Do(t, tr, t.Context(), srv, roots, "POST", "/", "x")
		read(t, r, err)
		select {
		case <-ended: // the stream was reset: the server's handler saw its request end
		case <-time.After(10 * time.Second):
			t.Fatal("the upstream's stream is not reset")
		}
	})
}
