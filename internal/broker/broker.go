// Package broker owns the gateway's Entra tokens. It keeps one Source per (credential, scope),
// shared by every upstream using that pair. A Source hands the request path its current token
// with one atomic load and no network I/O while the token is valid; a background refresher
// renews it ahead of expiry (at RefreshOn when the identity provider gives one, else at half its
// lifetime) with jittered exponential back-off on failure, while the still-valid token keeps
// serving. Only when no valid token exists does a request wait, and then concurrent requests
// share one acquisition.
//
// The broker never sees how tokens are obtained: a Fetcher does that (internal/broker/entra
// adapts azidentity), so this package is tested with plain fakes.
package broker

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// Token is an access token. Sources hand out *Token values that are shared and immutable.
type Token struct {
	// Value is the raw access token. It must never be logged, not even in part.
	Value string
	// ExpiresOn is when the token stops being accepted.
	ExpiresOn time.Time
	// RefreshOn, when not zero, is when the identity provider suggests renewing the token
	// (Entra's refresh_in; MSAL's half-life for long-lived managed-identity tokens).
	RefreshOn time.Time

	acquired time.Time
	header   []string
}

// AuthorizationHeader returns the Authorization header values for the token, built once when
// the token was acquired so the request path does not build a 2 KB string per call. The slice is
// shared: callers may put it in a header map but must not modify it.
func (t *Token) AuthorizationHeader() []string { return t.header }

// Fetcher acquires a new token for scope. Implementations must honour ctx and return errors that
// explain the failure in operator terms without secrets (the broker logs them and exposes them
// on /readyz and in 503 bodies).
type Fetcher interface {
	Fetch(ctx context.Context, scope string) (Token, error)
}

// TokenSource gives the request path a valid token.
type TokenSource interface {
	// TokenAt returns the token to use at now, a time the caller has just read (the request
	// path reads the clock once for several uses). It waits only when no valid token is held.
	TokenAt(ctx context.Context, now time.Time) (*Token, error)
}

// ErrNoToken is wrapped by every error Token and TokenAt return when no valid token could be
// had; the proxy maps it to 503 TokenUnavailable.
var ErrNoToken = errors.New("no valid token")

// Error explains why a Source has no token.
type Error struct {
	Credential, Scope string
	// Err is the cause: the last acquisition's error.
	Err error
}

func (e *Error) Error() string {
	return fmt.Sprintf("credential %q holds no valid token for %s: %v", e.Credential, e.Scope, e.Err)
}

// Unwrap returns ErrNoToken and the cause, so errors.Is works for both.
func (e *Error) Unwrap() []error { return []error{ErrNoToken, e.Err} }

// Options configure a Broker.
type Options struct {
	// Fetchers maps credential names to how their tokens are acquired. Required.
	Fetchers map[string]Fetcher
	// Logger receives acquisition and failure events. If nil, nothing is logged.
	Logger *zap.Logger
	// Registerer receives the broker's metrics. If nil, metrics are not registered.
	Registerer prometheus.Registerer
	// AcquireTimeout bounds one acquisition. If zero, 30s is used.
	AcquireTimeout time.Duration
	// MinBackoff and MaxBackoff bound the jittered exponential back-off after failed
	// acquisitions. If zero, 1s and 1m are used.
	MinBackoff, MaxBackoff time.Duration
}

func (o Options) logger() *zap.Logger {
	if o.Logger == nil {
		return zap.NewNop()
	}
	return o.Logger
}

func (o Options) acquireTimeout() time.Duration {
	if o.AcquireTimeout <= 0 {
		return 30 * time.Second
	}
	return o.AcquireTimeout
}

func (o Options) minBackoff() time.Duration {
	if o.MinBackoff <= 0 {
		return time.Second
	}
	return o.MinBackoff
}

func (o Options) maxBackoff() time.Duration {
	if o.MaxBackoff <= 0 {
		return time.Minute
	}
	return max(o.MaxBackoff, o.minBackoff())
}

// Broker holds the token sources.
type Broker struct {
	opts    Options
	log     *zap.Logger
	metrics *metrics

	// ctx bounds acquisitions; it is cancelled when Run returns, so a shutdown does not wait
	// on Entra. Acquisitions never use a caller's context: one caller leaving must not fail
	// the acquisition others share.
	ctx    context.Context
	cancel context.CancelFunc

	mu      sync.Mutex
	sources map[sourceKey]*Source
	running bool
}

type sourceKey struct{ credential, scope string }

// New returns a Broker with no sources yet.
func New(opts Options) (*Broker, error) {
	if opts.Fetchers == nil {
		return nil, errors.New("broker: Options.Fetchers is required")
	}
	ctx, cancel := context.WithCancel(context.Background())
	b := &Broker{
		opts:    opts,
		log:     opts.logger(),
		ctx:     ctx,
		cancel:  cancel,
		sources: map[sourceKey]*Source{},
	}
	b.metrics = newMetrics(b)
	if opts.Registerer != nil {
		if err := b.metrics.register(opts.Registerer); err != nil {
			return nil, fmt.Errorf("registering broker metrics: %w", err)
		}
	}
	return b, nil
}

// Source returns the token source for (credential, scope), creating it on first use. Every
// caller asking for the same pair shares one Source. Sources must be created before Run.
func (b *Broker) Source(credential, scope string) (*Source, error) {
	f, ok := b.opts.Fetchers[credential]
	if !ok {
		return nil, fmt.Errorf("broker: unknown credential %q", credential)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.running {
		return nil, errors.New("broker: sources must be created before Run")
	}
	k := sourceKey{credential, scope}
	if s, ok := b.sources[k]; ok {
		return s, nil
	}
	s := newSource(b, credential, scope, f)
	b.sources[k] = s
	return s, nil
}

// Run warms every source and keeps them refreshed until ctx is done. Warming failures are not
// fatal: the source stays not ready, requests get 503 with the reason, and the refresher keeps
// retrying with back-off.
func (b *Broker) Run(ctx context.Context) error {
	b.mu.Lock()
	b.running = true
	srcs := b.sortedSources()
	b.mu.Unlock()
	defer b.cancel()

	var wg sync.WaitGroup
	for _, s := range srcs {
		wg.Go(func() { s.refreshLoop(ctx) })
	}
	wg.Wait()
	return nil
}

// Close cancels acquisitions in progress and any to come; Run does it on return. A broker that
// never ran (tests) must be closed.
func (b *Broker) Close() { b.cancel() }

// Status is a source's state, for /readyz and operators.
type Status struct {
	Credential string    `json:"credential"`
	Scope      string    `json:"scope"`
	Ready      bool      `json:"ready"`
	ExpiresOn  time.Time `json:"expires_on,omitzero"`
	LastError  string    `json:"last_error,omitempty"`
	ErrorAt    time.Time `json:"last_error_at,omitzero"`
}

// Status reports every source, sorted by credential and scope.
func (b *Broker) Status() []Status {
	b.mu.Lock()
	srcs := b.sortedSources()
	b.mu.Unlock()
	out := make([]Status, len(srcs))
	for i, s := range srcs {
		out[i] = s.status()
	}
	return out
}

func (b *Broker) sortedSources() []*Source {
	srcs := make([]*Source, 0, len(b.sources))
	for _, s := range b.sources {
		srcs = append(srcs, s)
	}
	sort.Slice(srcs, func(i, j int) bool {
		if srcs[i].credential != srcs[j].credential {
			return srcs[i].credential < srcs[j].credential
		}
		return srcs[i].scope < srcs[j].scope
	})
	return srcs
}
