package emulator

import (
	"bufio"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

func start(t *testing.T) *Emulator {
	t.Helper()
	e, err := Start(Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	return e
}

func call(t *testing.T, e *Emulator, path, body string, header map[string]string) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, e.OpenAI.URL()+path, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

const chatPath = "/openai/deployments/deploy-gpt-4.1/chat/completions?api-version=2025-01-01-preview"
const chatBody = `{"messages":[{"role":"user","content":"hello there"}]}`

func TestDataPlaneAuthentication(t *testing.T) {
	e := start(t)
	good, err := e.IssueToken(e.ClientID, CognitiveServicesResource)
	if err != nil {
		t.Fatal(err)
	}
	e.AddResource(Resource{URI: "api://other", Version: 2})
	wrongAud, _ := e.IssueToken(e.ClientID, "api://other")

	other, _ := NewAuthority(AuthorityOptions{})
	defer other.Close()
	other.AddApp(App{TenantID: e.TenantID, ClientID: e.ClientID})
	foreign, _ := other.IssueToken(e.ClientID, CognitiveServicesResource)

	e.SetTokenLifetime(-time.Minute, 0)
	expired, _ := e.IssueToken(e.ClientID, CognitiveServicesResource)

	none := jwt.NewWithClaims(jwt.SigningMethodNone, jwt.MapClaims{"aud": CognitiveServicesResource, "exp": time.Now().Add(time.Hour).Unix(), "iss": "https://sts.windows.net/" + e.TenantID + "/", "tid": e.TenantID})
	unsigned, _ := none.SignedString(jwt.UnsafeAllowNoneSignatureType)

	for _, tt := range []struct {
		name       string
		header     map[string]string
		wantStatus int
		wantCode   string
	}{
		{"valid bearer", map[string]string{"Authorization": "Bearer " + good}, 200, ""},
		{"api-key is refused even with a token", map[string]string{"Authorization": "Bearer " + good, "api-key": "k"}, 401, "AuthenticationTypeDisabled"},
		{"no credentials", nil, 401, "401"},
		{"wrong audience", map[string]string{"Authorization": "Bearer " + wrongAud}, 401, "401"},
		{"another authority's key", map[string]string{"Authorization": "Bearer " + foreign}, 401, "401"},
		{"expired", map[string]string{"Authorization": "Bearer " + expired}, 401, "401"},
		{"alg none", map[string]string{"Authorization": "Bearer " + unsigned}, 401, "401"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			resp, body := call(t, e, chatPath, chatBody, tt.header)
			if resp.StatusCode != tt.wantStatus {
				t.Fatalf("got status %d (%s), want %d", resp.StatusCode, body, tt.wantStatus)
			}
			if tt.wantCode != "" {
				var eb struct {
					Error struct{ Code, Message string }
				}
				if json.Unmarshal([]byte(body), &eb) != nil || eb.Error.Code != tt.wantCode || eb.Error.Message == "" {
					t.Errorf("got body %s, want an Azure error with code %q", body, tt.wantCode)
				}
			}
		})
	}
}

func TestDataPlaneResponses(t *testing.T) {
	e := start(t)
	tok, _ := e.IssueToken(e.ClientID, CognitiveServicesResource)
	auth := map[string]string{"Authorization": "Bearer " + tok, "x-ms-client-request-id": "req-1"}

	resp, body := call(t, e, chatPath, chatBody, auth)
	var chat struct {
		Object  string
		Choices []struct{ Message struct{ Content string } }
		Usage   struct{ PromptTokens, TotalTokens int } `json:"usage"`
	}
	json.Unmarshal([]byte(body), &chat)
	if chat.Object != "chat.completion" || len(chat.Choices) != 1 || !strings.Contains(chat.Choices[0].Message.Content, "hello there") {
		t.Errorf("got %s, want a chat.completion echoing the prompt", body)
	}
	for _, h := range []string{"apim-request-id", "x-ms-region", "x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens"} {
		if resp.Header.Get(h) == "" {
			t.Errorf("response lacks %s", h)
		}
	}
	if got := resp.Header.Get("x-ms-client-request-id"); got != "req-1" {
		t.Errorf("got x-ms-client-request-id %q, want the caller's echoed", got)
	}

	_, body = call(t, e, "/openai/v1/embeddings", `{"model":"text-embedding-3-small","input":["a","b"]}`, auth)
	var emb struct {
		Data []struct{ Embedding []float64 }
	}
	if json.Unmarshal([]byte(body), &emb); len(emb.Data) != 2 || len(emb.Data[0].Embedding) != 8 {
		t.Errorf("got %s, want two embeddings", body)
	}

	for _, tt := range []struct{ path, body, code string }{
		{"/openai/deployments/missing/chat/completions?api-version=1", chatBody, "DeploymentNotFound"},
		{"/openai/deployments/deploy-gpt-4.1/chat/completions", chatBody, "404"},
		{"/openai/deployments/text-embedding-3-small/chat/completions?api-version=1", chatBody, "OperationNotSupported"},
	} {
		if _, body := call(t, e, tt.path, tt.body, auth); !strings.Contains(body, `"code":"`+tt.code+`"`) {
			t.Errorf("%s: got %s, want code %s", tt.path, body, tt.code)
		}
	}
}

func TestDataPlaneStreaming(t *testing.T) {
	e := start(t)
	tok, _ := e.IssueToken(e.ClientID, CognitiveServicesResource)
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, e.OpenAI.URL()+"/models/chat/completions?api-version=2024-05-01-preview",
		strings.NewReader(`{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}`))
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/event-stream") {
		t.Fatalf("got Content-Type %q, want text/event-stream", ct)
	}
	var events []string
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if d, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
			events = append(events, d)
		}
	}
	if len(events) < 5 || events[len(events)-1] != "[DONE]" {
		t.Fatalf("got events %q, want chunks ending in [DONE]", events)
	}
	if !strings.Contains(events[0], "prompt_filter_results") || !strings.Contains(events[len(events)-2], `"usage"`) {
		t.Errorf("want a prompt_filter_results first chunk and a usage chunk before [DONE]; got %q", events)
	}
}

func TestFaults(t *testing.T) {
	e := start(t)
	tok, _ := e.IssueToken(e.ClientID, CognitiveServicesResource)
	auth := map[string]string{"Authorization": "Bearer " + tok}
	e.OpenAI.InjectFault(Fault{Status: 429, RetryAfter: 1500 * time.Millisecond, Count: 1})
	resp, _ := call(t, e, chatPath, chatBody, auth)
	if resp.StatusCode != 429 || resp.Header.Get("retry-after-ms") != "1500" || resp.Header.Get("retry-after") != "2" {
		t.Errorf("got %d retry-after-ms=%q retry-after=%q, want 429 1500 2", resp.StatusCode, resp.Header.Get("retry-after-ms"), resp.Header.Get("retry-after"))
	}
	if resp, _ := call(t, e, chatPath, chatBody, auth); resp.StatusCode != 200 {
		t.Errorf("after a one-shot fault got %d, want 200", resp.StatusCode)
	}
	if n := len(e.OpenAI.Requests()); n != 2 {
		t.Errorf("recorded %d requests, want 2", n)
	}
}
