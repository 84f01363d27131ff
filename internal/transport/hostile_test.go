package transport

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
	"golang.org/x/net/http2"
)

// An upstream that takes a request's head and stops reading its body holds the call no longer
// than the response-header timeout: the write is bounded too.
func TestRequestWriteIsBounded(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hold := make(chan struct{})
	acceptAll(t, ln, func(c net.Conn, _ func(net.Conn)) {
		io.Copy(io.Discard, io.LimitReader(c, 512)) // the head; the body is never read
		<-hold
	})
	t.Cleanup(func() { close(hold) }) // before acceptAll's cleanup, which waits for the handler
	tr := newTransport(t, Options{ResponseHeaderTimeout: 300 * time.Millisecond})
	o, req := request(t, "POST", "http://"+ln.Addr().String()+"/x", "")
	req.SetBody(bytes.Repeat([]byte("b"), 64<<20)) // far more than the sockets' buffers hold
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	_, err = tr.Do(ctx, o, req, "", &fasthttp.Response{})
	if !errors.As(err, new(TimeoutError)) || ctx.Err() != nil {
		t.Errorf("got %v (context: %v), want a TimeoutError from the write", err, ctx.Err())
	}
}

// What an upstream sends in a head that cannot be read is never quoted: it may echo the
// request's Authorization header, and the error goes to the access log.
func TestHeadErrorsQuoteNothing(t *testing.T) {
	const token = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.secret-token-value"
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	acceptAll(t, ln, func(c net.Conn, _ func(net.Conn)) {
		req, err := http.ReadRequest(bufio.NewReader(c))
		if err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 400 Bad Request\r\nX-Echo: "+req.Header.Get("Authorization")+"\x01\r\nContent-Length: 0\r\n\r\n")
	})
	tr := newTransport(t, Options{})
	o, req := request(t, "POST", "http://"+ln.Addr().String()+"/x", "x")
	_, err = tr.Do(t.Context(), o, req, "Bearer "+token, &fasthttp.Response{})
	if !errors.Is(err, errMalformedHead) || strings.Contains(err.Error(), "eyJ0eXAi") {
		t.Errorf("got %v, want errMalformedHead quoting nothing", err)
	}
}

// A 101 that was not asked for is refused, not taken for the answer with the connection's
// bytes from then on for its body.
func TestUnaskedSwitchingProtocolsIsRefused(t *testing.T) {
	url, _ := rawServer(t, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: upgrade\r\n\r\nraw bytes of another protocol", false)
	tr := newTransport(t, Options{})
	if r, err := post(t, tr, t.Context(), url, "x"); !errors.Is(err, errSwitchingProtocols) {
		if err == nil && r.stream != nil {
			r.stream.Close()
		}
		t.Errorf("got %v, want errSwitchingProtocols", err)
	}
}

// A frame larger than this side allows fails its connection, rather than being read into a
// buffer the connection keeps (up to 16 MiB each).
func TestHTTP2FrameLargerThanAllowedIsRefused(t *testing.T) {
	o, _, _ := frameServer(t, nil, func(n int, fc *frameConn) {
		f := fc.request()
		if f == nil {
			return
		}
		fc.fr.WriteRawFrame(0xfe, 0, 0, make([]byte, h2MaxFrameSize+1)) // an extension frame, else ignored
		fc.headers(f.StreamID, false, ":status", "200", "content-length", "2")
		fc.fr.WriteData(f.StreamID, true, []byte("ok"))
		for fc.next() != nil {
		}
	})
	tr := newTransport(t, Options{})
	if _, body, err := frameCall(t, tr, o); err == nil {
		t.Errorf("answered %q past a frame of %d bytes", body, h2MaxFrameSize+1)
	}
}

// A GOAWAY whose last stream is below a call already answered does not send the call again
// (into the same response, which holds the first answer's head and body).
func TestHTTP2GoAwayAfterTheAnswerBeganIsNoRefusal(t *testing.T) {
	var heads atomic.Int32
	o, _, _ := frameServer(t, nil, func(n int, fc *frameConn) {
		for {
			f := fc.request()
			if f == nil {
				return
			}
			heads.Add(1)
			fc.headers(f.StreamID, false, ":status", "200", "content-length", "10", "x-first", "1")
			fc.fr.WriteData(f.StreamID, false, []byte("hello"))
			fc.fr.WriteGoAway(0, http2.ErrCodeNo, nil)
		}
	})
	tr := newTransport(t, Options{})
	resp, body, err := frameCall(t, tr, o)
	if err == nil || heads.Load() != 1 {
		t.Errorf("got %q (X-First %q), %v, with %d requests at the server; want the call failed, sent once",
			body, resp.Header.Peek("X-First"), err, heads.Load())
	}
}

// Closing a stream wakes a Read blocked on it in another goroutine.
func TestHTTP2StreamCloseWakesRead(t *testing.T) {
	release := make(chan struct{})
	o, _, _ := frameServer(t, nil, func(n int, fc *frameConn) {
		f := fc.request()
		if f == nil {
			return
		}
		fc.headers(f.StreamID, false, ":status", "200", "content-type", "text/event-stream")
		<-release
	})
	t.Cleanup(func() { close(release) }) // before frameServer's cleanup, which waits for the script
	tr := newTransport(t, Options{})
	s := getStream(t, tr, o)
	done := make(chan error, 1)
	go func() { _, err := s.Read(make([]byte, 10)); done <- err }()
	s.Close() // before or while the Read waits: either way it must return
	select {
	case err := <-done:
		if err == nil {
			t.Error("Read returned data from a closed stream")
		}
	case <-time.After(10 * time.Second): // a bound, not a wait
		t.Fatal("Read still blocked after Close")
	}
}

// The last stream of a connection told to close when idle, ended by a WINDOW_UPDATE overflow,
// closes the connection.
func TestHTTP2WindowOverflowClosesAClosingConnection(t *testing.T) {
	overflow, closed := make(chan struct{}), make(chan struct{})
	o, _, _ := frameServer(t, nil, func(n int, fc *frameConn) {
		f := fc.request()
		if f == nil {
			return
		}
		fc.headers(f.StreamID, false, ":status", "200", "content-type", "text/event-stream")
		<-overflow
		fc.fr.WriteWindowUpdate(f.StreamID, 1<<31-1)
		for fc.next() != nil {
		}
		close(closed) // the gateway closed the connection
	})
	tr := New(Options{})
	s := getStream(t, tr, o)
	cc := s.h2.c
	tr.Close() // the connection carries a call: it is to close when that ends
	close(overflow)
	if _, err := io.ReadAll(s); err == nil {
		t.Error("the stream ended without the overflow's error")
	}
	s.Close()
	select {
	case <-closed:
	case <-time.After(10 * time.Second): // a bound, not a wait
		t.Error("the closing connection is still open with no call left")
		cc.close()
	}
}

// An HTTP/2 answer's Connection header (which it should not hold) is kept with the headers it
// names, so that the answer is cleaned of both as over HTTP/1.1, not of the Connection alone.
func TestHTTP2ConnectionHeaderKeptWithWhatItNames(t *testing.T) {
	o, _, _ := frameServer(t, nil, func(n int, fc *frameConn) {
		f := fc.request()
		if f == nil {
			return
		}
		fc.headers(f.StreamID, false, ":status", "200", "connection", "x-hop", "x-hop", "internal", "content-length", "2")
		fc.fr.WriteData(f.StreamID, true, []byte("ok"))
		for fc.next() != nil {
		}
	})
	tr := newTransport(t, Options{})
	resp, _, err := frameCall(t, tr, o)
	if err != nil {
		t.Fatal(err)
	}
	if string(resp.Header.Peek("Connection")) != "x-hop" {
		t.Errorf("Connection %q beside X-Hop %q, want it kept, naming x-hop", resp.Header.Peek("Connection"), resp.Header.Peek("X-Hop"))
	}
}

// getStream makes a GET to o through tr, whose answer is to be an event stream.
func getStream(t *testing.T, tr *Transport, o Origin) *Stream {
	t.Helper()
	req := &fasthttp.Request{}
	req.Header.SetRequestURI("/")
	req.Header.SetHost(o.Host())
	s, err := tr.Do(t.Context(), o, req, "", &fasthttp.Response{})
	if err != nil {
		t.Fatal(err)
	}
	if s == nil {
		t.Fatal("the answer was not streamed")
	}
	return s
}

// An answer framed by both Content-Length and Transfer-Encoding, in either order and however
// the name is spelt, is refused and its connection closed: readers that pick differently would
// split the connection's bytes into different answers. A Content-Length in an informational
// head before a chunked answer is no such thing.
func TestBothLengthsAreRefused(t *testing.T) {
	const chunked = "\r\n5\r\nhello\r\n0\r\n\r\n"
	for _, tc := range []struct {
		name, head string
		refused    bool
	}{
		{"length first", "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n", true},
		{"chunked first", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n", true},
		{"any case, space before the colon", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\ncontent-LENGTH : 5\r\n", true},
		{"length only in an informational head", "HTTP/1.1 103 Early Hints\r\nContent-Length: 5\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n", false},
		{"chunked only", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Content-Length: 5\r\n", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			url, conns := rawServer(t, tc.head+chunked, true)
			tr := newTransport(t, Options{})
			for range 2 {
				r, err := post(t, tr, t.Context(), url, "x")
				if tc.refused {
					if !errors.Is(err, errTwoLengths) {
						if err == nil && r.stream != nil {
							r.stream.Close()
						}
						t.Fatalf("got %v, want errTwoLengths", err)
					}
					continue
				}
				if err != nil {
					t.Fatal(err)
				}
				if b := r.body(t); b != "hello" {
					t.Fatalf("body %q, want hello", b)
				}
			}
			want := int32(1)
			if tc.refused {
				want = 2
			}
			if n := conns.Load(); n != want {
				t.Errorf("%d connections for two calls, want %d", n, want)
			}
		})
	}
}

// A chunked answer whose head came in more than one read cannot be checked for a second
// length where it lay whole: it is read as chunked, and its connection is not used again.
func TestHeadInPiecesIsNotTrustedAgain(t *testing.T) {
	cfg, roots := testTLS(t)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	conns := serveRaw(t, ln, func(c net.Conn) {
		// Two writes are two TLS records, and a read of the connection returns one.
		io.WriteString(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n")
		io.WriteString(c, "Content-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
	}, true)
	o, err := NewOrigin("https://" + ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	o = o.WithRoots(roots, "pieces")
	tr := newTransport(t, Options{})
	for range 2 {
		_, req := request(t, "POST", "https://"+ln.Addr().String()+"/x", "x")
		resp := &fasthttp.Response{}
		s, err := tr.Do(t.Context(), o, req, "", resp)
		if err != nil {
			t.Fatal(err)
		}
		if b := (result{resp, s}).body(t); b != "hello" {
			t.Fatalf("body %q, want hello", b)
		}
	}
	if n := conns.Load(); n != 2 {
		t.Errorf("%d connections for two calls, want 2", n)
	}
}
