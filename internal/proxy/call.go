package proxy

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"regexp"
	"strings"
	"time"
	"unsafe"

	"github.com/google/uuid"
	"github.com/valyala/fasthttp"
	"go.uber.org/zap"

	"github.com/tokenproxy/tokenproxy/internal/backend"
	"github.com/tokenproxy/tokenproxy/internal/transport"
)

// call is one request's state, from routing to the access log.
type call struct {
	fc         *fasthttp.RequestCtx
	start      time.Time
	proxyStart time.Time // when the request was sent upstream
	headerAt   time.Time // when the upstream's response headers arrived
	id         string
	idBuf      [36]byte // a generated id's text (newID), which id then points into
	streaming  bool     // the body is streamed; the stream finishes the call
	aborted    bool     // the response was cut short (both here, in idBuf's padding)
	path       string   // as received, before any deployment rename
	query      string
	keys       *callers // the callers the call is checked against (its log's api_version too)

	caller, deployment, upstream string
	code                         string // gateway error code, if the gateway answered
	err                          error  // what went wrong, for the log
	status                       int
	bytesIn, bytesOut            int
	attempts                     int    // backends tried
	backend                      string // the last one, "upstream/deployment"

	// A failed attempt's answer, kept in case no other backend does better. heldStream is its
	// body, if streamed; or, from the delivery of an answer with a streamed body until its
	// hand-over (handedOver), that body, so that a panic on the way leaves it to be closed.
	heldResp    *fasthttp.Response
	heldStream  *transport.Stream
	heldErr     error
	heldBackend *backend.Backend // where heldResp came from

	admitted   *caller   // holds places in the concurrency limits until finish
	credential []byte    // the key or token the caller presented (the request's bytes), if any
	credStr    string    // the same, as a string
	bodyBuf    *[]byte   // the request body's buffer, from bodyBufs, until the handler returns
	wait       *connWait // the connection's read timeouts, if the server keeps them

	ctx   callCtx // cancelled to end the upstream call and any token wait
	watch watched // watches for the caller going away

	// kept is what the access log needs of the request and of the response delivered (Azure's
	// request ID and region). The response's point into fc's until the call detaches from it:
	// they are read as the answer is cleaned (deliver), not looked up again.
	kept struct{ method, apimID, region []byte }
}

// detach copies what the rest of the call needs from fc, which the server is about to reuse,
// and lets go of it.
func (c *call) detach() {
	c.kept.method = bytes.Clone(c.fc.Request.Header.Method())
	c.kept.apimID = bytes.Clone(c.kept.apimID)
	c.kept.region = bytes.Clone(c.kept.region)
	c.fc, c.credential = nil, nil
}

// newCall starts a call for the request in fc; clientID is the caller's X-Ms-Client-Request-Id
// (nil if none), which is the call's ID when requestID would keep it.
func newCall(fc *fasthttp.RequestCtx, cs *callers, clientID []byte) *call {
	start := fc.Time() // the server read the clock as the request came in
	if start.IsZero() {
		start = time.Now()
	}
	c := &call{fc: fc, start: start, keys: cs}
	if keepsRequestID(clientID, cs) {
		c.id = string(clientID)
	} else {
		c.newID()
	}
	return c
}

// now reads the clock for the call. It takes the monotonic clock's reading alone, one read of
// the system's clocks where time.Now makes two, and carries the wall time on from the call's
// start: a step of the wall clock during the call is not seen, as no duration may see it.
func (c *call) now() time.Time {
	return c.start.Add(time.Since(c.start))
}

// newID gives the call a new random (version 4) UUID as its request ID. The 122 random bits
// come from the runtime's generator (math/rand/v2's functions): ChaCha8, seeded from the
// system's randomness, a state per thread and no lock, ≈ 15 ns for the 16 bytes, where
// google/uuid's pool of crypto/rand bytes takes ≈ 70 behind a mutex. Request IDs are
// correlation IDs the caller sees, not secrets: nothing rests on their being unpredictable,
// only on their being unique. The text lives in the call itself: the ID is as long-lived as
// the call, so it needs no allocation of its own. The bytes are written once, before the
// string is made, and never after.
func (c *call) newID() {
	var u uuid.UUID
	binary.LittleEndian.PutUint64(u[:8], rand.Uint64())
	binary.LittleEndian.PutUint64(u[8:], rand.Uint64())
	u[6] = u[6]&0x0f | 0x40 // version 4
	u[8] = u[8]&0x3f | 0x80 // the RFC 9562 variant
	formatUUID(&c.idBuf, u)
	c.id = unsafe.String(&c.idBuf[0], len(c.idBuf))
}

// formatUUID writes u in its canonical form, as u.String() does.
func formatUUID(dst *[36]byte, u uuid.UUID) {
	const digits = "0123456789abcdef"
	j := 0
	for i, b := range u {
		if i == 4 || i == 6 || i == 8 || i == 10 {
			dst[j] = '-'
			j++
		}
		dst[j], dst[j+1] = digits[b>>4], digits[b&0xf]
		j += 2
	}
}

// finish runs once per request, last: it ends the upstream call, recovers a panic, then counts
// and logs the call.
func (h *Handler) finish(c *call, p any) {
	defer h.m.inflight.Dec() // last: a call counts as in flight until it is logged
	h.release(c)
	c.discardHeld()
	c.watch.stop()
	c.ctx.cancel()
	if p != nil {
		h.logPanic(c, p)
		c.code, c.err = CodeInternal, errInternal
		if c.fc != nil {
			// Part of a stream may have gone out before the panic: nothing follows the error.
			c.fc.SetConnectionClose()
			clearResponse(&c.fc.Response)
			c.kept.apimID, c.kept.region = nil, nil
			c.status = http.StatusInternalServerError
			writeError(c.fc, errorf(http.StatusInternalServerError, CodeInternal, "internal error (request %s)", c.id), c.id)
		} else {
			c.aborted = true // a relayed stream: its status is sent, the caller sees it cut
		}
	}
	status := c.status
	if status == 0 {
		status = statusClientClosed
	}
	end := c.now()
	h.observe(c, status, end)
	h.accessLog(c, status, end)
}

var errInternal = errors.New("internal error")

// logPanic logs a panic serving c: its value, scrubbed, and the stack; request headers are not.
func (h *Handler) logPanic(c *call, p any) {
	h.log.Error("panic serving request", zap.String("request_id", c.id), zap.String("panic", redactPanic(p, c.credStr)), zap.Stack("stack"))
}

// scrub removes the caller's credential from text that echoes what the caller sent (a path, a
// deployment name) before it goes to the log or back in an error: a key pasted in the wrong
// place is still a key.
func (c *call) scrub(s string) string {
	if c.credStr == "" || !strings.Contains(s, c.credStr) {
		return s
	}
	return strings.ReplaceAll(s, c.credStr, "[REDACTED]")
}

// jwtLike matches what looks like a JWT: an Entra access token or a caller's token.
var jwtLike = regexp.MustCompile(`eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*(\.[A-Za-z0-9_-]*)?`)

// redactPanic renders a recovered panic value for the log without the caller's credential or
// anything shaped like a token, whatever code down the stack put in it.
func redactPanic(p any, credential string) string {
	s := fmt.Sprint(p)
	if credential != "" {
		s = strings.ReplaceAll(s, credential, "[REDACTED]")
	}
	return jwtLike.ReplaceAllString(s, "[REDACTED]")
}

// apiVersion extracts api-version for the log; it is a date-like value, safe to log, and only
// kept when it looks like one.
func apiVersion(rawQuery string) string {
	for rawQuery != "" {
		var kv string
		kv, rawQuery, _ = strings.Cut(rawQuery, "&")
		if v, ok := strings.CutPrefix(kv, "api-version="); ok && len(v) <= 32 && saneID(v) {
			return v
		}
	}
	return ""
}

// requestID returns the caller's x-ms-client-request-id when it is a sane identifier and holds
// none of cs's keys (it goes upstream and to the log), else a new UUID. Caller-chosen IDs let a
// client correlate its logs with the gateway's and Azure's.
func requestID(h *fasthttp.RequestHeader, cs *callers) string {
	if id, ok := callerRequestID(h, cs); ok {
		return id
	}
	return uuid.NewString()
}

// callerRequestID returns the caller's x-ms-client-request-id if requestID would keep it.
func callerRequestID(h *fasthttp.RequestHeader, cs *callers) (string, bool) {
	if v := h.Peek("X-Ms-Client-Request-Id"); keepsRequestID(v, cs) {
		return string(v), true
	}
	return "", false
}

// keepsRequestID reports whether v, a caller's x-ms-client-request-id, may be the call's ID:
// it is a sane identifier and holds none of cs's keys (it goes upstream and to the log).
func keepsRequestID(v []byte, cs *callers) bool {
	return saneID(string(v)) && !cs.holdsKey(v)
}

func saneID(s string) bool {
	if s == "" || len(s) > 128 {
		return false
	}
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_', c == '.', c == ':':
		default:
			return false
		}
	}
	return true
}
