package callertoken

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/google/uuid"

	"github.com/tokenproxy/tokenproxy/internal/emulator"
)

const (
	tenant  = "00000000-0000-0000-0000-000000000000"
	gateway = "55555555-5555-5555-5555-555555555555" // the gateway's own app (the API callers call)
	a360    = "44444444-4444-4444-4444-444444444444" // a calling application
)

type clock struct{ offset atomic.Int64 }

func (c *clock) now() time.Time          { return time.Now().Add(time.Duration(c.offset.Load())) }
func (c *clock) advance(d time.Duration) { c.offset.Add(int64(d)) }

type fixture struct {
	emu *emulator.Emulator
	reg *Registry
	v   *Verifier
	clk *clock
}

func setup(t *testing.T) *fixture {
	t.Helper()
	emu, err := emulator.Start(emulator.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(emu.Close)
	emu.AddResource(emulator.Resource{URI: "api://tokenproxy", AppID: gateway, Version: 2})
	emu.AddResource(emulator.Resource{URI: "api://tokenproxy-v1", Version: 1})
	emu.AddApp(emulator.App{TenantID: tenant, ClientID: a360, Roles: []string{"Gateway.Invoke"}})
	clk := &clock{}
	reg := NewRegistry(Options{HTTPClient: emu.CA().Client(), Now: clk.now})
	return &fixture{emu: emu, reg: reg, v: reg.Verifier(emu.URL(), tenant), clk: clk}
}

func (f *fixture) token(t *testing.T, resource string) string {
	t.Helper()
	tok, err := f.emu.IssueToken(a360, resource)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func TestV2AndV1Tokens(t *testing.T) {
	f := setup(t)
	c, err := f.v.Verify(t.Context(), f.token(t, "api://tokenproxy"))
	if err != nil {
		t.Fatalf("v2 token: %v", err)
	}
	if c.AppID != a360 || c.TenantID != tenant || len(c.Audience) != 1 || c.Audience[0] != gateway || c.Roles[0] != "Gateway.Invoke" {
		t.Errorf("v2 claims %+v", c)
	}
	c, err = f.v.Verify(t.Context(), f.token(t, "api://tokenproxy-v1"))
	if err != nil {
		t.Fatalf("v1 token: %v", err)
	}
	if c.AppID != a360 || c.Audience[0] != "api://tokenproxy-v1" {
		t.Errorf("v1 claims %+v", c)
	}
}

// forge signs claims as an attacker would, with header fields of its choosing.
func forge(t *testing.T, method jwt.SigningMethod, key any, header map[string]any, claims jwt.MapClaims) string {
	t.Helper()
	tok := jwt.NewWithClaims(method, claims)
	for k, v := range header {
		tok.Header[k] = v
	}
	s, err := tok.SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// realKID returns a key ID the tenant publishes.
func realKID(t *testing.T, f *fixture) string {
	t.Helper()
	parts := strings.Split(f.token(t, "api://tokenproxy"), ".")
	h, _ := base64.RawURLEncoding.DecodeString(parts[0])
	var hdr struct{ Kid string }
	json.Unmarshal(h, &hdr)
	return hdr.Kid
}

func TestRefusedTokens(t *testing.T) {
	f := setup(t)
	f.v.Verify(t.Context(), f.token(t, "api://tokenproxy")) // discovery and keys are in
	kid := realKID(t, f)
	valid := jwt.MapClaims{
		"iss": f.emu.URL() + tenant + "/v2.0", "tid": tenant, "aud": gateway, "azp": a360, "oid": uuid.NewString(),
		"iat": time.Now().Unix(), "nbf": time.Now().Unix(), "exp": time.Now().Add(time.Hour).Unix(),
	}
	attacker, _ := rsa.GenerateKey(rand.Reader, 2048)

	// Another tenant in the same authority.
	f.emu.AddApp(emulator.App{TenantID: "99999999-0000-0000-0000-000000000000", ClientID: "other-tenant-app"})
	otherTenant, _ := f.emu.IssueToken("other-tenant-app", "api://tokenproxy")

	// An independent issuer: its own keys, claiming to be our tenant's.
	other, err := emulator.NewAuthority(emulator.AuthorityOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	other.AddResource(emulator.Resource{URI: "api://tokenproxy", AppID: gateway, Version: 2})
	other.AddApp(emulator.App{TenantID: tenant, ClientID: a360})
	foreign, _ := other.IssueToken(a360, "api://tokenproxy")

	// HS256 "signed" with the tenant's public key as the HMAC secret (algorithm confusion).
	hsHeader, _ := json.Marshal(map[string]string{"alg": "HS256", "typ": "JWT", "kid": kid})
	payload, _ := json.Marshal(valid)
	signing := base64.RawURLEncoding.EncodeToString(hsHeader) + "." + base64.RawURLEncoding.EncodeToString(payload)
	pub := f.v.mustKey(t, kid)
	mac := hmac.New(sha256.New, pub)
	mac.Write([]byte(signing))
	confused := signing + "." + base64.RawURLEncoding.EncodeToString(mac.Sum(nil))

	noneTok := forge(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, map[string]any{"kid": kid}, valid)

	expired := jwt.MapClaims{}
	for k, v := range valid {
		expired[k] = v
	}
	expired["exp"] = time.Now().Add(-2 * time.Minute).Unix()

	idToken, err := f.emu.IssueIDToken(tenant, gateway, uuid.NewString(), []string{"Gateway.Invoke"})
	if err != nil {
		t.Fatal(err)
	}

	for _, tt := range []struct{ name, token string }{
		{"a user's ID token for the gateway's app", idToken},
		{"another tenant", otherTenant},
		{"an independent issuer", foreign},
		{"our issuer, the attacker's key and kid", forge(t, jwt.SigningMethodRS256, attacker, map[string]any{"kid": "attacker"}, valid)},
		{"our issuer and kid, the attacker's key", forge(t, jwt.SigningMethodRS256, attacker, map[string]any{"kid": kid}, valid)},
		{"alg none", noneTok},
		{"HS256 keyed with the public key", confused},
		{"expired beyond the skew", forge(t, jwt.SigningMethodRS256, attacker, map[string]any{"kid": kid}, expired)},
		{"not a JWT", "tpk_not-a-jwt"},
		{"garbage payload", "eyJhbGciOiJSUzI1NiJ9.!!!.sig"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if c, err := f.v.Verify(t.Context(), tt.token); err == nil {
				t.Errorf("accepted, claims %+v", c)
			}
		})
	}

	// Genuinely expired tokens of the tenant: refused past the 30s skew, accepted within it.
	f.emu.SetTokenLifetime(-time.Minute, 0)
	if _, err := f.v.Verify(t.Context(), f.token(t, "api://tokenproxy")); err == nil {
		t.Error("a token expired a minute ago was accepted")
	}
	f.emu.SetTokenLifetime(-10*time.Second, 0)
	if _, err := f.v.Verify(t.Context(), f.token(t, "api://tokenproxy")); err != nil {
		t.Errorf("a token expired 10s ago (within the skew) was refused: %v", err)
	}
}

// mustKey returns a published public key's modulus, as anyone can read it from the JWKS.
func (v *Verifier) mustKey(t *testing.T, kid string) []byte {
	t.Helper()
	if k := v.ks.lookup(kid); k != nil {
		return k.Key.(*rsa.PublicKey).N.Bytes()
	}
	t.Fatalf("no key %s", kid)
	return nil
}

func TestKeyRotationAndRefetchLimit(t *testing.T) {
	f := setup(t)
	if _, err := f.v.Verify(t.Context(), f.token(t, "api://tokenproxy")); err != nil {
		t.Fatal(err)
	}
	fetches := f.emu.JWKSFetches()

	// Tokens naming made-up key IDs: at most one refetch, however many arrive.
	attacker, _ := rsa.GenerateKey(rand.Reader, 2048)
	for range 50 {
		claims := jwt.MapClaims{"iss": f.emu.URL() + tenant + "/v2.0", "tid": tenant, "aud": gateway, "exp": time.Now().Add(time.Hour).Unix()}
		if _, err := f.v.Verify(t.Context(), forge(t, jwt.SigningMethodRS256, attacker, map[string]any{"kid": uuid.NewString()}, claims)); err == nil {
			t.Fatal("a token with an unknown key ID was accepted")
		}
	}
	if n := f.emu.JWKSFetches() - fetches; n > 1 {
		t.Errorf("50 tokens with unknown key IDs caused %d key fetches, want at most 1", n)
	}

	// Entra rolls its keys: tokens signed with the new key verify once the refetch limit allows.
	if err := f.emu.RotateKeys(false); err != nil {
		t.Fatal(err)
	}
	newTok := f.token(t, "api://tokenproxy")
	f.clk.advance(5 * time.Minute)
	if _, err := f.v.Verify(t.Context(), newTok); err != nil {
		t.Errorf("a token signed with the rotated key: %v", err)
	}
	// Entra withdraws that key too: once the keys are refreshed, its tokens stop verifying.
	if err := f.emu.RotateKeys(true); err != nil {
		t.Fatal(err)
	}
	f.clk.advance(25 * time.Hour)
	if _, err := f.v.Verify(t.Context(), newTok); err == nil {
		t.Error("a token signed with a withdrawn key still verifies after the keys were refreshed")
	}
}

// countKeyFetches counts the requests for a tenant's keys, answered or not.
type countKeyFetches struct {
	next http.RoundTripper
	n    atomic.Int64
}

func (c *countKeyFetches) RoundTrip(r *http.Request) (*http.Response, error) {
	if strings.HasSuffix(r.URL.Path, "/keys") {
		c.n.Add(1)
	}
	return c.next.RoundTrip(r)
}

func TestFailedKeyFetchesAreNotRetriedPerToken(t *testing.T) {
	// While the tenant's keys cannot be fetched, tokens (forged ones, made up by anyone) neither
	// cause a fetch each nor wait for one: after a failed fetch, the next waits retryFailed.
	// Tokens signed with a key already known still verify meanwhile.
	f := setup(t)
	client := f.emu.CA().Client()
	fetches := &countKeyFetches{next: client.Transport}
	client.Transport = fetches
	reg := NewRegistry(Options{HTTPClient: client, Now: f.clk.now, RefreshEvery: time.Minute})
	v := reg.Verifier(f.emu.URL(), tenant)
	good := f.token(t, "api://tokenproxy")
	if _, err := v.Verify(t.Context(), good); err != nil {
		t.Fatal(err)
	}
	attacker, _ := rsa.GenerateKey(rand.Reader, 2048)
	forged := func() string {
		claims := jwt.MapClaims{"iss": f.emu.URL() + tenant + "/v2.0", "tid": tenant, "aud": gateway, "exp": time.Now().Add(time.Hour).Unix()}
		return forge(t, jwt.SigningMethodRS256, attacker, map[string]any{"kid": uuid.NewString()}, claims)
	}

	f.clk.advance(2 * time.Minute) // the keys are due for a refresh
	f.emu.SetDown(true)
	before := fetches.n.Load()
	for range 50 {
		if _, err := v.Verify(t.Context(), forged()); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("a forged token while the keys cannot be fetched: %v, want ErrUnavailable", err)
		}
	}
	if n := fetches.n.Load() - before; n != 1 {
		t.Errorf("50 forged tokens while the keys could not be fetched made %d fetches, want 1", n)
	}
	if _, err := v.Verify(t.Context(), good); err != nil {
		t.Errorf("a token signed with a known key while the keys cannot be fetched: %v", err)
	}

	// Once retryFailed has passed, the next token fetches again, and the keys are current.
	f.emu.SetDown(false)
	f.clk.advance(30 * time.Second)
	before = fetches.n.Load()
	if _, err := v.Verify(t.Context(), f.token(t, "api://tokenproxy")); err != nil {
		t.Errorf("after the keys could be fetched again: %v", err)
	}
	if n := fetches.n.Load() - before; n != 1 {
		t.Errorf("%d fetches once retryFailed passed, want 1", n)
	}
}

func TestAuthorityUnreachable(t *testing.T) {
	reg := NewRegistry(Options{})
	v := reg.Verifier("https://127.0.0.1:1/", tenant)
	raw := forgedFor(t, "https://127.0.0.1:1/", nil, nil)
	if _, err := v.Verify(t.Context(), raw); !errors.Is(err, ErrUnavailable) {
		t.Errorf("got %v, want ErrUnavailable", err)
	}
}

// fakeAuthority serves a tenant's discovery document and keys on plain HTTP, through the
// handlers given (nil: a working discovery document, and a key set with the one key pub).
func fakeAuthority(t *testing.T, discovery, keys http.HandlerFunc) (base string) {
	t.Helper()
	mux := http.NewServeMux()
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	base = srv.URL + "/"
	if discovery == nil {
		discovery = func(w http.ResponseWriter, r *http.Request) {
			json.NewEncoder(w).Encode(map[string]string{"issuer": base + tenant + "/v2.0", "jwks_uri": base + "keys"})
		}
	}
	mux.HandleFunc("/"+tenant+"/v2.0/.well-known/openid-configuration", discovery)
	if keys != nil {
		mux.HandleFunc("/keys", keys)
	}
	return base
}

func forgedFor(t *testing.T, base string, header map[string]any, extra jwt.MapClaims) string {
	t.Helper()
	attacker, _ := rsa.GenerateKey(rand.Reader, 2048)
	claims := jwt.MapClaims{"iss": base + tenant + "/v2.0", "tid": tenant, "aud": gateway, "exp": time.Now().Add(time.Hour).Unix()}
	for k, v := range extra {
		claims[k] = v
	}
	return forge(t, jwt.SigningMethodRS256, attacker, header, claims)
}

func TestErrorsAreBounded(t *testing.T) {
	// What a refused token's error quotes of it (an algorithm, a key ID that is not a string), or
	// of a failed response, is cut: the error goes to the caller and to the log.
	long := strings.Repeat("A", 20000)
	base := fakeAuthority(t, nil, nil) // each is refused before a key is looked for
	v := NewRegistry(Options{}).Verifier(base, tenant)
	claims, _ := json.Marshal(map[string]any{"iss": base + tenant + "/v2.0", "exp": time.Now().Add(time.Hour).Unix()})
	enc := base64.RawURLEncoding.EncodeToString
	for name, raw := range map[string]string{
		"a long algorithm":        enc([]byte(`{"alg":"`+long+`"}`)) + "." + enc(claims) + ".c2ln",
		"a key ID that is a list": forgedFor(t, base, map[string]any{"kid": []string{long}}, nil),
	} {
		_, err := v.Verify(t.Context(), raw)
		if err == nil || len(err.Error()) > maxErrorText+len("…") {
			t.Errorf("%s: error of %d bytes, want at most %d", name, len(fmt.Sprint(err)), maxErrorText)
		}
	}

	// A failed discovery's error page is not quoted whole either.
	base = fakeAuthority(t, func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "upstream 10.0.0.7 "+long, http.StatusBadGateway)
	}, nil)
	_, err := NewRegistry(Options{}).Verifier(base, tenant).Verify(t.Context(), forgedFor(t, base, nil, nil))
	if !errors.Is(err, ErrUnavailable) || len(err.Error()) > 2*maxErrorText+len(base)+100 {
		t.Errorf("a failed discovery: %d bytes: %.300v", len(fmt.Sprint(err)), err)
	}
}

func TestAnEmptyKeySetIsAFailedFetch(t *testing.T) {
	// A tenant's keys answered with no key at all are not fetched again for every token.
	fetches := atomic.Int64{}
	base := fakeAuthority(t, nil, func(w http.ResponseWriter, r *http.Request) {
		fetches.Add(1)
		w.Write([]byte(`{}`))
	})
	v := NewRegistry(Options{}).Verifier(base, tenant)
	for range 20 {
		if _, err := v.Verify(t.Context(), forgedFor(t, base, map[string]any{"kid": uuid.NewString()}, nil)); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("got %v, want ErrUnavailable", err)
		}
	}
	if n := fetches.Load(); n != 1 {
		t.Errorf("20 tokens made %d fetches of an empty key set, want 1", n)
	}
}

func TestVerifyWaitsNoLongerThanItsContext(t *testing.T) {
	// A slow authority holds a token's check only as long as its context allows; the discovery
	// (or the key fetch) goes on for the tokens after it.
	for _, slow := range []string{"discovery", "keys"} {
		t.Run(slow, func(t *testing.T) {
			release := make(chan struct{})
			hang := func(w http.ResponseWriter, r *http.Request) {
				select {
				case <-release:
				case <-r.Context().Done():
				}
			}
			var discovery, keys http.HandlerFunc = nil, hang
			if slow == "discovery" {
				discovery = hang
			}
			base := fakeAuthority(t, discovery, keys)
			t.Cleanup(func() { close(release) }) // before the server's close, which waits for it
			v := NewRegistry(Options{}).Verifier(base, tenant)
			ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
			defer cancel()
			done := make(chan error, 1)
			go func() { _, err := v.Verify(ctx, forgedFor(t, base, map[string]any{"kid": "k"}, nil)); done <- err }()
			select {
			case err := <-done:
				if !errors.Is(err, ErrUnavailable) {
					t.Errorf("got %v, want ErrUnavailable", err)
				}
			case <-time.After(5 * time.Second): // a bound, not a wait
				t.Fatal("Verify still waits for the authority past its context")
			}
		})
	}
}

// TestOneSpellingPerToken: a valid token respelled (whitespace, a line break, a signature's
// unused bits set, padding) is refused, so its bearer cannot make endless distinct tokens of it.
func TestOneSpellingPerToken(t *testing.T) {
	f := setup(t)
	tok := f.token(t, "api://tokenproxy")
	if _, err := f.v.Verify(t.Context(), tok); err != nil {
		t.Fatalf("the token itself was refused: %v", err)
	}
	header, rest, _ := strings.Cut(tok, ".")
	payload, sig, _ := strings.Cut(rest, ".")
	if len(sig)%4 != 2 {
		t.Fatalf("a 2048-bit RS256 signature is 342 characters, got %d", len(sig))
	}
	last := strings.IndexByte("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", sig[len(sig)-1])
	unusedBitSet := sig[:len(sig)-1] + string("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[last|1])
	for _, tt := range []struct{ name, token string }{
		{"a space in the header", header[:5] + " " + header[5:] + "." + payload + "." + sig},
		{"a tab in the signature", header + "." + payload + "." + sig[:9] + "\t" + sig[9:]},
		{"a line break in the payload", header + "." + payload[:20] + "\n" + payload[20:] + "." + sig},
		{"the signature's unused bits set", header + "." + payload + "." + unusedBitSet},
		{"padding", tok + "=="},
		{"an empty signature", header + "." + payload + "."},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if tt.token == tok {
				t.Fatal("the respelling is the token itself")
			}
			if _, err := f.v.Verify(t.Context(), tt.token); err == nil {
				t.Error("accepted")
			} else if err.Error() != "the token is not a JWT" {
				t.Errorf("refused as %q, not for its spelling", err)
			}
		})
	}
}
