package transport

import (
	"bufio"
	"bytes"
	"iter"
	"strconv"

	"github.com/valyala/fasthttp"
)

// A Request is a request as Send sends it, with its head already rendered by the caller: no
// request object is built, copied or rendered on the way (the gateway writes its upstream
// request straight from the caller's parsed headers; see bench/README.md).
type Request struct {
	Method []byte // a token: GET, POST, …
	Target []byte // the request target in origin form: the path, '?' and the query if any
	Host   string // the Host header, and HTTP/2's :authority

	// Fields are the header fields, each "Name: value\r\n", in the order they are to go. The
	// caller vouches for them: names are tokens and values hold no control character other
	// than a tab. They leave out Host, Content-Length and Transfer-Encoding, which the
	// transport writes (the body goes with a Content-Length), Authorization, which Send is
	// given, and the hop-by-hop headers, which have no place in either version.
	Fields []byte

	Body []byte
}

// AppendField appends the header field name: value to r's Fields. name must be a token and
// value hold no control character other than a tab (see Fields).
func (r *Request) AppendField(name, value []byte) {
	r.Fields = append(r.Fields, name...)
	r.Fields = append(r.Fields, ": "...)
	r.Fields = append(r.Fields, value...)
	r.Fields = append(r.Fields, "\r\n"...)
}

// message is what the transport sends: a Request (Send), or a fasthttp.Request (Do).
type message interface {
	method() []byte
	target() []byte
	// authority is the Host header's value: cur, when it is the same, so that a value kept
	// between calls is not made again.
	authority(cur string) string
	body() []byte
	// fields yields the header fields as HTTP/2 takes them; encodeHead leaves out those
	// HTTP/2 has no place for.
	fields() iter.Seq2[[]byte, []byte]
	// closes reports whether the request asks for its connection to close after it.
	closes() bool
	// writeH1 writes the request as HTTP/1.1, with authorization (if not empty) as its
	// Authorization header.
	writeH1(bw *bufio.Writer, authorization string) error
}

func (r *Request) method() []byte { return r.Method }
func (r *Request) target() []byte { return r.Target }
func (r *Request) body() []byte   { return r.Body }
func (r *Request) closes() bool   { return false }

func (r *Request) authority(cur string) string {
	if r.Host == cur {
		return cur
	}
	return r.Host
}

// fields splits Fields at their line ends and first colons: they are the caller's own
// rendering, so each line has both.
func (r *Request) fields() iter.Seq2[[]byte, []byte] {
	return func(yield func([]byte, []byte) bool) {
		for rest := r.Fields; len(rest) > 0; {
			line, next, _ := bytes.Cut(rest, []byte("\r\n"))
			rest = next
			k, v, _ := bytes.Cut(line, []byte(": "))
			if !yield(k, v) {
				return
			}
		}
	}
}

// withLength reports whether a request goes with a Content-Length: one with a body does, and
// so does one whose method has one, even empty (as fasthttp's writer and net/http's do).
func withLength(method []byte, bodyLen int) bool {
	return bodyLen > 0 || string(method) != "GET" && string(method) != "HEAD"
}

func (r *Request) writeH1(bw *bufio.Writer, authorization string) error {
	if _, err := bw.Write(r.AppendHead(bw.AvailableBuffer(), authorization)); err != nil {
		return err
	}
	_, err := bw.Write(r.Body)
	return err
}

// AppendHead appends r's head as HTTP/1.1 sends it, up to and with the blank line that ends
// it, with authorization (if not empty) as its Authorization header.
func (r *Request) AppendHead(head []byte, authorization string) []byte {
	head = append(head, r.Method...)
	head = append(head, ' ')
	head = append(head, r.Target...)
	head = append(head, " HTTP/1.1\r\nHost: "...)
	head = append(head, r.Host...)
	head = append(head, "\r\n"...)
	head = append(head, r.Fields...)
	if withLength(r.Method, len(r.Body)) {
		head = append(head, "Content-Length: "...)
		head = strconv.AppendInt(head, int64(len(r.Body)), 10)
		head = append(head, "\r\n"...)
	}
	if authorization != "" {
		head = append(head, "Authorization: "...)
		head = append(head, authorization...)
		head = append(head, "\r\n"...)
	}
	return append(head, "\r\n"...)
}

// fastRequest is a fasthttp.Request as Do sends it.
type fastRequest struct{ *fasthttp.Request }

func (r fastRequest) method() []byte                    { return r.Header.Method() }
func (r fastRequest) target() []byte                    { return r.Header.RequestURI() }
func (r fastRequest) body() []byte                      { return r.Body() }
func (r fastRequest) fields() iter.Seq2[[]byte, []byte] { return r.Header.All() }
func (r fastRequest) closes() bool                      { return r.Header.ConnectionClose() }
func (r fastRequest) authority(cur string) string {
	if h := r.Request.Host(); string(h) != cur {
		return string(h)
	}
	return cur
}
func (r fastRequest) writeH1(bw *bufio.Writer, authorization string) error {
	return writeRequest(bw, r.Request, authorization)
}

// isHead reports whether m is a HEAD request, whose answer has no body.
func isHead(m message) bool { return string(m.method()) == "HEAD" }
