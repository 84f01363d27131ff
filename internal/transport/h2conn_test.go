package transport

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// frameConn is one connection of a scripted HTTP/2 server: the test reads the client's frames
// and writes the server's.
type frameConn struct {
	nc   net.Conn
	fr   *http2.Framer
	henc *hpack.Encoder
	hbuf bytes.Buffer
}

// testTLS is a server's TLS configuration with a certificate for 127.0.0.1, and the roots
// that verify it.
func testTLS(t *testing.T) (*tls.Config, *x509.CertPool) {
	t.Helper()
	cert := httptest.NewUnstartedServer(nil)
	cert.StartTLS() // only for its certificate
	defer cert.Close()
	roots := x509.NewCertPool()
	roots.AddCert(cert.Certificate())
	return cert.TLS.Clone(), roots
}

// frameServer is a TLS server that chooses h2 and runs script on each connection, after the
// client's preface and the server's own settings.
func frameServer(t *testing.T, settings []http2.Setting, script func(n int, fc *frameConn)) (Origin, *x509.CertPool, *atomic.Int32) {
	t.Helper()
	cfg, roots := testTLS(t)
	cfg.NextProtos = []string{"h2"}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	var conns atomic.Int32
	acceptAll(t, ln, func(nc net.Conn, _ func(net.Conn)) {
		n := int(conns.Add(1))
		fc := &frameConn{nc: nc, fr: http2.NewFramer(nc, nc)}
		fc.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
		fc.henc = hpack.NewEncoder(&fc.hbuf)
		preface := make([]byte, len(http2.ClientPreface))
		if _, err := io.ReadFull(nc, preface); err != nil || string(preface) != http2.ClientPreface {
			return
		}
		fc.fr.WriteSettings(settings...)
		script(n, fc)
	})
	o, err := NewOrigin("https://" + ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	return o.WithRoots(roots, "frames").WithHTTP2(), roots, &conns
}

// next returns the client's next frame that is not connection housekeeping (settings, window
// updates, pings), or nil when the connection ends.
func (fc *frameConn) next() http2.Frame {
	for {
		f, err := fc.fr.ReadFrame()
		if err != nil {
			return nil
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				fc.fr.WriteSettingsAck()
			}
		case *http2.WindowUpdateFrame, *http2.PingFrame:
		default:
			return f
		}
	}
}

// headers writes a header block on stream id.
func (fc *frameConn) headers(id uint32, end bool, fields ...string) {
	fc.hbuf.Reset()
	for i := 0; i+1 < len(fields); i += 2 {
		fc.henc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
	}
	fc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: fc.hbuf.Bytes(), EndStream: end, EndHeaders: true})
}

// request reads the client's next request head (and its body), or returns nil when the
// connection ends.
func (fc *frameConn) request() *http2.MetaHeadersFrame {
	for {
		switch f := fc.next().(type) {
		case nil:
			return nil
		case *http2.MetaHeadersFrame:
			for end := f.StreamEnded(); !end; {
				d, ok := fc.next().(*http2.DataFrame)
				end = !ok || d.StreamEnded()
			}
			return f
		}
	}
}

// frameCall makes one call to a frame server.
func frameCall(t *testing.T, tr *Transport, o Origin) (*fasthttp.Response, string, error) {
	t.Helper()
	req := &fasthttp.Request{}
	req.Header.SetMethod("POST")
	req.Header.SetRequestURI("/chat?x=1")
	req.Header.SetHost(o.Host())
	req.SetBodyString(`{"messages":[]}`)
	resp := &fasthttp.Response{}
	s, err := tr.Do(t.Context(), o, req, "", resp)
	if err != nil {
		return resp, "", err
	}
	if s == nil {
		return resp, string(resp.Body()), nil
	}
	defer s.Close()
	b, err := io.ReadAll(s)
	return resp, string(b), err
}

// A call the server did not take goes again: refused on its stream, or left above a GOAWAY's
// last stream (a server going away between the call's reservation and its sending).
func TestHTTP2RefusedCallGoesAgain(t *testing.T) {
	for _, how := range []string{"refused", "goaway"} {
		t.Run(how, func(t *testing.T) {
			var heads atomic.Int32
			o, _, conns := frameServer(t, nil, func(n int, fc *frameConn) {
				for {
					f := fc.request()
					if f == nil {
						return
					}
					heads.Add(1)
					switch {
					case heads.Load() > 1:
						fc.headers(f.StreamID, false, ":status", "200", "content-type", "application/json", "content-length", "2")
						fc.fr.WriteData(f.StreamID, true, []byte("ok"))
					case how == "refused":
						fc.fr.WriteRSTStream(f.StreamID, http2.ErrCodeRefusedStream)
					default:
						fc.fr.WriteGoAway(0, http2.ErrCodeNo, nil)
					}
				}
			})
			tr := newTransport(t, Options{})
			resp, body, err := frameCall(t, tr, o)
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode() != 200 || body != "ok" {
				t.Errorf("got %d %q", resp.StatusCode(), body)
			}
			if h := heads.Load(); h != 2 {
				t.Errorf("the server saw %d requests, want 2", h)
			}
			want := map[string]int32{"refused": 1, "goaway": 2}[how] // a connection sent away is not used again
			if c := conns.Load(); c != want {
				t.Errorf("%d connections, want %d", c, want)
			}
		})
	}
}

// A server that lets its connections take no call (a stream limit of 0) gets an error, after
// two connections: not a dial per call for ever.
func TestHTTP2NoStreamsAllowed(t *testing.T) {
	o, _, conns := frameServer(t, []http2.Setting{{ID: http2.SettingMaxConcurrentStreams, Val: 0}}, func(n int, fc *frameConn) {
		for fc.next() != nil {
		}
	})
	tr := newTransport(t, Options{})
	if _, _, err := frameCall(t, tr, o); err == nil || !strings.Contains(err.Error(), "takes a call") {
		t.Errorf("got %v, want no connection taking the call", err)
	}
	if c := conns.Load(); c != 2 {
		t.Errorf("%d connections, want 2", c)
	}
	if n := tr.Stats()[0].HTTP2; n != 0 {
		t.Errorf("%d connections kept that take no call", n)
	}
}

// Answers that break the protocol fail their call with an error, and only their call.
func TestHTTP2MalformedAnswers(t *testing.T) {
	cases := []struct {
		name   string
		answer func(fc *frameConn, id uint32)
		want   string
	}{
		{"no status", func(fc *frameConn, id uint32) { fc.headers(id, true, "content-type", "text/plain") }, "valid status"},
		{"bad status", func(fc *frameConn, id uint32) { fc.headers(id, true, ":status", "2000") }, "valid status"},
		{"switching protocols", func(fc *frameConn, id uint32) { fc.headers(id, true, ":status", "101") }, "protocol switch"},
		{"bad length", func(fc *frameConn, id uint32) { fc.headers(id, true, ":status", "200", "content-length", "-1") }, "Content-Length"},
		{"two lengths", func(fc *frameConn, id uint32) {
			fc.headers(id, false, ":status", "200", "content-length", "2", "content-length", "3")
		}, "Content-Length"},
		{"more than the length", func(fc *frameConn, id uint32) {
			fc.headers(id, false, ":status", "200", "content-length", "2")
			fc.fr.WriteData(id, true, []byte("abc"))
		}, "Content-Length"},
		{"less than the length", func(fc *frameConn, id uint32) {
			fc.headers(id, false, ":status", "200", "content-length", "4")
			fc.fr.WriteData(id, true, []byte("abc"))
		}, "Content-Length"},
		{"data before headers", func(fc *frameConn, id uint32) { fc.fr.WriteData(id, true, []byte("abc")) }, "before the response's headers"},
		{"reset", func(fc *frameConn, id uint32) { fc.fr.WriteRSTStream(id, http2.ErrCodeInternal) }, "reset the call's HTTP/2 stream (INTERNAL_ERROR)"},
		{"uppercase name", func(fc *frameConn, id uint32) { fc.headers(id, true, ":status", "200", "X-Upper", "1") }, "malformed HTTP/2 response headers"},
		{"ends after 1xx", func(fc *frameConn, id uint32) { fc.headers(id, true, ":status", "103") }, "no final response"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			o, _, conns := frameServer(t, nil, func(n int, fc *frameConn) {
				for {
					f := fc.request()
					if f == nil {
						return
					}
					if f.PseudoValue("path") == "/fine" {
						fc.headers(f.StreamID, false, ":status", "200", "content-length", "2")
						fc.fr.WriteData(f.StreamID, true, []byte("ok"))
						continue
					}
					tc.answer(fc, f.StreamID)
				}
			})
			tr := newTransport(t, Options{})
			_, _, err := frameCall(t, tr, o)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error with %q", err, tc.want)
			}
			// The connection goes on carrying calls.
			req := &fasthttp.Request{}
			req.Header.SetRequestURI("/fine")
			req.Header.SetHost(o.Host())
			resp := &fasthttp.Response{}
			if _, err := tr.Do(t.Context(), o, req, "", resp); err != nil || string(resp.Body()) != "ok" {
				t.Fatalf("the next call: %v %q", err, resp.Body())
			}
			if c := conns.Load(); c != 1 {
				t.Errorf("%d connections, want the first kept", c)
			}
		})
	}
}

// A server that sends more than the stream's window has its stream reset, and the call fails.
func TestHTTP2OverTheWindow(t *testing.T) {
	reset := make(chan http2.ErrCode, 1)
	o, _, _ := frameServer(t, nil, func(n int, fc *frameConn) {
		f := fc.request()
		if f == nil {
			return
		}
		fc.headers(f.StreamID, false, ":status", "200", "content-type", "text/event-stream")
		chunk := make([]byte, 16<<10)
		for range 5 { // 80 KiB, where the stream's window is 64 and the caller reads nothing yet
			fc.fr.WriteData(f.StreamID, false, chunk)
		}
		for {
			switch f := fc.next().(type) {
			case nil:
				return
			case *http2.RSTStreamFrame:
				reset <- f.ErrCode
				return
			}
		}
	})
	tr := newTransport(t, Options{})
	req := &fasthttp.Request{}
	req.Header.SetRequestURI("/")
	req.Header.SetHost(o.Host())
	s, err := tr.Do(t.Context(), o, req, "", &fasthttp.Response{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if code := <-reset; code != http2.ErrCodeFlowControl {
		t.Errorf("stream reset with %v, want FLOW_CONTROL_ERROR", code)
	}
	if _, err := io.ReadAll(s); err == nil || !strings.Contains(err.Error(), "flow-control window") {
		t.Errorf("got %v, want the window overrun", err)
	}
}

// The client answers the server's pings and settings, and applies a smaller frame size and
// header table: a request larger than a frame goes in several, and decodes.
func TestHTTP2ServerSettings(t *testing.T) {
	big := strings.Repeat("v", 40<<10)
	var got atomic.Value
	var pong atomic.Bool
	o, _, _ := frameServer(t, []http2.Setting{{ID: http2.SettingHeaderTableSize, Val: 0},
		{ID: http2.SettingInitialWindowSize, Val: 1000}}, func(n int, fc *frameConn) {
		fc.fr.WritePing(false, [8]byte{1, 2, 3})
		var body []byte
		var id uint32
		for {
			f, err := fc.fr.ReadFrame()
			if err != nil {
				return
			}
			switch f := f.(type) {
			case *http2.PingFrame:
				pong.Store(f.IsAck() && f.Data == [8]byte{1, 2, 3})
			case *http2.SettingsFrame:
				if !f.IsAck() {
					fc.fr.WriteSettingsAck()
				}
			case *http2.MetaHeadersFrame:
				id = f.StreamID
				got.Store(f.Fields)
			case *http2.DataFrame:
				body = append(body, f.Data()...)
				if len(body) >= 1000 && !f.StreamEnded() { // more window, in steps
					fc.fr.WriteWindowUpdate(id, 5000)
					fc.fr.WriteWindowUpdate(0, 5000)
				}
				if f.StreamEnded() {
					fc.headers(id, false, ":status", "200", "content-length", "8")
					fc.fr.WriteData(id, true, []byte(strings.Repeat("x", 8)))
				}
			}
		}
	})
	tr := newTransport(t, Options{})
	req := &fasthttp.Request{}
	req.Header.SetMethod("POST")
	req.Header.SetRequestURI("/big")
	req.Header.SetHost(o.Host())
	req.Header.Set("X-Big", big)
	req.SetBody(bytes.Repeat([]byte("b"), 20000))
	resp := &fasthttp.Response{}
	if _, err := tr.Do(t.Context(), o, req, "", resp); err != nil || len(resp.Body()) != 8 {
		t.Fatal(err, len(resp.Body()))
	}
	fields, _ := got.Load().([]hpack.HeaderField)
	var x string
	for _, f := range fields {
		if f.Name == "x-big" {
			x = f.Value
		}
	}
	if x != big {
		t.Errorf("the large header arrived with %d bytes, want %d", len(x), len(big))
	}
	if !pong.Load() {
		t.Error("the server's ping was not answered")
	}
}

// A response body larger than the windows arrives whole as the caller reads it: the client
// gives the windows back.
func TestHTTP2WindowsGiveBack(t *testing.T) {
	body := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
	srv, roots, _ := h2Server(t, false, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		w.Write(body)
	})
	tr := newTransport(t, Options{})
	for range 6 { // 6 MiB in all: more than the connection's window
		r, err := h2Do(t, tr, t.Context(), srv, roots, "GET", "/", "")
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(r.stream)
		if err != nil || !bytes.Equal(got, body) {
			t.Fatalf("%v: got %d bytes", err, len(got))
		}
	}
}

// FuzzH2Answer feeds a call whatever frames a server may send: the call ends, with an answer or
// an error, and nothing panics or hangs.
func FuzzH2Answer(f *testing.F) {
	var seed bytes.Buffer
	fr := http2.NewFramer(&seed, nil)
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	enc.WriteField(hpack.HeaderField{Name: ":status", Value: "200"})
	enc.WriteField(hpack.HeaderField{Name: "content-type", Value: "text/event-stream"})
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb.Bytes(), EndHeaders: true})
	fr.WriteData(1, false, []byte("data: one\n\n"))
	fr.WritePing(false, [8]byte{})
	fr.WriteWindowUpdate(0, 100)
	fr.WriteData(1, true, []byte("data: two\n\n"))
	f.Add(seed.Bytes())
	f.Add(seed.Bytes()[:20])
	seed.Reset()
	fr.WriteGoAway(1, http2.ErrCodeNo, []byte("bye"))
	fr.WriteRSTStream(1, http2.ErrCodeCancel)
	f.Add(seed.Bytes())
	f.Fuzz(func(t *testing.T, frames []byte) {
		client, server := net.Pipe()
		done := make(chan struct{})
		go func() {
			defer close(done)
			go io.Copy(io.Discard, server)
			sfr := http2.NewFramer(server, nil)
			sfr.WriteSettings()
			server.Write(frames)
			server.Close()
		}()
		defer func() { client.Close(); <-done }()
		c, err := newH2Conn(client, time.Minute, 5*time.Second)
		if err != nil {
			return
		}
		defer c.close()
		if !c.reserve() {
			return // the frames may have sent it away already
		}
		req := &fasthttp.Request{}
		req.Header.SetRequestURI("/")
		req.Header.SetHost("example")
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s, err := c.roundTrip(ctx, fastRequest{req}, "", &fasthttp.Response{}, Options{})
		if errors.Is(err, context.DeadlineExceeded) {
			t.Fatal("the call hung")
		}
		if s != nil {
			_, err := io.Copy(io.Discard, s)
			s.Close()
			if errors.Is(err, context.DeadlineExceeded) {
				t.Fatal("the stream hung")
			}
		}
	})
}
