package broker

import (
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"
)

// expiryMargin is how long before ExpiresOn a token stops being handed out. Azure accepts a
// token until its exp (with some clock skew allowed), so a small margin covers the time a call
// spends reaching the upstream without throwing away minutes of a token during an Entra outage.
const expiryMargin = 30 * time.Second

// Unchanged-token retries: some fetchers sit on a cache the broker cannot bypass (the
// process-wide managed-identity cache, the Azure CLI's own cache) and answer an early refresh
// with the token already held. The broker then asks again on this schedule until a newer token
// comes back, never later than half the remaining validity.
const (
	unchangedFirstRetry = 10 * time.Second
	unchangedMaxRetry   = 5 * time.Minute
)

// Source is the token source for one (credential, scope).
type Source struct {
	b          *Broker
	credential string
	scope      string
	fetcher    Fetcher
	m          sourceMetrics

	cur     atomic.Pointer[Token]
	flight  singleflight.Group
	changed chan struct{} // signalled after every acquisition, so the refresher re-plans

	mu        sync.Mutex
	lastErr   error     // last acquisition failure; nil after a success
	lastErrAt time.Time //
	failures  int       // consecutive failures
	retryAt   time.Time // with no valid token, requests before retryAt fail fast with lastErr
	unchanged int       // consecutive acquisitions that returned no newer token
}

var _ TokenSource = (*Source)(nil)

func newSource(b *Broker, credential, scope string, f Fetcher) *Source {
	return &Source{
		b:          b,
		credential: credential,
		scope:      scope,
		fetcher:    f,
		m:          b.metrics.forSource(credential),
		changed:    make(chan struct{}, 1),
	}
}

// Credential and Scope identify the source.
func (s *Source) Credential() string { return s.credential }

// Scope is the Entra scope the source's tokens are for.
func (s *Source) Scope() string { return s.scope }

// Token returns the current token with one atomic load while it is valid. Otherwise it waits for
// an acquisition shared with every other waiter (and the refresher), unless one failed so
// recently that the back-off is still running: then it fails at once rather than add load to an
// identity provider that is down.
func (s *Source) Token(ctx context.Context) (*Token, error) {
	return s.TokenAt(ctx, time.Now())
}

// TokenAt is Token for a caller that has just read the clock: now is the time it read.
func (s *Source) TokenAt(ctx context.Context, now time.Time) (*Token, error) {
	if t := s.cur.Load(); t != nil && now.Before(t.ExpiresOn.Add(-expiryMargin)) {
		return t, nil
	}
	return s.wait(ctx)
}

func (s *Source) wait(ctx context.Context) (*Token, error) {
	s.mu.Lock()
	if s.lastErr != nil && time.Now().Before(s.retryAt) {
		err := s.lastErr
		s.mu.Unlock()
		return nil, &Error{Credential: s.credential, Scope: s.scope, Err: err}
	}
	s.mu.Unlock()

	ch := s.flight.DoChan("", func() (any, error) {
		// A request may get here just after a shared acquisition finished (it saw no token, then
		// the flight ended before it joined): the token is there, so no second fetch.
		if t := s.cur.Load(); t != nil && time.Now().Before(t.ExpiresOn.Add(-expiryMargin)) {
			return t, nil
		}
		return s.acquire()
	})
	select {
	case r := <-ch:
		if r.Err != nil {
			return nil, &Error{Credential: s.credential, Scope: s.scope, Err: r.Err}
		}
		t := r.Val.(*Token)
		if !time.Now().Before(t.ExpiresOn.Add(-expiryMargin)) {
			return nil, &Error{Credential: s.credential, Scope: s.scope, Err: errors.New("the identity provider returned a token that is about to expire")}
		}
		return t, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// acquire runs one acquisition; calls are serialised by s.flight. It returns the token the source
// holds afterwards.
func (s *Source) acquire() (*Token, error) {
	defer s.signalChanged()
	ctx, cancel := context.WithTimeout(s.b.ctx, s.b.opts.acquireTimeout())
	defer cancel()

	start := time.Now()
	got, err := s.fetcher.Fetch(ctx, s.scope)
	now := time.Now()
	s.m.duration.Observe(now.Sub(start).Seconds())
	if err == nil {
		switch {
		case got.Value == "":
			err = errors.New("the identity provider returned an empty token")
		case !got.ExpiresOn.After(now):
			err = errors.New("the identity provider returned an expired token")
		case !validTokenValue(got.Value):
			// The transport writes it into each upstream request's head as it is
			// (transport.Transport.Do): a line break would start a header of its own.
			err = errors.New("the identity provider returned a token with characters an HTTP header cannot carry")
		}
	}
	if err != nil {
		s.m.errors.Inc()
		return nil, s.fail(err, now)
	}
	s.m.successes.Inc()

	cur := s.cur.Load()
	if cur != nil && !got.ExpiresOn.After(cur.ExpiresOn) {
		// The fetcher answered from a cache of its own; keep what we hold and ask again soon.
		s.mu.Lock()
		s.unchanged++
		s.clearFailureLocked()
		s.mu.Unlock()
		s.b.log.Debug("identity provider returned the token already held; retrying later",
			zap.String("credential", s.credential), zap.String("scope", s.scope))
		return cur, nil
	}

	t := &Token{
		Value:     got.Value,
		ExpiresOn: got.ExpiresOn,
		RefreshOn: got.RefreshOn,
		acquired:  now,
		header:    []string{"Bearer " + got.Value},
	}
	s.cur.Store(t)

	s.mu.Lock()
	recovered := s.failures > 0
	s.unchanged = 0
	s.clearFailureLocked()
	s.mu.Unlock()

	fields := []zap.Field{
		zap.String("credential", s.credential), zap.String("scope", s.scope),
		zap.Time("expires_on", t.ExpiresOn), zap.Time("refresh_at", t.refreshAt()),
	}
	if recovered {
		s.b.log.Info("token acquired; source recovered", fields...)
	} else {
		s.b.log.Info("token acquired", fields...)
	}
	return t, nil
}

func (s *Source) fail(err error, now time.Time) error {
	s.mu.Lock()
	s.failures++
	s.lastErr, s.lastErrAt = err, now
	delay := s.backoffLocked(now)
	s.retryAt = now.Add(delay)
	failures := s.failures
	s.mu.Unlock()

	fields := []zap.Field{
		zap.String("credential", s.credential), zap.String("scope", s.scope),
		zap.Error(err), zap.Int("consecutive_failures", failures), zap.Duration("retry_in", delay),
	}
	if t := s.cur.Load(); t != nil && now.Before(t.ExpiresOn.Add(-expiryMargin)) {
		s.b.log.Warn("token refresh failed; still serving the current token", append(fields, zap.Time("token_expires_on", t.ExpiresOn))...)
	} else {
		s.b.log.Error("token acquisition failed; no valid token", fields...)
	}
	return err
}

func (s *Source) clearFailureLocked() {
	s.failures = 0
	s.lastErr = nil
	s.retryAt = time.Time{}
}

// backoffLocked is the delay before the next attempt after s.failures consecutive failures:
// exponential from MinBackoff to MaxBackoff with equal jitter (half fixed, half random), so
// many gateways restarted together do not retry in lockstep. While a valid token is held the
// delay also stays under half its remaining validity, so retries keep coming before it expires.
func (s *Source) backoffLocked(now time.Time) time.Duration {
	o := s.b.opts
	d := o.minBackoff() << min(s.failures-1, 30)
	if d <= 0 || d > o.maxBackoff() {
		d = o.maxBackoff()
	}
	d = d/2 + rand.N(d/2+1)
	if t := s.cur.Load(); t != nil {
		if left := t.ExpiresOn.Add(-expiryMargin).Sub(now); left > 0 && d > left/2 {
			d = max(left/2, o.minBackoff())
		}
	}
	return d
}

// refreshAt is when the token should be renewed: RefreshOn if the provider gave a usable one,
// else half-way through its lifetime, which leaves the other half to ride out an Entra outage.
// A RefreshOn is usable between a tenth of the lifetime and a tenth before the token stops
// being handed out: earlier, renewals would run nearly back to back (each one a request to
// Entra); later, calls would find the token spent and wait for Entra while it is renewed.
func (t *Token) refreshAt() time.Time {
	life := t.ExpiresOn.Sub(t.acquired)
	earliest := t.acquired.Add(life / 10)
	latest := t.ExpiresOn.Add(-expiryMargin - life/10)
	if !t.RefreshOn.IsZero() && !t.RefreshOn.Before(earliest) && !t.RefreshOn.After(latest) {
		return t.RefreshOn
	}
	return t.acquired.Add(life / 2)
}

// nextAttempt says how long the refresher sleeps before its next acquisition.
func (s *Source) nextAttempt(now time.Time) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.cur.Load()
	switch {
	case s.failures > 0:
		return s.retryAt.Sub(now)
	case t == nil:
		return 0
	case s.unchanged > 0:
		d := min(unchangedFirstRetry<<min(s.unchanged-1, 20), unchangedMaxRetry)
		if left := t.ExpiresOn.Add(-expiryMargin).Sub(now); d > left/2 {
			d = max(left/2, s.b.opts.minBackoff())
		}
		return d
	default:
		return t.refreshAt().Sub(now)
	}
}

func (s *Source) refreshLoop(ctx context.Context) {
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		timer.Reset(max(s.nextAttempt(time.Now()), 0))
		select {
		case <-ctx.Done():
			return
		case <-s.changed:
			// A request-driven acquisition changed the plan; recompute.
			continue
		case <-timer.C:
		}
		select {
		case <-ctx.Done():
			return
		case <-s.flight.DoChan("", func() (any, error) { return s.acquire() }):
		}
		// Drain the signal our own acquisition left, so it does not cause a spurious wake-up.
		select {
		case <-s.changed:
		default:
		}
	}
}

func (s *Source) signalChanged() {
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

func (s *Source) status() Status {
	st := Status{Credential: s.credential, Scope: s.scope}
	if t := s.cur.Load(); t != nil {
		st.ExpiresOn = t.ExpiresOn
		st.Ready = time.Now().Before(t.ExpiresOn.Add(-expiryMargin))
	}
	s.mu.Lock()
	if s.lastErr != nil {
		st.LastError, st.ErrorAt = s.lastErr.Error(), s.lastErrAt
	}
	s.mu.Unlock()
	if !st.Ready && st.LastError == "" {
		if st.ExpiresOn.IsZero() {
			st.LastError = "no token acquired yet"
		} else {
			st.LastError = "the token expired and no new one has been acquired yet"
		}
	}
	return st
}

// validTokenValue reports whether v is all visible ASCII (no space, no control character), as
// the access tokens of OAuth 2.0 (RFC 6750's b64token) and JWTs are.
func validTokenValue(v string) bool {
	for i := 0; i < len(v); i++ {
		if c := v[i]; c <= ' ' || c >= 0x7f {
			return false
		}
	}
	return true
}
