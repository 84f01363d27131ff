package proxy

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/valyala/fasthttp"

	"github.com/tokenproxy/tokenproxy/internal/config"
)

// caller is an authenticated client and what it may use.
type caller struct {
	name    string
	all     bool            // "*": every deployment
	allowed map[string]bool // exposed deployment names
	max     int64           // calls in flight allowed; 0: no cap
	load    *atomic.Int64   // calls in flight (shared by the caller's versions across reloads)
}

func (c *caller) may(deployment string) bool { return c.all || c.allowed[deployment] }

// callers is the set of callers in force; a reload replaces it whole.
type callers struct {
	byHash          map[[sha256.Size]byte]*caller
	anonymous       *caller
	unauthenticated bool
}

// loads keeps each caller name's in-flight count across reloads, so a reload cannot reset it.
type loads struct{ m sync.Map }

func (l *loads) get(name string) *atomic.Int64 {
	v, _ := l.m.LoadOrStore(name, new(atomic.Int64))
	return v.(*atomic.Int64)
}

func newCallers(cfg *config.Config, l *loads) (*callers, error) {
	k := &callers{byHash: map[[sha256.Size]byte]*caller{}, unauthenticated: cfg.AllowUnauthenticated}
	k.anonymous = &caller{name: "anonymous", all: true, load: l.get("anonymous")}
	for _, c := range cfg.Callers {
		cl := &caller{name: c.Name, allowed: map[string]bool{}, max: int64(c.MaxConcurrent), load: l.get(c.Name)}
		for _, d := range c.Deployments {
			if d == config.AllDeployments {
				cl.all = true
			}
			cl.allowed[d] = true
		}
		for _, hx := range c.KeyHashes {
			var h [sha256.Size]byte
			if n, err := hex.Decode(h[:], []byte(strings.ToLower(hx))); err != nil || n != len(h) {
				return nil, fmt.Errorf("caller %q: a key hash is not a hex SHA-256", c.Name)
			}
			k.byHash[h] = cl
		}
	}
	return k, nil
}

// authenticate identifies the caller from its api-key header (the Azure convention, and what
// Automation 360's CUSTOM_KEYS sends) or Authorization: Bearer (the OpenAI SDK convention).
// Exactly one key may be presented: two different ones are refused rather than guessed at.
func (k *callers) authenticate(h *fasthttp.RequestHeader) (*caller, *apiError) {
	key, err := presentedKey(h)
	if err != nil {
		return nil, err
	}
	if len(key) == 0 {
		if k.unauthenticated {
			return k.anonymous, nil
		}
		return nil, errorf(http.StatusUnauthorized, CodeUnauthorized,
			"missing gateway key: send it in the api-key header or as Authorization: Bearer <key>")
	}
	if c, ok := k.byHash[sha256.Sum256(key)]; ok {
		return c, nil
	}
	return nil, errorf(http.StatusUnauthorized, CodeUnauthorized, "unknown gateway key")
}

// presentedKey returns the key the caller sent (nil if none). The bytes are the request's:
// valid only while it is being served.
func presentedKey(h *fasthttp.RequestHeader) ([]byte, *apiError) {
	var apiKey, auth []byte
	var apiKeys, auths int
	for k, v := range h.All() {
		switch string(k) {
		case "Api-Key":
			apiKeys++
			apiKey = v
		case "Authorization":
			auths++
			auth = v
		}
	}
	if apiKeys > 1 || auths > 1 {
		return nil, errorf(http.StatusUnauthorized, CodeUnauthorized, "send a single api-key or Authorization header")
	}
	var fromAPIKey, fromBearer []byte
	if apiKeys == 1 {
		fromAPIKey = bytes.TrimSpace(apiKey)
		if len(fromAPIKey) == 0 {
			return nil, errorf(http.StatusUnauthorized, CodeUnauthorized, "the api-key header is empty")
		}
	}
	if auths == 1 {
		scheme, token, ok := bytes.Cut(bytes.TrimSpace(auth), []byte(" "))
		token = bytes.TrimSpace(token)
		if !ok || !bytes.EqualFold(scheme, []byte("Bearer")) || len(token) == 0 {
			return nil, errorf(http.StatusUnauthorized, CodeUnauthorized, "the Authorization header must be Bearer <key>")
		}
		fromBearer = token
	}
	if len(fromAPIKey) > 0 && len(fromBearer) > 0 && !bytes.Equal(fromAPIKey, fromBearer) {
		return nil, errorf(http.StatusUnauthorized, CodeUnauthorized, "api-key and Authorization carry different credentials; send one")
	}
	if len(fromAPIKey) > 0 {
		return fromAPIKey, nil
	}
	return fromBearer, nil
}
