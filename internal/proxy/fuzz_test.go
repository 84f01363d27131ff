package proxy

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"path"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"github.com/valyala/fasthttp"
)

// topLevelModels counts the top-level "model" keys with encoding/json, as the oracle, and the
// keys that are "model" but for case.
func topLevelModels(b []byte) (n, folded int, err error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	tok, err := dec.Token()
	if err != nil || tok != json.Delim('{') {
		return 0, 0, errors.New("not an object")
	}
	for dec.More() {
		k, err := dec.Token()
		if err != nil {
			return 0, 0, err
		}
		if k == "model" {
			n++
		} else if strings.EqualFold(k.(string), "model") {
			folded++
		}
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return 0, 0, err
		}
	}
	return n, folded, nil
}

func FuzzJSONModel(f *testing.F) {
	for _, s := range []string{
		`{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}`,
		`{"messages":[{"model":"nested"}],"model":"m"}`,
		`{"model":"a","model":"b"}`,
		`{"mod\u0065l":"a","model":"b"}`,
		`{"model":"a\"b\\c"}`,
		`{"model":7}`, `{"model":null}`, `[]`, `"model"`, `{`, ``, `{}`,
		` { "x" : [1,2,{"y":"}"}] , "model" : "m" } `,
		"{\"model\":\"\xff\"}",
		`{"a":{"b":{"c":{"d":[[[[["model"]]]]]}}},"model":"deep"}`,
		`{"model":"m","stream":true}`, `{"stream"`, `{"stream" :`, `{"stream": tru`,
		`{"Model":"a","model":"b"}`, `{"model":"a","MODEL":"b"}`, `{"mod\u0045l":"a"}`, `{"model":7,"model":"b"}`,
		`{"model":"` + strings.Repeat("\u0041", 64) + `"}`, `{"model":"` + strings.Repeat("\u0041", 65) + `"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if asksForStream(b) && !bytes.Contains(b, []byte(`"stream"`)) {
			t.Fatalf("%q asks for a stream, without the member", b)
		}
		ref, err := jsonModel(b)
		if !json.Valid(b) {
			if err == nil {
				t.Fatalf("accepted invalid JSON %q", b)
			}
			return
		}
		n, folded, oerr := topLevelModels(b)
		switch {
		case oerr != nil:
			if err == nil {
				t.Fatalf("accepted a non-object %q", b)
			}
		case folded > 0:
			if err == nil {
				t.Fatalf("accepted %q, which has a model in another case", b)
			}
		case n > 1:
			// The first model found may be refused for itself before the second is seen.
			if err == nil {
				t.Fatalf("accepted %d model keys in %q", n, b)
			}
		case n == 0:
			if err != nil || ref.name != "" || ref.start != -1 {
				t.Fatalf("got (%+v, %v) for a body without model %q", ref, err, b)
			}
		default:
			var m map[string]json.RawMessage
			if json.Unmarshal(b, &m) != nil {
				t.Fatalf("oracle cannot decode %q", b)
			}
			var want string
			raw := bytes.TrimSpace(m["model"])
			if len(raw) == 0 || raw[0] != '"' || json.Unmarshal(raw, &want) != nil {
				if err == nil {
					t.Fatalf("accepted a non-string model in %q", b)
				}
				return
			}
			if len(raw) > maxModelToken {
				if !errors.Is(err, errModelTooLong) {
					t.Fatalf("got (%q, %v) for a %d-byte model token, want errModelTooLong", ref.name, err, len(raw))
				}
				return
			}
			if err != nil || ref.name != want {
				t.Fatalf("got (%q, %v), want %q from %q", ref.name, err, want, b)
			}
			// A rename replaces only the model.
			out := renameModel(b, ref, "renamed")
			var before, after map[string]json.RawMessage
			if json.Unmarshal(out, &after) != nil {
				t.Fatalf("rename produced invalid JSON %q from %q", out, b)
			}
			json.Unmarshal(b, &before)
			if string(after["model"]) != `"renamed"` || len(after) != len(before) {
				t.Fatalf("rename of %q gave %q", b, out)
			}
		}
	})
}

func FuzzCheckPath(f *testing.F) {
	for _, s := range []string{
		"/openai/deployments/gpt-4o/chat/completions", "/", "", "//", "/a/../b", "/a/./b", "/a%2Fb",
		"/a\\b", "/openai/deployments/x/", "http://evil/openai", "/é", "/a/b/..", strings.Repeat("/a", 600),
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, p string) {
		if checkPath(p) != nil {
			return
		}
		if p != "/" && path.Clean(p) != p {
			t.Fatalf("accepted %q, which cleans to %q", p, path.Clean(p))
		}
		if strings.ContainsAny(p, "%\\?#") || len(p) > maxPathLen {
			t.Fatalf("accepted %q", p)
		}
	})
}

func FuzzPresentedKey(f *testing.F) {
	f.Add("key", "", "")
	f.Add("", "Bearer key", "")
	f.Add("a", "Bearer b", "")
	f.Add("a", "a", "b")
	f.Add(" ", "bearer   ", "")
	f.Fuzz(func(t *testing.T, apiKey, auth, second string) {
		var h fasthttp.RequestHeader
		if apiKey != "" {
			h.Add("Api-Key", apiKey)
		}
		if auth != "" {
			h.Add("Authorization", auth)
		}
		if second != "" {
			h.Add("Api-Key", second)
		}
		// The oracle reads back what the header holds (fasthttp folds CR and LF into spaces).
		var apiKeys []string
		auth = ""
		for k, v := range h.All() {
			switch string(k) {
			case "Api-Key":
				apiKeys = append(apiKeys, string(v))
			case "Authorization":
				auth = string(v)
			}
		}
		key, err := presentedKey(&h)
		if err != nil {
			return
		}
		if len(apiKeys) > 1 {
			t.Fatalf("accepted two api-key headers")
		}
		k := string(key)
		fromAPIKey := len(apiKeys) == 1 && k == strings.TrimSpace(apiKeys[0])
		fromAuth := auth != "" && strings.HasSuffix(strings.TrimSpace(auth), k)
		if k != "" && !fromAPIKey && !fromAuth {
			t.Fatalf("presented key %q came from neither header (%q, %q, %q)", k, apiKey, auth, second)
		}
	})
}

func TestAsksForStream(t *testing.T) {
	for body, want := range map[string]bool{
		`{"stream":true}`: true,
		`{"messages":[{"role":"user","content":"hi"}], "stream" : true}`: true,
		"{\"stream\":\n\ttrue,\"model\":\"m\"}":                          true,
		`{"content":"say \"stream\": true","stream":true}`:               true,
		`{"stream":false}`:                          false,
		`{"stream_options":{"include_usage":true}}`: false,
		`{"content":"say \"stream\": true"}`:        false, // "stream\" is not the member
		`{"upstream":true}`:                         false,
		`{"messages":[]}`:                           false,
		``:                                          false,
		`"stream"`:                                  false,
		`{"stream":`:                                false,
		`{"stream": "true"}`:                        false,
		"--b\r\nContent-Disposition: form-data; name=\"stream\"\r\n\r\ntrue\r\n--b--\r\n":  true,
		"--b\r\nContent-Disposition: form-data; name=\"stream\"\r\n\r\nfalse\r\n--b--\r\n": false,
	} {
		if got := asksForStream([]byte(body)); got != want {
			t.Errorf("asksForStream(%s) = %v, want %v", body, got, want)
		}
	}
}

// stripReference is stripCredentialParams written plainly, as the oracle: every parameter
// split out, unescaped, judged, and the kept ones joined again.
func stripReference(rawQuery, credential string, keys *callers) string {
	var kept []string
	for kv := range strings.SplitSeq(rawQuery, "&") {
		holds := func(s string) bool {
			return credential != "" && strings.Contains(s, credential) || keys.holdsKey([]byte(s))
		}
		drop := credential != "" && strings.Contains(kv, credential)
		rk, rv, _ := strings.Cut(kv, "=")
		for _, kv := range [][2]string{{rk, rv}, {lenientUnescape(rk), lenientUnescape(rv)}} {
			k, v := kv[0], kv[1]
			drop = drop || strings.EqualFold(k, "api-key") || strings.EqualFold(k, "subscription-key") || holds(k) || holds(v)
		}
		if !drop {
			kept = append(kept, kv)
		}
	}
	return strings.Join(kept, "&")
}

// lenientUnescape is unescapeQuery's reference: each '+' and each well-formed escape replaced,
// anything else kept.
var escapeOrPlus = regexp.MustCompile(`\+|%[0-9A-Fa-f]{2}`)

func lenientUnescape(s string) string {
	return escapeOrPlus.ReplaceAllStringFunc(s, func(m string) string {
		if m == "+" {
			return " "
		}
		b, _ := strconv.ParseUint(m[1:], 16, 8)
		return string([]byte{byte(b)})
	})
}

func FuzzStripCredentialParams(f *testing.F) {
	const plusKey = "base64+key/with+plus=="
	keys := &callers{byHash: map[[sha256.Size]byte]*caller{
		sha256.Sum256([]byte(keyProd)): {}, sha256.Sum256([]byte(keyGen)): {}, sha256.Sum256([]byte(plusKey)): {}}, notKeys: newNotKeys()}
	for _, q := range []string{
		"", "&", "a&&b", "api-version=2025-01-01-preview", "api-version=1&api-key=x&x=1", "api-key=x",
		"x=1&Subscription-Key=k", "api%2Dkey=x&y=2", "pair=a," + keyProd, "pair=k=" + keyProd + ";x",
		"pair=b+" + keyProd + "&z", "g=0" + keyGen + "0", keyGen + "=1", "other=" + keyProd, "c=%zz&d=" + keyAdmin,
		"=&=&", "token=" + keyAdmin + "&x=1", "&api-key=x&y=1", keyProd + "=1", "%74" + keyGen[1:] + "%zz",
		"x=%74" + keyProd[1:] + ",%zz", "%zz%74" + keyAdmin[1:] + "=1", "a=%4", "a=%%41%2", "b=" + plusKey + "&c=1",
	} {
		f.Add(q, keyAdmin)
		f.Add(q, "")
	}
	f.Fuzz(func(t *testing.T, q, credential string) {
		got, want := stripCredentialParams(q, credential, keys), stripReference(q, credential, keys)
		if got != want {
			t.Fatalf("stripCredentialParams(%q, %q) = %q, want %q", q, credential, got, want)
		}
		if got == q && len(q) > 0 && unsafe.StringData(got) != unsafe.StringData(q) {
			t.Fatalf("a query that lost nothing was copied")
		}
	})
}

// FuzzHoldsKey compares holdsKey with a plain reference: a key as the whole value, as a field of
// it (split at spaces, commas, semicolons and tabs) or after the first '=' of one (holdsField),
// or a generated key anywhere.
func FuzzHoldsKey(f *testing.F) {
	const shortKey = "eight-ch" // minKeyLength exactly
	keys := []string{keyProd, keyGen, shortKey}
	cs := &callers{byHash: map[[sha256.Size]byte]*caller{}, notKeys: newNotKeys()}
	for _, k := range keys {
		cs.byHash[sha256.Sum256([]byte(k))] = &caller{}
	}
	for _, v := range []string{
		"", "application/json", "AzureOpenAI/Python 1.54.0", keyProd, "a," + keyProd, "k=" + keyProd + "; a=b",
		"x" + keyProd, "0" + keyGen + "0", "a==" + shortKey, "a=b=" + shortKey, shortKey + "=x", " " + shortKey + " ",
		"=" + shortKey, "a;b=" + shortKey + ",c", "\t" + keyProd + "\t=",
	} {
		f.Add(v)
	}
	f.Fuzz(func(t *testing.T, v string) {
		want := strings.Contains(v, keyGen)
		for _, k := range keys {
			want = want || holdsField(v, k)
		}
		if got := cs.holdsKey([]byte(v)); got != want {
			t.Fatalf("holdsKey(%q) = %v, want %v", v, got, want)
		}
	})
}
