package proxy

import (
	"encoding/base64"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/tokenproxy/tokenproxy/internal/callertoken"
	"github.com/tokenproxy/tokenproxy/internal/config"
	"github.com/tokenproxy/tokenproxy/internal/emulator"
)

const (
	gatewayAppID = "55555555-5555-5555-5555-555555555555" // the gateway's own app registration
	a360AppID    = "44444444-4444-4444-4444-444444444444" // Automation 360's OAuth connection
)

// entraGateway admits a360-oauth by app ID and ops-tools by app role, beside the key callers.
func entraGateway(t *testing.T) *gateway {
	t.Helper()
	g := newGateway(t, func(c *config.Config) {
		c.Callers = append(c.Callers,
			&config.Caller{Name: "a360-oauth", Deployments: []string{"gpt-4.1-mini"}, Entra: &config.EntraCaller{
				TenantID: emulator.DefaultTenantID, Audiences: []string{"api://tokenproxy", gatewayAppID},
				AppIDs: []string{a360AppID}, AuthorityHost: authorityOf(c),
			}},
			&config.Caller{Name: "ops-tools", Deployments: []string{"*"}, Entra: &config.EntraCaller{
				TenantID: emulator.DefaultTenantID, Audiences: []string{gatewayAppID}, Roles: []string{"Gateway.Invoke"},
				AuthorityHost: authorityOf(c),
			}},
		)
	})
	g.emu.AddResource(emulator.Resource{URI: "api://tokenproxy", AppID: gatewayAppID, Version: 2})
	g.emu.AddResource(emulator.Resource{URI: "api://tokenproxy-v1", Version: 1})
	g.emu.AddResource(emulator.Resource{URI: "api://someone-else", AppID: "66666666-6666-6666-6666-666666666666", Version: 2})
	g.emu.AddApp(emulator.App{TenantID: emulator.DefaultTenantID, ClientID: a360AppID})
	g.emu.AddApp(emulator.App{TenantID: emulator.DefaultTenantID, ClientID: "ops-app", Roles: []string{"Gateway.Invoke"}})
	g.emu.AddApp(emulator.App{TenantID: emulator.DefaultTenantID, ClientID: "stranger-app"})
	return g
}

// authorityOf is the emulated Entra the test gateway's credential uses.
func authorityOf(c *config.Config) string { return c.Credentials["corp-app"].AuthorityHost }

func (g *gateway) entraToken(clientID, resource string) string {
	g.t.Helper()
	tok, err := g.emu.IssueToken(clientID, resource)
	if err != nil {
		g.t.Fatal(err)
	}
	return tok
}

func TestEntraCallers(t *testing.T) {
	g := entraGateway(t)
	a360 := g.entraToken(a360AppID, "api://tokenproxy")

	resp, body := g.do("POST", chatPath, map[string]string{"Authorization": "Bearer " + a360}, chatBody)
	if resp.StatusCode != 200 {
		t.Fatalf("A360's Entra token got %d %s, want 200", resp.StatusCode, body)
	}
	up := g.emu.OpenAI.Requests()[0]
	if got := up.Header.Get("Authorization"); got == "Bearer "+a360 || up.Claims.AppID != g.emu.ClientID {
		t.Error("the caller's token reached the upstream instead of the gateway's")
	}
	for k, vs := range up.Header {
		for _, v := range vs {
			if strings.Contains(v, a360[len(a360)-40:]) {
				t.Errorf("the caller's token reached the upstream in %s", k)
			}
		}
	}
	if !strings.Contains(g.logs.String(), `"caller":"a360-oauth"`) {
		t.Error("the call is not logged as a360-oauth's")
	}

	for _, tt := range []struct {
		name   string
		token  string
		path   string
		status int
	}{
		{"v1 token", g.entraToken(a360AppID, "api://tokenproxy-v1"), chatPath, 401}, // api://tokenproxy-v1 is no audience of ours
		{"outside the caller's allow-list", a360, "/openai/deployments/gpt-4o/chat/completions?api-version=1", 403},
		{"an app that is no caller", g.entraToken("stranger-app", "api://tokenproxy"), chatPath, 403},
		{"an app holding the role", g.entraToken("ops-app", "api://tokenproxy"), "/openai/deployments/gpt-4o/chat/completions?api-version=1", 200},
		{"another audience", g.entraToken(a360AppID, "api://someone-else"), chatPath, 401},
		{"a token for Azure itself", g.entraToken(a360AppID, emulator.CognitiveServicesResource), chatPath, 401},
	} {
		t.Run(tt.name, func(t *testing.T) {
			resp, body := g.do("POST", tt.path, map[string]string{"Authorization": "Bearer " + tt.token}, chatBody)
			if resp.StatusCode != tt.status {
				t.Errorf("got %d %s, want %d", resp.StatusCode, body, tt.status)
			}
		})
	}

	g.emu.SetTokenLifetime(-time.Minute, 0)
	expired := g.entraToken(a360AppID, "api://tokenproxy")
	if resp, body := g.do("POST", chatPath, map[string]string{"Authorization": "Bearer " + expired}, chatBody); resp.StatusCode != 401 || !strings.Contains(body, "expired") {
		t.Errorf("an expired token got %d %s, want 401 saying it expired", resp.StatusCode, body)
	}
	// Key callers work beside Entra callers.
	if resp, _ := g.do("POST", chatPath, map[string]string{"api-key": keyProd}, chatBody); resp.StatusCode != 200 {
		t.Errorf("a key caller got %d beside Entra callers", resp.StatusCode)
	}
}

func TestEntraCallersByPrincipal(t *testing.T) {
	// principal: app admits only an application's own tokens; user, only a user's, obtained
	// through the application. Unset, either (a360-oauth above). Each refusal says which the
	// token was.
	const user = "77777777-7777-7777-7777-777777777777"
	for _, tt := range []struct{ principal, app, user string }{
		{config.PrincipalApp, "", "issued to a user, through the application"},
		{config.PrincipalUser, "issued to the application itself", ""},
		{config.PrincipalAny, "", ""},
	} {
		t.Run(tt.principal, func(t *testing.T) {
			g := newGateway(t, func(c *config.Config) {
				c.Callers = append(c.Callers, &config.Caller{Name: "a360-oauth", Deployments: []string{"gpt-4.1-mini"}, Entra: &config.EntraCaller{
					TenantID: emulator.DefaultTenantID, Audiences: []string{gatewayAppID}, AppIDs: []string{a360AppID},
					Principal: tt.principal, AuthorityHost: authorityOf(c),
				}})
			})
			g.emu.AddResource(emulator.Resource{URI: "api://tokenproxy", AppID: gatewayAppID, Version: 2})
			g.emu.AddApp(emulator.App{TenantID: emulator.DefaultTenantID, ClientID: a360AppID})
			delegated, err := g.emu.IssueUserToken(a360AppID, "api://tokenproxy", user, "user_impersonation")
			if err != nil {
				t.Fatal(err)
			}
			for token, refusal := range map[string]string{g.entraToken(a360AppID, "api://tokenproxy"): tt.app, delegated: tt.user} {
				resp, body := g.do("POST", chatPath, map[string]string{"Authorization": "Bearer " + token}, chatBody)
				switch {
				case refusal == "" && resp.StatusCode != 200:
					t.Errorf("got %d %s, want 200", resp.StatusCode, body)
				case refusal != "" && (resp.StatusCode != 403 || !strings.Contains(body, refusal)):
					t.Errorf("got %d %s, want 403 saying %q", resp.StatusCode, body, refusal)
				}
			}
		})
	}
}

// A user's ID token for the gateway's own app registration has the audience, the user's oid
// and their app roles, and no scp: it would pass for an application's own token with a caller
// that goes by roles and principal: app. It is no access token, and is refused as none.
func TestAnIDTokenIsNoCredential(t *testing.T) {
	const user = "77777777-7777-7777-7777-777777777777"
	g := newGateway(t, func(c *config.Config) {
		c.Callers = append(c.Callers, &config.Caller{Name: "apps-only", Deployments: []string{"gpt-4.1-mini"}, Entra: &config.EntraCaller{
			TenantID: emulator.DefaultTenantID, Audiences: []string{gatewayAppID}, Roles: []string{"Gateway.Invoke"},
			Principal: config.PrincipalApp, AuthorityHost: authorityOf(c),
		}})
	})
	idToken, err := g.emu.IssueIDToken(emulator.DefaultTenantID, gatewayAppID, user, []string{"Gateway.Invoke"})
	if err != nil {
		t.Fatal(err)
	}
	resp, body := g.do("POST", chatPath, map[string]string{"Authorization": "Bearer " + idToken}, chatBody)
	if resp.StatusCode != 401 || !strings.Contains(body, "not an access token") {
		t.Errorf("a user's ID token got %d %s, want 401", resp.StatusCode, body)
	}
}

func TestATenantAtTwoAuthoritiesIsRefused(t *testing.T) {
	// Tenants' v1 tokens are issued by sts.windows.net whatever the authority host named: one
	// tenant named at two hosts would have its v1 tokens checked against either's keys.
	cfg := config.Default()
	for i, host := range []string{"", "https://login.example.test/", ""} {
		cfg.Callers = append(cfg.Callers, &config.Caller{Name: fmt.Sprint("c", i), Entra: &config.EntraCaller{
			TenantID: emulator.DefaultTenantID, Audiences: []string{gatewayAppID}, AppIDs: []string{a360AppID}, AuthorityHost: host,
		}})
		_, err := newCallers(cfg, &loads{}, callertoken.NewRegistry(callertoken.Options{}))
		if want := `caller "c1": tenant ` + emulator.DefaultTenantID + " is named at two authority hosts"; i == 0 && err != nil || i > 0 && (err == nil || !strings.Contains(err.Error(), want)) {
			t.Errorf("with %d callers: got %v", i+1, err)
		}
	}
}

func TestEntraTokenRefusalsQuoteNoKey(t *testing.T) {
	// Why a token is refused may quote what its header says (its key ID, its algorithm), which the
	// caller chooses. Where that holds a caller's key, the answer and the log say less; otherwise
	// they say it, for whoever has to find out why a token is refused.
	g := entraGateway(t)
	tok := g.entraToken(a360AppID, "api://tokenproxy")
	_, rest, _ := strings.Cut(tok, ".")
	withHeader := func(h string) string { return base64.RawURLEncoding.EncodeToString([]byte(h)) + "." + rest }
	for _, tc := range []struct{ name, token, says string }{
		{"another caller's key as the key ID", withHeader(`{"alg":"RS256","typ":"JWT","kid":"` + keyProd + `"}`), ""},
		{"another caller's key as the algorithm", withHeader(`{"alg":"` + keyProd + `","typ":"JWT","kid":"x"}`), ""},
		{"a key ID the tenant does not have", withHeader(`{"alg":"RS256","typ":"JWT","kid":"rotated-away-2025"}`), "rotated-away-2025"},
		{"a key ID too long to quote", withHeader(`{"alg":"RS256","typ":"JWT","kid":"` + keyProd + strings.Repeat("x", 40) + `"}`), "a key ID of 73 characters"},
		{"the algorithm named twice", withHeader(`{"alg":"` + keyProd + `","ALG":"RS256","typ":"JWT","kid":"x"}`), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(g.logs.String())
			resp, body := g.do("POST", chatPath, map[string]string{"Authorization": "Bearer " + tc.token}, chatBody)
			if resp.StatusCode != 401 || !strings.Contains(body, CodeUnauthorized) {
				t.Fatalf("got %d %s, want 401", resp.StatusCode, body)
			}
			logs := g.logs.String()[before:]
			if strings.Contains(body, keyProd) || strings.Contains(logs, keyProd) {
				t.Errorf("a caller's key is quoted: %s\n%s", body, logs)
			}
			if !strings.Contains(body, tc.says) {
				t.Errorf("the answer %s does not say %q", body, tc.says)
			}
		})
	}
}

// An algorithm padded so that an error quoting it would be cut within a key: the key was then
// no longer found as one, and went out whole or nearly.
func TestEntraTokenPaddedAlgorithmQuotesNoKey(t *testing.T) {
	g := entraGateway(t)
	tok := g.entraToken(a360AppID, "api://tokenproxy")
	_, rest, _ := strings.Cut(tok, ".")
	for pad := 60; pad < 200; pad += 7 {
		h := `{"alg":"` + strings.Repeat("A", pad) + " " + keyProd + `","typ":"JWT","kid":"x"}`
		before := len(g.logs.String())
		resp, body := g.do("POST", chatPath, map[string]string{"Authorization": "Bearer " + base64.RawURLEncoding.EncodeToString([]byte(h)) + "." + rest}, chatBody)
		logs := g.logs.String()[before:]
		if resp.StatusCode != 401 || strings.Contains(body+logs, keyProd[:12]) {
			t.Fatalf("padding %d: got %d %s\n%s", pad, resp.StatusCode, body, logs)
		}
	}
}

func TestEntraV1Tokens(t *testing.T) {
	g := newGateway(t, func(c *config.Config) {
		c.Callers = append(c.Callers, &config.Caller{Name: "legacy", Deployments: []string{"*"}, Entra: &config.EntraCaller{
			TenantID: emulator.DefaultTenantID, Audiences: []string{"api://tokenproxy-v1"}, AppIDs: []string{a360AppID},
			AuthorityHost: authorityOf(c),
		}})
	})
	g.emu.AddResource(emulator.Resource{URI: "api://tokenproxy-v1", Version: 1})
	g.emu.AddApp(emulator.App{TenantID: emulator.DefaultTenantID, ClientID: a360AppID})
	if resp, body := g.do("POST", chatPath, map[string]string{"Authorization": "Bearer " + g.entraToken(a360AppID, "api://tokenproxy-v1")}, chatBody); resp.StatusCode != 200 {
		t.Errorf("a v1 token got %d %s, want 200", resp.StatusCode, body)
	}
}

func TestEntraTokensAreVerifiedOnceThenRemembered(t *testing.T) {
	g := entraGateway(t)
	tok := g.entraToken(a360AppID, "api://tokenproxy")
	g.do("POST", chatPath, map[string]string{"Authorization": "Bearer " + tok}, chatBody)
	fetches := g.emu.JWKSFetches()
	g.emu.SetDown(true) // Entra is unreachable: a token already verified keeps working
	for range 20 {
		if resp, _ := g.do("POST", chatPath, map[string]string{"Authorization": "Bearer " + tok}, chatBody); resp.StatusCode != 200 {
			t.Fatalf("a verified token got %d while Entra was down", resp.StatusCode)
		}
	}
	if n := g.emu.JWKSFetches() - fetches; n != 0 {
		t.Errorf("%d key fetches for a token already verified", n)
	}
}

func TestEntraUnreachableAtFirstUse(t *testing.T) {
	g := entraGateway(t)
	tok := g.entraToken(a360AppID, "api://tokenproxy")
	g.emu.SetDown(true)
	resp, body := g.do("POST", chatPath, map[string]string{"Authorization": "Bearer " + tok}, chatBody)
	if resp.StatusCode != 503 || !strings.Contains(body, CodeCallerAuthUnavailable) {
		t.Errorf("got %d %s, want 503 CallerAuthUnavailable", resp.StatusCode, body)
	}
	if len(g.emu.OpenAI.Requests()) != 0 {
		t.Error("an unverified call reached the upstream")
	}
	// Why is logged; the caller, not authenticated, is not told where the keys are or what the
	// authority answered.
	host := strings.TrimSuffix(strings.TrimPrefix(g.emu.URL(), "https://"), "/")
	if strings.Contains(body, host) || strings.Contains(body, "discovering") {
		t.Errorf("the caller is told the detail: %s", body)
	}
	if line := logLine(t, g, resp.Header.Get("X-Ms-Client-Request-Id")); !strings.Contains(fmt.Sprint(line["error"]), "discovering tenant") {
		t.Errorf("the log does not say why: %v", line["error"])
	}
}

func TestAReloadKeepsTheTokenWait(t *testing.T) {
	// Timeouts take effect at a restart, as the reload's log says: the wait for a caller's
	// token keys (timeouts.token_acquire) too, though it is kept with the callers.
	g := newGateway(t)
	cfg := *g.cfg
	cfg.Timeouts.TokenAcquire += time.Hour
	if err := g.handler.SetCallers(&cfg); err != nil {
		t.Fatal(err)
	}
	if got := g.handler.callers.Load().tokenWait; got != g.cfg.Timeouts.TokenAcquire {
		t.Errorf("after a reload the wait is %v, want the start's %v", got, g.cfg.Timeouts.TokenAcquire)
	}
}
