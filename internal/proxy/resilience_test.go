package proxy

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/tokenproxy/tokenproxy/internal/config"
	"github.com/tokenproxy/tokenproxy/internal/emulator"
)

func chat(g *gateway) (*http.Response, string) {
	g.t.Helper()
	return g.do("POST", chatPath, map[string]string{"api-key": keyProd}, chatBody)
}

func served(planes []*emulator.OpenAI) []int {
	n := make([]int, len(planes))
	for i, p := range planes {
		n[i] = len(p.Requests())
	}
	return n
}

func backendState(t *testing.T, g *gateway, backend, state string) float64 {
	t.Helper()
	for _, line := range strings.Split(scrape(t, g.reg), "\n") {
		if strings.HasPrefix(line, fmt.Sprintf(`tokenproxy_backend_state{backend=%q,state=%q}`, backend, state)) {
			v, _ := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
			return v
		}
	}
	t.Fatalf("no tokenproxy_backend_state for %s %s", backend, state)
	return 0
}

func TestFailoverOn429HonoursRetryAfter(t *testing.T) {
	g, planes := newPoolGateway(t, 2)
	planes[0].InjectFault(emulator.Fault{Status: 429, RetryAfter: 5 * time.Second, Count: 1})

	resp, body := chat(g)
	if resp.StatusCode != 200 || resp.Header.Get("x-ms-region") != "region-1" {
		t.Fatalf("got %d from %q: %s; want 200 from the second backend", resp.StatusCode, resp.Header.Get("x-ms-region"), body)
	}
	if got := backendState(t, g, "b0/deploy-gpt-4.1", "cooldown"); got != 1 {
		t.Errorf("b0 cooldown state = %v, want 1", got)
	}
	// While b0 rests, calls go straight to b1: b0 is not asked.
	for range 5 {
		if resp, _ := chat(g); resp.StatusCode != 200 {
			t.Fatalf("got %d during b0's cooldown", resp.StatusCode)
		}
	}
	if got := served(planes); got[0] != 1 || got[1] != 6 {
		t.Errorf("requests per backend %v, want [1 6]", got)
	}
	g.clock.advance(5 * time.Second)
	if resp, _ := chat(g); resp.Header.Get("x-ms-region") != "region-0" {
		t.Errorf("after the Retry-After the call went to %q, want back to region-0", resp.Header.Get("x-ms-region"))
	}
	if err := testutil.CollectAndCompare(g.reg, strings.NewReader(`
# HELP tokenproxy_backend_failovers_total Calls moved from a backend to another, by the reason: the backend's status (429, 408, 500, 502, 503, 504), connect_error or token_unavailable.
# TYPE tokenproxy_backend_failovers_total counter
tokenproxy_backend_failovers_total{backend="b0/deploy-gpt-4.1",reason="429"} 1
`), "tokenproxy_backend_failovers_total"); err != nil {
		t.Error(err)
	}
	if !strings.Contains(g.logs.String(), `"msg":"failing over"`) || !strings.Contains(g.logs.String(), `"attempts":2`) {
		t.Error("the failover is not in the log under the call's request id")
	}
}

func TestFailoverStatuses(t *testing.T) {
	for _, tt := range []struct {
		status   int
		failover bool
	}{
		{408, true}, {500, true}, {502, true}, {503, true}, {504, true},
		{400, false}, {401, false}, {403, false}, {404, false}, {409, false}, {501, false},
	} {
		t.Run(strconv.Itoa(tt.status), func(t *testing.T) {
			g, planes := newPoolGateway(t, 2)
			planes[0].InjectFault(emulator.Fault{Status: tt.status, Count: 1})
			resp, _ := chat(g)
			switch {
			case tt.failover && resp.StatusCode != 200:
				t.Errorf("got %d, want 200 from the next backend", resp.StatusCode)
			case !tt.failover && resp.StatusCode != tt.status:
				t.Errorf("got %d, want the upstream's %d passed through", resp.StatusCode, tt.status)
			}
			if want := map[bool]int{true: 1, false: 0}[tt.failover]; served(planes)[1] != want {
				t.Errorf("second backend got %d requests, want %d", served(planes)[1], want)
			}
		})
	}
	t.Run("connection refused", func(t *testing.T) {
		g, planes := newPoolGateway(t, 2, func(c *config.Config) { c.Upstreams["b0"].URL = "http://127.0.0.1:1" })
		if resp, body := chat(g); resp.StatusCode != 200 || served(planes)[1] != 1 {
			t.Errorf("got %d %s, want 200 from the second backend", resp.StatusCode, body)
		}
	})
	t.Run("request body replayed", func(t *testing.T) {
		g, planes := newPoolGateway(t, 2, func(c *config.Config) {
			c.Deployments["gpt-4.1-mini"].Backends[1].Deployment = "gpt-4o" // known by another name there
		})
		planes[0].InjectFault(emulator.Fault{Status: 503, Count: 1})
		body := `{"model":"gpt-4.1-mini","messages":[{"role":"user","content":"replay me"}]}`
		resp, _ := g.do("POST", "/openai/v1/chat/completions", map[string]string{"api-key": keyProd}, body)
		if resp.StatusCode != 200 {
			t.Fatalf("got %d", resp.StatusCode)
		}
		if got := string(planes[0].Requests()[0].Body); !strings.Contains(got, `"deploy-gpt-4.1"`) || !strings.Contains(got, "replay me") {
			t.Errorf("first backend got %s", got)
		}
		if got := string(planes[1].Requests()[0].Body); !strings.Contains(got, `"gpt-4o"`) || !strings.Contains(got, "replay me") {
			t.Errorf("second backend got %s, want the body with its own deployment name", got)
		}
	})
}

func TestNothingIsRetriedAfterTheFirstByte(t *testing.T) {
	g, planes := newPoolGateway(t, 2)
	planes[0].CutStreamsAfter(3)
	req, _ := http.NewRequestWithContext(t.Context(), "POST", g.url+chatPath, strings.NewReader(`{"stream":true,"messages":[{"role":"user","content":"hi"}]}`))
	req.Header.Set("api-key", keyProd)
	resp, err := g.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var events []string
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if d, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
			events = append(events, d)
		}
	}
	if resp.StatusCode != 200 || len(events) != 3 || sc.Err() == nil {
		t.Errorf("got %d, %d events, read error %v; want 200, 3 events and a cut stream", resp.StatusCode, len(events), sc.Err())
	}
	if n := served(planes)[1]; n != 0 {
		t.Errorf("the second backend got %d requests, want none: the stream had started", n)
	}
}

func TestEveryBackendCooling(t *testing.T) {
	g, planes := newPoolGateway(t, 2)
	planes[0].InjectFault(emulator.Fault{Status: 429, RetryAfter: 30 * time.Second, Count: 1})
	planes[1].InjectFault(emulator.Fault{Status: 429, RetryAfter: 1200 * time.Millisecond, Count: 1})

	// The first call tries both: the answer is the 429 of the backend back soonest, Azure's own.
	// The second finds both resting and is answered by the gateway, without reaching either.
	for i, wantCode := range []string{"429", CodeNoCapacity} {
		resp, body := chat(g)
		if resp.StatusCode != 429 {
			t.Fatalf("call %d: got %d %s, want 429", i, resp.StatusCode, body)
		}
		var e errorBody
		json.Unmarshal([]byte(body), &e)
		ra, err := strconv.Atoi(resp.Header.Get("Retry-After"))
		ms, _ := strconv.Atoi(resp.Header.Get("Retry-After-Ms"))
		if e.Error.Code != wantCode || err != nil || ra != 2 || ms > 1200 || ms < 1000 {
			t.Errorf("call %d: got %s, Retry-After %q, Retry-After-Ms %d; want code %s and the soonest recovery (1.2s)", i, body,
				resp.Header.Get("Retry-After"), ms, wantCode)
		}
	}
	if got := served(planes); got[0] != 1 || got[1] != 1 {
		t.Errorf("requests per backend %v: a call while every backend rests must not reach any", got)
	}
	g.clock.advance(1200 * time.Millisecond)
	if resp, _ := chat(g); resp.StatusCode != 200 || resp.Header.Get("x-ms-region") != "region-1" {
		t.Errorf("after the soonest recovery got %d from %q, want 200 from region-1", resp.StatusCode, resp.Header.Get("x-ms-region"))
	}
}

func TestWaitForCapacity(t *testing.T) {
	g, planes := newPoolGateway(t, 1, func(c *config.Config) { c.Resilience.WaitForCapacity = 5 * time.Second })
	planes[0].InjectFault(emulator.Fault{Status: 429, RetryAfter: 300 * time.Millisecond, Count: 1})
	start := time.Now()
	resp, body := chat(g)
	if resp.StatusCode != 200 {
		t.Fatalf("got %d %s, want 200 after waiting for the backend", resp.StatusCode, body)
	}
	if waited := time.Since(start); waited < 300*time.Millisecond {
		t.Errorf("answered after %v, before the backend's 300ms Retry-After", waited)
	}
	if n := served(planes)[0]; n != 2 {
		t.Errorf("backend got %d requests, want 2 (the 429, then the retry after the wait)", n)
	}
}

func TestCircuitBreaker(t *testing.T) {
	g, planes := newPoolGateway(t, 2, func(c *config.Config) {
		c.Resilience.BreakerFailures = 2
		c.Resilience.BreakerOpen = 10 * time.Second
	})
	planes[0].InjectFault(emulator.Fault{Status: 503}) // until cleared
	for range 2 {
		if resp, _ := chat(g); resp.StatusCode != 200 {
			t.Fatalf("got %d, want 200 through the second backend", resp.StatusCode)
		}
	}
	if got := backendState(t, g, "b0/deploy-gpt-4.1", "open"); got != 1 {
		t.Fatalf("b0 open state = %v after 2 failures, want 1", got)
	}
	for range 5 {
		chat(g)
	}
	if n := served(planes)[0]; n != 2 {
		t.Errorf("b0 got %d requests, want 2: an open circuit takes no calls", n)
	}
	planes[0].ClearFaults()
	g.clock.advance(10 * time.Second) // the open period passes: one probe goes through
	if resp, _ := chat(g); resp.Header.Get("x-ms-region") != "region-0" {
		t.Errorf("the probe went to %q, want region-0", resp.Header.Get("x-ms-region"))
	}
	if got := backendState(t, g, "b0/deploy-gpt-4.1", "healthy"); got != 1 {
		t.Errorf("b0 healthy = %v after a good probe, want 1", got)
	}
}

func TestAttemptCapAndRetryBudget(t *testing.T) {
	t.Run("attempt cap", func(t *testing.T) {
		g, planes := newPoolGateway(t, 3, func(c *config.Config) { c.Resilience.MaxAttempts = 2 })
		for _, p := range planes {
			p.InjectFault(emulator.Fault{Status: 503})
		}
		resp, _ := chat(g)
		total := served(planes)[0] + served(planes)[1] + served(planes)[2]
		if resp.StatusCode != 503 || total != 2 {
			t.Errorf("got %d after %d upstream requests, want the last backend's 503 after exactly 2", resp.StatusCode, total)
		}
	})
	t.Run("budget", func(t *testing.T) {
		g, planes := newPoolGateway(t, 3, func(c *config.Config) {
			c.Resilience.RetryBudget = 0
			c.Resilience.MinRetriesPerSecond = 0
		})
		planes[0].InjectFault(emulator.Fault{Status: 503})
		resp, _ := chat(g)
		if resp.StatusCode != 503 || served(planes)[1]+served(planes)[2] != 0 {
			t.Errorf("got %d with %v requests, want b0's 503 and no retry", resp.StatusCode, served(planes))
		}
		if n := testutil.ToFloat64(g.handler.m.budgetExhausted); n != 1 {
			t.Errorf("retry_budget_exhausted_total = %v, want 1", n)
		}
	})
}

// A call with nowhere left to go does not spend the retry budget, which every deployment
// shares, nor count as a failover: a pool of one that keeps failing once emptied it, and the
// deployments that do have a second backend could then not fail over.
func TestNowhereToGoSpendsNoBudget(t *testing.T) {
	g, planes := newPoolGateway(t, 3, func(c *config.Config) {
		c.Resilience.RetryBudget, c.Resilience.MinRetriesPerSecond, c.Resilience.BreakerFailures = 0.5, 0, 100
		d := c.Deployments["gpt-4.1-mini"]
		c.Deployments["solo"] = &config.Deployment{Backends: []*config.Backend{d.Backends[2]}}
		d.Backends = d.Backends[:2]
	})
	planes[2].InjectFault(emulator.Fault{Status: 503})
	for range 4 {
		if resp, _ := g.do("POST", "/openai/deployments/solo/chat/completions?api-version=2025-01-01-preview", map[string]string{"api-key": keyProd}, chatBody); resp.StatusCode != 503 {
			t.Fatalf("the pool of one got %d, want its backend's 503", resp.StatusCode)
		}
	}
	if n := testutil.ToFloat64(g.handler.m.budgetExhausted); n != 0 {
		t.Errorf("retry_budget_exhausted_total = %v after calls with nowhere to go, want 0", n)
	}
	if n := testutil.CollectAndCount(g.handler.m.failovers); n != 0 {
		t.Errorf("%d failover series after calls with nowhere to go, want none", n)
	}
	planes[0].InjectFault(emulator.Fault{Status: 503, Count: 1})
	if resp, body := chat(g); resp.StatusCode != 200 || served(planes)[1] != 1 {
		t.Errorf("the pool of two got %d %s with %v requests, want 200 from its second backend", resp.StatusCode, body, served(planes))
	}
}

func TestIndependentCredentials(t *testing.T) {
	// Two backends in two tenants: one tenant's Entra outage does not touch the other's calls.
	g, planes := newPoolGateway(t, 2, func(c *config.Config) {})
	_ = g
	emu := g.emu
	emu.AddApp(emulator.App{TenantID: "22222222-0000-0000-0000-000000000000", ClientID: "tenant-b-app", Secrets: []string{"b-secret"}})
	cfg := g.cfg
	cfg.Credentials["tenant-b"] = &config.Credential{
		Type: config.TypeClientSecret, TenantID: "22222222-0000-0000-0000-000000000000", ClientID: "tenant-b-app",
		ClientSecret: "b-secret", AuthorityHost: emu.URL(),
	}
	cfg.Upstreams["b1"].Credential = "tenant-b"
	g2 := startGateway(t, emu, cfg)
	emu.SetAppDown(emu.ClientID, true) // the first tenant's Entra is down; no token was ever held

	for range 3 {
		resp, body := chat(g2)
		if resp.StatusCode != 200 || resp.Header.Get("x-ms-region") != "region-1" {
			t.Fatalf("got %d from %q: %s; want 200 from the other tenant's backend", resp.StatusCode, resp.Header.Get("x-ms-region"), body)
		}
	}
	if n := served(planes)[0]; n != 0 {
		t.Errorf("b0 got %d requests without a token", n)
	}
	if !strings.Contains(scrape(t, g2.reg), `tokenproxy_backend_attempts_total{backend="b0/deploy-gpt-4.1",result="token_unavailable"}`) {
		t.Error("the token failure is not counted against b0")
	}
}

func TestEntraDownOrSlowWhileATokenIsHeld(t *testing.T) {
	g := newGateway(t)
	if resp, _ := g.do("POST", chatPath, map[string]string{"api-key": keyProd}, chatBody); resp.StatusCode != 200 {
		t.Fatal("warm-up call failed")
	}
	g.emu.SetLatency(10 * time.Second)
	g.emu.SetDown(true)
	start := time.Now()
	for i := range 50 {
		if resp, _ := g.do("POST", chatPath, map[string]string{"api-key": keyProd}, chatBody); resp.StatusCode != 200 {
			t.Fatalf("call %d failed with Entra down and slow: %d", i, resp.StatusCode)
		}
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("50 calls took %v with a slow Entra: the request path waited on it", d)
	}
	if n := g.tokensRequested(); n != 1 {
		t.Errorf("%d token requests, want just the warm-up's", n)
	}
}

func TestCallerLeavingCancelsTokenWait(t *testing.T) {
	g := newGateway(t)
	g.emu.SetLatency(time.Hour) // Entra never answers: the call waits for its first token
	conn, err := (&net.Dialer{}).DialContext(t.Context(), "tcp", strings.TrimPrefix(g.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(conn, "POST %s HTTP/1.1\r\nHost: gw\r\nApi-Key: %s\r\nContent-Length: %d\r\n\r\n%s", chatPath, keyProd, len(chatBody), chatBody)
	for testutil.ToFloat64(g.handler.m.inflight) != 1 {
		runtime.Gosched()
	}
	conn.Close()
	deadline := time.Now().Add(10 * time.Second)
	for testutil.ToFloat64(g.handler.m.inflight) != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the call still waits for a token after its caller left")
		}
		runtime.Gosched()
	}
	if !strings.Contains(g.logs.String(), `"status":499`) {
		t.Error("the abandoned call is not logged as 499")
	}
}

func TestSoak(t *testing.T) {
	if testing.Short() {
		t.Skip("soak")
	}
	// Three backends (the pool shape) with faults injected all along; a fixed number of
	// calls, plain and streamed, from a fixed number of callers, within a time limit.
	g, planes := newPoolGateway(t, 3, func(c *config.Config) {
		c.Deployments["gpt-4.1-mini"].Backends[1].Weight = 3
		c.Resilience.RetryBudget = 1
		c.Resilience.MinRetriesPerSecond = 1000
		c.Resilience.BreakerFailures = 3
		c.Resilience.BreakerOpen = 200 * time.Millisecond
		c.Resilience.WaitForCapacity = 250 * time.Millisecond
		c.Resilience.MaxAttempts = 5
	})
	planes[0].InjectFault(emulator.Fault{Status: 429, RetryAfter: 30 * time.Millisecond, Every: 4})
	planes[1].InjectFault(emulator.Fault{Status: 503, Every: 5})
	planes[2].InjectFault(emulator.Fault{Status: 429, RetryAfter: 10 * time.Millisecond, Every: 9})
	planes[2].SetLatency(2 * time.Millisecond)

	const calls, workers = 1200, 24
	type outcome struct {
		id, problem string
		ok          bool
	}
	results := make(chan outcome, calls)
	jobs := make(chan int)
	deadline := time.Now().Add(90 * time.Second)
	for range workers {
		go func() {
			for i := range jobs {
				results <- soakCall(g, i, deadline)
			}
		}()
	}
	go func() {
		for i := range calls {
			jobs <- i
		}
		close(jobs)
	}()
	succeeded := map[string]bool{}
	rateLimited := 0
	for range calls {
		r := <-results
		if r.problem != "" {
			t.Errorf("call %s: %s", r.id, r.problem)
			continue
		}
		if r.ok {
			succeeded[r.id] = true
		} else {
			rateLimited++
		}
	}
	// Every success came from exactly one upstream answer, and no failed call got one.
	upstream200 := map[string]int{}
	for _, p := range planes {
		for _, r := range p.Requests() {
			if r.Status == 200 {
				upstream200[r.Header.Get("X-Ms-Client-Request-Id")]++
			}
		}
	}
	for id := range succeeded {
		if upstream200[id] != 1 {
			t.Errorf("call %s succeeded with %d upstream answers, want exactly 1", id, upstream200[id])
		}
	}
	for id, n := range upstream200 {
		if !succeeded[id] {
			t.Errorf("call %s got %d upstream answers but did not succeed: lost after its first byte", id, n)
		}
	}
	t.Logf("%d calls: %d succeeded, %d answered 429 with Retry-After; upstream requests per backend %v",
		calls, len(succeeded), rateLimited, served(planes))
	if len(succeeded) < calls*9/10 {
		t.Errorf("only %d of %d calls succeeded with healthy capacity always available", len(succeeded), calls)
	}
}

// soakCall makes one call (every third streamed) and checks its answer is a complete success or
// a well-formed 429 with Retry-After.
func soakCall(g *gateway, i int, deadline time.Time) (out struct {
	id, problem string
	ok          bool
}) {
	out.id = fmt.Sprintf("soak-%04d", i)
	if time.Now().After(deadline) {
		out.problem = "the soak ran out of time"
		return
	}
	stream := i%3 == 0
	body := `{"messages":[{"role":"user","content":"soak"}]}`
	if stream {
		body = `{"stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"soak"}]}`
	}
	req, _ := http.NewRequest("POST", g.url+chatPath, strings.NewReader(body))
	req.Header.Set("api-key", keyProd)
	req.Header.Set("x-ms-client-request-id", out.id)
	resp, err := g.client.Do(req)
	if err != nil {
		out.problem = err.Error()
		return
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	switch {
	case err != nil:
		out.problem = "reading: " + err.Error()
	case resp.StatusCode == 200 && stream && !strings.HasSuffix(strings.TrimSpace(string(b)), "data: [DONE]"):
		out.problem = "a stream ended without [DONE]"
	case resp.StatusCode == 200 && !stream && !json.Valid(b):
		out.problem = "an invalid JSON body"
	case resp.StatusCode == 200:
		out.ok = true
	case resp.StatusCode == 429:
		var e errorBody
		if resp.Header.Get("Retry-After") == "" || json.Unmarshal(b, &e) != nil || e.Error.Code == "" {
			out.problem = fmt.Sprintf("a malformed 429: %v %s", resp.Header, b)
		}
	default:
		out.problem = fmt.Sprintf("got %d %s while a healthy backend existed", resp.StatusCode, b)
	}
	return
}

func TestShutdownCutsWhatOutlivesTheGrace(t *testing.T) {
	g := newGateway(t)
	srv, addr, done := serveOwn(t, g)
	g.emu.OpenAI.SetStreamGate(make(chan struct{})) // streams that never end on their own

	const n = 3
	bodies := make([]io.ReadCloser, n)
	for i := range bodies {
		req, _ := http.NewRequest("POST", "http://"+addr+chatPath, strings.NewReader(`{"stream":true,"messages":[]}`))
		req.Header.Set("api-key", keyProd)
		resp, err := g.client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		bodies[i] = resp.Body
		bufio.NewReader(resp.Body).ReadString('\n') // the stream is live
	}
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	cut, err := srv.Shutdown(ctx)
	if cut != n || err == nil {
		t.Errorf("Shutdown cut %d connections (%v), want %d and the grace's deadline error", cut, err, n)
	}
	<-done
	for _, b := range bodies {
		if _, err := io.ReadAll(b); err == nil {
			t.Error("a stream cut at shutdown ended cleanly for its caller")
		}
		b.Close()
	}
	if got := testutil.ToFloat64(g.handler.m.shutdownCut); got != n {
		t.Errorf("tokenproxy_shutdown_cut_connections_total = %v, want %d", got, n)
	}
}

// A member whose rest runs out between the pick that found none and the look at when one comes
// back is picked again, whatever wait_for_capacity: the call is not given up on. One that
// failed the call is not waited for.
func TestCapacityWaitSeesAMemberBackAlready(t *testing.T) {
	g, _ := newPoolGateway(t, 2)
	if resp, body := g.do("POST", chatPath, map[string]string{"api-key": keyProd}, chatBody); resp.StatusCode != 200 {
		t.Fatalf("got %d %s", resp.StatusCode, body)
	}
	d := g.handler.deployments["gpt-4.1-mini"]
	for _, m := range d.pool.Members() {
		m.RateLimited(time.Nanosecond) // over by the time capacityWait looks
	}
	if w := g.handler.capacityWait(d, 0, 0); w != -1 {
		t.Errorf("capacityWait = %v with members back already, want -1 (pick again)", w)
	}
	if w := g.handler.capacityWait(d, 0b11, 0); w != 0 {
		t.Errorf("capacityWait = %v with every member failed, want 0", w)
	}
}

func TestServeAfterShutdownReturns(t *testing.T) {
	// A shutdown that comes before Serve has taken its listener (a signal as the process starts,
	// a failed admin listener) still ends it: fasthttp's own Shutdown would not know of it.
	g := newGateway(t)
	srv := g.handler.NewServer(g.cfg)
	if _, err := srv.Shutdown(t.Context()); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve after Shutdown: %v, want nil", err)
		}
	case <-time.After(10 * time.Second):
		ln.Close()
		t.Fatal("Serve still serving 10 s after Shutdown")
	}
	if c, err := net.Dial("tcp", ln.Addr().String()); err == nil {
		c.Close()
		t.Error("the listener still accepts connections")
	}
}

// A failed attempt's answer, kept in case no other backend does better, is let go once another
// backend's answer is delivered: a stream that follows does not keep the failed backend's
// connection open for as long as it runs.
func TestAHeldAnswerIsLetGoOnceAnotherIsDelivered(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := make(chan struct{})
	var once sync.Once
	go func() {
		for { // the gateway may dial a spare connection too, which brings no request
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				req, err := http.ReadRequest(br)
				if err != nil {
					return
				}
				io.Copy(io.Discard, req.Body)
				// A 503 whose body has begun and does not end: the gateway holds it as a stream.
				io.WriteString(c, "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nbusy!\r\n")
				io.Copy(io.Discard, br) // until the gateway closes the connection
				once.Do(func() { close(closed) })
			}()
		}
	}()
	t.Cleanup(func() { ln.Close() })
	g, planes := newPoolGateway(t, 2, func(c *config.Config) { c.Upstreams["b0"].URL = "http://" + ln.Addr().String() })
	gate := make(chan struct{})
	planes[1].SetStreamGate(gate)
	defer close(gate) // lets the stream end, so the servers can close
	req, _ := http.NewRequestWithContext(t.Context(), "POST", g.url+chatPath, strings.NewReader(`{"stream":true,"messages":[{"role":"user","content":"hi"}]}`))
	req.Header.Set("api-key", keyProd)
	first := make(chan string, 1)
	go func() {
		resp, err := g.client.Do(req)
		if err != nil {
			first <- err.Error()
			return
		}
		defer resp.Body.Close()
		first <- resp.Status + " " + readEvents(t, resp.Body, 1)[0]
		io.Copy(io.Discard, resp.Body)
	}()
	select {
	case got := <-first:
		if !strings.HasPrefix(got, "200 ") {
			t.Fatalf("got %s, want the second backend's stream", got)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no first event in 10 s")
	}
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Error("the failed backend's connection is still open 10 s into the stream that replaced its answer")
	}
}
