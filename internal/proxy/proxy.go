// Package proxy is the gateway's request path: it routes Azure OpenAI / Azure AI Foundry calls,
// authenticates callers and checks their deployment allow-list, and forwards each call to its
// upstream with the caller's credentials removed and an Entra bearer token attached, streaming
// responses through as they arrive. Every request is counted and logged once, without secrets.
//
// The HTTP engine is fasthttp on the caller side and package transport on the upstream side.
// Profiles of the net/http server with httputil.ReverseProxy put the gateway at about a third
// of nginx's throughput on one core; the same work on this engine runs within reach of nginx
// (see bench/README.md for what was measured and tried). The concepts are the ones a
// ReverseProxy would have: one place that rewrites the outgoing request, one that attaches the
// token, and one statusFor that maps every failure to an answer.
package proxy

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/valyala/fasthttp"
	"go.uber.org/zap"

	"github.com/tokenproxy/tokenproxy/internal/backend"
	"github.com/tokenproxy/tokenproxy/internal/broker"
	"github.com/tokenproxy/tokenproxy/internal/callertoken"
	"github.com/tokenproxy/tokenproxy/internal/config"
	"github.com/tokenproxy/tokenproxy/internal/transport"
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
	// AccessLog, if set, receives the access log instead of Logger: the JSON lines a JSON
	// encoder with LogEncoderConfig would write, written by the handler's own encoder at a
	// fraction of zap's cost per call. Logger's level still decides whether they are written,
	// and Logger's name is their "logger". Set it only when Logger encodes JSON to the same
	// writer.
	AccessLog io.Writer
	// Registerer receives the request metrics. If nil, metrics are not registered.
	Registerer prometheus.Registerer
	// Transport carries requests to upstreams. If nil, one with Config's timeouts and the
	// environment's proxy settings is made, and Close releases it.
	Transport *transport.Transport
	// Now is the clock for backend health and for client certificates' expiry. If nil,
	// time.Now.
	Now func() time.Time
	// ClientCAs, if set, returns the CAs the API listener's client certificates must chain to,
	// as they are now. A connection's certificate, verified at its handshake, is verified again
	// against them at its first call, and at its next call whenever they change (a CA withdrawn
	// by a reload): one verification per connection and set of CAs. Without it, certificates
	// are checked only for their expiry after the handshake.
	ClientCAs func() *x509.CertPool
	// EntraHTTPClient fetches Entra's discovery documents and signing keys, to verify callers'
	// tokens. If nil, a client with the system roots.
	EntraHTTPClient *http.Client
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
	accessOut   io.Writer // Options.AccessLog
	callers     atomic.Pointer[callers]
	loads       loads
	tokens      *callertoken.Registry // Entra token verifiers, kept across reloads
	maxAll      atomic.Int64          // calls in flight allowed in all; 0: no cap
	inflight    atomic.Int64          // calls in flight in all
	upstreams   map[string]*upstream
	only        *upstream // the single upstream, when there is exactly one
	deployments map[string]*deployment
	passthrough bool // no deployments section: names pass through to the only upstream
	maxBody     int
	m           *metrics
	transport   upstreamClient
	own         *transport.Transport // made here, closed by Close
	// streams, set by NewServer, keeps account of the event streams relayed on connections
	// the server has handed over; nil when the handler is served otherwise.
	streams  *streamSet
	backends *backend.Registry
	budget   *backend.Budget
	res      config.Resilience

	now       func() time.Time      // Options.Now, or time.Now
	clientCAs func() *x509.CertPool // Options.ClientCAs
	tokenWait time.Duration         // timeouts.token_acquire, for callers' Entra tokens
}

// upstream is one configured resource.
type upstream struct {
	name   string
	origin transport.Origin
	// streams is the origin for calls that ask for an event stream: origin itself, or with
	// HTTP/2 offered under http2: streams.
	streams  transport.Origin
	basePath string // the upstream URL's path, prefixed to every forwarded path
	src      broker.TokenSource
}

// New builds the handler.
func New(opts Options) (*Handler, error) {
	cfg := opts.Config
	if cfg == nil {
		return nil, fmt.Errorf("proxy: Options.Config is required")
	}
	h := &Handler{
		log:         opts.logger(),
		accessOut:   opts.AccessLog,
		tokens:      callertoken.NewRegistry(callertoken.Options{HTTPClient: opts.EntraHTTPClient}),
		upstreams:   map[string]*upstream{},
		deployments: map[string]*deployment{},
		passthrough: len(cfg.Deployments) == 0,
		maxBody:     int(cfg.MaxRequestBytes),
		res:         cfg.Resilience,
		backends: backend.NewRegistry(backend.Options{
			BreakerFailures: cfg.Resilience.BreakerFailures, BreakerOpen: cfg.Resilience.BreakerOpen,
			DefaultCooldown: cfg.Resilience.DefaultCooldown, MaxCooldown: cfg.Resilience.MaxCooldown, Now: opts.Now,
		}),
		budget:    backend.NewBudget(cfg.Resilience.RetryBudget, cfg.Resilience.MinRetriesPerSecond, opts.Now),
		now:       opts.Now,
		clientCAs: opts.ClientCAs,
		tokenWait: cfg.Timeouts.TokenAcquire,
	}
	if h.now == nil {
		h.now = time.Now
	}
	if opts.Transport != nil {
		h.transport = opts.Transport
	} else {
		h.own = NewTransport(cfg)
		h.transport = h.own
	}
	configured := map[string]bool{}
	for name := range cfg.Deployments {
		configured[name] = true
	}
	h.m = newMetrics(h.passthrough, configured, h.backends)
	if t, ok := h.transport.(*transport.Transport); ok {
		h.m.pools = newPoolCollector(t.Stats)
	}
	if opts.Registerer != nil {
		if err := h.m.register(opts.Registerer); err != nil {
			return nil, fmt.Errorf("registering proxy metrics: %w", err)
		}
	}
	for name, u := range cfg.Upstreams {
		src, ok := opts.Sources[name]
		if !ok {
			return nil, fmt.Errorf("proxy: no token source for upstream %q", name)
		}
		origin, err := transport.NewOrigin(u.URL)
		if err != nil {
			return nil, fmt.Errorf("upstream %q: %w", name, err)
		}
		if pool, err := u.Pool(); err != nil {
			return nil, fmt.Errorf("upstream %q: ca_file: %w", name, err)
		} else if pool != nil {
			sum := sha256.Sum256(u.CA)
			origin = origin.WithRoots(pool, hex.EncodeToString(sum[:8]))
		}
		streams := origin
		switch u.HTTP2Mode() {
		case config.HTTP2On:
			origin = origin.WithHTTP2()
			streams = origin
		case config.HTTP2Streams:
			streams = origin.WithHTTP2()
		}
		pu, err := url.Parse(u.URL)
		if err != nil {
			return nil, fmt.Errorf("upstream %q: %w", name, err)
		}
		h.upstreams[name] = &upstream{name: name, origin: origin, streams: streams, basePath: strings.TrimSuffix(pu.EscapedPath(), "/"), src: src}
	}
	if len(h.upstreams) == 1 {
		for _, up := range h.upstreams {
			h.only = up
		}
	}
	if err := h.SetCallers(cfg); err != nil {
		return nil, err
	}
	for name, d := range cfg.Deployments {
		dep := &deployment{name: name}
		var members []backend.Member
		for _, b := range d.Pool() {
			members = append(members, backend.Member{Backend: h.backends.Backend(b.Upstream, b.Deployment), Priority: b.Priority, Weight: b.Weight})
		}
		dep.pool = h.backends.NewPool(members)
		for _, m := range dep.pool.Members() {
			dep.ups = append(dep.ups, h.upstreams[m.Upstream])
			dep.names = append(dep.names, m.Deployment)
			dep.renames = dep.renames || m.Deployment != name
		}
		h.deployments[name] = dep
	}
	return h, nil
}

// SetCallers puts cfg's callers (and allow_unauthenticated) in force for the calls that start
// from now on; calls in flight keep the callers they started with.
func (h *Handler) SetCallers(cfg *config.Config) error {
	k, err := newCallers(cfg, &h.loads, h.tokens)
	if err != nil {
		return err
	}
	k.tokenWait = h.tokenWait // a timeout: the start's stays until a restart, as the others do
	h.callers.Store(k)
	h.maxAll.Store(int64(cfg.MaxConcurrent))
	return nil
}

// NewTransport returns the upstream transport for Config's timeouts, spare connections and
// upstream proxy (the HTTPS_PROXY and NO_PROXY config read at load).
func NewTransport(cfg *config.Config) *transport.Transport {
	t := cfg.Timeouts
	return transport.New(transport.Options{
		DialTimeout:           t.Dial,
		TLSHandshakeTimeout:   t.TLSHandshake,
		ResponseHeaderTimeout: t.ResponseHeader,
		StreamIdleTimeout:     t.StreamIdle,
		IdleTimeout:           t.UpstreamIdle,
		Spares:                cfg.SpareConnections,
		Proxy:                 cfg.UpstreamProxy.ProxyFunc(),
	})
}

// Close releases the upstream connections of a transport New made.
func (h *Handler) Close() {
	if h.own != nil {
		h.own.Close()
	}
}

// upstreamClient sends a request to an upstream, with authorization as its Authorization
// header (transport.Transport.Send); *transport.Transport is the one used.
type upstreamClient interface {
	Send(ctx context.Context, now time.Time, origin transport.Origin, req *transport.Request, authorization string, resp *fasthttp.Response) (*transport.Stream, error)
}

// Route prefixes.
const (
	prefixDeployments = "/openai/deployments/"
	prefixV1          = "/openai/v1/"
	prefixModels      = "/models/"
	prefixAPIModels   = "/api/models/"
)

// ServeFastHTTP handles one API call.
func (h *Handler) ServeFastHTTP(fc *fasthttp.RequestCtx) { h.serve(fc, nil) }

// serve serves a call on a connection whose read timeouts w keeps (nil: none are kept).
func (h *Handler) serve(fc *fasthttp.RequestCtx, w *connWait) {
	cs := h.callers.Load()
	clientID, badHeaders := checkHeaders(&fc.Request.Header)
	c := newCall(fc, cs, clientID)
	c.presented(&fc.Request.Header)
	// The body is read once the caller is known, within idle; so is whatever of it a call
	// leaves unread, which the server reads and drops after the answer. Once read whole
	// (readBody), nothing is read from the caller until the next request.
	c.wait = w
	w.waitIdle()
	h.m.inflight.Inc()
	defer func() {
		c.returnBody()
		p := recover()
		if c.streaming { // the stream writer finishes the call
			if p != nil { // after the hand-over, which leaves nothing to panic: logged, not re-raised
				h.logPanic(c, p)
			}
			return
		}
		w.waitAnswer()
		h.finish(c, p)
	}()

	path, query, _ := strings.Cut(string(fc.Request.Header.RequestURI()), "?")
	c.path = path
	c.query = query
	if e := checkPath(path); e != nil {
		// Logged up to the segment refused, and not at all if what is left holds a key.
		if c.path = refusedPath(path); cs.keyInPath(c.path) {
			c.path = "[REDACTED]"
		}
		h.fail(c, e)
		return
	}
	if cs.keyInPath(path) {
		// Refused whoever asks: the path would go upstream, and it is logged (without the key).
		c.path = "[REDACTED]"
		h.fail(c, keyInPath())
		return
	}
	if badHeaders != nil {
		h.fail(c, badHeaders)
		return
	}
	if !allowedMethod(fc.Request.Header.Method()) {
		// TRACE in particular: a hop that answers it echoes the request, bearer token and all.
		h.fail(c, errorf(http.StatusMethodNotAllowed, CodeMethodNotAllowed,
			"the gateway forwards only %s calls", allowedMethods))
		fc.Response.Header.Set("Allow", allowedMethods)
		return
	}
	switch {
	case strings.HasPrefix(path, prefixDeployments):
		h.serveDeployment(c, path[len(prefixDeployments):])
	case strings.HasPrefix(path, prefixV1):
		h.serveBodyRouted(c, v1ModelOps[path[len(prefixV1):]], false)
	case strings.HasPrefix(path, prefixModels):
		h.serveBodyRouted(c, foundryModelOps[path[len(prefixModels):]], true)
	case strings.HasPrefix(path, prefixAPIModels):
		h.serveBodyRouted(c, foundryModelOps[path[len(prefixAPIModels):]], true)
	default:
		h.fail(c, errorf(http.StatusNotFound, CodeNotFound,
			"no such route: the gateway serves /openai/deployments/{deployment}/…, /openai/v1/… and /models/…"))
	}
}

// serveDeployment serves /openai/deployments/{deployment}/{operation}; rest is what follows the
// prefix.
func (h *Handler) serveDeployment(c *call, rest string) {
	name, op, ok := strings.Cut(rest, "/")
	if !ok || op == "" {
		h.fail(c, errorf(http.StatusNotFound, CodeNotFound, "no operation after the deployment name"))
		return
	}
	cl, e := h.admit(c)
	if e != nil {
		h.fail(c, e)
		return
	}
	if !hasQueryParam(c.query, "api-version") {
		h.fail(c, errorf(http.StatusBadRequest, CodeMissingAPIVersion,
			"the api-version query parameter is required, e.g. ?api-version=2024-10-21"))
		return
	}
	d, e := h.resolve(c, cl, name)
	if e != nil {
		h.fail(c, e)
		return
	}
	body, e := h.readBody(c)
	if e != nil {
		h.fail(c, e)
		return
	}
	h.forward(c, d, &plan{op: op, body: body})
}

// allowedMethods are the methods the gateway forwards: Azure OpenAI's and Foundry's data-plane
// calls use no others.
const allowedMethods = "GET, HEAD, POST, DELETE"

func allowedMethod(m []byte) bool {
	switch string(m) {
	case "GET", "HEAD", "POST", "DELETE":
		return true
	}
	return false
}

// The operations of the body-routed routes that a POST names the deployment of in its body's
// model, by the path after the route's prefix. Every other call on those routes (the model
// list, a stored response or completion, files, batches, any other method) names none,
// whatever its body holds: its model is not what the upstream goes by, so it cannot be what
// the gateway authorises by.
var (
	v1ModelOps = map[string]bool{
		"chat/completions": true, "completions": true, "embeddings": true, "responses": true,
		"audio/transcriptions": true, "audio/translations": true, "audio/speech": true,
		"images/generations": true, "images/edits": true,
		"video/generations/jobs": true, "videos": true, // Sora (JSON) and Sora 2 (multipart)
	}
	foundryModelOps = map[string]bool{"chat/completions": true, "embeddings": true, "images/embeddings": true}
)

// serveBodyRouted serves /openai/v1/… and /models/…: modelOp says the call is one whose
// deployment is its body's model.
func (h *Handler) serveBodyRouted(c *call, modelOp, apiVersionRequired bool) {
	cl, e := h.admit(c)
	if e != nil {
		h.fail(c, e)
		return
	}
	if apiVersionRequired && !hasQueryParam(c.query, "api-version") {
		h.fail(c, errorf(http.StatusBadRequest, CodeMissingAPIVersion,
			"the api-version query parameter is required, e.g. ?api-version=2024-05-01-preview"))
		return
	}
	if modelOp = modelOp && string(c.fc.Request.Header.Method()) == "POST"; !modelOp {
		if e := h.namesNoDeployment(c, cl); e != nil {
			h.fail(c, e)
			return
		}
	}
	body, e := h.readBody(c)
	if e != nil {
		h.fail(c, e)
		return
	}
	if !modelOp {
		h.forward(c, &deployment{ups: []*upstream{h.only}}, &plan{path: c.path, body: body})
		return
	}
	ref, e := peekModel(string(c.fc.Request.Header.ContentType()), body)
	if e != nil {
		h.fail(c, e)
		return
	}
	if c.keys.holdsKey(readOnly(ref.name)) || c.credStr != "" && strings.Contains(ref.name, c.credStr) {
		// As a path holding a key (keyInPath): the name would be logged, and sent upstream.
		h.fail(c, errorf(http.StatusBadRequest, CodeInvalidBody, "the request body's \"model\" holds a caller's key or token"))
		return
	}
	if ref.name == "" {
		// Only callers allowed everything may name no model, as for the calls below.
		if !cl.all || h.only == nil {
			h.fail(c, errorf(http.StatusBadRequest, CodeMissingModel,
				"the request body must name the deployment in \"model\""))
			return
		}
		h.forward(c, &deployment{ups: []*upstream{h.only}}, &plan{path: c.path, body: body})
		return
	}
	d, e := h.resolve(c, cl, ref.name)
	if e != nil {
		h.fail(c, e)
		return
	}
	if d.renames && ref.start < 0 {
		h.fail(c, errorf(http.StatusBadRequest, CodeInvalidBody,
			"deployment %q is renamed by the gateway, which multipart bodies do not support; call it through /openai/deployments/%s/…", ref.name, ref.name))
		return
	}
	h.forward(c, d, &plan{path: c.path, body: body, ref: ref})
}

// namesNoDeployment admits a call that names no deployment (GET /openai/v1/models, a stored
// response by ID, files): it cannot be authorised per deployment, so only callers allowed
// everything may make it, and only when there is a single upstream to send it to.
func (h *Handler) namesNoDeployment(c *call, cl *caller) *apiError {
	what := string(c.fc.Request.Header.Method()) + " " + clip(c.path, 200)
	switch {
	case !cl.all:
		return errorf(http.StatusForbidden, CodeForbidden,
			"caller %q may not call %s: it names no deployment, and needs the allow-list [\"*\"]", cl.name, what)
	case h.only == nil:
		return errorf(http.StatusBadRequest, CodeMissingModel,
			"%s names no deployment, and the gateway has more than one upstream to send it to", what)
	}
	return nil
}

// peerOf is the client certificate the call's connection presented (nil if none), checked
// again for this call: the handshake verified it, but a connection outlives its certificate,
// and the client CAs can change under it.
func (h *Handler) peerOf(c *call) (*x509.Certificate, *apiError) {
	st := c.fc.TLSConnectionState()
	if st == nil || len(st.VerifiedChains) == 0 {
		return nil, nil
	}
	now := h.now()
	for _, cert := range st.VerifiedChains[0] {
		if now.After(cert.NotAfter) {
			return nil, errorf(http.StatusUnauthorized, CodeUnauthorized,
				"the client certificate, or one that signed it, has expired since the connection was made: connect again with a current one")
		}
	}
	leaf := st.VerifiedChains[0][0]
	if h.clientCAs == nil {
		return leaf, nil
	}
	cas := h.clientCAs()
	sc, _ := c.fc.Conn().(*servedTLSConn)
	if cas != nil && sc != nil && sc.checkedUnder.Load() == cas {
		return leaf, nil
	}
	if cas == nil || !chainsTo(st.PeerCertificates, cas, now) {
		return nil, errorf(http.StatusUnauthorized, CodeUnauthorized,
			"the client certificate no longer chains to the gateway's client CAs, which have changed since the connection was made")
	}
	if sc != nil {
		sc.checkedUnder.Store(cas)
	}
	return leaf, nil
}

// chainsTo reports whether certs (a leaf, then the intermediates its peer sent) verify to one
// of roots for client authentication at now, as the TLS handshake verifies them.
func chainsTo(certs []*x509.Certificate, roots *x509.CertPool, now time.Time) bool {
	if len(certs) == 0 {
		return false
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	_, err := certs[0].Verify(x509.VerifyOptions{
		Roots: roots, Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	return err == nil
}

// admit authenticates the caller and takes its places in the concurrency limits (given back by
// finish): the caller's own max_concurrent, then the gateway's.
func (h *Handler) admit(c *call) (*caller, *apiError) {
	peer, e := h.peerOf(c)
	if e != nil {
		return nil, e
	}
	var cl *caller
	if c.credential != nil {
		cl, e = c.keys.identify(c.credential, peer)
	} else {
		// No key, or keys the caller may not send together: authenticate says which.
		cl, _, e = c.keys.authenticate(&c.fc.Request.Header, peer)
	}
	if e != nil {
		return nil, e
	}
	c.caller = cl.name
	if c.credStr == "" && len(c.credential) > 0 {
		// Shorter than minKeyLength, and a key: scrubbed all the same.
		c.credStr = string(c.credential)
		c.credInID()
	}
	if c.credStr != "" && strings.Contains(c.path, c.credStr) {
		return nil, keyInPath()
	}
	if n := cl.load.Add(1); cl.max > 0 && n > cl.max {
		cl.load.Add(-1)
		return nil, tooBusy("caller %q has %d calls in flight, its max_concurrent", cl.name, cl.max)
	}
	if n, limit := h.inflight.Add(1), h.maxAll.Load(); limit > 0 && n > limit {
		h.inflight.Add(-1)
		cl.load.Add(-1)
		return nil, tooBusy("the gateway has %d calls in flight, its max_concurrent", limit)
	}
	c.admitted = cl
	return cl, nil
}

// presented takes the credential the caller sent, before anything else is read of the request:
// whether the call is refused for its path, its headers or its route, or for the credential
// itself, a key or token pasted elsewhere in the request is scrubbed from the call's log line and
// answer, and a request ID holding it replaced. A credential shorter than minKeyLength is left for
// admit to take, if it is a key: scrubbing a letter or two that is none would only garble the
// line. Headers that cannot be read as one credential (two api-keys, say) leave it to admit
// (authenticate) to say why the call is refused.
func (c *call) presented(h *fasthttp.RequestHeader) {
	cred, e := presentedKey(h)
	if e != nil || len(cred) == 0 {
		return
	}
	c.credential = cred
	if len(cred) >= minKeyLength {
		c.credStr = string(cred)
		c.credInID()
	}
}

// credInID gives the call a new request ID if the caller sent its credential as the request
// ID, which goes upstream, back to the caller and to the log.
func (c *call) credInID() {
	if c.credStr != "" && strings.Contains(c.id, c.credStr) {
		c.newID()
	}
}

// release gives back a call's places in the concurrency limits.
func (h *Handler) release(c *call) {
	if c.admitted != nil {
		c.admitted.load.Add(-1)
		h.inflight.Add(-1)
		c.admitted = nil
	}
}

// keyInPath is the answer to a request path holding a caller's key or token.
func keyInPath() *apiError {
	return errorf(http.StatusBadRequest, CodeInvalidPath,
		"the request path holds a caller's key or token: send it in the api-key or Authorization header")
}

func tooBusy(format string, args ...any) *apiError {
	e := errorf(http.StatusTooManyRequests, CodeTooManyCalls, format, args...)
	e.retryAfter = time.Second
	return e
}

// readBody reads the whole request body, bounded by max_request_bytes. Bodies are read after
// the caller is authenticated and before anything is sent upstream, so an oversized one is
// refused (413) without the upstream seeing a truncated request, and the body can be replayed.
func (h *Handler) readBody(c *call) ([]byte, *apiError) {
	req := &c.fc.Request
	if n := req.Header.ContentLength(); n > h.maxBody {
		return nil, tooLarge(h.maxBody)
	}
	stream := c.fc.RequestBodyStream()
	if stream == nil {
		body := req.Body()
		if len(body) > h.maxBody {
			return nil, tooLarge(h.maxBody)
		}
		c.bytesIn = len(body)
		c.wait.done()
		return body, nil
	}
	c.bodyBuf = bodyBufs.Get().(*[]byte)
	buf := (*c.bodyBuf)[:0]
	if n := req.Header.ContentLength(); n > cap(buf) {
		buf = make([]byte, 0, n)
	}
	defer func() { *c.bodyBuf = buf[:0] }() // keeps a buffer grown here for the next call
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := stream.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if len(buf) > h.maxBody {
			return nil, tooLarge(h.maxBody)
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, errorf(http.StatusBadRequest, CodeInvalidBody, "reading the request body failed")
		}
	}
	c.bytesIn = len(buf)
	c.wait.done() // nothing more is read from the caller during the call
	return buf, nil
}

// bodyBufs lends the buffers request bodies are read into. A call gives its buffer back when
// its handler returns: the upstream request, which points into it, has been sent by then (a
// relayed stream goes on without it).
var bodyBufs = sync.Pool{New: func() any { b := make([]byte, 0, 1024); return &b }}

// maxPooledBody is the largest body buffer kept for reuse.
const maxPooledBody = 64 << 10

func (c *call) returnBody() {
	if c.bodyBuf != nil {
		if cap(*c.bodyBuf) <= maxPooledBody {
			bodyBufs.Put(c.bodyBuf)
		}
		c.bodyBuf = nil
	}
}

func tooLarge(limit int) *apiError {
	return errorf(http.StatusRequestEntityTooLarge, CodeRequestTooLarge,
		"the request body exceeds the gateway's limit of %d bytes (max_request_bytes)", limit)
}

// resolve authorises the caller for an exposed deployment name and finds where it lives. A
// caller not allowed the name gets 403 whether or not it exists, so the allow-list does not
// leak the set of deployments.
func (h *Handler) resolve(c *call, cl *caller, name string) (*deployment, *apiError) {
	if !config.ValidDeploymentName(name) {
		return nil, errorf(http.StatusBadRequest, CodeInvalidPath,
			"%q is not a valid deployment name (letters, digits, '.', '-', '_'; at most 64)", clip(name, 80))
	}
	c.deployment = name
	if !cl.may(name) {
		return nil, errorf(http.StatusForbidden, CodeForbidden,
			"caller %q may not use deployment %q", cl.name, name)
	}
	if h.passthrough {
		// Names pass through to the only upstream, which alone decides; there is no pool.
		return &deployment{name: name, ups: []*upstream{h.only}, names: []string{name}}, nil
	}
	d, ok := h.deployments[name]
	if !ok {
		return nil, errorf(http.StatusNotFound, CodeDeploymentNotFound,
			"the gateway has no deployment named %q", name)
	}
	return d, nil
}

// fail answers with a gateway error.
func (h *Handler) fail(c *call, e *apiError) {
	e.message = c.scrub(e.message)
	c.code, c.err = e.code, e
	c.status = e.status
	writeError(c.fc, e, c.id)
}

// proxyError answers a failure to reach the upstream or to get a token, via statusFor.
func (h *Handler) proxyError(c *call, err error) {
	e := statusFor(err, c.upstream)
	c.code, c.err, c.status = e.code, err, e.status
	writeError(c.fc, e, c.id)
}
