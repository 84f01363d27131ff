// Package proxy is the gateway's request path: it routes Azure OpenAI / Azure AI Foundry calls,
// authenticates callers and checks their deployment allow-list, and forwards each call to its
// upstream with the caller's credentials removed and an Entra bearer token attached, streaming
// responses through as they arrive. Every request is counted and logged once, without secrets.
package proxy

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/tokenproxy/tokenproxy/internal/broker"
	"github.com/tokenproxy/tokenproxy/internal/config"
)

// Options configure a Handler.
type Options struct {
	// Config supplies upstreams, deployments, callers, limits and timeouts. Required; it must
	// have passed Validate.
	Config *config.Config
	// Sources maps each upstream name to the token source for its (credential, scope). Required.
	Sources map[string]broker.TokenSource
	// Logger receives the access log (one line per request at info) and errors. If nil,
	// nothing is logged.
	Logger *zap.Logger
	// Registerer receives the request metrics. If nil, metrics are not registered.
	Registerer prometheus.Registerer
	// Transport carries requests to upstreams. If nil, an http.Transport tuned for a proxy
	// (pooled keep-alive and HTTP/2, Config's timeouts, environment proxy settings) is used.
	Transport http.RoundTripper
}

func (o Options) logger() *zap.Logger {
	if o.Logger == nil {
		return zap.NewNop()
	}
	return o.Logger
}

// Handler serves the gateway's API.
type Handler struct {
	log         *zap.Logger
	router      chi.Router
	keys        *keyring
	upstreams   map[string]*upstream
	only        *upstream // the single upstream, when there is exactly one
	deployments map[string]target
	passthrough bool // no deployments section: names pass through to the only upstream
	maxBody     int64
	m           *metrics
}

// upstream is one configured resource and the reverse proxy that reaches it.
type upstream struct {
	name  string
	proxy *httputil.ReverseProxy
}

// target is where an exposed deployment name leads.
type target struct {
	up         *upstream
	deployment string // the name on the upstream
}

// New builds the handler.
func New(opts Options) (*Handler, error) {
	cfg := opts.Config
	if cfg == nil {
		return nil, fmt.Errorf("proxy: Options.Config is required")
	}
	keys, err := newKeyring(cfg)
	if err != nil {
		return nil, err
	}
	h := &Handler{
		log:         opts.logger(),
		keys:        keys,
		upstreams:   map[string]*upstream{},
		deployments: map[string]target{},
		passthrough: len(cfg.Deployments) == 0,
		maxBody:     cfg.MaxRequestBytes,
	}
	configured := map[string]bool{}
	for name := range cfg.Deployments {
		configured[name] = true
	}
	h.m = newMetrics(h.passthrough, configured)
	if opts.Registerer != nil {
		if err := h.m.register(opts.Registerer); err != nil {
			return nil, fmt.Errorf("registering proxy metrics: %w", err)
		}
	}
	base := opts.Transport
	if base == nil {
		base = NewTransport(cfg.Timeouts)
	}
	errLog := zap.NewStdLog(h.log.Named("reverseproxy"))
	for name, u := range cfg.Upstreams {
		src, ok := opts.Sources[name]
		if !ok {
			return nil, fmt.Errorf("proxy: no token source for upstream %q", name)
		}
		tu, err := url.Parse(u.URL)
		if err != nil {
			return nil, fmt.Errorf("upstream %q: %w", name, err)
		}
		up := &upstream{name: name}
		up.proxy = &httputil.ReverseProxy{
			Rewrite:        rewriter(tu),
			Transport:      &bearerTransport{src: src, base: base},
			BufferPool:     bufferPool{},
			ErrorHandler:   h.proxyError,
			ModifyResponse: echoRequestID,
			ErrorLog:       errLog,
		}
		h.upstreams[name] = up
	}
	if len(h.upstreams) == 1 {
		for _, up := range h.upstreams {
			h.only = up
		}
	}
	for name, d := range cfg.Deployments {
		h.deployments[name] = target{up: h.upstreams[d.Upstream], deployment: d.Deployment}
	}

	r := chi.NewRouter()
	r.NotFound(func(w http.ResponseWriter, r *http.Request) {
		h.fail(w, r, errorf(http.StatusNotFound, CodeNotFound,
			"no such route: the gateway serves /openai/deployments/{deployment}/…, /openai/v1/… and /models/…"))
	})
	r.MethodNotAllowed(func(w http.ResponseWriter, r *http.Request) {
		h.fail(w, r, errorf(http.StatusMethodNotAllowed, CodeNotFound, "method not allowed"))
	})
	r.Handle("/openai/deployments/{deployment}/*", http.HandlerFunc(h.serveDeployment))
	r.Handle("/openai/v1/*", h.serveBodyRouted(false))
	r.Handle("/models/*", h.serveBodyRouted(true))
	r.Handle("/api/models/*", h.serveBodyRouted(true))
	h.router = r
	return h, nil
}

// ServeHTTP handles one API call: it checks the path, routes, logs and counts the call.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	c := newCall(w, r)
	h.m.inflight.Inc()
	defer h.finish(c, r)
	if e := checkPath(r.URL.EscapedPath()); e != nil {
		h.fail(c, r, e)
		return
	}
	h.router.ServeHTTP(c, r)
}

func (h *Handler) serveDeployment(w http.ResponseWriter, r *http.Request) {
	c := w.(*call)
	name := chi.URLParam(r, "deployment")
	cl, e := h.keys.authenticate(r.Header)
	if e != nil {
		h.fail(c, r, e)
		return
	}
	c.caller = cl.name
	if !hasQueryParam(r.URL.RawQuery, "api-version") {
		h.fail(c, r, errorf(http.StatusBadRequest, CodeMissingAPIVersion,
			"the api-version query parameter is required, e.g. ?api-version=2024-10-21"))
		return
	}
	t, e := h.resolve(c, cl, name)
	if e != nil {
		h.fail(c, r, e)
		return
	}
	body, e := h.readBody(c, r)
	if e != nil {
		h.fail(c, r, e)
		return
	}
	if t.deployment != name {
		rest := r.URL.Path[len("/openai/deployments/")+len(name):]
		r.URL.Path = "/openai/deployments/" + t.deployment + rest
	}
	setBody(r, body)
	h.forward(c, r, t.up)
}

func (h *Handler) serveBodyRouted(apiVersionRequired bool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c := w.(*call)
		cl, e := h.keys.authenticate(r.Header)
		if e != nil {
			h.fail(c, r, e)
			return
		}
		c.caller = cl.name
		if apiVersionRequired && !hasQueryParam(r.URL.RawQuery, "api-version") {
			h.fail(c, r, errorf(http.StatusBadRequest, CodeMissingAPIVersion,
				"the api-version query parameter is required, e.g. ?api-version=2024-05-01-preview"))
			return
		}
		body, e := h.readBody(c, r)
		if e != nil {
			h.fail(c, r, e)
			return
		}
		ref, e := peekModel(r.Header.Get("Content-Type"), body)
		if e != nil {
			h.fail(c, r, e)
			return
		}
		var up *upstream
		if ref.name == "" {
			// Calls naming no model (GET /openai/v1/models, a stored response by ID) cannot be
			// authorised per deployment: only callers allowed everything may make them, and only
			// when there is a single upstream to send them to.
			if !cl.all || h.only == nil {
				h.fail(c, r, errorf(http.StatusBadRequest, CodeMissingModel,
					"the request body must name the deployment in \"model\""))
				return
			}
			up = h.only
		} else {
			t, e := h.resolve(c, cl, ref.name)
			if e != nil {
				h.fail(c, r, e)
				return
			}
			if t.deployment != ref.name {
				if ref.start < 0 {
					h.fail(c, r, errorf(http.StatusBadRequest, CodeInvalidBody,
						"deployment %q is renamed by the gateway, which multipart bodies do not support; call it through /openai/deployments/%s/…", ref.name, ref.name))
					return
				}
				body = renameModel(body, ref, t.deployment)
			}
			up = t.up
		}
		setBody(r, body)
		h.forward(c, r, up)
	})
}

// readBody reads the whole request body, bounded by max_request_bytes. Bodies are read before
// anything is sent upstream so an oversized one is refused (413) without the upstream seeing a
// truncated request, the upstream gets a Content-Length, and the body can be replayed.
func (h *Handler) readBody(c *call, r *http.Request) ([]byte, *apiError) {
	if r.ContentLength > h.maxBody {
		return nil, tooLarge(h.maxBody)
	}
	var buf bytes.Buffer
	if r.ContentLength > 0 {
		buf.Grow(int(r.ContentLength))
	}
	_, err := buf.ReadFrom(http.MaxBytesReader(c, r.Body, h.maxBody))
	if err != nil {
		e := statusFor(err, "")
		if e.status == http.StatusBadGateway { // a read error from the caller, not an upstream
			e = errorf(http.StatusBadRequest, CodeInvalidBody, "reading the request body failed")
		}
		return nil, e
	}
	c.bytesIn = int64(buf.Len())
	return buf.Bytes(), nil
}

// setBody replaces the request body with the bytes read.
func setBody(r *http.Request, body []byte) {
	r.ContentLength = int64(len(body))
	if len(body) == 0 {
		r.Body = http.NoBody
		return
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
}

func tooLarge(limit int64) *apiError {
	return errorf(http.StatusRequestEntityTooLarge, CodeRequestTooLarge,
		"the request body exceeds the gateway's limit of %d bytes (max_request_bytes)", limit)
}

// resolve authorises the caller for an exposed deployment name and finds where it lives. A
// caller not allowed the name gets 403 whether or not it exists, so the allow-list does not
// leak the set of deployments.
func (h *Handler) resolve(c *call, cl *caller, name string) (target, *apiError) {
	if !config.ValidDeploymentName(name) {
		return target{}, errorf(http.StatusBadRequest, CodeInvalidPath,
			"%q is not a valid deployment name (letters, digits, '.', '-', '_'; at most 64)", name)
	}
	c.deployment = name
	if !cl.may(name) {
		return target{}, errorf(http.StatusForbidden, CodeForbidden,
			"caller %q may not use deployment %q", cl.name, name)
	}
	if h.passthrough {
		return target{up: h.only, deployment: name}, nil
	}
	t, ok := h.deployments[name]
	if !ok {
		return target{}, errorf(http.StatusNotFound, CodeDeploymentNotFound,
			"the gateway has no deployment named %q", name)
	}
	return t, nil
}

// forward sends the call upstream. The request ID goes upstream as x-ms-client-request-id.
func (h *Handler) forward(c *call, r *http.Request, up *upstream) {
	c.upstream = up.name
	r.Header["X-Ms-Client-Request-Id"] = c.idHeader
	c.proxyStart = time.Now()
	up.proxy.ServeHTTP(c, r)
}

// fail answers with a gateway error.
func (h *Handler) fail(w http.ResponseWriter, r *http.Request, e *apiError) {
	c := w.(*call)
	c.code = e.code
	c.err = e
	c.Header()["X-Ms-Client-Request-Id"] = c.idHeader
	writeError(c, e)
}

// proxyError is the ReverseProxy's ErrorHandler: transport failures, token failures and
// oversized bodies all arrive here and are mapped by statusFor.
func (h *Handler) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	c := w.(*call)
	e := statusFor(err, c.upstream)
	c.code, c.err = e.code, err
	if e.status == statusClientClosed {
		c.status = statusClientClosed
		return
	}
	c.Header()["X-Ms-Client-Request-Id"] = c.idHeader
	writeError(c, e)
}

// echoRequestID makes sure the caller gets the request ID back even if the upstream does not echo it.
func echoRequestID(resp *http.Response) error {
	if resp.Header.Get("X-Ms-Client-Request-Id") == "" {
		resp.Header["X-Ms-Client-Request-Id"] = resp.Request.Header["X-Ms-Client-Request-Id"]
	}
	return nil
}

// rewriter points the outgoing request at the upstream. ReverseProxy has already removed
// hop-by-hop headers and X-Forwarded-*; the caller's credentials are removed here, so the only
// credential that leaves is the bearer token bearerTransport attaches.
func rewriter(target *url.URL) func(*httputil.ProxyRequest) {
	base := strings.TrimSuffix(target.Path, "/")
	return func(pr *httputil.ProxyRequest) {
		out := pr.Out
		out.URL.Scheme = target.Scheme
		out.URL.Host = target.Host
		out.URL.Path = base + pr.In.URL.Path
		out.URL.RawPath = ""
		out.Host = ""
		for _, k := range callerCredentialHeaders {
			delete(out.Header, k)
		}
		out.URL.RawQuery = stripCredentialParams(out.URL.RawQuery)
	}
}

// stripCredentialParams removes query parameters some Azure clients use for keys (api-key,
// subscription-key). The gateway never reads keys from the query, but a caller's key must not
// reach the upstream, or its logs, whatever the caller did with it. Other parameters keep their
// order and encoding.
func stripCredentialParams(rawQuery string) string {
	lower := strings.ToLower(rawQuery)
	if !strings.Contains(lower, "api-key") && !strings.Contains(lower, "subscription-key") && !strings.Contains(lower, "%") {
		return rawQuery
	}
	kept := make([]string, 0, 4)
	for kv := range strings.SplitSeq(rawQuery, "&") {
		k, _, _ := strings.Cut(kv, "=")
		if uk, err := url.QueryUnescape(k); err == nil {
			k = uk
		}
		switch strings.ToLower(k) {
		case "api-key", "subscription-key":
			continue
		}
		kept = append(kept, kv)
	}
	return strings.Join(kept, "&")
}

// callerCredentialHeaders are removed from every upstream request (canonical forms).
var callerCredentialHeaders = []string{"Authorization", "Api-Key", "Cookie", "Ocp-Apim-Subscription-Key", "Proxy-Authorization"}

// bearerTransport attaches the upstream's Entra token. Token errors are returned from RoundTrip
// so they reach the ReverseProxy's ErrorHandler like any other failure.
type bearerTransport struct {
	src  broker.TokenSource
	base http.RoundTripper
}

func (t *bearerTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	tok, err := t.src.Token(req.Context())
	if err != nil {
		return nil, err
	}
	// req is the ReverseProxy's own clone of the caller's request, so setting its header is safe.
	req.Header["Authorization"] = tok.AuthorizationHeader()
	return t.base.RoundTrip(req)
}

// NewTransport returns the transport used to reach upstreams: keep-alive pools sized for a
// proxy (the default of two idle connections per host would churn connections under load),
// HTTP/2 when the upstream offers it, and no transparent decompression (bodies pass through
// as the upstream sent them).
func NewTransport(t config.Timeouts) *http.Transport {
	d := &net.Dialer{Timeout: t.Dial, KeepAlive: 30 * time.Second}
	return &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           d.DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          1024,
		MaxIdleConnsPerHost:   256,
		IdleConnTimeout:       t.UpstreamIdle,
		TLSHandshakeTimeout:   t.TLSHandshake,
		ResponseHeaderTimeout: t.ResponseHeader,
		ExpectContinueTimeout: time.Second,
		DisableCompression:    true,
		TLSClientConfig:       &tls.Config{MinVersion: tls.VersionTLS12},
	}
}

// bufferPool lends ReverseProxy its 32 KiB copy buffers.
type bufferPool struct{}

var buffers = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

func (bufferPool) Get() []byte  { return *buffers.Get().(*[]byte) }
func (bufferPool) Put(b []byte) { buffers.Put(&b) }

// hasQueryParam reports whether the raw query has key with a non-empty value.
func hasQueryParam(rawQuery, key string) bool {
	for rawQuery != "" {
		var kv string
		kv, rawQuery, _ = strings.Cut(rawQuery, "&")
		if k, v, ok := strings.Cut(kv, "="); ok && k == key && v != "" {
			return true
		}
	}
	return false
}

// requestID returns the caller's x-ms-client-request-id when it is a sane identifier, else a
// new UUID. Caller-chosen IDs let a client correlate its logs with the gateway's and Azure's.
func requestID(h http.Header) string {
	if v := h["X-Ms-Client-Request-Id"]; len(v) == 1 && saneID(v[0]) {
		return v[0]
	}
	return uuid.NewString()
}

func saneID(s string) bool {
	if s == "" || len(s) > 128 {
		return false
	}
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_', c == '.', c == ':':
		default:
			return false
		}
	}
	return true
}
