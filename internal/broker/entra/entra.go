// Package entra adapts azidentity credentials to broker.Fetcher. It is the only package that
// imports azidentity and azcore: the rest of the gateway sees broker.Token values and errors
// already translated into operator terms.
package entra

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/cloud"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"

	"github.com/tokenproxy/tokenproxy/internal/broker"
	"github.com/tokenproxy/tokenproxy/internal/config"
)

// Options configure the credentials New builds.
type Options struct {
	// HTTPClient sends requests to Entra and managed-identity endpoints. If nil, azcore's
	// default transport is used (system roots, environment proxy settings).
	HTTPClient *http.Client
}

// knownAuthorityHosts are the public and sovereign Entra authorities; for any other
// authority_host MSAL's instance discovery (a call to login.microsoftonline.com) is turned off.
var knownAuthorityHosts = []string{
	"login.microsoftonline.com",
	"login.microsoftonline.us",
	"login.chinacloudapi.cn",
}

// New returns a Fetcher for the named credential.
//
// Client secret, certificate and workload identity credentials are rebuilt for each
// acquisition. MSAL caches tokens per credential instance and serves a cached token until five
// minutes before it expires, which would defeat the broker's half-life refresh (and its head
// start on an Entra outage); a fresh instance always asks Entra, and re-reads a rotated
// workload identity token file. The broker is the cache. Managed identity, Azure CLI and the
// default chain keep one instance: the managed-identity cache is process-wide anyway, and the
// broker copes with a fetcher answering from its own cache.
func New(name string, c *config.Credential, opts Options) (broker.Fetcher, error) {
	co := azcore.ClientOptions{
		// The broker owns retries, with back-off that keeps serving the current token; azcore's
		// own retries would only hold up requests that are waiting for a first token.
		Retry: policy.RetryOptions{MaxRetries: -1},
	}
	if opts.HTTPClient != nil {
		co.Transport = opts.HTTPClient
	}
	disableDiscovery := false
	if c.AuthorityHost != "" {
		co.Cloud = cloud.Configuration{ActiveDirectoryAuthorityHost: c.AuthorityHost}
		if u, err := url.Parse(c.AuthorityHost); err == nil && !slices.Contains(knownAuthorityHosts, strings.ToLower(u.Hostname())) {
			disableDiscovery = true
		}
	}
	f := &fetcher{name: name, typ: c.Type}
	switch c.Type {
	case config.TypeClientSecret:
		secret := c.ClientSecret.Value()
		f.newCred = func() (azcore.TokenCredential, error) {
			return azidentity.NewClientSecretCredential(c.TenantID, c.ClientID, secret, &azidentity.ClientSecretCredentialOptions{
				ClientOptions: co, DisableInstanceDiscovery: disableDiscovery,
			})
		}
	case config.TypeClientCertificate:
		certs, key, err := azidentity.ParseCertificates(c.Certificate, []byte(c.CertificatePassword.Value()))
		if err != nil {
			return nil, fmt.Errorf("credential %q: reading certificate_file %s: %w (want PEM with certificate and unencrypted key, or PFX with certificate_password)", name, c.CertificateFile, err)
		}
		f.newCred = func() (azcore.TokenCredential, error) {
			return azidentity.NewClientCertificateCredential(c.TenantID, c.ClientID, certs, key, &azidentity.ClientCertificateCredentialOptions{
				ClientOptions: co, DisableInstanceDiscovery: disableDiscovery, SendCertificateChain: c.SendCertificateChain,
			})
		}
	case config.TypeWorkloadIdentity:
		f.newCred = func() (azcore.TokenCredential, error) {
			return azidentity.NewWorkloadIdentityCredential(&azidentity.WorkloadIdentityCredentialOptions{
				ClientOptions: co, DisableInstanceDiscovery: disableDiscovery,
				TenantID: c.TenantID, ClientID: c.ClientID, TokenFilePath: c.TokenFile,
			})
		}
	case config.TypeManagedIdentity:
		o := &azidentity.ManagedIdentityCredentialOptions{ClientOptions: co}
		switch {
		case c.ClientID != "":
			o.ID = azidentity.ClientID(c.ClientID)
		case c.ResourceID != "":
			o.ID = azidentity.ResourceID(c.ResourceID)
		case c.ObjectID != "":
			o.ID = azidentity.ObjectID(c.ObjectID)
		}
		cred, err := azidentity.NewManagedIdentityCredential(o)
		if err != nil {
			return nil, fmt.Errorf("credential %q: %w", name, err)
		}
		f.shared = cred
	case config.TypeAzureCLI:
		cred, err := azidentity.NewAzureCLICredential(&azidentity.AzureCLICredentialOptions{TenantID: c.TenantID, Subscription: c.Subscription})
		if err != nil {
			return nil, fmt.Errorf("credential %q: %w", name, err)
		}
		f.shared = cred
	case config.TypeDefault:
		cred, err := azidentity.NewDefaultAzureCredential(&azidentity.DefaultAzureCredentialOptions{
			ClientOptions: co, DisableInstanceDiscovery: disableDiscovery, TenantID: c.TenantID,
		})
		if err != nil {
			return nil, fmt.Errorf("credential %q: %w", name, err)
		}
		f.shared = cred
	default:
		return nil, fmt.Errorf("credential %q: unknown type %q", name, c.Type)
	}
	if f.newCred != nil {
		// Build one now so configuration errors (a malformed tenant ID, a bad authority host)
		// surface at start, not at the first acquisition.
		if _, err := f.newCred(); err != nil {
			return nil, fmt.Errorf("credential %q: %w", name, err)
		}
	}
	return f, nil
}

type fetcher struct {
	name, typ string
	newCred   func() (azcore.TokenCredential, error) // a fresh credential per acquisition
	shared    azcore.TokenCredential                 // or one for the process
}

var _ broker.Fetcher = (*fetcher)(nil)

// Fetch acquires a token for scope and explains failures in operator terms.
func (f *fetcher) Fetch(ctx context.Context, scope string) (broker.Token, error) {
	cred := f.shared
	if cred == nil {
		var err error
		if cred, err = f.newCred(); err != nil {
			return broker.Token{}, err
		}
	}
	tok, err := cred.GetToken(ctx, policy.TokenRequestOptions{Scopes: []string{scope}})
	if err != nil {
		return broker.Token{}, explain(ctx, f.typ, err)
	}
	return broker.Token{Value: tok.Token, ExpiresOn: tok.ExpiresOn, RefreshOn: tok.RefreshOn}, nil
}

// errorOf reports whether err is, or wraps, an azidentity authentication failure carrying
// the identity provider's HTTP response.
func errorOf(err error) (*azidentity.AuthenticationFailedError, bool) {
	var afe *azidentity.AuthenticationFailedError
	if errors.As(err, &afe) && afe.RawResponse != nil {
		return afe, true
	}
	return nil, false
}
