package entra

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strings"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/runtime"
)

// hints turn Entra error codes into what an operator should do. They are the codes seen when a
// gateway is being set up or a secret rotated (see the README's troubleshooting section).
var hints = map[int]string{
	7000215: "the client secret is wrong: use the secret's Value, not its Secret ID",
	7000222: "the client secret has expired: create a new one under the app's Certificates & secrets",
	7000218: "no client secret or assertion reached Entra",
	700016:  "the client_id is not an application in this tenant: check client_id and tenant_id, and that the app is registered in this tenant",
	700027:  "the certificate is not registered on the app (upload its public part under Certificates & secrets) or the assertion it signed is invalid",
	700024:  "the assertion is outside its validity window: check the clock, and for workload identity that the token file is being refreshed",
	90002:   "the tenant does not exist in this cloud: check tenant_id and authority_host",
	900023:  "tenant_id is malformed",
	50049:   "the authority does not serve this tenant: set authority_host for the tenant's cloud",
	500011:  "the scope's resource is not known in this tenant: check the upstream's scope",
	1002012: "the scope must be a resource followed by /.default",
	700211:  "no federated credential on the app trusts this token's issuer: the app's federated credential must name the cluster's OIDC issuer URL",
	700212:  "the federated token's audience is not the one the federated credential expects (normally api://AzureADTokenExchange)",
	700213:  "no federated credential on the app matches this token's subject: it must be system:serviceaccount:<namespace>:<service account>",
	90033:   "Entra is temporarily unavailable; the gateway keeps retrying with back-off",
}

// entraError is Entra's token endpoint error body; App Service managed identity endpoints
// answer {statusCode, message} instead.
type entraError struct {
	Error         string `json:"error"`
	Description   string `json:"error_description"`
	Codes         []int  `json:"error_codes"`
	TraceID       string `json:"trace_id"`
	CorrelationID string `json:"correlation_id"`
	Message       string `json:"message"`
}

// explain turns an azidentity error into one line an operator can act on. It never includes
// request bodies (which carry secrets and assertions), only what the identity provider said.
func explain(ctx context.Context, typ string, err error) error {
	if ctx.Err() != nil {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return fmt.Errorf("%s: timed out waiting for the identity provider: %w", typ, ctx.Err())
		}
		return ctx.Err()
	}
	afe, ok := errorOf(err)
	if !ok {
		var ne net.Error
		var oe *net.OpError
		switch {
		case errors.As(err, &oe):
			return fmt.Errorf("%s: cannot reach the identity provider: %v", typ, oe)
		case errors.As(err, &ne):
			return fmt.Errorf("%s: network error talking to the identity provider: %v", typ, ne)
		}
		// azidentity's own message (credential unavailable, CLI not logged in, ...): one line.
		return fmt.Errorf("%s", firstLines(err.Error(), 3))
	}
	resp := afe.RawResponse
	where := ""
	if resp.Request != nil && resp.Request.URL != nil {
		where = " from " + resp.Request.URL.Host
	}
	body, _ := runtime.Payload(resp)
	var e entraError
	if json.Unmarshal(body, &e) != nil || (e.Error == "" && e.Message == "") {
		return fmt.Errorf("%s: the identity provider answered HTTP %d%s: %s", typ, resp.StatusCode, where, firstLines(string(body), 1))
	}
	if e.Message != "" && e.Error == "" {
		return fmt.Errorf("%s: the managed identity endpoint answered HTTP %d: %s", typ, resp.StatusCode, e.Message)
	}
	desc := e.Description
	// Entra appends "Trace ID: … Correlation ID: … Timestamp: …"; keep them once, at the end.
	if i := strings.Index(desc, " Trace ID:"); i >= 0 {
		desc = desc[:i]
	}
	if i := strings.Index(desc, "\r\n"); i >= 0 {
		desc = desc[:i]
	}
	msg := fmt.Sprintf("%s: Entra rejected the token request (HTTP %d %s): %s", typ, resp.StatusCode, e.Error, desc)
	if len(e.Codes) > 0 {
		if h, ok := hints[e.Codes[0]]; ok {
			msg += " Hint: " + h + "."
		}
	}
	if e.TraceID != "" {
		msg += fmt.Sprintf(" (trace ID %s, correlation ID %s)", e.TraceID, e.CorrelationID)
	}
	return errors.New(msg)
}

func firstLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[:n]
	}
	out := strings.Join(lines, " ")
	if len(out) > 500 {
		out = out[:500] + "…"
	}
	return out
}
