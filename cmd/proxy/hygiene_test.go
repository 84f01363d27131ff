package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tokenproxy/tokenproxy/internal/broker/entra"
	"github.com/tokenproxy/tokenproxy/internal/emulator"
	"github.com/tokenproxy/tokenproxy/internal/secretscan"
)

// secretSweep collects every secret a scenario puts in play and everything the gateway says.
type secretSweep struct {
	secrets []string
	said    []string // "where: text"
}

func (s *secretSweep) secret(v ...string) { s.secrets = append(s.secrets, v...) }

// token adds a JWT and its payload and signature: the header is common to many tokens.
func (s *secretSweep) token(t *testing.T, tok string) {
	t.Helper()
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		t.Fatalf("not a JWT: %.10s…", tok)
	}
	s.secret(tok, parts[1], parts[2])
}

// pemKey adds each base64 line of a PEM private key.
func (s *secretSweep) pemKey(t *testing.T, keyPEM []byte) {
	t.Helper()
	n := 0
	for _, line := range strings.Split(string(keyPEM), "\n") {
		if len(line) >= 16 && !strings.HasPrefix(line, "-----") {
			s.secret(line)
			n++
		}
	}
	if n == 0 {
		t.Fatal("the private key PEM has no body")
	}
}

func (s *secretSweep) heard(where, text string) { s.said = append(s.said, where+": "+text) }

func (s *secretSweep) check(t *testing.T) {
	t.Helper()
	for _, text := range s.said {
		where, _, _ := strings.Cut(text, ": ")
		assertNoSecrets(t, where, text, s.secrets)
		if strings.Contains(text, "eyJ") {
			t.Errorf("%s holds something shaped like a JWT", where)
		}
	}
}

// assertNoSecrets fails if any secret, or its first characters, appears in text.
func assertNoSecrets(t *testing.T, where, text string, secrets []string) {
	t.Helper()
	if i, _ := secretscan.Find(text, secrets); i >= 0 {
		t.Errorf("%s holds a secret (or its first %d characters) at byte %d: %q", where, secretscan.PrefixLen, i, text[max(0, i-200):min(len(text), i+60)])
	}
}

// rsaCertPEM makes a self-signed certificate and its RSA key (what Entra accepts for client
// assertions) in one PEM file, as an operator would deploy it.
func rsaCertPEM(t *testing.T) (*x509.Certificate, []byte, []byte) {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "cert-app"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pkcs8, _ := x509.MarshalPKCS8PrivateKey(key)
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pkcs8})
	return cert, append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), keyPEM...), keyPEM
}

// TestSecretsNeverEscape runs `proxy serve` at debug level through the scenarios that handle
// secrets (every kind of caller credential, right and wrong; client secret and certificate
// credentials, one of them failing; upstream faults; malformed and oversized requests; a reload
// refused over a pasted key) and asserts that no key, client secret, private key or access
// token, nor the first 12 characters of one, appears in the log, the metrics, the probes, or any
// answer the gateway gives.
func TestSecretsNeverEscape(t *testing.T) {
	const (
		gatewayAppID = "55555555-5555-5555-5555-555555555555"
		a360AppID    = "44444444-4444-4444-4444-444444444444"
		certAppID    = "77777777-7777-7777-7777-777777777777"
	)
	var sw secretSweep
	emu, err := emulator.Start(emulator.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer emu.Close()
	cert, certFile, certKey := rsaCertPEM(t)
	emu.AddApp(emulator.App{TenantID: emu.TenantID, ClientID: certAppID, Certificates: []*x509.Certificate{cert}})
	emu.AddApp(emulator.App{TenantID: emu.TenantID, ClientID: a360AppID})
	emu.AddResource(emulator.Resource{URI: "api://tokenproxy", AppID: gatewayAppID, Version: 2})
	emu.AddResource(emulator.Resource{URI: "api://someone-else", AppID: "66666666-6666-6666-6666-666666666666", Version: 2})
	typoSecret := emulator.RandomSecret() // a wrong secret is a secret all the same
	sw.secret(emu.ClientSecret, typoSecret)
	sw.pemKey(t, certKey)

	dir := t.TempDir()
	write := func(name string, b []byte) string {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	serverCA, _ := emulator.NewCA()
	serverCert, serverKey, err := serverCA.IssuePEM(emulator.Leaf{CommonName: "gateway", IPs: []net.IP{net.IPv4(127, 0, 0, 1)}})
	if err != nil {
		t.Fatal(err)
	}
	sw.pemKey(t, serverKey)
	write("server.pem", serverCert)
	write("server.key", serverKey)
	write("cert-app.pem", certFile)
	write("typo.secret", []byte(typoSecret+"\n"))
	keyApp, keyBatch, keyCI, keyAdmin, stray, pasted := newKey(), newKey(), newKey(), newKey(), newKey(), newKey()
	sw.secret(keyApp, keyBatch, keyCI, keyAdmin, stray, pasted)
	write("batch.key", []byte(keyBatch+"\n"))

	config := func(extraCaller string) []byte {
		return []byte(fmt.Sprintf(`
listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
log_level: debug
max_request_bytes: 4096
timeouts: {shutdown_delay: 0s}
tls: {cert_file: server.pem, key_file: server.key}
admin_key_sha256: %[1]s
credentials:
  corp-app: {type: client_secret, tenant_id: %[2]s, client_id: %[3]s, client_secret: "${AZURE_CLIENT_SECRET}", authority_host: %[4]q}
  cert-app: {type: client_certificate, tenant_id: %[2]s, client_id: %[5]s, certificate_file: cert-app.pem, authority_host: %[4]q}
  typo-app: {type: client_secret, tenant_id: %[2]s, client_id: %[3]s, client_secret_file: typo.secret, authority_host: %[4]q}
upstreams:
  eastca: {url: %[6]q, credential: corp-app}
  westeu: {url: %[6]q, credential: cert-app}
  broken: {url: %[6]q, credential: typo-app}
deployments:
  gpt-4.1-mini: {upstream: eastca, deployment: deploy-gpt-4.1}
  gpt-4o: {upstream: westeu}
  text-embedding-3-small: {upstream: broken}
callers:
  - {name: app, key_sha256: %[7]s, deployments: ["*"]}
  - {name: batch, key_files: [batch.key], deployments: [gpt-4o]}
  - {name: ci, key_env: [CI_KEY], deployments: ["*"]}
  - name: a360-oauth
    entra: {tenant_id: %[2]s, audiences: ["api://tokenproxy", %[10]s], app_ids: [%[8]s], authority_host: %[4]q}
    deployments: [gpt-4.1-mini]
%[9]s`, hashKey(keyAdmin), emu.TenantID, emu.ClientID, emu.URL(), certAppID, emu.OpenAI.URL(), hashKey(keyApp), a360AppID, extraCaller, gatewayAppID))
	}
	cfgPath := write("proxy.yaml", config(""))
	getenv := env(map[string]string{"AZURE_CLIENT_SECRET": emu.ClientSecret, "CI_KEY": keyCI})

	ctx := t.Context()
	out, logs := newLines(), &syncBuffer{}
	done := make(chan error, 1)
	stopCtx, stop := context.WithCancel(ctx)
	defer stop()
	go func() {
		done <- runServeWith(stopCtx, []string{"--config", cfgPath}, getenv, out.w, logs, entra.Options{HTTPClient: emu.CA().Client()})
		out.w.Close()
	}()
	var stdout strings.Builder
	m := out.await(t, `^proxy: serving the API on (https://\S+), admin on (\S+)$`)
	stdout.WriteString(m[0])
	api, adm := m[1], m[2]
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: serverCA.Pool()}}}

	call := func(name, method, path string, header map[string]string, body string) int {
		t.Helper()
		req, _ := http.NewRequestWithContext(ctx, method, api+path, strings.NewReader(body))
		for k, v := range header {
			req.Header.Set(k, v)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var h strings.Builder
		resp.Header.Write(&h)
		sw.heard("the answer to "+name, h.String()+string(b))
		return resp.StatusCode
	}
	const chat = "/openai/deployments/gpt-4.1-mini/chat/completions?api-version=2024-10-21"
	const body = `{"messages":[{"role":"user","content":"hi"}]}`
	a360 := must(emu.IssueToken(a360AppID, "api://tokenproxy"))
	otherAudience := must(emu.IssueToken(a360AppID, "api://someone-else"))
	sw.token(t, a360)
	sw.token(t, otherAudience)

	for _, tt := range []struct {
		name, method, path string
		header             map[string]string
		body               string
		want               int
	}{
		{"a key in api-key", "POST", chat, map[string]string{"api-key": keyApp}, body, 200},
		{"a key as a bearer token, certificate credential", "POST", "/openai/deployments/gpt-4o/chat/completions?api-version=1", map[string]string{"Authorization": "Bearer " + keyApp}, body, 200},
		{"a key also in the query", "POST", chat + "&api-key=" + keyApp + "&subscription-key=" + stray, map[string]string{"api-key": keyApp}, body, 200},
		{"a key from a file, streaming", "POST", "/openai/deployments/gpt-4o/chat/completions?api-version=1", map[string]string{"api-key": keyBatch}, `{"stream":true,"stream_options":{"include_usage":true},"messages":[]}`, 200},
		{"a key from the environment, Foundry route", "POST", "/openai/v1/chat/completions", map[string]string{"Authorization": "Bearer " + keyCI}, `{"model":"gpt-4.1-mini","messages":[]}`, 200},
		{"an Entra caller", "POST", chat, map[string]string{"Authorization": "Bearer " + a360}, body, 200},
		{"an Entra token for another audience", "POST", chat, map[string]string{"Authorization": "Bearer " + otherAudience}, body, 401},
		{"an Entra token beside a key", "POST", chat, map[string]string{"Authorization": "Bearer " + a360, "api-key": stray}, body, 401},
		{"an unknown key", "POST", chat, map[string]string{"api-key": stray}, body, 401},
		{"an unknown key as a bearer token", "POST", chat, map[string]string{"Authorization": "Bearer " + stray}, body, 401},
		{"the key as the request ID", "POST", chat, map[string]string{"api-key": keyApp, "x-ms-client-request-id": keyApp}, body, 200},
		{"the key in a header of its own", "POST", chat, map[string]string{"api-key": keyApp, "x-debug-echo": keyApp}, body, 200},
		{"a deployment outside the allow-list", "POST", chat, map[string]string{"api-key": keyBatch}, body, 403},
		{"a credential whose secret is wrong", "POST", "/openai/deployments/text-embedding-3-small/embeddings?api-version=1", map[string]string{"api-key": keyCI}, `{"input":"x"}`, 503},
		{"a body over the limit", "POST", chat, map[string]string{"api-key": keyApp}, `{"messages":"` + strings.Repeat(keyApp, 200) + `"}`, 413},
		{"a body that is not JSON", "POST", "/openai/v1/chat/completions", map[string]string{"api-key": keyApp}, `{"model":` + keyApp, 400},
		{"a path holding the key", "POST", "/openai/deployments/" + keyApp + "/chat/completions?api-version=1", map[string]string{"api-key": keyApp}, body, 400},
		{"no api-version", "POST", "/openai/deployments/gpt-4.1-mini/chat/completions?key=" + keyApp, map[string]string{"api-key": keyApp}, body, 400},
	} {
		if got := call(tt.name, tt.method, tt.path, tt.header, tt.body); got != tt.want {
			t.Errorf("%s: got %d, want %d: %s", tt.name, got, tt.want, sw.said[len(sw.said)-1])
		}
	}

	// Upstream faults pass through, and tokens the broker holds are renewed.
	emu.OpenAI.InjectFault(emulator.Fault{Status: 429, RetryAfter: time.Second, Count: 1})
	if got := call("an upstream 429", "POST", chat, map[string]string{"api-key": keyApp}, body); got != 429 {
		t.Errorf("an upstream 429: got %d", got)
	}
	emu.OpenAI.InjectFault(emulator.Fault{Status: 500, Count: 1})
	call("an upstream 500", "POST", chat, map[string]string{"api-key": keyApp}, body)
	emu.SetTokenLifetime(-time.Minute, 0)
	expired := must(emu.IssueToken(a360AppID, "api://tokenproxy"))
	emu.SetTokenLifetime(time.Hour, 0)
	sw.token(t, expired)
	if got := call("an expired Entra token", "POST", chat, map[string]string{"Authorization": "Bearer " + expired}, body); got != 401 {
		t.Errorf("an expired Entra token: got %d", got)
	}

	// Requests the HTTP layer refuses: a control character in the key's header, a header block
	// over the cap. What the server answers is read off the wire.
	raw := func(name, req string) {
		t.Helper()
		conn, err := tls.Dial("tcp", strings.TrimPrefix(api, "https://"), &tls.Config{RootCAs: serverCA.Pool()})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		go io.WriteString(conn, req)
		b, _ := io.ReadAll(bufio.NewReader(conn))
		if !strings.HasPrefix(string(b), "HTTP/1.1 4") {
			t.Errorf("%s: got %.40q, want a 4xx answer", name, b)
		}
		sw.heard("the answer to "+name, string(b))
	}
	raw("a control character", "POST "+chat+" HTTP/1.1\r\nHost: x\r\napi-key: "+keyApp+"\x01\r\nContent-Length: 2\r\n\r\n{}")
	raw("a duplicated header", "POST "+chat+" HTTP/1.1\r\nHost: x\r\napi-key: "+keyApp+"\r\napi-key: "+stray+"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
	raw("oversized headers", "POST "+chat+" HTTP/1.1\r\nHost: x\r\napi-key: "+keyApp+"\r\nx-pad: "+strings.Repeat(keyApp, 1200)+"\r\n\r\n")
	raw("a malformed request line", "POST "+keyApp+" HTTP/9.9 extra\r\nHost: x\r\n\r\n")

	// The admin endpoints.
	adminGet := func(path, bearer string) {
		req, _ := http.NewRequestWithContext(ctx, "GET", adm+path, nil)
		if bearer != "" {
			req.Header.Set("Authorization", "Bearer "+bearer)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		sw.heard("admin "+path, string(b))
	}
	adminGet("/metrics", keyAdmin)
	adminGet("/metrics", stray)
	adminGet("/readyz", "")
	if strings.Contains(sw.said[len(sw.said)-1], "typo-app") {
		t.Errorf("readyz, without the admin key, gives its reasons: %s", sw.said[len(sw.said)-1])
	}
	adminGet("/readyz", keyAdmin)
	adminGet("/healthz", "")
	if !strings.Contains(sw.said[len(sw.said)-2], "credential typo-app") {
		t.Errorf("readyz, with the admin key, does not name the failing credential: %s", sw.said[len(sw.said)-2])
	}

	// An operator pastes a key where its hash belongs: the reload is refused without echoing it,
	// and so is the same file given to validate.
	bad := config(fmt.Sprintf("  - {name: pasted, key_sha256: %s, deployments: [\"*\"]}\n", pasted))
	write("proxy.yaml.tmp", bad)
	os.Rename(filepath.Join(dir, "proxy.yaml.tmp"), cfgPath)
	logs.await(t, "configuration reload refused", 1)
	syscall.Kill(os.Getpid(), syscall.SIGHUP)
	logs.await(t, "configuration reload refused", 2)
	vout, verr, _ := runSync(t, "", getenv, "validate", "--config", cfgPath)
	sw.heard("validate", vout+verr)
	if !strings.Contains(verr, "callers[4].key_sha256") {
		t.Errorf("validate did not point at the pasted key: %s", verr)
	}

	stop()
	if err := <-done; err != nil {
		t.Errorf("serve returned %v", err)
	}
	for line := range out.ch {
		stdout.WriteString(line)
	}
	sw.heard("stdout", stdout.String())
	sw.heard("the log", logs.String())

	// The upstream's tokens: every one the gateway sent is a secret. Nothing else the upstream
	// received holds a caller's secret.
	seen := map[string]bool{}
	for _, r := range emu.OpenAI.Requests() {
		var h strings.Builder
		r.Header.Write(&h)
		sw.heard("the upstream request", r.Method+" "+r.Path+"?"+r.RawQuery+"\n"+strings.ReplaceAll(h.String(), r.Header.Get("Authorization"), "")+string(r.Body))
		if tok := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer "); !seen[tok] {
			seen[tok] = true
			sw.token(t, tok)
		}
	}
	if len(seen) < 2 {
		t.Fatalf("the upstream saw %d distinct tokens, want those of both working credentials", len(seen))
	}
	for _, want := range []string{`"caller":"batch"`, `"caller":"a360-oauth"`, `"caller":"ci"`, "AADSTS7000215", `"level":"debug"`} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("the log lacks %s: the sweep did not cover what it claims", want)
		}
	}
	sw.check(t)
}

func must(s string, err error) string {
	if err != nil {
		panic(err)
	}
	return s
}
