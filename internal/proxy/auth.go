package proxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/hex"
	"errors"
	"fmt"
	"iter"
	"maps"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/valyala/fasthttp"

	"github.com/tokenproxy/tokenproxy/internal/callertoken"

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

	mtls      []*mtlsCaller
	entra     []*entraCaller
	byIssuer  map[string]*callertoken.Verifier          // the tenants' v1 and v2 issuers
	audiences map[*callertoken.Verifier]map[string]bool // every audience accepted per tenant
	verified  tokenCache
	tokenWait time.Duration

	deployments map[string]bool // the deployments' names, not hashed when looking for keys in a path
	notKeys     *notKeys        // values hashed and found to be no caller's key (rewrite.go)
}

// mtlsCaller is a caller identified by its TLS client certificate.
type mtlsCaller struct {
	*caller
	subject        string
	dnsNames, uris map[string]bool
}

func (m *mtlsCaller) matches(leaf *x509.Certificate, subject string) bool {
	if m.subject != "" && subject == m.subject {
		return true
	}
	for _, n := range leaf.DNSNames {
		if m.dnsNames[strings.ToLower(n)] {
			return true
		}
	}
	for _, u := range leaf.URIs {
		if m.uris[u.String()] {
			return true
		}
	}
	return false
}

// subjectOf is leaf's subject as its issuer wrote it: every attribute, in the certificate's
// order (RFC 4514, last first, as Go's pkix.Name.String writes an ordinary subject). Not
// pkix.Name's, which keeps only the last of a repeated attribute (two CNs, say) and puts the
// others in an order of its own, so that subjects a CA signed as different would read the same.
// "" if the subject cannot be read (it matches no rule).
func subjectOf(leaf *x509.Certificate) string {
	var rdns pkix.RDNSequence
	if rest, err := asn1.Unmarshal(leaf.RawSubject, &rdns); err != nil || len(rest) > 0 {
		return ""
	}
	return rdns.String()
}

// maxShownSubject bounds the subject a 403 quotes: a certificate's subject can be as long as
// its handshake message allows.
const maxShownSubject = 200

// clip is s cut to at most n bytes, on a character's boundary, marked with "…" if cut.
func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "…"
}

// entraCaller is a caller identified by an Entra access token.
type entraCaller struct {
	*caller
	verifier                           *callertoken.Verifier
	audiences, apps, principals, roles map[string]bool
	// delegated: whether a user's tokens (true) or an application's own (false) are accepted;
	// either if nil.
	delegated *bool
}

// matches reports whether the token's claims identify this caller.
func (e *entraCaller) matches(v *callertoken.Verifier, c callertoken.Claims) bool {
	if v != e.verifier || !anyIn(c.Audience, e.audiences) || (e.delegated != nil && *e.delegated != c.Delegated) {
		return false
	}
	return (len(e.apps) == 0 || e.apps[strings.ToLower(c.AppID)]) &&
		(len(e.principals) == 0 || e.principals[strings.ToLower(c.ObjectID)]) &&
		(len(e.roles) == 0 || anyIn(c.Roles, e.roles))
}

func anyIn(values []string, set map[string]bool) bool {
	for _, v := range values {
		if set[strings.ToLower(v)] {
			return true
		}
	}
	return false
}

func lowerSet(values []string) map[string]bool {
	m := make(map[string]bool, len(values))
	for _, v := range values {
		m[strings.ToLower(v)] = true
	}
	return m
}

// loads keeps each caller name's in-flight count across reloads, so a reload cannot reset it.
type loads struct{ m sync.Map }

func (l *loads) get(name string) *atomic.Int64 {
	v, _ := l.m.LoadOrStore(name, new(atomic.Int64))
	return v.(*atomic.Int64)
}

func newCallers(cfg *config.Config, l *loads, tokens *callertoken.Registry) (*callers, error) {
	k := &callers{byHash: map[[sha256.Size]byte]*caller{}, unauthenticated: cfg.AllowUnauthenticated,
		byIssuer: map[string]*callertoken.Verifier{}, audiences: map[*callertoken.Verifier]map[string]bool{},
		tokenWait: cfg.Timeouts.TokenAcquire, notKeys: newNotKeys()}
	k.anonymous = &caller{name: "anonymous", all: true, load: l.get("anonymous")}
	k.deployments = make(map[string]bool, len(cfg.Deployments))
	for d := range cfg.Deployments {
		k.deployments[d] = true
	}
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
		if m := c.MTLS; m != nil {
			uris := map[string]bool{}
			for _, u := range m.URIs {
				uris[u] = true
			}
			k.mtls = append(k.mtls, &mtlsCaller{caller: cl, subject: m.Subject, dnsNames: lowerSet(m.DNSNames), uris: uris})
		}
		if e := c.Entra; e != nil {
			v := tokens.Verifier(e.AuthorityHost, e.TenantID)
			for _, iss := range v.Issuers() {
				if w := k.byIssuer[iss]; w != nil && w != v {
					// Two authorities' keys for one issuer: its tokens would be checked against
					// whichever was named last.
					return nil, fmt.Errorf("caller %q: tenant %s is named at two authority hosts, whose tokens share the issuer %s", c.Name, e.TenantID, iss)
				}
				k.byIssuer[iss] = v
			}
			if k.audiences[v] == nil {
				k.audiences[v] = map[string]bool{}
			}
			for a := range lowerSet(e.Audiences) {
				k.audiences[v][a] = true
			}
			ec := &entraCaller{caller: cl, verifier: v, audiences: lowerSet(e.Audiences),
				apps: lowerSet(e.AppIDs), principals: lowerSet(e.ObjectIDs), roles: lowerSet(e.Roles)}
			switch e.Principal {
			case config.PrincipalApp:
				ec.delegated = new(bool)
			case config.PrincipalUser:
				ec.delegated = new(bool)
				*ec.delegated = true
			}
			k.entra = append(k.entra, ec)
		}
	}
	// Path segments that are route words or deployments' names are not checked for being keys.
	for _, set := range []iter.Seq[string]{slices.Values(routeWords.all), maps.Keys(k.deployments)} {
		for w := range set {
			if cl, ok := k.byHash[sha256.Sum256([]byte(w))]; ok {
				return nil, fmt.Errorf("caller %q: a key is %q, a word of the gateway's request paths; make one with proxy hash-key --generate", cl.name, w)
			}
		}
	}
	return k, nil
}

// authenticate identifies the caller from its api-key header (the Azure convention, and what
// Automation 360's CUSTOM_KEYS sends) or Authorization: Bearer (the OpenAI SDK convention).
// Exactly one key may be presented: two different ones are refused rather than guessed at.
// A caller presenting no key may be identified by its TLS client certificate (peer, verified
// against the listener's client CAs; nil without one). A certificate that names a caller and a
// key sent with it are two credentials, and refused too. The credential presented (a key or a
// token) is returned too, so the request can be scrubbed of it wherever else it appears.
func (k *callers) authenticate(h *fasthttp.RequestHeader, peer *x509.Certificate) (*caller, []byte, *apiError) {
	key, err := presentedKey(h)
	if err != nil {
		return nil, nil, err
	}
	c, err := k.identify(key, peer)
	return c, key, err
}

func (k *callers) identify(key []byte, peer *x509.Certificate) (*caller, *apiError) {
	if peer != nil && (len(k.mtls) > 0 || len(key) == 0 && !k.unauthenticated) {
		subject := subjectOf(peer)
		var named *mtlsCaller
		for _, m := range k.mtls {
			if m.matches(peer, subject) {
				named = m
				break
			}
		}
		switch {
		case named != nil && len(key) > 0:
			return nil, errorf(http.StatusUnauthorized, CodeUnauthorized,
				"the client certificate names caller %s, and a key or token was sent as well: send one credential", named.name)
		case named != nil:
			return named.caller, nil
		case len(key) == 0:
			return nil, errorf(http.StatusForbidden, CodeForbidden, "the client certificate (%s) names no caller of this gateway", clip(subject, maxShownSubject))
		}
	}
	if len(key) == 0 {
		if k.unauthenticated {
			return k.anonymous, nil
		}
		return nil, errorf(http.StatusUnauthorized, CodeUnauthorized,
			"missing gateway key: send it in the api-key header or as Authorization: Bearer <key>")
	}
	sum := sha256.Sum256(key)
	if c, ok := k.byHash[sum]; ok {
		return c, nil
	}
	if len(k.entra) > 0 && looksLikeJWT(key) {
		return k.verifyToken(sum, string(key))
	}
	return nil, errorf(http.StatusUnauthorized, CodeUnauthorized, "unknown gateway key")
}

// looksLikeJWT reports whether a presented credential has a JWT's shape (header.payload.signature,
// the header a JSON object), as an Entra access token does and a gateway key does not.
func looksLikeJWT(b []byte) bool {
	return bytes.HasPrefix(b, []byte("eyJ")) && bytes.Count(b, []byte(".")) == 2
}

// verifiedTTL bounds how long a verified token is trusted without checking it again, so a key
// Entra withdraws stops admitting its tokens within minutes.
const verifiedTTL = 5 * time.Minute

// verifyToken identifies an Entra token's bearer: 401 if the token is not valid, 403 if it is
// but names no caller, 503 if the tenant's keys cannot be reached.
func (k *callers) verifyToken(sum [sha256.Size]byte, raw string) (*caller, *apiError) {
	now := time.Now()
	if c := k.verified.get(sum, now); c != nil {
		return c, nil
	}
	iss, err := callertoken.Issuer(raw)
	if err != nil {
		return nil, errorf(http.StatusUnauthorized, CodeUnauthorized, "the bearer token is not a gateway key or a valid Entra token")
	}
	v := k.byIssuer[iss]
	if v == nil {
		return nil, errorf(http.StatusUnauthorized, CodeUnauthorized, "the Entra token's issuer is not a tenant this gateway accepts")
	}
	ctx, cancel := context.WithTimeout(context.Background(), k.tokenWait)
	defer cancel()
	claims, err := v.Verify(ctx, raw)
	switch {
	case errors.Is(err, callertoken.ErrUnavailable):
		// What went wrong (an address, an error page's text) is for the log, not for a caller
		// that is not authenticated.
		e := errorf(http.StatusServiceUnavailable, CodeCallerAuthUnavailable, "the caller's token cannot be checked now: the tenant's signing keys cannot be fetched")
		e.detail = err.Error()
		return nil, e
	case err != nil:
		return nil, errorf(http.StatusUnauthorized, CodeUnauthorized, "the Entra token is not valid: %s", k.unlessKey(err.Error()))
	case !anyIn(claims.Audience, k.audiences[v]):
		return nil, errorf(http.StatusUnauthorized, CodeUnauthorized, "the Entra token is for another audience, not this gateway")
	}
	for _, e := range k.entra {
		if e.matches(v, claims) {
			until := now.Add(verifiedTTL)
			if claims.ExpiresOn.Before(until) {
				until = claims.ExpiresOn
			}
			k.verified.put(sum, e.caller, until)
			return e.caller, nil
		}
	}
	issuedTo := "the application itself"
	if claims.Delegated {
		issuedTo = "a user, through the application"
	}
	return nil, errorf(http.StatusForbidden, CodeForbidden,
		"the Entra token (application %s, principal %s, issued to %s) is valid but names no caller of this gateway", claims.AppID, claims.ObjectID, issuedTo)
}

// tokenCache remembers verified tokens (by hash) until a deadline.
type tokenCache struct {
	mu sync.RWMutex
	m  map[[sha256.Size]byte]verifiedToken
}

type verifiedToken struct {
	c     *caller
	until time.Time
}

// maxVerified bounds the cache; when full it starts over, which costs one verification per token.
const maxVerified = 10000

func (t *tokenCache) get(sum [sha256.Size]byte, now time.Time) *caller {
	t.mu.RLock()
	v, ok := t.m[sum]
	t.mu.RUnlock()
	if ok && now.Before(v.until) {
		return v.c
	}
	return nil
}

func (t *tokenCache) put(sum [sha256.Size]byte, c *caller, until time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.m == nil || len(t.m) >= maxVerified {
		t.m = make(map[[sha256.Size]byte]verifiedToken)
	}
	t.m[sum] = verifiedToken{c: c, until: until}
}

// unlessKey is msg, why a caller's token was refused, unless it holds one of k's keys: the
// reasons quote what the token's header says (its key ID, its algorithm), which the caller
// chooses. Quotes count as separators, so a key quoted is a field of its own (holdsKey).
func (k *callers) unlessKey(msg string) string {
	fields := strings.Map(func(r rune) rune {
		if r == '"' || r == '\'' || r == '[' || r == ']' {
			return ' '
		}
		return r
	}, msg)
	if k.holdsKey(readOnly(fields)) {
		return "its header names a caller's key"
	}
	return msg
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
