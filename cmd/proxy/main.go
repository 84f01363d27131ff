// Command proxy is a keyless gateway to Azure AI: callers present a gateway key, the gateway
// presents an Entra ID token. Run `proxy --help` for the commands.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdin, os.Stdout, os.Stderr)
	switch {
	case err == nil:
	case errors.Is(err, errUsage):
		os.Exit(2)
	default:
		if !errors.Is(err, errReported) {
			fmt.Fprintln(os.Stderr, "proxy:", err)
		}
		os.Exit(1)
	}
}
