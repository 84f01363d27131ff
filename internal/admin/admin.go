// Package admin serves the gateway's operational endpoints, apart from the API: Prometheus
// metrics, liveness and readiness. Readiness is true only while every token source holds a
// valid token and the gateway is not shutting down; when false it says why.
package admin

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/http/pprof"
	"strings"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/tokenproxy/tokenproxy/internal/broker"
)

// StatusReporter reports token sources; *broker.Broker is one.
type StatusReporter interface {
	Status() []broker.Status
}

// Options configure the admin handler.
type Options struct {
	// Gatherer is scraped by /metrics. Required.
	Gatherer prometheus.Gatherer
	// Registerer receives promhttp's own metrics. If nil, they are not registered.
	Registerer prometheus.Registerer
	// Tokens reports token sources for /readyz. Required.
	Tokens StatusReporter
	// Pprof adds Go's profiling endpoints under /debug/pprof/.
	Pprof bool
	// KeySHA256, if set, is the SHA-256 (hex) of the key /metrics and /debug/pprof/ require as
	// Authorization: Bearer. /healthz and /readyz stay open for probes; /readyz then gives its
	// reasons and the token sources' states (credential names, Entra's errors) only with the key.
	KeySHA256 string
	// Live, if set, says why the process is stuck (nil: it is not); /healthz then answers 503
	// with the reason, so that a liveness probe restarts it.
	Live func() error
}

// Handler serves /metrics, /healthz and /readyz.
type Handler struct {
	mux      *http.ServeMux
	tokens   StatusReporter
	draining atomic.Bool
	// keyed reports whether a request carries the admin key; nil when none is set (all do).
	keyed func(*http.Request) bool
}

// New returns the admin handler.
func New(opts Options) *Handler {
	h := &Handler{mux: http.NewServeMux(), tokens: opts.Tokens}
	var metrics http.Handler = promhttp.HandlerFor(opts.Gatherer, promhttp.HandlerOpts{})
	if opts.Registerer != nil {
		metrics = promhttp.InstrumentMetricHandler(opts.Registerer, metrics)
	}
	guard := keyGuard(opts.KeySHA256)
	if opts.KeySHA256 != "" {
		if h.keyed = hasKey(opts.KeySHA256); h.keyed == nil {
			h.keyed = func(*http.Request) bool { return false } // a malformed hash: no one has it
		}
	}
	h.mux.Handle("GET /metrics", guard(metrics))
	h.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		if opts.Live != nil {
			if err := opts.Live(); err != nil {
				writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "stuck", "reason": err.Error()})
				return
			}
		}
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	h.mux.HandleFunc("GET /readyz", h.readyz)
	if opts.Pprof {
		h.mux.Handle("/debug/pprof/", guard(http.HandlerFunc(pprof.Index)))
		h.mux.Handle("/debug/pprof/cmdline", guard(http.HandlerFunc(pprof.Cmdline)))
		h.mux.Handle("/debug/pprof/profile", guard(http.HandlerFunc(pprof.Profile)))
		h.mux.Handle("/debug/pprof/symbol", guard(http.HandlerFunc(pprof.Symbol)))
		h.mux.Handle("/debug/pprof/trace", guard(http.HandlerFunc(pprof.Trace)))
	}
	return h
}

// keyGuard requires Authorization: Bearer with the key whose SHA-256 is keyHex ("" lets all in).
// A keyHex that is not a SHA-256 in hex lets nobody in: a key meant is never dropped unseen.
func keyGuard(keyHex string) func(http.Handler) http.Handler {
	if keyHex == "" {
		return func(h http.Handler) http.Handler { return h }
	}
	has := hasKey(keyHex)
	if has == nil {
		return func(http.Handler) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				writeJSON(w, http.StatusInternalServerError, map[string]string{"error": "the admin key's hash is not a SHA-256 in hex: this endpoint is closed"})
			})
		}
	}
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if !has(r) {
				w.Header().Set("WWW-Authenticate", `Bearer realm="tokenproxy-admin"`)
				writeJSON(w, http.StatusUnauthorized, map[string]string{"error": "this endpoint needs the admin key (Authorization: Bearer)"})
				return
			}
			next.ServeHTTP(w, r)
		})
	}
}

// hasKey returns whether a request carries, as Authorization: Bearer, the key whose SHA-256 is
// keyHex, compared in constant time; nil if keyHex is not a SHA-256 in hex.
func hasKey(keyHex string) func(*http.Request) bool {
	want, err := hex.DecodeString(strings.ToLower(keyHex))
	if err != nil || len(want) != sha256.Size {
		return nil
	}
	return func(r *http.Request) bool {
		key, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		got := sha256.Sum256([]byte(key))
		return ok && subtle.ConstantTimeCompare(got[:], want) == 1
	}
}

// SetDraining marks the gateway as shutting down: /readyz answers 503 from now on.
func (h *Handler) SetDraining() { h.draining.Store(true) }

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) { h.mux.ServeHTTP(w, r) }

type readiness struct {
	Status   string          `json:"status"`
	Draining bool            `json:"draining,omitempty"`
	Reasons  []string        `json:"reasons,omitempty"`
	Tokens   []broker.Status `json:"tokens"`
}

func (h *Handler) readyz(w http.ResponseWriter, r *http.Request) {
	rd := readiness{Status: "ready", Tokens: h.tokens.Status()}
	if h.draining.Load() {
		rd.Draining = true
		rd.Reasons = append(rd.Reasons, "shutting down")
	}
	for _, s := range rd.Tokens {
		if !s.Ready {
			rd.Reasons = append(rd.Reasons, "credential "+s.Credential+" ("+s.Scope+"): "+s.LastError)
		}
	}
	status := http.StatusOK
	if len(rd.Reasons) > 0 {
		rd.Status, status = "not ready", http.StatusServiceUnavailable
	}
	if h.keyed != nil && !h.keyed(r) {
		// What a probe needs; the reasons (Entra's errors, addresses) are for the operator.
		writeJSON(w, status, map[string]string{"status": rd.Status, "detail": "the reasons and token states need the admin key (Authorization: Bearer)"})
		return
	}
	writeJSON(w, status, rd)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}
