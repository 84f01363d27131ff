// Package admin serves the gateway's operational endpoints, apart from the API: Prometheus
// metrics, liveness and readiness. Readiness is true only while every token source holds a
// valid token and the gateway is not shutting down; when false it says why.
package admin

import (
	"encoding/json"
	"net/http"
	"net/http/pprof"
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
}

// Handler serves /metrics, /healthz and /readyz.
type Handler struct {
	mux      *http.ServeMux
	tokens   StatusReporter
	draining atomic.Bool
}

// New returns the admin handler.
func New(opts Options) *Handler {
	h := &Handler{mux: http.NewServeMux(), tokens: opts.Tokens}
	var metrics http.Handler = promhttp.HandlerFor(opts.Gatherer, promhttp.HandlerOpts{})
	if opts.Registerer != nil {
		metrics = promhttp.InstrumentMetricHandler(opts.Registerer, metrics)
	}
	h.mux.Handle("GET /metrics", metrics)
	h.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	h.mux.HandleFunc("GET /readyz", h.readyz)
	if opts.Pprof {
		h.mux.HandleFunc("/debug/pprof/", pprof.Index)
		h.mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		h.mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		h.mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		h.mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	return h
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
