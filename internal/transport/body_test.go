package transport

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
)

// readBody decodes raw as a body framed by mode (left for a length) through a reader of size.
func readBody(raw string, mode framing, left int64, size int) (string, error) {
	b := &body{r: bufio.NewReaderSize(strings.NewReader(raw), size), mode: mode, left: left}
	var out bytes.Buffer
	buf := make([]byte, 7)
	for {
		n, err := b.Read(buf)
		out.Write(buf[:n])
		if err == io.EOF {
			return out.String(), nil
		}
		if err != nil {
			return out.String(), err
		}
	}
}

func TestChunkedBody(t *testing.T) {
	for _, tt := range []struct {
		raw, want string
		err       error
	}{
		{"5\r\nhello\r\n0\r\n\r\n", "hello", nil},
		{"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", "hello world", nil},
		{"0005;name=value\r\nhello\r\nA \r\n0123456789\r\n0\r\nTrailer: x\r\nMore: y\r\n\r\n", "hello0123456789", nil},
		{"0\r\n\r\n", "", nil},
		{"5\r\nhello\r\n0\r\n\r\nextra", "hello", nil}, // what follows is not the body's
		{"5\r\nhel", "hel", io.ErrUnexpectedEOF},
		{"5\r\nhello\r\n", "hello", io.ErrUnexpectedEOF},
		{"5\r\nhello\r\n0\r\n", "hello", io.ErrUnexpectedEOF},
		{"5\nhello\r\n0\r\n\r\n", "", errChunk},      // bare LF
		{"5\r\nhelloXY0\r\n\r\n", "hello", errChunk}, // no CRLF after the data
		{"x\r\nhello\r\n0\r\n\r\n", "", errChunk},    // no size
		{"-5\r\nhello\r\n0\r\n\r\n", "", errChunk},   // no size
		{"5xyz\r\nhello\r\n0\r\n\r\n", "", errChunk}, // not a size
		{"5 ;x\r\nhello\r\n0\r\n\r\n", "hello", nil},
		{"1000000000000000\r\n", "", errChunk}, // too large
		{"5;" + strings.Repeat("e", maxChunkLine+1) + "\r\nhello\r\n0\r\n\r\n", "", errChunk},
		{"5" + strings.Repeat(" ", maxChunkLine+1) + "\r\nhello\r\n0\r\n\r\n", "", errChunk}, // endless whitespace
		{"5" + strings.Repeat(" ", 100) + "\r\nhello\r\n0\r\n\r\n", "hello", nil},
		{"0\r\n" + strings.Repeat("T: "+strings.Repeat("v", 1000)+"\r\n", 70) + "\r\n", "", errChunk},
	} {
		for _, size := range []int{16, 512} {
			got, err := readBody(tt.raw, chunked, 0, size)
			if got != tt.want || !errors.Is(err, tt.err) {
				t.Errorf("%.40q (reader of %d): got %q, %v; want %q, %v", tt.raw, size, got, err, tt.want, tt.err)
			}
		}
	}
}

func TestLengthAndCloseBodies(t *testing.T) {
	if got, err := readBody("hello world", length, 5, 16); got != "hello" || err != nil {
		t.Errorf("length 5: got %q, %v", got, err)
	}
	if got, err := readBody("hel", length, 5, 16); got != "hel" || err != io.ErrUnexpectedEOF {
		t.Errorf("length 5, 3 sent: got %q, %v; want io.ErrUnexpectedEOF", got, err)
	}
	if got, err := readBody("", length, 0, 16); got != "" || err != nil {
		t.Errorf("length 0: got %q, %v", got, err)
	}
	if got, err := readBody("all of it", untilClose, 0, 16); got != "all of it" || err != nil {
		t.Errorf("until close: got %q, %v", got, err)
	}
}

// FuzzChunkedBody encodes data in chunks of the sizes the input picks (with extensions and a
// trailer when it says so) and checks the decoder returns exactly data; arbitrary bytes fed to
// it as they are must give data or an error, never a panic or a hang.
func FuzzChunkedBody(f *testing.F) {
	f.Add([]byte("hello, world"), []byte{3, 0, 250}, true)
	f.Add([]byte("5\r\nhello\r\n0\r\n\r\n"), []byte{}, false)
	f.Add([]byte{}, []byte{1}, true)
	f.Fuzz(func(t *testing.T, data, splits []byte, extras bool) {
		var enc bytes.Buffer
		rest := data
		for i := 0; len(rest) > 0; i++ {
			n := len(rest)
			if i < len(splits) && splits[i] > 0 {
				n = min(n, int(splits[i]))
			}
			fmt.Fprintf(&enc, "%x", n)
			if extras {
				enc.WriteString(";ext=1")
			}
			enc.WriteString("\r\n")
			enc.Write(rest[:n])
			enc.WriteString("\r\n")
			rest = rest[n:]
		}
		enc.WriteString("0\r\n")
		if extras {
			enc.WriteString("X-Trailer: t\r\n")
		}
		enc.WriteString("\r\n")
		for _, size := range []int{16, 512} {
			got, err := readBody(enc.String(), chunked, 0, size)
			if err != nil || got != string(data) {
				t.Fatalf("reader of %d: decoding %q gave %q, %v; want %q", size, enc.String(), got, err, data)
			}
		}
		readBody(string(data), chunked, 0, 16) // must return
	})
}
