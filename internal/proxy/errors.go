package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/tokenproxy/tokenproxy/internal/broker"
)

// Error codes the gateway answers with. They are stable: clients and alerts may match on them.
const (
	CodeInvalidRequest        = "InvalidRequest"
	CodeInvalidPath           = "InvalidPath"
	CodeMissingAPIVersion     = "MissingApiVersionParameter"
	CodeInvalidBody           = "InvalidRequestBody"
	CodeMissingModel          = "MissingModel"
	CodeUnauthorized          = "Unauthorized"
	CodeForbidden             = "PermissionDenied"
	CodeNotFound              = "NotFound"
	CodeMethodNotAllowed      = "MethodNotAllowed"
	CodeDeploymentNotFound    = "DeploymentNotFound"
	CodeRequestTooLarge       = "RequestTooLarge"
	CodeUpstreamUnreachable   = "UpstreamUnreachable"
	CodeTokenUnavailable      = "TokenUnavailable"
	CodeNoCapacity            = "NoCapacity"
	CodeTooManyCalls          = "TooManyConcurrentCalls"
	CodeCallerAuthUnavailable = "CallerAuthUnavailable"
	CodeUpstreamTimeout       = "UpstreamTimeout"
	CodeClientClosed          = "ClientClosedRequest"
	CodeInternal              = "InternalError"
)

// statusClientClosed is logged (as nginx does) when the caller went away before an answer.
const statusClientClosed = 499

// apiError is an answer the gateway decides itself.
type apiError struct {
	status     int
	code       string
	message    string
	retryAfter time.Duration // if set, sent as Retry-After
	// detail, if set, is logged with the error (Error) but not sent to the caller.
	detail string
}

func (e *apiError) Error() string {
	if e.detail != "" {
		return e.code + ": " + e.message + " (" + e.detail + ")"
	}
	return e.code + ": " + e.message
}

func errorf(status int, code, format string, args ...any) *apiError {
	return &apiError{status: status, code: code, message: fmt.Sprintf(format, args...)}
}

// statusFor maps any error on the request path to the status, code and caller-facing message.
// It is the one place where errors become HTTP answers.
func statusFor(err error, upstream string) *apiError {
	var ae *apiError
	var mbe *http.MaxBytesError
	var ne net.Error
	switch {
	case errors.As(err, &ae):
		return ae
	case errors.As(err, &mbe):
		return errorf(http.StatusRequestEntityTooLarge, CodeRequestTooLarge,
			"the request body exceeds the gateway's limit of %d bytes (max_request_bytes)", mbe.Limit)
	case errors.Is(err, broker.ErrNoToken):
		// The broker's error names the credential and the cause in operator terms.
		return errorf(http.StatusServiceUnavailable, CodeTokenUnavailable,
			"the gateway has no Entra token for upstream %q: %v", upstream, err)
	case errors.Is(err, context.Canceled):
		return errorf(statusClientClosed, CodeClientClosed, "the caller closed the request")
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return errorf(http.StatusGatewayTimeout, CodeUpstreamTimeout,
			"upstream %q did not answer in time (timeouts.response_header)", upstream)
	default:
		return errorf(http.StatusBadGateway, CodeUpstreamUnreachable,
			"upstream %q could not be reached", upstream)
	}
}

// writeError answers with the Azure error shape. x-ms-error-code carries the code as Azure does;
// x-tokenproxy-error marks the answer as the gateway's own, not the upstream's.
func writeError(fc *fasthttp.RequestCtx, e *apiError, requestID string) {
	if e.status == statusClientClosed {
		fc.SetConnectionClose() // nobody is listening
		return
	}
	resp := &fc.Response
	resp.SetStatusCode(e.status)
	resp.Header.SetContentType("application/json")
	resp.Header.Set("X-Ms-Error-Code", e.code)
	resp.Header.Set("X-Tokenproxy-Error", e.code)
	resp.Header.Set("X-Ms-Client-Request-Id", requestID)
	if e.retryAfter > 0 {
		resp.Header.Set("Retry-After", strconv.Itoa(int(math.Ceil(e.retryAfter.Seconds()))))
	}
	resp.SetBody(marshalError(e.code, e.message))
}

type errorBody struct {
	Error struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

func marshalError(code, message string) []byte {
	var e errorBody
	e.Error.Code, e.Error.Message = code, message
	b, _ := json.Marshal(e) // cannot fail; invalid UTF-8 is replaced
	return b
}
