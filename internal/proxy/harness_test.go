package proxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/tokenproxy/tokenproxy/internal/broker"
	"github.com/tokenproxy/tokenproxy/internal/broker/entra"
	"github.com/tokenproxy/tokenproxy/internal/config"
	"github.com/tokenproxy/tokenproxy/internal/emulator"
)

// Keys of the test callers.
const (
	keyProd  = "tp-test-key-prod-0123456789abcdef" // may use gpt-4.1-mini
	keyAdmin = "tp-test-key-admin-0123456789abcde" // may use everything
	// keyGen has the shape of the keys proxy hash-key --generate makes; withKeyGen adds its caller.
	keyGen = "tpk_test-generated-key-0123456789abcdefghijklmn"
)

// withKeyGen adds caller "batch", with key keyGen, allowed gpt-4.1-mini.
func withKeyGen(c *config.Config) {
	c.Callers = append(c.Callers, &config.Caller{Name: "batch", KeySHA256: hashKey(keyGen), Deployments: []string{"gpt-4.1-mini"}})
}

func hashKey(k string) string {
	s := sha256.Sum256([]byte(k))
	return hex.EncodeToString(s[:])
}

// gateway is a Handler wired as `proxy serve` wires it: real broker, real azidentity client
// secret credential, the emulator as Entra and as the upstream.
type gateway struct {
	t       *testing.T
	emu     *emulator.Emulator
	cfg     *config.Config
	broker  *broker.Broker
	handler *Handler
	url     string
	client  *http.Client
	reg     *prometheus.Registry
	logs    *syncBuffer
	clock   *testClock
}

// testClock is the wall clock plus an offset tests move forward to skip cooldowns and open
// circuits without waiting.
type testClock struct{ offset atomic.Int64 }

func (c *testClock) now() time.Time          { return time.Now().Add(time.Duration(c.offset.Load())) }
func (c *testClock) advance(d time.Duration) { c.offset.Add(int64(d)) }

type gatewayOption func(*config.Config)

func newGateway(t *testing.T, opts ...gatewayOption) *gateway {
	t.Helper()
	emu, cfg := emulatorConfig(t)
	cfg.Upstreams = map[string]*config.Upstream{"eastca": {URL: emu.OpenAI.URL(), Credential: "corp-app"}}
	if upstreamTLS() {
		cfg.Upstreams["eastca"].CA = emu.OpenAI.CA().CertPEM()
	}
	if upstreamHTTP2() {
		cfg.Upstreams["eastca"].HTTP2 = config.HTTP2On
	}
	cfg.Deployments = map[string]*config.Deployment{
		"gpt-4.1-mini":           {Upstream: "eastca", Deployment: "deploy-gpt-4.1"},
		"gpt-4o":                 {Upstream: "eastca"},
		"text-embedding-3-small": {Upstream: "eastca"},
	}
	cfg.Callers = []*config.Caller{
		{Name: "a360-prod", KeySHA256: hashKey(keyProd), Deployments: []string{"gpt-4.1-mini"}},
		{Name: "admin", KeySHA256: hashKey(keyAdmin), Deployments: []string{"*"}},
	}
	return startGateway(t, emu, applyOptions(t, cfg, opts))
}

// upstreamMode is how the tests reach the emulator's data plane, from TOKENPROXY_TEST_UPSTREAM
// (.ci/run runs this package each way):
//   - "": plain http;
//   - "tls": behind TLS, offering HTTP/2, with newGateway's upstream at the http2 default
//     (streams over HTTP/2, other calls over HTTP/1.1);
//   - "http2": the same, with http2: on (every call over HTTP/2).
//
// Upstreams a test points at a plain-http server of its own stay HTTP/1.1. The variable is read
// while the tests run, not as the package starts, so that go test's cache keys on it.
var upstreamMode = sync.OnceValue(func() string {
	m := os.Getenv("TOKENPROXY_TEST_UPSTREAM")
	if m != "" && m != "tls" && m != "http2" {
		panic("TOKENPROXY_TEST_UPSTREAM=" + m + ": want tls or http2, or nothing")
	}
	return m
})

func upstreamTLS() bool   { return upstreamMode() != "" }
func upstreamHTTP2() bool { return upstreamMode() == "http2" }

// emulatorConfig starts an emulator and returns a configuration whose credential "corp-app"
// is a client secret app registered with it.
func emulatorConfig(t *testing.T) (*emulator.Emulator, *config.Config) {
	t.Helper()
	var opts emulator.Options
	if upstreamTLS() {
		ca, err := emulator.NewCA()
		if err != nil {
			t.Fatal(err)
		}
		opts.OpenAI = emulator.OpenAIOptions{TLS: ca, HTTP2: true}
	}
	emu, err := emulator.Start(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(emu.Close)
	cfg := config.Default()
	cfg.Credentials = corpApp(emu)
	return emu, cfg
}

// corpApp is the credentials of a configuration: "corp-app", emu's client secret app.
func corpApp(emu *emulator.Emulator) map[string]*config.Credential {
	return map[string]*config.Credential{"corp-app": {
		Type: config.TypeClientSecret, TenantID: emu.TenantID, ClientID: emu.ClientID,
		ClientSecret: config.Secret(emu.ClientSecret), AuthorityHost: emu.URL(),
	}}
}

// applyOptions applies a test's changes to cfg, then the defaults, and insists it is valid.
func applyOptions(t *testing.T, cfg *config.Config, opts []gatewayOption) *config.Config {
	t.Helper()
	for _, o := range opts {
		o(cfg)
	}
	for _, u := range cfg.Upstreams {
		if strings.HasPrefix(u.URL, "http://") { // moved to a plain server of the test's own
			u.HTTP2, u.CA = "", nil
		}
	}
	cfg.ApplyDefaults()
	if err := cfg.Validate(); err != nil {
		t.Fatalf("test config: %v", err)
	}
	return cfg
}

func startGateway(t *testing.T, emu *emulator.Emulator, cfg *config.Config) *gateway {
	t.Helper()
	g := &gateway{t: t, emu: emu, cfg: cfg, reg: prometheus.NewPedanticRegistry(), logs: &syncBuffer{}, clock: &testClock{}}
	log := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), zapcore.AddSync(g.logs), zap.DebugLevel))
	fetchers := map[string]broker.Fetcher{}
	for name, c := range cfg.Credentials {
		f, err := entra.New(name, c, entra.Options{HTTPClient: emu.CA().Client()})
		if err != nil {
			t.Fatal(err)
		}
		fetchers[name] = f
	}
	b, err := broker.New(broker.Options{Fetchers: fetchers, Logger: log.Named("broker"), Registerer: g.reg, MinBackoff: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	sources := map[string]broker.TokenSource{}
	for name, u := range cfg.Upstreams {
		if sources[name], err = b.Source(u.Credential, u.Scope); err != nil {
			t.Fatal(err)
		}
	}
	h, err := New(Options{Config: cfg, Sources: sources, Logger: log, Registerer: g.reg, Now: g.clock.now, EntraHTTPClient: emu.CA().Client()})
	if err != nil {
		t.Fatal(err)
	}
	g.broker, g.handler = b, h
	g.url, g.client = serve(t, h, cfg)
	return g
}

// serve runs h on a real server on loopback, as `proxy serve` does, and returns its URL and a
// client for it.
func serve(t testing.TB, h *Handler, cfg *config.Config) (string, *http.Client) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := h.NewServer(cfg)
	done := make(chan struct{})
	go func() { srv.Serve(ln); close(done) }()
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256}}
	t.Cleanup(func() {
		client.CloseIdleConnections()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		<-done
		h.Close()
	})
	return "http://" + ln.Addr().String(), client
}

// newPoolGateway is a gateway whose deployment gpt-4.1-mini is served by n emulated upstreams
// b0 (priority 1) and b1… (priority 2, equal weights), all trusting the same Entra.
func newPoolGateway(t *testing.T, n int, opts ...gatewayOption) (*gateway, []*emulator.OpenAI) {
	t.Helper()
	emu, cfg := emulatorConfig(t)
	cfg.Upstreams = map[string]*config.Upstream{}
	var backends []*config.Backend
	var planes []*emulator.OpenAI
	for i := range n {
		o, err := emulator.NewOpenAI(emulator.OpenAIOptions{Verifier: emu.Authority, Region: fmt.Sprintf("region-%d", i)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(o.Close)
		planes = append(planes, o)
		name := fmt.Sprintf("b%d", i)
		cfg.Upstreams[name] = &config.Upstream{URL: o.URL(), Credential: "corp-app"}
		prio := 2
		if i == 0 {
			prio = 1
		}
		backends = append(backends, &config.Backend{Upstream: name, Deployment: "deploy-gpt-4.1", Priority: prio})
	}
	cfg.Deployments = map[string]*config.Deployment{"gpt-4.1-mini": {Backends: backends}}
	cfg.Callers = []*config.Caller{{Name: "a360-prod", KeySHA256: hashKey(keyProd), Deployments: []string{"*"}}}
	return startGateway(t, emu, applyOptions(t, cfg, opts)), planes
}

// do sends a request to the gateway and returns the response with its body read.
func (g *gateway) do(method, path string, header map[string]string, body string) (*http.Response, string) {
	g.t.Helper()
	return g.doCtx(g.t.Context(), method, path, header, body)
}

func (g *gateway) doCtx(ctx context.Context, method, path string, header map[string]string, body string) (*http.Response, string) {
	g.t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, g.url+path, rd)
	if err != nil {
		g.t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := g.client.Do(req)
	if err != nil {
		g.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		g.t.Fatal(err)
	}
	return resp, string(b)
}

// tokensRequested is how many token requests reached the emulated Entra for the gateway's app.
func (g *gateway) tokensRequested() int { return g.emu.TokenRequests(g.emu.ClientID) }

const chatBody = `{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"some prompt query"}],"max_completion_tokens":500}`

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// serveOwn serves g's handler on a server of the test's own, which the test shuts down; done is
// closed when Serve returns.
func serveOwn(t *testing.T, g *gateway) (srv *Server, addr string, done <-chan struct{}) {
	t.Helper()
	srv = g.handler.NewServer(g.cfg)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { srv.Serve(ln); close(served) }()
	return srv, ln.Addr().String(), served
}
