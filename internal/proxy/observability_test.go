package proxy

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/common/expfmt"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tokenproxy/tokenproxy/internal/broker"
	"github.com/tokenproxy/tokenproxy/internal/config"
	"github.com/tokenproxy/tokenproxy/internal/secretscan"
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

// assertNoSecrets fails if any secret, or its first characters, appears in text.
func assertNoSecrets(t *testing.T, where, text string, secrets []string) {
	t.Helper()
	if i, which := secretscan.Find(text, secrets); i >= 0 {
		t.Errorf("%s holds secret %d (or its first %d characters) at byte %d", where, which, secretscan.PrefixLen, i)
	}
}

func TestLogsAndMetricsHoldNoSecrets(t *testing.T) {
	// shortKey is short enough to pass for an api-version in the log (32 characters at most).
	const shortKey = "short-key-0123456789"
	g := newGateway(t, func(c *config.Config) {
		c.Callers = append(c.Callers, &config.Caller{Name: "short", KeySHA256: hashKey(shortKey), Deployments: []string{"gpt-4.1-mini"}})
	})
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
	// A key as the api-version: the caller's own, another caller's, and one that is no key.
	const shortStray = "sk-stray-short-0123"
	for _, c := range [][2]string{{shortKey, shortKey}, {keyProd, shortKey}, {shortStray, shortStray}} {
		g.do("POST", "/openai/deployments/gpt-4.1-mini/chat/completions?api-version="+c[1], map[string]string{"api-key": c[0]}, chatBody)
	}
	// A key as the model a body names (the deployment, which is logged): another caller's, the
	// caller's own (glued to other text, as only the caller's own can be found).
	for _, k := range [][2]string{{keyAdmin, keyProd}, {keyAdmin, "x" + keyAdmin}} {
		resp, body := g.do("POST", "/openai/v1/chat/completions", map[string]string{"api-key": k[0]}, `{"model":"`+k[1]+`","messages":[]}`)
		if resp.StatusCode != 400 || !strings.Contains(body, `"code":"`+CodeInvalidBody+`"`) {
			t.Errorf("a key as the model: got %d %s, want 400 %s", resp.StatusCode, body, CodeInvalidBody)
		}
	}
	// Another caller's key in a multipart body's malformed part header, which the multipart
	// reader's error quotes.
	mp := "--b\r\nContent-Disposition: form-data; name=\"model\"\r\n" + keyProd + "\r\n\r\ngpt-4o\r\n--b--\r\n"
	if resp, body := g.do("POST", "/openai/v1/audio/transcriptions", map[string]string{"api-key": keyAdmin, "Content-Type": "multipart/form-data; boundary=b"}, mp); resp.StatusCode != 400 {
		t.Errorf("a malformed multipart body: got %d %s, want 400", resp.StatusCode, body)
	}
	// A key refused, as the request ID, which is logged.
	g.do("POST", chatPath, map[string]string{"api-key": shortStray, "x-ms-client-request-id": shortStray}, chatBody)
	// A key refused, in the path, which is logged.
	g.do("POST", "/openai/deployments/"+strayKey+"/chat/completions?api-version=2025-01-01-preview", map[string]string{"api-key": strayKey}, chatBody)
	g.do("POST", "/openai/v1/chat/completions", map[string]string{"api-key": keyProd}, `{"model":"gpt-4.1-mini","stream":true,"messages":[]}`)

	secrets := []string{keyProd, keyAdmin, strayKey, shortKey, shortStray, g.emu.ClientSecret}
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
	opened := 1 // plain http: one series of connections opened (tls "none")
	if upstreamTLS() {
		opened = 2 // https: full and resumed handshakes
	}
	for name, want := range map[string]int{
		"tokenproxy_request_duration_seconds":  4, // deployments: gpt-4.1-mini, gpt-4o, text-embedding-3-small, ""
		"tokenproxy_upstream_response_seconds": 1, // eastca
		// one series of each per origin
		"tokenproxy_upstream_connections_opened_total":  opened,
		"tokenproxy_upstream_idle_connections":          1,
		"tokenproxy_upstream_http2_connections":         1,
		"tokenproxy_upstream_spare_dial_failures_total": 1,
	} {
		if got := testutil.CollectAndCount(g.reg, name); got != want {
			t.Errorf("got %d %s series, want %d", got, name, want)
		}
	}
}

// panickingSource panics with a message holding credentials, as careless code might.
type panickingSource struct{ msg string }

func (s panickingSource) TokenAt(context.Context, time.Time) (*broker.Token, error) {
	panic(errors.New(s.msg))
}

func TestPanicIsRecoveredAs500(t *testing.T) {
	const key = "panic-test-caller-key-0123456789"
	const jwt = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJ4In0.c2lnbmF0dXJlLXRoYXQtbXVzdC1ub3QtbGVhaw"
	cfg := config.Default()
	cfg.Credentials = map[string]*config.Credential{"c": {Type: config.TypeManagedIdentity}}
	cfg.Upstreams = map[string]*config.Upstream{"u": {URL: "http://127.0.0.1:1", Credential: "c"}}
	cfg.Callers = []*config.Caller{{Name: "app", KeySHA256: hashKey(key), Deployments: []string{"*"}}}
	cfg.ApplyDefaults()
	core, logs := observer.New(zap.InfoLevel)
	src := panickingSource{msg: "token source exploded holding " + jwt + " for the caller " + key}
	h, err := New(Options{Config: cfg, Sources: map[string]broker.TokenSource{"u": src}, Logger: zap.New(core)})
	if err != nil {
		t.Fatal(err)
	}
	url, client := serve(t, h, cfg)
	req, _ := http.NewRequest("POST", url+"/openai/deployments/d/chat/completions?api-version=1", strings.NewReader("{}"))
	req.Header.Set("Authorization", "Bearer "+key)
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 500 || resp.Header.Get("x-tokenproxy-error") != CodeInternal {
		t.Errorf("got %d, want 500 InternalError", resp.StatusCode)
	}
	panics := logs.FilterMessage("panic serving request")
	if panics.Len() != 1 || logs.FilterMessage("request").Len() != 1 {
		t.Fatalf("want the panic and the request logged once each; got %v", logs.All())
	}
	logged := fmt.Sprint(panics.All()[0].ContextMap())
	if !strings.Contains(logged, "token source exploded") {
		t.Errorf("the panic's message is not logged: %s", logged)
	}
	assertNoSecrets(t, "the logged panic", logged, []string{key, jwt, "c2lnbmF0dXJlLXRoYXQtbXVzdC1ub3QtbGVhaw"})
	assertNoSecrets(t, "the error body", string(body), []string{key, jwt})
}

// The cache of series counts each call in the series of its own labels, however many label
// sets share its slots, and labels that run together differently are different series.
func TestSeriesCache(t *testing.T) {
	m := newMetrics(false, nil, nil)
	type labels struct{ caller, deployment, code string }
	var sets []labels
	for i := range 300 { // more than the cache's slots
		sets = append(sets, labels{fmt.Sprintf("caller-%d", i%7), fmt.Sprintf("dep-%d", i%11), statusLabel(200 + i%5)})
	}
	sets = append(sets, labels{"ab", "c", "200"}, labels{"a", "bc", "200"})
	want := map[labels]float64{}
	for round := range 3 {
		for i, l := range sets {
			if (i+round)%2 == 0 {
				m.requestsFor(l.caller, l.deployment, l.code).Inc()
				want[l]++
			}
		}
	}
	for l, n := range want {
		if got := testutil.ToFloat64(m.requests.WithLabelValues(l.caller, l.deployment, l.code)); got != n {
			t.Errorf("%v counted %v, want %v", l, got, n)
		}
	}
	if got := testutil.CollectAndCount(m.requests); got != len(want) {
		t.Errorf("%d series, want %d", got, len(want))
	}

	// Two series counted on every call, one in a slot the other may take too: both stay
	// remembered, so counting them allocates nothing (with one slot each, every call replaced
	// the other's, a new entry each time).
	fresh := newMetrics(false, nil, nil).requestsBy
	first := [3]string{"app", "gpt-4.1-mini", "200"}
	firstA, _ := fresh.slots.pair(labelsHash(fresh.seed, first[:]))
	var second [3]string
	for i := 0; second[0] == ""; i++ {
		l := [3]string{fmt.Sprintf("caller-%d", i), "gpt-4.1-mini", "200"}
		if a, b := fresh.slots.pair(labelsHash(fresh.seed, l[:])); a == firstA && b != firstA {
			second = l // its first slot is first's, its other is not
		}
	}
	if n := testing.AllocsPerRun(100, func() {
		fresh.get(first).Inc()
		fresh.get(second).Inc()
	}); n != 0 && !raceEnabled { // the race detector changes allocation counts
		t.Errorf("counting two series that share a slot allocates %v times a call", n)
	}
	m.latencyFor("eastca").Observe(1)
	m.latencyFor("westus").Observe(2)
	if got := testutil.CollectAndCount(m.upstreamLatency); got != 2 {
		t.Errorf("%d latency series, want 2", got)
	}
}

// Passed through, a deployment name becomes a label value of its own only once the upstream has
// answered a call to it without error: names the gateway refused, or the upstream does not
// know, would otherwise use up the values for good and leave real deployments counted as
// "_other".
func TestPassthroughLabelsAreLearntFromAnswers(t *testing.T) {
	g := newGateway(t, func(c *config.Config) {
		c.Deployments = nil
		c.Callers[0].Deployments = []string{"deploy-gpt-4.1"}
	})
	for i := range maxPassthroughLabels {
		path := fmt.Sprintf("/openai/deployments/junk-%d/chat/completions?api-version=1", i)
		if resp, _ := g.do("POST", path, map[string]string{"api-key": keyProd}, chatBody); resp.StatusCode != 403 {
			t.Fatalf("a name off the allow-list got %d, want 403", resp.StatusCode)
		}
		if resp, _ := g.do("POST", path, map[string]string{"api-key": keyAdmin}, chatBody); resp.StatusCode < 400 {
			t.Fatalf("a name the upstream does not know got %d", resp.StatusCode)
		}
	}
	if resp, body := g.do("POST", "/openai/deployments/deploy-gpt-4.1/chat/completions?api-version=1", map[string]string{"api-key": keyProd}, chatBody); resp.StatusCode != 200 {
		t.Fatalf("got %d %s", resp.StatusCode, body)
	}
	if n := testutil.ToFloat64(g.handler.m.requests.WithLabelValues("a360-prod", "deploy-gpt-4.1", "200")); n != 1 {
		t.Errorf("the deployment's own series counted %v calls, want 1", n)
	}
}
