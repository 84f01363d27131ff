package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/tokenproxy/tokenproxy/internal/emulator"
	"github.com/tokenproxy/tokenproxy/internal/logsink"
)

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

// runSync runs a short command and returns its outputs.
func runSync(t *testing.T, stdin string, getenv func(string) string, args ...string) (string, string, error) {
	t.Helper()
	var out, errOut strings.Builder
	if getenv == nil {
		getenv = env(nil)
	}
	err := run(t.Context(), args, getenv, strings.NewReader(stdin), &out, &errOut)
	return out.String(), errOut.String(), err
}

func TestHelpOnEveryCommand(t *testing.T) {
	for _, args := range [][]string{
		{"--help"}, {"help"}, {"serve", "--help"}, {"demo", "--help"}, {"validate", "-h"}, {"hash-key", "--help"}, {"version", "--help"}, {"emulator", "--help"},
	} {
		out, _, err := runSync(t, "", nil, args...)
		if err != nil || !strings.Contains(out, "Usage") && !strings.Contains(out, "usage") {
			t.Errorf("%v: got (%q, %v), want usage on stdout and success", args, out, err)
		}
	}
	if _, errOut, err := runSync(t, "", nil, "frobnicate"); !errors.Is(err, errUsage) || !strings.Contains(errOut, `unknown command "frobnicate"`) {
		t.Errorf("unknown command: got (%q, %v), want a usage error", errOut, err)
	}
	if _, _, err := runSync(t, "", nil); !errors.Is(err, errUsage) {
		t.Errorf("no command: got %v, want a usage error", err)
	}
	if _, errOut, err := runSync(t, "", nil, "serve", "--bogus"); !errors.Is(err, errUsage) || !strings.Contains(errOut, "bogus") {
		t.Errorf("bad flag: got (%q, %v), want a usage error", errOut, err)
	}
}

func TestVersion(t *testing.T) {
	out, _, err := runSync(t, "", nil, "version")
	if err != nil || !strings.HasPrefix(out, "proxy dev (go") {
		t.Errorf("got (%q, %v), want the version", out, err)
	}
}

func TestHashKey(t *testing.T) {
	// The issue's example: key_sha256 of "test".
	out, errOut, err := runSync(t, "test\n", nil, "hash-key")
	if err != nil || out != "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\n" {
		t.Errorf("got (%q, %v), want the SHA-256 of test", out, err)
	}
	if !strings.Contains(errOut, "can be guessed") {
		t.Errorf("a 4-character key got no warning: %q", errOut)
	}
	for _, in := range []string{"", " padded \n", "two\nlines"} {
		if _, _, err := runSync(t, in, nil, "hash-key"); err == nil {
			t.Errorf("hash-key accepted %q", in)
		}
	}
	out, _, err = runSync(t, "", nil, "hash-key", "--generate")
	m := regexp.MustCompile(`^key:        (tpk_[A-Za-z0-9_-]{43})\nkey_sha256: ([0-9a-f]{64})\n$`).FindStringSubmatch(out)
	if err != nil || m == nil || hashKey(m[1]) != m[2] {
		t.Errorf("--generate printed %q (%v), want a key and its hash", out, err)
	}
}

func TestValidate(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	os.WriteFile(good, []byte(`
credentials:
  corp-app: {type: client_secret, tenant_id: t, client_id: c, client_secret: "${AZURE_CLIENT_SECRET}"}
upstreams:
  eastca: {url: "https://x.openai.azure.com", credential: corp-app}
callers:
  - {name: a, key_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08, deployments: ["*"]}
`), 0o600)
	out, _, err := runSync(t, "", env(map[string]string{"AZURE_CLIENT_SECRET": "x"}), "validate", "--config", good)
	if err != nil || !strings.Contains(out, "OK (1 credentials, 1 upstreams, 0 deployments, 1 callers)") {
		t.Errorf("got (%q, %v), want OK", out, err)
	}
	// PROXY_CONFIG stands in for --config; every problem is printed, one per line.
	_, errOut, err := runSync(t, "", env(map[string]string{"PROXY_CONFIG": good}), "validate")
	if !errors.Is(err, errReported) || !strings.Contains(errOut, "1 problem(s):\n  - credentials.corp-app.client_secret: environment variable AZURE_CLIENT_SECRET is not set") {
		t.Errorf("got (%q, %v), want the unset variable reported", errOut, err)
	}
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("listen: nope\nlog_level: loud\nupstreams: {}\n"), 0o600)
	_, errOut, err = runSync(t, "", nil, "validate", "--config", bad)
	if !errors.Is(err, errReported) || !strings.Contains(errOut, "4 problem(s)") || strings.Count(errOut, "\n  - ") != 4 {
		t.Errorf("got (%q, %v), want four problems listed", errOut, err)
	}
	if _, errOut, err := runSync(t, "", nil, "validate"); !errors.Is(err, errUsage) || !strings.Contains(errOut, "PROXY_CONFIG") {
		t.Errorf("no config: got (%q, %v)", errOut, err)
	}
}

// What serve refuses at start, validate refuses: it builds what serve builds before listening.
func TestValidateRefusesWhatServeWould(t *testing.T) {
	dir := t.TempDir()
	junk := filepath.Join(dir, "app.pem")
	os.WriteFile(junk, []byte("not a certificate"), 0o600)
	for name, tc := range map[string]struct{ credential, key, says string }{
		"a certificate that does not parse": {
			credential: `{type: client_certificate, tenant_id: t, client_id: c, certificate_file: "` + junk + `"}`,
			key:        hashKey("tpk_some-caller-key-0123456789abcdef"), says: "corp-app",
		},
		"a caller's key that is a route's word": {
			credential: `{type: managed_identity}`,
			key:        hashKey("completions"), says: "completions",
		},
	} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(dir, "c.yaml")
			os.WriteFile(path, []byte(`
credentials:
  corp-app: `+tc.credential+`
upstreams:
  eastca: {url: "https://x.openai.azure.com", credential: corp-app}
callers:
  - {name: a, key_sha256: `+tc.key+`, deployments: ["*"]}
`), 0o600)
			_, errOut, err := runSync(t, "", nil, "validate", "--config", path)
			if !errors.Is(err, errReported) || !strings.Contains(errOut, "1 problem(s)") || !strings.Contains(errOut, tc.says) {
				t.Errorf("got (%q, %v), want the problem reported", errOut, err)
			}
		})
	}
}

// lines delivers what a running command prints, line by line.
type lines struct {
	w  *io.PipeWriter
	ch chan string
}

func newLines() *lines {
	r, w := io.Pipe()
	l := &lines{w: w, ch: make(chan string, 1000)}
	go func() {
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			l.ch <- sc.Text()
		}
		close(l.ch)
	}()
	return l
}

// await returns the first submatch of the first line matching re.
func (l *lines) await(t *testing.T, re string) []string {
	t.Helper()
	rx := regexp.MustCompile(re)
	timeout := time.After(30 * time.Second)
	for {
		select {
		case line, ok := <-l.ch:
			if !ok {
				t.Fatalf("output ended before a line matching %q", re)
			}
			if m := rx.FindStringSubmatch(line); m != nil {
				return m
			}
		case <-timeout:
			t.Fatalf("no line matching %q", re)
		}
	}
}

// start runs a long-lived command; stop cancels it (as SIGTERM does) and returns its error.
func start(t *testing.T, getenv func(string) string, args ...string) (out *lines, stderr *syncBuffer, stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	out, stderr = newLines(), &syncBuffer{}
	errc := make(chan error, 1)
	go func() {
		errc <- run(ctx, args, getenv, strings.NewReader(""), out.w, stderr)
		out.w.Close()
	}()
	var once sync.Once
	var err error
	stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case err = <-errc:
			case <-time.After(60 * time.Second):
				err = errors.New("the command did not stop")
			}
		})
		return err
	}
	t.Cleanup(func() { stop() })
	return out, stderr, stop
}

// syncBuffer collects a command's log; written signals each write, so tests can wait for a
// line instead of polling.
type syncBuffer struct {
	mu      sync.Mutex
	b       strings.Builder
	written chan struct{}
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.written == nil {
		s.written = make(chan struct{}, 1)
	}
	select {
	case s.written <- struct{}{}:
	default:
	}
	return s.b.Write(p)
}

// await waits until the log holds at least n occurrences of msg.
func (s *syncBuffer) await(t *testing.T, msg string, n int) {
	t.Helper()
	s.mu.Lock()
	if s.written == nil {
		s.written = make(chan struct{}, 1)
	}
	written := s.written
	s.mu.Unlock()
	timeout := time.After(20 * time.Second)
	for strings.Count(s.String(), msg) < n {
		select {
		case <-written:
		case <-timeout:
			t.Fatalf("no %q in the log (want %d); got:\n%s", msg, n, s)
		}
	}
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func post(t *testing.T, ctx context.Context, url, key, body string) *http.Response {
	t.Helper()
	req, _ := http.NewRequestWithContext(ctx, "POST", url, strings.NewReader(body))
	if key != "" {
		req.Header.Set("api-key", key)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

// served is `proxy serve` running against the emulator with a managed identity credential.
type served struct {
	emu        *emulator.Emulator
	mi         emulator.ManagedIdentity
	key        string
	api, admin string
	logs       *syncBuffer
	stop       func() error
	chat       string
}

// managedIdentityEmulator starts an emulator and points azidentity's managed identity
// credential at it (IDENTITY_ENDPOINT and IDENTITY_HEADER, which azidentity reads itself).
func managedIdentityEmulator(t *testing.T) *emulator.Emulator {
	t.Helper()
	emu, err := emulator.Start(emulator.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(emu.Close)
	endpoint, header := emu.ManagedIdentityEnv()
	t.Setenv("IDENTITY_ENDPOINT", endpoint)
	t.Setenv("IDENTITY_HEADER", header)
	return emu
}

func startServe(t *testing.T, timeouts string) *served {
	t.Helper()
	emu := managedIdentityEmulator(t)
	s := &served{emu: emu, key: newKey()}
	s.mi = emu.AddManagedIdentity(emulator.ManagedIdentity{TenantID: emu.TenantID, ClientID: uuid.NewString()})
	cfgPath := filepath.Join(t.TempDir(), "proxy.yaml")
	os.WriteFile(cfgPath, []byte(fmt.Sprintf(`
listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
timeouts: %s
credentials:
  aks-identity: {type: managed_identity, client_id: %s}
upstreams:
  eastca: {url: %q, credential: aks-identity}
deployments:
  gpt-4.1-mini: {upstream: eastca, deployment: deploy-gpt-4.1}
callers:
  - {name: app, key_sha256: %s, deployments: [gpt-4.1-mini]}
`, timeouts, s.mi.ClientID, emu.OpenAI.URL(), hashKey(s.key))), 0o600)
	var out *lines
	out, s.logs, s.stop = start(t, env(map[string]string{"PROXY_CONFIG": cfgPath}), "serve")
	m := out.await(t, `^proxy: serving the API on (\S+), admin on (\S+)$`)
	s.api, s.admin = m[1], m[2]
	s.chat = s.api + "/openai/deployments/gpt-4.1-mini/chat/completions?api-version=2024-10-21"
	return s
}

func (s *served) ready(t *testing.T) int {
	t.Helper()
	r, err := http.Get(s.admin + "/readyz")
	if err != nil {
		t.Fatalf("readyz: %v", err)
	}
	r.Body.Close()
	return r.StatusCode
}

func TestServeWithManagedIdentityAndGracefulShutdown(t *testing.T) {
	s := startServe(t, "{shutdown_delay: 2s, shutdown_grace: 30s}")
	resp := post(t, t.Context(), s.chat, s.key, `{"messages":[{"role":"user","content":"hi"}]}`)
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("got %d, want 200", resp.StatusCode)
	}
	if got := s.emu.OpenAI.Requests()[0].Claims.ObjectID; got != s.mi.ObjectID {
		t.Errorf("upstream saw a token for %q, want the managed identity %q", got, s.mi.ObjectID)
	}
	if code := s.ready(t); code != 200 {
		t.Fatalf("readyz %d, want 200", code)
	}
	// The log's own counters are served, at zero while stderr takes every line.
	if r, err := http.Get(s.admin + "/metrics"); err != nil {
		t.Fatalf("metrics: %v", err)
	} else {
		body, _ := io.ReadAll(r.Body)
		r.Body.Close()
		for _, want := range []string{"\ntokenproxy_log_lost_bytes_total 0\n", "\ntokenproxy_log_waits_total 0\n"} {
			if !strings.Contains(string(body), want) {
				t.Errorf("metrics lack %q", strings.TrimSpace(want))
			}
		}
	}

	// A stream is running when SIGTERM arrives.
	s.emu.OpenAI.SetChunkInterval(100 * time.Millisecond)
	stream := post(t, t.Context(), s.chat, s.key, `{"stream":true,"messages":[{"role":"user","content":"a long answer please"}]}`)
	defer stream.Body.Close()
	sc := bufio.NewScanner(stream.Body)
	if !sc.Scan() {
		t.Fatal("the stream did not start")
	}
	stopped := make(chan error, 1)
	go func() { stopped <- s.stop() }()

	// Readiness goes false at once; calls are still served during shutdown_delay.
	for s.ready(t) != 503 {
	}
	resp = post(t, t.Context(), s.chat, s.key, `{"messages":[{"role":"user","content":"during the delay"}]}`)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("a call during shutdown_delay got %d, want 200", resp.StatusCode)
	}

	// The live stream runs to its end.
	var last string
	for sc.Scan() {
		if sc.Text() != "" {
			last = sc.Text()
		}
	}
	if last != "data: [DONE]" {
		t.Errorf("the stream ended with %q, want data: [DONE]", last)
	}
	if err := <-stopped; err != nil {
		t.Errorf("serve returned %v after SIGTERM, want nil", err)
	}
	if _, err := http.Get(s.admin + "/healthz"); err == nil {
		t.Error("the admin listener is still open after shutdown")
	}
	if !strings.Contains(s.logs.String(), `"msg":"stopped"`) {
		t.Errorf("no shutdown log; got:\n%s", s.logs)
	}
}

func TestShutdownWithAHundredStreams(t *testing.T) {
	s := startServe(t, "{shutdown_delay: 500ms, shutdown_grace: 60s}")
	gate := make(chan struct{})
	s.emu.OpenAI.SetStreamGate(gate)

	const n = 100
	client := &http.Client{Transport: &http.Transport{MaxConnsPerHost: n + 10, MaxIdleConnsPerHost: n + 10}}
	var readers []*bufio.Reader
	for range n {
		req, _ := http.NewRequest("POST", s.chat, strings.NewReader(`{"stream":true,"messages":[{"role":"user","content":"hold on"}]}`))
		req.Header.Set("api-key", s.key)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		br := bufio.NewReader(resp.Body)
		if _, err := br.ReadString('\n'); err != nil { // the first event: the stream is live
			t.Fatal(err)
		}
		readers = append(readers, br)
	}
	stopped := make(chan error, 1)
	go func() { stopped <- s.stop() }()
	for s.ready(t) != 503 { // not ready at once
	}
	// After shutdown_delay the listener is closed: new calls are refused.
	for deadline := time.Now().Add(30 * time.Second); ; {
		if _, err := http.Post(s.chat, "application/json", strings.NewReader("{}")); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("new calls are still accepted long after shutdown_delay")
		}
	}
	close(gate) // the upstream finishes every stream
	for i, br := range readers {
		b, err := io.ReadAll(br)
		if err != nil || !strings.HasSuffix(strings.TrimSpace(string(b)), "data: [DONE]") {
			t.Fatalf("stream %d: %v, ended with %q; want all %d streams to finish", i, err, tail(string(b)), n)
		}
	}
	if err := <-stopped; err != nil {
		t.Errorf("serve returned %v, want nil (exit 0)", err)
	}
	if strings.Contains(s.logs.String(), "cut the connections") {
		t.Error("connections were cut although every stream finished within the grace")
	}
}

func tail(s string) string {
	if len(s) > 60 {
		return "…" + s[len(s)-60:]
	}
	return s
}

func TestReloadCallers(t *testing.T) {
	emu := managedIdentityEmulator(t)
	mi := emu.AddManagedIdentity(emulator.ManagedIdentity{TenantID: emu.TenantID, ClientID: uuid.NewString()})
	keyA, keyB, keyC := newKey(), newKey(), newKey()
	environ := &syncEnv{m: map[string]string{"ENV_KEY": keyC}}
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "proxy.yaml")
	write := func(callers string) {
		t.Helper()
		body := fmt.Sprintf(`
listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
timeouts: {shutdown_delay: 0s}
credentials: {mi: {type: managed_identity, client_id: %s}}
upstreams: {eastca: {url: %q, credential: mi}}
deployments: {gpt-4.1-mini: {upstream: eastca, deployment: deploy-gpt-4.1}}
callers:
%s`, mi.ClientID, emu.OpenAI.URL(), callers)
		// Write and rename, as editors and config management do.
		tmp := cfgPath + ".tmp"
		if err := os.WriteFile(tmp, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, cfgPath); err != nil {
			t.Fatal(err)
		}
	}
	write(fmt.Sprintf("  - {name: app, key_sha256: %s, deployments: [\"*\"]}\n", hashKey(keyA)))
	out, logs, stop := start(t, environ.get, "serve", "--config", cfgPath)
	api := out.await(t, `^proxy: serving the API on (\S+), admin`)[1]
	chat := api + "/openai/deployments/gpt-4.1-mini/chat/completions?api-version=1"
	status := func(key string) int {
		resp := post(t, t.Context(), chat, key, `{"messages":[]}`)
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	awaitLog := func(msg string, n int) { t.Helper(); logs.await(t, msg, n) }
	if status(keyA) != 200 || status(keyB) != 401 {
		t.Fatal("before the reload: want key A in, key B out")
	}

	// A stream stays open across every reload below.
	emu.OpenAI.SetChunkInterval(50 * time.Millisecond)
	stream := post(t, t.Context(), chat, keyA, `{"stream":true,"messages":[{"role":"user","content":"keep going while the gateway reloads"}]}`)
	defer stream.Body.Close()

	// Rotation: key B added beside A by editing the file.
	write(fmt.Sprintf("  - {name: app, keys_sha256: [%s, %s], deployments: [\"*\"]}\n", hashKey(keyA), hashKey(keyB)))
	awaitLog("callers reloaded", 1)
	if status(keyA) != 200 || status(keyB) != 200 {
		t.Error("after adding key B: want both keys in")
	}

	// A broken file is refused; the callers in force stay.
	write("  - {name: app, deployments: [\"*\"]}\n")
	awaitLog("configuration reload refused", 1)
	if status(keyA) != 200 || status(keyB) != 200 {
		t.Error("after a refused reload: want the previous callers kept")
	}

	// SIGHUP reloads what no file change shows: a key in the environment.
	write(fmt.Sprintf("  - {name: app, key_env: [ENV_KEY], deployments: [\"*\"]}\n"))
	awaitLog("callers reloaded", 2)
	if status(keyC) != 200 || status(keyA) != 401 {
		t.Error("after moving to the environment's key: want key C in, key A out")
	}
	keyD := newKey()
	environ.set("ENV_KEY", keyD)
	syscall.Kill(os.Getpid(), syscall.SIGHUP)
	awaitLog(`"trigger":"SIGHUP"`, 1)
	if status(keyD) != 200 || status(keyC) != 401 {
		t.Error("after SIGHUP: want the environment's new key in and the old one out")
	}

	// A key file named relative to the configuration's directory, in a directory of its own, is
	// read and watched there (not from the working directory): a key rotated in it is reloaded.
	keyE, keyF := newKey(), newKey()
	writeKey := func(key string) {
		t.Helper()
		tmp := filepath.Join(dir, "keys", "app.txt.tmp")
		if err := os.WriteFile(tmp, []byte(key+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(dir, "keys", "app.txt")); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "keys"), 0o700); err != nil {
		t.Fatal(err)
	}
	writeKey(keyE)
	write("  - {name: app, key_files: [keys/app.txt], deployments: [\"*\"]}\n")
	awaitLog("callers reloaded", 4)
	if status(keyE) != 200 || status(keyD) != 401 {
		t.Error("after moving to a key file: want its key in, the environment's out")
	}
	writeKey(keyF)
	awaitLog("callers reloaded", 5)
	if status(keyF) != 200 || status(keyE) != 401 {
		t.Error("after the key file's key was rotated: want the new key in, the old one out")
	}

	// Letting callers in without a key, by a reload, is warned of as at start.
	write("  - {name: app, key_files: [keys/app.txt], deployments: [\"*\"]}\nallow_unauthenticated: true\n")
	awaitLog("allow_unauthenticated is on", 1)

	b, err := io.ReadAll(stream.Body)
	if err != nil || !strings.HasSuffix(strings.TrimSpace(string(b)), "data: [DONE]") {
		t.Errorf("the stream across the reloads ended with %v after %q", err, tail(string(b)))
	}
	if err := stop(); err != nil {
		t.Errorf("serve returned %v", err)
	}
}

func TestServeTLSAndMTLS(t *testing.T) {
	emu := managedIdentityEmulator(t)
	mi := emu.AddManagedIdentity(emulator.ManagedIdentity{TenantID: emu.TenantID, ClientID: uuid.NewString()})

	dir := t.TempDir()
	serverCA, _ := emulator.NewCA()
	clientCA, _ := emulator.NewCA()
	rogueCA, _ := emulator.NewCA()
	writePEM := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	issue := func(ca *emulator.CA, leaf emulator.Leaf, name string) tls.Certificate {
		certPEM, keyPEM, err := ca.IssuePEM(leaf)
		if err != nil {
			t.Fatal(err)
		}
		writePEM(name+".pem", certPEM)
		writePEM(name+".key", keyPEM)
		c, _ := tls.X509KeyPair(certPEM, keyPEM)
		return c
	}
	issue(serverCA, emulator.Leaf{CommonName: "gateway-v1", IPs: []net.IP{net.IPv4(127, 0, 0, 1)}}, "server")
	writePEM("client-ca.pem", clientCA.CertPEM())
	batch := issue(clientCA, emulator.Leaf{CommonName: "batch-job", Client: true}, "batch")
	other := issue(clientCA, emulator.Leaf{CommonName: "someone-else", Client: true}, "other")
	rogue := issue(rogueCA, emulator.Leaf{CommonName: "batch-job", Client: true}, "rogue")
	key := newKey()
	adminKey := newKey()
	cfgPath := writePEM("proxy.yaml", []byte(fmt.Sprintf(`
listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
timeouts: {shutdown_delay: 0s}
tls: {cert_file: server.pem, key_file: server.key, client_ca_file: client-ca.pem}
admin_tls: {cert_file: server.pem, key_file: server.key, min_version: "1.3"}
admin_key_sha256: %s
credentials: {mi: {type: managed_identity, client_id: %s}}
upstreams: {eastca: {url: %q, credential: mi}}
deployments: {gpt-4.1-mini: {upstream: eastca, deployment: deploy-gpt-4.1}}
callers:
  - {name: batch-job, mtls: {subject: "CN=batch-job,O=Contoso"}, deployments: [gpt-4.1-mini]}
  - {name: app, key_sha256: %s, deployments: [gpt-4.1-mini]}
`, hashKey(adminKey), mi.ClientID, emu.OpenAI.URL(), hashKey(key))))

	out, logs, stop := start(t, env(nil), "serve", "--config", cfgPath)
	m := out.await(t, `^proxy: serving the API on (https://\S+), admin on (https://\S+)$`)
	api, adm := m[1], m[2]
	chat := api + "/openai/deployments/gpt-4.1-mini/chat/completions?api-version=1"
	client := func(cert *tls.Certificate, maxVersion uint16) *http.Client {
		cfg := &tls.Config{RootCAs: serverCA.Pool(), MaxVersion: maxVersion}
		if cert != nil {
			cfg.Certificates = []tls.Certificate{*cert}
		}
		return &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}}
	}
	call := func(c *http.Client, apiKey string) (int, string, error) {
		req, _ := http.NewRequest("POST", chat, strings.NewReader(`{"messages":[]}`))
		if apiKey != "" {
			req.Header.Set("api-key", apiKey)
		}
		resp, err := c.Do(req)
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), nil
	}

	if code, body, err := call(client(&batch, 0), ""); err != nil || code != 200 {
		t.Errorf("batch-job's certificate: got %d %s %v, want 200", code, body, err)
	}
	if !strings.Contains(logs.String(), `"caller":"batch-job"`) {
		logs.await(t, `"caller":"batch-job"`, 1)
	}
	if code, _, err := call(client(nil, 0), key); err != nil || code != 200 {
		t.Errorf("a key over TLS without a certificate: got %d %v, want 200", code, err)
	}
	// An event stream over TLS is relayed on the TLS connection, to its end.
	req, _ := http.NewRequest("POST", chat, strings.NewReader(`{"stream":true,"messages":[]}`))
	req.Header.Set("api-key", key)
	if resp, err := client(nil, 0).Do(req); err != nil {
		t.Errorf("a stream over TLS: %v", err)
	} else {
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 || !strings.HasSuffix(string(b), "data: [DONE]\n\n") {
			t.Errorf("a stream over TLS: got %d, %v, ending %q; want 200 and every event", resp.StatusCode, err, tail(string(b)))
		}
	}
	if code, body, _ := call(client(&other, 0), ""); code != 403 {
		t.Errorf("a trusted certificate naming no caller: got %d %s, want 403", code, body)
	}
	if code, _, _ := call(client(nil, 0), ""); code != 401 {
		t.Errorf("nothing presented: got %d, want 401", code)
	}
	if _, _, err := call(client(&rogue, 0), ""); err == nil {
		t.Error("a certificate from an untrusted CA was accepted")
	}
	if _, _, err := call(client(nil, tls.VersionTLS11), key); err == nil {
		t.Error("TLS 1.1 was accepted")
	}

	// The admin listener: TLS 1.3 only, /metrics behind the admin key, probes open.
	admin := client(nil, 0)
	get := func(path, bearer string) int {
		req, _ := http.NewRequest("GET", adm+path, nil)
		if bearer != "" {
			req.Header.Set("Authorization", "Bearer "+bearer)
		}
		resp, err := admin.Do(req)
		if err != nil {
			t.Fatalf("admin %s: %v", path, err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if get("/metrics", "") != 401 || get("/metrics", adminKey) != 200 || get("/healthz", "") != 200 {
		t.Error("admin: want /metrics behind the key and /healthz open")
	}
	if _, err := client(nil, tls.VersionTLS12).Get(adm + "/healthz"); err == nil {
		t.Error("the admin listener accepted TLS 1.2 with min_version 1.3")
	}

	// A renewed certificate is picked up without a restart.
	issue(serverCA, emulator.Leaf{CommonName: "gateway-v2", IPs: []net.IP{net.IPv4(127, 0, 0, 1)}}, "server")
	logs.await(t, "certificates reloaded", 1)
	conn, err := tls.Dial("tcp", strings.TrimPrefix(api, "https://"), &tls.Config{RootCAs: serverCA.Pool()})
	if err != nil {
		t.Fatal(err)
	}
	if cn := conn.ConnectionState().PeerCertificates[0].Subject.CommonName; cn != "gateway-v2" {
		t.Errorf("after renewal the listener presents %q, want gateway-v2", cn)
	}
	conn.Close()

	// A client CA withdrawn applies at once to connections made before, at their next call.
	kept := client(&batch, 0)
	if code, body, err := call(kept, ""); err != nil || code != 200 {
		t.Fatalf("batch-job before its CA is withdrawn: got %d %s %v, want 200", code, body, err)
	}
	// The API listener's reload names client-ca.pem among its files (the admin listener's does not).
	apiReloaded := `client-ca.pem"]`
	before := strings.Count(logs.String(), apiReloaded)
	writePEM("client-ca.pem", rogueCA.CertPEM())
	logs.await(t, apiReloaded, before+1)
	if code, body, err := call(kept, ""); code != 401 || !strings.Contains(body, "no longer chains") {
		t.Errorf("batch-job's kept connection once its CA is withdrawn: got %d %s %v, want 401", code, body, err)
	}
	if err := stop(); err != nil {
		t.Errorf("serve returned %v", err)
	}
}

// syncEnv is an environment tests can change while the gateway reads it.
type syncEnv struct {
	mu sync.Mutex
	m  map[string]string
}

func (e *syncEnv) get(k string) string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.m[k]
}

func (e *syncEnv) set(k, v string) {
	e.mu.Lock()
	e.m[k] = v
	e.mu.Unlock()
}

func TestServeStartsWithoutATokenAndSaysWhy(t *testing.T) {
	emu := managedIdentityEmulator(t)
	cfgPath := filepath.Join(t.TempDir(), "proxy.yaml")
	os.WriteFile(cfgPath, []byte(fmt.Sprintf(`
listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
allow_unauthenticated: true
timeouts: {shutdown_delay: 0s}
credentials:
  missing-identity: {type: managed_identity, client_id: %s}
upstreams:
  eastca: {url: %q, credential: missing-identity}
`, uuid.NewString(), emu.OpenAI.URL())), 0o600)

	out, logs, stop := start(t, env(nil), "serve", "--config", cfgPath)
	m := out.await(t, `^proxy: serving the API on (\S+), admin on (\S+)$`)
	logs.await(t, "token acquisition failed", 1) // the warm-up failed; the gateway serves anyway
	r, err := http.Get(m[2] + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(r.Body)
	r.Body.Close()
	if r.StatusCode != 503 || !strings.Contains(string(body), "credential missing-identity") || !strings.Contains(string(body), "No managed identity matches") {
		t.Errorf("readyz got %d %s, want 503 naming the credential and the reason", r.StatusCode, body)
	}
	resp := post(t, t.Context(), m[1]+"/openai/deployments/d/chat/completions?api-version=1", "", `{}`)
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 503 || !strings.Contains(string(b), "TokenUnavailable") {
		t.Errorf("a call got %d %s, want 503 TokenUnavailable", resp.StatusCode, b)
	}
	if err := stop(); err != nil {
		t.Errorf("serve returned %v, want nil", err)
	}
}

func TestServeRefusesABadConfig(t *testing.T) {
	cfgPath := filepath.Join(t.TempDir(), "proxy.yaml")
	os.WriteFile(cfgPath, []byte("upstreams: {}\n"), 0o600)
	_, errOut, err := runSync(t, "", nil, "serve", "--config", cfgPath)
	if !errors.Is(err, errReported) || !strings.Contains(errOut, "upstreams: at least one upstream is required") {
		t.Errorf("got (%q, %v), want the problems listed", errOut, err)
	}
}

func TestEmulatorCommand(t *testing.T) {
	out, _, stop := start(t, env(nil), "emulator", "--dir", t.TempDir())
	vars := map[string]string{}
	for {
		m := out.await(t, `^(?:export (\w+)=(\S+)|# (ready))$`)
		if m[3] == "ready" {
			break
		}
		vars[m[1]] = m[2]
	}
	if pem, err := os.ReadFile(vars["SSL_CERT_FILE"]); err != nil || !strings.Contains(string(pem), "BEGIN CERTIFICATE") {
		t.Errorf("SSL_CERT_FILE %q holds no certificate: %v", vars["SSL_CERT_FILE"], err)
	}
	req, _ := http.NewRequest("GET", vars["IDENTITY_ENDPOINT"]+"?api-version=2019-08-01&resource=https://cognitiveservices.azure.com", nil)
	req.Header.Set("X-IDENTITY-HEADER", vars["IDENTITY_HEADER"])
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), "access_token") {
		t.Errorf("the printed managed identity endpoint answered %d %s", resp.StatusCode, body)
	}
	if err := stop(); err != nil {
		t.Errorf("emulator returned %v, want nil", err)
	}
}

func TestDemo(t *testing.T) {
	out, _, stop := start(t, env(nil), "demo", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-format", "json")
	api := out.await(t, `^  API +(\S+)$`)[1]
	key := out.await(t, `^  Caller key (\S+)$`)[1]
	// The banner's first curl command, as a user would paste it.
	resp := post(t, t.Context(), api+"/openai/deployments/gpt-4.1-mini/chat/completions?api-version=2024-10-21", key,
		`{"messages":[{"role":"user","content":"Hello from the demo"}]}`)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), "Hello from the demo") {
		t.Errorf("got %d %s, want the emulator's answer", resp.StatusCode, body)
	}
	if err := stop(); err != nil {
		t.Errorf("demo returned %v on Ctrl-C, want nil", err)
	}
}

func TestMemoryLimit(t *testing.T) {
	if got := memoryLimit(env(nil), 1_000_000_000); got != 900_000_000 {
		t.Errorf("under a 1 GB container limit: got %d, want 90%% of it", got)
	}
	if got := memoryLimit(env(map[string]string{"GOMEMLIMIT": "2GiB"}), 1_000_000_000); got != 0 {
		t.Errorf("with GOMEMLIMIT set: got %d, want 0 (the runtime applies it)", got)
	}
	if got := memoryLimit(env(nil), 0); got != 0 {
		t.Errorf("without a container limit: got %d, want 0", got)
	}
}

// stuckWriter is a log destination that takes nothing: each Write waits until release.
type stuckWriter struct{ entered, release chan struct{} }

func (s stuckWriter) Write(p []byte) (int, error) {
	s.entered <- struct{}{}
	<-s.release
	return len(p), nil
}

// /healthz fails once the log's destination has taken nothing for the stall limit.
func TestLogStallFailsLiveness(t *testing.T) {
	dst := stuckWriter{entered: make(chan struct{}, 10), release: make(chan struct{})}
	out := logsink.New(dst, logsink.Options{FlushSize: 1, StallLimit: time.Millisecond})
	defer func() { close(dst.release); out.Stop() }()
	live := logLive(out, time.Millisecond)
	if err := live(); err != nil {
		t.Fatalf("before any write: %v", err)
	}
	out.Write([]byte("a line\n"))
	<-dst.entered
	for start := time.Now(); time.Since(start) < 10*time.Second; runtime.Gosched() {
		if err := live(); err != nil {
			if !strings.Contains(err.Error(), "log lines are being dropped") {
				t.Errorf("got %v", err)
			}
			return
		}
	}
	t.Fatal("a destination stuck for 10 s was still live")
}
