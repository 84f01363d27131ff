package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/google/uuid"

	"github.com/tokenproxy/tokenproxy/internal/emulator"
)

func runEmulator(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("emulator", "[--dir DIR]",
		"Run the Entra ID, managed identity and Azure OpenAI emulator on its own, for trying a\n"+
			"configuration or a client locally. It prints the environment to point a gateway at it:\n"+
			"SSL_CERT_FILE trusts its authority, IDENTITY_ENDPOINT/IDENTITY_HEADER serve a managed\n"+
			"identity, and a client secret app is registered. Ctrl-C stops it.", stderr)
	dir := fs.String("dir", "", "`directory` for the CA certificate (default: a new temporary directory)")
	if err := parseFlags(fs, args, stdout); err != nil {
		return err
	}
	emu, err := emulator.Start(emulator.Options{})
	if err != nil {
		return err
	}
	defer emu.Close()
	mi := emu.AddManagedIdentity(emulator.ManagedIdentity{TenantID: emu.TenantID, ClientID: uuid.NewString(), SystemAssigned: true})
	if *dir == "" {
		if *dir, err = os.MkdirTemp("", "tokenproxy-emulator-"); err != nil {
			return err
		}
		defer os.RemoveAll(*dir)
	}
	caFile := filepath.Join(*dir, "emulator-ca.pem")
	if err := os.WriteFile(caFile, emu.CA().CertPEM(), 0o644); err != nil {
		return err
	}
	endpoint, header := emu.ManagedIdentityEnv()
	fmt.Fprintf(stdout, `# tokenproxy emulator: Entra ID, managed identity and Azure OpenAI on loopback.
export SSL_CERT_FILE=%s
export IDENTITY_ENDPOINT=%s
export IDENTITY_HEADER=%s
export EMULATOR_AUTHORITY_HOST=%s
export EMULATOR_TENANT_ID=%s
export EMULATOR_CLIENT_ID=%s
export EMULATOR_CLIENT_SECRET=%s
export EMULATOR_MANAGED_IDENTITY_CLIENT_ID=%s
export EMULATOR_OPENAI_URL=%s
# ready
`, caFile, endpoint, header, emu.URL(), emu.TenantID, emu.ClientID, emu.ClientSecret, mi.ClientID, emu.OpenAI.URL())
	<-ctx.Done()
	return nil
}
