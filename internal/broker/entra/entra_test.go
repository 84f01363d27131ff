package entra

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	pkcs12 "software.sslmate.com/src/go-pkcs12"

	"github.com/tokenproxy/tokenproxy/internal/broker"
	"github.com/tokenproxy/tokenproxy/internal/config"
	"github.com/tokenproxy/tokenproxy/internal/emulator"
)

const scope = "https://cognitiveservices.azure.com/.default"

func startEmulator(t *testing.T) *emulator.Emulator {
	t.Helper()
	emu, err := emulator.Start(emulator.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(emu.Close)
	return emu
}

// fetch builds the credential, acquires a token and checks the emulated data plane accepts it.
func fetch(t *testing.T, emu *emulator.Emulator, c *config.Credential) (broker.Token, emulator.Claims) {
	t.Helper()
	f, err := New("test", c, Options{HTTPClient: emu.CA().Client()})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	tok, err := f.Fetch(t.Context(), scope)
	if err != nil {
		t.Fatalf("Fetch: %v", err)
	}
	claims, err := emu.Verify(tok.Value, emulator.CognitiveServicesResource)
	if err != nil {
		t.Fatalf("the data plane would reject the token: %v", err)
	}
	if left := time.Until(tok.ExpiresOn); left < 50*time.Minute || left > time.Hour {
		t.Errorf("got ExpiresOn in %v, want about an hour", left)
	}
	return tok, claims
}

// fetchErr builds the credential and returns the acquisition error.
func fetchErr(t *testing.T, emu *emulator.Emulator, c *config.Credential) error {
	t.Helper()
	f, err := New("test", c, Options{HTTPClient: emu.CA().Client()})
	if err != nil {
		return err
	}
	_, err = f.Fetch(t.Context(), scope)
	if err == nil {
		t.Fatal("Fetch succeeded, want an error")
	}
	return err
}

func TestClientSecret(t *testing.T) {
	emu := startEmulator(t)
	cred := &config.Credential{
		Type: config.TypeClientSecret, TenantID: emu.TenantID, ClientID: emu.ClientID,
		ClientSecret: config.Secret(emu.ClientSecret), AuthorityHost: emu.URL(),
	}
	_, claims := fetch(t, emu, cred)
	if claims.AppID != emu.ClientID || claims.TenantID != emu.TenantID {
		t.Errorf("got claims %+v, want the app's", claims)
	}

	// Each acquisition asks Entra: a fresh credential bypasses MSAL's cache, which would serve the
	// same token until five minutes before expiry and defeat the broker's half-life refresh.
	f, _ := New("test", cred, Options{HTTPClient: emu.CA().Client()})
	before := emu.TokensIssued(emu.ClientID)
	a, _ := f.Fetch(t.Context(), scope)
	b, _ := f.Fetch(t.Context(), scope)
	if got := emu.TokensIssued(emu.ClientID) - before; got != 2 || a.Value == b.Value {
		t.Errorf("two fetches issued %d tokens (same value: %v), want 2 distinct", got, a.Value == b.Value)
	}
}

func TestRefreshInBecomesRefreshOn(t *testing.T) {
	emu := startEmulator(t)
	emu.SetTokenLifetime(2*time.Hour, 20*time.Minute)
	tok, _ := func() (broker.Token, error) {
		f, err := New("test", &config.Credential{
			Type: config.TypeClientSecret, TenantID: emu.TenantID, ClientID: emu.ClientID,
			ClientSecret: config.Secret(emu.ClientSecret), AuthorityHost: emu.URL(),
		}, Options{HTTPClient: emu.CA().Client()})
		if err != nil {
			t.Fatal(err)
		}
		return f.Fetch(t.Context(), scope)
	}()
	if left := time.Until(tok.RefreshOn); left < 19*time.Minute || left > 21*time.Minute {
		t.Errorf("got RefreshOn in %v, want about 20m (Entra's refresh_in)", left)
	}
}

func TestClientSecretErrorsAreExplained(t *testing.T) {
	emu := startEmulator(t)
	emu.AddApp(emulator.App{TenantID: emu.TenantID, ClientID: "expired-app", ExpiredSecrets: []string{"old-secret"}})
	base := config.Credential{
		Type: config.TypeClientSecret, TenantID: emu.TenantID, ClientID: emu.ClientID,
		ClientSecret: config.Secret(emu.ClientSecret), AuthorityHost: emu.URL(),
	}
	tests := []struct {
		name   string
		modify func(*config.Credential)
		scope  string
		want   []string
	}{
		{
			name:   "wrong secret",
			modify: func(c *config.Credential) { c.ClientSecret = "the-secret-id-not-its-value" },
			want:   []string{"HTTP 401 invalid_client", "AADSTS7000215", "use the secret's Value, not its Secret ID", "trace ID"},
		},
		{
			name:   "expired secret",
			modify: func(c *config.Credential) { c.ClientID, c.ClientSecret = "expired-app", "old-secret" },
			want:   []string{"AADSTS7000222", "has expired"},
		},
		{
			name:   "unknown app",
			modify: func(c *config.Credential) { c.ClientID = "22222222-2222-2222-2222-222222222222" },
			want:   []string{"AADSTS700016", "not an application in this tenant"},
		},
		{
			name:   "unknown tenant",
			modify: func(c *config.Credential) { c.TenantID = "99999999-9999-9999-9999-999999999999" },
			want:   []string{"AADSTS90002", "check tenant_id and authority_host"},
		},
		{
			name:  "unknown resource",
			scope: "https://nothing.example.com/.default",
			want:  []string{"AADSTS500011", "check the upstream's scope"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := base
			if tt.modify != nil {
				tt.modify(&c)
			}
			f, err := New("test", &c, Options{HTTPClient: emu.CA().Client()})
			if err != nil {
				t.Fatal(err)
			}
			s := scope
			if tt.scope != "" {
				s = tt.scope
			}
			_, err = f.Fetch(t.Context(), s)
			if err == nil {
				t.Fatal("Fetch succeeded, want an error")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, err)
				}
			}
			if strings.Contains(err.Error(), c.ClientSecret.Value()) {
				t.Errorf("error contains the client secret: %v", err)
			}
			if strings.Count(err.Error(), "\n") > 0 {
				t.Errorf("error spans several lines:\n%v", err)
			}
		})
	}
}

func TestEntraDownAndUnreachable(t *testing.T) {
	emu := startEmulator(t)
	cred := &config.Credential{
		Type: config.TypeClientSecret, TenantID: emu.TenantID, ClientID: emu.ClientID,
		ClientSecret: config.Secret(emu.ClientSecret), AuthorityHost: emu.URL(),
	}
	emu.SetDown(true)
	if err := fetchErr(t, emu, cred); !strings.Contains(err.Error(), "AADSTS90033") {
		t.Errorf("got %v, want the outage explained", err)
	}
	emu.SetDown(false)

	cred.AuthorityHost = "https://127.0.0.1:1/"
	if err := fetchErr(t, emu, cred); !strings.Contains(err.Error(), "connection refused") {
		t.Errorf("got %v, want connection refused", err)
	}
}

// newCert makes a self-signed RSA certificate, as `az ad sp create-for-rbac --create-cert` does.
func newCert(t *testing.T) (*x509.Certificate, *rsa.PrivateKey) {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "tokenproxy-test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return cert, key
}

func TestClientCertificate(t *testing.T) {
	emu := startEmulator(t)
	cert, key := newCert(t)
	emu.AddApp(emulator.App{TenantID: emu.TenantID, ClientID: "cert-app", Certificates: []*x509.Certificate{cert}})

	pemData := append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}),
		pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})...)
	pfx, err := pkcs12.LegacyDES.Encode(key, cert, nil, "pfx-password")
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name     string
		data     []byte
		password config.Secret
	}{
		{"PEM", pemData, ""},
		{"PFX with password", pfx, "pfx-password"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, claims := fetch(t, emu, &config.Credential{
				Type: config.TypeClientCertificate, TenantID: emu.TenantID, ClientID: "cert-app",
				Certificate: tt.data, CertificatePassword: tt.password, AuthorityHost: emu.URL(),
			})
			if claims.AppID != "cert-app" {
				t.Errorf("got appid %q, want cert-app", claims.AppID)
			}
		})
	}

	t.Run("wrong PFX password", func(t *testing.T) {
		_, err := New("test", &config.Credential{
			Type: config.TypeClientCertificate, TenantID: emu.TenantID, ClientID: "cert-app",
			Certificate: pfx, CertificatePassword: "nope", CertificateFile: "/etc/cert.pfx", AuthorityHost: emu.URL(),
		}, Options{})
		if err == nil || !strings.Contains(err.Error(), "reading certificate_file /etc/cert.pfx") {
			t.Errorf("got %v, want a certificate_file error", err)
		}
	})
	t.Run("certificate not uploaded", func(t *testing.T) {
		other, otherKey := newCert(t)
		data := append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: other.Raw}),
			pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(otherKey)})...)
		err := fetchErr(t, emu, &config.Credential{
			Type: config.TypeClientCertificate, TenantID: emu.TenantID, ClientID: "cert-app",
			Certificate: data, AuthorityHost: emu.URL(),
		})
		if !strings.Contains(err.Error(), "AADSTS700027") || !strings.Contains(err.Error(), "upload its public part") {
			t.Errorf("got %v, want AADSTS700027 explained", err)
		}
	})
}

func TestWorkloadIdentity(t *testing.T) {
	emu := startEmulator(t)
	const subject = "system:serviceaccount:ai:tokenproxy"
	emu.AddApp(emulator.App{TenantID: emu.TenantID, ClientID: "wi-app", Federated: []emulator.FederatedCredential{
		{Issuer: emu.FederatedIssuer(), Subject: subject},
	}})
	tokenFile := filepath.Join(t.TempDir(), "azure-identity-token")
	write := func(sub string) {
		tok, err := emu.IssueFederatedToken(emulator.FederatedToken{Subject: sub})
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(tokenFile, []byte(tok), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cred := &config.Credential{
		Type: config.TypeWorkloadIdentity, TenantID: emu.TenantID, ClientID: "wi-app",
		TokenFile: tokenFile, AuthorityHost: emu.URL(),
	}
	write(subject)
	if _, claims := fetch(t, emu, cred); claims.AppID != "wi-app" {
		t.Errorf("got appid %q, want wi-app", claims.AppID)
	}

	write("system:serviceaccount:other:sa")
	if err := fetchErr(t, emu, cred); !strings.Contains(err.Error(), "AADSTS700213") || !strings.Contains(err.Error(), "system:serviceaccount:<namespace>") {
		t.Errorf("got %v, want the subject mismatch explained", err)
	}
}

func TestWorkloadIdentityFromWebhookEnvironment(t *testing.T) {
	// What the Azure workload identity webhook injects into a pod, read through config.Load.
	emu := startEmulator(t)
	emu.AddApp(emulator.App{TenantID: emu.TenantID, ClientID: "wi-env-app", Federated: []emulator.FederatedCredential{
		{Issuer: emu.FederatedIssuer(), Subject: "system:serviceaccount:ns:sa"},
	}})
	dir := t.TempDir()
	tok, _ := emu.IssueFederatedToken(emulator.FederatedToken{Subject: "system:serviceaccount:ns:sa"})
	os.WriteFile(filepath.Join(dir, "token"), []byte(tok), 0o600)
	env := map[string]string{
		"AZURE_TENANT_ID": emu.TenantID, "AZURE_CLIENT_ID": "wi-env-app",
		"AZURE_FEDERATED_TOKEN_FILE": filepath.Join(dir, "token"), "AZURE_AUTHORITY_HOST": emu.URL(),
	}
	cfg, err := config.Parse([]byte(`
allow_unauthenticated: true
credentials: {wi: {type: workload_identity}}
upstreams: {u: {url: "https://x.openai.azure.com", credential: wi}}
`), dir, func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	fetch(t, emu, cfg.Credentials["wi"])
}

// systemAssignedFetched records that this process has cached a system-assigned token.
var systemAssignedFetched atomic.Bool

func TestManagedIdentity(t *testing.T) {
	emu := startEmulator(t)
	endpoint, header := emu.ManagedIdentityEnv()
	t.Setenv("IDENTITY_ENDPOINT", endpoint)
	t.Setenv("IDENTITY_HEADER", header)

	// The managed-identity token cache is process-wide: every case uses identities of its own.
	sys := emu.AddManagedIdentity(emulator.ManagedIdentity{TenantID: emu.TenantID, ClientID: uuid.NewString(), SystemAssigned: true})
	byClient := emu.AddManagedIdentity(emulator.ManagedIdentity{TenantID: emu.TenantID, ClientID: uuid.NewString()})
	byResource := emu.AddManagedIdentity(emulator.ManagedIdentity{TenantID: emu.TenantID, ClientID: uuid.NewString(),
		ResourceID: "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/" + uuid.NewString()})
	byObject := emu.AddManagedIdentity(emulator.ManagedIdentity{TenantID: emu.TenantID, ClientID: uuid.NewString()})

	for _, tt := range []struct {
		name string
		cred config.Credential
		want emulator.ManagedIdentity
	}{
		{"system-assigned", config.Credential{}, sys},
		{"user-assigned by client_id", config.Credential{ClientID: byClient.ClientID}, byClient},
		{"user-assigned by resource_id", config.Credential{ResourceID: byResource.ResourceID}, byResource},
		{"user-assigned by object_id", config.Credential{ObjectID: byObject.ObjectID}, byObject},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if tt.want == sys && systemAssignedFetched.Swap(true) {
				// The system-assigned identity has one cache key per process, so a later run
				// (go test -count=N) would be served the first run's token, signed by a key
				// this emulator never published.
				t.Skip("MSAL's process-wide cache already holds a system-assigned token")
			}
			tt.cred.Type = config.TypeManagedIdentity
			_, claims := fetch(t, emu, &tt.cred)
			if claims.ObjectID != tt.want.ObjectID {
				t.Errorf("got token for oid %s, want %s", claims.ObjectID, tt.want.ObjectID)
			}
		})
	}

	t.Run("concurrent cold calls through the broker make one request", func(t *testing.T) {
		// azidentity's ManagedIdentityCredential has no lock of its own; the broker's singleflight
		// must stand in for it.
		mi := emu.AddManagedIdentity(emulator.ManagedIdentity{TenantID: emu.TenantID, ClientID: uuid.NewString()})
		f, err := New("mi", &config.Credential{Type: config.TypeManagedIdentity, ClientID: mi.ClientID}, Options{HTTPClient: emu.CA().Client()})
		if err != nil {
			t.Fatal(err)
		}
		b, _ := broker.New(broker.Options{Fetchers: map[string]broker.Fetcher{"mi": f}})
		src, _ := b.Source("mi", scope)
		errs := make(chan error, 100)
		for range 100 {
			go func() { _, err := src.Token(t.Context()); errs <- err }()
		}
		for range 100 {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
		if n := emu.TokenRequests(mi.ClientID); n != 1 {
			t.Errorf("100 concurrent cold calls made %d managed identity requests, want 1", n)
		}
	})

	t.Run("unknown identity is explained", func(t *testing.T) {
		err := fetchErr(t, emu, &config.Credential{Type: config.TypeManagedIdentity, ClientID: uuid.NewString()})
		if !strings.Contains(err.Error(), "No managed identity matches") {
			t.Errorf("got %v, want the endpoint's message", err)
		}
	})
}

func TestAzureCLI(t *testing.T) {
	emu := startEmulator(t)
	tok, err := emu.IssueToken(emu.ClientID, emulator.CognitiveServicesResource)
	if err != nil {
		t.Fatal(err)
	}
	// A stand-in `az` on PATH: azidentity runs `az account get-access-token -o json --resource …`.
	dir := t.TempDir()
	out, _ := json.Marshal(map[string]any{
		"accessToken": tok, "expiresOn": time.Now().Add(time.Hour).Format("2006-01-02 15:04:05.000000"),
		"expires_on": time.Now().Add(time.Hour).Unix(), "tokenType": "Bearer", "tenant": emu.TenantID,
	})
	os.WriteFile(filepath.Join(dir, "az.json"), out, 0o600)
	script := fmt.Sprintf(`#!/bin/sh
echo "$@" > %[1]s/args
case "$*" in
  *--tenant\ %[2]s*) cat %[1]s/az.json ;;
  *) echo "ERROR: Please run 'az login' to setup account." >&2; exit 1 ;;
esac
`, dir, emu.TenantID)
	if err := os.WriteFile(filepath.Join(dir, "az"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))

	fetch(t, emu, &config.Credential{Type: config.TypeAzureCLI, TenantID: emu.TenantID})
	args, _ := os.ReadFile(filepath.Join(dir, "args"))
	if !strings.Contains(string(args), "--resource https://cognitiveservices.azure.com") {
		t.Errorf("az was called with %q, want the resource", args)
	}

	err = fetchErr(t, emu, &config.Credential{Type: config.TypeAzureCLI})
	if !strings.Contains(err.Error(), "az login") {
		t.Errorf("got %v, want the CLI's login hint", err)
	}
}

func TestDefaultCredentialFromEnvironment(t *testing.T) {
	emu := startEmulator(t)
	t.Setenv("AZURE_TOKEN_CREDENTIALS", "EnvironmentCredential") // no IMDS probe, no CLI
	t.Setenv("AZURE_TENANT_ID", emu.TenantID)
	t.Setenv("AZURE_CLIENT_ID", emu.ClientID)
	t.Setenv("AZURE_CLIENT_SECRET", emu.ClientSecret)
	t.Setenv("AZURE_AUTHORITY_HOST", emu.URL())
	_, claims := fetch(t, emu, &config.Credential{Type: config.TypeDefault, AuthorityHost: emu.URL()})
	if claims.AppID != emu.ClientID {
		t.Errorf("got appid %q, want %q", claims.AppID, emu.ClientID)
	}
}
