package transport

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

// TestAuthorizationIsSent: the authorization Do or Send is given reaches the upstream as the
// request's only Authorization header, in place of any the request has, with the rest of the
// request intact, over HTTP/1.1 (plain and TLS) and HTTP/2, whichever way the request is written.
func TestAuthorizationIsSent(t *testing.T) {
	const bearer = "Bearer eyJ0eXAiOiJKV1QifQ.eyJhdWQiOiJjb2duaXRpdmUifQ.c2ln"
	echo := func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "%s %s %s auth=%q len=%q ct=%q x=%q body=%s", r.Proto, r.Method, r.URL.RequestURI(),
			r.Header.Values("Authorization"), r.Header.Values("Content-Length"), r.Header.Get("Content-Type"), r.Header.Get("X-Custom"), b)
	}
	plain, _ := countingServer(t, echo)
	h1, h1Roots, _ := h2Server(t, true, echo)
	h2, h2Roots, _ := h2Server(t, false, echo)
	tr := newTransport(t, Options{})
	// sent checks the call's outcome: what the upstream got, as echo tells it.
	sent := func(t *testing.T, resp *fasthttp.Response, stream *Stream, err error, want string) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		if got := (result{resp, stream}).body(t); got != want {
			t.Errorf("upstream got\n  %s\nwant\n  %s", got, want)
		}
	}
	for _, up := range []struct {
		name, url, proto string
		origin           func(Origin) Origin
	}{
		{"plain", plain.URL, "HTTP/1.1", func(o Origin) Origin { return o }},
		{"TLS", h1.URL, "HTTP/1.1", func(o Origin) Origin { return o.WithRoots(h1Roots, "h1") }},
		{"HTTP/2", h2.URL, "HTTP/2.0", func(o Origin) Origin { return o.WithRoots(h2Roots, "h2").WithHTTP2() }},
	} {
		for _, tt := range []struct {
			name, method, body string
			prepare            func(*fasthttp.Request)
			want               string
		}{
			{"POST", "POST", `{"n":1}`, nil,
				` POST /openai/x?api-version=1 auth=["` + bearer + `"] len=["7"] ct="application/json" x="keep" body={"n":1}`},
			{"the caller's replaced", "POST", `{"n":1}`, func(r *fasthttp.Request) { r.Header.Set("Authorization", "Bearer caller-key") },
				` POST /openai/x?api-version=1 auth=["` + bearer + `"] len=["7"] ct="application/json" x="keep" body={"n":1}`},
			{"GET", "GET", "", nil,
				` GET /openai/x?api-version=1 auth=["` + bearer + `"] len=[] ct="application/json" x="keep" body=`},
			{"body stream", "POST", "", func(r *fasthttp.Request) { r.SetBodyStream(strings.NewReader(`{"n":2}`), 7) },
				` POST /openai/x?api-version=1 auth=["` + bearer + `"] len=["7"] ct="application/json" x="keep" body={"n":2}`},
		} {
			t.Run(up.name+"/"+tt.name, func(t *testing.T) {
				o, req := request(t, tt.method, up.url+"/openai/x?api-version=1", tt.body)
				req.Header.SetContentType("application/json")
				req.Header.Set("X-Custom", "keep")
				if tt.prepare != nil {
					tt.prepare(req)
				}
				resp := &fasthttp.Response{}
				stream, err := tr.Do(t.Context(), up.origin(o), req, bearer, resp)
				sent(t, resp, stream, err, up.proto+tt.want)
			})
		}
		// The same through Send, with the head rendered by the caller.
		for _, tt := range []struct {
			method, body, want string
		}{
			{"POST", `{"n":1}`, ` POST /openai/x?api-version=1 auth=["` + bearer + `"] len=["7"] ct="application/json" x="keep" body={"n":1}`},
			{"POST", "", ` POST /openai/x?api-version=1 auth=["` + bearer + `"] len=["0"] ct="application/json" x="keep" body=`},
			{"GET", "", ` GET /openai/x?api-version=1 auth=["` + bearer + `"] len=[] ct="application/json" x="keep" body=`},
		} {
			t.Run(up.name+"/Send "+tt.method+" "+tt.body, func(t *testing.T) {
				o, err := NewOrigin(up.url)
				if err != nil {
					t.Fatal(err)
				}
				req := &Request{Method: []byte(tt.method), Target: []byte("/openai/x?api-version=1"), Host: o.Host(), Body: []byte(tt.body)}
				req.AppendField([]byte("Content-Type"), []byte("application/json"))
				req.AppendField([]byte("X-Custom"), []byte("keep"))
				resp := &fasthttp.Response{}
				stream, err := tr.Send(t.Context(), time.Time{}, up.origin(o), req, bearer, resp)
				sent(t, resp, stream, err, up.proto+tt.want)
			})
		}
	}
}

// TestWriteRequestAsFasthttp: a request as the gateway builds it is written byte for byte as
// fasthttp writes it with the header set in it, the header last.
func TestWriteRequestAsFasthttp(t *testing.T) {
	const bearer = "Bearer eyJ0.e30.c2ln"
	for _, tt := range []struct{ method, body string }{
		{"POST", `{"messages":[]}`}, {"POST", ""}, {"GET", ""}, {"DELETE", ""}, {"PUT", "x"},
	} {
		build := func() *fasthttp.Request {
			var r fasthttp.Request
			r.Header.SetMethod(tt.method)
			r.Header.SetRequestURI("/openai/deployments/d/chat/completions?api-version=2024-10-21")
			r.Header.SetHost("eastca.openai.azure.com")
			r.Header.Set("User-Agent", "AzureOpenAI/Python 1.54.0")
			r.Header.Set("X-Ms-Client-Request-Id", "6a1b2c3d")
			r.Header.SetContentType("application/json")
			r.SetBodyString(tt.body)
			r.Header.SetContentLength(len(tt.body))
			return &r
		}
		var got, want bytes.Buffer
		bw := bufio.NewWriter(&got)
		if err := writeRequest(bw, build(), bearer); err != nil {
			t.Fatal(err)
		}
		bw.Flush()
		ref := build()
		ref.Header.Set("Authorization", bearer)
		bw = bufio.NewWriter(&want)
		if err := ref.Write(bw); err != nil {
			t.Fatal(err)
		}
		bw.Flush()
		if got.String() != want.String() {
			t.Errorf("%s %q:\n got %q\nwant %q", tt.method, tt.body, got.String(), want.String())
		}
		if !strings.Contains(got.String(), "\r\nAuthorization: "+bearer+"\r\n\r\n") {
			t.Errorf("%s: the header is not the head's last: %q", tt.method, got.String())
		}
	}
}

// BenchmarkWriteRequest writes a gateway's request with an Entra-sized bearer token: from a
// Request whose head the caller renders (as Send does), from a fasthttp.Request with the token
// straight into the head (as Do does), and with the token set in the fasthttp.Request for
// fasthttp's writer to write.
func BenchmarkWriteRequest(b *testing.B) {
	bearer := "Bearer eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9." + strings.Repeat("a", 1100) + ".sig"
	body := []byte(`{"messages":[{"role":"user","content":"hello"}],"max_tokens":50}`)
	var req fasthttp.Request
	bw := bufio.NewWriterSize(io.Discard, 16<<10)
	build := func() {
		req.Reset()
		req.Header.SetMethod("POST")
		req.Header.SetRequestURI("/openai/deployments/deploy-gpt-4.1/chat/completions?api-version=2024-10-21")
		req.Header.SetHost("eastca.openai.azure.com")
		req.Header.SetContentType("application/json")
		req.Header.Set("User-Agent", "AzureOpenAI/Python 1.54.0")
		req.Header.Set("X-Ms-Client-Request-Id", "6a1b2c3d-0000-4000-8000-000000000000")
		req.SetBodyRaw(body)
		req.Header.SetContentLength(len(body))
	}
	b.Run("head", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			build()
			if err := writeRequest(bw, &req, bearer); err != nil {
				b.Fatal(err)
			}
			bw.Flush()
		}
	})
	b.Run("request", func(b *testing.B) { // a Request, as Send writes it
		var r Request
		b.ReportAllocs()
		for b.Loop() {
			r.Method = append(r.Method[:0], "POST"...)
			r.Target = append(r.Target[:0], "/openai/deployments/deploy-gpt-4.1/chat/completions?api-version=2024-10-21"...)
			r.Host = "eastca.openai.azure.com"
			r.Fields = r.Fields[:0]
			r.AppendField([]byte("Content-Type"), []byte("application/json"))
			r.AppendField([]byte("User-Agent"), []byte("AzureOpenAI/Python 1.54.0"))
			r.AppendField([]byte("X-Ms-Client-Request-Id"), []byte("6a1b2c3d-0000-4000-8000-000000000000"))
			r.Body = body
			if err := r.writeH1(bw, bearer); err != nil {
				b.Fatal(err)
			}
			bw.Flush()
		}
	})
	b.Run("fasthttp", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			build()
			req.Header.Set("Authorization", bearer)
			if err := req.Write(bw); err != nil {
				b.Fatal(err)
			}
			bw.Flush()
		}
	})
}
