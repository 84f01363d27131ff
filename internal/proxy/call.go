package proxy

import (
	"errors"
	"net/http"
	"strings"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// call is one request's state. It is also the ResponseWriter every handler and the
// ReverseProxy write to, which is how the ErrorHandler and the access log find the state
// without a per-request context value.
type call struct {
	w          http.ResponseWriter
	start      time.Time
	proxyStart time.Time // when the call was handed to the upstream's proxy
	headerAt   time.Time // when response headers were written
	id         string
	idHeader   []string // {id}, shared by the upstream request and the response
	path       string   // as received, before any deployment rename

	caller, deployment, upstream string
	code                         string // gateway error code, if the gateway answered
	err                          error  // what went wrong, for the log
	status                       int
	bytesIn, bytesOut            int64
}

func newCall(w http.ResponseWriter, r *http.Request) *call {
	id := requestID(r.Header)
	return &call{w: w, start: time.Now(), id: id, idHeader: []string{id}, path: r.URL.Path, bytesIn: max(r.ContentLength, 0)}
}

func (c *call) Header() http.Header { return c.w.Header() }

func (c *call) WriteHeader(code int) {
	if c.status == 0 || c.status == statusClientClosed {
		c.status = code
		c.headerAt = time.Now()
	}
	c.w.WriteHeader(code)
}

func (c *call) Write(b []byte) (int, error) {
	if c.status == 0 {
		c.WriteHeader(http.StatusOK)
	}
	n, err := c.w.Write(b)
	c.bytesOut += int64(n)
	return n, err
}

// Unwrap lets http.ResponseController (used by ReverseProxy to flush streams) reach the
// server's writer.
func (c *call) Unwrap() http.ResponseWriter { return c.w }

// finish runs once per request, last: it recovers panics, then counts and logs the call.
func (h *Handler) finish(c *call, r *http.Request) {
	h.m.inflight.Dec()
	p := recover()
	// aborted: the response cannot be completed, so the connection must be cut (by panicking
	// with http.ErrAbortHandler, which the server handles quietly) and the caller sees a
	// truncated response rather than a clean but incomplete one. ReverseProxy itself aborts
	// this way when the caller or the upstream goes away mid-body.
	aborted := p == http.ErrAbortHandler
	if p != nil && !aborted {
		// The panic value and stack are logged; request headers are not, so no credential is.
		h.log.Error("panic serving request", zap.String("request_id", c.id), zap.Any("panic", p), zap.Stack("stack"))
		c.code, c.err = CodeInternal, errors.New("internal error")
		if c.status == 0 {
			c.Header()["X-Ms-Client-Request-Id"] = c.idHeader
			writeError(c, errorf(http.StatusInternalServerError, CodeInternal, "internal error (request %s)", c.id))
		} else {
			aborted = true
		}
	}
	status := c.status
	if status == 0 {
		status = statusClientClosed
	}
	h.observe(c, status)
	h.accessLog(c, r, status, aborted)
	if aborted {
		panic(http.ErrAbortHandler)
	}
}

func (h *Handler) accessLog(c *call, r *http.Request, status int, aborted bool) {
	ce := h.log.Check(zapcore.InfoLevel, "request")
	if ce == nil {
		return
	}
	end := time.Now()
	fields := make([]zap.Field, 0, 20)
	fields = append(fields,
		zap.String("request_id", c.id),
		zap.String("caller", c.caller),
		zap.String("deployment", c.deployment),
		zap.String("upstream", c.upstream),
		zap.String("method", r.Method),
		// The path only: query strings can carry things that do not belong in logs.
		zap.String("path", c.path),
		zap.Int("status", status),
		zap.Duration("duration", end.Sub(c.start)),
		zap.Int64("bytes_in", c.bytesIn),
		zap.Int64("bytes_out", c.bytesOut),
	)
	if v := apiVersion(r.URL.RawQuery); v != "" {
		fields = append(fields, zap.String("api_version", v))
	}
	if !c.proxyStart.IsZero() && !c.headerAt.IsZero() && c.code == "" {
		fields = append(fields, zap.Duration("upstream_duration", c.headerAt.Sub(c.proxyStart)))
	}
	rh := c.Header()
	if v := rh.Get("Apim-Request-Id"); v != "" {
		fields = append(fields, zap.String("apim_request_id", v))
	}
	if v := rh.Get("X-Ms-Region"); v != "" {
		fields = append(fields, zap.String("x_ms_region", v))
	}
	if strings.HasPrefix(rh.Get("Content-Type"), "text/event-stream") {
		fields = append(fields, zap.Bool("stream", true))
	}
	if c.code != "" {
		fields = append(fields, zap.String("error_code", c.code))
	}
	if c.err != nil {
		fields = append(fields, zap.String("error", c.err.Error()))
	}
	if aborted {
		fields = append(fields, zap.Bool("aborted", true))
	}
	ce.Write(fields...)
}

// apiVersion extracts api-version for the log; it is a date-like value, safe to log, and only
// kept when it looks like one.
func apiVersion(rawQuery string) string {
	for rawQuery != "" {
		var kv string
		kv, rawQuery, _ = strings.Cut(rawQuery, "&")
		if v, ok := strings.CutPrefix(kv, "api-version="); ok && len(v) <= 32 && saneID(v) {
			return v
		}
	}
	return ""
}
