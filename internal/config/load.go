package config

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.yaml.in/yaml/v3"
	"golang.org/x/net/http/httpproxy"
)

// Getenv looks up an environment variable; "" means unset. run passes os.Getenv, tests a map.
type Getenv func(key string) string

// Load reads the YAML file at path and returns the complete, validated configuration. Relative
// *_file paths are resolved against the file's directory. The error joins every problem found:
// unknown keys, unset variables, unreadable files and validation failures.
func Load(path string, getenv Getenv) (*Config, error) {
	data, err := readFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading config: %w", err)
	}
	return Parse(data, filepath.Dir(path), getenv)
}

// Parse is Load for configuration already in memory; dir anchors relative *_file paths.
func Parse(data []byte, dir string, getenv Getenv) (*Config, error) {
	if getenv == nil {
		getenv = func(string) string { return "" }
	}
	// What the environment gives is left out of the errors (withoutValues): a secret's variable
	// named where another value belongs would be quoted back, in the terminal or a reload's log.
	var hidden []string
	envGet := getenv
	getenv = func(name string) string {
		v := envGet(name)
		if len(v) >= minEchoedSecret {
			hidden = append(hidden, v)
		}
		return v
	}
	cfg, err := parse(data, dir, getenv, &hidden)
	if err != nil && cfg != nil {
		// A secret written in the file, or read from a *_file, is left out too, should it
		// also have been pasted where another value belongs.
		for _, cr := range cfg.Credentials {
			if cr == nil {
				continue
			}
			for _, s := range []Secret{cr.ClientSecret, cr.CertificatePassword} {
				if len(s) >= minEchoedSecret {
					hidden = append(hidden, s.Value())
				}
			}
		}
	}
	return cfg, withoutValues(err, hidden)
}

// parse is Parse; it adds to hidden what its errors must not show, beside the values from the
// environment: every scalar of the file that may be a secret (mayBeSecret), wherever an error
// would quote it (a field's value, a name in a path, a list of known names).
func parse(data []byte, dir string, getenv Getenv, hidden *[]string) (*Config, error) {
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&doc); err != nil {
		return nil, fmt.Errorf("parsing config: %w", withoutQuotedValues(err))
	}
	if len(doc.Content) == 0 {
		return nil, errors.New("parsing config: the document is empty")
	}
	var more yaml.Node
	switch err := dec.Decode(&more); {
	case err == io.EOF:
	case err != nil:
		return nil, fmt.Errorf("parsing config: %w", withoutQuotedValues(err))
	default:
		// Whatever a second document held (an admin key, say) would be ignored.
		return nil, errors.New("parsing config: the file holds more than one YAML document (a line ---); put everything in one")
	}
	root := doc.Content[0]
	for _, v := range mayBeSecrets(root) {
		*hidden = append(*hidden, v)
		// A path is quoted as it is opened: cleaned ("a//b" is "a/b"), after dir.
		if c := filepath.Clean(v); c != v && mayBeSecret(c) {
			*hidden = append(*hidden, c)
		}
	}

	var errs []error
	errs = append(errs, checkKeys(root, reflect.TypeOf(Config{}), "", map[aliasUse]bool{})...)
	errs = append(errs, expandNode(root, "", getenv)...)
	if len(errs) > 0 {
		// Values that failed to expand are not meaningful, and validating them would echo
		// what may be a secret pasted in the wrong place.
		return nil, errors.Join(atMost(errs, maxErrors)...)
	}

	cfg := Default()
	if err := root.Decode(cfg); err != nil {
		return nil, fmt.Errorf("parsing config: %w", withoutQuotedValues(err))
	}
	cfg.fillFromEnv(getenv)
	errs = append(errs, cfg.readFiles(dir)...)
	errs = append(errs, cfg.hashKeys(dir, getenv)...)
	cfg.ApplyDefaults()
	if err := cfg.Validate(); err != nil {
		errs = append(errs, err)
	}
	return cfg, errors.Join(errs...)
}

// fillFromEnv applies the Azure workload identity webhook's variables to workload_identity
// credentials that leave those fields empty, as azidentity itself would, records the
// AZURE_AUTHORITY_HOST a default credential will use, and the proxy upstreams are reached
// through (HTTPS_PROXY, NO_PROXY).
func (c *Config) fillFromEnv(getenv Getenv) {
	either := func(upper, lower string) string {
		if v := getenv(upper); v != "" {
			return v
		}
		return getenv(lower)
	}
	c.UpstreamProxy = httpproxy.Config{HTTPSProxy: either("HTTPS_PROXY", "https_proxy"), NoProxy: either("NO_PROXY", "no_proxy")}
	for _, cr := range c.Credentials {
		if cr != nil && cr.Type == TypeDefault && cr.AuthorityHost == "" {
			cr.AuthorityHost = getenv("AZURE_AUTHORITY_HOST")
		}
		if cr == nil || cr.Type != TypeWorkloadIdentity {
			continue
		}
		for _, f := range []struct {
			field *string
			env   string
		}{
			{&cr.TenantID, "AZURE_TENANT_ID"},
			{&cr.ClientID, "AZURE_CLIENT_ID"},
			{&cr.TokenFile, "AZURE_FEDERATED_TOKEN_FILE"},
			{&cr.AuthorityHost, "AZURE_AUTHORITY_HOST"},
		} {
			if *f.field == "" {
				*f.field = getenv(f.env)
			}
		}
	}
}

// readFiles loads the *_file secrets and the certificate, so nothing else reads the disk.
func (c *Config) readFiles(dir string) []error {
	var errs []error
	read := func(path, name string) []byte {
		if !filepath.IsAbs(path) {
			path = filepath.Join(dir, path)
		}
		b, err := readFile(path)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", name, err))
			return nil
		}
		return b
	}
	secret := func(path, name string) Secret {
		// A byte-order mark an editor put first is no part of it; spaces may be (a password).
		return Secret(strings.TrimRight(strings.TrimPrefix(string(read(path, name)), "\ufeff"), "\r\n"))
	}
	for _, name := range sortedKeys(c.Credentials) {
		cr := c.Credentials[name]
		if cr == nil {
			continue
		}
		p := "credentials." + name + "."
		if cr.ClientSecretFile != "" && cr.ClientSecret == "" {
			cr.ClientSecret = secret(cr.ClientSecretFile, p+"client_secret_file")
			cr.secretFromFile = true
		}
		if cr.CertificatePasswordFile != "" && cr.CertificatePassword == "" {
			cr.CertificatePassword = secret(cr.CertificatePasswordFile, p+"certificate_password_file")
			cr.passwordFromFile = true
		}
		if cr.CertificateFile != "" {
			cr.Certificate = read(cr.CertificateFile, p+"certificate_file")
		}
		if cr.TokenFile != "" && !filepath.IsAbs(cr.TokenFile) {
			cr.TokenFile = filepath.Join(dir, cr.TokenFile)
		}
	}
	for _, name := range sortedKeys(c.Upstreams) {
		if u := c.Upstreams[name]; u != nil && u.CAFile != "" {
			u.CA = read(u.CAFile, "upstreams."+name+".ca_file")
		}
	}
	abs := func(p *string) {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(dir, *p)
		}
	}
	for _, t := range []*TLS{c.TLS, c.AdminTLS} {
		if t != nil {
			abs(&t.CertFile)
			abs(&t.KeyFile)
			abs(&t.ClientCAFile)
		}
	}
	return errs
}

// minRawKeyLength is the shortest raw key accepted from a file or the environment.
const minRawKeyLength = 16

// hashKeys gathers every caller's key hashes: the ones written in the configuration and the
// SHA-256 of the raw keys in key_files and key_env, which are not kept.
func (c *Config) hashKeys(dir string, getenv Getenv) []error {
	var errs []error
	for i, cl := range c.Callers {
		if cl == nil {
			continue
		}
		p := fmt.Sprintf("callers[%d]", i)
		cl.KeyHashes = nil
		if cl.KeySHA256 != "" {
			cl.KeyHashes = append(cl.KeyHashes, strings.ToLower(cl.KeySHA256))
		}
		for _, h := range cl.KeysSHA256 {
			cl.KeyHashes = append(cl.KeyHashes, strings.ToLower(h))
		}
		raw := func(key, where string) {
			switch {
			case key == "":
				errs = append(errs, fmt.Errorf("%s: holds no key", where))
			case len(key) < minRawKeyLength:
				errs = append(errs, fmt.Errorf("%s: the key is shorter than %d characters; use `proxy hash-key --generate`", where, minRawKeyLength))
			default:
				sum := sha256.Sum256([]byte(key))
				cl.KeyHashes = append(cl.KeyHashes, hex.EncodeToString(sum[:]))
			}
		}
		for j, f := range cl.KeyFiles {
			where := fmt.Sprintf("%s.key_files[%d]", p, j)
			if !filepath.IsAbs(f) {
				f = filepath.Join(dir, f)
				cl.KeyFiles[j] = f // as the file is read, so it is watched: not from the working directory
			}
			b, err := readFile(f)
			if err != nil {
				// The path is not echoed (os's errors hold it): it may be a key pasted where a
				// path belongs.
				var pe *fs.PathError
				if errors.As(err, &pe) {
					err = pe.Err
				}
				errs = append(errs, fmt.Errorf("%s: cannot read the file (%w; a relative path is taken from %s)", where, err, dir))
				continue
			}
			n := 0
			for line := range strings.SplitSeq(string(b), "\n") {
				if line = trimKey(line); line != "" && !strings.HasPrefix(line, "#") {
					raw(line, where)
					n++
				}
			}
			if n == 0 {
				errs = append(errs, fmt.Errorf("%s: holds no key", where))
			}
		}
		for j, name := range cl.KeyEnv {
			// The name is not echoed: it may be a key pasted where a name belongs.
			raw(trimKey(getenv(name)), fmt.Sprintf("%s.key_env[%d]", p, j))
		}
	}
	return errs
}

// maxErrors is how many problems of a file's form are listed; the rest are counted.
const maxErrors = 100

// atMost returns errs, its tail past n replaced by a count of it.
func atMost(errs []error, n int) []error {
	if len(errs) <= n {
		return errs
	}
	return append(errs[:n:n], fmt.Errorf("… and %d more", len(errs)-n))
}

// maxMappingEntries bounds a mapping's entries: yaml.v3's check for duplicate keys, as it
// decodes, takes time in the square of their number (minutes for a 4 MiB file of them).
const maxMappingEntries = 10000

// aliasUse is an anchored node checked as a type, through an alias.
type aliasUse struct {
	n *yaml.Node
	t reflect.Type
}

// checkKeys reports mapping keys that match no field of t, with the YAML path and line, and a
// suggestion when a known key is close. yaml.v3's KnownFields works only on a Decoder, and
// decoding must happen after ${VAR} expansion on the node tree, so the check is done here.
// An anchored node is checked once for each type it is aliased as (seen): aliases of aliases
// would otherwise have a small file checked, and its problems listed, a number of times that
// grows with the cube of its size.
func checkKeys(n *yaml.Node, t reflect.Type, path string, seen map[aliasUse]bool) []error {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	var errs []error
	switch {
	case n.Kind == yaml.AliasNode:
		if seen[aliasUse{n.Alias, t}] {
			return nil
		}
		seen[aliasUse{n.Alias, t}] = true
		return checkKeys(n.Alias, t, path, seen)
	case n.Kind == yaml.MappingNode && len(n.Content) > 2*maxMappingEntries:
		return []error{fmt.Errorf("%s: more than %d entries (line %d)", orRoot(path), maxMappingEntries, n.Line)}
	case t.Kind() == reflect.Struct && n.Kind == yaml.MappingNode:
		fields := yamlFields(t)
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			ft, ok := fields[k.Value]
			if !ok {
				msg := fmt.Sprintf("%s: unknown key (line %d)", join(path, k.Value), k.Line)
				if s := suggest(k.Value, fields); s != "" {
					msg += fmt.Sprintf("; did you mean %q?", s)
				}
				errs = append(errs, errors.New(msg))
				continue
			}
			errs = append(errs, checkKeys(v, ft, join(path, k.Value), seen)...)
		}
	case t.Kind() == reflect.Map && n.Kind == yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			errs = append(errs, checkKeys(n.Content[i+1], t.Elem(), join(path, n.Content[i].Value), seen)...)
		}
	case t.Kind() == reflect.Slice && n.Kind == yaml.SequenceNode:
		for i, v := range n.Content {
			errs = append(errs, checkKeys(v, t.Elem(), fmt.Sprintf("%s[%d]", path, i), seen)...)
		}
	}
	return errs
}

func yamlFields(t reflect.Type) map[string]reflect.Type {
	m := make(map[string]reflect.Type, t.NumField())
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "-" || !f.IsExported() {
			continue
		}
		if name == "" {
			name = strings.ToLower(f.Name)
		}
		m[name] = f.Type
	}
	return m
}

// suggest returns the known key nearest to k when it is plausibly a typo.
func suggest(k string, fields map[string]reflect.Type) string {
	best, bestD := "", len(k)/2+1
	for name := range fields {
		if d := editDistance(k, name); d < bestD || (d == bestD && name < best) {
			best, bestD = name, d
		}
	}
	if bestD > 3 {
		return ""
	}
	return best
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// orRoot is path, or what stands for the document's top when it is empty.
func orRoot(path string) string {
	if path == "" {
		return "the document"
	}
	return path
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// minEchoedSecret is the shortest value from the environment left out of configuration errors:
// shorter ones (a port, a flag) are not worth garbling the message for.
const minEchoedSecret = 8

// withoutValues is err with each of values, and its quoted form, replaced by a mention that
// one was there. The error returned wraps nothing: unwrapped, err would quote them again.
func withoutValues(err error, values []string) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	// The longest first: one value may hold another, and would be shown in part.
	slices.SortFunc(values, func(a, b string) int { return len(b) - len(a) })
	for _, v := range values {
		msg = strings.ReplaceAll(msg, v, "[a value not shown]")
		if q := strconv.Quote(v); q[1:len(q)-1] != v {
			msg = strings.ReplaceAll(msg, q[1:len(q)-1], "[a value not shown]")
		}
	}
	return errors.New(msg)
}

// yamlQuoted is what yaml.v3's errors quote of the document: the first characters of a value
// in backquotes ("cannot unmarshal !!str `Xy8Q~ab...` into int"), an alias's name in single
// quotes ("unknown anchor 'Xy8Q~abc' referenced", where a value starting with * was read as
// an alias).
var yamlQuoted = regexp.MustCompile("`[^`]*`|'[^']*'")

// withoutQuotedValues is err without what yaml.v3 quotes in it of the document: the start of a
// secret put where a number or a list belongs is a start of a secret all the same.
func withoutQuotedValues(err error) error {
	msg := err.Error()
	if !strings.ContainsAny(msg, "`'") {
		return err
	}
	return errors.New(yamlQuoted.ReplaceAllString(msg, "(a value, not shown)"))
}

// maxFileSize bounds what a file the configuration names may hold: a secret, a few keys, a few
// certificates. A path mistaken for another (a device, a log) is not read without end.
const maxFileSize = 4 << 20

// readFile is os.ReadFile for the files a configuration names: regular files only (a symbolic
// link to one, as Kubernetes mounts secrets, included), so that neither a device nor a named
// pipe is waited on, of at most maxFileSize bytes. The path is checked before it is opened (a
// device is not opened at all) and the file once open, which is opened without waiting (a named
// pipe put in its place meanwhile is not waited on either).
func readFile(path string) ([]byte, error) {
	if fi, err := os.Stat(path); err != nil {
		if pe, ok := err.(*fs.PathError); ok {
			pe.Op = "open" // as os.ReadFile says
		}
		return nil, err
	} else if !fi.Mode().IsRegular() {
		return nil, notRegular(path)
	}
	betweenStatAndOpen(path)
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil {
		return nil, err
	} else if !fi.Mode().IsRegular() {
		return nil, notRegular(path)
	}
	return readLimited(f, path)
}

// betweenStatAndOpen is called by readFile after its check of a path and before its open: the
// tests swap what the path names there.
var betweenStatAndOpen = func(string) {}

func notRegular(path string) error {
	return &fs.PathError{Op: "read", Path: path, Err: errors.New("not a regular file")}
}

// readFileTimeout bounds reading a named file that can be waited on: a few kernel files that
// say they are regular (/proc/kmsg, tracefs's trace_pipe) wait for data that may never come.
var readFileTimeout = 10 * time.Second

// readLimited reads f whole, if it holds at most maxFileSize bytes, within readFileTimeout if
// it is a file whose reads can wait (reads of a file on disk do not).
func readLimited(f *os.File, path string) ([]byte, error) {
	if err := f.SetReadDeadline(time.Now().Add(readFileTimeout)); err != nil && !errors.Is(err, os.ErrNoDeadline) {
		return nil, err
	}
	b, err := io.ReadAll(io.LimitReader(f, maxFileSize+1))
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return nil, &fs.PathError{Op: "read", Path: path, Err: fmt.Errorf("nothing to read after %v", readFileTimeout)}
		}
		return nil, err
	}
	if len(b) > maxFileSize {
		return nil, &fs.PathError{Op: "read", Path: path, Err: fmt.Errorf("larger than %d MiB", maxFileSize>>20)}
	}
	return b, nil
}

// trimKey is a key file's line, or a key from the environment, without the spaces, line ends
// and byte-order mark an editor or a shell may have put around it.
func trimKey(s string) string { return strings.TrimSpace(strings.TrimPrefix(s, "\ufeff")) }
