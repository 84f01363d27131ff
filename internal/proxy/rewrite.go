package proxy

import (
	"bytes"
	"crypto/sha256"
	"hash/maphash"
	"net/http"
	"strings"
	"sync/atomic"
	"unsafe"

	"github.com/valyala/fasthttp"

	"github.com/tokenproxy/tokenproxy/internal/config"
	"github.com/tokenproxy/tokenproxy/internal/transport"
)

// Request headers never forwarded: hop-by-hop ones (RFC 9110 §7.6.1), the caller's
// credentials (the only credential that leaves is the gateway's bearer token), the caller's
// forwarding trail (the upstream has no use for the caller's addresses), and the headers some
// front ends and frameworks take to change a call's path, method or deployment after the
// gateway has authorised it (Azure ML endpoints pick a deployment by
// Azureml-Model-Deployment).
var dropRequestHeaders = []string{
	"Connection", "Keep-Alive", "Proxy-Connection", "Te", "Trailer", "Transfer-Encoding", "Upgrade", "Expect",
	"Authorization", "Api-Key", "Cookie", "Ocp-Apim-Subscription-Key", "Proxy-Authorization",
	"Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Forwarded-Port", "X-Real-Ip",
	"X-Forwarded-Prefix", "X-Forwarded-Server", "Via",
	"X-Original-Url", "X-Rewrite-Url", "X-Http-Method-Override", "X-Http-Method", "X-Method-Override",
	"Azureml-Model-Deployment",
}

// Response headers never passed back: hop-by-hop ones; the framing is the gateway's own.
var dropResponseHeaders = []string{
	"Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate", "Te", "Trailer", "Upgrade",
}

// headerSet finds a header name among a few fixed ones without regard to case: an index by
// the name's length, then a comparison with each name of that length (seldom more than one),
// where a scan of the list would compare with all of them. A name's bit is 1<<i, i its place
// in the list (at most 32).
type headerSet struct {
	byLen [32][]headerName
}

type headerName struct {
	name []byte
	bit  uint32
}

func newHeaderSet(names ...[]string) *headerSet {
	s := new(headerSet)
	i := 0
	for _, list := range names {
		for _, n := range list {
			if i >= 32 || len(n) >= len(s.byLen) {
				panic("proxy: header set too large: " + n)
			}
			s.byLen[len(n)] = append(s.byLen[len(n)], headerName{[]byte(n), 1 << i})
			i++
		}
	}
	return s
}

// find returns the bit of the header named key, or 0 if it is none of the set's.
func (s *headerSet) find(key []byte) uint32 {
	if len(key) >= len(s.byLen) {
		return 0
	}
	for _, n := range s.byLen[len(key)] {
		if bytes.EqualFold(key, n.name) {
			return n.bit
		}
	}
	return 0
}

var (
	// The caller's headers that do not go upstream as they came: those dropped, those the
	// transport writes itself (framingHeaders), and the request ID, which is the call's own.
	notForwarded = newHeaderSet(dropRequestHeaders, framingHeaders, []string{string(requestIDHeader)})
	// The upstream's headers that do not go back; Connection's bit is 1.
	notReturned = newHeaderSet(dropResponseHeaders)
)

// rewrite builds the upstream request out from the caller's request in: the upstream's Host
// and base path, the (possibly renamed) path, the caller's query minus key-bearing parameters,
// the caller's headers minus those above, the request ID and the body read. The head is
// written straight from in's parsed headers into out's fields, with no request object in
// between (see transport.Request). The bearer token is not set here: the transport writes it
// into the request's head, so out has no Authorization header of its own.
// credential, the key or token the caller authenticated with, is also removed from any other
// header or query parameter it was put in: whatever the caller named them, it does not leave.
// So is any header or parameter holding another of keys' keys (keys may be nil). The caller's
// headers have passed checkHeaders.
func rewrite(out *transport.Request, in *fasthttp.RequestHeader, up *upstream, path []byte, query string, body []byte, requestID string, credential []byte, credStr string, keys *callers) {
	// The names the caller's Connection headers list go too; the field may come more than
	// once, and each is read.
	var listedBuf [4][]byte
	listed := listedBuf[:0]
	for _, v := range in.PeekAll("Connection") {
		listed = appendListed(listed, v)
	}
	out.Fields = out.Fields[:0]
	hasType := false
	for k, v := range in.All() {
		switch {
		case notForwarded.find(k) != 0, listedIn(listed, k),
			len(credential) > 0 && bytes.Contains(v, credential) || keys.holdsKey(v),
			// The name too: the server hands it over in its canonical form (a capital at the
			// start and after each '-', small letters elsewhere), whatever the caller sent.
			len(credential) > 0 && containsFold(k, credential):
			continue
		}
		hasType = hasType || len(k) == len("Content-Type") && bytes.EqualFold(k, []byte("Content-Type"))
		out.AppendField(k, v)
	}
	if !hasType && len(body) > 0 {
		// As fasthttp's request writer, which wrote the gateway's upstream requests before.
		out.AppendField([]byte("Content-Type"), []byte("application/octet-stream"))
	}
	out.AppendField(requestIDHeader, []byte(requestID))

	// The upstream call is the gateway's own: HTTP/1.1 (or HTTP/2), on a connection kept
	// alive, whatever the caller spoke (an HTTP/1.0 call would otherwise cost the upstream
	// connection).
	out.Method = append(out.Method[:0], in.Method()...)
	out.Host = up.origin.Host()
	out.Target = append(append(out.Target[:0], up.basePath...), path...)
	if q := stripCredentialParams(query, credStr, keys); q != "" {
		out.Target = append(append(out.Target, '?'), q...)
	}
	out.Body = body
}

// containsFold reports whether s holds sub (not empty), compared without regard to ASCII case.
func containsFold(s, sub []byte) bool {
	first := sub[0] | 0x20 // a letter's small form; other bytes compared as they are below
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i]|0x20 == first && bytes.EqualFold(s[i:i+len(sub)], sub) {
			return true
		}
	}
	return false
}

// framingHeaders are the caller's headers the transport writes itself, for the upstream.
var framingHeaders = []string{"Host", "Content-Length"}

// listedIn reports whether the header named k is among names, compared without regard to case.
func listedIn(names [][]byte, k []byte) bool {
	for _, n := range names {
		if bytes.EqualFold(n, k) {
			return true
		}
	}
	return false
}

// appendListed appends the header names a Connection header's value v lists, which are
// hop-by-hop too (RFC 9110 §7.6.1). The names point into v.
func appendListed(names [][]byte, v []byte) [][]byte {
	for token := range bytes.SplitSeq(v, []byte(",")) {
		if token = bytes.TrimSpace(token); len(token) > 0 {
			names = append(names, token)
		}
	}
	return names
}

// checkHeaders refuses caller headers carrying control characters: a bare CR that one HTTP
// parser keeps inside a value, another may take for a line break, which would let a caller
// inject headers into the upstream request. It refuses names that are not tokens too (fasthttp
// lets a space inside one through): the upstream's head is written from these names, and
// another parser may read a malformed one otherwise.
// In the same pass it finds the caller's X-Ms-Client-Request-Id (the first, as Peek would;
// nil if there is none), which the call's request ID may be.
func checkHeaders(h *fasthttp.RequestHeader) (clientID []byte, e *apiError) {
	seen := false
	for k, v := range h.All() {
		if !validHeaderValue(v) || !validHeaderName(k) {
			return nil, errorf(http.StatusBadRequest, CodeInvalidRequest, "a request header holds control characters or a malformed name")
		}
		if !seen && string(k) == "X-Ms-Client-Request-Id" { // names are in fasthttp's canonical form
			seen, clientID = true, v
		}
	}
	return clientID, nil
}

// validHeaderValue reports whether v has no control characters other than horizontal tab.
func validHeaderValue(v []byte) bool {
	for _, c := range v {
		if c < ' ' && c != '\t' || c == 0x7f {
			return false
		}
	}
	return true
}

// validHeaderName reports whether k is a token (RFC 9110 §5.6.2), as a field name must be.
func validHeaderName(k []byte) bool {
	for _, c := range k {
		if !tchar[c] {
			return false
		}
	}
	return len(k) > 0
}

// tchar holds the bytes a token may have.
var tchar = func() (t [256]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c], t[c-'a'+'A'] = true, true
	}
	for _, c := range "!#$%&'*+-.^_`|~" {
		t[c] = true
	}
	return t
}()

var (
	requestIDHeader = []byte("X-Ms-Client-Request-Id") // replaced by the call's own, checked for keys (requestID, admit)
	apimIDHeader    = []byte("Apim-Request-Id")        // Azure's ID for the call, logged
	regionHeader    = []byte("X-Ms-Region")            // the Azure region that answered, logged
)

// cleanResponse removes hop-by-hop headers from an upstream response and makes sure the
// caller gets the request ID back even if the upstream does not echo it. It returns what the
// access log takes from the response, Azure's request ID and region, read in the same pass;
// they point into h, and stay valid until h is next changed.
func cleanResponse(h *fasthttp.ResponseHeader, requestID string) (apimID, region []byte) {
	var drop uint32
	var listedBuf [4][]byte
	listed := listedBuf[:0] // by Connection headers
	hasID := false          // whether the first X-Ms-Client-Request-Id is there and not empty
	seenID := false
	for k, v := range h.All() {
		bit := notReturned.find(k)
		drop |= bit
		switch {
		case bit == 1: // Connection
			listed = appendListed(listed, v)
		case bit != 0: // another hop-by-hop header: deleted below, nothing in it to read
		case !seenID && len(k) == len(requestIDHeader) && bytes.EqualFold(k, requestIDHeader):
			seenID = true
			hasID = len(v) > 0
		case apimID == nil && len(k) == len(apimIDHeader) && bytes.EqualFold(k, apimIDHeader):
			apimID = v
		case region == nil && len(k) == len(regionHeader) && bytes.EqualFold(k, regionHeader):
			region = v
		}
	}
	for _, k := range listed {
		if notReturned.find(k) != 0 {
			continue // dropped below if it is there
		}
		h.DelBytes(k)
		// What was read of a header now gone is not the answer's: its bytes are reused.
		switch {
		case bytes.EqualFold(k, requestIDHeader):
			hasID = false
		case bytes.EqualFold(k, apimIDHeader):
			apimID = nil
		case bytes.EqualFold(k, regionHeader):
			region = nil
		}
	}
	for i, k := range dropResponseHeaders {
		if drop&(1<<i) != 0 {
			h.Del(k)
		}
	}
	// An upstream closing its connection says nothing about the caller's, and the version it
	// answered in (HTTP/1.0 to an HTTP/1.0 caller's call, none over HTTP/2) says nothing about
	// the gateway's: the status line is the gateway's own, HTTP/1.1, as on its own errors.
	h.ResetConnectionClose()
	h.SetProtocol(nil)
	if !hasID {
		// The value is copied into h; the string's bytes are only read.
		h.SetCanonical(requestIDHeader, readOnly(requestID))
	}
	return apimID, region
}

// stripCredentialParams removes query parameters some Azure clients use for keys (api-key,
// subscription-key), and any whose name or value holds the caller's credential, or another
// caller's key where a header's would be found (holdsKey: whole, as a field, or a generated key
// anywhere). The gateway never reads keys from the query, but a caller's key must not reach the
// upstream, or its logs, whatever the caller did with it. Other parameters keep their order and
// encoding; a query that loses none is returned as it is, without a copy.
func stripCredentialParams(rawQuery, credential string, keys *callers) string {
	drops := false
	for kv := range strings.SplitSeq(rawQuery, "&") {
		if dropParam(kv, credential, keys) {
			drops = true
			break
		}
	}
	if !drops {
		return rawQuery
	}
	kept := make([]string, 0, 4)
	for kv := range strings.SplitSeq(rawQuery, "&") {
		if !dropParam(kv, credential, keys) {
			kept = append(kept, kv)
		}
	}
	return strings.Join(kept, "&")
}

// dropParam reports whether the query parameter kv (still escaped) is one stripCredentialParams
// removes. Its name and value are judged as they are, and again unescaped (unescapeQuery) where
// they hold an escape or a '+': a key may hold a '+' itself (base64), or be escaped.
func dropParam(kv, credential string, keys *callers) bool {
	if credential != "" && strings.Contains(kv, credential) {
		return true
	}
	k, v, _ := strings.Cut(kv, "=")
	if dropNamed(k, v, credential, keys) {
		return true
	}
	return (strings.IndexByte(kv, '%') >= 0 || strings.IndexByte(kv, '+') >= 0) &&
		dropNamed(unescapeQuery(k), unescapeQuery(v), credential, keys)
}

// dropNamed is dropParam's judgement of a parameter named k with value v.
func dropNamed(k, v, credential string, keys *callers) bool {
	return strings.EqualFold(k, "api-key") || strings.EqualFold(k, "subscription-key") ||
		credential != "" && (strings.Contains(k, credential) || strings.Contains(v, credential)) ||
		keys.holdsKey(readOnly(k)) || keys.holdsKey(readOnly(v))
}

// unescapeQuery unescapes a query parameter's name or value as url.QueryUnescape does, but
// keeps a '%' that starts no escape as it is, where QueryUnescape gives up on the whole text:
// the text is judged as a lenient decoder downstream would read it, so that an escape that is
// none cannot hide a key escaped beside it.
func unescapeQuery(s string) string {
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '+':
			b = append(b, ' ')
		case c == '%' && i+2 < len(s) && ishex(s[i+1]) && ishex(s[i+2]):
			b = append(b, unhex(s[i+1])<<4|unhex(s[i+2]))
			i += 2
		default:
			b = append(b, c)
		}
	}
	return string(b)
}

func ishex(c byte) bool { return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F' }

func unhex(c byte) byte {
	switch {
	case c <= '9':
		return c - '0'
	case c <= 'F':
		return c - 'A' + 10
	}
	return c - 'a' + 10
}

// readOnly gives s's bytes without a copy, for functions that only read them.
func readOnly(s string) []byte { return unsafe.Slice(unsafe.StringData(s), len(s)) }

// hasQueryParam reports whether the raw query has key with a non-empty value.
func hasQueryParam(rawQuery, key string) bool {
	for rawQuery != "" {
		var kv string
		kv, rawQuery, _ = strings.Cut(rawQuery, "&")
		if k, v, ok := strings.Cut(kv, "="); ok && k == key && v != "" {
			return true
		}
	}
	return false
}

// minKeyLength is the shortest value checked for being a caller's key: shorter ones (versions,
// flags, counts) are not worth hashing, and no one issues keys that short.
const minKeyLength = 8

// holdsKey reports whether v holds one of the callers' keys: as the whole value, as a field of
// it (split at spaces, commas, semicolons and tabs, and after an '='), or, for a generated key,
// anywhere in it. Keys are known only by their SHA-256, so each candidate of minKeyLength or
// more is hashed. cs may be nil.
func (cs *callers) holdsKey(v []byte) bool {
	if cs == nil || len(cs.byHash) == 0 || len(v) < minKeyLength {
		return false
	}
	if cs.isKey(v) || cs.holdsGenerated(v) {
		return true
	}
	// One pass finds the fields and the first '=' in each.
	start, eq := 0, -1
	for i := 0; ; i++ {
		for i < len(v) && !fieldByte[v[i]] {
			i++
		}
		if i < len(v) && v[i] == '=' {
			if eq < 0 {
				eq = i
			}
			continue
		}
		// A separator, or the end. A value with no separator is its only field, hashed already.
		if field := v[start:i]; len(field) >= minKeyLength && len(field) < len(v) && cs.isKey(field) {
			return true
		}
		if eq >= 0 && i-eq-1 >= minKeyLength && cs.isKey(v[eq+1:i]) {
			return true
		}
		if i >= len(v) {
			return false
		}
		start, eq = i+1, -1
	}
}

// fieldByte marks the bytes holdsKey stops at: the separators of fields, and '='.
var fieldByte = [256]bool{' ': true, ',': true, ';': true, '\t': true, '=': true}

// holdsGenerated reports whether v holds, anywhere, one of the callers' keys of the shape
// `proxy hash-key --generate` makes: a key of any other shape is found only where holdsKey
// looks, since without its length nothing says where it would end.
func (cs *callers) holdsGenerated(v []byte) bool {
	if cs == nil || len(cs.byHash) == 0 {
		return false
	}
	for len(v) >= config.GeneratedKeyLength {
		i := bytes.Index(v, generatedKeyPrefix)
		if i < 0 || len(v)-i < config.GeneratedKeyLength {
			return false
		}
		if cs.isKey(v[i : i+config.GeneratedKeyLength]) {
			return true
		}
		v = v[i+1:]
	}
	return false
}

var generatedKeyPrefix = []byte(config.GeneratedKeyPrefix)

// keyInPath reports whether a segment of the request path is one of the callers' keys, or the
// path holds a generated key anywhere. The words of Azure's routes and the deployments' names
// are not hashed (newCallers refuses a key that is one).
func (cs *callers) keyInPath(path string) bool {
	if cs == nil || len(cs.byHash) == 0 {
		return false
	}
	if strings.Contains(path, config.GeneratedKeyPrefix) && cs.holdsGenerated(readOnly(path)) {
		return true
	}
	for path != "" {
		var seg string
		seg, path, _ = strings.Cut(path, "/")
		if len(seg) >= minKeyLength && !routeWords.has(seg) && !cs.deployments[seg] && cs.isKey(readOnly(seg)) {
			return true
		}
	}
	return false
}

// routeWords are the segments of Azure OpenAI and Foundry routes long enough to be hashed as a
// candidate key.
var routeWords = newWordSet("deployments", "completions", "embeddings", "responses", "generations",
	"transcriptions", "translations", "assistants", "messages", "vector_stores", "extensions",
	"realtime", "variations", "input_items")

// wordSet is a fixed set of short words, indexed by length: looking a word up compares it with
// the few of its length, where a map would hash it first (three look-ups a call, ≈ 90 ns).
type wordSet struct {
	byLen [32][]string
	all   []string
}

func newWordSet(words ...string) *wordSet {
	s := &wordSet{all: words}
	for _, w := range words {
		s.byLen[len(w)] = append(s.byLen[len(w)], w)
	}
	return s
}

func (s *wordSet) has(w string) bool {
	if len(w) >= len(s.byLen) {
		return false
	}
	for _, x := range s.byLen[len(w)] {
		if x == w {
			return true
		}
	}
	return false
}

func (cs *callers) isKey(v []byte) bool {
	if cs.notKeys.has(v) {
		return false
	}
	_, ok := cs.byHash[sha256.Sum256(v)]
	if !ok {
		cs.notKeys.add(v)
	}
	return ok
}

// notKeys remembers values that were hashed and found to be no caller's key, so that those a
// client sends on every call (its User-Agent, Host, Content-Type, an api-version) are hashed
// once rather than on every call (≈ 80 ns each; bench/README.md). A value counts as known only
// where one of its two slots (slotPairs) holds it byte for byte: the cache can make a call skip
// a hash, never take a key for something else. It belongs to one set of callers (a reload builds
// another, with other keys), and holds at most notKeySlots values of up to notKeyMax bytes: a
// caller sending new values every time only replaces them.
type notKeys struct {
	seed  maphash.Seed
	slots slotPairs[string]
}

const (
	notKeySlots = 256
	notKeyMax   = 128
)

func newNotKeys() *notKeys {
	return &notKeys{seed: maphash.MakeSeed(), slots: newSlotPairs[string](notKeySlots)}
}

// slotsOf returns the two slots v may be kept in.
func (n *notKeys) slotsOf(v []byte) (a, b *atomic.Pointer[string]) {
	return n.slots.pair(maphash.Bytes(n.seed, v))
}

func (n *notKeys) has(v []byte) bool {
	if n == nil || len(v) > notKeyMax {
		return false
	}
	a, b := n.slotsOf(v)
	if p := a.Load(); p != nil && *p == string(v) {
		return true
	}
	p := b.Load()
	return p != nil && *p == string(v)
}

func (n *notKeys) add(v []byte) {
	if n == nil || len(v) > notKeyMax {
		return
	}
	s := string(v)
	n.slots.put(maphash.Bytes(n.seed, v), &s)
}
