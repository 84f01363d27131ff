package transport

import (
	"bufio"
	"errors"
	"io"
)

// body reads a streamed response body off its connection's reader and undoes its framing:
// chunked (RFC 9112 §7.1), a length, or up to the connection's close. It is the gateway's own
// rather than fasthttp's so that a stream holds no response object while it waits for its next
// event.
type body struct {
	r *bufio.Reader
	// mode is how the body is framed; left is what remains of the current chunk (chunked) or of
	// the body (length).
	mode     framing
	left     int64
	needCRLF bool // chunked: the CRLF ending the last chunk's data is yet to be read
	done     bool
}

type framing uint8

const (
	chunked framing = iota
	length
	untilClose
)

// Limits on what a chunked body may hold besides data: a chunk-size line (with extensions) and
// the trailer section.
const (
	maxChunkLine = 4096
	maxTrailer   = 64 << 10
)

var errChunk = errors.New("transport: malformed chunked encoding")

// Read returns body data. io.EOF is the body's proper end; a connection that ends before it
// gives io.ErrUnexpectedEOF (except for a body ended by the close).
func (b *body) Read(p []byte) (int, error) {
	if b.done {
		return 0, io.EOF
	}
	switch b.mode {
	case untilClose:
		n, err := b.r.Read(p)
		if err == io.EOF {
			b.done = true
		}
		return n, err
	case length:
		if b.left == 0 {
			b.done = true
			return 0, io.EOF
		}
		n, err := b.r.Read(p[:min(int64(len(p)), b.left)])
		b.left -= int64(n)
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		if err == nil && b.left == 0 {
			b.done = true
			err = io.EOF
		}
		return n, err
	}
	if b.left == 0 {
		if err := b.nextChunk(); err != nil {
			return 0, err
		}
		if b.done {
			return 0, io.EOF
		}
	}
	n, err := b.r.Read(p[:min(int64(len(p)), b.left)])
	b.left -= int64(n)
	if b.left == 0 {
		b.needCRLF = true
	}
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

// nextChunk reads up to the next chunk's data: the CRLF ending the one before, its size line,
// and, for the last chunk, the trailer section (which is dropped).
func (b *body) nextChunk() error {
	if b.needCRLF {
		if err := b.expect('\r', '\n'); err != nil {
			return err
		}
		b.needCRLF = false
	}
	size, err := b.sizeLine()
	if err != nil {
		return err
	}
	if size > 0 {
		b.left = size
		return nil
	}
	// The last chunk: trailer fields, then an empty line.
	for total := 0; ; {
		line, err := b.line(maxTrailer - total)
		if err != nil {
			return err
		}
		total += line
		if line == 0 {
			b.done = true
			return nil
		}
	}
}

// sizeLine reads a chunk-size line: hex digits, optional whitespace, optional extensions after a
// ';', then CRLF.
func (b *body) sizeLine() (int64, error) {
	var size int64
	digits := 0
	for {
		c, err := b.r.ReadByte()
		if err != nil {
			return 0, eofIsUnexpected(err)
		}
		v, ok := hexValue(c)
		if !ok {
			b.r.UnreadByte()
			break
		}
		if digits++; digits > 15 {
			return 0, errChunk // beyond any body this gateway would relay
		}
		size = size<<4 | int64(v)
	}
	if digits == 0 {
		return 0, errChunk
	}
	// Optional whitespace, then extensions after a ';' or the line's end. The whitespace counts
	// against the line's limit too: endless, it would keep the reader spinning on one line.
	for spaces := 0; ; spaces++ {
		c, err := b.r.ReadByte()
		if err != nil {
			return 0, eofIsUnexpected(err)
		}
		switch c {
		case ' ', '\t':
			if spaces >= maxChunkLine {
				return 0, errChunk
			}
			continue
		case ';':
			if _, err := b.line(maxChunkLine); err != nil {
				return 0, err
			}
			return size, nil
		case '\r':
			return size, b.expect('\n')
		}
		return 0, errChunk
	}
}

// line reads the rest of a line (up to limit bytes before its CRLF) and reports its length
// without the CRLF. A bare LF is refused: framing must be unambiguous.
func (b *body) line(limit int) (int, error) {
	n := 0
	for {
		c, err := b.r.ReadByte()
		if err != nil {
			return 0, eofIsUnexpected(err)
		}
		switch c {
		case '\r':
			if err := b.expect('\n'); err != nil {
				return 0, err
			}
			return n, nil
		case '\n':
			return 0, errChunk
		}
		if n++; n > limit {
			return 0, errChunk
		}
	}
}

// expect reads want, byte by byte.
func (b *body) expect(want ...byte) error {
	for _, w := range want {
		c, err := b.r.ReadByte()
		if err != nil {
			return eofIsUnexpected(err)
		}
		if c != w {
			return errChunk
		}
	}
	return nil
}

func hexValue(c byte) (byte, bool) {
	switch {
	case c >= '0' && c <= '9':
		return c - '0', true
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10, true
	case c >= 'A' && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

func eofIsUnexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}
