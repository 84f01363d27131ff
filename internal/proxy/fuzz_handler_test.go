package proxy

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"maps"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
	"golang.org/x/net/http/httpguts"

	"github.com/tokenproxy/tokenproxy/internal/broker"
	"github.com/tokenproxy/tokenproxy/internal/config"
	"github.com/tokenproxy/tokenproxy/internal/transport"
)

// recordingUpstream answers every request with a small chat.completion and remembers what it got.
type recordingUpstream struct {
	mu   sync.Mutex
	seen []recorded
}

type recorded struct {
	host    string
	uri     string
	headers map[string][]string
}

// What it records is what the transport sends, as the upstream parses it: req's head, with
// authorization as its Authorization header. Two parsers read the head, fasthttp's and
// net/http's (which Azure's front ends are closer to in strictness), and must read the same
// fields: a head two parsers read differently is how requests are smuggled.
func (u *recordingUpstream) Send(_ context.Context, _ time.Time, o transport.Origin, req *transport.Request, authorization string, resp *fasthttp.Response) (*transport.Stream, error) {
	raw := req.AppendHead(nil, authorization)
	var head fasthttp.RequestHeader
	if err := head.Read(bufio.NewReader(bytes.NewReader(raw))); err != nil {
		panic(fmt.Sprintf("the upstream request's head does not parse: %v\n%q", err, raw))
	}
	r := recorded{host: o.Host(), uri: string(head.RequestURI()), headers: map[string][]string{}}
	for k, v := range head.All() {
		name := strings.ToLower(string(k))
		r.headers[name] = append(r.headers[name], string(v))
	}
	std, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(raw)))
	if err != nil {
		panic(fmt.Sprintf("net/http does not parse the upstream request's head: %v\n%q", err, raw))
	}
	fields := map[string][]string{"host": {std.Host}}
	for k, vs := range std.Header {
		// As net/http's server checks them (ReadRequest alone lets a space in a name through).
		if !httpguts.ValidHeaderFieldName(k) {
			panic(fmt.Sprintf("the upstream request has a malformed header name %q:\n%q", k, raw))
		}
		for _, v := range vs {
			if !httpguts.ValidHeaderFieldValue(v) {
				panic(fmt.Sprintf("the upstream request's %s has a malformed value:\n%q", k, raw))
			}
		}
		fields[strings.ToLower(k)] = vs
	}
	if std.RequestURI != r.uri || !maps.EqualFunc(fields, r.headers, slices.Equal) {
		panic(fmt.Sprintf("the parsers read the upstream request's head differently:\n%q\nfasthttp %s %v\nnet/http %s %v", raw, r.uri, r.headers, std.RequestURI, fields))
	}
	u.mu.Lock()
	u.seen = append(u.seen, r)
	u.mu.Unlock()
	resp.SetStatusCode(200)
	resp.Header.SetContentType("application/json")
	resp.SetBodyString(`{"object":"chat.completion"}`)
	return nil, nil
}

// countingSource hands out a fixed token and counts the requests for it.
type countingSource struct {
	calls atomic.Int64
	tok   *broker.Token
}

func (s *countingSource) TokenAt(context.Context, time.Time) (*broker.Token, error) {
	s.calls.Add(1)
	return s.tok, nil
}

var fuzzKeys = []string{keyProd, keyAdmin, keyGen}

// fuzzHandler is a gateway with two upstreams (one deployment renamed), a restricted and an
// unrestricted caller, a recording upstream and a counting token source.
func fuzzHandler(t testing.TB) (*Handler, *recordingUpstream, *countingSource, map[string]bool) {
	t.Helper()
	cfg := config.Default()
	cfg.Credentials = map[string]*config.Credential{"c": {Type: config.TypeManagedIdentity}}
	cfg.Upstreams = map[string]*config.Upstream{
		"eastca":  {URL: "https://eastca.openai.azure.com", Credential: "c"},
		"foundry": {URL: "https://foundry.services.ai.azure.com/api/projects/p", Credential: "c"},
	}
	cfg.Deployments = map[string]*config.Deployment{
		"gpt-4.1-mini": {Upstream: "eastca", Deployment: "deploy-gpt-4.1"},
		"gpt-4o":       {Upstream: "foundry"},
	}
	cfg.Callers = []*config.Caller{
		{Name: "a360-prod", KeySHA256: hashKey(keyProd), Deployments: []string{"gpt-4.1-mini"}},
		{Name: "admin", KeySHA256: hashKey(keyAdmin), Deployments: []string{"*"}},
	}
	withKeyGen(cfg)
	cfg.ApplyDefaults()
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	up := &recordingUpstream{}
	br, _ := broker.New(broker.Options{Fetchers: map[string]broker.Fetcher{"c": staticFetcher{}}})
	s, _ := br.Source("c", config.DefaultScope)
	tok, err := s.Token(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	src := &countingSource{tok: tok}
	h, err := New(Options{Config: cfg, Sources: map[string]broker.TokenSource{"eastca": src, "foundry": src}})
	if err != nil {
		t.Fatal(err)
	}
	h.Close()
	h.transport = up // nothing leaves the process
	return h, up, src, map[string]bool{"eastca.openai.azure.com": true, "foundry.services.ai.azure.com": true}
}

func FuzzHandler(f *testing.F) {
	for _, s := range []string{
		"POST /openai/deployments/gpt-4.1-mini/chat/completions?api-version=1 HTTP/1.1\r\nHost: gw\r\nApi-Key: " + keyProd + "\r\nContent-Length: 2\r\n\r\n{}",
		"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + keyAdmin + "\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{\"model\":\"gpt-4o\"}",
		"POST /models/chat/completions?api-version=1&api-key=" + keyAdmin + " HTTP/1.1\r\nHost: gw\r\nApi-Key: " + keyAdmin + "\r\nCookie: s=1\r\nContent-Length: 17\r\n\r\n{\"model\":\"gpt-4o\"}",
		"POST /openai/deployments/gpt-4.1-mini/../gpt-4o/chat/completions?api-version=1 HTTP/1.1\r\nHost: gw\r\nApi-Key: " + keyProd + "\r\n\r\n",
		"POST /openai/deployments/gpt-4o%2F..%2Fx/chat HTTP/1.1\r\nHost: gw\r\nApi-Key: " + keyProd + "\r\n\r\n",
		"POST http://evil.example/openai/deployments/gpt-4o/chat?api-version=1 HTTP/1.1\r\nHost: evil.example\r\nApi-Key: " + keyAdmin + "\r\n\r\n",
		"POST //evil.example/openai/deployments/gpt-4o/chat?api-version=1 HTTP/1.1\r\nHost: gw\r\nApi-Key: " + keyAdmin + "\r\n\r\n",
		"POST /openai/deployments/gpt-4o/chat?api-version=1 HTTP/1.1\r\nHost: gw\r\nApi-Key: " + keyAdmin + "\r\nApi-Key: " + keyProd + "\r\n\r\n",
		"POST /openai/deployments/gpt-4o/chat?api-version=1 HTTP/1.1\r\nHost: gw\r\nAPI-KEY:   " + keyAdmin + "   \r\nauthorization: bearer " + keyAdmin + "\r\n\r\n",
		"POST /openai/v1/chat HTTP/1.1\r\nHost: gw\r\nApi-Key: " + keyProd + "\r\nContent-Length: 44\r\n\r\n{\"model\":\"gpt-4.1-mini\",\"model\":\"gpt-4o\"}  ",
		"POST /openai/v1/chat HTTP/1.1\r\nHost: gw\r\nApi-Key: " + keyProd + "\r\nContent-Length: 30\r\n\r\n{\"mod\\u0065l\":\"gpt-4.1-mini\"}",
		"GET /openai/v1/models HTTP/1.1\r\nHost: gw\r\nApi-Key: " + keyAdmin + "\r\n\r\n",
		"POST /openai/deployments/gpt-4o/chat?api-version=1 HTTP/1.1\r\nHost: gw\r\nConnection: X-Secret\r\nX-Secret: " + keyAdmin + "\r\nApi-Key: " + keyAdmin + "\r\n\r\n",
		"POST /openai/deployments/gpt-4o/chat?api-version=1 HTTP/1.1\r\nHost: gw\r\nX-Ms-Client-Request-Id: " + keyAdmin + "\r\nApi-Key: " + keyAdmin + "\r\n\r\n",
		"POST /openai/deployments/" + strings.Repeat("a", 200) + "/chat?api-version=1 HTTP/1.1\r\nHost: gw\r\nApi-Key: " + keyAdmin + "\r\n\r\n",
		"POST /openai/deployments/gpt-4.1-mini/chat?api-version=1&x=0" + keyGen + " HTTP/1.1\r\nHost: gw\r\nApi-Key: " + keyGen + "\r\nX-A: 0" + keyProd + "\r\nX-B: 0" + keyAdmin + "0\r\n\r\n",
		"POST /openai/v1/" + keyProd + "/x HTTP/1.1\r\nHost: gw\r\nApi-Key: " + keyAdmin + "\r\nX-Ms-Client-Request-Id: " + keyGen + "\r\nContent-Length: 17\r\n\r\n{\"model\":\"gpt-4o\"}",
		"POST /openai/deployments/gpt-4o/chat?api-version=1 HTTP/1.1\r\nHost: gw\r\nApi-Key: " + keyAdmin + "\r\nX Bad: v\r\nX-Tab:\ta\tb \r\n\r\n",
		"POST /openai/deployments/gpt-4o/chat?api-version=1&pair=a," + keyProd + "&x=1 HTTP/1.1\r\nHost: gw\r\nApi-Key: " + keyAdmin + "\r\n\r\n",
		"POST /openai/deployments/gpt-4o/chat?api-version=1&%74" + keyProd[1:] + "&x=%74" + keyAdmin[1:] + "%zz HTTP/1.1\r\nHost: gw\r\nApi-Key: " + keyAdmin + "\r\n" + keyAdmin + ": 1\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	h, up, src, origins := fuzzHandler(f)
	f.Fuzz(func(t *testing.T, raw []byte) {
		var req fasthttp.Request
		if err := req.Read(bufio.NewReader(bytes.NewReader(raw))); err != nil {
			return // the server would have refused it before the handler
		}
		up.mu.Lock()
		before := len(up.seen)
		up.mu.Unlock()
		calls := src.calls.Load()

		var fc fasthttp.RequestCtx
		fc.Init(&req, &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}, nil)
		h.ServeFastHTTP(&fc)

		if code := fc.Response.StatusCode(); code == 500 {
			t.Fatalf("500 for %q: %s", raw, fc.Response.Body())
		}
		up.mu.Lock()
		sent := append([]recorded(nil), up.seen[before:]...)
		up.mu.Unlock()
		authenticated := false
		for _, k := range fuzzKeys {
			if bytes.Contains(raw, []byte(k)) {
				authenticated = true
			}
		}
		if !authenticated && (len(sent) > 0 || src.calls.Load() != calls) {
			t.Fatalf("a request without a valid key reached the upstream or the broker: %q", raw)
		}
		for _, r := range sent {
			if !origins[r.host] {
				t.Fatalf("a request went to %q: %q", r.host, raw)
			}
			// The framing and the Host are the gateway's own: once each, whatever the caller sent.
			if got := r.headers["host"]; len(got) != 1 || got[0] != r.host {
				t.Fatalf("upstream Host %q, want %q: %q", got, r.host, raw)
			}
			if len(r.headers["content-length"]) > 1 || len(r.headers["transfer-encoding"]) > 0 {
				t.Fatalf("upstream framing Content-Length %q, Transfer-Encoding %q: %q", r.headers["content-length"], r.headers["transfer-encoding"], raw)
			}
			if got := r.headers["authorization"]; len(got) != 1 || got[0] != "Bearer "+src.tok.Value {
				t.Fatalf("upstream Authorization %q is not the gateway's token", got)
			}
			// The key presented, and any generated key, must not be anywhere; another
			// caller's key of another shape not as a value or a field of one (the gateway
			// knows keys only by hash, and so not where one glued to other text would end).
			anywhere := map[string]bool{keyGen: true}
			for _, k := range fuzzKeys {
				for _, name := range []string{"Api-Key", "Authorization"} {
					for _, v := range req.Header.PeekAll(name) {
						anywhere[k] = anywhere[k] || bytes.Contains(v, []byte(k))
					}
				}
			}
			leaked := func(v string) bool {
				for _, k := range fuzzKeys {
					if anywhere[k] && strings.Contains(v, k) || !anywhere[k] && holdsField(v, k) {
						return true
					}
				}
				return false
			}
			for name, vs := range r.headers {
				for _, k := range fuzzKeys {
					// Names arrive case-folded: the key presented is looked for without case.
					if anywhere[k] && strings.Contains(strings.ToLower(name), strings.ToLower(k)) {
						t.Fatalf("a caller key reached the upstream as the header name %s: %q", name, raw)
					}
				}
				for _, v := range vs {
					if leaked(v) {
						t.Fatalf("a caller key reached the upstream in %s: %q", name, raw)
					}
				}
			}
			path, query, _ := strings.Cut(r.uri, "?")
			for _, part := range strings.Split(path, "/") {
				if leaked(part) {
					t.Fatalf("a caller key reached the upstream in the URI %q", r.uri)
				}
			}
			// A parameter's name and value, each as it is and as a lenient decoder reads it.
			for part := range strings.SplitSeq(query, "&") {
				k, v, _ := strings.Cut(part, "=")
				if leaked(part) || leaked(lenientUnescape(k)) || leaked(lenientUnescape(v)) {
					t.Fatalf("a caller key reached the upstream in the URI %q", r.uri)
				}
			}
			for _, banned := range []string{"api-key", "cookie", "ocp-apim-subscription-key"} {
				if _, ok := r.headers[banned]; ok {
					t.Fatalf("upstream got a %s header: %q", banned, raw)
				}
			}
		}
	})
}

// holdsField reports whether v is k, or has k as a field (split at spaces, commas, semicolons and
// tabs) or as what follows an '=' in one.
func holdsField(v, k string) bool {
	for _, f := range append(strings.FieldsFunc(v, func(r rune) bool { return strings.ContainsRune(" ,;\t", r) }), v) {
		if _, after, _ := strings.Cut(f, "="); f == k || after == k {
			return true
		}
	}
	return false
}
