package proxy

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"strings"
)

// modelRef is where the deployment name was found in a request body.
type modelRef struct {
	name string
	// start and end delimit the JSON string token (quotes included) so a rename can replace it
	// without re-encoding the body; both are -1 for multipart bodies.
	start, end int
}

var (
	errDuplicateModel     = errors.New("the body names model more than once")
	errModelInAnotherCase = errors.New(`the body has a member named "model" in another case`)
	errModelTooLong       = errors.New("the model is too long to be a deployment name")
)

// maxModelToken bounds a JSON body's model token, escapes and quotes included: a deployment
// name has at most 64 characters, each at most six bytes escaped. A longer one is refused
// before it is decoded, and never quoted.
const maxModelToken = 64*6 + 2

// errMalformedPart stands for mime/multipart's errors, which quote the line they could not read:
// a caller's key in it would go to the log.
var errMalformedPart = errors.New("a part's boundary or header lines cannot be read")

// peekModel finds the deployment a body-routed request (/openai/v1, /models) targets: the
// top-level "model" of a JSON body, or the "model" field of a multipart form (audio, images).
// An empty name means the body names no model.
func peekModel(contentType string, body []byte) (modelRef, *apiError) {
	mt, params, _ := mime.ParseMediaType(contentType)
	if mt == "multipart/form-data" {
		name, err := multipartModel(body, params["boundary"])
		if err != nil {
			return modelRef{}, errorf(http.StatusBadRequest, CodeInvalidBody, "the multipart body is malformed: %v", err)
		}
		return modelRef{name: name, start: -1, end: -1}, nil
	}
	if len(bytes.TrimSpace(body)) == 0 {
		return modelRef{start: -1, end: -1}, nil
	}
	ref, err := jsonModel(body)
	if err != nil {
		return modelRef{}, errorf(http.StatusBadRequest, CodeInvalidBody, "%v", err)
	}
	return ref, nil
}

// jsonModel returns the top-level "model" member of a JSON object. The body must be valid JSON.
// Keys are compared after JSON unescaping, and a repeated "model" is an error: parsers differ on
// which duplicate wins, and the gateway must authorise exactly the deployment the upstream uses.
func jsonModel(b []byte) (modelRef, error) {
	ref := modelRef{start: -1, end: -1}
	if !json.Valid(b) {
		return ref, errors.New("the request body is not valid JSON")
	}
	i := skipSpace(b, 0)
	if b[i] != '{' {
		return ref, errors.New("the request body must be a JSON object")
	}
	i = skipSpace(b, i+1)
	found := false
	for b[i] != '}' {
		keyEnd := skipString(b, i)
		key := b[i:keyEnd]
		i = skipSpace(b, keyEnd) + 1 // past ':'
		i = skipSpace(b, i)
		valEnd := skipValue(b, i)
		switch keyIs(key, "model") {
		case exactly:
			if found {
				return ref, errDuplicateModel
			}
			found = true
			if b[i] != '"' {
				return ref, errors.New("model must be a string")
			}
			if valEnd-i > maxModelToken {
				return ref, errModelTooLong
			}
			ref.name = unquote(b[i:valEnd])
			ref.start, ref.end = i, valEnd
		case butForCase:
			// A parser that matches names without regard to case (ASP.NET's web defaults do)
			// could take this one for the model.
			return ref, errModelInAnotherCase
		}
		i = skipSpace(b, valEnd)
		if b[i] == ',' {
			i = skipSpace(b, i+1)
		}
	}
	return ref, nil
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// skipString returns the index just past the string token starting at b[i] == '"'.
func skipString(b []byte, i int) int {
	for j := i + 1; j < len(b); j++ {
		switch b[j] {
		case '\\':
			j++
		case '"':
			return j + 1
		}
	}
	return len(b)
}

// skipValue returns the index just past the (valid) JSON value starting at b[i].
func skipValue(b []byte, i int) int {
	switch b[i] {
	case '"':
		return skipString(b, i)
	case '{', '[':
		depth := 0
		for j := i; j < len(b); j++ {
			switch b[j] {
			case '"':
				j = skipString(b, j) - 1
			case '{', '[':
				depth++
			case '}', ']':
				if depth--; depth == 0 {
					return j + 1
				}
			}
		}
		return len(b)
	default: // number, true, false, null
		j := i
		for j < len(b) && b[j] != ',' && b[j] != '}' && b[j] != ']' && b[j] != ' ' && b[j] != '\t' && b[j] != '\n' && b[j] != '\r' {
			j++
		}
		return j
	}
}

// How a member's name compares with a wanted one.
const (
	other = iota
	exactly
	butForCase // equal without regard to case, and not with it
)

// keyIs compares the string token tok, decoded, with want (lower-case ASCII).
func keyIs(tok []byte, want string) int {
	var k string
	if plain(tok) {
		if len(tok) != len(want)+2 {
			return other
		}
		k = string(tok[1 : len(tok)-1])
	} else {
		k = unquote(tok)
	}
	switch {
	case k == want:
		return exactly
	case strings.EqualFold(k, want):
		return butForCase
	}
	return other
}

// unquote decodes a string token exactly as encoding/json does (escapes, and invalid UTF-8
// replaced by U+FFFD), so the gateway reads the same name any JSON parser upstream would.
func unquote(tok []byte) string {
	if plain(tok) {
		return string(tok[1 : len(tok)-1])
	}
	var s string
	json.Unmarshal(tok, &s) // tok is a valid JSON string
	return s
}

// plain reports whether a string token has no escapes and no non-ASCII bytes.
func plain(tok []byte) bool {
	for _, c := range tok {
		if c == '\\' || c >= 0x80 {
			return false
		}
	}
	return true
}

// asksForStream reports whether a request body asks for an event stream: a JSON body's member
// "stream": true, or a multipart form's field stream (name="stream", a blank line, true), as
// transcriptions take it. It only chooses which connections carry the call (see
// upstream.streams), so it looks for either anywhere rather than parse the body: a body it
// misjudges is carried all the same, only the other way.
func asksForStream(body []byte) bool {
	for {
		i := bytes.Index(body, streamKey)
		if i < 0 {
			return false
		}
		body = body[i+len(streamKey):]
		j := skipSpace(body, 0)
		if j < len(body) && body[j] == ':' { // JSON; a form field's name has no colon after it
			j = skipSpace(body, j+1)
		}
		if bytes.HasPrefix(body[j:], jsonTrue) {
			return true
		}
	}
}

var streamKey, jsonTrue = []byte(`"stream"`), []byte("true")

// multipartModel returns the value of the form's "model" field.
func multipartModel(body []byte, boundary string) (string, error) {
	if boundary == "" {
		return "", errors.New("no boundary")
	}
	mr := multipart.NewReader(bytes.NewReader(body), boundary)
	name, found := "", false
	for {
		p, err := mr.NextRawPart()
		if err == io.EOF {
			return name, nil
		}
		if err != nil {
			return "", errMalformedPart
		}
		switch n := p.FormName(); {
		case n == "model":
		case strings.EqualFold(n, "model"):
			return "", errModelInAnotherCase
		default:
			continue
		}
		if found {
			return "", errDuplicateModel
		}
		found = true
		v, err := io.ReadAll(io.LimitReader(p, 257))
		if err != nil {
			return "", errMalformedPart
		}
		if len(v) > 256 {
			return "", errModelTooLong
		}
		name = string(v)
	}
}

// renameModel returns body with the model string token replaced by name (a validated
// deployment name, so it needs no escaping).
func renameModel(body []byte, ref modelRef, name string) []byte {
	out := make([]byte, 0, len(body)-(ref.end-ref.start)+len(name)+2)
	out = append(out, body[:ref.start]...)
	out = append(out, '"')
	out = append(out, name...)
	out = append(out, '"')
	return append(out, body[ref.end:]...)
}
