// Package backend keeps the health of the places a deployment can be served from and picks
// where each attempt of a call goes. A backend is one deployment on one upstream; its state is
// shared by every exposed deployment that lists it, because Azure's rate limits and outages
// belong to the deployment and resource, not to the name a caller used.
//
// A backend that answers 429 rests for as long as its Retry-After asks. One that keeps failing
// (5xx, 408, connection failures) opens its circuit: no calls for a while, then one probe,
// whose outcome closes the circuit or opens it again for twice as long. Selection takes the
// lowest priority with an eligible member and spreads calls by weight within it. A pool-wide
// retry budget keeps retries to a fraction of calls, so a failing region cannot multiply load.
package backend

import (
	"math"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Options configure a Registry.
type Options struct {
	// BreakerFailures consecutive failures open a circuit. If zero, 5.
	BreakerFailures int
	// BreakerOpen is how long a circuit first stays open. If zero, 30s.
	BreakerOpen time.Duration
	// DefaultCooldown rests a backend that answered 429 without a Retry-After. If zero, 10s.
	DefaultCooldown time.Duration
	// MaxCooldown caps the rest a Retry-After may ask for. If zero, an hour.
	MaxCooldown time.Duration
	// Now is the clock. If nil, time.Now.
	Now func() time.Time
}

func (o Options) now() time.Time {
	if o.Now == nil {
		return time.Now()
	}
	return o.Now()
}

// maxOpenDoublings caps how far a failed probe stretches the open period.
const maxOpenDoublings = 10

// State is a backend's health.
type State int

// States, as reported in metrics.
const (
	Healthy  State = iota // takes calls
	Cooldown              // rate-limited: resting until Retry-After
	Open                  // circuit open after repeated failures
	HalfOpen              // open period over: one probe call allowed
)

func (s State) String() string {
	return [...]string{"healthy", "cooldown", "open", "half_open"}[s]
}

// Backend is one deployment on one upstream.
type Backend struct {
	// Key is "upstream/deployment", its name in logs and metrics.
	Key        string
	Upstream   string
	Deployment string

	opts *Options

	// quiet is set while there is nothing to record and nothing to check: no failure counted,
	// no rate limit, circuit closed, no probe. Every call reads the state and records its
	// outcome, and a quiet backend's are read without the lock (the lock is for its changes),
	// so calls on different cores do not take turns at it.
	quiet atomic.Bool

	mu            sync.Mutex
	failures      int       // consecutive
	cooldownUntil time.Time // rate-limited until then
	openUntil     time.Time // circuit open until then
	opens         int       // consecutive openings, for the doubling
	probing       bool      // a half-open probe is under way
	cooldownTotal time.Duration
}

// Registry holds every backend, one per (upstream, deployment).
type Registry struct {
	opts     Options
	mu       sync.Mutex
	backends map[string]*Backend
}

// NewRegistry returns an empty registry.
func NewRegistry(opts Options) *Registry {
	if opts.BreakerFailures <= 0 {
		opts.BreakerFailures = 5
	}
	if opts.BreakerOpen <= 0 {
		opts.BreakerOpen = 30 * time.Second
	}
	if opts.DefaultCooldown <= 0 {
		opts.DefaultCooldown = 10 * time.Second
	}
	if opts.MaxCooldown <= 0 {
		opts.MaxCooldown = time.Hour
	}
	return &Registry{opts: opts, backends: map[string]*Backend{}}
}

// Backend returns the backend for (upstream, deployment), creating it on first use.
func (r *Registry) Backend(upstream, deployment string) *Backend {
	key := upstream + "/" + deployment
	r.mu.Lock()
	defer r.mu.Unlock()
	if b, ok := r.backends[key]; ok {
		return b
	}
	b := &Backend{Key: key, Upstream: upstream, Deployment: deployment, opts: &r.opts}
	b.quiet.Store(true)
	r.backends[key] = b
	return b
}

// All returns every backend.
func (r *Registry) All() []*Backend {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]*Backend, 0, len(r.backends))
	for _, b := range r.backends {
		out = append(out, b)
	}
	return out
}

// State reports the backend's state now.
func (b *Backend) State() State { return b.stateAt(b.opts.now()) }

func (b *Backend) stateAt(now time.Time) State {
	if b.quiet.Load() {
		return Healthy
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.settleLocked(now)
	return b.stateLocked(now)
}

// settleLocked forgets a rate limit that has run out, and records whether the backend is
// quiet. Every change of its state ends with it. A zero now forgets nothing.
func (b *Backend) settleLocked(now time.Time) {
	if !b.cooldownUntil.IsZero() && !now.IsZero() && !now.Before(b.cooldownUntil) {
		b.cooldownUntil = time.Time{} // everything that reads it counts a past one as none
	}
	b.quiet.Store(b.failures == 0 && b.opens == 0 && !b.probing && b.openUntil.IsZero() && b.cooldownUntil.IsZero())
}

// eligible reports whether the backend may be picked now: not open, not cooling down. now is
// the pick's clock reading, read at the first backend that is not quiet.
func (b *Backend) eligible(now *time.Time) bool {
	if b.quiet.Load() {
		return true
	}
	s := b.stateAt(b.at(now))
	return s != Open && s != Cooldown
}

// at returns *now, reading the clock into it first if it has not been read.
func (b *Backend) at(now *time.Time) time.Time {
	if now.IsZero() {
		*now = b.opts.now()
	}
	return *now
}

func (b *Backend) stateLocked(now time.Time) State {
	switch {
	case now.Before(b.openUntil):
		return Open
	case now.Before(b.cooldownUntil): // a probe waits for the rest a 429 asked for
		return Cooldown
	case !b.openUntil.IsZero():
		return HalfOpen
	}
	return Healthy
}

// CooldownSeconds is the total time the backend has spent rate-limited.
func (b *Backend) CooldownSeconds() float64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	total := b.cooldownTotal
	if now := b.opts.now(); now.Before(b.cooldownUntil) {
		total -= b.cooldownUntil.Sub(now) // not spent yet
	}
	return total.Seconds()
}

// take reserves the backend for an attempt if it is eligible now, and says whether the
// reservation is the half-open backend's probe, of which there is one at a time.
func (b *Backend) take(clock *time.Time) (ok, probe bool) {
	if b.quiet.Load() {
		return true, false
	}
	now := b.at(clock)
	b.mu.Lock()
	defer b.mu.Unlock()
	defer b.settleLocked(now)
	switch b.stateLocked(now) {
	case Healthy:
		return true, false
	case HalfOpen:
		if b.probing {
			return false, false
		}
		b.probing = true
		return true, true
	}
	return false, false
}

// recovery is when the backend will next take a call, and whether it is resting from a rate
// limit (rather than a failure).
func (b *Backend) recovery(now time.Time) (time.Time, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch b.stateLocked(now) {
	case Open:
		return b.openUntil, false
	case Cooldown:
		return b.cooldownUntil, true
	case HalfOpen:
		// A probe is under way; its outcome decides. Suggest a short wait.
		return now.Add(time.Second), false
	}
	return now, false
}

// Succeeded records an attempt that got an answer (any status but the failover ones).
func (b *Backend) Succeeded() {
	if b.quiet.Load() {
		return // nothing to reset
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.failures, b.opens, b.probing = 0, 0, false
	b.openUntil = time.Time{}
	b.settleLocked(time.Time{})
}

// Failed records a failed attempt (5xx, 408, connection failure, timeout); probe says whether
// it was the half-open backend's probe (Pick).
func (b *Backend) Failed(probe bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := b.opts.now()
	isProbe := probe && b.probing // not if a success has closed the circuit meanwhile
	if !b.openUntil.IsZero() && !isProbe {
		// The circuit is open, or half-open and the probe decides: this is a call sent
		// before it opened, whose failure says nothing new. Counted, a burst of them would
		// open it again, for twice as long each time.
		return
	}
	b.probing = false
	b.failures++
	if isProbe || b.failures >= b.opts.BreakerFailures {
		open := b.opts.BreakerOpen << min(b.opens, maxOpenDoublings)
		b.openUntil = now.Add(open)
		b.opens++
		b.failures = 0
	}
	b.settleLocked(now)
}

// RateLimited records a 429 asking to retry after d (zero: not said).
func (b *Backend) RateLimited(d time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := b.opts.now()
	if d <= 0 {
		d = b.opts.DefaultCooldown
	}
	d = min(d, b.opts.MaxCooldown)
	until := now.Add(d)
	if until.After(b.cooldownUntil) {
		if now.Before(b.cooldownUntil) {
			b.cooldownTotal += until.Sub(b.cooldownUntil)
		} else {
			b.cooldownTotal += d
		}
		b.cooldownUntil = until
	}
	// A rate limit is not a failure: the backend answered, and the circuit is not involved.
	if b.probing {
		b.probing = false
		b.openUntil, b.opens = time.Time{}, 0
	}
	b.settleLocked(now)
}

// Abandoned releases a reservation whose attempt ended without an outcome (the caller left);
// probe says whether it was the half-open backend's probe, whose place it frees. Another
// call's does not free it: a second probe would go while the first is out.
func (b *Backend) Abandoned(probe bool) {
	if !probe {
		return
	}
	b.mu.Lock()
	b.probing = false
	b.settleLocked(time.Time{})
	b.mu.Unlock()
}

// Member is a backend in a deployment's pool.
type Member struct {
	*Backend
	Priority, Weight int
}

// Pool is a deployment's backends in priority order.
type Pool struct {
	members []Member
	opts    *Options
}

// NewPool returns a pool of the members (any order).
func (r *Registry) NewPool(members []Member) *Pool {
	m := append([]Member(nil), members...)
	// Insertion sort by priority, stable, so configuration order breaks ties.
	for i := 1; i < len(m); i++ {
		for j := i; j > 0 && m[j].Priority < m[j-1].Priority; j-- {
			m[j], m[j-1] = m[j-1], m[j]
		}
	}
	return &Pool{members: m, opts: &r.opts}
}

// Members returns the pool's members in priority order.
func (p *Pool) Members() []Member { return p.members }

// Tried records which members of a pool a call has tried (by index).
type Tried uint64

// Pick reserves a backend for the next attempt: the lowest priority with an eligible member not
// yet tried, weighted within it. It returns -1 when none is eligible, and whether the
// reservation is a half-open backend's probe, for the attempt's outcome (Failed, Abandoned).
func (p *Pool) Pick(tried Tried) (int, bool) {
	var now time.Time // read when first needed: quiet backends need no clock
	for i := 0; i < len(p.members); {
		prio := p.members[i].Priority
		j := i
		for j < len(p.members) && p.members[j].Priority == prio {
			j++
		}
		// Draw by weight among this priority's candidates as they stand at the start of the
		// draw, then reserve the one drawn, which checks its state again: other calls may have
		// opened its circuit, rested it or taken its half-open probe since. One that cannot be
		// reserved is left out of the next draw, so each draw either returns or has one
		// candidate fewer. (Judging eligibility afresh while drawing could find every candidate
		// gone and draw for ever.)
		for {
			var cands Tried
			total := 0
			for k := i; k < j; k++ {
				if tried&(1<<k) == 0 && p.members[k].eligible(&now) && p.members[k].Weight > 0 {
					cands |= 1 << k
					total += p.members[k].Weight
				}
			}
			if total == 0 {
				break
			}
			k, r := i, rand.IntN(total)
			for ; ; k++ {
				if cands&(1<<k) != 0 {
					if r -= p.members[k].Weight; r < 0 {
						break
					}
				}
			}
			if ok, probe := p.members[k].take(&now); ok {
				return k, probe
			}
			tried |= 1 << k
		}
		i = j
	}
	return -1, false
}

// Available reports whether some member could take a call now (not resting, not open).
func (p *Pool) Available() bool {
	for _, m := range p.members {
		if s := m.State(); s == Healthy || s == HalfOpen {
			return true
		}
	}
	return false
}

// Recovery is when the soonest backend of the pool (but those in except) will take calls
// again, which backend that is (nil if except leaves none), and whether every backend out of
// reach is resting from a rate limit (429) rather than failing (503).
func (p *Pool) Recovery(except Tried) (time.Time, *Backend, bool) {
	now := p.opts.now()
	var soonest time.Time
	var first *Backend
	rateLimited := true
	for i, m := range p.members {
		if except&(1<<i) != 0 {
			continue
		}
		t, rl := m.recovery(now)
		if first == nil || t.Before(soonest) {
			soonest, first = t, m.Backend
		}
		if !rl {
			rateLimited = false
		}
	}
	return soonest, first, rateLimited
}

// Cooling reports when the soonest rate-limited member will take calls again, and which one;
// ok is false when no member is resting from a rate limit.
func (p *Pool) Cooling() (until time.Time, first *Backend, ok bool) {
	now := p.opts.now()
	for _, m := range p.members {
		if t, rl := m.recovery(now); rl && (first == nil || t.Before(until)) {
			until, first = t, m.Backend
		}
	}
	return until, first, first != nil
}

// Budget is a retry budget: each call deposits Ratio of a retry, each retry withdraws one, and
// MinPerSecond retries per second are allowed on top, so quiet traffic can still retry.
type Budget struct {
	ratio, minPerSecond float64
	now                 func() time.Time

	// full is set while the balance is at its cap, where a deposit adds nothing: every call
	// deposits, and then does so without the lock.
	full atomic.Bool

	mu      sync.Mutex
	balance float64
	last    time.Time
}

// NewBudget returns a budget; now may be nil. It starts with a second's worth of the minimum,
// so a gateway that has just started can fail over at once.
func NewBudget(ratio, minPerSecond float64, now func() time.Time) *Budget {
	if now == nil {
		now = time.Now
	}
	return &Budget{ratio: ratio, minPerSecond: minPerSecond, now: now, last: now(), balance: min(minPerSecond, maxBalance)}
}

// maxBalance bounds the retries saved up, so a long quiet spell cannot fund a retry storm.
const maxBalance = 100

func (b *Budget) refillLocked() {
	now := b.now()
	b.balance = min(b.balance+now.Sub(b.last).Seconds()*b.minPerSecond, maxBalance)
	b.last = now
}

// Deposit records a call. It does not read the clock: the time-based refill is added at the
// next Withdraw, from the last, and with both additions non-negative, capping one before the
// other adds up to the same balance.
func (b *Budget) Deposit() {
	if b.full.Load() {
		return
	}
	b.mu.Lock()
	b.balance = min(b.balance+b.ratio, maxBalance)
	b.full.Store(b.balance >= maxBalance)
	b.mu.Unlock()
}

// Withdraw takes one retry, reporting whether the budget allowed it.
func (b *Budget) Withdraw() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.refillLocked()
	ok := b.balance >= 1-1e-9 // ten deposits of 0.2 make 1.9999999999999998
	if ok {
		b.balance = max(b.balance-1, 0)
	}
	b.full.Store(b.balance >= maxBalance)
	return ok
}

// duration is n units, at most the longest Duration: a conversion past it would come out
// negative (on amd64), and read as a Retry-After not given. n is not negative; +Inf is past it.
func duration(n float64, unit time.Duration) time.Duration {
	if d := n * float64(unit); d < float64(math.MaxInt64) {
		return time.Duration(d)
	}
	return math.MaxInt64
}

// RetryAfter reads how long a 429 asks the caller to wait: retry-after-ms, then
// x-ms-retry-after-ms, then retry-after (seconds, or an HTTP date), as Azure sends them.
func RetryAfter(get func(string) []byte, now time.Time) time.Duration {
	for _, h := range []string{"Retry-After-Ms", "X-Ms-Retry-After-Ms"} {
		if v := get(h); len(v) > 0 {
			if ms, err := strconv.ParseFloat(string(v), 64); err == nil && ms >= 0 {
				return duration(ms, time.Millisecond)
			}
		}
	}
	v := get("Retry-After")
	if len(v) == 0 {
		return 0
	}
	if s, err := strconv.ParseFloat(string(v), 64); err == nil && s >= 0 {
		return duration(s, time.Second)
	}
	if t, err := time.Parse(time.RFC1123, string(v)); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}
