package proxy

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/valyala/fasthttp"
	"go.uber.org/zap"

	"github.com/tokenproxy/tokenproxy/internal/backend"
	"github.com/tokenproxy/tokenproxy/internal/transport"
)

// deployment is an exposed deployment name and the backends serving it.
type deployment struct {
	name string
	pool *backend.Pool // nil when names pass through to the only upstream
	ups  []*upstream   // ups[i] serves pool.Members()[i]
	// names[i] is the deployment's name on ups[i].
	names []string
	// renames is true when some backend knows the deployment by another name.
	renames bool
}

// plan says how to build a call's request for whichever backend an attempt goes to.
type plan struct {
	op   string // /openai/deployments/{deployment}/{op}; empty for a body-routed call
	path string // a body-routed call's path, as received
	body []byte
	ref  modelRef // where the body names the deployment (body-routed calls)
	// stream is set when the body asks for an event stream: the call goes to its upstream's
	// origin for streams.
	stream bool
}

// appendPath appends the call's path on the backend that knows the deployment as name.
func (p *plan) appendPath(b []byte, name string) []byte {
	if p.op != "" {
		b = append(b, prefixDeployments...)
		b = append(b, name...)
		b = append(b, '/')
		return append(b, p.op...)
	}
	return append(b, p.path...)
}

func (p *plan) bodyFor(exposed, name string) []byte {
	if p.op == "" && name != exposed && p.ref.start >= 0 {
		return renameModel(p.body, p.ref, name)
	}
	return p.body
}

// Failover reasons and attempt results, as metric labels (besides upstream status codes).
const (
	reasonRateLimited      = "429"
	reasonConnectError     = "connect_error"
	reasonTimeout          = "timeout"
	reasonTokenUnavailable = "token_unavailable"
)

// failoverStatus reports whether an upstream status moves a call to the next backend, before
// anything of the response has reached the caller.
func failoverStatus(status int) bool {
	switch status {
	case http.StatusTooManyRequests, http.StatusRequestTimeout, http.StatusInternalServerError,
		http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return true
	}
	return false
}

// forward runs the call's attempts. Each goes to the best eligible backend of the deployment;
// a 429, 408, 5xx or connection failure moves the call on, until a response worth giving
// arrives or the backends, the attempts or the retry budget run out (see exhausted). A backend
// that failed the call is not tried again by it; one that answered 429 rests for its
// Retry-After and may be waited for (wait_for_capacity). Once a response is being delivered,
// nothing is retried.
func (h *Handler) forward(c *call, d *deployment, p *plan) {
	ctx := &c.ctx
	c.watch.start(c.fc.Conn(), ctx)
	p.stream = asksForStream(p.body)
	if d.pool == nil {
		h.attempt(ctx, c, d.ups[0], d.name, p, nil, false)
		return
	}
	h.budget.Deposit()
	var failed backend.Tried
	var from, why string // the backend the last attempt failed on, and why: the call fails over from it
	waited, repicks := time.Duration(0), 0
	for {
		i, probe := d.pool.Pick(failed)
		if i < 0 {
			switch w := h.capacityWait(d, failed, waited); {
			case w > 0:
				if !sleepCtx(ctx, w) {
					h.proxyError(c, ctx.Err())
					return
				}
				waited += w
				continue
			case w < 0 && repicks < 2: // a member came back since the pick: pick again
				repicks++
				continue
			}
			h.exhausted(c, d)
			return
		}
		m := d.pool.Members()[i]
		if why != "" {
			// A failover, now that there is a backend to go to: it draws on the retry budget,
			// which a call with nowhere to go (a pool of one, say) must not spend.
			if !h.budget.Withdraw() {
				m.Abandoned(probe) // the reservation Pick just made
				h.m.budgetExhausted.Inc()
				h.exhausted(c, d)
				return
			}
			h.m.failovers.WithLabelValues(from, why).Inc()
			if ce := h.log.Check(zap.InfoLevel, "failing over"); ce != nil {
				ce.Write(zap.String("request_id", c.id), zap.String("backend", from), zap.String("reason", why), zap.Int("attempt", c.attempts))
			}
		}
		reason := h.attempt(ctx, c, d.ups[i], d.names[i], p, m.Backend, probe)
		if reason == "" {
			return // answered
		}
		if reason != reasonRateLimited {
			failed |= 1 << i
		}
		if c.attempts >= h.res.MaxAttempts {
			h.exhausted(c, d)
			return
		}
		from, why = m.Key, reason
		// What this attempt got stays held until a later one replaces it or the call ends.
	}
}

// attempt sends the call to one backend (b is nil for a pass-through name, which has no pool;
// probe says whether the attempt is b's half-open probe).
// It answers the caller and returns "" unless the attempt failed in a way that lets the call
// move on: then it returns why, holding on to what it got in case no backend does better.
func (h *Handler) attempt(ctx context.Context, c *call, up *upstream, name string, p *plan, b *backend.Backend, probe bool) (reason string) {
	c.attempts++
	c.upstream = up.name
	if b != nil {
		c.backend = b.Key
	}
	outcome := func(result string) {
		if b != nil {
			h.m.attemptsFor(b.Key, result).Inc()
		}
	}
	tok, err := up.src.TokenAt(ctx, c.now())
	if err != nil {
		if b != nil {
			b.Abandoned(probe) // the backend was never reached
		}
		if ctx.Err() != nil || b == nil {
			h.proxyError(c, err)
			return ""
		}
		outcome(reasonTokenUnavailable)
		c.holdError(err)
		return reasonTokenUnavailable
	}
	out := upstreamRequests.Get().(*transport.Request)
	defer upstreamRequests.Put(out)
	var pathBuf [256]byte
	rewrite(out, &c.fc.Request.Header, up, p.appendPath(pathBuf[:0], name), c.query, p.bodyFor(c.deployment, name), c.id, c.credential, c.credStr, c.keys)

	c.proxyStart = c.now()
	// The answer is read straight into the caller's response; one whose attempt fails over is
	// moved aside (holdResponse), which only a failing backend's answer pays for.
	upResp := &c.fc.Response
	origin := up.origin
	if p.stream {
		origin = up.streams
	}
	stream, err := h.transport.Send(ctx, c.proxyStart, origin, out, tok.AuthorizationHeader()[0], upResp)
	if err != nil {
		clearResponse(upResp) // whatever of an answer was read before the error
		if ctx.Err() != nil || b == nil {
			if b != nil {
				b.Abandoned(probe)
			}
			h.proxyError(c, err)
			return ""
		}
		b.Failed(probe)
		if errors.As(err, new(transport.TimeoutError)) {
			// The upstream may still be working on the call: another attempt would double its
			// cost and the caller's wait, so the timeout is answered (504), not failed over.
			outcome(reasonTimeout)
			h.proxyError(c, err)
			return ""
		}
		outcome(reasonConnectError)
		c.holdError(err)
		return reasonConnectError
	}
	c.headerAt = c.now()
	status := upResp.StatusCode()
	if b != nil {
		switch {
		case status == http.StatusTooManyRequests:
			b.RateLimited(backend.RetryAfter(upResp.Header.Peek, time.Now()))
			reason = reasonRateLimited
		case failoverStatus(status):
			b.Failed(probe)
			reason = statusLabel(status)
		default:
			b.Succeeded()
		}
		outcome(statusLabel(status))
	}
	if reason != "" {
		c.holdResponse(stream)
		c.heldBackend = b
		return reason
	}
	c.discardHeld() // an earlier attempt's answer, whose connection a stream would keep open
	h.deliver(c, upResp, stream)
	return ""
}

// upstreamRequests hold upstream requests' heads while they are sent: a call's is let go when
// its attempt's request is out (Transport.Send keeps nothing of it).
var upstreamRequests = sync.Pool{New: func() any { return new(transport.Request) }}

// deliver answers the caller with an upstream response: the caller's own, into which the
// answer was read, or one held from an earlier attempt.
func (h *Handler) deliver(c *call, upResp *fasthttp.Response, stream *transport.Stream) {
	resp := &c.fc.Response
	if upResp != resp {
		upResp.CopyTo(resp)
		fasthttp.ReleaseResponse(upResp)
	}
	c.kept.apimID, c.kept.region = cleanResponse(&resp.Header, c.id)
	c.status = resp.StatusCode()
	if stream == nil {
		c.bytesOut = len(resp.Body())
		return
	}
	h.stream(c, stream)
}

// exhausted answers a call that found no (further) backend to try or ran out of attempts or
// retry budget. If part of the pool is only resting from rate limits, capacity exists: the
// caller is told to come back then (429 with Retry-After), with Azure's own 429 when this call
// got one from the backend back soonest. Otherwise the caller gets what the last attempt got,
// or, if nothing was attempted, 503 with Retry-After for the soonest recovery.
func (h *Handler) exhausted(c *call, d *deployment) {
	if until, first, ok := d.pool.Cooling(); ok {
		if c.heldResp != nil && c.heldResp.StatusCode() == http.StatusTooManyRequests && c.heldBackend == first {
			h.answerHeld(c)
			return
		}
		h.rateLimited(c, d, until)
		return
	}
	if c.heldResp != nil || c.heldErr != nil {
		h.answerHeld(c)
		return
	}
	until, _, _ := d.pool.Recovery(0)
	h.unavailable(c, errorf(http.StatusServiceUnavailable, CodeNoCapacity,
		"every backend of deployment %q is unavailable (failing, circuit open)", d.name), until)
}

// answerHeld answers with what the last attempt got.
func (h *Handler) answerHeld(c *call) {
	if c.heldResp != nil {
		resp, stream := c.heldResp, c.heldStream
		c.heldResp, c.heldStream = nil, nil
		h.deliver(c, resp, stream)
		return
	}
	h.proxyError(c, c.heldErr)
}

// capacityWait is how long to wait, within wait_for_capacity, for a backend the call may still
// use (not one that failed it) to come back: 0 if none will within it, and -1 if one has come
// back already, between the pick that found none and now (its rest or open circuit ran out).
func (h *Handler) capacityWait(d *deployment, failed backend.Tried, waited time.Duration) time.Duration {
	until, first, _ := d.pool.Recovery(failed)
	if first == nil {
		return 0
	}
	w := time.Until(until)
	if w <= 0 {
		return -1
	}
	if w <= h.res.WaitForCapacity-waited {
		return w
	}
	return 0
}

// rateLimited answers 429: the deployment's capacity is resting until until.
func (h *Handler) rateLimited(c *call, d *deployment, until time.Time) {
	h.unavailable(c, errorf(http.StatusTooManyRequests, CodeNoCapacity,
		"every backend of deployment %q that could take the call is rate-limited", d.name), until)
}

// unavailable answers e with Retry-After and Retry-After-Ms for until.
func (h *Handler) unavailable(c *call, e *apiError, until time.Time) {
	c.discardHeld()
	wait := max(time.Until(until), 0)
	e.message += fmt.Sprintf("; retry after %d ms", wait.Milliseconds())
	c.code, c.err, c.status = e.code, e, e.status
	writeError(c.fc, e, c.id)
	hdr := &c.fc.Response.Header
	hdr.Set("Retry-After", strconv.FormatInt(int64(math.Ceil(wait.Seconds())), 10))
	hdr.Set("Retry-After-Ms", strconv.FormatInt(wait.Milliseconds(), 10))
}

// clearResponse empties the caller's response for another answer. fasthttp's Reset also
// clears what the server set on it for the call: the one setting the gateway's server makes
// there, NoDefaultContentType (a proxy does not invent a Content-Type its upstream did not
// send), is made again.
func clearResponse(r *fasthttp.Response) {
	r.Reset()
	r.Header.SetNoDefaultContentType(true)
}

// holdResponse keeps a failed attempt's answer, read into the caller's response, in case no
// other backend can do better; the caller's response is left empty for the next attempt.
func (c *call) holdResponse(stream *transport.Stream) {
	c.discardHeld()
	held := fasthttp.AcquireResponse()
	c.fc.Response.CopyTo(held)
	clearResponse(&c.fc.Response)
	c.heldResp, c.heldStream = held, stream
}

// holdError keeps a failed attempt's error in case no other backend can do better.
func (c *call) holdError(err error) {
	c.discardHeld()
	c.heldErr = err
}

func (c *call) discardHeld() {
	c.heldErr = nil
	if c.heldStream != nil {
		c.heldStream.Close()
		c.heldStream = nil
	}
	if c.heldResp != nil {
		fasthttp.ReleaseResponse(c.heldResp)
		c.heldResp = nil
	}
}

// sleepCtx waits d or until ctx is done, reporting whether the full wait happened.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
