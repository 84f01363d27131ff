// Package config owns the gateway's configuration: it is the only package that reads
// configuration files, secret files and the environment. Load parses strict YAML (unknown keys
// are errors), expands ${VAR} references from the environment inside scalar values, reads the
// *_file secrets, applies defaults and validates everything, reporting every problem (those of
// the file's form, an unknown key or a missing variable, first and on their own).
package config

import (
	"strings"
	"time"

	"golang.org/x/net/http/httpproxy"
)

// Credential types, as written in the YAML `type` key.
const (
	TypeClientSecret      = "client_secret"
	TypeClientCertificate = "client_certificate"
	TypeManagedIdentity   = "managed_identity"
	TypeWorkloadIdentity  = "workload_identity"
	TypeAzureCLI          = "azure_cli"
	TypeDefault           = "default"
)

// DefaultScope is the Entra scope for Azure OpenAI and most Azure AI Foundry inference endpoints.
const DefaultScope = "https://cognitiveservices.azure.com/.default"

// AllDeployments in a caller's allow-list grants every deployment.
const AllDeployments = "*"

// Defaults applied by Load to fields left empty.
const (
	DefaultListen          = "127.0.0.1:8080"
	DefaultAdminListen     = "127.0.0.1:9090"
	DefaultLogLevel        = "info"
	DefaultLogFormat       = "json"
	DefaultMaxRequestBytes = 32 << 20
	// DefaultSpareConnections is one spare connection per upstream: enough to take a connect
	// and a TLS handshake off a new stream's path while streams start one after another.
	DefaultSpareConnections = 1
	// MaxSpareConnections bounds spare_connections.
	MaxSpareConnections = 64
)

// Config is the whole gateway configuration. Build it with Load, or for programmatic use (the
// demo) start from Default, fill it in, and call ApplyDefaults and Validate.
type Config struct {
	// Listen is the API listener address (host:port).
	Listen string `yaml:"listen"`
	// AdminListen serves /metrics, /healthz and /readyz, apart from the API.
	AdminListen string `yaml:"admin_listen"`
	// AdminPprof adds Go's profiling endpoints (/debug/pprof/) to the admin listener, behind
	// AdminKeySHA256, which it requires. Off by default: profiles show the process's inner
	// workings, and a CPU profile or trace loads it for as long as it is asked to run.
	AdminPprof bool `yaml:"admin_pprof"`
	// AdminKeySHA256, when set, is the SHA-256 of a key /metrics and /debug/pprof/ require
	// (Authorization: Bearer); /healthz and /readyz stay open for probes.
	AdminKeySHA256 string `yaml:"admin_key_sha256"`
	// TLS serves the API over TLS (and verifies client certificates for mtls callers).
	TLS *TLS `yaml:"tls"`
	// AdminTLS serves the admin endpoints over TLS.
	AdminTLS *TLS `yaml:"admin_tls"`
	// LogLevel is one of debug, info, warn, error.
	LogLevel string `yaml:"log_level"`
	// LogFormat is json or console.
	LogFormat string `yaml:"log_format"`
	// AllowUnauthenticated lets any caller in without a key. Off by default; logged as a warning.
	AllowUnauthenticated bool `yaml:"allow_unauthenticated"`
	// MaxRequestBytes caps request bodies; larger ones get 413.
	MaxRequestBytes int64 `yaml:"max_request_bytes"`
	// MaxConcurrent caps the calls in flight across all callers (streams included); past it, 429.
	// Zero: no cap.
	MaxConcurrent int `yaml:"max_concurrent"`
	// SpareConnections is how many connections to each upstream are kept dialled ahead of need
	// (connected, and through the TLS handshake), so that a new call or stream that finds no idle
	// connection need not wait for one. Spares are dialled as calls use the pool and close when
	// idle for timeouts.upstream_idle. Zero: none.
	SpareConnections int `yaml:"spare_connections"`
	// UpstreamProxy is the environment's HTTPS_PROXY and NO_PROXY (or their lower-case
	// spellings), read at load: TLS upstreams are reached through that proxy's CONNECT tunnel.
	UpstreamProxy httpproxy.Config `yaml:"-"`
	// Timeouts bound every phase of a call; see Timeouts.
	Timeouts Timeouts `yaml:"timeouts"`
	// Resilience governs failover between a deployment's backends.
	Resilience Resilience `yaml:"resilience"`

	Credentials map[string]*Credential `yaml:"credentials"`
	Upstreams   map[string]*Upstream   `yaml:"upstreams"`
	// Deployments maps the names callers use to where they live. When empty, every deployment
	// name passes through unchanged to the only upstream.
	Deployments map[string]*Deployment `yaml:"deployments"`
	Callers     []*Caller              `yaml:"callers"`
}

// Timeouts are the gateway's time limits. None of them bounds a stream's length, so long
// streams are never cut for lasting; ResponseHeader bounds the wait for the upstream's response
// headers, which for reasoning models can take minutes, and for the rest of a body read whole.
// A body relayed as it comes (an event stream, or any body of unknown length or over 1 MiB) is
// cut only when nothing of it moves for StreamIdle; otherwise it ends with the upstream's end
// of it, or when the caller goes away or the gateway shuts down.
type Timeouts struct {
	// ReadHeader bounds reading a caller's request line and headers (slowloris protection), with
	// the first 8 KiB of the body the server reads along; a new connection's first byte is also
	// awaited this long.
	ReadHeader time.Duration `yaml:"read_header"`
	// Idle closes idle keep-alive connections from callers, bounds reading the rest of a
	// request body, and bounds the caller taking an answer the server writes once the call has
	// ended (read whole, an error, or the last of a large body).
	Idle time.Duration `yaml:"idle"`
	// Dial bounds the TCP connect to an upstream.
	Dial time.Duration `yaml:"dial"`
	// TLSHandshake bounds the TLS handshake with an upstream.
	TLSHandshake time.Duration `yaml:"tls_handshake"`
	// ResponseHeader bounds the wait for an upstream's response headers (and the rest of a body
	// read whole: of known length, up to 1 MiB, not an event stream), up to an eighth of itself
	// longer; past it the caller gets 504.
	ResponseHeader time.Duration `yaml:"response_header"`
	// StreamIdle cuts a body relayed as it comes when nothing of it moves for this long, up to
	// a quarter of itself longer: when the gateway has waited that long for the upstream's next
	// bytes, or for the caller to take any of what it writes. The caller's answer ends short.
	StreamIdle time.Duration `yaml:"stream_idle"`
	// UpstreamIdle closes idle pooled connections to upstreams.
	UpstreamIdle time.Duration `yaml:"upstream_idle"`
	// TokenAcquire bounds one token acquisition from Entra.
	TokenAcquire time.Duration `yaml:"token_acquire"`
	// ShutdownDelay is how long the gateway keeps serving, not ready, after SIGTERM, so load
	// balancers stop sending new calls before listeners close.
	ShutdownDelay time.Duration `yaml:"shutdown_delay"`
	// ShutdownGrace is how long in-flight calls and streams may run on after listeners close.
	ShutdownGrace time.Duration `yaml:"shutdown_grace"`
}

// DefaultTimeouts are used for every Timeouts field left zero.
var DefaultTimeouts = Timeouts{
	ReadHeader:     10 * time.Second,
	Idle:           120 * time.Second,
	Dial:           10 * time.Second,
	TLSHandshake:   10 * time.Second,
	ResponseHeader: 10 * time.Minute,
	StreamIdle:     5 * time.Minute,
	UpstreamIdle:   90 * time.Second,
	TokenAcquire:   30 * time.Second,
	ShutdownDelay:  5 * time.Second,
	ShutdownGrace:  2 * time.Minute,
}

// Credential is how the gateway authenticates to Entra ID. Which fields apply depends on Type.
type Credential struct {
	// Type is one of client_secret, client_certificate, managed_identity, workload_identity,
	// azure_cli, default.
	Type     string `yaml:"type"`
	TenantID string `yaml:"tenant_id"`
	ClientID string `yaml:"client_id"`

	// ClientSecret (client_secret) is the secret's value, usually ${AZURE_CLIENT_SECRET};
	// ClientSecretFile names a file holding it instead.
	ClientSecret     Secret `yaml:"client_secret"`
	ClientSecretFile string `yaml:"client_secret_file"`

	// CertificateFile (client_certificate) holds a PEM (certificate and private key) or PFX file.
	CertificateFile         string `yaml:"certificate_file"`
	CertificatePassword     Secret `yaml:"certificate_password"`
	CertificatePasswordFile string `yaml:"certificate_password_file"`
	// SendCertificateChain sends the x5c header, needed for subject-name/issuer authentication.
	SendCertificateChain bool `yaml:"send_certificate_chain"`

	// ResourceID and ObjectID select a user-assigned managed identity (as ClientID also does);
	// with none of the three, the system-assigned identity is used.
	ResourceID string `yaml:"resource_id"`
	ObjectID   string `yaml:"object_id"`

	// TokenFile (workload_identity) is the projected service-account token; defaults to
	// $AZURE_FEDERATED_TOKEN_FILE, as ClientID and TenantID default to $AZURE_CLIENT_ID and
	// $AZURE_TENANT_ID.
	TokenFile string `yaml:"token_file"`

	// Subscription (azure_cli) selects an account other than the CLI's current one.
	Subscription string `yaml:"subscription"`

	// AuthorityHost is the Entra authority, for sovereign clouds
	// (https://login.microsoftonline.us/, https://login.chinacloudapi.cn/) or a private
	// authority. A host other than the public and sovereign Entra hosts also disables MSAL's
	// instance discovery, which would otherwise call login.microsoftonline.com.
	AuthorityHost string `yaml:"authority_host"`

	// Certificate is the content of CertificateFile, read by Load.
	Certificate []byte `yaml:"-"`

	// fromFile records which secrets Load filled in from their *_file, so Validate does not
	// mistake them for a secret given twice.
	secretFromFile, passwordFromFile bool
}

// TLS configures a listener's TLS. Certificate and key are re-read when their files change.
type TLS struct {
	// CertFile and KeyFile hold the certificate chain and private key, in PEM.
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
	// ClientCAFile (API listener only) holds the CAs that client certificates must chain to;
	// with it, clients may present one (mtls callers), without being required to.
	ClientCAFile string `yaml:"client_ca_file"`
	// MinVersion is "1.2" (the default) or "1.3".
	MinVersion string `yaml:"min_version"`
}

// Upstream is an Azure OpenAI / Azure AI Foundry resource.
type Upstream struct {
	// URL is the resource endpoint, e.g. https://myresource.openai.azure.com. Plain http is
	// accepted only for loopback hosts, so a bearer token never crosses a network in clear.
	URL string `yaml:"url"`
	// Credential names the entry of credentials used to get tokens for this upstream.
	Credential string `yaml:"credential"`
	// Scope is the Entra scope requested; DefaultScope when empty.
	Scope string `yaml:"scope"`
	// CAFile holds the CAs (PEM) to verify the upstream's certificate with, instead of the
	// system roots: for a private endpoint behind a corporate CA. Verification cannot be
	// turned off.
	CAFile string `yaml:"ca_file"`
	// CA is the content of CAFile, read by Load.
	CA []byte `yaml:"-"`
	// HTTP2 says which calls offer HTTP/2 in the TLS handshake (see HTTP2Mode): if the endpoint
	// chooses it, those calls share a few multiplexed connections, so a new stream waits for no
	// connect or handshake and an open one holds no connection of its own. If it does not, they
	// go over HTTP/1.1 as the others do. Empty means HTTP2Streams for an https url.
	HTTP2 HTTP2Mode `yaml:"http2"`
}

// HTTP2Mode is which of an upstream's calls offer HTTP/2. In YAML, true and false stand for
// HTTP2On and HTTP2Off.
type HTTP2Mode string

const (
	// HTTP2Off: every call goes over HTTP/1.1.
	HTTP2Off HTTP2Mode = "off"
	// HTTP2On: every call offers HTTP/2.
	HTTP2On HTTP2Mode = "on"
	// HTTP2Streams: calls that ask for an event stream ("stream": true, or a form field
	// stream of true) offer HTTP/2, the others go over HTTP/1.1. The default for https: an
	// open stream then holds no connection or TLS state of its own, while a plain call keeps
	// HTTP/1.1's lower CPU cost.
	HTTP2Streams HTTP2Mode = "streams"
)

// HTTP2Mode returns the mode in force: the default for an empty setting, and HTTP2Off for a
// plain-http url or a value Validate refuses.
func (u *Upstream) HTTP2Mode() HTTP2Mode {
	if !strings.HasPrefix(strings.ToLower(u.URL), "https://") {
		return HTTP2Off
	}
	m, _ := u.HTTP2.parse()
	return m
}

// parse returns the mode a setting names (the default when empty), and false if it names none.
func (m HTTP2Mode) parse() (HTTP2Mode, bool) {
	switch strings.ToLower(string(m)) {
	case "":
		return HTTP2Streams, true
	case "on", "true":
		return HTTP2On, true
	case "off", "false":
		return HTTP2Off, true
	case "streams":
		return HTTP2Streams, true
	}
	return HTTP2Off, false
}

// Deployment says where a deployment name exposed to callers lives: one upstream (Upstream and
// Deployment) or a pool of Backends, not both.
type Deployment struct {
	// Upstream names the entry of upstreams serving this deployment.
	Upstream string `yaml:"upstream"`
	// Deployment is the deployment's name on the upstream; the exposed name when empty.
	Deployment string `yaml:"deployment"`
	// Backends are several places serving the deployment (regions, PTU and pay-as-you-go).
	// Calls go to the lowest priority with a healthy member, spread by weight within it, and
	// fail over to the next on 429, 408, 5xx or a connection failure.
	Backends []*Backend `yaml:"backends"`
}

// Backend is one member of a deployment's pool.
type Backend struct {
	Upstream string `yaml:"upstream"`
	// Deployment is the deployment's name on that upstream; the exposed name when empty.
	Deployment string `yaml:"deployment"`
	// Priority orders the pool: lower first. If zero, 1.
	Priority int `yaml:"priority"`
	// Weight spreads calls within a priority. If zero, 1; at most maxWeight.
	Weight int `yaml:"weight"`
}

// Pool returns the deployment's backends, the single-upstream form being a pool of one.
func (d *Deployment) Pool() []*Backend {
	if len(d.Backends) > 0 {
		return d.Backends
	}
	return []*Backend{{Upstream: d.Upstream, Deployment: d.Deployment, Priority: 1, Weight: 1}}
}

// Resilience governs failover between a deployment's backends.
type Resilience struct {
	// MaxAttempts caps the backends one call tries.
	MaxAttempts int `yaml:"max_attempts"`
	// RetryBudget is the fraction of calls that may be retried (pool-wide), so a failing region
	// cannot multiply load; MinRetriesPerSecond is allowed regardless, for low traffic.
	RetryBudget         float64 `yaml:"retry_budget"`
	MinRetriesPerSecond float64 `yaml:"min_retries_per_second"`
	// BreakerFailures consecutive failures open a backend's circuit for BreakerOpen (doubling
	// on each failed half-open probe, up to 10 times).
	BreakerFailures int           `yaml:"breaker_failures"`
	BreakerOpen     time.Duration `yaml:"breaker_open"`
	// DefaultCooldown rests a backend that answered 429 without saying for how long;
	// MaxCooldown caps what a Retry-After may ask.
	DefaultCooldown time.Duration `yaml:"default_cooldown"`
	MaxCooldown     time.Duration `yaml:"max_cooldown"`
	// WaitForCapacity, when positive, lets a call wait up to that long for the soonest backend
	// to recover instead of answering 429 at once.
	WaitForCapacity time.Duration `yaml:"wait_for_capacity"`
}

// DefaultResilience is used for every Resilience field left unset.
var DefaultResilience = Resilience{
	MaxAttempts:         3,
	RetryBudget:         0.2,
	MinRetriesPerSecond: 10,
	BreakerFailures:     5,
	BreakerOpen:         30 * time.Second,
	DefaultCooldown:     10 * time.Second,
	MaxCooldown:         time.Hour,
}

// Keys made by `proxy hash-key --generate` are GeneratedKeyPrefix and 43 base64url characters
// (256 random bits), GeneratedKeyLength bytes in all: a shape secret scanners, and the gateway
// (which drops any header holding one of its callers' keys), can find wherever it is put.
const (
	GeneratedKeyPrefix = "tpk_"
	GeneratedKeyLength = len(GeneratedKeyPrefix) + 43
)

// Caller is a client allowed to call the gateway. It is one of three kinds: it presents a key
// (any of the key fields), an Entra ID access token (Entra), or a TLS client certificate (MTLS).
type Caller struct {
	// Name identifies the caller in logs and metrics.
	Name string `yaml:"name"`

	// KeySHA256 is the lowercase hex SHA-256 of the caller's key (see `proxy hash-key`);
	// KeysSHA256 lists more, so a key can be rotated without downtime (add the new one, move
	// the caller over, remove the old one).
	KeySHA256  string   `yaml:"key_sha256"`
	KeysSHA256 []string `yaml:"keys_sha256"`
	// KeyFiles name files holding raw keys, one per line (a Kubernetes secret, say), and KeyEnv
	// environment variables holding one each; they are hashed when the configuration is
	// loaded and never kept.
	KeyFiles []string `yaml:"key_files"`
	KeyEnv   []string `yaml:"key_env"`

	// Entra admits callers presenting an Entra ID access token (Authorization: Bearer).
	Entra *EntraCaller `yaml:"entra"`
	// MTLS admits callers presenting a TLS client certificate (the API listener's tls must set
	// client_ca_file).
	MTLS *MTLSCaller `yaml:"mtls"`

	// Deployments is the caller's allow-list of exposed deployment names; "*" allows all.
	Deployments []string `yaml:"deployments"`
	// MaxConcurrent caps the caller's calls in flight (streams included); past it, 429. Zero: no cap.
	MaxConcurrent int `yaml:"max_concurrent"`

	// KeyHashes are every key's SHA-256 (hex), from all the key fields, filled in by Load.
	KeyHashes []string `yaml:"-"`
}

// EntraCaller says which Entra ID access tokens identify a caller. A token must be signed by
// the tenant's keys, unexpired, for one of Audiences, and match every condition that is set
// (at least one must be).
type EntraCaller struct {
	// TenantID is the tenant (GUID) whose tokens are accepted.
	TenantID string `yaml:"tenant_id"`
	// Audiences are the gateway's app ID URI and/or client ID, e.g. api://tokenproxy.
	Audiences []string `yaml:"audiences"`
	// AppIDs are the calling applications (the azp or appid claim).
	AppIDs []string `yaml:"app_ids"`
	// ObjectIDs are the calling principals (the oid claim).
	ObjectIDs []string `yaml:"object_ids"`
	// Roles are app roles of which the token must carry one (the roles claim).
	Roles []string `yaml:"roles"`
	// Principal is whose tokens are accepted: PrincipalApp (an application's own, from the
	// client credentials flow: no scp claim), PrincipalUser (a user's, obtained through an
	// application: an scp claim) or PrincipalAny. If empty, any.
	Principal string `yaml:"principal"`
	// AuthorityHost is the tenant's cloud, e.g. https://login.microsoftonline.us/. If empty, the
	// public cloud.
	AuthorityHost string `yaml:"authority_host"`
}

// Principals an Entra caller's token may be issued to (EntraCaller.Principal).
const (
	PrincipalAny  = "any"
	PrincipalApp  = "app"
	PrincipalUser = "user"
)

// MTLSCaller says which client certificates identify a caller: one whose subject is Subject,
// or whose SANs include one of DNSNames or URIs. The certificate must chain to the listener's
// client_ca_file.
type MTLSCaller struct {
	// Subject as the certificate writes it, every attribute in its order, in RFC 4514's form
	// (last first), e.g. "CN=batch-job,O=Contoso"; as Go's pkix.Name.String writes an ordinary
	// subject.
	Subject  string   `yaml:"subject"`
	DNSNames []string `yaml:"dns_names"`
	URIs     []string `yaml:"uris"`
}

// Secret is a configuration value that must never be printed. Its String, GoString and
// MarshalText methods redact it, so a Config can be logged or dumped safely; Value returns it.
type Secret string

// Value returns the secret itself.
func (s Secret) Value() string { return string(s) }

// String redacts the secret.
func (s Secret) String() string {
	if s == "" {
		return ""
	}
	return "REDACTED"
}

// GoString redacts the secret from %#v.
func (s Secret) GoString() string { return `"` + s.String() + `"` }

// MarshalText redacts the secret from JSON, YAML and zap output.
func (s Secret) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// Default returns a Config holding every top-level default. Load decodes the YAML over it, so a
// key written explicitly, even as zero (`shutdown_delay: 0s`), wins over its default.
func Default() *Config {
	return &Config{
		Listen:           DefaultListen,
		AdminListen:      DefaultAdminListen,
		LogLevel:         DefaultLogLevel,
		LogFormat:        DefaultLogFormat,
		MaxRequestBytes:  DefaultMaxRequestBytes,
		SpareConnections: DefaultSpareConnections,
		Timeouts:         DefaultTimeouts,
		Resilience:       DefaultResilience,
	}
}

// ApplyDefaults fills the defaults that depend on each entry: an upstream's scope and a
// deployment's upstream-side name. It is idempotent.
func (c *Config) ApplyDefaults() {
	for _, u := range c.Upstreams {
		if u != nil && u.Scope == "" {
			u.Scope = DefaultScope
		}
	}
	for _, cl := range c.Callers {
		if cl != nil && cl.KeyHashes == nil {
			// Programmatic configurations (no files or environment to read) hash inline keys only.
			if cl.KeySHA256 != "" {
				cl.KeyHashes = append(cl.KeyHashes, strings.ToLower(cl.KeySHA256))
			}
			for _, h := range cl.KeysSHA256 {
				cl.KeyHashes = append(cl.KeyHashes, strings.ToLower(h))
			}
		}
	}
	for name, d := range c.Deployments {
		if d == nil {
			continue
		}
		if d.Deployment == "" && d.Upstream != "" {
			d.Deployment = name
		}
		for _, b := range d.Backends {
			if b == nil {
				continue
			}
			if b.Deployment == "" {
				b.Deployment = name
			}
			if b.Priority == 0 {
				b.Priority = 1
			}
			if b.Weight == 0 {
				b.Weight = 1
			}
		}
	}
}
