package config

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Validate checks the whole configuration and returns every problem joined, each prefixed with
// its YAML path. It has no side effects.
func (c *Config) Validate() error {
	v := &validator{}
	v.listen("listen", c.Listen)
	v.listen("admin_listen", c.AdminListen)
	if _, port, _ := net.SplitHostPort(c.Listen); c.Listen == c.AdminListen && port != "0" {
		v.add("admin_listen", "must differ from listen: the admin endpoints are kept off the API port")
	}
	if !slices.Contains([]string{"debug", "info", "warn", "error"}, c.LogLevel) {
		v.add("log_level", "%s is not one of debug, info, warn, error", shown(c.LogLevel))
	}
	if !slices.Contains([]string{"json", "console"}, c.LogFormat) {
		v.add("log_format", "%s is not one of json, console", shown(c.LogFormat))
	}
	if c.MaxRequestBytes <= 0 {
		v.add("max_request_bytes", "must be positive")
	}
	if c.SpareConnections < 0 || c.SpareConnections > MaxSpareConnections {
		v.add("spare_connections", "must be from 0 to %d", MaxSpareConnections)
	}
	c.Timeouts.validate(v)
	if c.TLS != nil {
		c.TLS.validate(v, "tls", true)
	}
	if c.AdminTLS != nil {
		c.AdminTLS.validate(v, "admin_tls", false)
	}
	if c.AdminKeySHA256 != "" && !isSHA256Hex(c.AdminKeySHA256) {
		v.add("admin_key_sha256", "is not a SHA-256 in hex; store the hash from `proxy hash-key`, never the key")
	}
	if c.AdminPprof && c.AdminKeySHA256 == "" {
		v.add("admin_pprof", "needs admin_key_sha256: the profiling endpoints are never open to all")
	}

	for _, name := range sortedKeys(c.Credentials) {
		v.name("credentials."+name, name)
		c.Credentials[name].validate(v, "credentials."+name)
	}

	if len(c.Upstreams) == 0 {
		v.add("upstreams", "at least one upstream is required")
	}
	for _, name := range sortedKeys(c.Upstreams) {
		p := "upstreams." + name
		v.name(p, name)
		u := c.Upstreams[name]
		if u == nil {
			v.add(p, "is empty")
			continue
		}
		v.upstreamURL(p+".url", u.URL)
		if _, err := u.Pool(); err != nil {
			v.add(p+".ca_file", "%v", err)
		}
		if m, ok := u.HTTP2.parse(); !ok {
			v.add(p+".http2", "%s is not one of streams (the default), on (or true), off (or false)", shown(string(u.HTTP2)))
		} else if m != HTTP2Off && u.HTTP2 != "" && !strings.HasPrefix(strings.ToLower(u.URL), "https://") {
			v.add(p+".http2", "needs an https url: HTTP/2 is chosen in the TLS handshake")
		}
		switch {
		case u.Credential == "":
			v.add(p+".credential", "is required")
		case c.Credentials[u.Credential] == nil:
			v.add(p+".credential", "unknown credential %s%s", shown(u.Credential), known(c.Credentials))
		}
		if res, ok := strings.CutSuffix(u.Scope, "/.default"); !ok || res == "" || strings.ContainsAny(res, " \t") {
			v.add(p+".scope", "%s is not a resource scope such as %s (client-credential flows need the /.default form)", shown(u.Scope), DefaultScope)
		}
	}

	if len(c.Deployments) == 0 && len(c.Upstreams) > 1 {
		v.add("deployments", "required when there is more than one upstream: say which upstream serves each deployment")
	}
	for _, name := range sortedKeys(c.Deployments) {
		p := "deployments." + name
		v.name(p, name)
		d := c.Deployments[name]
		if d == nil {
			v.add(p, "is empty")
			continue
		}
		if !ValidDeploymentName(name) {
			v.add(p, "%s is not a valid deployment name (letters, digits, '.', '-', '_'; at most 64)", shown(name))
		}
		if len(d.Backends) > 0 {
			if len(d.Backends) > 64 {
				v.add(p+".backends", "at most 64 backends per deployment")
			}
			if d.Upstream != "" || d.Deployment != "" {
				v.add(p, "set upstream (one backend) or backends (a pool), not both")
			}
			seen := map[[2]string]bool{}
			for i, b := range d.Backends {
				bp := fmt.Sprintf("%s.backends[%d]", p, i)
				if b == nil {
					v.add(bp, "is empty")
					continue
				}
				c.validateBackendTarget(v, bp, b.Upstream, b.Deployment)
				if b.Priority < 0 {
					v.add(bp+".priority", "must not be negative")
				}
				if b.Weight < 0 || b.Weight > maxWeight {
					v.add(bp+".weight", "must be between 0 and %d", maxWeight)
				}
				target := [2]string{b.Upstream, b.Deployment}
				if target[1] == "" {
					target[1] = name
				}
				if seen[target] {
					// A call that one of them failed would be sent to the other, the same backend.
					v.add(bp, "names the same upstream and deployment as a backend before it")
				}
				seen[target] = true
			}
			continue
		}
		c.validateBackendTarget(v, p, d.Upstream, d.Deployment)
	}
	c.Resilience.validate(v)

	c.validateCallers(v)
	return errors.Join(v.errs...)
}

func (c *Config) validateBackendTarget(v *validator, p, upstream, deployment string) {
	if !ValidDeploymentName(deployment) {
		v.add(p+".deployment", "%s is not a valid deployment name (letters, digits, '.', '-', '_'; at most 64)", shown(deployment))
	}
	switch {
	case upstream == "":
		v.add(p+".upstream", "is required")
	case c.Upstreams[upstream] == nil:
		v.add(p+".upstream", "unknown upstream %s%s", shown(upstream), known(c.Upstreams))
	}
}

func (r Resilience) validate(v *validator) {
	if r.MaxAttempts < 1 {
		v.add("resilience.max_attempts", "must be at least 1")
	}
	if r.RetryBudget < 0 || r.RetryBudget > 1 {
		v.add("resilience.retry_budget", "must be between 0 and 1")
	}
	if r.MinRetriesPerSecond < 0 {
		v.add("resilience.min_retries_per_second", "must not be negative")
	}
	if r.BreakerFailures < 1 {
		v.add("resilience.breaker_failures", "must be at least 1")
	}
	for _, f := range []struct {
		name string
		d    time.Duration
	}{{"breaker_open", r.BreakerOpen}, {"default_cooldown", r.DefaultCooldown}, {"max_cooldown", r.MaxCooldown}} {
		if f.d <= 0 {
			v.add("resilience."+f.name, "must be positive")
		}
	}
	if r.WaitForCapacity < 0 {
		v.add("resilience.wait_for_capacity", "must not be negative")
	}
}

func (c *Config) validateCallers(v *validator) {
	if len(c.Callers) == 0 && !c.AllowUnauthenticated {
		v.add("callers", "no callers are configured: add at least one (see `proxy hash-key`), or set allow_unauthenticated: true to run an open gateway")
	}
	if c.MaxConcurrent < 0 {
		v.add("max_concurrent", "must not be negative")
	}
	names := map[string]int{}
	keys := map[string]int{}
	for i, cl := range c.Callers {
		p := fmt.Sprintf("callers[%d]", i)
		if cl == nil {
			v.add(p, "is empty")
			continue
		}
		switch {
		case cl.Name == "":
			v.add(p+".name", "is required")
		case !validLabel(cl.Name):
			v.add(p+".name", "%s may hold only letters, digits, '.', '-', '_' (at most 64)", shown(cl.Name))
		case isCredential(cl.Name):
			v.name(p+".name", cl.Name)
		default:
			if j, dup := names[cl.Name]; dup {
				v.add(p+".name", "%s is already used by callers[%d]", shown(cl.Name), j)
			}
			names[cl.Name] = i
		}
		hasKeys := cl.KeySHA256 != "" || len(cl.KeysSHA256) > 0 || len(cl.KeyFiles) > 0 || len(cl.KeyEnv) > 0
		kinds := 0
		for _, k := range []bool{hasKeys, cl.Entra != nil, cl.MTLS != nil} {
			if k {
				kinds++
			}
		}
		switch {
		case kinds == 0:
			v.add(p, "needs a key (key_sha256 from `proxy hash-key --generate`, keys_sha256, key_files or key_env), an entra section or an mtls section")
		case kinds > 1:
			v.add(p, "is one kind of caller: keys, entra or mtls, not several")
		}
		for j, h := range append([]string{cl.KeySHA256}, cl.KeysSHA256...) {
			field := p + ".key_sha256"
			if j > 0 {
				field = fmt.Sprintf("%s.keys_sha256[%d]", p, j-1)
			} else if h == "" {
				continue
			}
			if !isSHA256Hex(h) {
				// Not echoed: a raw key pasted here by mistake must not reach the logs.
				v.add(field, "is not a SHA-256 in hex (64 characters 0-9a-f); store the hash from `proxy hash-key`, never the key")
			}
		}
		seen := map[string]bool{}
		for _, h := range cl.KeyHashes {
			if seen[h] {
				continue
			}
			seen[h] = true
			if j, dup := keys[h]; dup && j != i {
				v.add(p, "has a key that callers[%d] also has: each caller needs its own keys", j)
			}
			keys[h] = i
		}
		if cl.Entra != nil {
			cl.Entra.validate(v, p+".entra")
		}
		if cl.MTLS != nil {
			if cl.MTLS.Subject == "" && len(cl.MTLS.DNSNames) == 0 && len(cl.MTLS.URIs) == 0 {
				v.add(p+".mtls", "set subject, dns_names or uris to say which certificates identify the caller")
			}
			if c.TLS == nil || c.TLS.ClientCAFile == "" {
				v.add(p+".mtls", "needs tls.client_ca_file on the API listener to verify client certificates")
			}
		}
		if cl.MaxConcurrent < 0 {
			v.add(p+".max_concurrent", "must not be negative")
		}
		if len(cl.Deployments) == 0 {
			v.add(p+".deployments", `is required: list the deployments this caller may use, or ["*"] for all`)
		}
		for j, d := range cl.Deployments {
			if d == AllDeployments {
				continue
			}
			dp := fmt.Sprintf("%s.deployments[%d]", p, j)
			if len(c.Deployments) > 0 {
				if c.Deployments[d] == nil {
					v.add(dp, "unknown deployment %s%s", shown(d), known(c.Deployments))
				}
			} else if !ValidDeploymentName(d) {
				v.add(dp, "%s is not a valid deployment name", shown(d))
			}
		}
	}
}

func (e *EntraCaller) validate(v *validator, p string) {
	if !isGUID(e.TenantID) {
		v.add(p+".tenant_id", "must be the tenant's ID (a GUID): tokens name their tenant by ID")
	}
	if len(e.Audiences) == 0 {
		v.add(p+".audiences", "is required: the gateway's app ID URI (api://…) and/or its client ID")
	}
	for i, a := range e.Audiences {
		if microsoftResources[strings.ToLower(strings.TrimSuffix(a, "/"))] {
			v.add(fmt.Sprintf("%s.audiences[%d]", p, i), "%s is a Microsoft service's: its tokens are for that service, and any held for it would be let in; use the gateway's own app ID URI or client ID", shown(a))
		}
	}
	if len(e.AppIDs) == 0 && len(e.ObjectIDs) == 0 && len(e.Roles) == 0 {
		v.add(p, "set app_ids, object_ids or roles: without one, any application in the tenant could call")
	}
	switch e.Principal {
	case "", PrincipalAny, PrincipalApp, PrincipalUser:
	default:
		v.add(p+".principal", "%s is not app, user or any", shown(e.Principal))
	}
	if e.AuthorityHost != "" {
		u, err := url.Parse(e.AuthorityHost)
		if err != nil || u.Scheme != "https" || u.Host == "" {
			v.add(p+".authority_host", "%s is not an https URL such as https://login.microsoftonline.us/", shown(e.AuthorityHost))
		}
	}
}

// microsoftResources are the audiences of tokens for Microsoft's own services (lower case, no
// trailing slash), which are never the gateway's.
var microsoftResources = map[string]bool{
	"https://cognitiveservices.azure.com": true, "https://ai.azure.com": true,
	"https://management.azure.com": true, "https://management.core.windows.net": true,
	"https://graph.microsoft.com": true, "00000003-0000-0000-c000-000000000000": true,
	"https://storage.azure.com": true, "https://vault.azure.net": true, "https://database.windows.net": true,
}

func isGUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case i == 8 || i == 13 || i == 18 || i == 23:
			if c != '-' {
				return false
			}
		case c >= '0' && c <= '9', c >= 'a' && c <= 'f', c >= 'A' && c <= 'F':
		default:
			return false
		}
	}
	return true
}

func (t Timeouts) validate(v *validator) {
	for _, f := range []struct {
		name string
		d    time.Duration
	}{
		{"read_header", t.ReadHeader}, {"idle", t.Idle}, {"dial", t.Dial},
		{"tls_handshake", t.TLSHandshake}, {"response_header", t.ResponseHeader}, {"stream_idle", t.StreamIdle},
		{"upstream_idle", t.UpstreamIdle}, {"token_acquire", t.TokenAcquire},
		{"shutdown_grace", t.ShutdownGrace},
	} {
		if f.d <= 0 {
			v.add("timeouts."+f.name, "must be positive")
		}
	}
	if t.ShutdownDelay < 0 {
		v.add("timeouts.shutdown_delay", "must not be negative")
	}
}

// credentialFields lists, per credential type, the optional and required keys it takes; any
// other key set on it is an error, so a setting that would be silently ignored is caught.
var credentialFields = map[string]struct{ required, optional []string }{
	TypeClientSecret: {
		required: []string{"tenant_id", "client_id", "client_secret"},
		optional: []string{"authority_host"},
	},
	TypeClientCertificate: {
		required: []string{"tenant_id", "client_id", "certificate_file"},
		optional: []string{"certificate_password", "send_certificate_chain", "authority_host"},
	},
	TypeManagedIdentity: {
		optional: []string{"client_id", "resource_id", "object_id"},
	},
	TypeWorkloadIdentity: {
		required: []string{"tenant_id", "client_id", "token_file"},
		optional: []string{"authority_host"},
	},
	TypeAzureCLI: {
		optional: []string{"tenant_id", "subscription"},
	},
	TypeDefault: {
		optional: []string{"tenant_id", "authority_host"},
	},
}

func (cr *Credential) validate(v *validator, p string) {
	if cr == nil {
		v.add(p, "is empty")
		return
	}
	spec, ok := credentialFields[cr.Type]
	if !ok {
		types := make([]string, 0, len(credentialFields))
		for t := range credentialFields {
			types = append(types, t)
		}
		sort.Strings(types)
		v.add(p+".type", "%s is not one of %s", shown(cr.Type), strings.Join(types, ", "))
		return
	}
	set := map[string]bool{
		"tenant_id":              cr.TenantID != "",
		"client_id":              cr.ClientID != "",
		"client_secret":          cr.ClientSecret != "" || cr.ClientSecretFile != "",
		"certificate_file":       cr.CertificateFile != "",
		"certificate_password":   cr.CertificatePassword != "" || cr.CertificatePasswordFile != "",
		"send_certificate_chain": cr.SendCertificateChain,
		"resource_id":            cr.ResourceID != "",
		"object_id":              cr.ObjectID != "",
		"token_file":             cr.TokenFile != "",
		"subscription":           cr.Subscription != "",
		"authority_host":         cr.AuthorityHost != "",
	}
	for _, k := range spec.required {
		if !set[k] {
			hint := ""
			switch {
			case k == "client_secret":
				hint = " (client_secret: ${VAR} or client_secret_file)"
			case cr.Type == TypeWorkloadIdentity:
				hint = " (or the webhook's AZURE_TENANT_ID / AZURE_CLIENT_ID / AZURE_FEDERATED_TOKEN_FILE)"
			}
			v.add(p+"."+k, "is required for type %s%s", cr.Type, hint)
		}
	}
	for _, k := range sortedKeys(set) {
		if set[k] && !slices.Contains(spec.required, k) && !slices.Contains(spec.optional, k) {
			v.add(p+"."+k, "is not used by type %s", cr.Type)
		}
	}
	if cr.ClientSecret != "" && cr.ClientSecretFile != "" && !cr.secretFromFile {
		v.add(p+".client_secret_file", "set client_secret or client_secret_file, not both")
	}
	if cr.CertificatePassword != "" && cr.CertificatePasswordFile != "" && !cr.passwordFromFile {
		v.add(p+".certificate_password_file", "set certificate_password or certificate_password_file, not both")
	}
	if cr.TenantID != "" && !validTenantID(cr.TenantID) {
		v.add(p+".tenant_id", "%s is not a tenant ID (a GUID or a domain such as contoso.onmicrosoft.com)", shown(cr.TenantID))
	}
	if cr.Type == TypeManagedIdentity {
		n := 0
		for _, s := range []string{cr.ClientID, cr.ResourceID, cr.ObjectID} {
			if s != "" {
				n++
			}
		}
		if n > 1 {
			v.add(p, "set at most one of client_id, resource_id, object_id to pick a user-assigned identity")
		}
	}
	if cr.AuthorityHost != "" {
		u, err := url.Parse(cr.AuthorityHost)
		if err != nil || u.Scheme != "https" || u.Host == "" || u.RawQuery != "" || u.Fragment != "" {
			v.add(p+".authority_host", "%s is not an https URL such as https://login.microsoftonline.us/", shown(cr.AuthorityHost))
		}
	}
}

// KnownAuthorityHosts are the public and sovereign Entra authorities, for which MSAL's instance
// discovery stays on; any other authority_host turns it off.
var KnownAuthorityHosts = []string{
	"login.microsoftonline.com",
	"login.microsoftonline.us",
	"login.chinacloudapi.cn",
}

// ValidDeploymentName reports whether s can be a deployment name: Azure allows letters, digits,
// '-', '_' and '.', up to 64 characters. Refusing anything else keeps names safe in URL paths.
func ValidDeploymentName(s string) bool {
	return validLabel(s) && s != "." && s != ".."
}

func validLabel(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		switch b := s[i]; {
		case b >= 'a' && b <= 'z', b >= 'A' && b <= 'Z', b >= '0' && b <= '9', b == '-', b == '_', b == '.':
		default:
			return false
		}
	}
	return true
}

func validTenantID(s string) bool {
	if s == "" || len(s) > 256 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '.') {
			return false
		}
	}
	return true
}

func isSHA256Hex(s string) bool {
	if len(s) != 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		switch b := s[i]; {
		case b >= '0' && b <= '9', b >= 'a' && b <= 'f', b >= 'A' && b <= 'F':
		default:
			return false
		}
	}
	return true
}

// IsLoopbackHost reports whether host (without port) names the local machine.
func IsLoopbackHost(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// shown is how an error quotes a value that failed validation: as written, unless it may be a
// secret pasted in the wrong place (mayBeSecret). These errors reach a terminal and a refused
// reload's log, which must never hold a secret.
func shown(s string) string {
	if mayBeSecret(s) {
		return fmt.Sprintf("the value (%d characters, not shown: it may be a secret)", len(s))
	}
	return strconv.Quote(s)
}

// minSecretRun is the shortest run of a secret's characters mayBeSecret takes for one.
const minSecretRun = 16

// mayBeSecret reports whether s may hold a credential: one with a credential's marks
// (isCredential), or a random string such as a storage key or a generated password (isRandom).
// Values are judged by it; names by isCredential alone (validator.name).
func mayBeSecret(s string) bool { return isCredential(s) || isRandom(s) }

// isCredential reports whether s holds one of the gateway's keys (GeneratedKeyPrefix), an
// Entra client secret (whose fourth to sixth characters are a digit, "Q" and "~"), or a JWT or
// other base64-encoded JSON ("eyJ" and at least minSecretRun more base64url characters): marks
// that no name chosen by hand carries.
func isCredential(s string) bool {
	if strings.Contains(s, GeneratedKeyPrefix) || strings.Contains(s, "Q~") {
		return true
	}
	for rest := s; ; {
		i := strings.Index(rest, "eyJ")
		if i < 0 {
			return false
		}
		rest = rest[i+3:]
		n := 0
		for n < len(rest) && isBase64URL(rest[n]) {
			n++
		}
		if n >= minSecretRun {
			return true
		}
	}
}

func isBase64URL(c byte) bool {
	return 'A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_'
}

// isRandom reports whether s holds a run of minSecretRun or more letters, digits and
// + / = _ ~ - that mixes capitals, small letters and digits, switching between them at least
// once every three characters, not counting a switch across one of those separators: what a
// random string does. Most names do not ("ContosoFinanceApp2024Prod", "DeepSeek-R1-Distill"),
// but some do ("AzureOpenAI-EastUS2-Prod"), which is why names are not judged by it; nor do
// the GUIDs, domains, scopes and URLs a configuration holds.
func isRandom(s string) bool {
	run, switches, classes, last := 0, 0, 0, 0
	for i := 0; i <= len(s); i++ {
		class := -1
		if i < len(s) {
			switch c := s[i]; {
			case 'A' <= c && c <= 'Z':
				class = 1
			case 'a' <= c && c <= 'z':
				class = 2
			case '0' <= c && c <= '9':
				class = 4
			case c == '+' || c == '/' || c == '=' || c == '_' || c == '~' || c == '-':
				class = 0
			}
		}
		if class < 0 { // the run ends here
			if run >= minSecretRun && classes == 7 && 3*switches >= run {
				return true
			}
			run, switches, classes, last = 0, 0, 0, 0
			continue
		}
		run++
		if class != 0 {
			if last != 0 && class != last {
				switches++
			}
			classes |= class
		}
		last = class // a switch across a separator is a new word's, not randomness
	}
	return false
}

// mayBeSecrets is what of the document below n its errors must not show: every scalar value
// that may be a secret (mayBeSecret), every mapping key that may be a credential
// (isCredential: keys are names, which errors show), and the names and defaults of ${VAR}
// references that may be either, since an error about one quotes it alone.
func mayBeSecrets(n *yaml.Node) []string {
	var found []string
	if n.Kind == yaml.MappingNode {
		for i := 0; i+1 < len(n.Content); i += 2 {
			// A random key that no name could be (it holds + / = or ~) is hidden too.
			if k := n.Content[i]; k.Kind == yaml.ScalarNode && (isCredential(k.Value) || isRandom(k.Value) && strings.ContainsAny(k.Value, "+/=~")) {
				found = append(found, k.Value)
			}
			found = append(found, mayBeSecrets(n.Content[i+1])...)
		}
		return found
	}
	if n.Kind == yaml.ScalarNode {
		if mayBeSecret(n.Value) {
			found = append(found, n.Value)
		}
		for rest := n.Value; ; {
			_, ref, ok := strings.Cut(rest, "${")
			if !ok {
				break
			}
			ref, rest, _ = strings.Cut(ref, "}")
			name, def, _ := strings.Cut(ref, ":-")
			for _, part := range []string{name, def} {
				if mayBeSecret(part) {
					found = append(found, part)
				}
			}
		}
	}
	for _, c := range n.Content {
		found = append(found, mayBeSecrets(c)...)
	}
	return found
}

type validator struct{ errs []error }

// maxWeight bounds a backend's weight: a pool's weights are summed for each pick.
const maxWeight = 1_000_000

func (v *validator) add(path, format string, args ...any) {
	v.errs = append(v.errs, fmt.Errorf("%s: %s", path, fmt.Sprintf(format, args...)))
}

// name refuses a name that holds a credential (isCredential): names are written in logs and
// in metrics' labels.
func (v *validator) name(path, name string) {
	if isCredential(name) {
		v.add(path, "the name (%d characters) looks like a key or a secret; names are written in logs and metrics, choose another", len(name))
	}
}

func (v *validator) listen(path, addr string) {
	if _, port, err := net.SplitHostPort(addr); err != nil || port == "" {
		v.add(path, "%s is not a host:port address", shown(addr))
	}
}

func (v *validator) upstreamURL(path, raw string) {
	if raw == "" {
		v.add(path, "is required")
		return
	}
	u, err := url.Parse(raw)
	switch {
	case err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http"):
		v.add(path, "%s is not an absolute http(s) URL such as https://myresource.openai.azure.com", shown(raw))
	case u.User != nil:
		v.add(path, "must not carry user information")
	case u.RawQuery != "" || u.Fragment != "":
		v.add(path, "must not have a query or fragment")
	case u.Scheme == "http" && !IsLoopbackHost(u.Hostname()):
		v.add(path, "plain http is allowed only to loopback hosts: the gateway sends bearer tokens upstream, use https")
	}
}

func known[T any](m map[string]T) string {
	if len(m) == 0 {
		return " (none are defined)"
	}
	return " (defined: " + strings.Join(sortedKeys(m), ", ") + ")"
}

func sortedKeys[T any](m map[string]T) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
