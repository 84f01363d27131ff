package proxy

import (
	"bufio"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/valyala/fasthttp"

	"github.com/tokenproxy/tokenproxy/internal/config"
	"github.com/tokenproxy/tokenproxy/internal/transport"
)

func TestRewriteDropsHeaders(t *testing.T) {
	// Every dropped header goes, whatever its case, and so do those the caller's Connection
	// headers name (all of them, not only the first's); the rest stay.
	raw := "POST /openai/deployments/x/chat HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n" +
		"User-Agent: sdk\r\nX-Custom: keep me\r\nConnection: keep-alive, X-Hop\r\nX-Hop: hop\r\n" +
		"connection: x-hop2 ,,X-Hop3\r\nX-Hop2: hop\r\nX-Hop3: hop\r\nConnection: close, X-Hop4\r\nX-Hop4: hop\r\n"
	for _, k := range dropRequestHeaders {
		if k != "Connection" && k != "Transfer-Encoding" {
			raw += strings.ToUpper(k) + ": v\r\n"
		}
	}
	raw += "Content-Length: 2\r\n\r\n{}"
	var in fasthttp.Request
	if err := in.Read(bufio.NewReader(strings.NewReader(raw))); err != nil {
		t.Fatal(err)
	}
	origin, _ := transport.NewOrigin("https://eastca.openai.azure.com")
	var req transport.Request
	rewrite(&req, &in.Header, &upstream{origin: origin}, []byte("/openai/deployments/y/chat"), "api-version=1", []byte("{}"), "rid", nil, "", nil)
	out := upstreamHead(t, &req)
	// The caller's Authorization goes too: the bearer token is the transport's to write.
	for _, k := range append(dropRequestHeaders, "X-Hop", "X-Hop2", "X-Hop3", "X-Hop4") {
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

// upstreamHead is req's head as the upstream reads it, through fasthttp's parser: its fields
// must parse, each field once.
func upstreamHead(t *testing.T, req *transport.Request) *fasthttp.Request {
	t.Helper()
	raw := string(req.AppendHead(nil, ""))
	var out fasthttp.Request
	if err := out.Header.Read(bufio.NewReader(strings.NewReader(raw))); err != nil {
		t.Fatalf("the upstream request's head does not parse: %v\n%s", err, raw)
	}
	seen := map[string]bool{}
	for k := range out.Header.All() {
		if seen[string(k)] {
			t.Errorf("%s sent twice", k)
		}
		seen[string(k)] = true
	}
	return &out
}

func TestCleanResponse(t *testing.T) {
	raw := "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nApim-Request-Id: a1\r\nConnection: X-Hop\r\nX-Hop: hop\r\n" +
		"Connection: X-Hop2\r\nX-Hop2: hop\r\n"
	for _, k := range dropResponseHeaders {
		if k != "Connection" {
			raw += strings.ToLower(k) + ": v\r\n"
		}
	}
	raw += "Content-Length: 2\r\n\r\n{}"
	for _, tt := range []struct {
		name, extra, wantID, wantRegion string
	}{
		{"without a request ID", "", "rid", ""},
		{"with the upstream's", "X-Ms-Client-Request-Id: theirs\r\nx-ms-region: Canada East\r\n", "theirs", "Canada East"},
		{"with an empty one", "X-Ms-Client-Request-Id:\r\nX-Ms-Client-Request-Id: second\r\n", "rid", ""},
		// Headers a Connection header lists go, whatever they are, and are not logged.
		{"with hop-by-hop ones", "X-Ms-Client-Request-Id: theirs\r\nX-Ms-Region: r\r\nConnection: x-ms-region, X-MS-CLIENT-REQUEST-ID\r\n", "rid", ""},
	} {
		var resp fasthttp.Response
		if err := resp.Read(bufio.NewReader(strings.NewReader(strings.Replace(raw, "\r\n\r\n", "\r\n"+tt.extra+"\r\n", 1)))); err != nil {
			t.Fatal(err)
		}
		apimID, region := cleanResponse(&resp.Header, "rid")
		if string(apimID) != "a1" || string(region) != tt.wantRegion {
			t.Errorf("%s: logged Apim-Request-Id %q and X-Ms-Region %q, want %q and %q", tt.name, apimID, region, "a1", tt.wantRegion)
		}
		if got := string(resp.Header.Peek("X-Ms-Region")); got != tt.wantRegion {
			t.Errorf("%s: X-Ms-Region = %q, want %q", tt.name, got, tt.wantRegion)
		}
		for _, k := range append(dropResponseHeaders, "X-Hop", "X-Hop2") {
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

// testKeyCallers is a set of callers, one for each key given.
func testKeyCallers(t *testing.T, keys ...string) *callers {
	t.Helper()
	cfg := config.Default()
	for i, k := range keys {
		cfg.Callers = append(cfg.Callers, &config.Caller{Name: fmt.Sprintf("c%d", i), KeySHA256: hashKey(k), Deployments: []string{config.AllDeployments}})
	}
	cfg.ApplyDefaults()
	cs, err := newCallers(cfg, &loads{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

// TestNotKeysCache: values found to be no key are remembered, keys never are, a value is known
// only by itself (not by another that shares its slot), and a reload starts afresh.
func TestNotKeysCache(t *testing.T) {
	cs := testKeyCallers(t, keyProd, keyAdmin)
	for range 3 {
		if cs.isKey([]byte("AzureOpenAI/Python 1.54.0")) {
			t.Fatal("a User-Agent taken for a key")
		}
		if !cs.isKey([]byte(keyProd)) || !cs.isKey([]byte(keyAdmin)) {
			t.Fatal("a key not found")
		}
	}
	if !cs.notKeys.has([]byte("AzureOpenAI/Python 1.54.0")) {
		t.Error("a value found to be no key was not remembered")
	}
	if cs.notKeys.has([]byte(keyProd)) || cs.notKeys.has([]byte(keyAdmin)) {
		t.Error("a key was remembered as no key")
	}
	long := []byte(strings.Repeat("x", notKeyMax+1))
	if cs.isKey(long) || cs.notKeys.has(long) {
		t.Error("a value longer than notKeyMax was remembered")
	}

	// A value that is no key, and a key that falls in the same slots: the key is still found.
	keyA, keyB := cs.notKeys.slotsOf([]byte(keyProd))
	other := sharingSlots(cs.notKeys, func(a, b *atomic.Pointer[string]) bool { return a == keyA && b == keyB })
	if cs.isKey(other) || !cs.notKeys.has(other) {
		t.Fatalf("%q: not remembered", other)
	}
	if cs.notKeys.has([]byte(keyProd)) || !cs.isKey([]byte(keyProd)) {
		t.Error("a key was taken for the value in its slots")
	}

	// Two values a client sends on every call, one in a slot the other may take too: both stay
	// known, rather than push each other out on every call (hashed and copied again each time).
	fresh := testKeyCallers(t, keyProd)
	first := []byte("AzureOpenAI/Python 1.54.0")
	firstA, _ := fresh.notKeys.slotsOf(first)
	// second's first slot is first's, its other is not.
	second := sharingSlots(fresh.notKeys, func(a, b *atomic.Pointer[string]) bool { return a == firstA && b != firstA })
	for range 3 {
		for _, v := range [][]byte{first, second} {
			if fresh.isKey(v) {
				t.Fatalf("%q taken for a key", v)
			}
		}
	}
	if !fresh.notKeys.has(first) || !fresh.notKeys.has(second) {
		t.Errorf("of two values sharing a slot, one was forgotten: %q %v, %q %v",
			first, fresh.notKeys.has(first), second, fresh.notKeys.has(second))
	}

	// After a reload that makes a remembered value a key, it is one.
	value := []byte("rotated-key-0123456789")
	if cs.isKey(value) {
		t.Fatal("not a key yet")
	}
	if !testKeyCallers(t, keyProd, string(value)).isKey(value) {
		t.Error("a value remembered by the callers before a reload was not a key after it")
	}
}

// TestNotKeysConcurrent: calls looking for keys at once (run with -race) all get it right.
func TestNotKeysConcurrent(t *testing.T) {
	cs := testKeyCallers(t, keyProd)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 2000 {
				v := fmt.Sprintf("value-%d-%d", g, i%300)
				if cs.isKey([]byte(v)) {
					t.Errorf("%q taken for a key", v)
					return
				}
				if !cs.isKey([]byte(keyProd)) {
					t.Error("the key not found")
					return
				}
			}
		})
	}
	wg.Wait()
}

// sharingSlots returns a value (not a key) whose two slots in n are as match wants them.
func sharingSlots(n *notKeys, match func(a, b *atomic.Pointer[string]) bool) []byte {
	for i := 0; ; i++ {
		v := []byte(fmt.Sprintf("not-a-key-%d", i))
		if match(n.slotsOf(v)) {
			return v
		}
	}
}

func TestWordAndHeaderSets(t *testing.T) {
	for _, w := range routeWords.all {
		if !routeWords.has(w) {
			t.Errorf("route word %q not found", w)
		}
		if routeWords.has(strings.ToUpper(w)) || routeWords.has(w[1:]) || routeWords.has(w+"s") {
			t.Errorf("a word that is not %q found as a route word", w)
		}
	}
	if routeWords.has(strings.Repeat("deployments", 4)) || routeWords.has("") {
		t.Error("a long or empty word found as a route word")
	}
	for i, n := range dropResponseHeaders {
		for _, k := range []string{n, strings.ToLower(n), strings.ToUpper(n)} {
			if got := notReturned.find([]byte(k)); got != 1<<i {
				t.Errorf("find(%q) = %b, want %b", k, got, 1<<i)
			}
		}
	}
	for _, k := range []string{"", "Content-Type", "Connectio", "Connections", strings.Repeat("Connection", 4)} {
		if got := notReturned.find([]byte(k)); got != 0 {
			t.Errorf("find(%q) = %b, want 0", k, got)
		}
	}
}
