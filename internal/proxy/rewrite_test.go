package proxy

import (
	"bufio"
	"strings"
	"testing"

	"github.com/valyala/fasthttp"

	"github.com/tokenproxy/tokenproxy/internal/transport"
)

func TestRewriteDropsHeaders(t *testing.T) {
	// Every dropped header goes, whatever its case, and so do those the caller's Connection
	// header names; the rest stay.
	raw := "POST /openai/deployments/x/chat HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n" +
		"User-Agent: sdk\r\nX-Custom: keep me\r\nConnection: keep-alive, X-Hop\r\nX-Hop: hop\r\n"
	for _, k := range dropRequestHeaders {
		if k != "Connection" && k != "Transfer-Encoding" {
			raw += strings.ToUpper(k) + ": v\r\n"
		}
	}
	raw += "Content-Length: 2\r\n\r\n{}"
	var in, out fasthttp.Request
	if err := in.Read(bufio.NewReader(strings.NewReader(raw))); err != nil {
		t.Fatal(err)
	}
	origin, _ := transport.NewOrigin("https://eastca.openai.azure.com")
	rewrite(&out, &in, &upstream{origin: origin}, []byte("/openai/deployments/y/chat"), "api-version=1", []byte("{}"), "rid", nil, "", nil)
	// The caller's Authorization goes too: the bearer token is the transport's to write.
	for _, k := range append(dropRequestHeaders, "X-Hop") {
		if v := out.Header.Peek(k); len(v) > 0 {
			t.Errorf("%s: %q was forwarded", k, v)
		}
	}
	for k, want := range map[string]string{"X-Custom": "keep me", "User-Agent": "sdk",
		"Content-Type": "application/json", "X-Ms-Client-Request-Id": "rid", "Host": "eastca.openai.azure.com"} {
		if got := string(out.Header.Peek(k)); got != want {
			t.Errorf("%s = %q, want %q", k, got, want)
		}
	}
}

func TestCleanResponse(t *testing.T) {
	raw := "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nApim-Request-Id: a1\r\nConnection: X-Hop\r\nX-Hop: hop\r\n"
	for _, k := range dropResponseHeaders {
		if k != "Connection" {
			raw += strings.ToLower(k) + ": v\r\n"
		}
	}
	raw += "Content-Length: 2\r\n\r\n{}"
	for _, tt := range []struct {
		name, extra, wantID string
	}{
		{"without a request ID", "", "rid"},
		{"with the upstream's", "X-Ms-Client-Request-Id: theirs\r\n", "theirs"},
	} {
		var resp fasthttp.Response
		if err := resp.Read(bufio.NewReader(strings.NewReader(strings.Replace(raw, "\r\n\r\n", "\r\n"+tt.extra+"\r\n", 1)))); err != nil {
			t.Fatal(err)
		}
		cleanResponse(&resp.Header, "rid")
		for _, k := range append(dropResponseHeaders, "X-Hop") {
			if v := resp.Header.Peek(k); len(v) > 0 {
				t.Errorf("%s: %s: %q was passed back", tt.name, k, v)
			}
		}
		if got := string(resp.Header.Peek("X-Ms-Client-Request-Id")); got != tt.wantID {
			t.Errorf("%s: X-Ms-Client-Request-Id = %q, want %q", tt.name, got, tt.wantID)
		}
		if got := string(resp.Header.Peek("Apim-Request-Id")); got != "a1" {
			t.Errorf("%s: Apim-Request-Id = %q, want it kept", tt.name, got)
		}
	}
}
