package proxy

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	rtmetrics "runtime/metrics"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/valyala/fasthttp"

	"github.com/tokenproxy/tokenproxy/internal/config"
	"github.com/tokenproxy/tokenproxy/internal/transport"
)

// rawCall sends req on a connection of its own and returns the response's head and body as
// they came, read until the gateway closed the connection.
func rawCall(t *testing.T, g *gateway, req string) (head, body string) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(g.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second)) // a bound, not a wait: the test fails if it is hit
	if _, err := io.WriteString(conn, req); err != nil {
		t.Fatal(err)
	}
	all, err := io.ReadAll(conn)
	if err != nil {
		t.Fatalf("reading until the gateway closes the connection: %v (got %q)", err, all)
	}
	head, body, ok := strings.Cut(string(all), "\r\n\r\n")
	if !ok {
		t.Fatalf("no response head in %q", all)
	}
	return head, body
}

// logLine returns the access log line of the call with request ID id.
func logLine(t *testing.T, g *gateway, id string) map[string]any {
	t.Helper()
	sc := bufio.NewScanner(strings.NewReader(g.logs.String()))
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil && m["msg"] == "request" && m["request_id"] == id {
			return m
		}
	}
	t.Fatalf("no access log line for request %s", id)
	return nil
}

func streamRequest(proto, id string) string {
	body := `{"stream":true,"messages":[{"role":"user","content":"hi"}]}`
	return "POST " + chatPath + " " + proto + "\r\nHost: gw\r\nApi-Key: " + keyProd +
		"\r\nX-Ms-Client-Request-Id: " + id + "\r\nContent-Type: application/json\r\nContent-Length: " +
		strconv.Itoa(len(body)) + "\r\n\r\n" + body
}

func TestStreamEndsWithItsConnection(t *testing.T) {
	// An event stream is relayed on a connection the server has let go of: the response says
	// Connection: close, ends with the last chunk, and then the connection closes, after the
	// call is logged.
	g := newGateway(t)
	head, body := rawCall(t, g, streamRequest("HTTP/1.1", "stream-http11"))
	for _, want := range []string{"HTTP/1.1 200 OK\r\n", "\r\nTransfer-Encoding: chunked", "\r\nConnection: close", "\r\nContent-Type: text/event-stream"} {
		if !strings.Contains(head+"\r\n", want) {
			t.Errorf("the response head %q lacks %q", head, strings.TrimSpace(want))
		}
	}
	cr := httputil.NewChunkedReader(strings.NewReader(body))
	events, err := io.ReadAll(cr)
	if err != nil {
		t.Fatalf("the body is not well-formed chunks: %v (%q)", err, body)
	}
	if !strings.HasSuffix(body, "0\r\n\r\n") || !strings.HasSuffix(string(events), "data: [DONE]\n\n") {
		t.Errorf("the stream does not end with [DONE] and the last chunk: %q", body)
	}
	line := logLine(t, g, "stream-http11")
	if line["status"] != 200.0 || line["stream"] != true || line["aborted"] != nil || line["bytes_out"] != float64(len(events)) ||
		line["method"] != "POST" || line["apim_request_id"] == nil || line["x_ms_region"] != "Canada East" {
		t.Errorf("access log %v: want POST, status 200, stream, not aborted, bytes_out %d, and Azure's request ID and region", line, len(events))
	}
}

func TestStreamToAnHTTP10Caller(t *testing.T) {
	// HTTP/1.0 has no chunks: the events go out as they are, and the close ends the body. The
	// status line says HTTP/1.1, the gateway's version, as RFC 9110 §6.2 has servers do.
	g := newGateway(t)
	head, body := rawCall(t, g, streamRequest("HTTP/1.0", "stream-http10"))
	if !strings.HasPrefix(head, "HTTP/1.1 200 OK\r\n") || strings.Contains(head, "Transfer-Encoding") || strings.Contains(head, "Content-Length") {
		t.Errorf("response head %q: want 200 with neither chunks nor a length", head)
	}
	if !strings.HasPrefix(body, "data: {") || !strings.HasSuffix(body, "data: [DONE]\n\n") {
		t.Errorf("got body %q, want the events as the upstream sent them", body)
	}
	if line := logLine(t, g, "stream-http10"); line["status"] != 200.0 || line["aborted"] != nil {
		t.Errorf("access log %v: want status 200, not aborted", line)
	}
	// The upstream call is the gateway's own, kept alive: never HTTP/1.0.
	want := "HTTP/1.1"
	if upstreamTLS() { // a stream offers HTTP/2 in both modes
		want = "HTTP/2.0"
	}
	reqs := g.emu.OpenAI.Requests()
	if len(reqs) != 1 || reqs[0].Proto != want {
		for _, r := range reqs {
			t.Errorf("upstream call in %s, want one call in %s", r.Proto, want)
		}
		if len(reqs) == 0 {
			t.Error("no upstream call")
		}
	}
}

func TestStreamAfterPipelinedCall(t *testing.T) {
	// A stream's head and first event may be written by the handler itself, before the
	// connection is handed over: nothing the server has to write may still be waiting then.
	// A call pipelined before the stream is answered first, and a 100 Continue goes before the
	// stream's head.
	g := newGateway(t)
	plain := `{"messages":[{"role":"user","content":"hi"}]}`
	call := "POST " + chatPath + " HTTP/1.1\r\nHost: gw\r\nApi-Key: " + keyProd +
		"\r\nContent-Type: application/json\r\nContent-Length: " + strconv.Itoa(len(plain)) + "\r\n\r\n" + plain
	head, rest := rawCall(t, g, call+streamRequest("HTTP/1.1", "stream-pipelined"))
	if !strings.HasPrefix(head, "HTTP/1.1 200 OK\r\n") || strings.Contains(head, "text/event-stream") {
		t.Fatalf("the first response's head is %q, want the plain call's", head)
	}
	resp, err := http.ReadResponse(bufio.NewReader(strings.NewReader(head+"\r\n\r\n"+rest)), nil)
	if err != nil {
		t.Fatal(err)
	}
	first, err := io.ReadAll(resp.Body)
	if err != nil || !strings.Contains(string(first), `"chat.completion"`) {
		t.Fatalf("the plain call's body %q (%v), want a chat completion", first, err)
	}
	second, err := http.ReadResponse(bufio.NewReader(strings.NewReader(rest[len(first):])), nil)
	if err != nil {
		t.Fatalf("after the plain call's answer: %v (%q)", err, rest[len(first):])
	}
	if second.StatusCode != 200 || !strings.HasPrefix(second.Header.Get("Content-Type"), "text/event-stream") || second.Header.Get("X-Ms-Client-Request-Id") != "stream-pipelined" {
		t.Errorf("the second response: %d %v, want the stream's", second.StatusCode, second.Header)
	}
	if events, err := io.ReadAll(second.Body); err != nil || !strings.HasSuffix(string(events), "data: [DONE]\n\n") {
		t.Errorf("the stream's events %q (%v), want them whole", events, err)
	}

	req := strings.Replace(streamRequest("HTTP/1.1", "stream-continue"), "\r\n\r\n", "\r\nExpect: 100-continue\r\n\r\n", 1)
	head, rest = rawCall(t, g, req)
	if head != "HTTP/1.1 100 Continue" || !strings.HasPrefix(rest, "HTTP/1.1 200 OK\r\n") {
		t.Errorf("got %q then %.40q, want 100 Continue and then the stream's head", head, rest)
	}
}

func TestStreamFirstEventWithTheAnswer(t *testing.T) {
	// The upstream sends its first event with its head, then holds back the rest: the handler
	// writes the head and that event itself (detach), and the relay goes on from the next
	// event. The caller must get the head once, the first event while the upstream holds back,
	// then the rest, all in well-formed chunks.
	release := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: {\"first\":true}\n\n")
		w.(http.Flusher).Flush() // the head and the first event in one write
		<-release
		io.WriteString(w, "data: [DONE]\n\n")
	}))
	defer up.Close()
	var once sync.Once
	free := func() { once.Do(func() { close(release) }) }
	defer free()
	g := newGateway(t, func(c *config.Config) { c.Upstreams["eastca"].URL = up.URL })
	conn, err := net.Dial("tcp", strings.TrimPrefix(g.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second)) // a bound, not a wait: the test fails if it is hit
	if _, err := io.WriteString(conn, streamRequest("HTTP/1.1", "first-with-answer")); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 || len(resp.TransferEncoding) != 1 || resp.TransferEncoding[0] != "chunked" {
		t.Fatalf("got %d, %v; want 200 in chunks", resp.StatusCode, resp.TransferEncoding)
	}
	body := bufio.NewReader(resp.Body)
	first := make([]byte, len("data: {\"first\":true}\n\n"))
	if _, err := io.ReadFull(body, first); err != nil || string(first) != "data: {\"first\":true}\n\n" {
		t.Fatalf("while the upstream holds back: %q (%v), want the first event", first, err)
	}
	free()
	rest, err := io.ReadAll(body)
	if err != nil || string(rest) != "data: [DONE]\n\n" {
		t.Errorf("after the first event: %q (%v), want the last event and the stream's end", rest, err)
	}
	if extra, err := io.ReadAll(br); err != nil || len(extra) > 0 { // the call is logged before the close
		t.Errorf("after the stream's end: %q (%v), want the connection closed", extra, err)
	}
	if line := logLine(t, g, "first-with-answer"); line["status"] != 200.0 || line["aborted"] != nil {
		t.Errorf("access log %v: want status 200, not aborted", line)
	}
}

func TestStreamStatusBeforeTheFirstEvent(t *testing.T) {
	// A reasoning model can think for minutes before its first event: the caller has the status
	// and headers meanwhile.
	release := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(200)
		w.(http.Flusher).Flush()
		<-release
		io.WriteString(w, "data: {\"late\":true}\n\ndata: [DONE]\n\n")
	}))
	defer up.Close()
	defer close(release)
	g := newGateway(t, func(c *config.Config) { c.Upstreams["eastca"].URL = up.URL })
	req, _ := http.NewRequestWithContext(t.Context(), "POST", g.url+chatPath, strings.NewReader(`{"stream":true,"messages":[]}`))
	req.Header.Set("api-key", keyProd)
	got := make(chan *http.Response, 1)
	go func() {
		resp, err := g.client.Do(req)
		if err != nil {
			t.Error(err)
			close(got)
			return
		}
		got <- resp
	}()
	var resp *http.Response
	select {
	case resp = <-got:
	case <-time.After(10 * time.Second):
		t.Fatal("no response headers while the upstream holds back its first event")
	}
	if resp == nil {
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || !resp.Close {
		t.Errorf("got %d, close %v; want 200 and Connection: close", resp.StatusCode, resp.Close)
	}
	release <- struct{}{}
	if events := readEvents(t, resp.Body, 2); len(events) != 2 || events[0] != `{"late":true}` {
		t.Errorf("got events %q", events)
	}
}

func TestStreamCutByTheUpstream(t *testing.T) {
	// The upstream hangs up mid-stream: the caller's response must not end as if complete.
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: {\"n\":1}\n\n")
		w.(http.Flusher).Flush()
		conn, _, err := http.NewResponseController(w).Hijack()
		if err == nil {
			conn.Close()
		}
	}))
	defer up.Close()
	g := newGateway(t, func(c *config.Config) { c.Upstreams["eastca"].URL = up.URL })
	head, body := rawCall(t, g, streamRequest("HTTP/1.1", "stream-cut"))
	if !strings.HasPrefix(head, "HTTP/1.1 200") {
		t.Fatalf("got %q", head)
	}
	events, err := io.ReadAll(httputil.NewChunkedReader(strings.NewReader(body)))
	if err == nil || !strings.Contains(string(events), `{"n":1}`) {
		t.Errorf("got %q, %v; want the first event and then a body cut short (no last chunk)", events, err)
	}
	if line := logLine(t, g, "stream-cut"); line["aborted"] != true || line["error"] == nil {
		t.Errorf("access log %v: want aborted with the upstream's error", line)
	}
}

func TestStreamCutWhenTheUpstreamGoesQuiet(t *testing.T) {
	// The upstream sends an event and then nothing, its connection open: past
	// timeouts.stream_idle the caller's stream is cut, and the cut is logged and counted.
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: {\"n\":1}\n\n")
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	}))
	defer up.Close()
	g := newGateway(t, func(c *config.Config) {
		c.Upstreams["eastca"].URL = up.URL
		c.Timeouts.StreamIdle = 100 * time.Millisecond
	})
	head, body := rawCall(t, g, streamRequest("HTTP/1.1", "stream-quiet"))
	if !strings.HasPrefix(head, "HTTP/1.1 200") {
		t.Fatalf("got %q", head)
	}
	events, err := io.ReadAll(httputil.NewChunkedReader(strings.NewReader(body)))
	if err == nil || !strings.Contains(string(events), `{"n":1}`) {
		t.Errorf("got %q, %v; want the first event and then a body cut short (no last chunk)", events, err)
	}
	if line := logLine(t, g, "stream-quiet"); line["aborted"] != true || !strings.Contains(fmt.Sprint(line["error"]), "timeouts.stream_idle") {
		t.Errorf("access log %v: want aborted, with an error naming timeouts.stream_idle", line)
	}
	want := idleCutsHelp + "tokenproxy_stream_idle_cuts_total{side=\"upstream\",upstream=\"eastca\"} 1\n"
	if err := testutil.GatherAndCompare(g.reg, strings.NewReader(want), "tokenproxy_stream_idle_cuts_total"); err != nil {
		t.Error(err)
	}
}

const idleCutsHelp = "# HELP tokenproxy_stream_idle_cuts_total Streamed answers cut because nothing of them moved for timeouts.stream_idle, by upstream and by the side that stalled: upstream (sent nothing) or caller (took nothing).\n" +
	"# TYPE tokenproxy_stream_idle_cuts_total counter\n"

func TestStreamCutWhenTheCallerTakesNothing(t *testing.T) {
	// The caller asks for a stream and reads none of it, while the upstream sends without end:
	// once the caller's socket is full, past timeouts.stream_idle the stream is cut, and its
	// upstream connection let go; the cut is logged and counted as the caller's.
	g, _ := takeNothing(t, "stream-untaken", "text/event-stream", -1)
	<-g.handler.streams.drained() // the call is logged before its stream is done
	if line := logLine(t, g, "stream-untaken"); line["aborted"] != true || line["error"] != errCallerStalled.Error() {
		t.Errorf("access log %v: want aborted, with %q", line, errCallerStalled)
	}
	want := idleCutsHelp + "tokenproxy_stream_idle_cuts_total{side=\"caller\",upstream=\"eastca\"} 1\n"
	if err := testutil.GatherAndCompare(g.reg, strings.NewReader(want), "tokenproxy_stream_idle_cuts_total"); err != nil {
		t.Error(err)
	}
}

func TestLargeBodyCutWhenTheCallerTakesNothing(t *testing.T) {
	// The same for a large body of known length, which fasthttp's copy writes (not a relay).
	g, conn := takeNothing(t, "body-untaken", "application/json", 32<<20) // more than the sockets on the way hold
	conn.SetReadDeadline(time.Now().Add(30 * time.Second))                // a bound, not a wait
	// Until the gateway closes it, which it does once the call is logged.
	io.Copy(io.Discard, conn)
	if line := logLine(t, g, "body-untaken"); line["aborted"] != true || line["error"] != errCallerStalled.Error() {
		t.Errorf("access log %v: want aborted, with %q", line, errCallerStalled)
	}
}

// takeNothing has a caller with a 4 KiB receive buffer ask for a stream, call id, and read
// none of it, while the upstream sends a body of contentType, size bytes long (a multiple of
// 64 KiB; -1: without end) in 64 KiB writes, through a gateway whose timeouts.stream_idle is
// 200 ms. It returns
// once the upstream has seen the gateway let go of the call, with the caller's connection.
func takeNothing(t *testing.T, id, contentType string, size int) (*gateway, net.Conn) {
	t.Helper()
	letGo := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", contentType)
		if size >= 0 {
			w.Header().Set("Content-Length", strconv.Itoa(size))
		}
		chunk := []byte("data: " + strings.Repeat("x", 64<<10-8) + "\n\n")
		for sent := 0; size < 0 || sent < size; sent += len(chunk) {
			if _, err := w.Write(chunk); err != nil {
				close(letGo) // the gateway let go of the call
				return
			}
		}
	}))
	t.Cleanup(up.Close)
	g := newGateway(t, func(c *config.Config) {
		c.Upstreams["eastca"].URL = up.URL
		c.Timeouts.StreamIdle = 200 * time.Millisecond
	})
	conn := dialSmallWindow(t, strings.TrimPrefix(g.url, "http://"))
	if _, err := io.WriteString(conn, streamRequest("HTTP/1.1", id)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-letGo:
	case <-time.After(30 * time.Second): // a bound, not a wait
		t.Fatalf("%s: the gateway holds on to a call whose caller takes nothing", id)
	}
	return g, conn
}

func TestStreamNeverHandedOver(t *testing.T) {
	// If the server closes a connection instead of handing it over for its stream (it failed
	// first), the stream still ends: the upstream call is closed and the call logged, cut.
	gone, stop := make(chan struct{}), make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: {}\n\n")
		w.(http.Flusher).Flush()
		select {
		case <-r.Context().Done():
			close(gone)
		case <-stop: // the test is over, failed
		}
	}))
	defer up.Close()
	defer close(stop)
	g := newGateway(t)
	origin, err := transport.NewOrigin(up.URL)
	if err != nil {
		t.Fatal(err)
	}
	tr := transport.New(transport.Options{})
	defer tr.Close()
	req, resp := newUpstreamCall(up.URL)
	s, err := tr.Do(t.Context(), origin, req, "", resp)
	if err != nil || s == nil {
		t.Fatalf("got stream %v, %v", s, err)
	}
	c := &call{id: "never-handed-over", status: 200, streaming: true}
	g.handler.m.inflight.Inc() // as ServeFastHTTP does; finish takes it back
	set := g.handler.streams
	server, client := net.Pipe()
	defer client.Close()
	fasthttp.ReleaseResponse(resp)
	set.expect(server, &relay{h: g.handler, c: c, s: s})
	set.closed(server)
	select {
	case <-set.drained():
	default:
		t.Error("a stream that was never handed over is still counted")
	}
	if _, _, ok := set.start(server, server); ok {
		t.Error("a stream ended at its connection's close could still start")
	}
	if line := logLine(t, g, "never-handed-over"); line["aborted"] != true {
		t.Errorf("access log %v: want aborted", line)
	}
	select {
	case <-gone:
	case <-time.After(10 * time.Second):
		t.Error("the upstream connection was not closed")
	}
}

// The server writes a large body of known length through streamBody and flushes the last of it
// once it has closed it, which ends the stream's idle watch: from there the caller's connection
// has idle to take the rest (connWait.waitAnswer), as for an answer read whole.
func TestLargeBodysLastFlushIsBounded(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, `{"done":true}`)
	}))
	defer up.Close()
	g := newGateway(t)
	origin, err := transport.NewOrigin(up.URL)
	if err != nil {
		t.Fatal(err)
	}
	tr := transport.New(transport.Options{BufferLimit: 1}) // every body a stream
	defer tr.Close()
	req, resp := newUpstreamCall(up.URL)
	defer fasthttp.ReleaseResponse(resp)
	s, err := tr.Do(t.Context(), origin, req, "", resp)
	if err != nil || s == nil {
		t.Fatalf("got stream %v, %v", s, err)
	}
	d := newDeadlines(time.Minute, time.Minute)
	conn := &deadlineConn{}
	d.open(conn)
	d.of(conn).done() // the call is with the upstream
	c := &call{id: "last-flush", status: 200, streaming: true, wait: d.of(conn)}
	g.handler.m.inflight.Inc() // as ServeFastHTTP does; finish takes it back
	b := &streamBody{h: g.handler, c: c, s: s}
	if _, err := io.Copy(io.Discard, b); err != nil {
		t.Fatal(err)
	}
	b.CloseWithError(nil)
	if u := d.of(conn).until.Load(); u&writing == 0 {
		t.Errorf("the connection does not wait for the caller to take the rest (until %d)", u)
	}
	if line := logLine(t, g, "last-flush"); line["aborted"] == true {
		t.Errorf("access log %v: a whole body is logged cut", line)
	}
}

func newUpstreamCall(url string) (*fasthttp.Request, *fasthttp.Response) {
	req := fasthttp.AcquireRequest()
	req.SetRequestURI(url + "/stream")
	req.Header.SetMethod("POST")
	return req, fasthttp.AcquireResponse()
}

// otherConn is a connection of a kind the server's listener does not wrap.
type otherConn struct{ net.Conn }

type otherListener struct{ net.Listener }

func (l otherListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return otherConn{c}, nil
}

func TestRelayedStreamGivesBackTheReadBuffer(t *testing.T) {
	// The server takes back a relayed stream's 32 KiB read buffer (a hijacked connection's,
	// which it keeps only until the hijack handler returns), rather than leave one to the
	// garbage collector per stream; the stream goes on, on a connection the server no longer
	// closes. Over TCP and TLS, and on a connection the listener does not wrap, which is
	// relayed before the hijack handler returns.
	if raceEnabled {
		t.Skip("the race detector's pools drop what is put in them at random")
	}
	other := listenerKind{"other", func(ln net.Listener) net.Listener { return otherListener{ln} }, func(addr string) (net.Conn, error) { return net.Dial("tcp", addr) }}
	for _, tc := range append(servedKinds(t), other) {
		t.Run(tc.name, func(t *testing.T) {
			g := newGateway(t)
			srv := g.handler.NewServer(g.cfg)
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			done := make(chan struct{})
			go func() { srv.Serve(tc.wrap(ln)); close(done) }()
			t.Cleanup(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				srv.Shutdown(ctx)
				<-done
			})
			stream := func(id string) {
				conn, err := tc.dial(ln.Addr().String())
				if err != nil {
					t.Fatal(err)
				}
				defer conn.Close()
				conn.SetDeadline(time.Now().Add(30 * time.Second)) // a bound, not a wait
				if _, err := io.WriteString(conn, streamRequest("HTTP/1.1", id)); err != nil {
					t.Fatal(err)
				}
				all, err := io.ReadAll(conn)
				if err != nil || !strings.HasPrefix(string(all), "HTTP/1.1 200 OK\r\n") || !strings.HasSuffix(string(all), "data: [DONE]\n\n\r\n0\r\n\r\n") {
					t.Fatalf("stream %s: got %q, %v; want the whole stream, then the close", id, all, err)
				}
			}
			for i := range 8 { // the pools fill
				stream("warm-" + strconv.Itoa(i))
			}
			const n = 64
			before := largeAllocations()
			for i := range n {
				stream("s-" + strconv.Itoa(i))
			}
			// A collection empties the server's pool of read buffers: a few are made again.
			if got := largeAllocations() - before; got > n/4 {
				t.Errorf("%d streams made %d allocations of 32 KiB or more: the server does not take back their read buffers", n, got)
			}
		})
	}
}

// largeAllocations counts the process's heap allocations of 32 KiB or more so far.
func largeAllocations() uint64 {
	s := []rtmetrics.Sample{{Name: "/gc/heap/allocs-by-size:bytes"}}
	rtmetrics.Read(s)
	h := s[0].Value.Float64Histogram()
	var n uint64
	for i, c := range h.Counts {
		if h.Buckets[i] >= 32<<10 {
			n += c
		}
	}
	return n
}

// A panic on the way to handing an event stream over, here after its first event has gone out
// with the head, is recovered: logged, the caller's answer cut, and the gateway goes on
// serving. fasthttp recovers nothing, so before, it ended the process.
func TestPanicBeforeAStreamIsHandedOver(t *testing.T) {
	g := newGateway(t)
	streamSeam = func() { panic("stream seam") }
	defer func() { streamSeam = nil }()
	req, _ := http.NewRequestWithContext(t.Context(), "POST", g.url+chatPath, strings.NewReader(`{"stream":true,"messages":[{"role":"user","content":"hi"}]}`))
	req.Header.Set("api-key", keyProd)
	if resp, err := g.client.Do(req); err == nil {
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err == nil && strings.Contains(string(b), "[DONE]") {
			t.Errorf("got %d and the whole stream, want it cut: %s", resp.StatusCode, b)
		}
	}
	streamSeam = nil
	if !strings.Contains(g.logs.String(), `"msg":"panic serving request"`) || !strings.Contains(g.logs.String(), "stream seam") {
		t.Errorf("the panic is not logged:\n%s", g.logs.String())
	}
	if resp, body := chat(g); resp.StatusCode != 200 {
		t.Errorf("the next call got %d %s, want 200", resp.StatusCode, body)
	}
}

// A panic while fasthttp reads a streamed body, in its own goroutine, which recovers nothing,
// is recovered: logged, and the body cut with an error.
func TestPanicReadingAStreamedBodyIsRecovered(t *testing.T) {
	g := newGateway(t)
	streamSeam = func() { panic("read seam") }
	defer func() { streamSeam = nil }()
	b := &streamBody{h: g.handler, c: &call{id: "a-request-id"}}
	if n, err := b.Read(make([]byte, 16)); n != 0 || !errors.Is(err, errInternal) {
		t.Errorf("Read() = %d, %v; want 0 and errInternal", n, err)
	}
	if logs := g.logs.String(); !strings.Contains(logs, `"msg":"panic serving request"`) || !strings.Contains(logs, "read seam") || !strings.Contains(logs, "a-request-id") {
		t.Errorf("the panic is not logged:\n%s", logs)
	}
}
