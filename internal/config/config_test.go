package config

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/tokenproxy/tokenproxy/internal/emulator"
)

func env(m map[string]string) Getenv {
	return func(k string) string { return m[k] }
}

func TestLoadIssueExample(t *testing.T) {
	cfg, err := Load("testdata/example.yaml", env(map[string]string{"AZURE_CLIENT_SECRET": "s3cr3t-value"}))
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	want := &Config{
		Listen:           "127.0.0.1:8080",
		AdminListen:      "127.0.0.1:9090",
		LogLevel:         "info",
		LogFormat:        "json",
		MaxRequestBytes:  32 << 20,
		SpareConnections: 1,
		Timeouts:         DefaultTimeouts,
		Resilience:       DefaultResilience,
		Credentials: map[string]*Credential{"corp-app": {
			Type:         TypeClientSecret,
			TenantID:     "00000000-0000-0000-0000-000000000000",
			ClientID:     "11111111-1111-1111-1111-111111111111",
			ClientSecret: "s3cr3t-value",
		}},
		Upstreams: map[string]*Upstream{"eastca": {
			URL:        "https://genaitemplateplatformeastca.openai.azure.com",
			Credential: "corp-app",
			Scope:      DefaultScope,
		}},
		Deployments: map[string]*Deployment{"gpt-4.1-mini": {Upstream: "eastca", Deployment: "deploy-gpt-4.1"}},
		Callers: []*Caller{{
			Name:        "a360-prod",
			KeySHA256:   "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
			Deployments: []string{"gpt-4.1-mini"},
			KeyHashes:   []string{"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"},
		}},
	}
	if diff := cmp.Diff(want, cfg, cmpopts.IgnoreUnexported(Credential{})); diff != "" {
		t.Errorf("Load mismatch (-want +got):\n%s", diff)
	}
}

func TestLoadExampleWithoutSecretNamesTheVariable(t *testing.T) {
	_, err := Load("testdata/example.yaml", env(nil))
	if err == nil {
		t.Fatal("Load succeeded without AZURE_CLIENT_SECRET")
	}
	if want := "credentials.corp-app.client_secret: environment variable AZURE_CLIENT_SECRET is not set (line 10)"; err.Error() != want {
		t.Errorf("got error %q, want %q", err, want)
	}
}

// minimal is a valid configuration the table below breaks one piece at a time.
const minimal = `
credentials:
  app: {type: client_secret, tenant_id: t1, client_id: c1, client_secret: s}
upstreams:
  up: {url: "https://x.openai.azure.com", credential: app}
callers:
  - {name: c, key_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08, deployments: ["*"]}
`

func TestParseErrors(t *testing.T) {
	hash := "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
	tests := []struct {
		name string
		yaml string
		env  map[string]string
		want []string // every line must appear in the error
	}{
		{
			name: "unknown top-level key with suggestion",
			yaml: minimal + "listn: 127.0.0.1:1\n",
			want: []string{`listn: unknown key (line 8); did you mean "listen"?`},
		},
		{
			name: "unknown nested key",
			yaml: strings.Replace(minimal, "client_secret: s", "client_secret: s, clientsecret: x", 1),
			want: []string{`credentials.app.clientsecret: unknown key (line 3); did you mean "client_secret"?`},
		},
		{
			name: "unknown caller key",
			yaml: minimal + "  - {name: d, keysha: x, deployments: [a]}\n",
			want: []string{"callers[1].keysha: unknown key (line 8)"},
		},
		{
			name: "several problems reported at once",
			yaml: `
log_level: loud
log_format: xml
listen: nope
admin_listen: nope
max_request_bytes: -1
spare_connections: -1
timeouts: {dial: -1s, shutdown_delay: -1s}
credentials:
  a: {type: password}
  b: {type: client_secret, tenant_id: "bad tenant", client_id: c, client_secret: s, resource_id: r}
  c: {type: managed_identity, client_id: x, object_id: y}
  d: {type: workload_identity}
  e: {type: client_certificate, tenant_id: t, client_id: c, certificate_file: /nonexistent/cert.pem}
  f: {type: client_secret, tenant_id: t, client_id: c, client_secret: s, authority_host: "http://login.example"}
upstreams:
  u1: {url: "http://example.com", credential: b}
  u2: {url: "https://x.openai.azure.com", credential: missing, scope: "https://cognitiveservices.azure.com"}
  u3: {url: "https://user:pw@x.openai.azure.com", credential: b}
  u4: {url: "https://x.openai.azure.com/?a=1", credential: b}
  u5: {url: "ftp://x", credential: b}
deployments:
  "bad/name": {upstream: u1}
  ok: {upstream: nowhere, deployment: "a b"}
callers:
  - {name: "", key_sha256: short, deployments: []}
  - {name: "x y", key_sha256: ` + hash + `, deployments: [unknown]}
  - {name: z, key_sha256: ` + strings.ToUpper(hash) + `, deployments: ["*"]}
`,
			want: []string{
				`listen: "nope" is not a host:port address`,
				`admin_listen: "nope" is not a host:port address`,
				`log_level: "loud" is not one of debug, info, warn, error`,
				`log_format: "xml" is not one of json, console`,
				`max_request_bytes: must be positive`,
				`spare_connections: must be from 0 to 64`,
				`timeouts.dial: must be positive`,
				`timeouts.shutdown_delay: must not be negative`,
				`credentials.a.type: "password" is not one of azure_cli, client_certificate, client_secret, default, managed_identity, workload_identity`,
				`credentials.b.tenant_id: "bad tenant" is not a tenant ID`,
				`credentials.b.resource_id: is not used by type client_secret`,
				`credentials.c: set at most one of client_id, resource_id, object_id`,
				`credentials.d.tenant_id: is required for type workload_identity (or the webhook's AZURE_TENANT_ID`,
				`credentials.d.client_id: is required for type workload_identity`,
				`credentials.d.token_file: is required for type workload_identity`,
				`credentials.e.certificate_file: open /nonexistent/cert.pem: no such file or directory`,
				`credentials.f.authority_host: "http://login.example" is not an https URL`,
				`upstreams.u1.url: plain http is allowed only to loopback hosts`,
				`upstreams.u2.credential: unknown credential "missing" (defined: a, b, c, d, e, f)`,
				`upstreams.u2.scope: "https://cognitiveservices.azure.com" is not a resource scope`,
				`upstreams.u3.url: must not carry user information`,
				`upstreams.u4.url: must not have a query or fragment`,
				`upstreams.u5.url: "ftp://x" is not an absolute http(s) URL`,
				`deployments.bad/name: "bad/name" is not a valid deployment name`,
				`deployments.ok.deployment: "a b" is not a valid deployment name`,
				`deployments.ok.upstream: unknown upstream "nowhere" (defined: u1, u2, u3, u4, u5)`,
				`callers[0].name: is required`,
				`callers[0].key_sha256: is not a SHA-256 in hex`,
				`callers[0].deployments: is required`,
				`callers[1].name: "x y" may hold only letters`,
				`callers[1].deployments[0]: unknown deployment "unknown" (defined: bad/name, ok)`,
				`callers[2]: has a key that callers[1] also has`,
			},
		},
		{
			name: "no callers without allow_unauthenticated",
			yaml: strings.SplitAfter(minimal, "credential: app}\n")[0],
			want: []string{"callers: no callers are configured"},
		},
		{
			name: "several upstreams need deployments",
			yaml: strings.Replace(minimal, "upstreams:\n", "upstreams:\n  up2: {url: \"https://y.openai.azure.com\", credential: app}\n", 1),
			want: []string{"deployments: required when there is more than one upstream"},
		},
		{
			name: "secret given twice",
			yaml: strings.Replace(minimal, "client_secret: s", "client_secret: s, client_secret_file: f", 1),
			want: []string{"credentials.app.client_secret_file: set client_secret or client_secret_file, not both"},
		},
		{
			name: "admin on the API port",
			yaml: minimal + "listen: 127.0.0.1:1\nadmin_listen: 127.0.0.1:1\n",
			want: []string{"admin_listen: must differ from listen"},
		},
		{
			name: "malformed reference is not echoed",
			yaml: strings.Replace(minimal, "client_secret: s}", "}\nlog_level: ${hunter2-secret}", 1),
			want: []string{"log_level: invalid variable reference: want ${NAME} or ${NAME:-default} (line 4)"},
		},
		{
			name: "type error keeps its line",
			yaml: minimal + "max_request_bytes: lots\n",
			want: []string{"line 8: cannot unmarshal !!str (a value, not shown) into int64"},
		},
		{
			name: "too many spare connections",
			yaml: minimal + "spare_connections: 65\n",
			want: []string{"spare_connections: must be from 0 to 64"},
		},
		{
			name: "duplicate key",
			yaml: minimal + "listen: a:1\nlisten: b:2\n",
			want: []string{`mapping key "listen" already defined at line 8`},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.yaml), t.TempDir(), env(tt.env))
			if err == nil {
				t.Fatal("Parse succeeded, want errors")
			}
			got := err.Error()
			for _, w := range tt.want {
				if !strings.Contains(got, w) {
					t.Errorf("error lacks %q; got:\n%s", w, got)
				}
			}
			if strings.Contains(got, "hunter2") {
				t.Errorf("error echoes a malformed reference's text:\n%s", got)
			}
		})
	}
}

func TestParseValidVariants(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "secret.txt"), []byte("from-file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	yaml := `
listen: ${LISTEN:-127.0.0.1:18080}
max_request_bytes: ${MAX}
allow_unauthenticated: true
timeouts: {shutdown_delay: 0s, response_header: 90s}
credentials:
  file: {type: client_secret, tenant_id: contoso.onmicrosoft.com, client_id: c, client_secret_file: secret.txt}
  hashy: {type: client_secret, tenant_id: t, client_id: c, client_secret: "a#b: $${LITERAL} ${PART}"}
  mi: {type: managed_identity}
  wi: {type: workload_identity}
  cli: {type: azure_cli, tenant_id: t, subscription: sub}
  def: {type: default}
upstreams:
  local: {url: "http://127.0.0.1:9999", credential: file, scope: "api://tokenproxy/.default"}
`
	cfg, err := Parse([]byte(yaml), dir, env(map[string]string{
		"MAX": "1024", "PART": "x y#z",
		"AZURE_TENANT_ID": "tw", "AZURE_CLIENT_ID": "cw", "AZURE_FEDERATED_TOKEN_FILE": "/var/run/token",
		"https_proxy": "http://proxy.corp:3128", "NO_PROXY": ".privatelink.openai.azure.com",
	}))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	// Upstreams go through the environment's proxy, as read at load, unless NO_PROXY names them.
	proxyFor := func(host string) string {
		u, err := cfg.UpstreamProxy.ProxyFunc()(&url.URL{Scheme: "https", Host: host})
		if err != nil || u == nil {
			return fmt.Sprint(err)
		}
		return u.String()
	}
	if got := proxyFor("eastca.openai.azure.com"); got != "http://proxy.corp:3128" {
		t.Errorf("proxy for a public endpoint: %s", got)
	}
	if got := proxyFor("x.privatelink.openai.azure.com"); got != "<nil>" {
		t.Errorf("proxy for an endpoint NO_PROXY names: %s", got)
	}
	for _, c := range []struct {
		name      string
		got, want any
	}{
		{"listen", cfg.Listen, "127.0.0.1:18080"},
		{"max_request_bytes", cfg.MaxRequestBytes, int64(1024)},
		{"shutdown_delay", cfg.Timeouts.ShutdownDelay, time.Duration(0)},
		{"response_header", cfg.Timeouts.ResponseHeader, 90 * time.Second},
		{"dial default", cfg.Timeouts.Dial, DefaultTimeouts.Dial},
		{"secret file", cfg.Credentials["file"].ClientSecret.Value(), "from-file"},
		{"secret with yaml syntax", cfg.Credentials["hashy"].ClientSecret.Value(), "a#b: ${LITERAL} x y#z"},
		{"workload tenant from env", cfg.Credentials["wi"].TenantID, "tw"},
		{"workload client from env", cfg.Credentials["wi"].ClientID, "cw"},
		{"workload token file from env", cfg.Credentials["wi"].TokenFile, "/var/run/token"},
		{"scope kept", cfg.Upstreams["local"].Scope, "api://tokenproxy/.default"},
	} {
		if c.got != c.want {
			t.Errorf("got %s = %v, want %v", c.name, c.got, c.want)
		}
	}
}

func TestBackendPools(t *testing.T) {
	// The issue's pool form loads as written, beside the single-backend form.
	cfg, err := Parse([]byte(`
credentials: {app: {type: managed_identity}}
upstreams:
  eastca-ptu: {url: "https://a.openai.azure.com", credential: app}
  eastus: {url: "https://b.openai.azure.com", credential: app}
  westeu: {url: "https://c.openai.azure.com", credential: app}
deployments:
  gpt-4.1-mini:
    backends:
      - {upstream: eastca-ptu, deployment: gpt41mini, priority: 1}
      - {upstream: eastus,     deployment: gpt41mini, priority: 2, weight: 3}
      - {upstream: westeu,     deployment: gpt-41-mini, priority: 2, weight: 1}
  gpt-4o: {upstream: eastus}
resilience: {max_attempts: 4, wait_for_capacity: 2s}
allow_unauthenticated: true
`), t.TempDir(), env(nil))
	if err != nil {
		t.Fatal(err)
	}
	want := []*Backend{
		{Upstream: "eastca-ptu", Deployment: "gpt41mini", Priority: 1, Weight: 1},
		{Upstream: "eastus", Deployment: "gpt41mini", Priority: 2, Weight: 3},
		{Upstream: "westeu", Deployment: "gpt-41-mini", Priority: 2, Weight: 1},
	}
	if diff := cmp.Diff(want, cfg.Deployments["gpt-4.1-mini"].Pool()); diff != "" {
		t.Errorf("pool mismatch (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]*Backend{{Upstream: "eastus", Deployment: "gpt-4o", Priority: 1, Weight: 1}}, cfg.Deployments["gpt-4o"].Pool()); diff != "" {
		t.Errorf("single form as a pool (-want +got):\n%s", diff)
	}
	if r := cfg.Resilience; r.MaxAttempts != 4 || r.WaitForCapacity != 2*time.Second || r.BreakerFailures != DefaultResilience.BreakerFailures {
		t.Errorf("got resilience %+v", r)
	}

	_, err = Parse([]byte(`
credentials: {app: {type: managed_identity}}
upstreams: {u: {url: "https://a.openai.azure.com", credential: app}}
deployments:
  d:
    upstream: u
    backends: [{upstream: nowhere, weight: -1}, {upstream: u, deployment: x, weight: 1000001}, {upstream: u, deployment: x}]
resilience: {max_attempts: 0, retry_budget: 2, breaker_open: 0s}
allow_unauthenticated: true
`), t.TempDir(), env(nil))
	for _, w := range []string{
		"deployments.d: set upstream (one backend) or backends (a pool), not both",
		`deployments.d.backends[0].upstream: unknown upstream "nowhere"`,
		"deployments.d.backends[0].weight: must be between 0 and 1000000",
		"deployments.d.backends[1].weight: must be between 0 and 1000000",
		"deployments.d.backends[2]: names the same upstream and deployment as a backend before it",
		"resilience.max_attempts: must be at least 1",
		"resilience.retry_budget: must be between 0 and 1",
		"resilience.breaker_open: must be positive",
	} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("error lacks %q: %v", w, err)
		}
	}
}

func TestExampleConfigLoads(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"app.pfx", "app.pfx.password"} {
		os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o600)
	}
	cfg, err := Load("../../examples/proxy.yaml", env(map[string]string{
		"AZURE_CLIENT_SECRET": "s", "CERT_DIR": dir,
		"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c", "AZURE_FEDERATED_TOKEN_FILE": "/var/run/token",
	}))
	if err != nil {
		t.Fatalf("examples/proxy.yaml does not load: %v", err)
	}
	if len(cfg.Credentials) != 6 || cfg.Deployments["gpt-4.1-mini"].Deployment != "deploy-gpt-4.1" {
		t.Errorf("examples/proxy.yaml loaded as %+v", cfg)
	}
	// Every default it states is the real default.
	d := Default()
	if cfg.Timeouts != d.Timeouts || cfg.Resilience != d.Resilience || cfg.MaxRequestBytes != d.MaxRequestBytes || cfg.Listen != d.Listen || cfg.AdminListen != d.AdminListen {
		t.Errorf("examples/proxy.yaml states defaults that are not the defaults: %+v vs %+v", cfg.Timeouts, d.Timeouts)
	}
}

func TestCallerKinds(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "keys"), []byte("# rotation: new key first\nnew-key-0123456789abcdef\nold-key-0123456789abcdef\n"), 0o600)
	os.WriteFile(filepath.Join(dir, "short"), []byte("tiny\n"), 0o600)
	hash := func(k string) string { s := sha256.Sum256([]byte(k)); return hex.EncodeToString(s[:]) }
	cfg, err := Parse([]byte(`
credentials: {app: {type: managed_identity}}
upstreams: {u: {url: "https://a.openai.azure.com", credential: app}}
max_concurrent: 500
callers:
  - name: rotating
    key_sha256: `+hash("inline-key-0123456789")+`
    keys_sha256: [`+strings.ToUpper(hash("second-inline-key-0123"))+`]
    key_files: [keys]
    key_env: [A360_KEY]
    deployments: ["*"]
    max_concurrent: 20
  - name: a360-oauth
    entra:
      tenant_id: 00000000-0000-0000-0000-000000000000
      audiences: ["api://tokenproxy"]
      app_ids: ["44444444-4444-4444-4444-444444444444"]
    deployments: ["*"]
`), dir, env(map[string]string{"A360_KEY": "env-key-0123456789abcdef"}))
	if err != nil {
		t.Fatal(err)
	}
	want := []string{hash("inline-key-0123456789"), hash("second-inline-key-0123"), hash("new-key-0123456789abcdef"),
		hash("old-key-0123456789abcdef"), hash("env-key-0123456789abcdef")}
	if diff := cmp.Diff(want, cfg.Callers[0].KeyHashes); diff != "" {
		t.Errorf("key hashes (-want +got):\n%s", diff)
	}
	if cfg.MaxConcurrent != 500 || cfg.Callers[0].MaxConcurrent != 20 || cfg.Callers[1].Entra.AppIDs[0] != "44444444-4444-4444-4444-444444444444" {
		t.Errorf("got %+v", cfg)
	}

	_, err = Parse([]byte(`
credentials: {app: {type: managed_identity}}
upstreams: {u: {url: "https://a.openai.azure.com", credential: app}}
callers:
  - {name: nokey, deployments: ["*"]}
  - name: both
    key_sha256: `+hash("x")+`
    entra: {tenant_id: t, audiences: [], app_ids: [a]}
    deployments: ["*"]
  - name: open-tenant
    entra: {tenant_id: contoso.onmicrosoft.com, audiences: [api://tp, "https://cognitiveservices.azure.com/"], principal: service}
    deployments: ["*"]
  - {name: short, key_files: [short], key_env: [UNSET], deployments: ["*"]}
  - {name: cert, mtls: {}, deployments: ["*"]}
`), dir, env(nil))
	for _, w := range []string{
		"callers[0]: needs a key",
		"callers[1]: is one kind of caller",
		"callers[1].entra.audiences: is required",
		"callers[2].entra.tenant_id: must be the tenant's ID (a GUID)",
		"callers[2].entra: set app_ids, object_ids or roles",
		`callers[2].entra.principal: "service" is not app, user or any`,
		`callers[2].entra.audiences[1]: "https://cognitiveservices.azure.com/" is a Microsoft service's`,
		"callers[3].key_files[0]: the key is shorter than 16 characters",
		"callers[3].key_env[0]: holds no key",
		"callers[4].mtls: set subject, dns_names or uris",
		"callers[4].mtls: needs tls.client_ca_file",
	} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("error lacks %q: %v", w, err)
		}
	}
	if err != nil && (strings.Contains(err.Error(), "tiny") || strings.Contains(err.Error(), "0123456789")) {
		t.Errorf("an error echoes a raw key: %v", err)
	}
}

func TestTLSSettings(t *testing.T) {
	_, err := Parse([]byte(`
credentials: {app: {type: managed_identity}}
upstreams:
  u: {url: "https://a.openai.azure.com", credential: app, ca_file: nope.pem}
  local: {url: "http://127.0.0.1:8080", credential: app, http2: true}
deployments: {d: {upstream: u}}
allow_unauthenticated: true
tls: {cert_file: cert.pem, min_version: "1.1"}
admin_tls: {cert_file: a.pem, key_file: a.key, client_ca_file: ca.pem}
admin_key_sha256: not-a-hash
`), t.TempDir(), env(nil))
	_, pprofErr := Parse([]byte(`
credentials: {app: {type: managed_identity}}
upstreams: {u: {url: "https://a.openai.azure.com", credential: app}}
allow_unauthenticated: true
admin_pprof: true
`), t.TempDir(), env(nil))
	if pprofErr == nil || !strings.Contains(pprofErr.Error(), "admin_pprof: needs admin_key_sha256") {
		t.Errorf("admin_pprof without an admin key: got %v, want it refused", pprofErr)
	}
	for _, w := range []string{
		"upstreams.u.ca_file: open",
		"upstreams.local.http2: needs an https url",
		"tls: cert_file and key_file are both required",
		`tls.min_version: "1.1" is not 1.2 or 1.3`,
		"admin_tls: loading",
		"admin_tls.client_ca_file: is for the API listener only",
		"admin_key_sha256: is not a SHA-256 in hex",
	} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("error lacks %q: %v", w, err)
		}
	}
}

func TestTLSFilesAreReadAsNamedFilesAre(t *testing.T) {
	// A listener's certificate and key, and the client CAs, are read as any file the
	// configuration names: a named pipe, which would hold start-up or a reload, is refused.
	dir := t.TempDir()
	ca, err := emulator.NewCA()
	if err != nil {
		t.Fatal(err)
	}
	certPEM, keyPEM, err := ca.IssuePEM(emulator.Leaf{CommonName: "gateway"})
	if err != nil {
		t.Fatal(err)
	}
	for name, b := range map[string][]byte{"cert.pem": certPEM, "key.pem": keyPEM, "ca.pem": ca.CertPEM()} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := syscall.Mkfifo(filepath.Join(dir, "pipe"), 0o600); err != nil {
		t.Fatal(err)
	}
	w, err := os.OpenFile(filepath.Join(dir, "pipe"), os.O_RDWR, 0) // a writer: reads would wait
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	for _, files := range []string{
		"cert_file: pipe, key_file: key.pem",
		"cert_file: cert.pem, key_file: pipe",
		"cert_file: cert.pem, key_file: key.pem, client_ca_file: pipe",
	} {
		done := make(chan error, 1)
		go func() {
			_, err := Parse([]byte(`
credentials: {app: {type: managed_identity}}
upstreams: {u: {url: "https://a.openai.azure.com", credential: app}}
allow_unauthenticated: true
tls: {`+files+`}
`), dir, env(nil))
			done <- err
		}()
		select {
		case err := <-done:
			if err == nil || !strings.Contains(err.Error(), "pipe: not a regular file") {
				t.Errorf("%s: got %v, want the pipe refused", files, err)
			}
		case <-time.After(10 * time.Second): // a bound, not a wait
			t.Fatalf("%s: Parse still waits", files)
		}
	}
}

func TestCABundlesAreReadWhole(t *testing.T) {
	// Every PEM block of a CA bundle must be a certificate that parses: one skipped unseen could
	// be the CA meant to be trusted, or a sign of a bundle cut short.
	ca, err := emulator.NewCA()
	if err != nil {
		t.Fatal(err)
	}
	good := ca.CertPEM()
	_, key, err := ca.IssuePEM(emulator.Leaf{CommonName: "x"})
	if err != nil {
		t.Fatal(err)
	}
	broken := []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
	undecodable := []byte("-----BEGIN CERTIFICATE-----\nMIIB*broken\n-----END CERTIFICATE-----\n")
	for name, tt := range map[string]struct {
		bundle []byte
		want   string
	}{
		"one CA":                                      {good, ""},
		"with text between blocks":                    {append(append([]byte("# corp root\n"), good...), good...), ""},
		"a block that does not parse":                 {append(append([]byte{}, good...), broken...), "PEM block 2: x509:"},
		"a block that cannot be decoded, between two": {append(append(append([]byte{}, good...), undecodable...), good...), "1 of its 3 PEM blocks cannot be decoded"},
		"a key":   {append(append([]byte{}, good...), key...), `PEM block 2 is a "EC PRIVATE KEY", not a CERTIFICATE`},
		"nothing": {[]byte("not PEM"), "no PEM certificate found"},
	} {
		_, err := parsePool(tt.bundle)
		if tt.want == "" && err != nil || tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)) {
			t.Errorf("%s: got %v, want %q", name, err, tt.want)
		}
	}
}

func TestSecretNeverPrints(t *testing.T) {
	c := Credential{ClientSecret: "hunter2", CertificatePassword: "pfxpass"}
	for _, s := range []string{
		fmt.Sprint(c), fmt.Sprintf("%v %+v %#v %s", c, c, c, c.ClientSecret),
	} {
		if strings.Contains(s, "hunter2") || strings.Contains(s, "pfxpass") {
			t.Errorf("formatted credential leaks its secret: %s", s)
		}
	}
	if b, _ := c.ClientSecret.MarshalText(); string(b) != "REDACTED" {
		t.Errorf("got MarshalText = %q, want REDACTED", b)
	}
}

func TestSpareConnectionsZeroWins(t *testing.T) {
	for yaml, want := range map[string]int{minimal: 1, minimal + "spare_connections: 0\n": 0, minimal + "spare_connections: 4\n": 4} {
		cfg, err := Parse([]byte(yaml), t.TempDir(), env(nil))
		if err != nil {
			t.Fatal(err)
		}
		if cfg.SpareConnections != want {
			t.Errorf("spare_connections = %d, want %d, from:\n%s", cfg.SpareConnections, want, yaml)
		}
	}
}

func TestUpstreamHTTP2Setting(t *testing.T) {
	cfg, err := Parse([]byte(`
credentials: {app: {type: managed_identity}}
upstreams:
  on: {url: "https://a.openai.azure.com", credential: app, http2: true}
  on2: {url: "https://a.openai.azure.com", credential: app, http2: on}
  off: {url: "https://b.openai.azure.com", credential: app, http2: false}
  off2: {url: "https://b.openai.azure.com", credential: app, http2: "off"}
  streams: {url: "https://c.openai.azure.com", credential: app, http2: streams}
  default: {url: "https://d.openai.azure.com", credential: app}
  plain: {url: "http://127.0.0.1:8080", credential: app}
  plainoff: {url: "http://127.0.0.1:8080", credential: app, http2: false}
deployments: {a: {upstream: on}, b: {upstream: on2}, c: {upstream: off}, d: {upstream: off2}, e: {upstream: streams}, f: {upstream: default}, g: {upstream: plain}, h: {upstream: plainoff}}
allow_unauthenticated: true
`), t.TempDir(), env(nil))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]HTTP2Mode{"on": HTTP2On, "on2": HTTP2On, "off": HTTP2Off, "off2": HTTP2Off,
		"streams": HTTP2Streams, "default": HTTP2Streams, "plain": HTTP2Off, "plainoff": HTTP2Off}
	for name, w := range want {
		if got := cfg.Upstreams[name].HTTP2Mode(); got != w {
			t.Errorf("upstream %s: http2 %q is in force as %q, want %q", name, cfg.Upstreams[name].HTTP2, got, w)
		}
	}

	for _, tc := range []struct{ setting, url, want string }{
		{"http2: maybe", "https://a.openai.azure.com", `upstreams.u.http2: "maybe" is not one of streams (the default), on (or true), off (or false)`},
		{"http2: true", "http://127.0.0.1", "upstreams.u.http2: needs an https url"},
		{"http2: streams", "http://127.0.0.1", "upstreams.u.http2: needs an https url"},
	} {
		_, err := Parse([]byte(`
credentials: {app: {type: managed_identity}}
upstreams:
  u: {url: "`+tc.url+`", credential: app, `+tc.setting+`}
allow_unauthenticated: true
`), t.TempDir(), env(nil))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s with %s: got %v, want an error with %q", tc.setting, tc.url, err, tc.want)
		}
	}
}

func TestErrorsQuoteNoSecret(t *testing.T) {
	// A secret, or a key, put where another value belongs (a variable holding one named in the
	// wrong field, a key pasted as a variable's name or a file's path) is not quoted back by the
	// errors, which go to the terminal and to a refused reload's log; not its start either.
	const secret = "Xy8Q~abcdefghSECRETVALUE"
	const key = "tpk_q8Zr0mVh3kP1xY7nL2cB5wD9sF4gJ6tA0eU3iO8yR1"
	const storageKey = "Zm9vYmFyQmF6cXV4MTIzNDU2Nzg5MGFiY2RlZmdoaWprbG1ub3BxcnN0dXZ3eHl6QUJD+/=="
	const token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
	const password = "correcthorsebatterystaple"
	const rest = `
upstreams:
  up: {url: "https://x.openai.azure.com", credential: app}
`
	const app = `credentials:
  app: {type: client_secret, tenant_id: 00000000-0000-0000-0000-000000000000, client_id: c1, client_secret: s}
`
	const caller = `callers:
  - {name: c, key_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08, deployments: ["*"]}
`
	for name, y := range map[string]string{
		"a secret's variable as a number": "max_concurrent: ${AZURE_CLIENT_SECRET}\n" + app + rest + caller,
		"a secret's variable as a tenant": `credentials:
  app: {type: client_secret, tenant_id: "${AZURE_CLIENT_SECRET}", client_id: c1, client_secret: s}
` + rest + caller,
		"a secret's variable in a URL": app + `upstreams:
  up: {url: "${AZURE_CLIENT_SECRET}", credential: app}
` + caller,
		"a key as keys_sha256, not a list": app + rest + "callers:\n  - {name: c, keys_sha256: " + key + ", deployments: [\"*\"]}\n",
		"a key as key_env's variable":      app + rest + "callers:\n  - {name: c, key_env: [" + key + "], deployments: [\"*\"]}\n",
		"a key as key_files' path":         app + rest + "callers:\n  - {name: c, key_files: [" + key + "], deployments: [\"*\"]}\n",
		// Pasted into the file itself, not through a variable.
		"a secret pasted as a tenant": `credentials:
  app: {type: client_secret, tenant_id: "` + secret + `", client_id: c1, client_secret: s}
` + rest + caller,
		"a key pasted as a URL": app + `upstreams:
  up: {url: "` + key + `", credential: app}
` + caller,
		"a storage key pasted as a credential's name": app + `upstreams:
  up: {url: "https://x.openai.azure.com", credential: "` + storageKey + `"}
` + caller,
		"a token pasted as an authority": `credentials:
  app: {type: client_secret, tenant_id: 00000000-0000-0000-0000-000000000000, client_id: c1, client_secret: s, authority_host: "` + token + `"}
` + rest + caller,
		"a key pasted as a caller's name":     app + rest + "callers:\n  - {name: " + key + ", key_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08, deployments: [\"*\"]}\n",
		"a key pasted as a deployment's name": app + rest + "deployments:\n  " + key + ": {upstream: up}\n" + caller,
		// The environment's value is the secret's start: hiding it first would leave the rest.
		"the client secret as a log level, its start a variable": "log_level: " + password + "\n" + `credentials:
  app: {type: client_secret, tenant_id: 00000000-0000-0000-0000-000000000000, client_id: "${START}", client_secret: ` + password + `}
` + rest + caller,
		// A key named as a variable: the error about it quotes the name alone.
		"a key as a variable's name": `credentials:
  app: {type: client_secret, tenant_id: 00000000-0000-0000-0000-000000000000, client_id: c1, client_secret: "${` + key + `}"}
` + rest + caller,
		// Unquoted, a value starting with * is read as an alias, and YAML quotes its name.
		"a password read as an alias": `credentials:
  app: {type: client_secret, tenant_id: 00000000-0000-0000-0000-000000000000, client_id: c1, client_secret: *` + storageKey[:20] + `}
` + rest + caller,
		// The path is quoted as it is opened: after the directory, "//" made "/".
		"a storage key as a relative file's path": `credentials:
  app: {type: client_secret, tenant_id: 00000000-0000-0000-0000-000000000000, client_id: c1, client_secret_file: "` + storageKey[:20] + "//" + storageKey[20:] + `"}
` + rest + caller,
		"the client secret pasted as a log level too": "log_level: " + password + "\n" + `credentials:
  app: {type: client_secret, tenant_id: 00000000-0000-0000-0000-000000000000, client_id: c1, client_secret: ` + password + `}
` + rest + caller,
	} {
		_, err := Parse([]byte(y), t.TempDir(), env(map[string]string{"AZURE_CLIENT_SECRET": secret, "START": password[:12]}))
		if err == nil {
			t.Errorf("%s: no error", name)
			continue
		}
		for _, s := range []string{secret[:7], key[:7], storageKey[:7], storageKey[20:27], token[:7], password[:7], password[len(password)-7:]} {
			if strings.Contains(err.Error(), s) {
				t.Errorf("%s: the error quotes a secret or key: %v", name, err)
			}
		}
	}
}

func TestMayBeSecret(t *testing.T) {
	for _, s := range []string{
		"tpk_q8Zr0mVh3kP1xY7nL2cB5wD9sF4gJ6tA0eU3iO8yR1", // the gateway's key
		"abc8Q~dEfGhIjKlMnOpQrStUvWxYz0123456789.-_",     // an Entra client secret
		"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",      // a JWT
		"Zm9vYmFyQmF6cXV4MTIzNDU2Nzg5MGFiY2RlZmdo+/==",   // a storage key
		"https://x.blob.core.windows.net/c?sig=Hk3mZp9Qr2Lw7Xv4Nb8Tc1Yd",
		"Kp4wR9tZ2mQ7vX1n", // 16 random characters
	} {
		if !mayBeSecret(s) {
			t.Errorf("mayBeSecret(%q) = false", s)
		}
	}
	for _, s := range []string{
		"", "info", "verbose", "gpt-4o-mini", "gpt-4o-2024-08-06", "Automation360-Finance",
		"ContosoFinanceApp2024Prod", "00000000-0000-0000-0000-000000000000",
		"72F988BF-86F1-41AF-91AB-2D7CD011DB47", "contoso.onmicrosft.com",
		"https://Contoso-AOAI-01.openai.azure.com", "https://cognitiveservices.azure.com/.default",
		"api://0f4c2b6e-1d3a-4e5f-8a9b-0c1d2e3f4a5b/.default", "127.0.0.1:8080",
		"Kp4wR9tZ2mQ7vX1", // 15: too short to tell
		// Model and deployment names, which deployments are named after.
		"DeepSeek-R1-0528", "DeepSeek-R1-Distill-Llama-70B", "Phi-3.5-MoE-instruct",
		"Phi-3-medium-128k-instruct", "Meta-Llama-3.1-405B-Instruct",
		"Llama-4-Maverick-17B-128E-Instruct-FP8", "Mistral-Large-2411", "Qwen3-235B-A22B",
		"Cohere-command-r-plus-08-2024", "AI21-Jamba-1.5-Large", "MAI-DS-R1", "gpt-oss-120b",
		"gpt-4o-realtime-preview", "FinanceBot-Prod-EU2", "svc-InvoiceAutomation-01",
	} {
		if mayBeSecret(s) {
			t.Errorf("mayBeSecret(%q) = true", s)
		}
	}
}

func TestNamesAreRefusedOnlyForACredentialsMarks(t *testing.T) {
	// Names chosen by hand may look random (capitals, digits, acronyms): only a credential's
	// marks get one refused.
	names := []string{"AzureOpenAI-EastUS2-Prod", "OpenAI-EastUS2-GPT4oMini", "MyOpenAI-WestUS3",
		"TeamA-Bot2-EUS2-GPT4o", "SurveyJS-Backend", "MoneyJar-Prod", "AzureOpenAIEastUS2Prod"}
	for _, n := range names {
		if isCredential(n) {
			t.Errorf("isCredential(%q) = true", n)
		}
	}
	y := "credentials:\n  " + names[0] + ": {type: client_secret, tenant_id: 00000000-0000-0000-0000-000000000000, client_id: c1, client_secret: s}\n" +
		"upstreams:\n  " + names[1] + ": {url: \"https://x.openai.azure.com\", credential: " + names[0] + "}\n" +
		"deployments:\n  " + names[2] + ": {upstream: " + names[1] + "}\n" +
		"callers:\n  - {name: " + names[3] + ", key_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08, deployments: [\"*\"]}\n"
	if _, err := Parse([]byte(y), t.TempDir(), nil); err != nil {
		t.Fatalf("names chosen by hand are refused: %v", err)
	}
	for _, n := range []string{"tpk_q8Zr0mVh3kP1xY7nL2cB5wD9sF4gJ6tA0eU3iO8yR1", "abc8Q~dEfGhIjKlMnOpQrStUvWxYz0123456789", "eyJhbGciOiJSUzI1NiJ9"} {
		if !isCredential(n) {
			t.Errorf("isCredential(%q) = false", n)
		}
	}
}

func TestErrorsStillQuoteMistakes(t *testing.T) {
	// Hiding what may be a secret must not hide the usual mistakes.
	_, err := Parse([]byte(`
log_level: verbose
credentials:
  app: {type: client_secret, tenant_id: contoso_corp, client_id: c1, client_secret: s}
upstreams:
  up: {url: "Contoso-AOAI-01.openai.azure.com", credential: app}
callers:
  - {name: c, key_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08, deployments: ["*"]}
`), t.TempDir(), nil)
	for _, want := range []string{`"verbose"`, `"contoso_corp"`, `"Contoso-AOAI-01.openai.azure.com"`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("the error does not quote %s: %v", want, err)
		}
	}
}

func TestKeyFilesWithAByteOrderMark(t *testing.T) {
	// An editor may start a file with a byte-order mark, and end its lines with CRLF: the key is
	// the key all the same.
	dir := t.TempDir()
	const key = "tpk_0123456789abcdefghijklmnopqrstuvwxyzABCDEFG"
	if err := os.WriteFile(filepath.Join(dir, "k"), []byte("\ufeff"+key+"\r\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "s"), []byte("\ufeffthe-secret\r\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := Parse([]byte(`
credentials:
  app: {type: client_secret, tenant_id: 00000000-0000-0000-0000-000000000000, client_id: c1, client_secret_file: s}
upstreams:
  up: {url: "https://x.openai.azure.com", credential: app}
callers:
  - {name: c, key_files: [k], key_env: [K], deployments: ["*"]}
`), dir, env(map[string]string{"K": "\ufeff" + key + " "}))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256([]byte(key))
	for i, h := range cfg.Callers[0].KeyHashes {
		if h != hex.EncodeToString(sum[:]) {
			t.Errorf("key %d: hash %s is not the key's", i, h)
		}
	}
	if got := cfg.Credentials["app"].ClientSecret; got != "the-secret" {
		t.Errorf("client secret %q, want the file's without its byte-order mark", got)
	}
}

func TestNamedFilesAreBounded(t *testing.T) {
	// A path mistaken for another (a named pipe, a device, a log) is refused, not waited on or
	// read without end.
	dir := t.TempDir()
	if err := syscall.Mkfifo(filepath.Join(dir, "pipe"), 0o600); err != nil {
		t.Fatal(err)
	}
	big, err := os.Create(filepath.Join(dir, "big"))
	if err != nil {
		t.Fatal(err)
	}
	if err := big.Truncate(maxFileSize + 1); err != nil {
		t.Fatal(err)
	}
	big.Close()
	_, err = Parse([]byte(`
credentials:
  app: {type: client_secret, tenant_id: 00000000-0000-0000-0000-000000000000, client_id: c1, client_secret_file: pipe}
upstreams:
  up: {url: "https://x.openai.azure.com", credential: app, ca_file: /dev/zero}
callers:
  - {name: c, key_files: [big], deployments: ["*"]}
`), dir, nil)
	for _, want := range []string{
		"credentials.app.client_secret_file: read " + filepath.Join(dir, "pipe") + ": not a regular file",
		"upstreams.up.ca_file: read /dev/zero: not a regular file",
		"callers[0].key_files[0]: cannot read the file (larger than 4 MiB;",
	} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q: %v", want, err)
		}
	}
}

// A file that says it is regular but whose reads wait (/proc/kmsg, tracefs's trace_pipe) is read
// within readFileTimeout, not waited on for ever: a named pipe with a writer that sends nothing
// stands in for one.
func TestNamedFileThatWaitsIsReadWithinATimeout(t *testing.T) {
	defer func(d time.Duration) { readFileTimeout = d }(readFileTimeout)
	readFileTimeout = 100 * time.Millisecond
	pipe := filepath.Join(t.TempDir(), "pipe")
	if err := syscall.Mkfifo(pipe, 0o600); err != nil {
		t.Fatal(err)
	}
	w, err := os.OpenFile(pipe, os.O_RDWR, 0) // a writer, so that reads wait rather than end
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	f, err := os.OpenFile(pipe, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	done := make(chan error, 1)
	go func() { _, err := readLimited(f, pipe); done <- err }()
	select {
	case err := <-done:
		if want := "read " + pipe + ": nothing to read after 100ms"; err == nil || err.Error() != want {
			t.Errorf("got %v, want %q", err, want)
		}
	case <-time.After(10 * time.Second): // a bound, not a wait
		t.Fatal("the read still waits")
	}
}

func TestAFileSwappedAfterItsCheckIsCheckedAgain(t *testing.T) {
	// The path names a regular file when it is checked, and a named pipe when it is opened.
	path := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(path, []byte("secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	defer func(f func(string)) { betweenStatAndOpen = f }(betweenStatAndOpen)
	betweenStatAndOpen = func(p string) {
		if err := os.Remove(p); err != nil {
			t.Error(err)
		}
		if err := syscall.Mkfifo(p, 0o600); err != nil {
			t.Error(err)
		}
	}
	b, err := readFile(path)
	if want := "read " + path + ": not a regular file"; err == nil || err.Error() != want {
		t.Errorf("got %q, %v; want %q", b, err, want)
	}
}

func TestTheConfigurationFileIsReadAsNamedFilesAre(t *testing.T) {
	pipe := filepath.Join(t.TempDir(), "proxy.yaml")
	if err := syscall.Mkfifo(pipe, 0o600); err != nil {
		t.Fatal(err)
	}
	w, err := os.OpenFile(pipe, os.O_RDWR, 0) // a writer: reads would wait
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	done := make(chan error, 1)
	go func() { _, err := Load(pipe, env(nil)); done <- err }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "not a regular file") {
			t.Errorf("got %v, want the pipe refused", err)
		}
	case <-time.After(10 * time.Second): // a bound, not a wait
		t.Fatal("Load still waits")
	}
}

func TestASecondDocumentIsRefused(t *testing.T) {
	_, err := Parse([]byte(`
upstreams:
  up: {url: "https://x.openai.azure.com"}
---
admin_key_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
`), t.TempDir(), nil)
	if err == nil || !strings.Contains(err.Error(), "more than one YAML document") {
		t.Errorf("got %v, want the second document refused", err)
	}
}

// Aliases of aliases are checked once for each type they are aliased as: before, a file of a
// kilobyte listed its unknown keys millions of times (a 2.7 KB file took 600 MB), and the
// problems listed are capped.
func TestAliasesAreCheckedOnce(t *testing.T) {
	const n = 60
	var b strings.Builder
	b.WriteString("x: &b {")
	for i := range n {
		fmt.Fprintf(&b, "k%d: 1, ", i)
	}
	b.WriteString("}\ndeployments:\n  d0: &d {backends: [")
	for range n {
		b.WriteString("*b, ")
	}
	b.WriteString("]}\n")
	for i := 1; i < n; i++ {
		fmt.Fprintf(&b, "  d%d: *d\n", i)
	}
	_, err := Parse([]byte(b.String()), t.TempDir(), nil)
	if err == nil || len(err.Error()) > 16<<10 || !strings.Contains(err.Error(), "unknown key") {
		t.Fatalf("a %d-byte file gave a %d-byte error: %.300v", b.Len(), len(fmt.Sprint(err)), err)
	}
	// However many, the problems listed are capped.
	b.Reset()
	for i := range 150 {
		fmt.Fprintf(&b, "unknown%d: 1\n", i)
	}
	_, err = Parse([]byte(b.String()), t.TempDir(), nil)
	if err == nil || strings.Count(err.Error(), "unknown key") != maxErrors || !strings.HasSuffix(err.Error(), "… and 50 more") {
		t.Fatalf("150 unknown keys gave %.300v", err)
	}
}

// A mapping too large to be a configuration's is refused before it is decoded, whose check for
// duplicate keys takes time in the square of their number.
func TestHugeMappingsAreRefused(t *testing.T) {
	var b strings.Builder
	b.WriteString("deployments:\n")
	for i := range maxMappingEntries + 1 {
		fmt.Fprintf(&b, "  d%d: {upstream: u}\n", i)
	}
	_, err := Parse([]byte(b.String()), t.TempDir(), nil)
	if err == nil || !strings.Contains(err.Error(), "deployments: more than 10000 entries") {
		t.Fatalf("got %.300v", err)
	}
}
