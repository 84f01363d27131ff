package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/rand/v2"
	"mime/multipart"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/valyala/fasthttp"

	"github.com/tokenproxy/tokenproxy/internal/config"
	"github.com/tokenproxy/tokenproxy/internal/emulator"
)

const chatPath = "/openai/deployments/gpt-4.1-mini/chat/completions?api-version=2025-01-01-preview"

func TestChatCompletionEndToEnd(t *testing.T) {
	g := newGateway(t)
	resp, body := g.do("POST", chatPath, map[string]string{"api-key": keyProd}, chatBody)
	if resp.StatusCode != 200 {
		t.Fatalf("got %d %s, want 200", resp.StatusCode, body)
	}
	var chat struct {
		Object  string
		Choices []struct{ Message struct{ Content string } }
	}
	if err := json.Unmarshal([]byte(body), &chat); err != nil || chat.Object != "chat.completion" ||
		!strings.Contains(chat.Choices[0].Message.Content, "some prompt query") {
		t.Fatalf("got body %s, want the emulator's chat.completion", body)
	}

	reqs := g.emu.OpenAI.Requests()
	if len(reqs) != 1 {
		t.Fatalf("upstream got %d requests, want 1", len(reqs))
	}
	up := reqs[0]
	if want := "/openai/deployments/deploy-gpt-4.1/chat/completions"; up.Path != want {
		t.Errorf("upstream path = %q, want %q (renamed)", up.Path, want)
	}
	if up.RawQuery != "api-version=2025-01-01-preview" {
		t.Errorf("upstream query = %q, want the caller's", up.RawQuery)
	}
	if u, _ := url.Parse(g.emu.OpenAI.URL()); up.Host != u.Host {
		t.Errorf("upstream Host = %q, want %q", up.Host, u.Host)
	}
	if up.Claims.AppID != g.emu.ClientID {
		t.Errorf("upstream saw token for %q, want the gateway's app", up.Claims.AppID)
	}
	if body := string(up.Body); body != chatBody {
		t.Errorf("upstream body = %s, want it unchanged", body)
	}
	id := resp.Header.Get("x-ms-client-request-id")
	if id == "" || up.Header.Get("x-ms-client-request-id") != id {
		t.Errorf("request id: caller got %q, upstream got %q; want the same generated ID", id, up.Header.Get("x-ms-client-request-id"))
	}
	if len(resp.Header.Values("x-ms-client-request-id")) != 1 {
		t.Errorf("got x-ms-client-request-id %q, want exactly one value", resp.Header.Values("x-ms-client-request-id"))
	}
	for _, h := range []string{"apim-request-id", "x-ms-region", "x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens"} {
		if resp.Header.Get(h) == "" {
			t.Errorf("Azure response header %s did not pass through", h)
		}
	}
}

func TestCallerRequestIDIsKept(t *testing.T) {
	g := newGateway(t)
	resp, _ := g.do("POST", chatPath, map[string]string{"api-key": keyProd, "x-ms-client-request-id": "a360-run-42"}, chatBody)
	if got := resp.Header.Get("x-ms-client-request-id"); got != "a360-run-42" {
		t.Errorf("got request id %q, want the caller's a360-run-42", got)
	}
	if got := g.emu.OpenAI.Requests()[0].Header.Get("x-ms-client-request-id"); got != "a360-run-42" {
		t.Errorf("upstream got %q, want a360-run-42", got)
	}
	resp, _ = g.do("POST", chatPath, map[string]string{"api-key": keyProd, "x-ms-client-request-id": "bad id\twith junk"}, chatBody)
	if got := resp.Header.Get("x-ms-client-request-id"); len(got) != 36 {
		t.Errorf("got request id %q for an unusable caller ID, want a generated UUID", got)
	}
}

func TestCallerCredentialsNeverReachUpstream(t *testing.T) {
	g := newGateway(t)
	for _, c := range []struct {
		query  string
		header map[string]string
	}{
		{"", map[string]string{"api-key": keyProd}},
		{"", map[string]string{"Authorization": "Bearer " + keyProd}},
		{"", map[string]string{"api-key": keyProd, "Authorization": "Bearer " + keyProd}},
		{"", map[string]string{"Authorization": "bearer  " + keyProd + " ", "Cookie": "session=abc", "Ocp-Apim-Subscription-Key": "apim-key"}},
		{"", map[string]string{"api-key": keyProd, "Connection": "X-Hop", "X-Hop": "hop-value"}},
		{"&api-key=" + keyProd + "&x=1&Subscription-Key=apim-key&api%2Dkey=" + keyProd + "&token=" + keyProd, map[string]string{"api-key": keyProd}},
		{"", map[string]string{"api-key": keyProd, "X-Custom-Auth": "key " + keyProd, "X-Keep": "kept"}},
	} {
		resp, body := g.do("POST", chatPath+c.query, c.header, chatBody)
		if resp.StatusCode != 200 {
			t.Fatalf("with %v got %d %s, want 200", c, resp.StatusCode, body)
		}
	}
	reqs := g.emu.OpenAI.Requests()
	for _, r := range reqs {
		for k, vs := range r.Header {
			for _, v := range vs {
				if strings.Contains(v, keyProd) || strings.Contains(v, "session=abc") || strings.Contains(v, "apim-key") || strings.Contains(v, "hop-value") {
					t.Errorf("upstream received a caller credential or hop-by-hop header in %s", k)
				}
			}
		}
		if strings.Contains(r.RawQuery, keyProd) || strings.Contains(r.RawQuery, "apim-key") {
			t.Errorf("upstream received a caller key in the query %q", r.RawQuery)
		}
		if r.Header.Get("Api-Key") != "" || r.Header.Get("Cookie") != "" || len(r.Header.Values("Authorization")) != 1 {
			t.Errorf("upstream headers %v, want exactly one Authorization and no api-key or cookie", r.Header)
		}
	}
	if got := reqs[len(reqs)-2].RawQuery; got != "api-version=2025-01-01-preview&x=1" {
		t.Errorf("upstream query %q, want the other parameters kept in order", got)
	}
	if last := reqs[len(reqs)-1].Header; last.Get("X-Keep") != "kept" || last.Get("X-Custom-Auth") != "" {
		t.Errorf("custom headers upstream: X-Keep %q, X-Custom-Auth %q; want the one holding the key dropped, the other kept",
			last.Get("X-Keep"), last.Get("X-Custom-Auth"))
	}
}

func TestOtherCallersKeysNeverReachUpstream(t *testing.T) {
	// A caller that sends another caller's key, in any header or parameter, does not get it to
	// Azure either: the gateway knows its keys only by hash, so it hashes what could be one.
	// A generated key (proxy hash-key --generate) is found wherever it is, even glued to other
	// text; the request ID is the caller's only if it holds no key.
	g := newGateway(t, withKeyGen)
	resp, body := g.do("POST", "/openai/deployments/gpt-4o/chat/completions?api-version=2025-01-01-preview&other="+keyProd+"&x=1&g=0"+keyGen+"&"+keyGen+"=1",
		map[string]string{"api-key": keyAdmin, "X-Other": keyProd, "X-Auth": "Bearer " + keyProd, "X-Pair": "k=" + keyProd + "; a=b",
			"X-Glued": "0" + keyGen + "0", "X-Ms-Client-Request-Id": keyProd,
			"X-Keep": "kept, as it is", "User-Agent": "AzureOpenAI/Python 1.54.0"}, chatBody)
	if resp.StatusCode != 200 {
		t.Fatalf("got %d %s, want 200", resp.StatusCode, body)
	}
	reqs := g.emu.OpenAI.Requests()
	r := reqs[len(reqs)-1]
	for k, vs := range r.Header {
		for _, v := range vs {
			if strings.Contains(v, keyProd) || strings.Contains(v, keyAdmin) || strings.Contains(v, keyGen) {
				t.Errorf("upstream received a caller key in %s", k)
			}
		}
	}
	if id := resp.Header.Get("X-Ms-Client-Request-Id"); id == "" || id != r.Header.Get("X-Ms-Client-Request-Id") {
		t.Errorf("request ID %q back, %q upstream: want the gateway's own, the same", id, r.Header.Get("X-Ms-Client-Request-Id"))
	}
	if strings.Contains(g.logs.String(), keyProd) || strings.Contains(g.logs.String(), keyGen) {
		t.Error("the log holds a caller key")
	}
	if r.RawQuery != "api-version=2025-01-01-preview&x=1" {
		t.Errorf("upstream query %q, want the parameter holding a key dropped and the rest kept", r.RawQuery)
	}
	if r.Header.Get("X-Keep") != "kept, as it is" || r.Header.Get("User-Agent") != "AzureOpenAI/Python 1.54.0" {
		t.Errorf("upstream headers %v: want those holding no key kept", r.Header)
	}

	// A key as one field of a parameter's value is found as in a header's, in a query with
	// nothing else about it to look at twice (no escapes, no key-named or generated-looking
	// parameter).
	// So is one as a parameter's name, and one escaped, where an escape that is none would have
	// hidden it from the check (a decoder downstream may well read "%74" as "t" all the same).
	// The caller's own key (keyAdmin here) as well.
	for _, q := range []string{"pair=a," + keyProd, "pair=k=" + keyProd + ";x", "pair=b+" + keyProd,
		keyProd + "=1", keyProd, "x=%74" + keyProd[1:] + ",%zz", "%74" + keyProd[1:] + ";%zz=1",
		"x=%74" + keyGen[1:] + "%zz", "%74" + keyGen[1:] + "%zz=1", "%74" + keyGen[1:],
		"%74" + keyAdmin[1:] + "=1", "x=%74" + keyAdmin[1:] + "%zz", "x=%zz%74" + keyAdmin[1:]} {
		resp, body = g.do("POST", "/openai/deployments/gpt-4o/chat/completions?api-version=2025-01-01-preview&"+q+"&x=1",
			map[string]string{"api-key": keyAdmin}, chatBody)
		if resp.StatusCode != 200 {
			t.Fatalf("%s: got %d %s, want 200", q, resp.StatusCode, body)
		}
		reqs = g.emu.OpenAI.Requests()
		if got := reqs[len(reqs)-1].RawQuery; got != "api-version=2025-01-01-preview&x=1" {
			t.Errorf("%s: upstream query %q, want the parameter holding a key dropped and the rest kept", q, got)
		}
	}
}

func TestCredentialAsHeaderNameNeverReachesUpstream(t *testing.T) {
	// The caller's credential sent as a header's name, or in one, does not go upstream either,
	// though the server hands names over with capitals at the start and after each '-' and
	// small letters elsewhere, whatever the caller sent.
	const hexKey = "a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5"
	g := newGateway(t, func(c *config.Config) {
		c.Callers = append(c.Callers, &config.Caller{Name: "hex", KeySHA256: hashKey(hexKey), Deployments: []string{"*"}})
	})
	for _, tc := range []struct{ key, name string }{
		{keyProd, keyProd},
		{keyProd, "X-" + keyProd + "-Y"},
		{hexKey, hexKey},
		{hexKey, "X-Pasted-" + hexKey},
	} {
		resp, body := g.do("POST", chatPath, map[string]string{"api-key": tc.key, tc.name: "1", "X-A-Long-Ordinary-Header-Name": "kept"}, chatBody)
		if resp.StatusCode != 200 {
			t.Fatalf("%s: got %d %s, want 200", tc.name, resp.StatusCode, body)
		}
		reqs := g.emu.OpenAI.Requests()
		r := reqs[len(reqs)-1]
		for k := range r.Header {
			if l := strings.ToLower(k); strings.Contains(l, strings.ToLower(keyProd)) || strings.Contains(l, hexKey) {
				t.Errorf("%s: upstream received a header named by a key: %s", tc.name, k)
			}
		}
		if r.Header.Get("X-A-Long-Ordinary-Header-Name") != "kept" {
			t.Errorf("%s: a header holding no key was dropped", tc.name)
		}
	}
}

func TestKeysInThePathAreRefused(t *testing.T) {
	// The path goes upstream as it is and to the log: one holding a key is refused, whoever
	// sends it, and the log does not get the key.
	g := newGateway(t, withKeyGen)
	before := len(g.emu.OpenAI.Requests())
	for _, tc := range []struct {
		name, path, key string
	}{
		{"another caller's key", "/openai/v1/" + keyProd + "/x", keyAdmin},
		{"the caller's own key", "/openai/v1/responses/" + keyAdmin, keyAdmin},
		{"a generated key, glued", "/openai/deployments/gpt-4o/chat/completions0" + keyGen + "0?api-version=1", keyAdmin},
		{"no key presented", "/openai/deployments/" + keyProd + "/chat/completions?api-version=1", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := map[string]string{}
			if tc.key != "" {
				h["api-key"] = tc.key
			}
			resp, body := g.do("POST", tc.path, h, `{"model":"gpt-4o"}`)
			if resp.StatusCode != 400 || !strings.Contains(body, `"code":"`+CodeInvalidPath+`"`) {
				t.Fatalf("got %d %s, want 400 %s", resp.StatusCode, body, CodeInvalidPath)
			}
			if strings.Contains(body, keyProd) || strings.Contains(body, keyGen) {
				t.Errorf("the error echoes the key: %s", body)
			}
		})
	}
	if n := len(g.emu.OpenAI.Requests()); n != before {
		t.Errorf("%d requests reached the upstream", n-before)
	}
	for _, k := range []string{keyProd, keyAdmin, keyGen} {
		if strings.Contains(g.logs.String(), k) {
			t.Errorf("the log holds a caller key")
		}
	}
	// A route's own words are not keys: a path of them goes through.
	if resp, body := g.do("POST", "/openai/v1/chat/completions", map[string]string{"api-key": keyGen}, `{"model":"gpt-4.1-mini"}`); resp.StatusCode != 200 {
		t.Errorf("got %d %s, want 200", resp.StatusCode, body)
	}
}

func TestCallsRefusedBeforeTheCallerIsKnownLogNoKey(t *testing.T) {
	// A call refused for its path or headers, or for a route there is none of, is refused before
	// the caller is authenticated; its log line and answer still hold neither the credential it
	// presented nor another caller's key. Sent as raw HTTP/1.1: a client library would clean or
	// refuse some of these paths itself.
	g := newGateway(t, withKeyGen)
	token := "eyJ" + strings.Repeat("a", 1100) + ".eyJ.sig" // longer than a path may be
	for _, tc := range []struct {
		name, target, key, extra string
		status                   int
	}{
		{"own key in a path with a refused character", "/openai/deployments/gpt-4o/" + keyProd + "~/chat/completions", keyProd, "", 400},
		{"own key glued, in a refused path", "/openai/deployments/gpt-4o/x" + keyProd + "~", keyProd, "", 400},
		{"a generated key in a path with an escape", "/openai/deployments/" + keyGen + "/chat/completions%41", keyAdmin, "", 400},
		{"another's key, a segment of a path with an empty segment", "/openai/deployments/" + keyProd + "//chat", keyAdmin, "", 400},
		{"another's key, a segment, with a refused header", "/openai/deployments/" + keyProd + "/chat/completions", keyAdmin, "X Bad: 1\r\n", 400},
		{"own key glued, no such route", "/nope/x" + keyProd, keyProd, "", 404},
		{"own key glued, no operation", "/openai/deployments/x" + keyProd, keyProd, "", 404},
		{"own key in the request ID, no such route", "/nope", keyProd, "X-Ms-Client-Request-Id: run:" + keyProd + "\r\n", 404},
		{"own token in a path too long", "/openai/deployments/" + token + "/chat/completions", token, "", 414},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(g.logs.String())
			c := dial(t, g)
			fmt.Fprintf(c, "GET %s?api-version=1 HTTP/1.1\r\nHost: gw\r\nApi-Key: %s\r\n%sConnection: close\r\n\r\n", tc.target, tc.key, tc.extra)
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tc.status || !strings.Contains(string(body), `"error":{"code":"`) {
				t.Errorf("got %d %s, want %d with an Azure-shaped error", resp.StatusCode, body, tc.status)
			}
			logs := g.logs.String()[before:]
			if !strings.Contains(logs, `"msg":"request"`) {
				t.Fatalf("no access log line: %s", logs)
			}
			for _, k := range []string{keyProd, keyAdmin, keyGen, token[:40]} {
				if strings.Contains(logs, k) || strings.Contains(string(body), k) || strings.Contains(resp.Header.Get("X-Ms-Client-Request-Id"), k) {
					t.Errorf("a caller's key or token is in the log, the answer or its request ID: %s", logs)
				}
			}
		})
	}
	// A refused path is logged up to the segment that made it so, for whoever looks into it.
	before := len(g.logs.String())
	c := dial(t, g)
	fmt.Fprintf(c, "GET /openai/deployments/gpt-4o/chat~completions HTTP/1.1\r\nHost: gw\r\nApi-Key: %s\r\nConnection: close\r\n\r\n", keyProd)
	if resp, err := http.ReadResponse(bufio.NewReader(c), nil); err != nil || resp.StatusCode != 400 {
		t.Fatalf("got %v, %v; want 400", resp, err)
	}
	if logs := g.logs.String()[before:]; !strings.Contains(logs, `"path":"/openai/deployments/gpt-4o/…"`) {
		t.Errorf("want the refused path logged up to the refused segment: %s", logs)
	}
}

func TestKeyThatIsARouteWordIsRefused(t *testing.T) {
	for _, key := range []string{"completions", "gpt-4.1-mini"} {
		cfg := config.Default()
		cfg.Deployments = map[string]*config.Deployment{"gpt-4.1-mini": {}}
		cfg.Callers = []*config.Caller{{Name: "lazy", KeyHashes: []string{hashKey(key)}}}
		var l loads
		if _, err := newCallers(cfg, &l, nil); err == nil || !strings.Contains(err.Error(), `caller "lazy": a key is "`+key+`"`) {
			t.Errorf("got %v, want the key %q refused", err, key)
		}
	}
}

func TestHeaderInjectionIsRefused(t *testing.T) {
	g := newGateway(t)
	for _, evil := range []string{
		"X-Evil: a\rInjected: yes",
		"X-Evil: a\x00b",
		"X-Evil: a\x7fb",
		"X Evil: a", // a name that is not a token, which fasthttp's parser keeps
	} {
		conn, err := net.Dial("tcp", strings.TrimPrefix(g.url, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(conn, "POST %s HTTP/1.1\r\nHost: gw\r\nApi-Key: %s\r\n%s\r\nContent-Length: %d\r\n\r\n%s", chatPath, keyProd, evil, len(chatBody), chatBody)
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		conn.Close()
		if err != nil {
			t.Fatalf("%q: %v", evil, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		// The gateway's own answer: a request the upstream refused would come back as a 400
		// too, but the upstream would have seen it.
		if resp.StatusCode != 400 || !strings.Contains(string(body), CodeInvalidRequest) {
			t.Errorf("%q: got %d %s, want the gateway's 400", evil, resp.StatusCode, body)
		}
	}
	if n := len(g.emu.OpenAI.Requests()); n != 0 {
		t.Errorf("%d requests with control characters or a malformed name in a header reached the upstream", n)
	}
}

func TestCheckHeaders(t *testing.T) {
	// Whatever the server's parser lets through, a header with control characters is refused
	// before it could be copied upstream. (fasthttp already turns CR and LF inside a value into
	// spaces, and its parser refuses a bare CR; the other control characters are checked here.)
	for _, v := range []string{"a\x00b", "a\x7f", "\x01", "a\x1bb"} {
		var h fasthttp.RequestHeader
		h.Set("Content-Type", "application/json")
		h.Set("X-Evil", v)
		if _, e := checkHeaders(&h); e == nil {
			t.Errorf("header value %q accepted", v)
		}
	}
	// Nor is a name that is not a token: fasthttp's parser lets a space inside one through.
	for _, k := range []string{"X Bad", "X\x00", "X\tY", "é"} {
		var h fasthttp.RequestHeader
		h.DisableNormalizing()
		h.SetBytesKV([]byte(k), []byte("v"))
		if _, e := checkHeaders(&h); e == nil {
			t.Errorf("header name %q accepted", k)
		}
	}
	var h fasthttp.RequestHeader
	h.Set("X-Fine", "tab\there, unicode é")
	h.Set("X-Odd_But.Valid!#$%&'*+^`|~", "v")
	if id, e := checkHeaders(&h); e != nil || id != nil {
		t.Errorf("a valid header refused (%v), or a request ID found where none was sent (%q)", e, id)
	}
	// The caller's request ID is the first one sent, whatever the case of its name, as Peek
	// would find it.
	var parsed fasthttp.RequestHeader
	if err := parsed.Read(bufio.NewReader(strings.NewReader("GET / HTTP/1.1\r\nHost: x\r\n" +
		"x-ms-client-request-id: first\r\nX-MS-CLIENT-REQUEST-ID: second\r\n\r\n"))); err != nil {
		t.Fatal(err)
	}
	if id, e := checkHeaders(&parsed); e != nil || string(id) != "first" || string(parsed.Peek("X-Ms-Client-Request-Id")) != "first" {
		t.Errorf("checkHeaders found request ID %q (%v), want the first sent, \"first\", as Peek finds %q", id, e, parsed.Peek("X-Ms-Client-Request-Id"))
	}
}

func TestKeyRotationAndConcurrencyLimits(t *testing.T) {
	const newKey = "tp-test-key-prod-rotated-0123456789"
	g := newGateway(t, func(c *config.Config) {
		c.Callers[0].KeysSHA256 = []string{hashKey(newKey)} // old and new keys both work
		c.Callers[0].MaxConcurrent = 2
		c.MaxConcurrent = 3
	})
	for _, k := range []string{keyProd, newKey} {
		if resp, _ := g.do("POST", chatPath, map[string]string{"api-key": k}, chatBody); resp.StatusCode != 200 {
			t.Errorf("key %s…: got %d, want 200", k[:8], resp.StatusCode)
		}
	}

	// Hold streams open: the caller's third concurrent call and the gateway's fourth get 429.
	g.emu.OpenAI.SetStreamGate(make(chan struct{}))
	open := func(key string) *http.Response {
		req, _ := http.NewRequestWithContext(t.Context(), "POST", g.url+"/openai/deployments/gpt-4.1-mini/chat/completions?api-version=1", strings.NewReader(`{"stream":true,"messages":[]}`))
		if key == keyAdmin {
			req.URL.Path = "/openai/deployments/gpt-4o/chat/completions"
		}
		req.Header.Set("api-key", key)
		resp, err := g.client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	var held []*http.Response
	for _, k := range []string{keyProd, newKey} { // both a360-prod's
		resp := open(k)
		if resp.StatusCode != 200 {
			t.Fatalf("a stream to hold got %d", resp.StatusCode)
		}
		bufio.NewReader(resp.Body).ReadString('\n')
		held = append(held, resp)
	}
	resp := open(keyProd)
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 429 || resp.Header.Get("Retry-After") != "1" || !strings.Contains(string(b), CodeTooManyCalls) {
		t.Errorf("a360-prod's third concurrent call got %d %s, want 429 TooManyConcurrentCalls with Retry-After", resp.StatusCode, b)
	}
	held = append(held, open(keyAdmin))
	bufio.NewReader(held[2].Body).ReadString('\n')
	resp = open(keyAdmin)
	b, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 429 || !strings.Contains(string(b), "the gateway has 3 calls in flight") {
		t.Errorf("the gateway's fourth concurrent call got %d %s, want 429", resp.StatusCode, b)
	}
	for _, r := range held {
		r.Body.Close()
	}
	// Places are given back when calls end: limits do not leak.
	g.emu.OpenAI.SetStreamGate(nil)
	for deadline := time.Now().Add(10 * time.Second); g.handler.inflight.Load() != 0; {
		if time.Now().After(deadline) {
			t.Fatalf("%d places still taken after every call ended", g.handler.inflight.Load())
		}
		runtime.Gosched()
	}
	if resp, _ := g.do("POST", chatPath, map[string]string{"api-key": keyProd}, chatBody); resp.StatusCode != 200 {
		t.Errorf("after the streams ended got %d, want 200", resp.StatusCode)
	}
}

// TestSpareConnection checks that spare_connections reaches the upstream transport: a call
// to an upstream with no idle connection dials for itself, and a spare is dialled beside it.
func TestSpareConnection(t *testing.T) {
	seen := make(chan struct{}, 8)
	up := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"object":"chat.completion"}`)
	}))
	up.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			seen <- struct{}{}
		}
	}
	up.Start()
	defer up.Close()
	emu, cfg := emulatorConfig(t)
	if cfg.SpareConnections != 1 {
		t.Fatalf("spare_connections defaults to %d, want 1", cfg.SpareConnections)
	}
	cfg.Upstreams = map[string]*config.Upstream{"u": {URL: up.URL, Credential: "corp-app"}}
	cfg.Callers = []*config.Caller{{Name: "c", KeySHA256: hashKey(keyProd), Deployments: []string{"*"}}}
	g := startGateway(t, emu, applyOptions(t, cfg, nil))
	if resp, body := g.do("POST", "/openai/deployments/gpt-4o/chat/completions?api-version=1", map[string]string{"api-key": keyProd}, chatBody); resp.StatusCode != 200 {
		t.Fatalf("got %d %s", resp.StatusCode, body)
	}
	for i := range 2 {
		select {
		case <-seen:
		case <-time.After(5 * time.Second):
			t.Fatalf("the upstream saw %d connections, want 2: the call's and a spare", i)
		}
	}
}

// TestNoContentTypeInvented: an answer without a Content-Type reaches the caller without one,
// from the backend tried first and after a failover alike; and nothing of the failed attempt's
// answer, which is read into the caller's response and then moved aside, is left in the one
// the caller gets. Over HTTP/2 the transport adds the answer's fields to the response one by
// one, so what the failed attempt left there would stay.
func TestNoContentTypeInvented(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		start := func(h http.HandlerFunc) (*httptest.Server, *config.Upstream) {
			srv := httptest.NewUnstartedServer(h)
			if !h2 {
				srv.Start()
				return srv, &config.Upstream{URL: srv.URL, Credential: "corp-app"}
			}
			srv.EnableHTTP2 = true
			srv.StartTLS()
			ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
			return srv, &config.Upstream{URL: srv.URL, Credential: "corp-app", CA: ca, HTTP2: config.HTTP2On}
		}
		failing, failingUp := start(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			w.Header().Set("X-Failed-Attempt", "yes")
			w.WriteHeader(http.StatusInternalServerError)
			io.WriteString(w, `{"error":{"code":"InternalServerError","message":"failed"}}`)
		})
		defer failing.Close()
		plain, plainUp := start(func(w http.ResponseWriter, r *http.Request) {
			if h2 != (r.ProtoMajor == 2) {
				t.Errorf("the upstream was called over %s", r.Proto)
			}
			w.Header()["Content-Type"] = nil // not sniffed: no Content-Type at all
			io.WriteString(w, "plain answer")
		})
		defer plain.Close()
		emu, cfg := emulatorConfig(t)
		cfg.Upstreams = map[string]*config.Upstream{"failing": failingUp, "plain": plainUp}
		cfg.Deployments = map[string]*config.Deployment{
			"direct": {Upstream: "plain"},
			"pooled": {Backends: []*config.Backend{
				{Upstream: "failing", Deployment: "d", Priority: 1},
				{Upstream: "plain", Deployment: "d", Priority: 2},
			}},
		}
		cfg.Callers = []*config.Caller{{Name: "c", KeySHA256: hashKey(keyProd), Deployments: []string{"*"}}}
		g := startGateway(t, emu, applyOptions(t, cfg, nil))
		for _, d := range []string{"direct", "pooled"} {
			resp, body := g.do("POST", "/openai/deployments/"+d+"/chat/completions?api-version=1", map[string]string{"api-key": keyProd}, chatBody)
			if resp.StatusCode != 200 || body != "plain answer" {
				t.Fatalf("h2 %v, %s: got %d %q", h2, d, resp.StatusCode, body)
			}
			if ct, ok := resp.Header["Content-Type"]; ok {
				t.Errorf("h2 %v, %s: the caller got Content-Type %q, which the upstream did not send", h2, d, ct)
			}
			if v := resp.Header.Get("X-Failed-Attempt"); v != "" {
				t.Errorf("h2 %v, %s: the failed attempt's header came with the answer", h2, d)
			}
		}
	}
}

// privatePlane starts Entra's emulator and a data plane of its own served over TLS with a
// certificate from a private CA (a private endpoint), offering HTTP/2 if h2.
func privatePlane(t *testing.T, h2 bool) (*emulator.Emulator, *emulator.CA, *emulator.OpenAI) {
	t.Helper()
	emu, err := emulator.Start(emulator.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(emu.Close)
	ca, err := emulator.NewCA()
	if err != nil {
		t.Fatal(err)
	}
	plane, err := emulator.NewOpenAI(emulator.OpenAIOptions{Verifier: emu.Authority, TLS: ca, HTTP2: h2})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(plane.Close)
	return emu, ca, plane
}

func TestUpstreamWithPrivateCA(t *testing.T) {
	emu, private, plane := privatePlane(t, false)
	build := func(ca []byte) *gateway {
		cfg := config.Default()
		cfg.SpareConnections = 0 // the counts below are of the calls' own connections
		cfg.Credentials = corpApp(emu)
		cfg.Upstreams = map[string]*config.Upstream{"private": {URL: plane.URL(), Credential: "corp-app", CA: ca}}
		cfg.Callers = []*config.Caller{{Name: "c", KeySHA256: hashKey(keyProd), Deployments: []string{"*"}}}
		return startGateway(t, emu, applyOptions(t, cfg, nil))
	}
	path := "/openai/deployments/gpt-4o/chat/completions?api-version=1"
	g := build(private.CertPEM())
	for range 2 {
		if resp, body := g.do("POST", path, map[string]string{"api-key": keyProd}, chatBody); resp.StatusCode != 200 {
			t.Errorf("with the upstream's ca_file: got %d %s, want 200", resp.StatusCode, body)
		}
	}
	// The metrics show the one connection, kept alive, and its full handshake.
	origin := plane.URL()
	want := fmt.Sprintf(`# HELP tokenproxy_upstream_connections_opened_total Connections opened to an upstream origin, by TLS handshake: full, resumed (a resumed TLS session), or none (plain http).
# TYPE tokenproxy_upstream_connections_opened_total counter
tokenproxy_upstream_connections_opened_total{origin=%[1]q,tls="full"} 1
tokenproxy_upstream_connections_opened_total{origin=%[1]q,tls="resumed"} 0
# HELP tokenproxy_upstream_idle_connections Idle keep-alive connections kept to an upstream origin.
# TYPE tokenproxy_upstream_idle_connections gauge
tokenproxy_upstream_idle_connections{origin=%[1]q} 1
# HELP tokenproxy_upstream_spare_dial_failures_total Spare connections (spare_connections) that could not be dialled to an upstream origin; the next call then dials for itself.
# TYPE tokenproxy_upstream_spare_dial_failures_total counter
tokenproxy_upstream_spare_dial_failures_total{origin=%[1]q} 0
`, origin)
	if err := testutil.GatherAndCompare(g.reg, strings.NewReader(want), "tokenproxy_upstream_connections_opened_total", "tokenproxy_upstream_idle_connections", "tokenproxy_upstream_spare_dial_failures_total"); err != nil {
		t.Error(err)
	}
	if resp, _ := build(nil).do("POST", path, map[string]string{"api-key": keyProd}, chatBody); resp.StatusCode != 502 {
		t.Errorf("without it: got %d, want 502 (the certificate is not trusted)", resp.StatusCode)
	}
}

// With http2, calls to an upstream that chooses HTTP/2 share one connection, streams
// included, and everything else holds: the caller's key stays behind, the broker's token goes
// with each call, and a caller that goes away cancels its stream upstream.
func TestUpstreamHTTP2(t *testing.T) {
	emu, ca, plane := privatePlane(t, true)
	cfg := config.Default()
	cfg.Credentials = corpApp(emu)
	cfg.Upstreams = map[string]*config.Upstream{"h2": {URL: plane.URL(), Credential: "corp-app", CA: ca.CertPEM(), HTTP2: config.HTTP2On}}
	cfg.Callers = []*config.Caller{{Name: "c", KeySHA256: hashKey(keyProd), Deployments: []string{"*"}}}
	g := startGateway(t, emu, applyOptions(t, cfg, nil))
	path := "/openai/deployments/gpt-4o/chat/completions?api-version=1"

	for range 3 {
		if resp, body := g.do("POST", path, map[string]string{"api-key": keyProd}, chatBody); resp.StatusCode != 200 || !strings.Contains(body, `"chat.completion"`) {
			t.Fatalf("got %d %s, want 200", resp.StatusCode, body)
		}
	}
	head, body := rawCall(t, g, strings.Replace(streamRequest("HTTP/1.1", "h2-stream"), chatPath, path, 1))
	events, err := io.ReadAll(httputil.NewChunkedReader(strings.NewReader(body)))
	if !strings.HasPrefix(head, "HTTP/1.1 200") || err != nil || !strings.HasSuffix(string(events), "data: [DONE]\n\n") {
		t.Fatalf("stream: %q %q %v", head, events, err)
	}

	cancelMidStream(t, g, plane, path)

	for _, r := range plane.Requests() {
		if r.Proto != "HTTP/2.0" || r.Header.Get("Api-Key") != "" || r.Claims.ObjectID == "" {
			t.Errorf("upstream saw %s api-key=%q claims=%+v, want HTTP/2, no caller key and the broker's token", r.Proto, r.Header.Get("Api-Key"), r.Claims)
		}
	}
	origin := plane.URL()
	want := fmt.Sprintf(`# HELP tokenproxy_upstream_connections_opened_total Connections opened to an upstream origin, by TLS handshake: full, resumed (a resumed TLS session), or none (plain http).
# TYPE tokenproxy_upstream_connections_opened_total counter
tokenproxy_upstream_connections_opened_total{origin=%[1]q,tls="full"} 1
tokenproxy_upstream_connections_opened_total{origin=%[1]q,tls="resumed"} 0
# HELP tokenproxy_upstream_http2_connections HTTP/2 connections open to an upstream origin (upstreams.NAME.http2), each carrying many calls.
# TYPE tokenproxy_upstream_http2_connections gauge
tokenproxy_upstream_http2_connections{origin=%[1]q} 1
`, origin)
	if err := testutil.GatherAndCompare(g.reg, strings.NewReader(want), "tokenproxy_upstream_connections_opened_total", "tokenproxy_upstream_http2_connections"); err != nil {
		t.Error(err)
	}
}

// By default (http2: streams), a call that asks for an event stream offers HTTP/2 and the others
// go over HTTP/1.1, to the same upstream; with http2: off, none offers it.
func TestUpstreamHTTP2ForStreams(t *testing.T) {
	for _, tc := range []struct {
		setting               config.HTTP2Mode
		plainWant, streamWant string
	}{
		{"", "HTTP/1.1", "HTTP/2.0"},
		{config.HTTP2Streams, "HTTP/1.1", "HTTP/2.0"},
		{config.HTTP2Off, "HTTP/1.1", "HTTP/1.1"},
	} {
		t.Run("http2="+string(tc.setting), func(t *testing.T) {
			emu, ca, plane := privatePlane(t, true)
			cfg := config.Default()
			cfg.Credentials = corpApp(emu)
			cfg.Upstreams = map[string]*config.Upstream{"u": {URL: plane.URL(), Credential: "corp-app", CA: ca.CertPEM(), HTTP2: tc.setting}}
			cfg.Callers = []*config.Caller{{Name: "c", KeySHA256: hashKey(keyProd), Deployments: []string{"*"}}}
			g := startGateway(t, emu, applyOptions(t, cfg, nil))
			path := "/openai/deployments/gpt-4o/chat/completions?api-version=1"

			for _, body := range []string{chatBody, `{"stream": false, "messages":[{"role":"user","content":"hi"}]}`} {
				if resp, got := g.do("POST", path, map[string]string{"api-key": keyProd}, body); resp.StatusCode != 200 || !strings.Contains(got, `"chat.completion"`) {
					t.Fatalf("plain call: got %d %s, want 200", resp.StatusCode, got)
				}
			}
			for _, body := range []string{`{"stream":true,"messages":[{"role":"user","content":"hi"}]}`, `{"messages":[{"role":"user","content":"hi"}], "stream" : true}`} {
				resp, got := g.do("POST", path, map[string]string{"api-key": keyProd}, body)
				if resp.StatusCode != 200 || !strings.HasSuffix(got, "data: [DONE]\n\n") {
					t.Fatalf("stream: got %d %q, want 200 and the events", resp.StatusCode, got)
				}
			}
			cancelMidStream(t, g, plane, path)

			reqs := plane.Requests()
			if len(reqs) != 5 {
				t.Fatalf("the upstream saw %d calls, want 5", len(reqs))
			}
			for i, r := range reqs {
				want := tc.plainWant
				if i >= 2 {
					want = tc.streamWant
				}
				if r.Proto != want || r.Header.Get("Api-Key") != "" || r.Claims.ObjectID == "" {
					t.Errorf("call %d: upstream saw %s api-key=%q claims=%+v, want %s, no caller key and the broker's token", i, r.Proto, r.Header.Get("Api-Key"), r.Claims, want)
				}
			}
		})
	}
}

func TestAllowUnauthenticated(t *testing.T) {
	g := newGateway(t, func(c *config.Config) { c.AllowUnauthenticated = true })
	if resp, body := g.do("POST", "/openai/deployments/gpt-4o/chat/completions?api-version=1", nil, chatBody); resp.StatusCode != 200 {
		t.Errorf("a call without a key got %d %s, want 200 with allow_unauthenticated", resp.StatusCode, body)
	}
	if resp, _ := g.do("POST", chatPath, map[string]string{"api-key": "mistyped"}, chatBody); resp.StatusCode != 401 {
		t.Errorf("an unknown key got %d, want 401 even with allow_unauthenticated", resp.StatusCode)
	}
	if resp, _ := g.do("POST", "/openai/deployments/gpt-4o/chat/completions?api-version=1", map[string]string{"api-key": keyProd}, chatBody); resp.StatusCode != 403 {
		t.Errorf("a known caller got %d outside its allow-list, want 403", resp.StatusCode)
	}
	if !strings.Contains(g.logs.String(), `"caller":"anonymous"`) {
		t.Error("the anonymous call is not logged as such")
	}
}

func TestRejectedCallsNeverReachUpstreamOrBroker(t *testing.T) {
	g := newGateway(t, func(c *config.Config) { c.MaxRequestBytes = 1024 })
	big := `{"messages":[{"role":"user","content":"` + strings.Repeat("x", 2000) + `"}]}`
	tests := []struct {
		name       string
		method     string
		path       string
		header     map[string]string
		body       string
		chunked    bool
		wantStatus int
		wantCode   string
	}{
		{"no key", "POST", chatPath, nil, chatBody, false, 401, CodeUnauthorized},
		{"unknown key", "POST", chatPath, map[string]string{"api-key": "nope"}, chatBody, false, 401, CodeUnauthorized},
		{"conflicting keys", "POST", chatPath, map[string]string{"api-key": keyProd, "Authorization": "Bearer " + keyAdmin}, chatBody, false, 401, CodeUnauthorized},
		{"basic auth", "POST", chatPath, map[string]string{"Authorization": "Basic " + keyProd}, chatBody, false, 401, CodeUnauthorized},
		{"unknown key on v1", "POST", "/openai/v1/chat/completions", map[string]string{"api-key": "nope"}, `{"model":"gpt-4o"}`, false, 401, CodeUnauthorized},
		{"deployment not allowed", "POST", "/openai/deployments/gpt-4o/chat/completions?api-version=1", map[string]string{"api-key": keyProd}, chatBody, false, 403, CodeForbidden},
		{"unknown deployment, restricted caller", "POST", "/openai/deployments/nope/chat/completions?api-version=1", map[string]string{"api-key": keyProd}, chatBody, false, 403, CodeForbidden},
		{"unknown deployment", "POST", "/openai/deployments/nope/chat/completions?api-version=1", map[string]string{"api-key": keyAdmin}, chatBody, false, 404, CodeDeploymentNotFound},
		{"v1 model not allowed", "POST", "/openai/v1/chat/completions", map[string]string{"api-key": keyProd}, `{"model":"gpt-4o"}`, false, 403, CodeForbidden},
		{"unknown route", "POST", "/openai/whatever", map[string]string{"api-key": keyAdmin}, chatBody, false, 404, CodeNotFound},
		{"root", "GET", "/", nil, "", false, 404, CodeNotFound},
		{"missing api-version", "POST", "/openai/deployments/gpt-4.1-mini/chat/completions", map[string]string{"api-key": keyProd}, chatBody, false, 400, CodeMissingAPIVersion},
		{"dot segments", "POST", "/openai/deployments/gpt-4.1-mini/../gpt-4o/chat/completions?api-version=1", map[string]string{"api-key": keyProd}, chatBody, false, 400, CodeInvalidPath},
		{"encoded slash", "POST", "/openai/deployments/gpt-4.1-mini%2F..%2Fgpt-4o/chat/completions?api-version=1", map[string]string{"api-key": keyProd}, chatBody, false, 400, CodeInvalidPath},
		{"double slash", "POST", "/openai/deployments//gpt-4.1-mini/chat/completions?api-version=1", map[string]string{"api-key": keyProd}, chatBody, false, 400, CodeInvalidPath},
		{"too large (Content-Length)", "POST", chatPath, map[string]string{"api-key": keyProd}, big, false, 413, CodeRequestTooLarge},
		{"too large (chunked)", "POST", chatPath, map[string]string{"api-key": keyProd}, big, true, 413, CodeRequestTooLarge},
		{"too large (v1)", "POST", "/openai/v1/chat/completions", map[string]string{"api-key": keyAdmin}, big, false, 413, CodeRequestTooLarge},
		{"too large (chunked, v1)", "POST", "/openai/v1/chat/completions", map[string]string{"api-key": keyAdmin}, big, true, 413, CodeRequestTooLarge},
		{"invalid JSON", "POST", "/openai/v1/chat/completions", map[string]string{"api-key": keyAdmin}, `{"model":`, false, 400, CodeInvalidBody},
		{"duplicate model", "POST", "/openai/v1/chat/completions", map[string]string{"api-key": keyProd}, `{"model":"gpt-4.1-mini","model":"gpt-4o"}`, false, 400, CodeInvalidBody},
		{"escaped duplicate model", "POST", "/openai/v1/chat/completions", map[string]string{"api-key": keyProd}, `{"model":"gpt-4.1-mini","mod\u0065l":"gpt-4o"}`, false, 400, CodeInvalidBody},
		{"model not a string", "POST", "/openai/v1/chat/completions", map[string]string{"api-key": keyAdmin}, `{"model":7}`, false, 400, CodeInvalidBody},
		{"no model, restricted caller", "POST", "/openai/v1/chat/completions", map[string]string{"api-key": keyProd}, `{"messages":[]}`, false, 400, CodeMissingModel},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var body io.Reader
			if tt.body != "" {
				body = strings.NewReader(tt.body)
				if tt.chunked {
					body = io.MultiReader(strings.NewReader(tt.body)) // unknown length: sent chunked
				}
			}
			req, _ := http.NewRequestWithContext(t.Context(), tt.method, g.url+tt.path, body)
			for k, v := range tt.header {
				req.Header.Set(k, v)
			}
			resp, err := g.client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tt.wantStatus {
				t.Fatalf("got %d %s, want %d", resp.StatusCode, b, tt.wantStatus)
			}
			var e errorBody
			if err := json.Unmarshal(b, &e); err != nil || e.Error.Code != tt.wantCode || e.Error.Message == "" {
				t.Errorf("got body %s, want an Azure-shaped error with code %q", b, tt.wantCode)
			}
			if resp.Header.Get("x-tokenproxy-error") != tt.wantCode || resp.Header.Get("x-ms-client-request-id") == "" {
				t.Errorf("got headers %v, want x-tokenproxy-error and x-ms-client-request-id", resp.Header)
			}
		})
	}
	if n := len(g.emu.OpenAI.Requests()); n != 0 {
		t.Errorf("rejected calls reached the upstream %d times, want 0", n)
	}
	if n := g.tokensRequested(); n != 0 {
		t.Errorf("rejected calls made %d token requests, want 0 (the broker must not be touched)", n)
	}
}

func TestBearerKeyConvention(t *testing.T) {
	g := newGateway(t)
	resp, body := g.do("POST", chatPath, map[string]string{"Authorization": "Bearer " + keyProd}, chatBody)
	if resp.StatusCode != 200 {
		t.Fatalf("got %d %s, want 200 with the OpenAI SDK's Authorization: Bearer", resp.StatusCode, body)
	}
}

func TestBodyRoutedCalls(t *testing.T) {
	g := newGateway(t)
	tests := []struct {
		name, path, key, body string
		wantUpstreamPath      string
		wantModel             string
	}{
		{"v1 chat, renamed", "/openai/v1/chat/completions", keyProd,
			`{"model":"gpt-4.1-mini","messages":[{"role":"user","content":"hi"}]}`,
			"/openai/v1/chat/completions", "deploy-gpt-4.1"},
		{"v1 chat, escaped model key, renamed", "/openai/v1/chat/completions", keyProd,
			`{"messages":[{"role":"user","content":"hi"}], "mod\u0065l" : "gpt-4.1-mini" }`,
			"/openai/v1/chat/completions", "deploy-gpt-4.1"},
		{"v1 embeddings", "/openai/v1/embeddings", keyAdmin,
			`{"input":"hello","model":"text-embedding-3-small"}`,
			"/openai/v1/embeddings", "text-embedding-3-small"},
		{"foundry models", "/models/chat/completions?api-version=2024-05-01-preview", keyAdmin,
			`{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}`,
			"/models/chat/completions", "gpt-4o"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := len(g.emu.OpenAI.Requests())
			resp, body := g.do("POST", tt.path, map[string]string{"api-key": tt.key}, tt.body)
			if resp.StatusCode != 200 {
				t.Fatalf("got %d %s, want 200", resp.StatusCode, body)
			}
			up := g.emu.OpenAI.Requests()[n]
			if up.Path != tt.wantUpstreamPath {
				t.Errorf("upstream path %q, want %q", up.Path, tt.wantUpstreamPath)
			}
			var m struct{ Model string }
			json.Unmarshal(up.Body, &m)
			if m.Model != tt.wantModel {
				t.Errorf("upstream model %q, want %q", m.Model, tt.wantModel)
			}
			if tt.wantModel == strings.TrimSpace(m.Model) && !strings.Contains(tt.body, `"`+tt.wantModel+`"`) {
				// Renamed: everything but the model token must be byte-identical.
				want := strings.Replace(tt.body, `"gpt-4.1-mini"`, `"deploy-gpt-4.1"`, 1)
				if string(up.Body) != want {
					t.Errorf("upstream body %s, want %s", up.Body, want)
				}
			}
		})
	}

	t.Run("missing api-version on /models", func(t *testing.T) {
		resp, _ := g.do("POST", "/models/chat/completions", map[string]string{"api-key": keyAdmin}, `{"model":"gpt-4o"}`)
		if resp.StatusCode != 400 {
			t.Errorf("got %d, want 400", resp.StatusCode)
		}
	})
	t.Run("multipart model", func(t *testing.T) {
		var buf strings.Builder
		mw := multipart.NewWriter(&buf)
		mw.WriteField("model", "gpt-4o")
		fw, _ := mw.CreateFormFile("file", "a.wav")
		fw.Write([]byte("RIFF...."))
		mw.Close()
		resp, _ := g.do("POST", "/openai/v1/audio/transcriptions", map[string]string{"api-key": keyProd, "Content-Type": mw.FormDataContentType()}, buf.String())
		if resp.StatusCode != 403 {
			t.Errorf("multipart call to a deployment the caller may not use got %d, want 403", resp.StatusCode)
		}
	})
}

func TestModellessCalls(t *testing.T) {
	g := newGateway(t)
	// GET /openai/v1/models names no deployment: only a caller allowed everything may make it.
	if resp, _ := g.do("GET", "/openai/v1/models", map[string]string{"api-key": keyProd}, ""); resp.StatusCode != 403 {
		t.Errorf("restricted caller got %d, want 403", resp.StatusCode)
	}
	resp, body := g.do("GET", "/openai/v1/models", map[string]string{"api-key": keyAdmin}, "")
	if resp.StatusCode != 200 || !strings.Contains(body, `"object":"list"`) || len(g.emu.OpenAI.Requests()) != 1 {
		t.Errorf("admin caller got %d %s and %d upstream requests, want it forwarded", resp.StatusCode, body, len(g.emu.OpenAI.Requests()))
	}
}

// A body's model authorises only the calls whose deployment the upstream takes from it. On any
// other call of the body-routed routes it is no authority: a caller allowed one deployment who
// adds it to the body of a call on another caller's stored response, or on the resource's
// files, is refused as a caller naming no deployment, and nothing goes upstream.
func TestModelInABodyAuthorisesOnlyModelCalls(t *testing.T) {
	g := newGateway(t)
	restricted := map[string]string{"api-key": keyProd}
	for _, c := range []struct{ method, path string }{
		{"GET", "/openai/v1/models"},
		{"GET", "/openai/v1/responses/resp_of_another_caller"},
		{"POST", "/openai/v1/responses/resp_of_another_caller/cancel"},
		{"DELETE", "/openai/v1/files/file-of-another-caller"},
		{"GET", "/openai/v1/chat/completions"},
		{"POST", "/openai/v1/batches"},
		{"GET", "/models/info?api-version=2024-05-01-preview"},
	} {
		resp, body := g.do(c.method, c.path, restricted, `{"model":"gpt-4.1-mini"}`)
		if resp.StatusCode != 403 || !strings.Contains(body, "names no deployment") {
			t.Errorf("%s %s: got %d %s, want 403", c.method, c.path, resp.StatusCode, body)
		}
	}
	if n := len(g.emu.OpenAI.Requests()); n != 0 {
		t.Errorf("%d calls went upstream, want none", n)
	}
	// The calls that go by the model still do.
	resp, body := g.do("POST", "/openai/v1/chat/completions", restricted, `{"model":"gpt-4.1-mini","messages":[{"role":"user","content":"hi"}]}`)
	if resp.StatusCode != 200 {
		t.Errorf("a chat completion naming its deployment in the body: got %d %s, want 200", resp.StatusCode, body)
	}
}

// Only the methods Azure's data plane uses are forwarded: a hop that answers TRACE would echo
// the request, bearer token and all, back to the caller.
func TestOnlyDataPlaneMethodsAreForwarded(t *testing.T) {
	g := newGateway(t)
	for _, m := range []string{"TRACE", "TRACK", "OPTIONS", "PUT", "PATCH", "PROPFIND"} {
		resp, body := g.do(m, "/openai/deployments/gpt-4.1-mini/chat/completions?api-version=2024-10-21", map[string]string{"api-key": keyProd}, "")
		if resp.StatusCode != 405 || resp.Header.Get("Allow") != "GET, HEAD, POST, DELETE" || !strings.Contains(body, "MethodNotAllowed") {
			t.Errorf("%s: got %d (Allow %q) %s, want 405", m, resp.StatusCode, resp.Header.Get("Allow"), body)
		}
	}
	if n := len(g.emu.OpenAI.Requests()); n != 0 {
		t.Errorf("%d calls went upstream, want none", n)
	}
}

func TestPassthroughWithoutDeployments(t *testing.T) {
	g := newGateway(t, func(c *config.Config) {
		c.Deployments = nil
		c.Callers[0].Deployments = []string{"deploy-gpt-4.1"}
	})
	resp, body := g.do("POST", "/openai/deployments/deploy-gpt-4.1/chat/completions?api-version=1", map[string]string{"api-key": keyProd}, chatBody)
	if resp.StatusCode != 200 {
		t.Fatalf("got %d %s, want 200", resp.StatusCode, body)
	}
	if resp, _ := g.do("POST", "/openai/deployments/gpt-4o/chat/completions?api-version=1", map[string]string{"api-key": keyProd}, chatBody); resp.StatusCode != 403 {
		t.Errorf("got %d for a deployment outside the allow-list, want 403", resp.StatusCode)
	}
	if resp, _ := g.do("POST", "/openai/deployments/gpt-4o/chat/completions?api-version=1", map[string]string{"api-key": keyAdmin}, chatBody); resp.StatusCode != 200 {
		t.Errorf("admin got %d, want 200 (name passed through)", resp.StatusCode)
	}
}

// readEvents reads up to max SSE data lines.
func readEvents(t *testing.T, body io.Reader, max int) []string {
	t.Helper()
	var events []string
	sc := bufio.NewScanner(body)
	for len(events) < max && sc.Scan() {
		if d, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
			events = append(events, d)
		}
	}
	return events
}

func TestStreamingIsNotBuffered(t *testing.T) {
	g := newGateway(t)
	// The upstream sends each event only when the test releases it, so every event must reach
	// the caller while the upstream is still holding the next one back: a gateway that buffered
	// (for a size, a time, or the whole response) would leave the caller waiting here.
	gate := make(chan struct{})
	g.emu.OpenAI.SetStreamGate(gate)
	defer close(gate) // on failure, let the held-back stream finish so the servers can close
	req, _ := http.NewRequestWithContext(t.Context(), "POST", g.url+chatPath,
		strings.NewReader(`{"stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}`))
	req.Header.Set("api-key", keyProd)
	// Headers and events are read in the background so a gateway holding anything back fails
	// the wait below rather than hanging the test.
	events := make(chan string, 100)
	go func() {
		defer close(events)
		resp, err := g.client.Do(req)
		if err != nil {
			t.Error(err)
			return
		}
		defer resp.Body.Close()
		if resp.Header.Get("Content-Type") != "text/event-stream; charset=utf-8" || resp.ContentLength != -1 {
			t.Errorf("got Content-Type %q, length %d; want an unbounded event stream", resp.Header.Get("Content-Type"), resp.ContentLength)
		}
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			if d, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
				events <- d
			}
		}
	}()
	var got []string
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				t.Fatalf("the stream ended after %q without [DONE]", got)
			}
			got = append(got, ev)
		case <-time.After(10 * time.Second):
			t.Fatalf("event %d did not arrive while the upstream held back the next one: the gateway is buffering", len(got)+1)
		}
		if got[len(got)-1] == "[DONE]" {
			break
		}
		select { // release the next event
		case gate <- struct{}{}:
		case <-time.After(10 * time.Second):
			t.Fatalf("the upstream stopped after event %d", len(got))
		}
	}
	if len(got) < 6 || !strings.Contains(got[len(got)-2], `"usage"`) {
		t.Errorf("got events %q, want chunks, a usage chunk and [DONE]", got)
	}
}

func TestClientCancelReachesUpstream(t *testing.T) {
	g := newGateway(t)
	cancelMidStream(t, g, g.emu.OpenAI, chatPath)
}

// cancelMidStream opens a stream through g that plane holds open, goes away after its first
// event, and fails t unless plane sees its call cancelled.
func cancelMidStream(t *testing.T, g *gateway, plane *emulator.OpenAI, path string) {
	t.Helper()
	plane.SetStreamGate(make(chan struct{})) // a stream that never ends on its own
	ctx, cancel := context.WithCancel(t.Context())
	req, _ := http.NewRequestWithContext(ctx, "POST", g.url+path, strings.NewReader(`{"stream":true,"messages":[{"role":"user","content":"hi"}]}`))
	req.Header.Set("api-key", keyProd)
	resp, err := g.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if events := readEvents(t, resp.Body, 1); len(events) != 1 {
		t.Fatalf("got %d events, want the first one", len(events))
	}
	cancel()
	resp.Body.Close()
	for { // calls that finished before it may come first
		select {
		case r := <-plane.Finished():
			if r.Canceled {
				return
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the upstream call was not cancelled after the caller went away")
		}
	}
}

func TestTokenUnavailableIs503WithReason(t *testing.T) {
	g := newGateway(t, func(c *config.Config) { c.Credentials["corp-app"].ClientSecret = "wrong-secret-value" })
	resp, body := g.do("POST", chatPath, map[string]string{"api-key": keyProd}, chatBody)
	if resp.StatusCode != 503 {
		t.Fatalf("got %d %s, want 503", resp.StatusCode, body)
	}
	var e errorBody
	json.Unmarshal([]byte(body), &e)
	for _, want := range []string{`upstream "eastca"`, `credential "corp-app"`, "AADSTS7000215", "Secret ID"} {
		if e.Error.Code != CodeTokenUnavailable || !strings.Contains(e.Error.Message, want) {
			t.Errorf("got %s, want code TokenUnavailable and a message with %q", body, want)
		}
	}
	if strings.Contains(body, "wrong-secret-value") {
		t.Error("the error body contains the client secret")
	}
	if len(g.emu.OpenAI.Requests()) != 0 {
		t.Error("a call without a token reached the upstream")
	}
}

func TestUpstreamFailures(t *testing.T) {
	t.Run("unreachable is 502", func(t *testing.T) {
		g := newGateway(t, func(c *config.Config) { c.Upstreams["eastca"].URL = "http://127.0.0.1:1" })
		resp, body := g.do("POST", chatPath, map[string]string{"api-key": keyProd}, chatBody)
		if resp.StatusCode != 502 || !strings.Contains(body, CodeUpstreamUnreachable) {
			t.Errorf("got %d %s, want 502 UpstreamUnreachable", resp.StatusCode, body)
		}
	})
	t.Run("response header timeout is 504", func(t *testing.T) {
		g := newGateway(t, func(c *config.Config) { c.Timeouts.ResponseHeader = 200 * time.Millisecond })
		g.emu.OpenAI.SetLatency(5 * time.Second)
		resp, body := g.do("POST", chatPath, map[string]string{"api-key": keyProd}, chatBody)
		if resp.StatusCode != 504 || !strings.Contains(body, CodeUpstreamTimeout) {
			t.Errorf("got %d %s, want 504 UpstreamTimeout", resp.StatusCode, body)
		}
	})
	t.Run("upstream errors pass through", func(t *testing.T) {
		g := newGateway(t)
		g.emu.OpenAI.InjectFault(emulator.Fault{Status: 429, RetryAfter: 2 * time.Second, Count: 1})
		resp, body := g.do("POST", chatPath, map[string]string{"api-key": keyProd}, chatBody)
		if resp.StatusCode != 429 || resp.Header.Get("retry-after-ms") != "2000" || resp.Header.Get("retry-after") != "2" || resp.Header.Get("x-tokenproxy-error") != "" {
			t.Errorf("got %d %v %s, want Azure's 429 with its retry-after headers", resp.StatusCode, resp.Header, body)
		}
	})
}

func TestConcurrentColdRequestsMakeOneTokenRequest(t *testing.T) {
	g := newGateway(t)
	const n = 200
	errs := make(chan error, n)
	for range n {
		go func() {
			req, _ := http.NewRequestWithContext(t.Context(), "POST", g.url+chatPath, strings.NewReader(chatBody))
			req.Header.Set("api-key", keyProd)
			resp, err := g.client.Do(req)
			if err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					err = fmt.Errorf("status %d", resp.StatusCode)
				}
			}
			errs <- err
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if got := g.tokensRequested(); got != 1 {
		t.Errorf("%d concurrent cold calls made %d token requests, want 1", n, got)
	}
}

func TestStreamRelaysEveryByte(t *testing.T) {
	// Events of every size around the relay's small buffer (512 bytes) and its borrowed one
	// (16 KiB), sent in pieces that split events and chunk headers, flushed at random: the
	// caller must get exactly the bytes the upstream sent, in order, and the end of the stream.
	var want bytes.Buffer
	rng := rand.New(rand.NewPCG(1, 2))
	for i, size := range []int{1, 100, 511, 512, 513, 1000, 4096, 16383, 16384, 16385, 40000, 3, 70000} {
		fmt.Fprintf(&want, "data: {\"i\":%d,\"content\":\"%s\"}\n\n", i, strings.Repeat(string(rune('a'+i)), size))
	}
	want.WriteString("data: [DONE]\n\n")
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		rest := want.Bytes()
		for len(rest) > 0 {
			n := min(len(rest), 1+rng.IntN(3000))
			w.Write(rest[:n])
			if rng.IntN(2) == 0 {
				w.(http.Flusher).Flush()
			}
			rest = rest[n:]
		}
	}))
	defer up.Close()
	g := newGateway(t, func(c *config.Config) { c.Upstreams["eastca"].URL = up.URL })
	resp, body := g.do("POST", chatPath, map[string]string{"api-key": keyProd}, `{"stream":true,"messages":[]}`)
	if resp.StatusCode != 200 || resp.ContentLength != -1 {
		t.Fatalf("got %d, length %d; want 200 and a chunked stream", resp.StatusCode, resp.ContentLength)
	}
	if body != want.String() {
		i := 0
		for i < min(len(body), want.Len()) && body[i] == want.String()[i] {
			i++
		}
		t.Fatalf("the caller got %d bytes, the upstream sent %d; they differ from byte %d", len(body), want.Len(), i)
	}
}

// TestConcurrentBodiesStayApart sends calls with bodies of many sizes at once: each must reach
// the upstream as it was sent, though the buffers bodies are read into are reused.
func TestConcurrentBodiesStayApart(t *testing.T) {
	g := newGateway(t)
	const calls = 48
	var wg sync.WaitGroup
	for i := range calls {
		wg.Go(func() {
			filler := strings.Repeat(string(rune('a'+i%26)), i*i*40) // up to ~90 KB
			body := fmt.Sprintf(`{"messages":[{"role":"user","content":"call %d %s"}]}`, i, filler)
			resp, got := g.do("POST", chatPath, map[string]string{"api-key": keyProd, "x-ms-client-request-id": fmt.Sprintf("call-%d", i)}, body)
			if resp.StatusCode != 200 {
				t.Errorf("call %d: status %d: %s", i, resp.StatusCode, got)
			}
		})
	}
	wg.Wait()
	seen := 0
	for _, r := range g.emu.OpenAI.Requests() {
		var i int
		if _, err := fmt.Sscanf(r.Header.Get("x-ms-client-request-id"), "call-%d", &i); err != nil {
			continue
		}
		seen++
		want := fmt.Sprintf(`{"messages":[{"role":"user","content":"call %d %s"}]}`, i, strings.Repeat(string(rune('a'+i%26)), i*i*40))
		if string(r.Body) != want {
			t.Errorf("call %d reached the upstream with another body (%d bytes, want %d)", i, len(r.Body), len(want))
		}
	}
	if seen != calls {
		t.Fatalf("the upstream saw %d of the %d calls", seen, calls)
	}
}

// A body's model that cannot be a deployment name is not quoted back at any length: before, a
// megabyte of bytes that are not UTF-8 came back three times over, in the answer and the log.
// A member that is "model" but for case is refused, as a parser matching names without regard
// to case could take it for the model.
func TestBodyModelsThatCannotBe(t *testing.T) {
	g := newGateway(t)
	hdr := map[string]string{"api-key": keyProd}
	for _, tc := range []struct{ name, body, want string }{
		{"a megabyte", `{"model":"` + strings.Repeat("\x80", 1<<20) + `"}`, "too long to be a deployment name"},
		{"just too long", `{"model":"` + strings.Repeat("a", 400) + `"}`, "too long to be a deployment name"},
		{"invalid, short", `{"model":"` + strings.Repeat("\x80", 100) + `"}`, "is not a valid deployment name"},
		{"in another case", `{"model":"gpt-4.1-mini","Model":"gpt-4o"}`, `a member named \"model\" in another case`},
		{"in another case, first", `{"MODEL":"gpt-4o","model":"gpt-4.1-mini"}`, `a member named \"model\" in another case`},
	} {
		before := len(g.logs.String())
		resp, body := g.do("POST", "/openai/v1/chat/completions", hdr, tc.body)
		if resp.StatusCode != 400 || !strings.Contains(body, tc.want) || len(body) > 1024 {
			t.Errorf("%s: got %d, %d bytes: %.300s; want 400 saying %s", tc.name, resp.StatusCode, len(body), body, tc.want)
		}
		if n := len(g.logs.String()) - before; n > 4096 {
			t.Errorf("%s: the log grew by %d bytes", tc.name, n)
		}
	}
	if n := len(g.emu.OpenAI.Requests()); n != 0 {
		t.Errorf("%d calls went upstream, want none", n)
	}
}
