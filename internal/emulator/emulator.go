// Package emulator is a faithful local stand-in for the parts of Azure the gateway talks to: a
// Microsoft Entra ID authority over TLS (OpenID discovery, instance discovery, JWKS, a token
// endpoint for client secrets, certificate assertions and federated assertions, AADSTS-shaped
// errors, RS256 access tokens), an App Service managed-identity endpoint, and an Azure OpenAI /
// Foundry data plane that validates the bearer token and refuses api-key. Tests and `proxy
// demo` drive the real azidentity/MSAL code against it, on loopback only.
package emulator

import (
	"crypto/rand"
	"encoding/base64"
	"fmt"
)

// The demo's identities, matching the README's example configuration.
const (
	DefaultTenantID = "00000000-0000-0000-0000-000000000000"
	DefaultClientID = "11111111-1111-1111-1111-111111111111"
)

// Options configure Start.
type Options struct {
	// Authority configures the Entra emulator.
	Authority AuthorityOptions
	// OpenAI configures the data plane; its Verifier is set to the authority.
	OpenAI OpenAIOptions
}

// Emulator is an authority with one tenant and one registered app, plus a data plane trusting it.
type Emulator struct {
	*Authority
	OpenAI *OpenAI
	// TenantID, ClientID and ClientSecret are the registered app's, for a client_secret credential.
	TenantID, ClientID, ClientSecret string
}

// Start runs an authority and a data plane, with DefaultTenantID/DefaultClientID registered
// under a fresh random secret.
func Start(opts Options) (*Emulator, error) {
	a, err := NewAuthority(opts.Authority)
	if err != nil {
		return nil, fmt.Errorf("starting Entra emulator: %w", err)
	}
	secret := RandomSecret()
	a.AddTenant(DefaultTenantID, "emulator.onmicrosoft.com")
	a.AddApp(App{TenantID: DefaultTenantID, ClientID: DefaultClientID, Secrets: []string{secret}})

	opts.OpenAI.Verifier = a
	o, err := NewOpenAI(opts.OpenAI)
	if err != nil {
		a.Close()
		return nil, fmt.Errorf("starting Azure OpenAI emulator: %w", err)
	}
	return &Emulator{Authority: a, OpenAI: o, TenantID: DefaultTenantID, ClientID: DefaultClientID, ClientSecret: secret}, nil
}

// Close stops every listener.
func (e *Emulator) Close() {
	e.OpenAI.Close()
	e.Authority.Close()
}

// RandomSecret returns a client-secret-like random string.
func RandomSecret() string {
	b := make([]byte, 30)
	rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}
