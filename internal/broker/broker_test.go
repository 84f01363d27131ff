package broker

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

const scope = "https://cognitiveservices.azure.com/.default"

// fakeFetcher issues numbered tokens. It is driven by the test through its fields.
type fakeFetcher struct {
	lifetime  time.Duration // of each token
	refreshIn time.Duration // if non-zero, sets RefreshOn
	latency   time.Duration // each fetch takes this long (fake time under synctest)
	gate      chan struct{} // if non-nil, each fetch waits for a receive from it

	mu    sync.Mutex
	calls []time.Time
	fail  func(n int) error // n counts calls from 1; nil error means success
	same  func(n int) bool  // true: return the previous token again (a fetcher-side cache hit)
	last  Token
}

func (f *fakeFetcher) Fetch(ctx context.Context, _ string) (Token, error) {
	f.mu.Lock()
	f.calls = append(f.calls, time.Now())
	n := len(f.calls)
	fail, same := f.fail, f.same
	f.mu.Unlock()
	if f.gate != nil {
		select {
		case <-f.gate:
		case <-ctx.Done():
			return Token{}, ctx.Err()
		}
	}
	if f.latency > 0 {
		time.Sleep(f.latency)
	}
	if fail != nil {
		if err := fail(n); err != nil {
			return Token{}, err
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if same != nil && same(n) && f.last.Value != "" {
		return f.last, nil
	}
	now := time.Now()
	t := Token{Value: fmt.Sprintf("token-%d", n), ExpiresOn: now.Add(f.lifetime)}
	if f.refreshIn > 0 {
		t.RefreshOn = now.Add(f.refreshIn)
	}
	f.last = t
	return t, nil
}

func (f *fakeFetcher) callTimes() []time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]time.Time(nil), f.calls...)
}

func (f *fakeFetcher) setFail(fn func(n int) error) {
	f.mu.Lock()
	f.fail = fn
	f.mu.Unlock()
}

func newBroker(t *testing.T, f Fetcher, opts Options) (*Broker, *Source) {
	t.Helper()
	opts.Fetchers = map[string]Fetcher{"corp-app": f}
	b, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	s, err := b.Source("corp-app", scope)
	if err != nil {
		t.Fatal(err)
	}
	return b, s
}

// run starts the broker and returns a function that stops it and waits for it.
func run(b *Broker) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { b.Run(ctx); close(done) }()
	return func() { cancel(); <-done }
}

// tokenNow calls Token and reports how much (fake) time it took: zero means it did not wait.
func tokenNow(t *testing.T, s *Source) (*Token, time.Duration, error) {
	t.Helper()
	start := time.Now()
	tok, err := s.Token(context.Background())
	return tok, time.Since(start), err
}

func TestConcurrentColdRequestsShareOneAcquisition(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeFetcher{lifetime: time.Hour, gate: make(chan struct{})}
		_, s := newBroker(t, f, Options{})

		const n = 200
		results := make(chan *Token, n)
		for range n {
			go func() {
				tok, err := s.Token(context.Background())
				if err != nil {
					t.Errorf("Token: %v", err)
				}
				results <- tok
			}()
		}
		synctest.Wait() // all 200 are blocked on the one acquisition
		if got := len(f.callTimes()); got != 1 {
			t.Fatalf("got %d fetches in flight, want 1", got)
		}
		f.gate <- struct{}{}
		for range n {
			if tok := <-results; tok == nil || tok.Value != "token-1" {
				t.Fatalf("got token %v, want token-1", tok)
			}
		}
		if got := len(f.callTimes()); got != 1 {
			t.Errorf("got %d token requests for %d concurrent cold calls, want exactly 1", got, n)
		}
	})
}

func TestLateWaiterDoesNotStartASecondAcquisition(t *testing.T) {
	// A request that found no token just before a shared acquisition finished enters wait when
	// the token is already there: it must take it, not fetch another.
	f := &fakeFetcher{lifetime: time.Hour}
	_, s := newBroker(t, f, Options{})
	if _, err := s.Token(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := s.wait(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := len(f.callTimes()); n != 1 {
		t.Errorf("got %d acquisitions, want 1: a late waiter fetched a second token", n)
	}
}

func TestRefreshesBeforeExpiryWithoutRequestsWaiting(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeFetcher{lifetime: time.Hour, latency: 5 * time.Second}
		b, s := newBroker(t, f, Options{})
		stop := run(b)
		defer stop()

		time.Sleep(6 * time.Second) // warm-up acquisition done
		prev, _, err := tokenNow(t, s)
		if err != nil {
			t.Fatalf("Token after warm-up: %v", err)
		}
		// Call every 20s for 5 hours: no call may wait, and the token handed out is always valid.
		for i := 0; i < 5*180; i++ {
			time.Sleep(20 * time.Second)
			tok, waited, err := tokenNow(t, s)
			if err != nil {
				t.Fatalf("at %v: Token: %v", time.Now(), err)
			}
			if waited != 0 {
				t.Fatalf("at %v: a request waited %v for a token", time.Now(), waited)
			}
			if !time.Now().Before(tok.ExpiresOn) {
				t.Fatalf("at %v: got a token that expired at %v", time.Now(), tok.ExpiresOn)
			}
			if tok != prev {
				// Renewed: it must have happened at half-life, well before the old token expired.
				if left := prev.ExpiresOn.Sub(tok.acquired); left < 29*time.Minute {
					t.Errorf("token renewed only %v before the old one expired, want about 30m", left)
				}
				prev = tok
			}
		}
		if got := len(f.callTimes()); got < 10 || got > 12 {
			t.Errorf("got %d acquisitions over 5h of 1h tokens, want 10 to 12 (one per half-life)", got)
		}
	})
}

func TestRefreshHonoursRefreshOn(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeFetcher{lifetime: time.Hour, refreshIn: 10 * time.Minute}
		b, _ := newBroker(t, f, Options{})
		stop := run(b)
		start := time.Now()
		time.Sleep(25 * time.Minute)
		stop()
		calls := f.callTimes()
		want := []time.Duration{0, 10 * time.Minute, 20 * time.Minute}
		if len(calls) != len(want) {
			t.Fatalf("got %d acquisitions in 25m, want %d", len(calls), len(want))
		}
		for i, c := range calls {
			if got := c.Sub(start); got != want[i] {
				t.Errorf("acquisition %d at +%v, want +%v", i, got, want[i])
			}
		}
	})
}

// A RefreshOn the broker cannot use is not taken: one close to the expiry would leave calls to
// find the token spent and wait for Entra, one a moment away would renew back to back.
func TestUnusableRefreshOnIsNotTaken(t *testing.T) {
	t.Run("too late", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			f := &fakeFetcher{lifetime: time.Hour, refreshIn: time.Hour - 10*time.Second, latency: 5 * time.Second}
			b, s := newBroker(t, f, Options{})
			stop := run(b)
			defer stop()
			if _, _, err := tokenNow(t, s); err != nil { // cold: this one waits for Entra
				t.Fatal(err)
			}
			start := time.Now()
			for time.Since(start) < 3*time.Hour {
				if _, waited, err := tokenNow(t, s); err != nil || waited != 0 {
					t.Fatalf("at +%v: a warm call waited %v (%v)", time.Since(start), waited, err)
				}
				time.Sleep(20 * time.Second)
			}
		})
	})
	t.Run("too soon", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			f := &fakeFetcher{lifetime: time.Hour, refreshIn: time.Second}
			b, _ := newBroker(t, f, Options{})
			stop := run(b)
			time.Sleep(time.Hour)
			stop()
			if n := len(f.callTimes()); n > 3 {
				t.Errorf("%d acquisitions in an hour of 1h tokens, want at most 3 (one per half-life)", n)
			}
		})
	})
}

func TestEntraFailureDuringRefreshKeepsServing(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeFetcher{lifetime: time.Hour}
		core, logs := observer.New(zap.DebugLevel)
		b, s := newBroker(t, f, Options{Logger: zap.New(core)})
		stop := run(b)
		defer stop()

		synctest.Wait()
		first, _, err := tokenNow(t, s)
		if err != nil {
			t.Fatal(err)
		}
		// Entra goes down for good right after the first token.
		entraDown := errors.New("AADSTS90033: the service is temporarily unavailable")
		f.setFail(func(int) error { return entraDown })

		// Every request until the token's last 30s gets it, without waiting.
		for time.Now().Before(first.ExpiresOn.Add(-expiryMargin - time.Second)) {
			tok, waited, err := tokenNow(t, s)
			if err != nil || waited != 0 || tok != first {
				t.Fatalf("at %v: got (%v, waited %v, %v), want the held token at once", time.Now(), tok, waited, err)
			}
			time.Sleep(10 * time.Second)
		}
		if n := len(f.callTimes()); n < 8 || n > 80 {
			t.Errorf("got %d acquisition attempts while Entra was down for 1h, want retries with back-off (8 to 80)", n)
		}
		if logs.FilterMessage("token refresh failed; still serving the current token").Len() == 0 {
			t.Error("no warning logged for the failed refresh")
		}

		// Past expiry the request fails fast with the reason, without waiting on Entra.
		time.Sleep(time.Minute)
		_, waited, err := tokenNow(t, s)
		if !errors.Is(err, ErrNoToken) || !errors.Is(err, entraDown) {
			t.Fatalf("got error %v, want ErrNoToken wrapping the Entra error", err)
		}
		if want := `credential "corp-app" holds no valid token for ` + scope + `: AADSTS90033`; !strings.Contains(err.Error(), want) {
			t.Errorf("got error %q, want it to contain %q", err, want)
		}
		if waited != 0 {
			t.Errorf("a request waited %v during back-off, want an immediate failure", waited)
		}
		st := b.Status()[0]
		if st.Ready || !strings.Contains(st.LastError, "AADSTS90033") {
			t.Errorf("got status %+v, want not ready with the Entra error", st)
		}

		// Entra recovers: the next retry (at most MaxBackoff away) restores service by itself.
		f.setFail(nil)
		time.Sleep(time.Minute + time.Second)
		tok, _, err := tokenNow(t, s)
		if err != nil || tok == first {
			t.Fatalf("after recovery got (%v, %v), want a new token", tok, err)
		}
		if !b.Status()[0].Ready {
			t.Error("source not ready after recovery")
		}
		if logs.FilterMessage("token acquired; source recovered").Len() != 1 {
			t.Error("recovery was not logged")
		}
	})
}

func TestFailFastDuringBackoffDoesNotMultiplyLoad(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeFetcher{lifetime: time.Hour}
		f.setFail(func(int) error { return errors.New("AADSTS7000215: invalid client secret") })
		_, s := newBroker(t, f, Options{MinBackoff: time.Second, MaxBackoff: time.Minute})

		if _, err := s.Token(context.Background()); err == nil {
			t.Fatal("Token succeeded with a failing fetcher")
		}
		for range 1000 {
			if _, err := s.Token(context.Background()); !errors.Is(err, ErrNoToken) {
				t.Fatalf("got %v, want ErrNoToken", err)
			}
		}
		if n := len(f.callTimes()); n != 1 {
			t.Errorf("1001 requests during back-off made %d token requests, want 1", n)
		}
		time.Sleep(2 * time.Second) // past the first back-off (at most MinBackoff)
		s.Token(context.Background())
		if n := len(f.callTimes()); n != 2 {
			t.Errorf("after back-off got %d token requests, want 2", n)
		}
	})
}

func TestUnchangedTokenIsRetriedSoonNotInALoop(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// A fetcher with its own cache (managed identity, Azure CLI) returns the held token
		// until 5 minutes before expiry.
		f := &fakeFetcher{lifetime: time.Hour}
		f.same = func(int) bool { // called by Fetch with f.mu held
			return time.Now().Before(f.last.ExpiresOn.Add(-5 * time.Minute))
		}
		b, s := newBroker(t, f, Options{})
		stop := run(b)
		defer stop()
		synctest.Wait()
		first, _, _ := tokenNow(t, s)

		time.Sleep(58 * time.Minute)
		tok, waited, err := tokenNow(t, s)
		if err != nil || waited != 0 {
			t.Fatalf("got (%v, waited %v), want a token at once", err, waited)
		}
		if tok == first {
			t.Fatalf("token not renewed by 58m of a 60m token")
		}
		// Half-life at 30m, then retries at 10s, 20s, ... capped at 5m, then within the last 5m.
		if n := len(f.callTimes()); n > 15 {
			t.Errorf("got %d acquisitions, want a handful (no hot loop on an unchanged token)", n)
		}
	})
}

func TestFetcherThatNeverRenewsIsNotPolledInALoop(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeFetcher{lifetime: time.Hour}
		f.same = func(int) bool { return true } // a stuck cache: always the first token
		core, logs := observer.New(zap.InfoLevel)
		b, s := newBroker(t, f, Options{Logger: zap.New(core)})
		stop := run(b)
		defer stop()
		synctest.Wait()

		time.Sleep(59*time.Minute + 45*time.Second)
		if n := len(f.callTimes()); n > 40 {
			t.Errorf("got %d acquisitions of a token that never changes, want a bounded number (<= 40)", n)
		}
		if n := logs.FilterMessage("token acquired").Len(); n != 1 {
			t.Errorf("logged %d acquisitions, want 1: an unchanged token is not a new one", n)
		}
		if _, err := s.Token(context.Background()); !errors.Is(err, ErrNoToken) {
			t.Errorf("got %v past the token's validity, want ErrNoToken", err)
		}
	})
}

func TestWaiterCancelDoesNotCancelSharedAcquisition(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeFetcher{lifetime: time.Hour, gate: make(chan struct{})}
		_, s := newBroker(t, f, Options{})

		ctx, cancel := context.WithCancel(context.Background())
		errc := make(chan error)
		go func() { _, err := s.Token(ctx); errc <- err }()
		other := make(chan *Token)
		go func() { tok, _ := s.Token(context.Background()); other <- tok }()
		synctest.Wait()
		cancel()
		if err := <-errc; !errors.Is(err, context.Canceled) {
			t.Fatalf("got %v, want context.Canceled for the cancelled waiter", err)
		}
		f.gate <- struct{}{}
		if tok := <-other; tok == nil {
			t.Fatal("the other waiter got no token: the shared acquisition was cancelled")
		}
	})
}

func TestAcquisitionTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeFetcher{lifetime: time.Hour, gate: make(chan struct{})}
		_, s := newBroker(t, f, Options{AcquireTimeout: 3 * time.Second})
		_, waited, err := tokenNow(t, s)
		if !errors.Is(err, context.DeadlineExceeded) || waited != 3*time.Second {
			t.Errorf("got (%v after %v), want DeadlineExceeded after 3s", err, waited)
		}
	})
}

func TestBadTokensAreRejected(t *testing.T) {
	for _, tt := range []struct {
		name string
		tok  Token
		want string
	}{
		{"empty", Token{ExpiresOn: time.Now().Add(time.Hour)}, "empty token"},
		{"expired", Token{Value: "x", ExpiresOn: time.Now().Add(-time.Second)}, "expired token"},
		{"nearly expired", Token{Value: "x", ExpiresOn: time.Now().Add(10 * time.Second)}, "about to expire"},
		// The transport writes the token into the upstream request's head as it is.
		{"line break", Token{Value: "eyJ0.e30.sig\r\nX-Injected: 1", ExpiresOn: time.Now().Add(time.Hour)}, "cannot carry"},
		{"bare LF", Token{Value: "eyJ0.e30\nsig", ExpiresOn: time.Now().Add(time.Hour)}, "cannot carry"},
		{"space", Token{Value: "eyJ0.e30 sig", ExpiresOn: time.Now().Add(time.Hour)}, "cannot carry"},
		{"NUL", Token{Value: "eyJ0.e30\x00sig", ExpiresOn: time.Now().Add(time.Hour)}, "cannot carry"},
		{"not ASCII", Token{Value: "eyJ0.e30.sïg", ExpiresOn: time.Now().Add(time.Hour)}, "cannot carry"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, s := newBroker(t, fetchFunc(func(context.Context, string) (Token, error) { return tt.tok, nil }), Options{})
			_, err := s.Token(context.Background())
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("got %v, want an error containing %q", err, tt.want)
			}
			if err != nil && len(tt.tok.Value) > 8 && strings.Contains(err.Error(), tt.tok.Value) {
				t.Errorf("the error %q shows the token", err)
			}
		})
	}
}

type fetchFunc func(context.Context, string) (Token, error)

func (f fetchFunc) Fetch(ctx context.Context, scope string) (Token, error) { return f(ctx, scope) }

func TestSourcesAreSharedPerCredentialAndScope(t *testing.T) {
	f := &fakeFetcher{lifetime: time.Hour}
	b, err := New(Options{Fetchers: map[string]Fetcher{"a": f, "b": f}})
	if err != nil {
		t.Fatal(err)
	}
	a1, _ := b.Source("a", scope)
	a2, _ := b.Source("a", scope)
	a3, _ := b.Source("a", "https://ai.azure.com/.default")
	b1, _ := b.Source("b", scope)
	if a1 != a2 || a1 == a3 || a1 == b1 {
		t.Error("sources are not one per (credential, scope)")
	}
	if _, err := b.Source("nope", scope); err == nil {
		t.Error("Source accepted an unknown credential")
	}
}

func TestMetrics(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// synctest's clock starts at 2000-01-01T00:00:00Z, so timestamps are stable.
		f := &fakeFetcher{lifetime: time.Hour, latency: 200 * time.Millisecond}
		reg := prometheus.NewPedanticRegistry()
		_, s := newBroker(t, f, Options{Registerer: reg})
		if _, err := s.Token(context.Background()); err != nil {
			t.Fatal(err)
		}
		time.Sleep(59*time.Minute + 40*time.Second) // past the 30s expiry margin
		f.setFail(func(int) error { return errors.New("AADSTS90033") })
		s.Token(context.Background())

		err := testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP tokenproxy_token_expiry_timestamp_seconds When the token currently held expires (unix seconds).
# TYPE tokenproxy_token_expiry_timestamp_seconds gauge
tokenproxy_token_expiry_timestamp_seconds{credential="corp-app",scope="https://cognitiveservices.azure.com/.default"} 9.466884002e+08
# HELP tokenproxy_token_last_error_timestamp_seconds When the last failed acquisition happened (unix seconds); absent while the source is healthy.
# TYPE tokenproxy_token_last_error_timestamp_seconds gauge
tokenproxy_token_last_error_timestamp_seconds{credential="corp-app",scope="https://cognitiveservices.azure.com/.default"} 9.466883804e+08
# HELP tokenproxy_token_ready 1 when the source holds a valid token, else 0.
# TYPE tokenproxy_token_ready gauge
tokenproxy_token_ready{credential="corp-app",scope="https://cognitiveservices.azure.com/.default"} 0
# HELP tokenproxy_token_requests_total Token acquisitions from the identity provider, by credential and result (success, error).
# TYPE tokenproxy_token_requests_total counter
tokenproxy_token_requests_total{credential="corp-app",result="error"} 1
tokenproxy_token_requests_total{credential="corp-app",result="success"} 1
`), "tokenproxy_token_expiry_timestamp_seconds", "tokenproxy_token_last_error_timestamp_seconds",
			"tokenproxy_token_ready", "tokenproxy_token_requests_total")
		if err != nil {
			t.Error(err)
		}
		if n := testutil.CollectAndCount(reg, "tokenproxy_token_request_duration_seconds"); n != 1 {
			t.Errorf("got %d duration series, want 1", n)
		}
	})
}

func TestTokenFastPathDoesNotAllocate(t *testing.T) {
	_, s := newBroker(t, &fakeFetcher{lifetime: time.Hour}, Options{})
	ctx := context.Background()
	if _, err := s.Token(ctx); err != nil {
		t.Fatal(err)
	}
	if n := testing.AllocsPerRun(1000, func() { s.Token(ctx) }); n != 0 {
		t.Errorf("got %v allocations per Token call on a warm source, want 0", n)
	}
}

func BenchmarkSourceToken(b *testing.B) {
	br, err := New(Options{Fetchers: map[string]Fetcher{"a": &fakeFetcher{lifetime: time.Hour}}})
	if err != nil {
		b.Fatal(err)
	}
	s, _ := br.Source("a", scope)
	ctx := context.Background()
	if _, err := s.Token(ctx); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := s.Token(ctx); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// TestTokenAt: TokenAt hands out the token it holds while it is valid at the time its caller
// read. At a time past the token's margin it asks its own clock, as Token does, and acquires
// afresh only if the token is due by that.
func TestTokenAt(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeFetcher{lifetime: time.Hour}
		_, s := newBroker(t, f, Options{})
		first, err := s.TokenAt(context.Background(), time.Now())
		if err != nil {
			t.Fatal(err)
		}
		if tok, err := s.TokenAt(context.Background(), time.Now()); err != nil || tok != first {
			t.Fatalf("got %v, %v; want the token held", tok, err)
		}
		// A time given past the margin: the source's own clock says the token is good.
		if tok, err := s.TokenAt(context.Background(), first.ExpiresOn); err != nil || tok != first {
			t.Fatalf("got %v, %v; want the token held", tok, err)
		}
		if n := len(f.callTimes()); n != 1 {
			t.Fatalf("%d acquisitions, want 1", n)
		}
		// Once it is due by the clock too, a new one is acquired.
		time.Sleep(time.Until(first.ExpiresOn.Add(-expiryMargin)))
		tok, err := s.TokenAt(context.Background(), time.Now())
		if err != nil {
			t.Fatal(err)
		}
		if n := len(f.callTimes()); n != 2 || tok == first {
			t.Fatalf("%d acquisitions, token %q; want a second acquisition and its token", n, tok.Value)
		}
	})
}
