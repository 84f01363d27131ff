package emulator

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
)

// Verifier checks data-plane access tokens; *Authority is one.
type Verifier interface {
	Verify(token, audience string) (Claims, error)
}

// Model kinds an emulated deployment can serve.
const (
	KindChat       = "chat"
	KindEmbeddings = "embeddings"
)

// Model is what an emulated deployment runs.
type Model struct {
	// Name is the model reported in responses, e.g. gpt-4.1-mini-2025-04-14.
	Name string
	// Kind is KindChat or KindEmbeddings.
	Kind string
}

// OpenAIOptions configure an OpenAI emulator.
type OpenAIOptions struct {
	// Verifier checks bearer tokens. Required.
	Verifier Verifier
	// Deployments maps deployment names to models. If nil, DefaultDeployments is used.
	Deployments map[string]Model
	// Region is returned as x-ms-region. If empty, "Canada East".
	Region string
	// Audience is the token audience required. If empty, CognitiveServicesResource.
	Audience string
	// TLS, if set, serves https with a certificate from this CA (a private endpoint).
	TLS *CA
	// HTTP2, with TLS, lets a client choose HTTP/2 in the handshake; otherwise only HTTP/1.1
	// is offered.
	HTTP2 bool
}

// DefaultDeployments are the emulator's deployments unless told otherwise.
var DefaultDeployments = map[string]Model{
	"deploy-gpt-4.1":         {Name: "gpt-4.1-mini-2025-04-14", Kind: KindChat},
	"gpt-4.1-mini":           {Name: "gpt-4.1-mini-2025-04-14", Kind: KindChat},
	"gpt-4o":                 {Name: "gpt-4o-2024-11-20", Kind: KindChat},
	"text-embedding-3-small": {Name: "text-embedding-3-small", Kind: KindEmbeddings},
}

// Fault makes the emulator fail requests before answering.
type Fault struct {
	// Status is the HTTP status to answer, e.g. 429 or 503.
	Status int
	// RetryAfter, when non-zero, is sent as retry-after-ms and retry-after.
	RetryAfter time.Duration
	// Count is how many requests fail; zero means every request until ClearFaults.
	Count int
	// Every, when above 1, applies the fault to one request in Every (the Every-th, 2×Every-th,
	// …) instead of to consecutive ones; Count is then ignored.
	Every int
}

// Request is what the emulator received, for tests to inspect.
type Request struct {
	Method, Host, Path, RawQuery string
	Proto                        string // HTTP/1.1 or HTTP/2.0
	Header                       http.Header
	Body                         []byte
	// Claims of the bearer token, when it was valid.
	Claims Claims
	// Status answered.
	Status int
	// Canceled reports that the client went away before the response was complete.
	Canceled bool
}

// OpenAI emulates an Azure OpenAI / Azure AI Foundry data plane on 127.0.0.1 (plain http): it
// validates the bearer token's signature, audience and expiry, rejects api-key (as a resource
// with key authentication disabled does), and answers chat completions and embeddings, plain
// and streamed, with Azure-shaped bodies and headers.
type OpenAI struct {
	opts OpenAIOptions
	srv  *http.Server
	url  string

	mu            sync.Mutex
	deployments   map[string]Model
	denied        map[string]bool // object IDs lacking the data-plane role
	faults        []Fault
	latency       time.Duration
	chunkInterval time.Duration
	gate          <-chan struct{}
	cutAfter      int // streams are cut after this many events (0: never)
	served        int // requests answered, for Fault.Every
	requests      []Request
	finished      chan Request
}

// NewOpenAI starts the data plane emulator.
func NewOpenAI(opts OpenAIOptions) (*OpenAI, error) {
	if opts.Verifier == nil {
		return nil, fmt.Errorf("emulator: OpenAIOptions.Verifier is required")
	}
	if opts.Region == "" {
		opts.Region = "Canada East"
	}
	if opts.Audience == "" {
		opts.Audience = CognitiveServicesResource
	}
	deps := opts.Deployments
	if deps == nil {
		deps = DefaultDeployments
	}
	o := &OpenAI{
		opts:        opts,
		deployments: map[string]Model{},
		denied:      map[string]bool{},
		finished:    make(chan Request, 4096),
	}
	for k, v := range deps {
		o.deployments[k] = v
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	o.url = "http://" + ln.Addr().String()
	if opts.TLS != nil {
		cfg, err := opts.TLS.ServerConfig()
		if err != nil {
			ln.Close()
			return nil, err
		}
		cfg.NextProtos = []string{"http/1.1"}
		if opts.HTTP2 {
			cfg.NextProtos = []string{"h2", "http/1.1"}
		}
		ln = tls.NewListener(ln, cfg)
		o.url = "https://" + ln.Addr().String()
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /openai/deployments/{deployment}/{op...}", o.serve)
	mux.HandleFunc("POST /openai/v1/{op...}", o.serve)
	mux.HandleFunc("GET /openai/v1/models", o.serve)
	mux.HandleFunc("POST /models/{op...}", o.serve)
	mux.HandleFunc("/", o.serve)
	o.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go o.srv.Serve(ln)
	return o, nil
}

// CA is the CA the data plane's certificate comes from (OpenAIOptions.TLS), or nil.
func (o *OpenAI) CA() *CA { return o.opts.TLS }

// URL is the resource endpoint, e.g. http://127.0.0.1:port.
func (o *OpenAI) URL() string { return o.url }

// Close stops the server.
func (o *OpenAI) Close() { o.srv.Close() }

// InjectFault queues a fault for the next requests.
func (o *OpenAI) InjectFault(f Fault) {
	o.mu.Lock()
	o.faults = append(o.faults, f)
	o.mu.Unlock()
}

// ClearFaults removes every queued fault.
func (o *OpenAI) ClearFaults() {
	o.mu.Lock()
	o.faults = nil
	o.mu.Unlock()
}

// SetLatency delays response headers by d (time to first byte).
func (o *OpenAI) SetLatency(d time.Duration) {
	o.mu.Lock()
	o.latency = d
	o.mu.Unlock()
}

// SetChunkInterval spaces streamed chunks by d.
func (o *OpenAI) SetChunkInterval(d time.Duration) {
	o.mu.Lock()
	o.chunkInterval = d
	o.mu.Unlock()
}

// SetStreamGate makes streams wait for a receive from gate before each event after the first,
// so a test decides when the upstream sends the next chunk. nil removes the gate.
func (o *OpenAI) SetStreamGate(gate <-chan struct{}) {
	o.mu.Lock()
	o.gate = gate
	o.mu.Unlock()
}

// CutStreamsAfter makes streams break off (the connection closed, no [DONE]) after n events;
// zero restores complete streams.
func (o *OpenAI) CutStreamsAfter(n int) {
	o.mu.Lock()
	o.cutAfter = n
	o.mu.Unlock()
}

// DenyPrincipal makes calls by the object ID fail as when the role assignment is missing.
func (o *OpenAI) DenyPrincipal(objectID string) {
	o.mu.Lock()
	o.denied[objectID] = true
	o.mu.Unlock()
}

// Requests returns every request received so far.
func (o *OpenAI) Requests() []Request {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]Request(nil), o.requests...)
}

// Finished delivers each request once it has been answered (or abandoned by the client).
func (o *OpenAI) Finished() <-chan Request { return o.finished }

func (o *OpenAI) record(rec *Request) {
	o.mu.Lock()
	o.requests = append(o.requests, *rec)
	o.mu.Unlock()
	select {
	case o.finished <- *rec:
	default:
	}
}

// azureError writes the data plane's error shape.
func azureError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, map[string]any{"error": map[string]any{"code": code, "message": msg}})
}

func (o *OpenAI) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(http.MaxBytesReader(w, r.Body, 64<<20))
	rec := &Request{
		Method: r.Method, Host: r.Host, Path: r.URL.Path, RawQuery: r.URL.RawQuery,
		Proto: r.Proto, Header: r.Header.Clone(), Body: body,
	}
	sw := &statusWriter{ResponseWriter: w}
	defer func() {
		rec.Status = sw.status
		if r.Context().Err() != nil {
			rec.Canceled = true
		}
		o.record(rec)
	}()
	w = sw

	h := w.Header()
	h.Set("apim-request-id", uuid.NewString())
	h.Set("x-request-id", uuid.NewString())
	h.Set("x-ms-region", o.opts.Region)
	h.Set("x-ratelimit-remaining-requests", "99")
	h.Set("x-ratelimit-remaining-tokens", "99000")
	if id := r.Header.Get("x-ms-client-request-id"); id != "" {
		h.Set("x-ms-client-request-id", id)
	}

	o.mu.Lock()
	latency := o.latency
	o.served++
	var fault *Fault
	if len(o.faults) > 0 {
		f := o.faults[0]
		switch {
		case f.Every > 1:
			if o.served%f.Every == 0 {
				fault = &f
			}
		default:
			fault = &f
			if o.faults[0].Count > 0 {
				if o.faults[0].Count--; o.faults[0].Count == 0 {
					o.faults = o.faults[1:]
				}
			}
		}
	}
	o.mu.Unlock()
	if !sleepCtx(r.Context(), latency) {
		return
	}

	if r.Header.Get("api-key") != "" {
		azureError(w, http.StatusUnauthorized, "AuthenticationTypeDisabled", "Key based authentication is disabled for this resource.")
		return
	}
	token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		azureError(w, http.StatusUnauthorized, "401", "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource.")
		return
	}
	claims, err := o.opts.Verifier.Verify(token, o.opts.Audience)
	if err != nil {
		azureError(w, http.StatusUnauthorized, "401", fmt.Sprintf("Access token is missing, invalid, audience is incorrect (%s), or have expired.", o.opts.Audience))
		return
	}
	rec.Claims = claims

	if fault != nil {
		if fault.RetryAfter > 0 {
			h.Set("retry-after-ms", strconv.FormatInt(fault.RetryAfter.Milliseconds(), 10))
			h.Set("x-ms-retry-after-ms", strconv.FormatInt(fault.RetryAfter.Milliseconds(), 10))
			h.Set("retry-after", strconv.FormatInt(int64((fault.RetryAfter+time.Second-1)/time.Second), 10))
		}
		switch fault.Status {
		case http.StatusTooManyRequests:
			azureError(w, fault.Status, "429", "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2025-01-01-preview have exceeded token rate limit of your current AIServices S0 pricing tier. Please retry after 1 second.")
		default:
			azureError(w, fault.Status, strconv.Itoa(fault.Status), "The service is temporarily unable to process your request. Please try again later.")
		}
		return
	}

	deployment, op, apiVersionRequired := r.PathValue("deployment"), r.PathValue("op"), true
	var req struct {
		Model         string `json:"model"`
		Stream        bool   `json:"stream"`
		StreamOptions struct {
			IncludeUsage bool `json:"include_usage"`
		} `json:"stream_options"`
		Messages []struct {
			Role    string          `json:"role"`
			Content json.RawMessage `json:"content"`
		} `json:"messages"`
		Input      json.RawMessage `json:"input"`
		Dimensions int             `json:"dimensions"`
	}
	switch {
	case strings.HasPrefix(r.URL.Path, "/openai/deployments/"):
	case strings.HasPrefix(r.URL.Path, "/openai/v1/"):
		apiVersionRequired = false
	case strings.HasPrefix(r.URL.Path, "/models/"):
	default:
		azureError(w, http.StatusNotFound, "404", "Resource not found")
		return
	}
	if r.Method == http.MethodGet && r.URL.Path == "/openai/v1/models" {
		o.listModels(w)
		return
	}
	if apiVersionRequired && r.URL.Query().Get("api-version") == "" {
		azureError(w, http.StatusNotFound, "404", "Resource not found")
		return
	}
	if err := json.Unmarshal(body, &req); err != nil {
		azureError(w, http.StatusBadRequest, "BadRequest", "Invalid JSON body: "+err.Error())
		return
	}
	if deployment == "" {
		deployment = req.Model
	}
	o.mu.Lock()
	model, known := o.deployments[deployment]
	denied := o.denied[claims.ObjectID]
	o.mu.Unlock()
	if denied {
		azureError(w, http.StatusUnauthorized, "PermissionDenied", fmt.Sprintf(
			"The principal `%s` lacks the required data action `Microsoft.CognitiveServices/accounts/OpenAI/deployments/chat/completions/action` to perform `POST /openai/deployments/{deployment-id}/chat/completions` operation.", claims.ObjectID))
		return
	}
	if !known {
		azureError(w, http.StatusNotFound, "DeploymentNotFound", "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, please wait a moment and try again.")
		return
	}

	switch {
	case op == "chat/completions" && model.Kind == KindChat:
		var prompt []string
		for _, m := range req.Messages {
			var s string
			if json.Unmarshal(m.Content, &s) == nil {
				prompt = append(prompt, s)
			}
		}
		reply := "This is the Azure OpenAI emulator answering through the gateway."
		if len(prompt) > 0 {
			last := prompt[len(prompt)-1]
			if len(last) > 120 {
				last = last[:120]
			}
			reply += " You said: " + last
		}
		u := usage(strings.Join(prompt, " "), reply)
		if req.Stream {
			o.stream(w, r, model, reply, u, req.StreamOptions.IncludeUsage)
		} else {
			o.complete(w, model, reply, u)
		}
	case op == "embeddings" && model.Kind == KindEmbeddings:
		o.embed(w, model, req.Input, req.Dimensions)
	default:
		azureError(w, http.StatusBadRequest, "OperationNotSupported", fmt.Sprintf("The %s operation does not work with the specified model, %s. Please choose different model and try again.", op, model.Name))
	}
}

func (o *OpenAI) listModels(w http.ResponseWriter) {
	o.mu.Lock()
	data := []any{}
	for name := range o.deployments {
		data = append(data, map[string]any{"id": name, "object": "model", "owned_by": "system"})
	}
	o.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": data})
}

type tokenUsage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens,omitempty"`
	TotalTokens      int `json:"total_tokens"`
}

func usage(prompt, reply string) tokenUsage {
	p, c := max(len(strings.Fields(prompt)), 1), len(strings.Fields(reply))
	return tokenUsage{PromptTokens: p, CompletionTokens: c, TotalTokens: p + c}
}

var filterResults = map[string]any{
	"hate": map[string]any{"filtered": false, "severity": "safe"}, "self_harm": map[string]any{"filtered": false, "severity": "safe"},
	"sexual": map[string]any{"filtered": false, "severity": "safe"}, "violence": map[string]any{"filtered": false, "severity": "safe"},
}

func (o *OpenAI) complete(w http.ResponseWriter, model Model, reply string, u tokenUsage) {
	writeJSON(w, http.StatusOK, map[string]any{
		"id":      "chatcmpl-" + strings.ReplaceAll(uuid.NewString(), "-", "")[:29],
		"object":  "chat.completion",
		"created": time.Now().Unix(),
		"model":   model.Name,
		"choices": []any{map[string]any{
			"index":                  0,
			"finish_reason":          "stop",
			"logprobs":               nil,
			"message":                map[string]any{"role": "assistant", "content": reply, "refusal": nil, "annotations": []any{}},
			"content_filter_results": filterResults,
		}},
		"prompt_filter_results": []any{map[string]any{"prompt_index": 0, "content_filter_results": filterResults}},
		"system_fingerprint":    "fp_emulator",
		"usage": map[string]any{
			"prompt_tokens": u.PromptTokens, "completion_tokens": u.CompletionTokens, "total_tokens": u.TotalTokens,
			"prompt_tokens_details":     map[string]any{"cached_tokens": 0},
			"completion_tokens_details": map[string]any{"reasoning_tokens": 0},
		},
	})
}

// stream answers as Azure does: a prompt_filter_results chunk, a role chunk, one chunk per word,
// a finish chunk, a usage chunk when asked for, then [DONE]; each flushed on its own.
func (o *OpenAI) stream(w http.ResponseWriter, r *http.Request, model Model, reply string, u tokenUsage, includeUsage bool) {
	o.mu.Lock()
	interval, gate, cutAfter := o.chunkInterval, o.gate, o.cutAfter
	o.mu.Unlock()
	w.Header().Set("Content-Type", "text/event-stream; charset=utf-8")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	id := "chatcmpl-" + strings.ReplaceAll(uuid.NewString(), "-", "")[:29]
	created := time.Now().Unix()
	send := func(v any) bool {
		var buf bytes.Buffer
		buf.WriteString("data: ")
		if s, ok := v.(string); ok {
			buf.WriteString(s)
		} else {
			b, _ := json.Marshal(v)
			buf.Write(b)
		}
		buf.WriteString("\n\n")
		if _, err := w.Write(buf.Bytes()); err != nil {
			return false
		}
		return rc.Flush() == nil
	}
	chunk := func(delta map[string]any, finish any) map[string]any {
		return map[string]any{
			"id": id, "object": "chat.completion.chunk", "created": created, "model": model.Name,
			"system_fingerprint": "fp_emulator",
			"choices": []any{map[string]any{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": nil,
				"content_filter_results": map[string]any{}}},
		}
	}
	events := []any{
		map[string]any{"choices": []any{}, "created": 0, "id": "", "model": "", "object": "",
			"prompt_filter_results": []any{map[string]any{"prompt_index": 0, "content_filter_results": filterResults}}},
		chunk(map[string]any{"role": "assistant", "content": "", "refusal": nil}, nil),
	}
	for i, word := range strings.Fields(reply) {
		if i > 0 {
			word = " " + word
		}
		events = append(events, chunk(map[string]any{"content": word}, nil))
	}
	events = append(events, chunk(map[string]any{}, "stop"))
	if includeUsage {
		events = append(events, map[string]any{
			"id": id, "object": "chat.completion.chunk", "created": created, "model": model.Name,
			"system_fingerprint": "fp_emulator", "choices": []any{}, "usage": u,
		})
	}
	events = append(events, "[DONE]")
	for i, ev := range events {
		if cutAfter > 0 && i == cutAfter {
			panic(http.ErrAbortHandler) // the server drops the connection mid-stream
		}
		if i > 0 && gate != nil {
			select {
			case <-gate:
			case <-r.Context().Done():
				return
			}
		} else if i > 0 && !sleepCtx(r.Context(), interval) {
			return
		}
		if !send(ev) {
			return
		}
	}
}

func (o *OpenAI) embed(w http.ResponseWriter, model Model, input json.RawMessage, dims int) {
	var inputs []string
	var one string
	if json.Unmarshal(input, &one) == nil {
		inputs = []string{one}
	} else if json.Unmarshal(input, &inputs) != nil || len(inputs) == 0 {
		azureError(w, http.StatusBadRequest, "BadRequest", "'input' must be a string or an array of strings.")
		return
	}
	if dims <= 0 || dims > 3072 {
		dims = 8
	}
	data := make([]any, len(inputs))
	total := 0
	for i, in := range inputs {
		vec := make([]float64, dims)
		h := fnv.New64a()
		for j := range vec {
			h.Write([]byte(in))
			vec[j] = float64(h.Sum64()%2000)/1000 - 1
		}
		data[i] = map[string]any{"object": "embedding", "index": i, "embedding": vec}
		total += max(len(strings.Fields(in)), 1)
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"object": "list", "data": data, "model": model.Name,
		"usage": map[string]any{"prompt_tokens": total, "total_tokens": total},
	})
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
