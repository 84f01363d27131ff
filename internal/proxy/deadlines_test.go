package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/valyala/fasthttp"

	"github.com/tokenproxy/tokenproxy/internal/config"
	"github.com/tokenproxy/tokenproxy/internal/emulator"
)

func TestTickFor(t *testing.T) {
	for _, c := range []struct{ readHeader, idle, want time.Duration }{
		{10 * time.Second, 120 * time.Second, time.Second},
		{2 * time.Second, 120 * time.Second, 250 * time.Millisecond},
		{300 * time.Millisecond, time.Minute, 37500 * time.Microsecond},
		{time.Minute, 40 * time.Millisecond, 10 * time.Millisecond},
	} {
		if got := tickFor(c.readHeader, c.idle); got != c.want {
			t.Errorf("tickFor(%v, %v) = %v, want %v", c.readHeader, c.idle, got, c.want)
		}
	}
}

// answeredWithin reads the server's answer on br and checks when it came: not before min, not
// after max.
func answeredWithin(t *testing.T, br *bufio.Reader, start time.Time, min, max time.Duration) (*http.Response, string) {
	t.Helper()
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	if took := time.Since(start); took < min || took > max {
		t.Errorf("answered after %v, want between %v and %v", took, min, max)
	}
	return resp, string(b)
}

// chatOn makes a chat call on the raw connection c (read through br) and returns its answer,
// body read.
func chatOn(t *testing.T, c net.Conn, br *bufio.Reader) *http.Response {
	t.Helper()
	fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: gw\r\nApi-Key: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
		chatPath, keyProd, len(chatBody), chatBody)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("the call on the connection got no answer: %v", err)
	}
	io.Copy(io.Discard, resp.Body)
	return resp
}

// A connection that sends nothing is closed after read_header (without an answer: there is no
// request to answer).
func TestSilentConnectionClosedAfterReadHeader(t *testing.T) {
	const readHeader = 300 * time.Millisecond
	g := newGateway(t, func(c *config.Config) { c.Timeouts.ReadHeader = readHeader })
	start := time.Now()
	c := dial(t, g)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("read %d bytes (%v) from a connection that sent nothing", n, err)
	}
	if took := time.Since(start); took < readHeader/2 || took > 5*time.Second {
		t.Errorf("closed after %v, want about %v", took, readHeader)
	}
}

// Headers that keep coming but never end are cut after read_header, on a new connection and
// on a keep-alive one (where idle, which is longer here, bounds only the wait for the first byte).
func TestTrickledHeadersGet408AfterReadHeader(t *testing.T) {
	const readHeader = 300 * time.Millisecond
	g := newGateway(t, func(c *config.Config) {
		c.Timeouts.ReadHeader = readHeader
		c.Timeouts.Idle = time.Minute
	})
	for _, keepAlive := range []bool{false, true} {
		c := dial(t, g)
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		br := bufio.NewReader(c)
		if keepAlive {
			if resp := chatOn(t, c, br); resp.StatusCode != 200 {
				t.Fatalf("got %d", resp.StatusCode)
			}
		}
		start := time.Now()
		fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: gw\r\nApi-Key: %s\r\n", chatPath, keyProd)
		// Bytes keep coming, but the headers never end: only read_header stops this.
		stop := make(chan struct{})
		go func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				case <-time.After(20 * time.Millisecond):
					if _, err := fmt.Fprintf(c, "X-Trickle-%d: a\r\n", i); err != nil {
						return
					}
				}
			}
		}()
		resp, body := answeredWithin(t, br, start, readHeader/2, 5*time.Second)
		close(stop)
		if resp.StatusCode != http.StatusRequestTimeout {
			t.Errorf("keep-alive %v: got %d %s, want 408", keepAlive, resp.StatusCode, body)
		}
	}
}

// A body that stops coming is cut after timeouts.idle from when the gateway starts reading it
// (after the caller is known), not after read_header.
func TestStalledBodyIsCutAfterIdle(t *testing.T) {
	const idle = 300 * time.Millisecond
	g := newGateway(t, func(c *config.Config) {
		c.Timeouts.ReadHeader = time.Minute
		c.Timeouts.Idle = idle
	})
	c := dial(t, g)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	start := time.Now()
	// More than the 8 KiB the server reads with the headers, less than announced.
	fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: gw\r\nApi-Key: %s\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n%s",
		chatPath, keyProd, strings.Repeat(" ", 9000))
	resp, body := answeredWithin(t, bufio.NewReader(c), start, idle/2, 5*time.Second)
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(body, CodeInvalidBody) {
		t.Errorf("got %d %s, want 400 %s", resp.StatusCode, body, CodeInvalidBody)
	}
	if n := len(g.emu.OpenAI.Requests()); n != 0 {
		t.Errorf("%d requests reached the upstream", n)
	}
}

// The first 8 KiB of a body are read with the headers, before the caller is known: a short body
// that stops coming is cut after read_header (408), not after idle.
func TestStalledShortBodyIsCutAfterReadHeader(t *testing.T) {
	const readHeader = 300 * time.Millisecond
	g := newGateway(t, func(c *config.Config) {
		c.Timeouts.ReadHeader = readHeader
		c.Timeouts.Idle = time.Minute
	})
	c := dial(t, g)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	start := time.Now()
	fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: gw\r\nApi-Key: %s\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"messages\"",
		chatPath, keyProd)
	resp, body := answeredWithin(t, bufio.NewReader(c), start, readHeader/2, 5*time.Second)
	if resp.StatusCode != http.StatusRequestTimeout {
		t.Errorf("got %d %s, want 408", resp.StatusCode, body)
	}
	if n := len(g.emu.OpenAI.Requests()); n != 0 {
		t.Errorf("%d requests reached the upstream", n)
	}
}

// While a call is with the upstream, nothing is read from the caller, so no timeout runs: a
// call longer than idle and read_header leaves its keep-alive connection usable.
func TestCallLongerThanTheTimeoutsKeepsItsConnection(t *testing.T) {
	g := newGateway(t, func(c *config.Config) {
		c.Timeouts.ReadHeader = 150 * time.Millisecond
		c.Timeouts.Idle = 150 * time.Millisecond
	})
	g.emu.OpenAI.SetLatency(600 * time.Millisecond)
	c := dial(t, g)
	c.SetReadDeadline(time.Now().Add(20 * time.Second))
	br := bufio.NewReader(c)
	for i := range 2 {
		if resp := chatOn(t, c, br); resp.StatusCode != 200 || resp.Close {
			t.Fatalf("call %d: %d, closing %v", i+1, resp.StatusCode, resp.Close)
		}
	}
}

// An answer the server writes, which the caller does not take, is cut within idle of the call's
// end: its write fails, the connection is closed, and tokenproxy_answer_timeouts_total counts
// it. Before, a caller that read nothing held the connection, its goroutine and the answer (up
// to 1 MiB) for ever.
func TestAnswerNotTakenIsCutAfterIdle(t *testing.T) {
	const idle, size = 300 * time.Millisecond, 900 << 10 // read whole (up to 1 MiB), then written
	answer := `{"pad":"` + strings.Repeat("x", size-10) + `"}`
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(answer)))
		io.WriteString(w, answer)
	}))
	t.Cleanup(up.Close)
	g := newGateway(t, func(c *config.Config) {
		c.Upstreams["eastca"].URL = up.URL
		c.Timeouts.ReadHeader = time.Minute
		c.Timeouts.Idle = idle
	})
	srv := g.handler.NewServer(g.cfg)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { srv.Serve(smallSendBuffers{ln}); close(done) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		<-done
	})
	c := dialSmallWindow(t, ln.Addr().String())
	fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: gw\r\nApi-Key: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
		chatPath, keyProd, len(chatBody), chatBody)
	// The caller takes nothing until the gateway has given up on it.
	for deadline := time.Now().Add(10 * time.Second); testutil.ToFloat64(g.handler.m.answerCuts) == 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the gateway still writes an answer its caller has taken none of")
		}
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := io.Copy(io.Discard, c)
	if isTimeout(err) {
		t.Fatal("the connection of an answer not taken is still open")
	}
	if n >= size {
		t.Errorf("the caller got %d bytes of an answer cut short", n)
	}
	if got := testutil.ToFloat64(g.handler.m.answerCuts); got != 1 {
		t.Errorf("tokenproxy_answer_timeouts_total = %v, want 1", got)
	}
}

// The server's answers to requests it could not read (400, 408, 431) are bounded the same way:
// a caller that takes none of them does not hold its connection.
func TestErrorAnswerIsBounded(t *testing.T) {
	g := newGateway(t)
	s := g.handler.NewServer(g.cfg)
	server, client := net.Pipe()
	defer client.Close()
	conn := &deadlineConn{Conn: server}
	s.conns.open(conn)
	var fc fasthttp.RequestCtx
	fc.Init2(conn, nil, true)
	s.srv.ErrorHandler(&fc, errors.New("malformed"))
	if fc.Response.StatusCode() != http.StatusBadRequest {
		t.Fatalf("answered %d", fc.Response.StatusCode())
	}
	if u := s.conns.of(conn).until.Load(); u&writing == 0 {
		t.Errorf("the connection does not wait for the caller to take the answer (until %d)", u)
	}
}

// smallSendBuffers gives the connections it accepts a 4 KiB send buffer: an answer its caller
// does not take then fills the kernel's buffers soon, as on a network, where loopback's could
// hold all of it.
type smallSendBuffers struct{ net.Listener }

func (l smallSendBuffers) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetWriteBuffer(4096)
	}
	return c, err
}

func TestIdleKeepAliveClosedAfterIdle(t *testing.T) {
	const idle = 300 * time.Millisecond
	g := newGateway(t, func(c *config.Config) {
		c.Timeouts.ReadHeader = time.Minute
		c.Timeouts.Idle = idle
	})
	c := dial(t, g)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	if resp := chatOn(t, c, br); resp.StatusCode != 200 {
		t.Fatalf("got %d", resp.StatusCode)
	}
	answered := time.Now()
	if n, err := br.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("read %d bytes (%v) from an idle connection", n, err)
	}
	if took := time.Since(answered); took < idle/2 || took > 5*time.Second {
		t.Errorf("closed %v after the answer, want about %v", took, idle)
	}
}

// The server keeps timeouts only for connections it serves: one handed over to a stream is
// forgotten at once (fasthttp reports no close for it), and a closed one when it closes. Once
// a graceful shutdown has waited for everything to end, none is left.
func TestDeadlinesForgetHandedOverAndClosedConnections(t *testing.T) {
	g := newGateway(t)
	srv, addr, done := serveOwn(t, g)
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	for _, body := range []string{`{"stream":true,"messages":[]}`, chatBody} {
		req, _ := http.NewRequest("POST", "http://"+addr+chatPath, strings.NewReader(body))
		req.Header.Set("api-key", keyProd)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("%s: %d", body, resp.StatusCode)
		}
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	if _, err := srv.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	<-done
	// fasthttp counts a connection out before it reports it closed, so Shutdown can return just
	// before the last StateClosed: wait for it, within a bound.
	kept := 0
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		kept = 0
		srv.conns.conns.Range(func(_, _ any) bool { kept++; return true })
		if kept == 0 || time.Now().After(deadline) {
			break
		}
	}
	if kept != 0 {
		t.Errorf("the server still keeps timeouts for %d connections that have ended", kept)
	}
}

// deadlineConn records the deadlines it is given.
type deadlineConn struct {
	net.Conn
	mu              sync.Mutex
	deadline, write time.Time
}

func (c *deadlineConn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.deadline = t
	return nil
}

func (c *deadlineConn) SetWriteDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.write = t
	return nil
}

func (c *deadlineConn) SetDeadline(t time.Time) error {
	c.SetReadDeadline(t)
	return c.SetWriteDeadline(t)
}

// poisoned reports whether c's reads are cut.
func (c *deadlineConn) poisoned() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return !c.deadline.IsZero() && c.deadline.Before(time.Now())
}

// writesCut reports whether c's writes are cut.
func (c *deadlineConn) writesCut() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return !c.write.IsZero() && c.write.Before(time.Now())
}

func TestDeadlinesCut(t *testing.T) {
	d := newDeadlines(time.Minute, time.Minute)
	d.epoch = d.epoch.Add(-time.Hour) // the server was made an hour before it served
	defer d.start()()
	answerCuts := 0
	d.answerCut = func() { answerCuts++ }
	waiting, handled, past := &deadlineConn{}, &deadlineConn{}, &deadlineConn{}
	answering, unanswered := &deadlineConn{}, &deadlineConn{}
	for _, c := range []*deadlineConn{waiting, handled, past, answering, unanswered} {
		d.open(c)
	}
	d.of(handled).done()
	d.of(past).until.Store(2) // its wait for a request ended long ago
	d.of(answering).waitAnswer()
	d.of(unanswered).waitAnswer()
	if u := d.of(unanswered).until.Load(); u&writing == 0 {
		t.Fatalf("an answer's wait is not marked (until %d)", u)
	}
	d.of(unanswered).until.Store(2 | writing) // its caller took nothing, long ago
	d.cut()
	if waiting.poisoned() || answering.poisoned() || answering.writesCut() {
		t.Error("a connection that has just begun to wait timed out")
	}
	if handled.poisoned() {
		t.Error("a connection with no wait timed out")
	}
	if !past.poisoned() {
		t.Error("a connection whose wait is over was not cut")
	}
	if past.writesCut() {
		t.Error("a connection that did not send a request in time can no longer be answered")
	}
	if !unanswered.writesCut() || !unanswered.poisoned() {
		t.Error("a connection whose answer was not taken in time was not cut")
	}
	if answerCuts != 1 {
		t.Errorf("%d answers counted as not taken, want 1", answerCuts)
	}
	for _, c := range []*deadlineConn{past, unanswered} {
		if u := d.of(c).until.Load(); u != 0 {
			t.Errorf("a cut connection still waits (until %d)", u)
		}
	}
	d.of(answering).waitIdle() // the answer is written: the next request is waited for
	if u := d.of(answering).until.Load(); u&writing != 0 {
		t.Errorf("the wait for the next request is marked as an answer's (until %d)", u)
	}
	d.forget(past)
	if d.of(past) != nil {
		t.Error("a forgotten connection is still kept")
	}
}

// Connections from the server's listener carry their waits: found without the map, with the
// connection's own methods kept (TLS state for fasthttp, the socket for the disconnect watch),
// and cut by the clock like any other while they are served, not once forgotten.
func TestServedListenerCarriesWaits(t *testing.T) {
	d := newDeadlines(time.Minute, time.Minute)
	for _, tc := range servedKinds(t) {
		t.Run(tc.name, func(t *testing.T) {
			raw, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			ln := servedListener{Listener: tc.wrap(raw), d: d}
			defer ln.Close()
			dialed := make(chan net.Conn, 1)
			go func() {
				c, err := tc.dial(raw.Addr().String())
				if err != nil {
					t.Error(err)
					close(dialed)
					return
				}
				dialed <- c
			}()
			c, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second)) // bounds the handshake below
			if hs, ok := c.(interface{ Handshake() error }); ok {
				if err := hs.Handshake(); err != nil { // the client's dial waits for it
					t.Fatal(err)
				}
			}
			client := <-dialed
			if client == nil {
				return
			}
			defer client.Close()
			w := d.carried(c)
			if w == nil {
				t.Fatalf("an accepted %T carries no wait", c)
			}
			if w.c != c || w.d != d {
				t.Fatal("the carried wait is not the connection's")
			}
			if tc.name == "tls" {
				if _, ok := c.(interface{ ConnectionState() tls.ConnectionState }); !ok {
					t.Fatal("a TLS connection lost its TLS state")
				}
			}
			if rawConn(c) == nil {
				t.Fatal("the disconnect watch cannot reach the connection's socket")
			}
			d.open(c)
			if d.of(c) != w {
				t.Fatal("of does not return the carried wait")
			}
			if got, _ := d.conns.Load(c); got != w {
				t.Fatal("the clock does not see the connection")
			}
			if newDeadlines(time.Minute, time.Minute).of(c) != nil {
				t.Fatal("another server's deadlines took the connection for theirs")
			}
			w.until.Store(1) // its wait ended long ago
			d.cut()
			if _, err := c.Read(make([]byte, 1)); !isTimeout(err) {
				t.Fatalf("a connection whose wait is over was not cut: read gave %v", err)
			}
			d.forget(c)
			if _, ok := d.conns.Load(c); ok {
				t.Fatal("a forgotten connection is still on the clock")
			}
		})
	}
}

// listenerKind is a kind of connection a listener serves: wrap makes a listener of it from a TCP
// one, and dial connects to that.
type listenerKind struct {
	name string
	wrap func(net.Listener) net.Listener
	dial func(addr string) (net.Conn, error)
}

// servedKinds returns the kinds of connection the server's listener wraps (servedListener):
// plain TCP, and TLS with a certificate of a CA of the test's own.
func servedKinds(t *testing.T) []listenerKind {
	t.Helper()
	ca, err := emulator.NewCA()
	if err != nil {
		t.Fatal(err)
	}
	serverTLS, err := ca.ServerConfig()
	if err != nil {
		t.Fatal(err)
	}
	return []listenerKind{
		{"tcp", func(ln net.Listener) net.Listener { return ln }, func(addr string) (net.Conn, error) { return net.Dial("tcp", addr) }},
		{"tls", func(ln net.Listener) net.Listener { return tls.NewListener(ln, serverTLS) }, func(addr string) (net.Conn, error) {
			return tls.Dial("tcp", addr, &tls.Config{RootCAs: ca.Pool(), ServerName: "127.0.0.1"})
		}},
	}
}
