package backend

import (
	"math"
	"math/rand/v2"
	"net/http"
	"sync"
	"testing"
	"time"
)

type clock struct{ t time.Time }

func (c *clock) now() time.Time          { return c.t }
func (c *clock) advance(d time.Duration) { c.t = c.t.Add(d) }
func newClock() *clock                   { return &clock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)} }
func settle(p *Pool, i int) *Backend     { b := p.members[i].Backend; b.Succeeded(); return b }

// pool builds the example: eastca-ptu (1), eastus (2, w3), westeu (2, w1).
func pool(c *clock) (*Registry, *Pool) {
	r := NewRegistry(Options{BreakerFailures: 3, BreakerOpen: 10 * time.Second, DefaultCooldown: 5 * time.Second, MaxCooldown: time.Minute, Now: c.now})
	return r, r.NewPool([]Member{
		{Backend: r.Backend("westeu", "gpt-41-mini"), Priority: 2, Weight: 1},
		{Backend: r.Backend("eastca-ptu", "gpt41mini"), Priority: 1, Weight: 1},
		{Backend: r.Backend("eastus", "gpt41mini"), Priority: 2, Weight: 3},
	})
}

// pickIndex is Pick's index alone.
func pickIndex(p *Pool, tried Tried) int {
	i, _ := p.Pick(tried)
	return i
}

func TestPriorityThenWeight(t *testing.T) {
	c := newClock()
	_, p := pool(c)
	if got := p.members[0].Key; got != "eastca-ptu/gpt41mini" {
		t.Fatalf("first member %s, want the priority-1 backend", got)
	}
	for range 100 {
		if i := pickIndex(p, 0); i != 0 {
			t.Fatalf("picked %d with the priority-1 backend healthy, want 0", i)
		}
	}
	counts := map[string]int{}
	const n = 10000
	for range n {
		i := pickIndex(p, 1) // the priority-1 backend already tried
		counts[p.members[i].Key]++
	}
	if share := float64(counts["eastus/gpt41mini"]) / n; share < 0.72 || share > 0.78 {
		t.Errorf("eastus got %.3f of the calls, want about 0.75 (weight 3 of 4)", share)
	}
	if i := pickIndex(p, 0b111); i != -1 {
		t.Errorf("picked %d with every member tried, want -1", i)
	}
}

func TestCooldownFromRetryAfter(t *testing.T) {
	c := newClock()
	_, p := pool(c)
	ptu := p.members[0].Backend
	ptu.RateLimited(2 * time.Second)
	if s := ptu.State(); s != Cooldown {
		t.Fatalf("state %v, want cooldown", s)
	}
	for range 50 {
		if i := pickIndex(p, 0); i == 0 {
			t.Fatal("picked a backend in cooldown")
		}
	}
	c.advance(2 * time.Second)
	if i := pickIndex(p, 0); i != 0 {
		t.Errorf("picked %d after the cooldown, want the priority-1 backend again", i)
	}
	if got := ptu.CooldownSeconds(); got != 2 {
		t.Errorf("cooldown total %v, want 2s", got)
	}
	ptu.RateLimited(0) // no Retry-After: the default
	if until, rl := p.members[0].recovery(c.now()); !rl || until.Sub(c.now()) != 5*time.Second {
		t.Errorf("recovery in %v (rate limited %v), want 5s", until.Sub(c.now()), rl)
	}
	ptu.RateLimited(time.Hour) // capped
	if until, _ := p.members[0].recovery(c.now()); until.Sub(c.now()) != time.Minute {
		t.Errorf("recovery in %v, want the 1m cap", until.Sub(c.now()))
	}
}

func TestBreakerOpensProbesAndCloses(t *testing.T) {
	c := newClock()
	_, p := pool(c)
	b := p.members[0].Backend
	b.Failed(false)
	b.Failed(false)
	if s := b.State(); s != Healthy {
		t.Fatalf("after 2 failures state %v, want healthy (threshold 3)", s)
	}
	b.Failed(false)
	if s := b.State(); s != Open {
		t.Fatalf("after 3 failures state %v, want open", s)
	}
	c.advance(10 * time.Second)
	if s := b.State(); s != HalfOpen {
		t.Fatalf("after the open period state %v, want half-open", s)
	}
	if i := pickIndex(p, 0); i != 0 {
		t.Fatalf("the half-open backend was not probed (picked %d)", i)
	}
	if i := pickIndex(p, 0); i == 0 {
		t.Fatal("a second probe was let through while the first is running")
	}
	b.Failed(true) // the probe fails: open again, twice as long
	c.advance(19 * time.Second)
	if s := b.State(); s != Open {
		t.Fatalf("19s after a failed probe state %v, want still open (20s)", s)
	}
	c.advance(time.Second)
	if pickIndex(p, 0) != 0 {
		t.Fatal("no probe after the doubled open period")
	}
	b.Succeeded()
	if s := b.State(); s != Healthy {
		t.Errorf("after a good probe state %v, want healthy", s)
	}
	b.Failed(false)
	if s := b.State(); s != Healthy {
		t.Errorf("one failure after recovery opened the circuit; the count must restart")
	}
}

// Failures of calls sent before the circuit opened, arriving while it is open, do not open it
// again: a burst of them once doubled its open time per threshold, to hours.
func TestFailuresWhileOpenAreNotCounted(t *testing.T) {
	c := newClock()
	_, p := pool(c)
	b := p.members[0].Backend
	for range 50 {
		b.Failed(false)
	}
	if s := b.State(); s != Open {
		t.Fatalf("state %v, want open", s)
	}
	c.advance(10 * time.Second)
	if s := b.State(); s != HalfOpen {
		t.Errorf("10 s after a burst of 50 failures: state %v, want half-open (open for 10 s, not doubled)", s)
	}
}

// While a backend is half-open, its probe alone decides: a call sent before the circuit opened
// that fails, or whose caller leaves, neither re-opens the circuit nor frees the probe's place.
func TestOnlyTheProbeDecides(t *testing.T) {
	c := newClock()
	_, p := pool(c)
	b := p.members[0].Backend
	for range 3 {
		b.Failed(false)
	}
	c.advance(10 * time.Second)
	i, probe := p.Pick(0)
	if i != 0 || !probe {
		t.Fatalf("picked %d (probe %v), want the half-open backend's probe", i, probe)
	}
	b.Failed(false)    // a call sent before the circuit opened fails
	b.Abandoned(false) // another's caller leaves
	if s := b.State(); s != HalfOpen {
		t.Errorf("state %v after other calls' outcomes, want half-open: the probe is still out", s)
	}
	if i, _ := p.Pick(0); i == 0 {
		t.Error("a second probe was let through while the first is out")
	}
	b.Failed(true) // the probe fails: open again, twice as long
	c.advance(19 * time.Second)
	if s := b.State(); s != Open {
		t.Errorf("19 s after the probe failed: state %v, want open (20 s)", s)
	}
}

// A half-open backend that a 429 asked to rest is not probed until the rest is over.
func TestNoProbeWhileResting(t *testing.T) {
	c := newClock()
	_, p := pool(c)
	b := p.members[0].Backend
	for range 3 {
		b.Failed(false)
	}
	b.RateLimited(time.Minute) // a call sent before the circuit opened got a 429
	c.advance(10 * time.Second)
	if s := b.State(); s != Cooldown || pickIndex(p, 0) == 0 {
		t.Fatalf("state %v, and picked for a probe; want cooldown and not picked", s)
	}
	c.advance(50 * time.Second)
	if s := b.State(); s != HalfOpen || pickIndex(p, 0) != 0 {
		t.Errorf("once rested: state %v; want a half-open probe", s)
	}
}

func TestRecoveryOfAnExhaustedPool(t *testing.T) {
	c := newClock()
	_, p := pool(c)
	p.members[0].RateLimited(30 * time.Second)
	p.members[1].RateLimited(7 * time.Second)
	p.members[2].RateLimited(20 * time.Second)
	if i := pickIndex(p, 0); i != -1 {
		t.Fatalf("picked %d with every backend cooling down", i)
	}
	until, first, rl := p.Recovery(0)
	if until.Sub(c.now()) != 7*time.Second || !rl || first != p.members[1].Backend {
		t.Errorf("recovery in %v by %s (rate limited %v), want 7s by the second member, rate limited", until.Sub(c.now()), first.Key, rl)
	}
	for range 3 {
		p.members[1].Failed(false)
	}
	if _, _, rl := p.Recovery(0); rl {
		t.Error("a pool with an open circuit reported as only rate limited")
	}
	if until, first, _ := p.Recovery(0b010); first != p.members[2].Backend || until.Sub(c.now()) != 20*time.Second {
		t.Errorf("recovery without the second member: %v by %v, want 20s by the third", until.Sub(c.now()), first)
	}
}

func TestBackendsAreShared(t *testing.T) {
	r := NewRegistry(Options{})
	if r.Backend("u", "d") != r.Backend("u", "d") || r.Backend("u", "d") == r.Backend("u", "e") {
		t.Error("backends are not one per (upstream, deployment)")
	}
}

func TestBudget(t *testing.T) {
	c := newClock()
	spend := func(b *Budget) int { // withdraws all there is
		n := 0
		for b.Withdraw() {
			n++
		}
		return n
	}
	b := NewBudget(0.2, 0, c.now)
	for range 10 {
		b.Deposit()
	}
	if got := spend(b); got != 2 {
		t.Errorf("10 calls at 20%% funded %d retries, want 2", got)
	}
	b = NewBudget(0.2, 5, c.now)
	if got := spend(b); got != 5 {
		t.Errorf("a new budget funded %d retries, want a second's minimum (5)", got)
	}
	c.advance(time.Second)
	if got := spend(b); got != 5 {
		t.Errorf("a quiet second funded %d retries, want the minimum 5", got)
	}
	c.advance(time.Hour)
	if got := spend(b); got != maxBalance {
		t.Errorf("an idle hour funded %d retries, want the cap %d", got, maxBalance)
	}
	// Calls and time both fund retries, whichever comes first, and the cap holds over both.
	b = NewBudget(0.5, 2, c.now)
	spend(b)
	c.advance(time.Second) // 2
	for range 4 {
		b.Deposit() // 2
	}
	c.advance(500 * time.Millisecond) // 1
	if got := spend(b); got != 5 {
		t.Errorf("a second, four calls at 50%% and half a second funded %d retries, want 5", got)
	}
	for range 3 * maxBalance {
		b.Deposit()
	}
	c.advance(time.Hour)
	if got := spend(b); got != maxBalance {
		t.Errorf("calls over the cap and an idle hour funded %d retries, want the cap %d", got, maxBalance)
	}
	// At the cap deposits are skipped; a retry taken from there makes them count again.
	b = NewBudget(0.2, 0, c.now)
	for range 5 * maxBalance {
		b.Deposit()
	}
	b.Withdraw()
	for range 5 {
		b.Deposit()
	}
	if got := spend(b); got != maxBalance {
		t.Errorf("a retry taken at the cap and five calls at 20%% left %d retries, want the cap %d", got, maxBalance)
	}
}

func TestRetryAfter(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, tt := range []struct {
		name   string
		header http.Header
		want   time.Duration
	}{
		{"ms first", http.Header{"Retry-After-Ms": {"1500"}, "Retry-After": {"9"}}, 1500 * time.Millisecond},
		{"x-ms", http.Header{"X-Ms-Retry-After-Ms": {"250"}, "Retry-After": {"9"}}, 250 * time.Millisecond},
		{"seconds", http.Header{"Retry-After": {"3"}}, 3 * time.Second},
		{"date", http.Header{"Retry-After": {"Thu, 01 Jan 2026 00:00:30 GMT"}}, 30 * time.Second},
		{"garbage", http.Header{"Retry-After": {"soon"}}, 0},
		{"negative", http.Header{"Retry-After-Ms": {"-5"}}, 0},
		{"none", http.Header{}, 0},
		// Past what a Duration holds: the longest one (RateLimited caps it at max_cooldown),
		// not a negative one read as not given.
		{"seconds past a Duration", http.Header{"Retry-After": {"99999999999"}}, math.MaxInt64},
		{"ms past a Duration", http.Header{"Retry-After-Ms": {"1e13"}}, math.MaxInt64},
		{"infinite", http.Header{"Retry-After": {"Inf"}}, math.MaxInt64},
	} {
		get := func(k string) []byte { return []byte(tt.header.Get(k)) }
		if got := RetryAfter(get, now); got != tt.want {
			t.Errorf("%s: got %v, want %v", tt.name, got, tt.want)
		}
	}
}

// A member can stop being eligible while another call is drawing from the pool (its circuit
// opens, or it is rested by a 429). Pick must then draw again or give up, never spin.
func TestPickWhileMembersStopBeingEligible(t *testing.T) {
	for round := range 2000 {
		r := NewRegistry(Options{BreakerFailures: 1, BreakerOpen: time.Hour})
		p := r.NewPool([]Member{
			{Backend: r.Backend("a", "d"), Priority: 1, Weight: 1},
			{Backend: r.Backend("b", "d"), Priority: 1, Weight: 2},
		})
		done := make(chan struct{})
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() {
				for {
					i, probe := p.Pick(0)
					if i < 0 {
						break
					}
					p.members[i].Abandoned(probe)
				}
			})
		}
		p.members[0].RateLimited(time.Hour)
		p.members[1].Failed(false) // opens its circuit for an hour
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("round %d: Pick did not return after every member stopped being eligible", round)
		}
	}
}

// TestQuietBackend drives a backend through random outcomes and clock steps, and checks the
// quiet flag, under which its state is read and its successes recorded without the lock: set
// only while there is nothing to record (no failure counted, no rate limit, circuit closed, no
// probe), and set again once a backend is back to that, so the fast path returns.
func TestQuietBackend(t *testing.T) {
	c := newClock()
	r := NewRegistry(Options{BreakerFailures: 2, BreakerOpen: 10 * time.Second, DefaultCooldown: 5 * time.Second, MaxCooldown: time.Minute, Now: c.now})
	b := r.Backend("u", "d")
	rng := rand.New(rand.NewPCG(1, 2))
	check := func(step int, op string) {
		t.Helper()
		now := c.now()
		b.mu.Lock()
		quiet, state := b.quiet.Load(), b.stateLocked(now)
		busy := b.failures != 0 || b.opens != 0 || b.probing || !b.openUntil.IsZero() || now.Before(b.cooldownUntil)
		b.mu.Unlock()
		if quiet && (busy || state != Healthy) {
			t.Fatalf("step %d (%s): quiet while %v, failures %d, opens %d, probing %v", step, op, state, b.failures, b.opens, b.probing)
		}
	}
	probe := false // the last take was the probe, and its outcome is still to come
	for step := range 20000 {
		var op string
		switch rng.IntN(7) {
		case 0:
			op = "failed"
			b.Failed(probe)
			probe = false
		case 1:
			op = "rate limited"
			b.RateLimited(time.Duration(rng.IntN(8)) * time.Second)
		case 2:
			op = "abandoned"
			b.Abandoned(probe)
			probe = false
		case 3:
			op = "take"
			now := c.now()
			if ok, p := b.take(&now); ok && p {
				probe = true
			}
		case 4:
			op = "advance"
			c.advance(time.Duration(rng.IntN(12)) * time.Second)
		default:
			op = "succeeded"
			b.Succeeded()
		}
		check(step, op)
		if b.State() == Healthy { // a read settles what has run out
			check(step, op+", then read")
		}
	}
	// However it got there, a backend that succeeds once its rests have run out is quiet again.
	c.advance(time.Hour)
	now := c.now()
	b.take(&now)
	b.Succeeded()
	if b.State(); !b.quiet.Load() {
		t.Fatal("a backend that succeeded after its rests ran out is not quiet")
	}
}

// BenchmarkCallOutcome is what every call does with its deployment's backends: a pick, the
// outcome recorded, a deposit in the retry budget.
func BenchmarkCallOutcome(b *testing.B) {
	r := NewRegistry(Options{})
	p := r.NewPool([]Member{{Backend: r.Backend("eastca", "gpt-41-mini"), Priority: 1, Weight: 1}})
	budget := NewBudget(0.2, 1, nil)
	for b.Loop() {
		i, _ := p.Pick(0)
		p.members[i].Succeeded()
		budget.Deposit()
	}
}
