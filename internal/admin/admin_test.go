package admin

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenproxy/tokenproxy/internal/broker"
)

type statuses []broker.Status

func (s statuses) Status() []broker.Status { return s }

func get(t *testing.T, h http.Handler, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
	return rec.Code, rec.Body.String()
}

func TestReadiness(t *testing.T) {
	reg := prometheus.NewRegistry()
	ok := broker.Status{Credential: "corp-app", Scope: "s", Ready: true, ExpiresOn: time.Now().Add(time.Hour)}
	bad := broker.Status{Credential: "other", Scope: "s", LastError: "client_secret: Entra rejected the token request (AADSTS7000215)"}

	h := New(Options{Gatherer: reg, Tokens: statuses{ok}})
	if code, body := get(t, h, "/readyz"); code != 200 || !strings.Contains(body, `"status": "ready"`) {
		t.Errorf("got %d %s, want 200 ready", code, body)
	}
	h.SetDraining()
	if code, body := get(t, h, "/readyz"); code != 503 || !strings.Contains(body, "shutting down") {
		t.Errorf("draining: got %d %s, want 503 shutting down", code, body)
	}

	h = New(Options{Gatherer: reg, Tokens: statuses{ok, bad}})
	code, body := get(t, h, "/readyz")
	var rd readiness
	json.Unmarshal([]byte(body), &rd)
	if code != 503 || len(rd.Reasons) != 1 || !strings.Contains(rd.Reasons[0], "credential other (s): client_secret: Entra rejected") {
		t.Errorf("got %d %s, want 503 naming the credential and why", code, body)
	}
	if code, _ := get(t, h, "/healthz"); code != 200 {
		t.Errorf("healthz got %d, want 200 even when not ready", code)
	}
	// A process that says it is stuck is not live: the probe restarts it.
	h = New(Options{Gatherer: reg, Tokens: statuses{ok}, Live: func() error { return errors.New("the log's destination has taken nothing for 42s") }})
	if code, body := get(t, h, "/healthz"); code != 503 || !strings.Contains(body, "taken nothing for 42s") {
		t.Errorf("stuck: healthz got %d %s, want 503 with the reason", code, body)
	}
}

func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "tokenproxy_test_total", Help: "x"})
	reg.MustRegister(c)
	c.Inc()
	h := New(Options{Gatherer: reg, Registerer: reg, Tokens: statuses{}})
	if code, body := get(t, h, "/metrics"); code != 200 || !strings.Contains(body, "tokenproxy_test_total 1") {
		t.Errorf("got %d %s, want the registry's metrics", code, body)
	}
	if code, _ := get(t, h, "/nope"); code != 404 {
		t.Errorf("got %d for an unknown path, want 404", code)
	}
	if code, _ := get(t, h, "/debug/pprof/"); code != 404 {
		t.Errorf("pprof answered %d while off, want 404", code)
	}
	h = New(Options{Gatherer: reg, Tokens: statuses{}, Pprof: true})
	if code, body := get(t, h, "/debug/pprof/"); code != 200 || !strings.Contains(body, "goroutine") {
		t.Errorf("pprof on: got %d, want the index", code)
	}
}

func TestAdminKey(t *testing.T) {
	reg := prometheus.NewRegistry()
	sum := sha256.Sum256([]byte("admin-key-0123456789"))
	h := New(Options{Gatherer: reg, Tokens: statuses{}, Pprof: true, KeySHA256: hex.EncodeToString(sum[:])})
	for _, path := range []string{"/metrics", "/debug/pprof/"} {
		if code, _ := get(t, h, path); code != 401 {
			t.Errorf("%s without the key: got %d, want 401", path, code)
		}
		req := httptest.NewRequest("GET", path, nil)
		req.Header.Set("Authorization", "Bearer admin-key-0123456789")
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != 200 {
			t.Errorf("%s with the key: got %d, want 200", path, rec.Code)
		}
	}
	for _, path := range []string{"/healthz", "/readyz"} {
		if code, _ := get(t, h, path); code != 200 {
			t.Errorf("%s must stay open for probes: got %d", path, code)
		}
	}
	// Behind a key, /readyz tells a probe its status, and the reasons only to the key's holder:
	// they carry Entra's errors (tenants, app IDs, addresses).
	bad := broker.Status{Credential: "corp-app", Scope: "s", LastError: "client_secret: Entra rejected the token request (AADSTS7000215) from 10.0.0.7"}
	h = New(Options{Gatherer: reg, Tokens: statuses{bad}, KeySHA256: hex.EncodeToString(sum[:])})
	if code, body := get(t, h, "/readyz"); code != 503 || !strings.Contains(body, `"status": "not ready"`) || strings.Contains(body, "corp-app") || strings.Contains(body, "AADSTS") {
		t.Errorf("/readyz without the key: got %d %s, want 503 and no reasons", code, body)
	}
	req := httptest.NewRequest("GET", "/readyz", nil)
	req.Header.Set("Authorization", "Bearer admin-key-0123456789")
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	if rec.Code != 503 || !strings.Contains(rec.Body.String(), "AADSTS7000215") {
		t.Errorf("/readyz with the key: got %d %s, want 503 with the reasons", rec.Code, rec.Body)
	}

	// A key's hash that is not one closes what it guards, rather than opening it to all.
	h = New(Options{Gatherer: reg, Tokens: statuses{}, Pprof: true, KeySHA256: "admin-key-0123456789"})
	for _, path := range []string{"/metrics", "/debug/pprof/"} {
		req := httptest.NewRequest("GET", path, nil)
		req.Header.Set("Authorization", "Bearer admin-key-0123456789")
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != 500 || strings.Contains(rec.Body.String(), "admin-key") {
			t.Errorf("%s behind a malformed hash: got %d %s, want 500 not quoting it", path, rec.Code, rec.Body)
		}
	}
}
