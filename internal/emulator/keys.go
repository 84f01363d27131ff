package emulator

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math/big"
	"sync"

	"github.com/golang-jwt/jwt/v5"
)

// keySet is an RS256 signing key set with rotation, published as a JWKS. New tokens are signed
// with the newest key; older keys stay published until removed, as Entra does during rollover.
type keySet struct {
	mu   sync.RWMutex
	keys []*signingKey // newest last
}

type signingKey struct {
	kid string
	key *rsa.PrivateKey
}

func newKeySet() (*keySet, error) {
	ks := &keySet{}
	if err := ks.rotate(false); err != nil {
		return nil, err
	}
	return ks, nil
}

// rotate adds a new signing key; with dropOld, every older key is withdrawn from the JWKS.
func (ks *keySet) rotate(dropOld bool) error {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return fmt.Errorf("generating signing key: %w", err)
	}
	// Entra's kid and x5t are the same SHA-1 thumbprint (of the key's certificate).
	sum := sha1.Sum(key.PublicKey.N.Bytes())
	k := &signingKey{kid: base64.RawURLEncoding.EncodeToString(sum[:]), key: key}
	ks.mu.Lock()
	defer ks.mu.Unlock()
	if dropOld {
		ks.keys = nil
	}
	ks.keys = append(ks.keys, k)
	return nil
}

// sign signs claims with the newest key. Entra access tokens carry x5t besides kid; Kubernetes
// service account tokens carry only kid (which is also how the token endpoint tells a federated
// assertion from a certificate one).
func (ks *keySet) sign(claims jwt.MapClaims, x5t bool) (string, error) {
	ks.mu.RLock()
	k := ks.keys[len(ks.keys)-1]
	ks.mu.RUnlock()
	t := jwt.NewWithClaims(jwt.SigningMethodRS256, claims)
	t.Header["kid"] = k.kid
	if x5t {
		t.Header["x5t"] = k.kid
	}
	return t.SignedString(k.key)
}

// publicKey returns the published key with the given kid.
func (ks *keySet) publicKey(kid string) (*rsa.PublicKey, bool) {
	ks.mu.RLock()
	defer ks.mu.RUnlock()
	for _, k := range ks.keys {
		if k.kid == kid {
			return &k.key.PublicKey, true
		}
	}
	return nil, false
}

// jwks renders the published keys as a JSON Web Key Set.
func (ks *keySet) jwks(issuer string) []byte {
	type jwk struct {
		Kty    string   `json:"kty"`
		Use    string   `json:"use"`
		Kid    string   `json:"kid"`
		X5t    string   `json:"x5t"`
		N      string   `json:"n"`
		E      string   `json:"e"`
		Issuer string   `json:"issuer,omitempty"`
		Alg    string   `json:"alg"`
		X5c    []string `json:"x5c,omitempty"`
	}
	ks.mu.RLock()
	defer ks.mu.RUnlock()
	out := struct {
		Keys []jwk `json:"keys"`
	}{}
	for _, k := range ks.keys {
		out.Keys = append(out.Keys, jwk{
			Kty: "RSA", Use: "sig", Kid: k.kid, X5t: k.kid, Alg: "RS256", Issuer: issuer,
			N: base64.RawURLEncoding.EncodeToString(k.key.PublicKey.N.Bytes()),
			E: base64.RawURLEncoding.EncodeToString(big.NewInt(int64(k.key.PublicKey.E)).Bytes()),
		})
	}
	b, _ := json.Marshal(out)
	return b
}

// verify checks an RS256 token's signature against the published keys and returns its claims.
// Only RS256 is accepted: "none" and HMAC tokens (including HS256 keyed with the public key) fail.
func (ks *keySet) verify(token string, opts ...jwt.ParserOption) (jwt.MapClaims, error) {
	claims := jwt.MapClaims{}
	opts = append(opts, jwt.WithValidMethods([]string{"RS256"}), jwt.WithExpirationRequired(), jwt.WithIssuedAt())
	_, err := jwt.ParseWithClaims(token, claims, func(t *jwt.Token) (any, error) {
		kid, _ := t.Header["kid"].(string)
		if k, ok := ks.publicKey(kid); ok {
			return k, nil
		}
		return nil, fmt.Errorf("signing key %q is not published", kid)
	}, opts...)
	return claims, err
}
