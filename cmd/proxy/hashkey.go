package main

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io"
	"strings"

	"github.com/tokenproxy/tokenproxy/internal/config"
)

// minKeyLength is the shortest key hash-key accepts without a warning.
const minKeyLength = 20

func runHashKey(args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := newFlagSet("hash-key", "[--generate]",
		"Print the key_sha256 value for a caller key read on stdin (a trailing newline is ignored).\n"+
			"With --generate, create a strong random key instead and print the key and its hash.\n\n"+
			"  echo -n \"$KEY\" | proxy hash-key\n  proxy hash-key --generate", stderr)
	generate := fs.Bool("generate", false, "generate a new random key (256 bits)")
	if err := parseFlags(fs, args, stdout); err != nil {
		return err
	}
	if *generate {
		key := newKey()
		fmt.Fprintf(stdout, "key:        %s\nkey_sha256: %s\n", key, hashKey(key))
		fmt.Fprintln(stderr, "Give the key to the caller; put only key_sha256 in the configuration.")
		return nil
	}
	data, err := io.ReadAll(io.LimitReader(stdin, 4097))
	if err != nil {
		return fmt.Errorf("reading the key: %w", err)
	}
	if len(data) > 4096 {
		return fmt.Errorf("the key on stdin is longer than 4096 bytes")
	}
	key := strings.TrimSuffix(strings.TrimSuffix(string(data), "\n"), "\r")
	switch {
	case key == "":
		return fmt.Errorf("no key on stdin (try: echo -n \"$KEY\" | proxy hash-key, or proxy hash-key --generate)")
	case key != strings.TrimSpace(key) || strings.ContainsAny(key, "\r\n"):
		return fmt.Errorf("the key has surrounding whitespace or several lines; HTTP headers would not carry it intact")
	case len(key) < minKeyLength:
		fmt.Fprintf(stderr, "warning: a key shorter than %d characters can be guessed; prefer proxy hash-key --generate\n", minKeyLength)
	}
	fmt.Fprintln(stdout, hashKey(key))
	return nil
}

// newKey returns a random caller key: a recognisable prefix (so secret scanners can find leaked
// keys) and 256 random bits.
func newKey() string {
	b := make([]byte, 32)
	rand.Read(b)
	return config.GeneratedKeyPrefix + base64.RawURLEncoding.EncodeToString(b)
}

func hashKey(key string) string {
	s := sha256.Sum256([]byte(key))
	return hex.EncodeToString(s[:])
}
