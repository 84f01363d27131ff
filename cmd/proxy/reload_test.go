package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/tokenproxy/tokenproxy/internal/config"
)

// callersSet records the callers a reloader puts in force.
type callersSet struct {
	mu   sync.Mutex
	last *config.Config
}

func (s *callersSet) SetCallers(c *config.Config) error {
	s.mu.Lock()
	s.last = c
	s.mu.Unlock()
	return nil
}

func TestReloadsAreOneAtATime(t *testing.T) {
	// A reload that read the files before an edit must not finish after one that read them
	// after it: it would put the older callers (a key since removed) back in force.
	dir := t.TempDir()
	path := filepath.Join(dir, "proxy.yaml")
	write := func(keyEnv string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(`
credentials: {mi: {type: managed_identity}}
upstreams: {eastca: {url: "https://eastca.openai.azure.com", credential: mi}}
callers:
  - {name: app, key_env: [`+keyEnv+`], deployments: ["*"]}
`), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	keys := map[string]string{"ENV_A": newKey(), "ENV_B": newKey()}
	var hold atomic.Bool
	entered, release := make(chan struct{}), make(chan struct{})
	getenv := func(k string) string {
		if k == "ENV_A" && hold.CompareAndSwap(true, false) {
			close(entered) // a reload is reading the files
			<-release
		}
		return keys[k]
	}
	write("ENV_A")
	cfg, err := config.Load(path, getenv)
	if err != nil {
		t.Fatal(err)
	}
	set := &callersSet{}
	r := &reloader{path: path, getenv: getenv, log: zap.NewNop(), api: set, current: cfg}
	r.register(prometheus.NewRegistry())
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()

	hold.Store(true)
	first, second := make(chan struct{}), make(chan struct{})
	go func() { r.reload(ctx, "first"); close(first) }()
	<-entered
	if r.reloading.TryLock() {
		r.reloading.Unlock()
		t.Fatal("another reload could begin while one was reading the files")
	}
	write("ENV_B")
	go func() { r.reload(ctx, "second"); close(second) }()
	close(release)
	<-first
	<-second
	if got, want := set.last.Callers[0].KeyHashes, []string{hashKey(keys["ENV_B"])}; len(got) != 1 || got[0] != want[0] {
		t.Errorf("in force after both reloads: %v, want the file's latest key %v", got, want)
	}
}

func TestSIGHUPDuringShutdownIsCaught(t *testing.T) {
	// Reloads stop as shutdown begins; SIGHUP must stay caught until serve returns, not go back
	// to its default action (ending the process, and the calls in flight) meanwhile.
	s := startServe(t, "{shutdown_delay: 1s, shutdown_grace: 5s}")
	done := make(chan error, 1)
	go func() { done <- s.stop() }()
	s.logs.await(t, "shutting down: not ready", 1)
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Errorf("serve returned %v", err)
	}
	if !strings.Contains(s.logs.String(), `"msg":"stopped"`) {
		t.Errorf("serve did not stop in order:\n%s", s.logs)
	}
}

func TestAdminRequestsAreBounded(t *testing.T) {
	// /healthz is open to all: a request that announces a body and never sends it must not hold
	// its connection (and a file descriptor the API shares) past read_header.
	s := startServe(t, "{shutdown_delay: 0s, read_header: 300ms}")
	conn, err := net.Dial("tcp", strings.TrimPrefix(s.admin, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprint(conn, "GET /healthz HTTP/1.1\r\nHost: admin\r\nContent-Length: 100\r\n\r\n")
	conn.SetReadDeadline(time.Now().Add(10 * time.Second)) // a bound, not a wait
	if _, err := io.ReadAll(conn); err != nil {
		t.Errorf("the connection is still open (%v), want it closed past read_header", err)
	}
}
