package proxy

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"strings"

	"github.com/tokenproxy/tokenproxy/internal/config"
)

// caller is an authenticated client and what it may use.
type caller struct {
	name    string
	all     bool            // "*": every deployment
	allowed map[string]bool // exposed deployment names
}

func (c *caller) may(deployment string) bool { return c.all || c.allowed[deployment] }

// anonymous stands for every caller when allow_unauthenticated is set and no key is sent.
var anonymous = &caller{name: "anonymous", all: true}

// keyring finds callers by the SHA-256 of their key. Only hashes are held, so a memory dump
// or a leaked config does not reveal usable keys.
type keyring struct {
	byHash          map[[sha256.Size]byte]*caller
	unauthenticated bool
}

func newKeyring(cfg *config.Config) (*keyring, error) {
	k := &keyring{byHash: map[[sha256.Size]byte]*caller{}, unauthenticated: cfg.AllowUnauthenticated}
	for _, c := range cfg.Callers {
		var h [sha256.Size]byte
		if n, err := hex.Decode(h[:], []byte(strings.ToLower(c.KeySHA256))); err != nil || n != len(h) {
			return nil, fmt.Errorf("caller %q: key_sha256 is not a hex SHA-256", c.Name)
		}
		cl := &caller{name: c.Name, allowed: map[string]bool{}}
		for _, d := range c.Deployments {
			if d == config.AllDeployments {
				cl.all = true
			}
			cl.allowed[d] = true
		}
		k.byHash[h] = cl
	}
	return k, nil
}

// authenticate identifies the caller from its api-key header (the Azure convention, and what
// Automation 360's CUSTOM_KEYS sends) or Authorization: Bearer (the OpenAI SDK convention).
// Exactly one key may be presented: two different ones are refused rather than guessed at.
func (k *keyring) authenticate(h http.Header) (*caller, *apiError) {
	key, err := presentedKey(h)
	if err != nil {
		return nil, err
	}
	if key == "" {
		if k.unauthenticated {
			return anonymous, nil
		}
		return nil, errorf(http.StatusUnauthorized, CodeUnauthorized,
			"missing gateway key: send it in the api-key header or as Authorization: Bearer <key>")
	}
	if c, ok := k.byHash[sha256.Sum256([]byte(key))]; ok {
		return c, nil
	}
	return nil, errorf(http.StatusUnauthorized, CodeUnauthorized, "unknown gateway key")
}

func presentedKey(h http.Header) (string, *apiError) {
	apiKeys := h["Api-Key"]
	auths := h["Authorization"]
	if len(apiKeys) > 1 || len(auths) > 1 {
		return "", errorf(http.StatusUnauthorized, CodeUnauthorized, "send a single api-key or Authorization header")
	}
	var fromAPIKey, fromBearer string
	if len(apiKeys) == 1 {
		fromAPIKey = strings.TrimSpace(apiKeys[0])
		if fromAPIKey == "" {
			return "", errorf(http.StatusUnauthorized, CodeUnauthorized, "the api-key header is empty")
		}
	}
	if len(auths) == 1 {
		scheme, token, ok := strings.Cut(strings.TrimSpace(auths[0]), " ")
		token = strings.TrimSpace(token)
		if !ok || !strings.EqualFold(scheme, "Bearer") || token == "" {
			return "", errorf(http.StatusUnauthorized, CodeUnauthorized, "the Authorization header must be Bearer <key>")
		}
		fromBearer = token
	}
	if fromAPIKey != "" && fromBearer != "" && fromAPIKey != fromBearer {
		return "", errorf(http.StatusUnauthorized, CodeUnauthorized, "api-key and Authorization carry different credentials; send one")
	}
	if fromAPIKey != "" {
		return fromAPIKey, nil
	}
	return fromBearer, nil
}
