package transport

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

// h2Server is a TLS server that offers HTTP/2 (unless h1only), counting its connections.
func h2Server(t *testing.T, h1only bool, h http.HandlerFunc) (*httptest.Server, *x509.CertPool, *atomic.Int32) {
	t.Helper()
	var conns atomic.Int32
	srv := httptest.NewUnstartedServer(h)
	srv.EnableHTTP2 = !h1only
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	pool := x509.NewCertPool()
	pool.AddCert(srv.Certificate())
	return srv, pool, &conns
}

// h2Do sends a call to srv's origin with HTTP/2 offered.
func h2Do(t *testing.T, tr *Transport, ctx context.Context, srv *httptest.Server, roots *x509.CertPool, method, path, body string) (result, error) {
	t.Helper()
	o, req := request(t, method, srv.URL+path, body)
	req.Header.Set("Authorization", "Bearer token")
	req.Header.Set("Connection", "keep-alive")
	req.Header.Set("Keep-Alive", "timeout=5")
	req.Header.Set("TE", "gzip") // HTTP/2 refuses any TE but "trailers": it must not be sent
	resp := &fasthttp.Response{}
	stream, err := tr.Do(ctx, o.WithRoots(roots, "test").WithHTTP2(), req, "", resp)
	return result{resp, stream}, err
}

func TestHTTP2CallsShareAConnection(t *testing.T) {
	srv, roots, conns := h2Server(t, false, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		w.Header().Add("X-Multi", "a")
		w.Header().Add("X-Multi", "b")
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, "%s %s %s?%s auth=%q conn=%q ka=%q te=%q ua=%q body=%s",
			r.Proto, r.Method, r.URL.Path, r.URL.RawQuery, r.Header.Get("Authorization"),
			r.Header.Get("Connection"), r.Header.Get("Keep-Alive"), r.Header.Get("Te"), r.Header.Values("User-Agent"), b)
	})
	tr := newTransport(t, Options{Spares: 2}) // not dialled: one HTTP/2 connection does
	want := `HTTP/2.0 POST /openai/x?api-version=1&a=%2F auth="Bearer token" conn="" ka="" te="" ua=[] body={"n":1}`

	r, err := h2Do(t, tr, t.Context(), srv, roots, "POST", "/openai/x?api-version=1&a=%2F", `{"n":1}`)
	if err != nil {
		t.Fatal(err)
	}
	if r.stream != nil {
		t.Fatal("a small body of known length was streamed, not read whole")
	}
	if got := r.body(t); got != want {
		t.Errorf("upstream saw %s\nwant %s", got, want)
	}
	if r.resp.StatusCode() != http.StatusCreated || r.header("Content-Type") != "application/json" ||
		r.resp.Header.ContentLength() != len(want) {
		t.Errorf("response: %d %q %d", r.resp.StatusCode(), r.header("Content-Type"), r.resp.Header.ContentLength())
	}
	var multi []string
	for _, v := range r.resp.Header.PeekAll("X-Multi") {
		multi = append(multi, string(v))
	}
	if strings.Join(multi, ",") != "a,b" {
		t.Errorf("X-Multi = %q, want both values", multi)
	}

	var wg sync.WaitGroup
	for range 20 {
		wg.Go(func() {
			r, err := h2Do(t, tr, t.Context(), srv, roots, "POST", "/openai/x?api-version=1&a=%2F", `{"n":1}`)
			if err != nil {
				t.Error(err)
				return
			}
			if got := r.body(t); got != want {
				t.Errorf("upstream saw %s", got)
			}
		})
	}
	wg.Wait()
	if n := conns.Load(); n != 1 {
		t.Errorf("%d connections, want the 21 calls on one", n)
	}
	st := tr.Stats()
	if len(st) != 1 || st[0].HTTP2 != 1 || st[0].Opened != 1 || st[0].Idle != 0 {
		t.Errorf("stats %+v, want one HTTP/2 connection opened", st)
	}
}

func TestHTTP2OnlyWhereOfferedAndChosen(t *testing.T) {
	h := func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, r.Proto) }
	tr := newTransport(t, Options{})

	// The server does not choose h2: the call goes over HTTP/1.1.
	h1, h1roots, _ := h2Server(t, true, h)
	r, err := h2Do(t, tr, t.Context(), h1, h1roots, "GET", "/", "")
	if err != nil {
		t.Fatal(err)
	}
	if got := r.body(t); got != "HTTP/1.1" {
		t.Errorf("got %s from a server without HTTP/2", got)
	}

	// HTTP/2 is not offered to an origin that did not ask for it.
	h2, roots, _ := h2Server(t, false, h)
	o, req := request(t, "GET", h2.URL, "")
	resp := &fasthttp.Response{}
	if _, err := tr.Do(t.Context(), o.WithRoots(roots, "test"), req, "", resp); err != nil {
		t.Fatal(err)
	}
	if got := string(resp.Body()); got != "HTTP/1.1" {
		t.Errorf("got %s without WithHTTP2", got)
	}
	if o.WithHTTP2() == o {
		t.Error("WithHTTP2 did not change an https origin")
	}
	plain, _ := NewOrigin("http://127.0.0.1:1")
	if plain.WithHTTP2() != plain {
		t.Error("WithHTTP2 changed a plain-http origin, where nothing negotiates it")
	}
}

// readEvent reads one server-sent event (up to its blank line).
func readEvent(t *testing.T, br *bufio.Reader) string {
	t.Helper()
	var ev strings.Builder
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("reading an event: %v (so far %q)", err, ev.String())
		}
		if line == "\n" {
			return ev.String()
		}
		ev.WriteString(line)
	}
}

func TestHTTP2Streams(t *testing.T) {
	const n = 30
	release := make(chan struct{})
	gone := make(chan struct{}, n)
	srv, roots, conns := h2Server(t, false, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: first\n\n")
		w.(http.Flusher).Flush()
		select {
		case <-r.Context().Done():
			gone <- struct{}{}
		case <-release:
			io.WriteString(w, "data: last\n\n")
		}
	})
	tr := newTransport(t, Options{})

	type open struct {
		s  *Stream
		br *bufio.Reader
	}
	var streams []open
	for range n {
		r, err := h2Do(t, tr, t.Context(), srv, roots, "POST", "/chat", `{"stream":true}`)
		if err != nil {
			t.Fatal(err)
		}
		if r.stream == nil || r.resp.Header.ContentLength() != -1 {
			t.Fatalf("an event stream was not streamed (length %d)", r.resp.Header.ContentLength())
		}
		// Buffered counts the data come and not yet read: once a byte of the first event has
		// been read, the rest of it, and nothing once it has all been read.
		var b [1]byte
		if _, err := io.ReadFull(r.stream, b[:]); err != nil {
			t.Fatal(err)
		}
		if got, want := r.stream.Buffered(), len("data: first\n\n")-1; got != want {
			t.Errorf("Buffered is %d with the first event but a byte unread, want %d", got, want)
		}
		br := bufio.NewReader(io.MultiReader(bytes.NewReader(b[:]), r.stream))
		if ev := readEvent(t, br); ev != "data: first\n" {
			t.Fatalf("first event %q", ev)
		}
		if r.stream.Buffered() != 0 {
			t.Error("Buffered is not 0 with the first event read")
		}
		streams = append(streams, open{r.stream, br})
	}
	if c := conns.Load(); c != 1 {
		t.Errorf("%d connections for %d open streams, want one", c, n)
	}

	// Closing a stream early resets it alone: the server sees it go, the others go on.
	for _, o := range streams[:n/2] {
		o.s.Close()
	}
	for i := range n / 2 {
		select {
		case <-gone:
		case <-time.After(5 * time.Second):
			t.Fatalf("the server saw %d streams go, want %d", i, n/2)
		}
	}
	if len(gone) != 0 {
		t.Errorf("the server saw more than the %d streams closed go", n/2)
	}
	close(release)
	for _, o := range streams[n/2:] {
		if ev := readEvent(t, o.br); ev != "data: last\n" {
			t.Errorf("last event %q", ev)
		}
		if _, err := o.br.ReadByte(); err != io.EOF {
			t.Errorf("after the last event: %v, want EOF", err)
		}
	}
	if len(gone) != 0 {
		t.Errorf("the server saw more than the %d streams closed go", n/2)
	}
	if _, err := h2Do(t, tr, t.Context(), srv, roots, "POST", "/chat", `{}`); err != nil {
		t.Fatal(err)
	}
	if c := conns.Load(); c != 1 {
		t.Errorf("%d connections after streams cut short, want the same one", c)
	}
}

func TestHTTP2Cancel(t *testing.T) {
	reached := make(chan struct{}, 1)
	srv, roots, conns := h2Server(t, false, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/stream" {
			w.Header().Set("Content-Type", "text/event-stream")
			io.WriteString(w, "data: first\n\n")
			w.(http.Flusher).Flush()
		}
		reached <- struct{}{}
		<-r.Context().Done()
	})
	tr := newTransport(t, Options{})

	// While waiting for the response's headers.
	ctx, cancel := context.WithCancel(t.Context())
	go func() { <-reached; cancel() }()
	if _, err := h2Do(t, tr, ctx, srv, roots, "POST", "/wait", "x"); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled while waiting: %v, want context.Canceled", err)
	}

	// While reading a stream.
	ctx, cancel = context.WithCancel(t.Context())
	r, err := h2Do(t, tr, ctx, srv, roots, "POST", "/stream", "x")
	if err != nil {
		t.Fatal(err)
	}
	<-reached
	br := bufio.NewReader(r.stream)
	readEvent(t, br)
	cancel()
	if _, err := io.ReadAll(br); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled mid-stream: %v, want context.Canceled", err)
	}
	r.stream.Close()
	if c := conns.Load(); c != 1 {
		t.Errorf("%d connections, want cancelled calls to leave theirs open", c)
	}
}

func TestHTTP2ResponseHeaderTimeout(t *testing.T) {
	srv, roots, _ := h2Server(t, false, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/stalled-body" {
			w.Header().Set("Content-Length", "10")
			io.WriteString(w, "12345")
			w.(http.Flusher).Flush()
		}
		<-r.Context().Done()
	})
	tr := newTransport(t, Options{ResponseHeaderTimeout: 50 * time.Millisecond})
	for _, path := range []string{"/no-headers", "/stalled-body"} {
		_, err := h2Do(t, tr, t.Context(), srv, roots, "POST", path, "x")
		var te TimeoutError
		if !errors.As(err, &te) {
			t.Errorf("%s: %v, want TimeoutError", path, err)
		}
	}
}

// A server may answer before it has read the whole request body. What HTTP/2 has yet to send of
// it must not come from the request's buffer, which is its owner's again once Do returns.
func TestHTTP2RequestBodyOutlivesDo(t *testing.T) {
	body := bytes.Repeat([]byte("0123456789abcdef"), 256<<10) // 4 MiB: more than the server's window
	want := sha256.Sum256(body)
	readNow := make(chan struct{})
	srv, roots, _ := h2Server(t, false, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		<-readNow
		b, err := io.ReadAll(r.Body)
		fmt.Fprintf(w, "%x %v", sha256.Sum256(b), err)
	})
	tr := newTransport(t, Options{})
	o, req := request(t, "POST", srv.URL+"/upload", "")
	req.SetBody(body)
	resp := &fasthttp.Response{}
	s, err := tr.Do(t.Context(), o.WithRoots(roots, "test").WithHTTP2(), req, "", resp)
	if err != nil {
		t.Fatal(err)
	}
	clear(req.Body()) // the buffer goes on to other uses
	close(readNow)
	got, err := io.ReadAll(s)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != fmt.Sprintf("%x <nil>", want) {
		t.Errorf("the server received a different body: %s", got)
	}
}

func TestHTTP2ConnectionsAreReplacedAndClosed(t *testing.T) {
	srv, roots, conns := h2Server(t, false, func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, r.Proto)
	})
	tr := New(Options{})
	defer tr.Close()
	call := func() {
		t.Helper()
		if r, err := h2Do(t, tr, t.Context(), srv, roots, "GET", "/", ""); err != nil {
			t.Fatal(err)
		} else if got := r.body(t); got != "HTTP/2.0" {
			t.Fatalf("got %s", got)
		}
	}
	call()
	srv.CloseClientConnections()
	// Wait (bounded) for the client to see its connection go, as a server restart does.
	for deadline := time.Now().Add(5 * time.Second); tr.Stats()[0].HTTP2 != 0; {
		if time.Now().After(deadline) {
			t.Fatal("the closed connection is still counted")
		}
		time.Sleep(time.Millisecond)
	}
	call()
	if c := conns.Load(); c != 2 {
		t.Errorf("%d connections, want a new one after the first closed", c)
	}

	tr.Close()
	if n := tr.Stats()[0].HTTP2; n != 0 {
		t.Errorf("%d HTTP/2 connections after Close", n)
	}
	o, req := request(t, "GET", srv.URL, "")
	if _, err := tr.Do(t.Context(), o.WithRoots(roots, "test").WithHTTP2(), req, "", &fasthttp.Response{}); err == nil {
		t.Error("a closed transport took a call")
	}
}

// BenchmarkTLSCall is one call with a 1 KB answer over TLS, on a kept-alive HTTP/1.1
// connection or a shared HTTP/2 one. Allocations include the test server's own.
func BenchmarkTLSCall(b *testing.B) {
	answer := strings.Repeat("x", 1024)
	for _, h2 := range []bool{false, true} {
		b.Run(map[bool]string{false: "HTTP1", true: "HTTP2"}[h2], func(b *testing.B) {
			srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				io.Copy(io.Discard, r.Body)
				w.Header().Set("Content-Type", "application/json")
				io.WriteString(w, answer)
			}))
			srv.EnableHTTP2 = true
			srv.StartTLS()
			defer srv.Close()
			roots := x509.NewCertPool()
			roots.AddCert(srv.Certificate())
			tr := New(Options{})
			defer tr.Close()
			o, req := request(b, "POST", srv.URL+"/openai/deployments/d/chat/completions?api-version=1", `{"messages":[]}`)
			req.Header.Set("Authorization", "Bearer "+strings.Repeat("t", 1100))
			o = o.WithRoots(roots, "bench")
			if h2 {
				o = o.WithHTTP2()
			}
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				req := cloneRequest(req)
				resp := &fasthttp.Response{}
				for pb.Next() {
					resp.Reset()
					if _, err := tr.Do(context.Background(), o, req, "", resp); err != nil || len(resp.Body()) != len(answer) {
						b.Fatal(err, len(resp.Body()))
					}
				}
			})
		})
	}
}

func cloneRequest(r *fasthttp.Request) *fasthttp.Request {
	c := &fasthttp.Request{}
	r.CopyTo(c)
	return c
}

// A call that reaches for an HTTP/2 connection after the transport is closed gets an error; it
// does not dial, nor dial again each time Close lets go of what it dialled.
func TestHTTP2ClosedTransportDialsNoMore(t *testing.T) {
	srv, roots, conns := h2Server(t, false, func(w http.ResponseWriter, r *http.Request) {})
	tr := New(Options{})
	o, _ := request(t, "GET", srv.URL, "")
	p, err := tr.pool(o.WithRoots(roots, "test").WithHTTP2())
	if err != nil {
		t.Fatal(err)
	}
	tr.Close()
	if _, err := p.h2Conn(t.Context()); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Errorf("got %v, want the transport closed", err)
	}
	if c := conns.Load(); c != 0 {
		t.Errorf("%d connections dialled after Close", c)
	}
}

// Calls that start together before the first connection is up share it when the server
// chooses HTTP/2, and each get one of their own when it chooses HTTP/1.1.
func TestHTTP2FirstCallsTogether(t *testing.T) {
	for _, h1only := range []bool{false, true} {
		release := make(chan struct{})
		var arrived sync.WaitGroup
		arrived.Add(20)
		srv, roots, conns := h2Server(t, h1only, func(w http.ResponseWriter, r *http.Request) {
			arrived.Done()
			<-release // every call is in flight at once
			io.WriteString(w, r.Proto)
		})
		tr := newTransport(t, Options{})
		var wg sync.WaitGroup
		protos := make(chan string, 20)
		for range 20 {
			wg.Go(func() {
				r, err := h2Do(t, tr, t.Context(), srv, roots, "POST", "/", "x")
				if err != nil {
					t.Error(err)
					return
				}
				protos <- r.body(t)
			})
		}
		arrived.Wait()
		close(release)
		wg.Wait()
		close(protos)
		want, wantConns := "HTTP/2.0", int32(1)
		if h1only {
			want, wantConns = "HTTP/1.1", 20
		}
		for p := range protos {
			if p != want {
				t.Errorf("h1only=%v: got %s, want %s", h1only, p, want)
			}
		}
		if c := conns.Load(); c != wantConns {
			t.Errorf("h1only=%v: %d connections for 20 calls at once, want %d", h1only, c, wantConns)
		}
	}
}

// A server going away gracefully (HTTP/2 GOAWAY, as a front end being drained sends) lets the
// calls in flight on the connection finish.
func TestHTTP2GoAwayLetsCallsFinish(t *testing.T) {
	release := make(chan struct{})
	srv, roots, _ := h2Server(t, false, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: first\n\n")
		w.(http.Flusher).Flush()
		<-release
		io.WriteString(w, "data: last\n\n")
	})
	tr := newTransport(t, Options{})
	r, err := h2Do(t, tr, t.Context(), srv, roots, "POST", "/chat", "x")
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(r.stream)
	readEvent(t, br)
	down := make(chan error, 1)
	go func() { down <- srv.Config.Shutdown(t.Context()) }() // sends GOAWAY, waits for the call
	// Wait (bounded) for the client to have the GOAWAY: its connection then takes no new call.
	o, _ := request(t, "GET", srv.URL, "")
	p, _ := tr.pool(o.WithRoots(roots, "test").WithHTTP2())
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		p.h2.mu.Lock()
		cc := p.h2.conns[0]
		p.h2.mu.Unlock()
		if !cc.reserve() {
			break
		}
		cc.release()
		if time.Now().After(deadline) {
			t.Fatal("the connection still takes calls after GOAWAY")
		}
	}
	close(release)
	if ev := readEvent(t, br); ev != "data: last\n" {
		t.Errorf("last event %q", ev)
	}
	if _, err := br.ReadByte(); err != io.EOF {
		t.Errorf("after the last event: %v, want EOF", err)
	}
	if err := <-down; err != nil {
		t.Errorf("shutdown: %v", err)
	}
}

func TestCancelledCallIsNotSent(t *testing.T) {
	// A call whose context has ended before Do (the caller hung up while the gateway waited for
	// a token, say) is not sent, over either protocol.
	for _, h1only := range []bool{true, false} {
		var calls atomic.Int32
		srv, roots, _ := h2Server(t, h1only, func(w http.ResponseWriter, r *http.Request) {
			calls.Add(1)
			io.WriteString(w, "ok")
		})
		tr := newTransport(t, Options{})
		if _, err := h2Do(t, tr, t.Context(), srv, roots, "POST", "/warm", "x"); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		for range 20 {
			if _, err := h2Do(t, tr, ctx, srv, roots, "POST", "/gone", "x"); !errors.Is(err, context.Canceled) {
				t.Errorf("h1only=%v: %v, want context.Canceled", h1only, err)
			}
		}
		// Calls on one connection are served in order over HTTP/1.1; over HTTP/2 the server
		// starts a call's handler as its headers arrive, so the cancelled ones, had they been
		// sent, would be counted by the time the last call is answered.
		if r, err := h2Do(t, tr, t.Context(), srv, roots, "POST", "/last", "x"); err != nil || r.body(t) != "ok" {
			t.Fatal(err)
		}
		if n := calls.Load(); n != 2 {
			t.Errorf("h1only=%v: the server got %d calls, want 2 (none of the cancelled ones)", h1only, n)
		}
	}
}
