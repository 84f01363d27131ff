package proxy

import (
	"bufio"
	"context"
	"encoding/json"
	"os"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/common/expfmt"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tokenproxy/tokenproxy/internal/broker"
	"github.com/tokenproxy/tokenproxy/internal/config"
)

// scrape renders the registry as the /metrics endpoint would.
func scrape(t *testing.T, reg *prometheus.Registry) string {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, mf := range mfs {
		expfmt.MetricFamilyToText(&b, mf)
	}
	return b.String()
}

// assertNoSecrets fails if any secret, or a 12-character prefix of one, appears in text.
func assertNoSecrets(t *testing.T, where, text string, secrets []string) {
	t.Helper()
	for _, s := range secrets {
		probes := []string{s}
		if len(s) > 12 {
			probes = append(probes, s[:12])
		}
		for _, p := range probes {
			if strings.Contains(text, p) {
				t.Errorf("%s contains a secret (or its prefix) %q…", where, p[:4])
			}
		}
	}
}

func TestLogsAndMetricsHoldNoSecrets(t *testing.T) {
	g := newGateway(t)
	const strayKey = "sk-stray-key-a-caller-mistyped-1234"
	for _, h := range []map[string]string{
		{"api-key": keyProd},
		{"Authorization": "Bearer " + keyAdmin},
		{"api-key": strayKey},
		{"Authorization": "Bearer " + strayKey, "api-key": keyProd},
	} {
		g.do("POST", chatPath, h, chatBody)
	}
	g.do("POST", chatPath+"&api-key="+strayKey, map[string]string{"api-key": keyProd}, chatBody)
	g.do("POST", "/openai/v1/chat/completions", map[string]string{"api-key": keyProd}, `{"model":"gpt-4.1-mini","stream":true,"messages":[]}`)

	secrets := []string{keyProd, keyAdmin, strayKey, g.emu.ClientSecret}
	for _, r := range g.emu.OpenAI.Requests() {
		tok := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
		parts := strings.Split(tok, ".")
		if len(parts) != 3 {
			t.Fatalf("upstream got a non-JWT token")
		}
		// The JWT header is the same for every token; the payload and signature are unique.
		secrets = append(secrets, tok, parts[1], parts[2])
	}
	if len(secrets) < 8 {
		t.Fatal("no tokens were issued; the test proves nothing")
	}
	logs := g.logs.String()
	if !strings.Contains(logs, `"msg":"request"`) {
		t.Fatal("no access log lines captured")
	}
	assertNoSecrets(t, "the log", logs, secrets)
	assertNoSecrets(t, "the metrics", scrape(t, g.reg), secrets)
	if strings.Contains(logs, "eyJ") {
		t.Error("the log contains something that looks like a JWT")
	}
}

func TestAccessLogLine(t *testing.T) {
	g := newGateway(t)
	resp, _ := g.do("POST", chatPath, map[string]string{"api-key": keyProd}, chatBody)
	var line map[string]any
	sc := bufio.NewScanner(strings.NewReader(g.logs.String()))
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil && m["msg"] == "request" {
			line = m
		}
	}
	if line == nil {
		t.Fatal("no access log line")
	}
	want := map[string]any{
		"request_id":      resp.Header.Get("x-ms-client-request-id"),
		"caller":          "a360-prod",
		"deployment":      "gpt-4.1-mini",
		"upstream":        "eastca",
		"method":          "POST",
		"path":            "/openai/deployments/gpt-4.1-mini/chat/completions",
		"status":          float64(200),
		"api_version":     "2025-01-01-preview",
		"apim_request_id": resp.Header.Get("apim-request-id"),
		"x_ms_region":     "Canada East",
		"bytes_in":        float64(len(chatBody)),
	}
	for k, v := range want {
		if line[k] != v {
			t.Errorf("access log %s = %v, want %v", k, line[k], v)
		}
	}
	for _, k := range []string{"duration", "upstream_duration", "bytes_out"} {
		if _, ok := line[k]; !ok {
			t.Errorf("access log lacks %s", k)
		}
	}
}

func TestGoldenMetrics(t *testing.T) {
	g := newGateway(t)
	g.do("POST", chatPath, map[string]string{"api-key": keyProd}, chatBody)
	g.do("POST", chatPath, map[string]string{"api-key": keyProd}, chatBody)
	g.do("POST", chatPath, map[string]string{"api-key": "wrong"}, chatBody)
	g.do("POST", "/openai/deployments/gpt-4o/chat/completions?api-version=1", map[string]string{"api-key": keyProd}, chatBody)
	g.do("POST", "/openai/v1/embeddings", map[string]string{"api-key": keyAdmin}, `{"model":"text-embedding-3-small","input":"x"}`)
	g.do("GET", "/nowhere", nil, "")

	f, err := os.Open("testdata/metrics.txt")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := testutil.GatherAndCompare(g.reg, f, "tokenproxy_requests_total", "tokenproxy_inflight_requests", "tokenproxy_token_requests_total"); err != nil {
		t.Error(err)
	}
	for name, want := range map[string]int{
		"tokenproxy_request_duration_seconds":  4, // deployments: gpt-4.1-mini, gpt-4o, text-embedding-3-small, ""
		"tokenproxy_upstream_response_seconds": 1, // eastca
	} {
		if got := testutil.CollectAndCount(g.reg, name); got != want {
			t.Errorf("got %d %s series, want %d", got, name, want)
		}
	}
}

type panickingSource struct{}

func (panickingSource) Token(context.Context) (*broker.Token, error) { panic("token source exploded") }

func TestPanicIsRecoveredAs500(t *testing.T) {
	cfg := config.Default()
	cfg.Credentials = map[string]*config.Credential{"c": {Type: config.TypeManagedIdentity}}
	cfg.Upstreams = map[string]*config.Upstream{"u": {URL: "http://127.0.0.1:1", Credential: "c"}}
	cfg.AllowUnauthenticated = true
	cfg.ApplyDefaults()
	core, logs := observer.New(zap.InfoLevel)
	h, err := New(Options{Config: cfg, Sources: map[string]broker.TokenSource{"u": panickingSource{}}, Logger: zap.New(core)})
	if err != nil {
		t.Fatal(err)
	}
	url, client := serve(t, h, cfg)
	resp, err := client.Post(url+"/openai/deployments/d/chat/completions?api-version=1", "application/json", strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 500 || resp.Header.Get("x-tokenproxy-error") != CodeInternal {
		t.Errorf("got %d, want 500 InternalError", resp.StatusCode)
	}
	if logs.FilterMessage("panic serving request").Len() != 1 || logs.FilterMessage("request").Len() != 1 {
		t.Errorf("want the panic and the request logged once each; got %v", logs.All())
	}
}
