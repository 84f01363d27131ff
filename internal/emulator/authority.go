package emulator

import (
	"context"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/google/uuid"
)

// Well-known values the emulator shares with Azure.
const (
	// CognitiveServicesResource is the audience of Azure OpenAI / Foundry data-plane tokens.
	CognitiveServicesResource = "https://cognitiveservices.azure.com"
	// TokenExchangeAudience is the audience Entra requires on federated (workload identity) assertions.
	TokenExchangeAudience = "api://AzureADTokenExchange"
	assertionType         = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
)

// App is an application registration (with its service principal) in a tenant.
type App struct {
	TenantID string
	ClientID string
	// ObjectID is the service principal's object ID, the `oid` of its tokens. Generated if empty.
	ObjectID string
	// Secrets are valid client secret values; ExpiredSecrets are rejected with AADSTS7000222.
	Secrets, ExpiredSecrets []string
	// Certificates are uploaded public certificates for client assertions.
	Certificates []*x509.Certificate
	// Federated are federated identity credentials (workload identity).
	Federated []FederatedCredential
	// Roles are app roles assigned to the app, emitted as the `roles` claim.
	Roles []string
}

// FederatedCredential trusts tokens of an external issuer for a subject.
type FederatedCredential struct {
	Issuer, Subject string
	// Audiences defaults to api://AzureADTokenExchange.
	Audiences []string
}

// Resource is an API tokens can be requested for.
type Resource struct {
	// URI is the application ID URI, e.g. https://cognitiveservices.azure.com or api://tokenproxy.
	URI string
	// AppID, when set, is the resource app's client ID: v2 tokens carry it as `aud`.
	AppID string
	// Version is the access token format, 1 (Azure services) or 2.
	Version int
}

// AuthorityOptions configure an Authority.
type AuthorityOptions struct {
	// CA signs the TLS certificate. If nil, a new CA is created.
	CA *CA
	// TokenLifetime is the lifetime of issued access tokens. If zero, 3599s (Entra's usual).
	TokenLifetime time.Duration
	// RefreshIn, when non-zero, is returned as refresh_in with each token.
	RefreshIn time.Duration
}

// Authority emulates a Microsoft Entra ID authority over TLS: OpenID discovery, instance
// discovery, JWKS, a v2.0 token endpoint for client secrets, certificate assertions and
// federated assertions with AADSTS-shaped errors, and RS256 access tokens. It also acts as the
// external OIDC issuer for workload identity tokens (FederatedToken) and, on a second plain-http
// listener, as an App Service managed-identity endpoint.
type Authority struct {
	ca      *CA
	srv     *http.Server
	url     string // https://127.0.0.1:port/
	keys    *keySet
	fedKeys *keySet // the external issuer of federated tokens

	mi *managedIdentityServer

	mu          sync.Mutex
	tenants     map[string]string // tenant ID or domain → tenant ID
	apps        map[string]*App   // by client ID
	resources   map[string]Resource
	identities  []*ManagedIdentity
	lifetime    time.Duration
	refreshIn   time.Duration
	down        bool
	downApps    map[string]bool // client IDs whose token requests fail
	latency     time.Duration
	counts      map[string]int // token endpoint requests by client ID (any outcome)
	jwksFetches int
	issued      map[string]int // tokens issued by client ID
}

// NewAuthority starts an authority on 127.0.0.1 with no tenants or apps.
func NewAuthority(opts AuthorityOptions) (*Authority, error) {
	ca := opts.CA
	if ca == nil {
		var err error
		if ca, err = NewCA(); err != nil {
			return nil, err
		}
	}
	keys, err := newKeySet()
	if err != nil {
		return nil, err
	}
	fedKeys, err := newKeySet()
	if err != nil {
		return nil, err
	}
	a := &Authority{
		ca:        ca,
		keys:      keys,
		fedKeys:   fedKeys,
		tenants:   map[string]string{},
		apps:      map[string]*App{},
		resources: map[string]Resource{},
		lifetime:  opts.TokenLifetime,
		refreshIn: opts.RefreshIn,
		counts:    map[string]int{},
		issued:    map[string]int{},
		downApps:  map[string]bool{},
	}
	if a.lifetime == 0 {
		a.lifetime = 3599 * time.Second
	}
	for _, r := range []string{CognitiveServicesResource, "https://ai.azure.com", "https://ml.azure.com", "https://management.azure.com"} {
		a.resources[r] = Resource{URI: r, Version: 1}
	}

	tlsCfg, err := ca.ServerConfig()
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	a.url = "https://" + ln.Addr().String() + "/"
	mux := http.NewServeMux()
	mux.HandleFunc("GET /common/discovery/instance", a.instanceDiscovery)
	mux.HandleFunc("GET /{tenant}/v2.0/.well-known/openid-configuration", a.openIDConfig)
	mux.HandleFunc("GET /{tenant}/.well-known/openid-configuration", a.openIDConfig)
	mux.HandleFunc("GET /{tenant}/discovery/v2.0/keys", a.jwks)
	mux.HandleFunc("GET /{tenant}/discovery/keys", a.jwks)
	mux.HandleFunc("POST /{tenant}/oauth2/v2.0/token", a.token)
	mux.HandleFunc("GET /federation/.well-known/openid-configuration", a.federationConfig)
	mux.HandleFunc("GET /federation/keys", a.federationJWKS)
	a.srv = &http.Server{Handler: a.faults(mux), TLSConfig: tlsCfg, ReadHeaderTimeout: 10 * time.Second}
	go a.srv.ServeTLS(ln, "", "")

	if a.mi, err = newManagedIdentityServer(a); err != nil {
		a.srv.Close()
		return nil, err
	}
	return a, nil
}

// URL is the authority host, with a trailing slash, for authority_host / AZURE_AUTHORITY_HOST.
func (a *Authority) URL() string { return a.url }

// CA is the authority that signed the TLS certificate.
func (a *Authority) CA() *CA { return a.ca }

// Close stops the listeners.
func (a *Authority) Close() {
	a.srv.Close()
	a.mi.close()
}

// AddTenant registers a tenant by ID, with optional domain aliases.
func (a *Authority) AddTenant(id string, domains ...string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.tenants[strings.ToLower(id)] = id
	for _, d := range domains {
		a.tenants[strings.ToLower(d)] = id
	}
}

// AddApp registers an application; its tenant is added if unknown.
func (a *Authority) AddApp(app App) {
	if app.ObjectID == "" {
		app.ObjectID = uuid.NewString()
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, ok := a.tenants[strings.ToLower(app.TenantID)]; !ok {
		a.tenants[strings.ToLower(app.TenantID)] = app.TenantID
	}
	a.apps[app.ClientID] = &app
}

// AddResource registers an API that tokens can be requested for.
func (a *Authority) AddResource(r Resource) {
	if r.Version == 0 {
		r.Version = 2
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.resources[strings.TrimSuffix(r.URI, "/")] = r
}

// App returns a copy of a registered application.
func (a *Authority) App(clientID string) (App, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	app, ok := a.apps[clientID]
	if !ok {
		return App{}, false
	}
	return *app, true
}

// SetDown makes every endpoint answer 503 with AADSTS90033 (Entra outage) until called with false.
func (a *Authority) SetDown(down bool) {
	a.mu.Lock()
	a.down = down
	a.mu.Unlock()
}

// SetAppDown makes token requests for one client ID answer 503 (AADSTS90033) until called
// with false, as if that app's tenant were having an outage.
func (a *Authority) SetAppDown(clientID string, down bool) {
	a.mu.Lock()
	a.downApps[clientID] = down
	a.mu.Unlock()
}

// SetLatency delays every response by d.
func (a *Authority) SetLatency(d time.Duration) {
	a.mu.Lock()
	a.latency = d
	a.mu.Unlock()
}

// SetTokenLifetime changes the lifetime of tokens issued from now on; refreshIn, when non-zero,
// is returned as refresh_in.
func (a *Authority) SetTokenLifetime(lifetime, refreshIn time.Duration) {
	a.mu.Lock()
	a.lifetime, a.refreshIn = lifetime, refreshIn
	a.mu.Unlock()
}

// RotateKeys starts signing with a new key. With dropOld, the previous keys are withdrawn from
// the JWKS at once (tokens they signed no longer verify).
func (a *Authority) RotateKeys(dropOld bool) error { return a.keys.rotate(dropOld) }

// TokenRequests counts token requests (managed identity included) for a client ID, whatever
// their outcome.
func (a *Authority) TokenRequests(clientID string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.counts[clientID]
}

// JWKSFetches counts requests for the signing keys.
func (a *Authority) JWKSFetches() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.jwksFetches
}

// TokensIssued counts the tokens issued to a client ID.
func (a *Authority) TokensIssued(clientID string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.issued[clientID]
}

func (a *Authority) faults(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		down, latency := a.down, a.latency
		a.mu.Unlock()
		if !sleepCtx(r.Context(), latency) {
			return
		}
		if down {
			if r.URL.Path != "/federation/keys" && strings.HasSuffix(r.URL.Path, "/token") {
				a.countToken(r)
			}
			aadError(w, a.url, http.StatusServiceUnavailable, "temporarily_unavailable", 90033,
				"A transient error has occurred. Please try again.")
			return
		}
		next.ServeHTTP(w, r)
	})
}

func (a *Authority) countToken(r *http.Request) {
	r.ParseForm()
	a.mu.Lock()
	a.counts[r.PostForm.Get("client_id")]++
	a.mu.Unlock()
}

func (a *Authority) tenant(seg string) (string, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	id, ok := a.tenants[strings.ToLower(seg)]
	return id, ok
}

func (a *Authority) instanceDiscovery(w http.ResponseWriter, r *http.Request) {
	host := strings.TrimSuffix(strings.TrimPrefix(a.url, "https://"), "/")
	writeJSON(w, http.StatusOK, map[string]any{
		"tenant_discovery_endpoint": a.url + "common/v2.0/.well-known/openid-configuration",
		"api-version":               "1.1",
		"metadata": []map[string]any{{
			"preferred_network": host, "preferred_cache": host, "aliases": []string{host},
		}},
	})
}

func (a *Authority) openIDConfig(w http.ResponseWriter, r *http.Request) {
	seg := r.PathValue("tenant")
	tid, ok := a.tenant(seg)
	if !ok {
		aadError(w, a.url, http.StatusBadRequest, "invalid_tenant", 90002, fmt.Sprintf(
			"Tenant '%s' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud.", seg))
		return
	}
	base := a.url + seg
	issuer := a.url + tid + "/v2.0"
	if !strings.Contains(r.URL.Path, "/v2.0/") {
		issuer = a.url + tid + "/"
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"token_endpoint":                        base + "/oauth2/v2.0/token",
		"authorization_endpoint":                base + "/oauth2/v2.0/authorize",
		"jwks_uri":                              a.url + tid + "/discovery/v2.0/keys",
		"issuer":                                issuer,
		"token_endpoint_auth_methods_supported": []string{"client_secret_post", "private_key_jwt", "client_secret_basic"},
		"response_types_supported":              []string{"code", "id_token", "code id_token", "id_token token"},
		"subject_types_supported":               []string{"pairwise"},
		"id_token_signing_alg_values_supported": []string{"RS256"},
		"tenant_region_scope":                   "NA",
		"cloud_instance_name":                   "microsoftonline.com",
	})
}

func (a *Authority) jwks(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	a.jwksFetches++
	a.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	w.Write(a.keys.jwks(""))
}

// FederatedIssuer is the issuer URL of the emulator's workload-identity token issuer (what an
// AKS cluster's OIDC issuer is in Azure).
func (a *Authority) FederatedIssuer() string { return a.url + "federation" }

func (a *Authority) federationConfig(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{
		"issuer":   a.FederatedIssuer(),
		"jwks_uri": a.url + "federation/keys",
	})
}

func (a *Authority) federationJWKS(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	w.Write(a.fedKeys.jwks(""))
}

// FederatedToken is a workload identity (Kubernetes service account) token request.
type FederatedToken struct {
	// Issuer defaults to FederatedIssuer(); another value makes an untrusted token.
	Issuer string
	// Subject, e.g. system:serviceaccount:ns:name.
	Subject string
	// Audience defaults to api://AzureADTokenExchange.
	Audience string
	// Lifetime defaults to an hour.
	Lifetime time.Duration
}

// IssueFederatedToken signs a token as the external OIDC issuer, for AZURE_FEDERATED_TOKEN_FILE.
func (a *Authority) IssueFederatedToken(ft FederatedToken) (string, error) {
	if ft.Issuer == "" {
		ft.Issuer = a.FederatedIssuer()
	}
	if ft.Audience == "" {
		ft.Audience = TokenExchangeAudience
	}
	if ft.Lifetime == 0 {
		ft.Lifetime = time.Hour
	}
	now := time.Now()
	return a.fedKeys.sign(jwt.MapClaims{
		"iss": ft.Issuer, "sub": ft.Subject, "aud": []string{ft.Audience},
		"iat": now.Unix(), "nbf": now.Unix(), "exp": now.Add(ft.Lifetime).Unix(),
	}, false)
}

func (a *Authority) token(w http.ResponseWriter, r *http.Request) {
	seg := r.PathValue("tenant")
	r.Body = http.MaxBytesReader(w, r.Body, 64<<10)
	if err := r.ParseForm(); err != nil {
		aadError(w, a.url, http.StatusBadRequest, "invalid_request", 900144, "The request body must contain the following parameter: 'grant_type'.")
		return
	}
	f := r.PostForm
	clientID := f.Get("client_id")
	a.mu.Lock()
	a.counts[clientID]++
	appDown := a.downApps[clientID]
	a.mu.Unlock()
	if appDown {
		aadError(w, a.url, http.StatusServiceUnavailable, "temporarily_unavailable", 90033, "A transient error has occurred. Please try again.")
		return
	}

	tid, ok := a.tenant(seg)
	if !ok {
		aadError(w, a.url, http.StatusBadRequest, "invalid_request", 90002, fmt.Sprintf(
			"Tenant '%s' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant.", seg))
		return
	}
	if gt := f.Get("grant_type"); gt != "client_credentials" {
		aadError(w, a.url, http.StatusBadRequest, "unsupported_grant_type", 70003, fmt.Sprintf(
			"The app requested an unsupported grant type '%s'.", gt))
		return
	}
	app, ok := a.App(clientID)
	if !ok || !strings.EqualFold(app.TenantID, tid) {
		aadError(w, a.url, http.StatusBadRequest, "unauthorized_client", 700016, fmt.Sprintf(
			"Application with identifier '%s' was not found in the directory '%s'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant.", clientID, seg))
		return
	}
	res, status, code, aadsts, msg := a.resourceFor(f.Get("scope"), seg)
	if status != 0 {
		aadError(w, a.url, status, code, aadsts, msg)
		return
	}
	var acr string
	switch {
	case f.Get("client_secret") != "":
		secret := f.Get("client_secret")
		switch {
		case slices.Contains(app.Secrets, secret):
			acr = "1"
		case slices.Contains(app.ExpiredSecrets, secret):
			aadError(w, a.url, http.StatusUnauthorized, "invalid_client", 7000222, fmt.Sprintf(
				"The provided client secret keys for app '%s' are expired. Visit the Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider using certificate credentials for added security: https://aka.ms/certCreds.", clientID))
			return
		default:
			aadError(w, a.url, http.StatusUnauthorized, "invalid_client", 7000215, fmt.Sprintf(
				"Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '%s'.", clientID))
			return
		}
	case f.Get("client_assertion_type") == assertionType && f.Get("client_assertion") != "":
		tokenEndpoint := a.url + seg + "/oauth2/v2.0/token"
		var err *aadErr
		if acr, err = a.checkAssertion(app, f.Get("client_assertion"), tokenEndpoint); err != nil {
			aadError(w, a.url, err.status, err.code, err.aadsts, err.msg)
			return
		}
	default:
		aadError(w, a.url, http.StatusBadRequest, "invalid_client", 7000218,
			"The request body must contain the following parameter: 'client_assertion' or 'client_secret'.")
		return
	}

	tok, lifetime, refreshIn, err := a.issue(tid, app.ClientID, app.ObjectID, app.Roles, acr, res, nil)
	if err != nil {
		aadError(w, a.url, http.StatusInternalServerError, "server_error", 50000, "There was an error issuing a token.")
		return
	}
	body := map[string]any{
		"token_type":     "Bearer",
		"expires_in":     int(lifetime.Seconds()),
		"ext_expires_in": int(lifetime.Seconds()),
		"access_token":   tok,
	}
	if refreshIn > 0 {
		body["refresh_in"] = int(refreshIn.Seconds())
	}
	writeJSON(w, http.StatusOK, body)
}

// resourceFor finds the resource named by a client-credentials scope list.
func (a *Authority) resourceFor(scope, tenant string) (Resource, int, string, int, string) {
	var target string
	for _, s := range strings.Fields(scope) {
		switch s {
		case "openid", "offline_access", "profile", "email":
			continue
		}
		target = s
	}
	uri, ok := strings.CutSuffix(target, "/.default")
	if !ok {
		return Resource{}, http.StatusBadRequest, "invalid_scope", 1002012, fmt.Sprintf(
			"The provided value for scope %s is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI).", target)
	}
	a.mu.Lock()
	res, ok := a.resources[strings.TrimSuffix(uri, "/")]
	a.mu.Unlock()
	if !ok {
		return Resource{}, http.StatusBadRequest, "invalid_resource", 500011, fmt.Sprintf(
			"The resource principal named %s was not found in the tenant named %s. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You might have sent your authentication request to the wrong tenant.", uri, tenant)
	}
	return res, 0, "", 0, ""
}

type aadErr struct {
	status int
	code   string
	aadsts int
	msg    string
}

// checkAssertion validates a certificate assertion (signed by a registered certificate) or a
// federated assertion (signed by a trusted external issuer). It returns the appidacr value.
func (a *Authority) checkAssertion(app App, assertion, tokenEndpoint string) (string, *aadErr) {
	parser := jwt.NewParser()
	unverified, _, err := parser.ParseUnverified(assertion, jwt.MapClaims{})
	if err != nil {
		return "", &aadErr{http.StatusBadRequest, "invalid_client", 50027, "JWT token is invalid or malformed."}
	}
	if _, ok := unverified.Header["x5t#S256"]; ok {
		return "2", a.checkCertificateAssertion(app, assertion, tokenEndpoint, unverified)
	}
	if _, ok := unverified.Header["x5t"]; ok {
		return "2", a.checkCertificateAssertion(app, assertion, tokenEndpoint, unverified)
	}
	return "2", a.checkFederatedAssertion(app, assertion, unverified)
}

func (a *Authority) checkCertificateAssertion(app App, assertion, tokenEndpoint string, unverified *jwt.Token) *aadErr {
	var cert *x509.Certificate
	tp256, _ := unverified.Header["x5t#S256"].(string)
	tp1, _ := unverified.Header["x5t"].(string)
	for _, c := range app.Certificates {
		s256 := sha256.Sum256(c.Raw)
		s1 := sha1.Sum(c.Raw)
		if thumbprintIs(tp256, s256[:]) || thumbprintIs(tp1, s1[:]) {
			cert = c
		}
	}
	if cert == nil {
		return &aadErr{http.StatusUnauthorized, "invalid_client", 700027, fmt.Sprintf(
			"The certificate with identifier used to sign the client assertion is not registered on application. [Reason - The key was not found., Thumbprint of key used by client: '%s%s', Please visit the Azure Portal, Graph Explorer or directly use MS Graph to see configured keys for app Id '%s'.]", tp256, tp1, app.ClientID)}
	}
	pub, ok := cert.PublicKey.(*rsa.PublicKey)
	if !ok {
		return &aadErr{http.StatusUnauthorized, "invalid_client", 700027, "Client assertion contains an invalid signature."}
	}
	claims := jwt.MapClaims{}
	_, err := jwt.ParseWithClaims(assertion, claims, func(*jwt.Token) (any, error) { return pub, nil },
		jwt.WithValidMethods([]string{"PS256", "RS256"}), jwt.WithAudience(tokenEndpoint),
		jwt.WithIssuer(app.ClientID), jwt.WithSubject(app.ClientID), jwt.WithExpirationRequired())
	switch {
	case errors.Is(err, jwt.ErrTokenExpired), errors.Is(err, jwt.ErrTokenNotValidYet):
		return &aadErr{http.StatusUnauthorized, "invalid_client", 700024, "Client assertion is not within its valid time range."}
	case errors.Is(err, jwt.ErrTokenInvalidAudience):
		return &aadErr{http.StatusUnauthorized, "invalid_client", 700212, fmt.Sprintf(
			"The audience claim in the client assertion is not valid; expected '%s'.", tokenEndpoint)}
	case err != nil:
		return &aadErr{http.StatusUnauthorized, "invalid_client", 700027, "Client assertion failed signature validation."}
	}
	return nil
}

func thumbprintIs(header string, sum []byte) bool {
	if header == "" {
		return false
	}
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawURLEncoding, base64.URLEncoding} {
		if b, err := enc.DecodeString(header); err == nil && string(b) == string(sum) {
			return true
		}
	}
	return false
}

func (a *Authority) checkFederatedAssertion(app App, assertion string, unverified *jwt.Token) *aadErr {
	uc := unverified.Claims.(jwt.MapClaims)
	iss, _ := uc.GetIssuer()
	sub, _ := uc.GetSubject()
	aud, _ := uc.GetAudience()
	var matched *FederatedCredential
	for i, fc := range app.Federated {
		if fc.Issuer == iss {
			matched = &app.Federated[i]
			if fc.Subject == sub {
				break
			}
		}
	}
	switch {
	case matched == nil:
		return &aadErr{http.StatusBadRequest, "invalid_client", 700211, fmt.Sprintf(
			"No matching federated identity record found for presented assertion issuer '%s'. Please check your federated identity credential Subject, Audience and Issuer against the presented assertion.", iss)}
	case matched.Subject != sub:
		return &aadErr{http.StatusBadRequest, "invalid_client", 700213, fmt.Sprintf(
			"No matching federated identity record found for presented assertion subject '%s'. Please check your federated identity credential Subject, Audience and Issuer against the presented assertion.", sub)}
	}
	audiences := matched.Audiences
	if len(audiences) == 0 {
		audiences = []string{TokenExchangeAudience}
	}
	if !slices.ContainsFunc(aud, func(s string) bool { return slices.Contains(audiences, s) }) {
		return &aadErr{http.StatusBadRequest, "invalid_client", 700212, fmt.Sprintf(
			"No matching federated identity record found for presented assertion audience '%s'. Please check your federated identity credential Subject, Audience and Issuer against the presented assertion.", strings.Join(aud, ","))}
	}
	if iss != a.FederatedIssuer() {
		return &aadErr{http.StatusBadRequest, "invalid_client", 700222, "AADSTS could not fetch the signing keys of the assertion issuer."}
	}
	_, err := a.fedKeys.verify(assertion)
	switch {
	case errors.Is(err, jwt.ErrTokenExpired):
		return &aadErr{http.StatusBadRequest, "invalid_client", 700024, "Client assertion is not within its valid time range."}
	case err != nil:
		return &aadErr{http.StatusBadRequest, "invalid_client", 50013, "Assertion failed signature validation."}
	}
	return nil
}

// issue signs an access token for the principal (an app or a managed identity) and counts it.
func (a *Authority) issue(tid, clientID, oid string, roles []string, acr string, res Resource, extra jwt.MapClaims) (string, time.Duration, time.Duration, error) {
	a.mu.Lock()
	lifetime, refreshIn := a.lifetime, a.refreshIn
	a.mu.Unlock()
	now := time.Now()
	c := jwt.MapClaims{
		"iat": now.Unix(), "nbf": now.Unix(), "exp": now.Add(lifetime).Unix(),
		"oid": oid, "sub": oid, "tid": tid, "idtyp": "app",
		"uti": base64.RawURLEncoding.EncodeToString(uuid.New().NodeID()), "rh": "0.emulator",
	}
	if res.Version == 2 {
		c["ver"] = "2.0"
		c["iss"] = a.url + tid + "/v2.0"
		c["aud"] = res.AppID
		if res.AppID == "" {
			c["aud"] = res.URI
		}
		c["azp"], c["azpacr"] = clientID, acr
	} else {
		c["ver"] = "1.0"
		c["iss"] = "https://sts.windows.net/" + tid + "/"
		c["aud"] = res.URI
		c["appid"], c["appidacr"] = clientID, acr
	}
	if len(roles) > 0 {
		c["roles"] = roles
	}
	for k, v := range extra {
		c[k] = v
	}
	tok, err := a.keys.sign(c, true)
	if err != nil {
		return "", 0, 0, err
	}
	a.mu.Lock()
	a.issued[clientID]++
	a.mu.Unlock()
	return tok, lifetime, refreshIn, nil
}

// IssueToken signs an access token directly (no HTTP), as if the app had requested one for the
// resource; tests use it to make caller tokens.
func (a *Authority) IssueToken(clientID, resourceURI string) (string, error) {
	app, res, err := a.appAndResource(clientID, resourceURI)
	if err != nil {
		return "", err
	}
	tok, _, _, err := a.issue(app.TenantID, app.ClientID, app.ObjectID, app.Roles, "1", res, nil)
	return tok, err
}

// appAndResource looks up a registered app and resource, for the Issue methods.
func (a *Authority) appAndResource(clientID, resourceURI string) (App, Resource, error) {
	app, ok := a.App(clientID)
	if !ok {
		return App{}, Resource{}, fmt.Errorf("unknown app %q", clientID)
	}
	a.mu.Lock()
	res, ok := a.resources[strings.TrimSuffix(resourceURI, "/")]
	a.mu.Unlock()
	if !ok {
		return App{}, Resource{}, fmt.Errorf("unknown resource %q", resourceURI)
	}
	return app, res, nil
}

// IssueUserToken signs a delegated access token, as if the user objectID had signed in to the
// app and it had requested the resource on their behalf: the user's oid, the scopes granted
// (scp), and no roles of the app's.
func (a *Authority) IssueUserToken(clientID, resourceURI, objectID, scope string) (string, error) {
	app, res, err := a.appAndResource(clientID, resourceURI)
	if err != nil {
		return "", err
	}
	tok, _, _, err := a.issue(app.TenantID, app.ClientID, objectID, nil, "1", res, jwt.MapClaims{"scp": scope, "idtyp": "user"})
	return tok, err
}

// IssueIDToken signs an ID token (v2), as Entra gives an app that a user signed in to: the
// app clientID as its audience, the user's objectID and roles, and none of an access token's
// azp, appid or scp. It is no credential for an API; tests show that it is refused as one.
func (a *Authority) IssueIDToken(tenantID, clientID, objectID string, roles []string) (string, error) {
	now := time.Now()
	c := jwt.MapClaims{
		"iss": a.url + tenantID + "/v2.0", "aud": clientID, "tid": tenantID, "oid": objectID, "sub": objectID,
		"ver": "2.0", "nonce": uuid.NewString(), "iat": now.Unix(), "nbf": now.Unix(), "exp": now.Add(time.Hour).Unix(),
	}
	if len(roles) > 0 {
		c["roles"] = roles
	}
	return a.keys.sign(c, true)
}

// Claims are the verified claims of an access token.
type Claims struct {
	Audience, Issuer, TenantID, ObjectID, AppID string
	Roles                                       []string
	ExpiresOn                                   time.Time
}

// Verify checks an access token the authority issued: RS256 signature against the published
// keys, expiry, and that its audience is audience. It is what the Azure OpenAI emulator calls.
func (a *Authority) Verify(token, audience string) (Claims, error) {
	mc, err := a.keys.verify(token, jwt.WithAudience(audience))
	if err != nil {
		return Claims{}, err
	}
	c := Claims{}
	c.Issuer, _ = mc.GetIssuer()
	if aud, _ := mc.GetAudience(); len(aud) > 0 {
		c.Audience = aud[0]
	}
	if exp, _ := mc.GetExpirationTime(); exp != nil {
		c.ExpiresOn = exp.Time
	}
	c.TenantID, _ = mc["tid"].(string)
	c.ObjectID, _ = mc["oid"].(string)
	c.AppID, _ = mc["appid"].(string)
	if c.AppID == "" {
		c.AppID, _ = mc["azp"].(string)
	}
	if roles, ok := mc["roles"].([]any); ok {
		for _, r := range roles {
			if s, ok := r.(string); ok {
				c.Roles = append(c.Roles, s)
			}
		}
	}
	tenantIssuers := []string{"https://sts.windows.net/" + c.TenantID + "/", a.url + c.TenantID + "/v2.0"}
	if !slices.Contains(tenantIssuers, c.Issuer) {
		return Claims{}, fmt.Errorf("issuer %q is not this authority's", c.Issuer)
	}
	return c, nil
}

// aadError writes Entra's error JSON: error, error_description starting with AADSTSnnnn,
// error_codes, timestamp, trace_id, correlation_id, error_uri.
func aadError(w http.ResponseWriter, base string, status int, code string, aadsts int, msg string) {
	trace, corr := uuid.NewString(), uuid.NewString()
	ts := time.Now().UTC().Format("2006-01-02 15:04:05Z")
	writeJSON(w, status, map[string]any{
		"error": code,
		"error_description": fmt.Sprintf("AADSTS%d: %s Trace ID: %s Correlation ID: %s Timestamp: %s",
			aadsts, msg, trace, corr, ts),
		"error_codes":    []int{aadsts},
		"timestamp":      ts,
		"trace_id":       trace,
		"correlation_id": corr,
		"error_uri":      base + "error?code=" + strconv.Itoa(aadsts),
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	w.Write(b)
}

// sleepCtx waits d or until ctx is done, reporting whether the full wait happened.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return true
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
