package proxy

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/valyala/fasthttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/tokenproxy/tokenproxy/internal/broker"
	"github.com/tokenproxy/tokenproxy/internal/callertoken"
	"github.com/tokenproxy/tokenproxy/internal/config"
	"github.com/tokenproxy/tokenproxy/internal/transport"
)

// chatResponse is a ~1 KB chat.completion, the size the benchmark suite uses.
var chatResponse = `{"id":"chatcmpl-bench","object":"chat.completion","created":1730746163,"model":"gpt-4.1-mini-2025-04-14","choices":[{"index":0,"message":{"role":"assistant","content":"` +
	strings.Repeat("x", 700) + `","refusal":null},"finish_reason":"stop"}],"usage":{"prompt_tokens":17,"completion_tokens":959,"total_tokens":976}}`

type staticFetcher struct{}

func (staticFetcher) Fetch(context.Context, string) (broker.Token, error) {
	return broker.Token{Value: "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9." + strings.Repeat("a", 1400) + ".sig", ExpiresOn: time.Now().Add(time.Hour)}, nil
}

// benchHandler is the gateway doing its full job (key check, routing, allow-list, token,
// header hygiene, metrics, an info-level JSON access log) in front of the upstream at upURL,
// with its token already held.
func benchHandler(b testing.TB, upURL string) (*Handler, *config.Config) {
	b.Helper()
	cfg := config.Default()
	cfg.Credentials = map[string]*config.Credential{"c": {Type: config.TypeManagedIdentity}}
	cfg.Upstreams = map[string]*config.Upstream{"eastca": {URL: upURL, Credential: "c"}}
	cfg.Deployments = map[string]*config.Deployment{"gpt-4.1-mini": {Upstream: "eastca", Deployment: "deploy-gpt-4.1"}}
	cfg.Callers = []*config.Caller{{Name: "a360-prod", KeySHA256: hashKey(keyProd), Deployments: []string{"gpt-4.1-mini"}}}
	cfg.ApplyDefaults()
	br, _ := broker.New(broker.Options{Fetchers: map[string]broker.Fetcher{"c": staticFetcher{}}})
	src, _ := br.Source("c", config.DefaultScope)
	if _, err := src.Token(context.Background()); err != nil {
		b.Fatal(err)
	}
	// The log as the gateway writes it: JSON, the access log through the handler's encoder.
	log := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(LogEncoderConfig()), zapcore.AddSync(io.Discard), zap.InfoLevel)).Named("access")
	h, err := New(Options{Config: cfg, Sources: map[string]broker.TokenSource{"eastca": src}, Logger: log, AccessLog: io.Discard, Registerer: prometheus.NewRegistry()})
	if err != nil {
		b.Fatal(err)
	}
	return h, cfg
}

// benchGateway is benchHandler served on loopback in front of a fixed upstream.
func benchGateway(b *testing.B) (string, *http.Client) {
	b.Helper()
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("apim-request-id", "6a1b2c3d-0000-4000-8000-000000000000")
		w.Header().Set("x-ms-region", "Canada East")
		io.WriteString(w, chatResponse)
	}))
	b.Cleanup(up.Close)
	h, cfg := benchHandler(b, up.URL)
	url, client := serve(b, h, cfg)
	return url, client
}

// BenchmarkRoundTrip is a whole proxied call through real sockets: caller → gateway → upstream.
func BenchmarkRoundTrip(b *testing.B) {
	gw, client := benchGateway(b)
	url := gw + chatPath
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			req, _ := http.NewRequest("POST", url, strings.NewReader(chatBody))
			req.Header.Set("api-key", keyProd)
			req.Header.Set("Content-Type", "application/json")
			resp, err := client.Do(req)
			if err != nil {
				b.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				b.Fatalf("status %d", resp.StatusCode)
			}
		}
	})
}

// fixedUpstream answers every request as the benchmark's upstream does, in process.
type fixedUpstream struct{}

var chatResponseBytes = []byte(chatResponse)

func (fixedUpstream) Send(_ context.Context, _ time.Time, _ transport.Origin, _ *transport.Request, _ string, resp *fasthttp.Response) (*transport.Stream, error) {
	resp.SetStatusCode(200)
	resp.Header.SetContentType("application/json")
	resp.Header.Set("Apim-Request-Id", "6a1b2c3d-0000-4000-8000-000000000000")
	resp.Header.Set("X-Ms-Region", "Canada East")
	resp.SetBodyRaw(chatResponseBytes)
	return nil, nil
}

// BenchmarkHandler is the gateway's own cost per call, without sockets: parsing aside, every
// step a proxied call takes (key check, routing, allow-list, token, header rewrite, response
// clean-up, metrics, an info-level JSON access log), against an in-process upstream.
func BenchmarkHandler(b *testing.B) {
	call := handlerCall(b)
	b.ReportAllocs()
	for b.Loop() {
		call()
	}
}

// BenchmarkHandlerParallel is BenchmarkHandler on every core at once (run it with -cpu 1,2,...):
// how the gateway's own work scales with cores. Each goroutine is a connection of its own; all
// share the handler, its caller keys, token, backends, metrics and access log, as calls do.
func BenchmarkHandlerParallel(b *testing.B) {
	h, _ := benchHandler(b, "https://eastca.openai.azure.com")
	h.Close()
	h.transport = fixedUpstream{}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		call := handlerCallOn(b, h)
		for pb.Next() {
			call()
		}
	})
}

// handlerAllocs is the most a proxied call may allocate in the handler: the call's state (a
// request ID it generates included), its path and query as strings, and the caller's credential
// as a string (the README's Performance section says what each is for).
const handlerAllocs = 3

// TestHandlerAllocations holds the handler to handlerAllocs. The race detector's pools drop
// objects at random, which changes the count, so it is taken only without the detector (CI runs
// this test on its own for that).
func TestHandlerAllocations(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts are not kept under the race detector")
	}
	if n := testing.AllocsPerRun(1000, handlerCall(t)); n > handlerAllocs {
		t.Fatalf("a proxied call allocates %v times in the handler, more than its budget of %d", n, handlerAllocs)
	}
}

// handlerCall returns a function that has the handler serve one proxied chat call, as a
// caller's request arrives, against an in-process upstream, and checks that it succeeded.
func handlerCall(tb testing.TB) func() {
	h, _ := benchHandler(tb, "https://eastca.openai.azure.com")
	h.Close()
	h.transport = fixedUpstream{}
	return handlerCallOn(tb, h)
}

// handlerCallOn is handlerCall on h, with a request context of its own.
func handlerCallOn(tb testing.TB, h *Handler) func() {
	body := []byte(chatBody)
	var fc fasthttp.RequestCtx
	fc.Init(&fasthttp.Request{}, &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 50000}, nil)
	return func() {
		fc.Request.Reset()
		fc.Response.Reset()
		fc.Request.Header.SetMethod("POST")
		fc.Request.SetRequestURI(chatPath)
		fc.Request.Header.Set("Api-Key", keyProd)
		fc.Request.Header.SetContentType("application/json")
		fc.Request.Header.Set("User-Agent", "AzureOpenAI/Python 1.54.0")
		fc.Request.SetBodyRaw(body)
		h.ServeFastHTTP(&fc)
		if fc.Response.StatusCode() != 200 {
			tb.Fatalf("status %d: %s", fc.Response.StatusCode(), fc.Response.Body())
		}
	}
}

func BenchmarkCheckPath(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		if checkPath("/openai/deployments/gpt-4.1-mini/chat/completions") != nil {
			b.Fatal("rejected")
		}
	}
}

func BenchmarkAuthenticate(b *testing.B) {
	cfg := config.Default()
	cfg.Callers = []*config.Caller{{Name: "a360-prod", KeySHA256: hashKey(keyProd), Deployments: []string{"gpt-4.1-mini"}}}
	cfg.ApplyDefaults()
	k, _ := newCallers(cfg, &loads{}, callertoken.NewRegistry(callertoken.Options{}))
	var h fasthttp.RequestHeader
	h.Set("Api-Key", keyProd)
	h.Set("Content-Type", "application/json")
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := k.authenticate(&h, nil); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkJSONModel(b *testing.B) {
	body := []byte(`{"messages":[{"role":"system","content":"` + strings.Repeat("be brief ", 60) + `"},{"role":"user","content":"some prompt query"}],"model":"gpt-4.1-mini","max_completion_tokens":500}`)
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	for b.Loop() {
		if ref, err := jsonModel(body); err != nil || ref.name != "gpt-4.1-mini" {
			b.Fatal(ref, err)
		}
	}
}

// BenchmarkAsksForStream is the scan that sends a call asking for a stream over HTTP/2 (http2:
// streams): the suite's plain body, a stream's, and a 600-byte prompt without the member.
func BenchmarkAsksForStream(b *testing.B) {
	for name, body := range map[string]string{
		"plain":  `{"messages":[{"role":"user","content":"hello"}],"max_tokens":50}`,
		"stream": `{"stream":true,"messages":[{"role":"user","content":"hello"}]}`,
		"long":   `{"messages":[{"role":"system","content":"` + strings.Repeat("be brief ", 60) + `"},{"role":"user","content":"some prompt query"}],"max_completion_tokens":500}`,
	} {
		b.Run(name, func(b *testing.B) {
			want, body := name == "stream", []byte(body)
			b.ReportAllocs()
			for b.Loop() {
				if asksForStream(body) != want {
					b.Fatal(body)
				}
			}
		})
	}
}

func BenchmarkRewrite(b *testing.B) {
	origin, _ := transport.NewOrigin("https://genaitemplateplatformeastca.openai.azure.com")
	up := &upstream{name: "eastca", origin: origin}
	var in fasthttp.Request
	var out transport.Request
	in.Header.SetMethod("POST")
	in.Header.SetRequestURI(chatPath)
	in.Header.Set("Api-Key", keyProd)
	in.Header.SetContentType("application/json")
	in.Header.Set("User-Agent", "AzureOpenAI/Python 1.54.0")
	body := []byte(chatBody)
	b.ReportAllocs()
	for b.Loop() {
		rewrite(&out, &in.Header, up, []byte("/openai/deployments/deploy-gpt-4.1/chat/completions"), "api-version=2025-01-01-preview", body, "6a1b2c3d-0000-4000-8000-000000000000", []byte(keyProd), keyProd, nil)
	}
}

// BenchmarkSeries is what counting a call in its four series costs, through client_golang's
// lookup and through the handler's cache of series.
func BenchmarkSeries(b *testing.B) {
	m := newMetrics(false, map[string]bool{"gpt-4.1-mini": true}, nil)
	b.Run("client_golang", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			m.requests.WithLabelValues("a360-prod", "gpt-4.1-mini", "200").Inc()
			m.duration.WithLabelValues("gpt-4.1-mini").Observe(0.01)
			m.upstreamLatency.WithLabelValues("eastca").Observe(0.01)
			m.attempts.WithLabelValues("eastca/deploy-gpt-4.1", "200").Inc()
		}
	})
	b.Run("cache", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			m.requestsFor("a360-prod", "gpt-4.1-mini", "200").Inc()
			m.durationFor("gpt-4.1-mini").Observe(0.01)
			m.latencyFor("eastca").Observe(0.01)
			m.attemptsFor("eastca/deploy-gpt-4.1", "200").Inc()
		}
	})
}
