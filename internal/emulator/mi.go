package emulator

import (
	"crypto/subtle"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
)

// ManagedIdentity is a managed identity the emulator's App Service endpoint can issue tokens for.
type ManagedIdentity struct {
	TenantID string
	// ClientID, ObjectID and ResourceID identify the identity; ObjectID is generated if empty.
	ClientID, ObjectID, ResourceID string
	// SystemAssigned marks the identity used when a request names none.
	SystemAssigned bool
}

// managedIdentityServer serves the App Service managed identity protocol (2019-08-01), the one
// azidentity uses when IDENTITY_ENDPOINT and IDENTITY_HEADER are set: IMDS's address is
// hard-coded, but this one is configurable, so tests and the demo exercise the real
// ManagedIdentityCredential code path.
type managedIdentityServer struct {
	a      *Authority
	srv    *http.Server
	url    string
	header string
}

func newManagedIdentityServer(a *Authority) (*managedIdentityServer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	m := &managedIdentityServer{a: a, url: "http://" + ln.Addr().String() + "/msi/token", header: uuid.NewString()}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /msi/token", m.token)
	m.srv = &http.Server{Handler: a.faults(mux), ReadHeaderTimeout: 10 * time.Second}
	go m.srv.Serve(ln)
	return m, nil
}

func (m *managedIdentityServer) close() { m.srv.Close() }

// AddManagedIdentity registers a managed identity.
func (a *Authority) AddManagedIdentity(mi ManagedIdentity) ManagedIdentity {
	if mi.ObjectID == "" {
		mi.ObjectID = uuid.NewString()
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.identities = append(a.identities, &mi)
	return mi
}

// ManagedIdentityEnv returns the IDENTITY_ENDPOINT and IDENTITY_HEADER values that point
// azidentity's ManagedIdentityCredential at the emulator.
func (a *Authority) ManagedIdentityEnv() (endpoint, header string) {
	return a.mi.url, a.mi.header
}

func (m *managedIdentityServer) token(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	clientID, resID, objID := q.Get("client_id"), q.Get("mi_res_id"), q.Get("object_id")
	m.a.mu.Lock()
	m.a.counts[clientID]++
	m.a.mu.Unlock()

	if subtle.ConstantTimeCompare([]byte(r.Header.Get("X-IDENTITY-HEADER")), []byte(m.header)) != 1 {
		appServiceError(w, http.StatusUnauthorized, "The X-IDENTITY-HEADER header is missing or does not match IDENTITY_HEADER.")
		return
	}
	if v := q.Get("api-version"); v != "2019-08-01" {
		appServiceError(w, http.StatusBadRequest, fmt.Sprintf("Unsupported api-version %q.", v))
		return
	}
	var id *ManagedIdentity
	m.a.mu.Lock()
	for _, mi := range m.a.identities {
		switch {
		case clientID != "" && strings.EqualFold(mi.ClientID, clientID),
			resID != "" && strings.EqualFold(mi.ResourceID, resID),
			objID != "" && strings.EqualFold(mi.ObjectID, objID),
			clientID == "" && resID == "" && objID == "" && mi.SystemAssigned:
			id = mi
		}
	}
	m.a.mu.Unlock()
	if id == nil {
		appServiceError(w, http.StatusBadRequest, "No managed identity matches the specified parameters, or the app has no system-assigned identity.")
		return
	}
	res, status, code, aadsts, msg := m.a.resourceFor(q.Get("resource")+"/.default", id.TenantID)
	if status != 0 {
		aadError(w, m.a.url, status, code, aadsts, msg)
		return
	}
	extra := map[string]any{}
	if id.ResourceID != "" {
		extra["xms_mirid"] = id.ResourceID
	}
	tok, lifetime, _, err := m.a.issue(id.TenantID, id.ClientID, id.ObjectID, nil, "2", res, extra)
	if err != nil {
		appServiceError(w, http.StatusInternalServerError, "Failed to issue a token.")
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"access_token": tok,
		"expires_on":   strconv.FormatInt(time.Now().Add(lifetime).Unix(), 10),
		"resource":     q.Get("resource"),
		"token_type":   "Bearer",
		"client_id":    id.ClientID,
	})
}

func appServiceError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]any{"statusCode": status, "message": msg, "correlationId": uuid.NewString()})
}
