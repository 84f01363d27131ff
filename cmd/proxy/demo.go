package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/tokenproxy/tokenproxy/internal/broker/entra"
	"github.com/tokenproxy/tokenproxy/internal/config"
	"github.com/tokenproxy/tokenproxy/internal/emulator"
)

func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("demo", "[--listen ADDR] [--admin-listen ADDR] [--log-format console|json]",
		"Run the gateway in front of a built-in emulator of Entra ID and Azure OpenAI, with nothing\n"+
			"to set up: it prints the URLs, a caller key and curl commands to try. Ctrl-C stops it.\n"+
			"The emulator checks the gateway's token as Azure would and refuses api-key, so every call\n"+
			"shows the real azidentity path at work.", stderr)
	listenAddr := fs.String("listen", config.DefaultListen, "API `address` (a free port is used if this one is taken)")
	adminAddr := fs.String("admin-listen", config.DefaultAdminListen, "admin `address` (a free port is used if this one is taken)")
	logFormat := fs.String("log-format", "console", "log format: console or json")
	if err := parseFlags(fs, args, stdout); err != nil {
		return err
	}
	emu, err := emulator.Start(emulator.Options{})
	if err != nil {
		return err
	}
	defer emu.Close()
	emu.OpenAI.SetChunkInterval(80 * time.Millisecond) // so streaming is visible

	key := newKey()
	cfg := config.Default()
	cfg.Listen, cfg.AdminListen, cfg.LogFormat = *listenAddr, *adminAddr, *logFormat
	cfg.Timeouts.ShutdownDelay = 0
	cfg.Credentials = map[string]*config.Credential{"demo-app": {
		Type: config.TypeClientSecret, TenantID: emu.TenantID, ClientID: emu.ClientID,
		ClientSecret: config.Secret(emu.ClientSecret), AuthorityHost: emu.URL(),
	}}
	cfg.Upstreams = map[string]*config.Upstream{"emulator": {URL: emu.OpenAI.URL(), Credential: "demo-app"}}
	cfg.Deployments = map[string]*config.Deployment{
		"gpt-4.1-mini":           {Upstream: "emulator", Deployment: "deploy-gpt-4.1"},
		"gpt-4o":                 {Upstream: "emulator"},
		"text-embedding-3-small": {Upstream: "emulator"},
	}
	cfg.Callers = []*config.Caller{{Name: "demo", KeySHA256: hashKey(key), Deployments: []string{config.AllDeployments}}}
	cfg.ApplyDefaults()
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("demo configuration: %w", err)
	}
	log, logOut, access, err := newLogger("info", *logFormat, stderr)
	if err != nil {
		return err
	}
	defer logOut.Stop()
	return serveGateway(ctx, gatewayOptions{
		cfg: cfg, log: log, logOut: logOut, access: access, stdout: stdout, fallbackPorts: true,
		entra:  entra.Options{HTTPClient: emu.CA().Client()},
		banner: func(apiURL, adminURL string) { printBanner(stdout, apiURL, adminURL, emu.URL(), key) },
	})
}

func printBanner(w io.Writer, apiURL, adminURL, entraURL, key string) {
	fmt.Fprintf(w, `
tokenproxy demo: the gateway in front of a local Entra ID and Azure OpenAI emulator.

  API        %[1]s
  Admin      %[2]s/metrics  %[2]s/readyz
  Entra      %[3]s (emulated; the gateway's client-secret credential signs in here)
  Caller key %[4]s

A chat completion (deployment gpt-4.1-mini is renamed to deploy-gpt-4.1 on the way):

  curl -sS '%[1]s/openai/deployments/gpt-4.1-mini/chat/completions?api-version=2024-10-21' \
    -H 'api-key: %[4]s' -H 'Content-Type: application/json' \
    -d '{"messages":[{"role":"user","content":"Hello from the demo"}]}'

A streamed chat completion from gpt-4o, OpenAI SDK style (the key as a bearer token, the
deployment as the body's model, on the /openai/v1 route):

  curl -sSN '%[1]s/openai/v1/chat/completions' \
    -H 'Authorization: Bearer %[4]s' -H 'Content-Type: application/json' \
    -d '{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"Stream to me"}]}'

Ctrl-C stops it.

`, apiURL, adminURL, entraURL, key)
}
