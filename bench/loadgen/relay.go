package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"io"
	"net"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"time"
)

// relay is the suite's floor: the least a Go proxy can do for the same job as the nginx
// configuration, with Go's standard library and nothing else. Each caller connection has a
// goroutine with 4 KiB buffers; a request's api-key must equal --key and is dropped, and
// --header lines are added; requests go out over a pool of keep-alive upstream connections. A
// response with a Content-Length is relayed and its connection reused; any other (an event
// stream) is copied through as it comes until one side closes. No routing, token, metrics, log,
// limits or timeouts: it tells how much of a proxy's cost is Go's network stack and scheduler,
// and how much is the work on top.
//
// Two knobs, for measuring by hand what a Go proxy can afford to spend on its own work: --yield
// has each call yield to the scheduler between writing the request upstream and reading the
// answer, as the gateway's transport does, and --work adds that much busy CPU work to each call
// before its request goes upstream, in place of a real proxy's work on top (bench/README.md,
// "How much a call can cost").
func relay(ctx context.Context, args []string) error {
	o, err := relayFlags("relay", "127.0.0.1:18009", args)
	if err != nil {
		return err
	}
	r := &relayer{upstream: o.upstream, key: o.key, add: o.add, yield: o.yield, spins: spinsFor(o.work)}
	ln, err := net.Listen("tcp", o.listen)
	if err != nil {
		return err
	}
	go func() { <-ctx.Done(); ln.Close() }()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			continue
		}
		go r.serve(c)
	}
}

// relayOptions are the flags of relay and evrelay.
type relayOptions struct {
	listen, upstream string
	key              []byte
	add              []byte        // header lines to add, each with its CRLF
	yield            bool          // relay only
	work             time.Duration // relay only
}

func relayFlags(name, listen string, args []string) (relayOptions, error) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	l := fs.String("listen", listen, "address")
	upstream := fs.String("upstream", "", "upstream host:port (plain HTTP/1.1)")
	key := fs.String("key", "", "the api-key a request must carry")
	var headers multiFlag
	fs.Var(&headers, "header", "header line to add to each request (repeatable)")
	var yield *bool
	var work *time.Duration
	if name == "relay" {
		yield = fs.Bool("yield", false, "yield to the scheduler between writing a request upstream and reading the answer")
		work = fs.Duration("work", 0, "busy CPU work to add to each call, e.g. 3us")
	}
	if err := fs.Parse(args); err != nil {
		return relayOptions{}, err
	}
	if *upstream == "" || *key == "" {
		return relayOptions{}, errors.New(name + " needs --upstream and --key")
	}
	o := relayOptions{listen: *l, upstream: *upstream, key: []byte(*key)}
	if yield != nil {
		o.yield, o.work = *yield, *work
		if o.work < 0 || o.work > time.Millisecond {
			return relayOptions{}, errors.New("--work must be between 0 and 1ms")
		}
	}
	for _, h := range headers {
		o.add = append(o.add, h+"\r\n"...)
	}
	return o, nil
}

type relayer struct {
	upstream string
	key      []byte
	add      []byte
	yield    bool
	spins    int // of spin, a call's --work

	mu   sync.Mutex
	idle []*upConn
}

type upConn struct {
	c  net.Conn
	br *bufio.Reader
}

func (r *relayer) get() (*upConn, error) {
	r.mu.Lock()
	if n := len(r.idle); n > 0 {
		u := r.idle[n-1]
		r.idle = r.idle[:n-1]
		r.mu.Unlock()
		return u, nil
	}
	r.mu.Unlock()
	c, err := net.Dial("tcp", r.upstream)
	if err != nil {
		return nil, err
	}
	return &upConn{c: c, br: bufio.NewReaderSize(c, 4<<10)}, nil
}

func (r *relayer) put(u *upConn) {
	r.mu.Lock()
	r.idle = append(r.idle, u)
	r.mu.Unlock()
}

var (
	contentLength = []byte("content-length:")
	apiKey        = []byte("api-key:")
	unauthorized  = []byte("HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
)

// head reads a message head into buf, without its final empty line, and returns it with its
// Content-Length (-1 if none) and whether it carried the api-key wanted (with the api-key line
// left out) when want is set.
func head(br *bufio.Reader, buf []byte, want []byte) (h []byte, cl int, keyOK bool, err error) {
	h, cl = buf[:0], -1
	for {
		line, err := br.ReadSlice('\n')
		if err != nil {
			return nil, 0, false, err
		}
		if len(line) <= 2 {
			return h, cl, keyOK, nil
		}
		if v, ok := headerValue(line, contentLength); ok {
			if cl, err = parseLength(v); err != nil {
				return nil, 0, false, err
			}
		} else if v, ok := headerValue(line, apiKey); ok && want != nil {
			keyOK = bytes.Equal(v, want)
			continue
		}
		h = append(h, line...)
	}
}

// headerValue returns the value of a header line if its name is name (given with its colon,
// in lower case), compared without regard to case.
func headerValue(line, name []byte) ([]byte, bool) {
	if len(line) <= len(name) || !bytes.EqualFold(line[:len(name)], name) {
		return nil, false
	}
	return bytes.TrimSpace(line[len(name):]), true
}

// parseLength parses a Content-Length value.
func parseLength(v []byte) (int, error) {
	n, err := strconv.Atoi(string(v))
	if err != nil || n < 0 {
		return 0, errors.New("bad Content-Length")
	}
	return n, nil
}

func (r *relayer) serve(c net.Conn) {
	defer c.Close()
	br := bufio.NewReaderSize(c, 4<<10)
	bw := bufio.NewWriterSize(c, 4<<10)
	var hb, rb, out []byte
	for {
		h, cl, ok, err := head(br, hb[:0], r.key)
		if err != nil {
			return
		}
		hb = h
		if !ok {
			c.Write(unauthorized)
			return
		}
		out = append(append(append(out[:0], h...), r.add...), "\r\n"...)
		if cl > 0 {
			n := len(out)
			out = slices.Grow(out, cl)[:n+cl]
			if _, err := io.ReadFull(br, out[n:]); err != nil {
				return
			}
		}
		spin(r.spins)
		u, err := r.get()
		if err != nil {
			return
		}
		if _, err := u.c.Write(out); err != nil {
			u.c.Close()
			return
		}
		if r.yield {
			runtime.Gosched()
		}
		h, cl, _, err = head(u.br, rb[:0], nil)
		if err != nil {
			u.c.Close()
			return
		}
		rb = h
		bw.Write(h)
		bw.WriteString("\r\n")
		if cl < 0 {
			r.stream(c, bw, u)
			return
		}
		if _, err := io.CopyN(bw, u.br, int64(cl)); err != nil {
			u.c.Close()
			return
		}
		r.put(u)
		if bw.Flush() != nil {
			return
		}
	}
}

// stream copies a response of unknown length through as it arrives, until either side closes.
func (r *relayer) stream(c net.Conn, bw *bufio.Writer, u *upConn) {
	defer u.c.Close()
	if bw.Flush() != nil {
		return
	}
	go func() { io.Copy(io.Discard, c); u.c.Close() }() // the caller hanging up ends the stream
	buf := make([]byte, 512)
	for {
		n, err := u.br.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// spinSink keeps spin's result alive, so that the compiler cannot drop its loop.
var spinSink uint64

// spin is n rounds of busy work: arithmetic on one register, no memory, no system call.
func spin(n int) {
	x := spinSink
	for range n {
		x = x*6364136223846793005 + 1442695040888963407
	}
	spinSink = x
}

// spinsFor returns how many rounds of spin take d on this machine, timed once at start.
func spinsFor(d time.Duration) int {
	if d <= 0 {
		return 0
	}
	const n = 50_000_000
	start := time.Now()
	spin(n)
	return int(float64(n) * float64(d) / float64(time.Since(start)))
}
