// Package callertoken verifies the Entra ID access tokens callers present (an Automation 360
// custom model in OAUTH2 mode, an application with its own identity). A token is accepted only
// if it is signed by one of its tenant's current keys, was issued by that tenant (v1 or v2
// format), is within its validity (30 s of clock skew on exp, 4½ min on nbf) and uses RS256:
// "none", HMAC and any other algorithm are refused before a key is looked at.
//
// go-oidc does the OpenID discovery and the claim checks. Its remote key set, though, refetches
// the keys for every token with an unknown key ID, which would let anyone make the gateway
// hammer Entra; the key set here refetches on an unknown key ID at most once per MinRefresh,
// coalescing concurrent needs, and otherwise every RefreshEvery, so key rotation is followed
// without being a lever.
package callertoken

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/coreos/go-oidc/v3/oidc"
	"github.com/go-jose/go-jose/v4"
	"golang.org/x/sync/singleflight"
)

// Options configure a Registry.
type Options struct {
	// HTTPClient fetches discovery documents and keys. If nil, a client with a 10s timeout.
	HTTPClient *http.Client
	// Now is the clock. If nil, time.Now.
	Now func() time.Time
	// MinRefresh is the least time between key refetches prompted by unknown key IDs. If zero, 5m.
	MinRefresh time.Duration
	// RefreshEvery is how old the keys may grow before a refetch. If zero, 24h.
	RefreshEvery time.Duration
}

func (o Options) client() *http.Client {
	if o.HTTPClient == nil {
		return &http.Client{Timeout: 10 * time.Second}
	}
	return o.HTTPClient
}

func (o Options) now() time.Time {
	if o.Now == nil {
		return time.Now()
	}
	return o.Now()
}

// expirySkew is how long after exp a token is still accepted, for clock differences.
const expirySkew = 30 * time.Second

// discoveryRetry is the least time between failed discovery attempts for a tenant.
const discoveryRetry = 10 * time.Second

// maxErrorText bounds the text of an error about a token or a tenant's keys: parts of it are
// the token's (its algorithm, a key ID that is not a string), which its bearer chooses, or a
// failed response's body, and it goes into the caller's answer and the access log.
const maxErrorText = 200

// bounded is err's text cut to maxErrorText bytes (on a character's boundary).
func bounded(err error) string {
	s := err.Error()
	if len(s) <= maxErrorText {
		return s
	}
	cut := maxErrorText
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}

// ErrUnavailable is wrapped by errors that come from not reaching the tenant's keys, as
// opposed to a bad token: the caller may try again.
var ErrUnavailable = errors.New("the tenant's signing keys are unavailable")

// Registry keeps one Verifier per (authority, tenant), across configuration reloads.
type Registry struct {
	opts      Options
	mu        sync.Mutex
	verifiers map[string]*Verifier
}

// NewRegistry returns an empty registry.
func NewRegistry(opts Options) *Registry {
	return &Registry{opts: opts, verifiers: map[string]*Verifier{}}
}

// Verifier returns the verifier for tenantID on authorityHost ("" for the public cloud).
func (r *Registry) Verifier(authorityHost, tenantID string) *Verifier {
	if authorityHost == "" {
		authorityHost = "https://login.microsoftonline.com/"
	}
	if !strings.HasSuffix(authorityHost, "/") {
		authorityHost += "/"
	}
	tenantID = strings.ToLower(tenantID)
	key := authorityHost + tenantID
	r.mu.Lock()
	defer r.mu.Unlock()
	if v, ok := r.verifiers[key]; ok {
		return v
	}
	v := &Verifier{opts: &r.opts, tenant: tenantID, v2Issuer: authorityHost + tenantID + "/v2.0", v1Issuer: v1Issuer(authorityHost, tenantID)}
	r.verifiers[key] = v
	return v
}

// v1Issuer is the iss of the tenant's v1 access tokens.
func v1Issuer(authorityHost, tenant string) string {
	if u, err := url.Parse(authorityHost); err == nil && strings.HasSuffix(u.Hostname(), "chinacloudapi.cn") {
		return "https://sts.chinacloudapi.cn/" + tenant + "/"
	}
	return "https://sts.windows.net/" + tenant + "/"
}

// Claims are what a verified token says about its bearer.
type Claims struct {
	TenantID string
	ObjectID string
	AppID    string // azp (v2) or appid (v1)
	Audience []string
	Roles    []string
	// Delegated: the token was issued to a user, through the application AppID (it carries
	// scopes, scp); otherwise to the application itself (client credentials).
	Delegated bool
	ExpiresOn time.Time
}

// Verifier verifies one tenant's tokens.
type Verifier struct {
	opts               *Options
	tenant             string
	v1Issuer, v2Issuer string

	init    singleflight.Group
	mu      sync.Mutex
	v1, v2  *oidc.IDTokenVerifier
	ks      *keySet
	failed  error
	retryAt time.Time
}

// Issuers are the iss values of the tenant's v1 and v2 tokens.
func (v *Verifier) Issuers() []string { return []string{v.v1Issuer, v.v2Issuer} }

// Issuer reads iss from a JWT without verifying it, to find which tenant's verifier applies.
func Issuer(raw string) (string, error) { return unverifiedIssuer(raw) }

// Verify checks raw and returns its claims.
func (v *Verifier) Verify(ctx context.Context, raw string) (Claims, error) {
	iss, err := unverifiedIssuer(raw)
	if err != nil {
		return Claims{}, err
	}
	if iss != v.v1Issuer && iss != v.v2Issuer {
		return Claims{}, fmt.Errorf("the token was not issued by tenant %s", v.tenant)
	}
	v1, v2, err := v.verifiers(ctx)
	if err != nil {
		return Claims{}, err
	}
	verifier := v2
	if iss == v.v1Issuer {
		verifier = v1
	}
	var fetchErr error
	tok, err := verifier.Verify(context.WithValue(ctx, fetchErrKey{}, &fetchErr), raw)
	if fetchErr != nil {
		// The keys could not be fetched (ErrUnavailable), which go-oidc's error no longer says.
		return Claims{}, fetchErr
	}
	if err != nil {
		return Claims{}, errors.New(bounded(err))
	}
	var c struct {
		TenantID string   `json:"tid"`
		ObjectID string   `json:"oid"`
		AZP      string   `json:"azp"`
		AppID    string   `json:"appid"`
		Roles    []string `json:"roles"`
		Scopes   string   `json:"scp"`
	}
	if err := tok.Claims(&c); err != nil {
		return Claims{}, errors.New(bounded(err))
	}
	if !strings.EqualFold(c.TenantID, v.tenant) {
		return Claims{}, fmt.Errorf("the token's tid is not tenant %s", v.tenant)
	}
	appID := c.AZP
	if appID == "" {
		appID = c.AppID
	}
	if appID == "" {
		// Every access token names the application it was issued to; an ID token, which
		// carries a signed-in user's oid and roles for the gateway's own app, does not.
		return Claims{}, errors.New("the token is not an access token: it names no application (azp or appid), as an ID token does not")
	}
	return Claims{TenantID: c.TenantID, ObjectID: c.ObjectID, AppID: appID, Audience: tok.Audience, Roles: c.Roles, Delegated: c.Scopes != "", ExpiresOn: tok.Expiry}, nil
}

// verifiers discovers the tenant on first use (and again after a failure, at most every
// discoveryRetry). A call waits for the discovery no longer than ctx allows; the discovery goes
// on without it.
func (v *Verifier) verifiers(ctx context.Context) (*oidc.IDTokenVerifier, *oidc.IDTokenVerifier, error) {
	v.mu.Lock()
	v1, v2, failed, retryAt := v.v1, v.v2, v.failed, v.retryAt
	v.mu.Unlock()
	if v2 != nil {
		return v1, v2, nil
	}
	if failed != nil && v.opts.now().Before(retryAt) {
		return nil, nil, failed
	}
	select {
	case r := <-v.init.DoChan("", func() (any, error) { return nil, v.discover() }):
		if r.Err != nil {
			return nil, nil, r.Err
		}
	case <-ctx.Done():
		return nil, nil, fmt.Errorf("%w: discovering tenant %s: %v", ErrUnavailable, v.tenant, ctx.Err())
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.v1, v.v2, nil
}

func (v *Verifier) discover() error {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	ctx = oidc.ClientContext(ctx, v.opts.client())
	provider, err := oidc.NewProvider(ctx, v.v2Issuer)
	var jwks struct {
		URI string `json:"jwks_uri"`
	}
	if err == nil {
		err = provider.Claims(&jwks)
	}
	if err == nil && jwks.URI == "" {
		err = errors.New("the discovery document has no jwks_uri")
	}
	if err != nil {
		err = fmt.Errorf("%w: discovering tenant %s: %s", ErrUnavailable, v.tenant, bounded(err))
		v.mu.Lock()
		v.failed, v.retryAt = err, v.opts.now().Add(discoveryRetry)
		v.mu.Unlock()
		return err
	}
	ks := &keySet{opts: v.opts, url: jwks.URI}
	cfg := &oidc.Config{
		SkipClientIDCheck:    true, // audiences are matched by the caller of Verify
		SupportedSigningAlgs: []string{oidc.RS256},
		Now:                  func() time.Time { return v.opts.now().Add(-expirySkew) },
	}
	v.mu.Lock()
	v.ks = ks
	v.v1 = oidc.NewVerifier(v.v1Issuer, ks, cfg)
	v.v2 = oidc.NewVerifier(v.v2Issuer, ks, cfg)
	v.failed = nil
	v.mu.Unlock()
	return nil
}

// unverifiedIssuer reads iss from a JWT without verifying it, to pick the verifier.
func unverifiedIssuer(raw string) (string, error) {
	parts := strings.Split(raw, ".")
	if len(parts) != 3 || !canonical(parts[0]) || !canonical(parts[1]) || !canonical(parts[2]) {
		return "", errors.New("the token is not a JWT")
	}
	if err := checkAlg(parts[0]); err != nil {
		return "", err
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return "", errors.New("the token is not a JWT")
	}
	var c struct {
		Issuer string `json:"iss"`
	}
	if err := json.Unmarshal(payload, &c); err != nil {
		return "", errors.New("the token is not a JWT")
	}
	return c.Issuer, nil
}

var errNotRS256 = errors.New("the token is not signed with RS256, as Entra signs access tokens")

// checkAlg requires the JOSE header seg to name RS256 as its algorithm, once and in that
// spelling, before the verifier reads it: the verifier's error for another algorithm quotes
// it, and the header is the caller's to write (another caller's key there would be quoted, and
// past the length an error is cut at, no longer recognised as a key).
func checkAlg(seg string) error {
	h, err := base64.RawURLEncoding.DecodeString(seg)
	if err != nil {
		return errors.New("the token is not a JWT")
	}
	dec := json.NewDecoder(bytes.NewReader(h))
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return errors.New("the token is not a JWT")
	}
	algs := 0
	for dec.More() {
		t, err := dec.Token()
		var v json.RawMessage
		if err == nil {
			err = dec.Decode(&v)
		}
		if err != nil {
			return errors.New("the token is not a JWT")
		}
		if k, _ := t.(string); strings.EqualFold(k, "alg") {
			if k != "alg" || string(v) != `"RS256"` {
				return errNotRS256
			}
			algs++
		}
	}
	if algs != 1 {
		return errNotRS256
	}
	return nil
}

// canonical reports whether seg is a non-empty segment of a compact JWT in the one spelling its
// bytes have: base64url without padding, and the last character's unused bits zero. go-jose
// removes whitespace anywhere in a token before it checks the signature, and Go's base64 ignores
// line breaks and, unless strict, the unused bits; without this check one valid token would have
// endless spellings, each a verification and an entry of its own in the caller's cache of
// verified tokens (whose hash is of the spelling), which its bearer could fill and so empty.
func canonical(seg string) bool {
	if seg == "" || len(seg)%4 == 1 {
		return false
	}
	for i := 0; i < len(seg); i++ {
		if b64Value(seg[i]) < 0 {
			return false
		}
	}
	switch last := b64Value(seg[len(seg)-1]); len(seg) % 4 {
	case 2: // 12 bits for one byte: the last character's low 4 bits are unused
		return last&0x0f == 0
	case 3: // 18 bits for two bytes: its low 2 bits are unused
		return last&0x03 == 0
	}
	return true
}

// b64Value is c's value in the base64url alphabet, or -1.
func b64Value(c byte) int {
	switch {
	case 'A' <= c && c <= 'Z':
		return int(c - 'A')
	case 'a' <= c && c <= 'z':
		return int(c-'a') + 26
	case '0' <= c && c <= '9':
		return int(c-'0') + 52
	case c == '-':
		return 62
	case c == '_':
		return 63
	}
	return -1
}

// keySet is a tenant's signing keys (JWKS), refetched when they are old, or when a token names
// an unknown key ID (at most once per MinRefresh); after a failed fetch, the next is made no
// sooner than retryFailed.
type keySet struct {
	opts *Options
	url  string

	fetch   singleflight.Group
	mu      sync.Mutex
	keys    []jose.JSONWebKey
	fetched time.Time // when keys were last fetched
	tried   time.Time // when a fetch was last attempted
	failed  error     // why the last fetch failed, if it did (tried is after fetched)
}

// retryFailed is how long after a failed fetch of the keys the next may be made: tokens
// arriving meanwhile, forged ones too, neither cause nor wait for one.
func (k *keySet) retryFailed() time.Duration { return min(k.minRefresh(), 30*time.Second) }

var _ oidc.KeySet = (*keySet)(nil)

func (k *keySet) minRefresh() time.Duration {
	if k.opts.MinRefresh <= 0 {
		return 5 * time.Minute
	}
	return k.opts.MinRefresh
}

func (k *keySet) refreshEvery() time.Duration {
	if k.opts.RefreshEvery <= 0 {
		return 24 * time.Hour
	}
	return k.opts.RefreshEvery
}

// fetchErrKey keys, in the context go-oidc hands VerifySignature, where Verify wants to hear that
// the keys could not be fetched: go-oidc reports VerifySignature's error as text, so
// errors.Is(err, ErrUnavailable) would not find it.
type fetchErrKey struct{}

// fetchFailed tells Verify, through ctx, that the keys could not be fetched, and returns err.
func fetchFailed(ctx context.Context, err error) error {
	if p, ok := ctx.Value(fetchErrKey{}).(*error); ok {
		*p = err
	}
	return err
}

// VerifySignature implements oidc.KeySet.
func (k *keySet) VerifySignature(ctx context.Context, raw string) ([]byte, error) {
	jws, err := jose.ParseSigned(raw, []jose.SignatureAlgorithm{jose.RS256})
	if err != nil {
		return nil, fmt.Errorf("malformed token: %w", err)
	}
	if len(jws.Signatures) != 1 {
		return nil, errors.New("the token must carry exactly one signature")
	}
	kid := jws.Signatures[0].Header.KeyID
	now := k.opts.now()

	k.mu.Lock()
	stale := k.keys == nil || now.Sub(k.fetched) > k.refreshEvery()
	k.mu.Unlock()
	if stale {
		if err := k.refresh(ctx); err != nil && k.lookup(kid) == nil {
			return nil, fetchFailed(ctx, err)
		}
	}
	key := k.lookup(kid)
	if key == nil {
		k.mu.Lock()
		may := now.Sub(k.tried) >= k.minRefresh()
		k.mu.Unlock()
		if may {
			if err := k.refresh(ctx); err != nil {
				return nil, fetchFailed(ctx, err)
			}
			key = k.lookup(kid)
		}
	}
	if key == nil {
		if len(kid) > 64 {
			// The caller chooses it: quoted, it would make the error (and the log) as long as
			// a request header may be, and a part of it would be a part of whatever it holds.
			// Entra's are 27–44 characters.
			return nil, fmt.Errorf("the token is signed with a key ID of %d characters, which is not one of the tenant's", len(kid))
		}
		return nil, fmt.Errorf("the token is signed with key %q, which is not one of the tenant's", kid)
	}
	return jws.Verify(key)
}

func (k *keySet) lookup(kid string) *jose.JSONWebKey {
	k.mu.Lock()
	defer k.mu.Unlock()
	for i := range k.keys {
		if k.keys[i].KeyID == kid && k.keys[i].Use != "enc" {
			return &k.keys[i]
		}
	}
	return nil
}

// refresh fetches the keys; concurrent calls share one fetch, which each waits for no longer
// than its ctx allows (the fetch goes on). Within retryFailed of a failed fetch it fetches
// nothing and returns that fetch's error.
func (k *keySet) refresh(ctx context.Context) error {
	ch := k.fetch.DoChan("", func() (any, error) {
		k.mu.Lock()
		now := k.opts.now()
		if k.failed != nil && now.Sub(k.tried) < k.retryFailed() {
			err := k.failed
			k.mu.Unlock()
			return nil, err
		}
		k.tried = now
		k.mu.Unlock()
		err := k.fetchKeys()
		k.mu.Lock()
		k.failed = err
		k.mu.Unlock()
		return nil, err
	})
	select {
	case r := <-ch:
		return r.Err
	case <-ctx.Done():
		return fmt.Errorf("%w: fetching %s: %v", ErrUnavailable, k.url, ctx.Err())
	}
}

// fetchKeys fetches the tenant's keys into k.
func (k *keySet) fetchKeys() error {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, k.url, nil)
	if err != nil {
		return err
	}
	resp, err := k.opts.client().Do(req)
	if err != nil {
		return fmt.Errorf("%w: fetching %s: %s", ErrUnavailable, k.url, bounded(err))
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%w: fetching %s: HTTP %d", ErrUnavailable, k.url, resp.StatusCode)
	}
	var set jose.JSONWebKeySet
	if err := json.NewDecoder(http.MaxBytesReader(nil, resp.Body, 1<<20)).Decode(&set); err != nil {
		return fmt.Errorf("%w: decoding %s: %s", ErrUnavailable, k.url, bounded(err))
	}
	if len(set.Keys) == 0 {
		// Counted as a failure, so that it is not fetched again for every token meanwhile.
		return fmt.Errorf("%w: %s holds no keys", ErrUnavailable, k.url)
	}
	k.mu.Lock()
	k.keys, k.fetched = set.Keys, k.opts.now()
	k.mu.Unlock()
	return nil
}
