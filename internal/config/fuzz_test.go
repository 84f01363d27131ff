package config

import (
	"os"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// FuzzParse holds Parse to never panicking, whatever the file, and to errors that never quote
// a secret: neither the environment's nor anything in the file shaped like one (mayBeSecret),
// wherever it was put.
func FuzzParse(f *testing.F) {
	const secret = "Xy8Q~abcdefghSECRETVALUE"
	if b, err := os.ReadFile("../../examples/proxy.yaml"); err == nil {
		f.Add(b)
	}
	for _, s := range []string{
		"upstreams:\n  up: {url: \"https://x.openai.azure.com\", credential: app}\n",
		"credentials:\n  app: {type: client_secret, tenant_id: \"${AZURE_CLIENT_SECRET}\", client_id: c1, client_secret: s}\n",
		"max_concurrent: ${AZURE_CLIENT_SECRET}\nlog_level: tpk_q8Zr0mVh3kP1xY7nL2cB5wD9sF4gJ6tA0eU3iO8yR1\n",
		"deployments:\n  Kp4wR9tZ2mQ7vX1nKp4w: {upstream: Kp4wR9tZ2mQ7vX1nKp4w}\ncallers:\n  - {name: eyJhbGciOi, key_env: [eyJhbGciOi]}\n",
		"credentials:\n  app: {type: client_secret, tenant_id: t, client_id: c, client_secret: correcthorsebattery}\nlog_level: correcthorsebattery\n",
		"a: &x {b: 1}\nc: *x\n",
		"credentials:\n  app: {certificate_password: *Gx7kP2mQ9vR4tZ8wL3nB}\n",
		"credentials:\n  app: {client_secret: \"${tpk_q8Zr0mVh3kP1xY7nL2cB5wD9sF4gJ6tA0eU3iO8yR1}\"}\n",
	} {
		f.Add([]byte(s))
	}
	dir := f.TempDir()
	getenv := env(map[string]string{"AZURE_CLIENT_SECRET": secret})
	f.Fuzz(func(t *testing.T, data []byte) {
		_, err := Parse(data, dir, getenv)
		if err == nil {
			return
		}
		msg := err.Error()
		if strings.Contains(msg, secret) {
			t.Fatalf("the error quotes the environment's secret: %s", msg)
		}
		var doc yaml.Node
		if yaml.Unmarshal(data, &doc) != nil {
			// Not a document: what YAML's error quotes of it (an alias's name, a value's
			// start) must not be a secret-shaped word of it.
			for _, w := range strings.FieldsFunc(string(data), func(r rune) bool {
				return r <= ' ' || strings.ContainsRune("\"'`,:[]{}#&*!|>%@", r)
			}) {
				if len(w) >= minEchoedSecret && mayBeSecret(w) && strings.Contains(msg, w) {
					t.Fatalf("the error quotes %q, which may be a secret: %s", w, msg)
				}
			}
			return
		}
		for _, s := range mayBeSecrets(&doc) {
			if strings.Contains(msg, s) {
				t.Fatalf("the error quotes %q, which may be a secret: %s", s, msg)
			}
		}
	})
}
