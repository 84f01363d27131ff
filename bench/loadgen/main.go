// Command loadgen is the benchmark suite's streaming half: an SSE upstream that holds streams
// open, and a client that opens many streams through a proxy and times their first chunk. It
// is also the suite's floor: a bare Go relay doing nginx's job with nothing on top, and the
// same job on an event loop of its own (evrelay, Linux, run by hand: see bench/README.md).
// Plain request/response load is wrk's job. See bench/README.md.
//
//	loadgen sse --listen 127.0.0.1:18005 [--interval 1s] [--tls-ca ca.pem]
//	loadgen streams --url URL --n 1000 [--header 'api-key: KEY'] [--hold 3s]
//	loadgen relay --listen 127.0.0.1:18009 --upstream 127.0.0.1:18001 --key KEY [--header 'Authorization: Bearer …'] [--yield] [--work 3us]
//	loadgen evrelay --listen 127.0.0.1:18012 --upstream 127.0.0.1:18001 --key KEY [--header 'Authorization: Bearer …']
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/tokenproxy/tokenproxy/internal/emulator"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: loadgen sse|streams|relay|evrelay [flags]")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "sse":
		err = sse(ctx, os.Args[2:])
	case "streams":
		err = streams(ctx, os.Args[2:])
	case "relay":
		err = relay(ctx, os.Args[2:])
	case "evrelay":
		err = evrelay(ctx, os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
}

// chunk is one chat.completion.chunk event, about the size Azure sends for a token or two.
const chunk = `data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1730746163,"model":"gpt-4.1-mini-2025-04-14","choices":[{"index":0,"delta":{"content":"token "},"finish_reason":null}]}` + "\n\n"

// sse answers every request with an event stream: one event at once, then one per interval until
// the client goes away. With --tls-ca it serves HTTP/1.1 over TLS, as Azure's endpoints are
// reached, with a certificate for 127.0.0.1 and localhost from a CA made at start (the
// emulator's), and writes the CA's certificate to the file named, for the proxies to trust; with
// --http2 as well, it also offers HTTP/2 (ALPN h2) for clients that ask for it.
func sse(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("sse", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:18005", "address")
	interval := fs.Duration("interval", time.Second, "time between events after the first")
	caFile := fs.String("tls-ca", "", "serve TLS, writing the CA certificate to trust (PEM) to this file")
	h2 := fs.Bool("http2", false, "with --tls-ca, offer HTTP/2 too")
	if err := fs.Parse(args); err != nil {
		return err
	}
	srv := &http.Server{Addr: *listen, ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "text/event-stream")
		w.Header().Set("apim-request-id", "6a1b2c3d-0000-4000-8000-000000000000")
		fl := w.(http.Flusher)
		t := time.NewTicker(*interval)
		defer t.Stop()
		for {
			if _, err := io.WriteString(w, chunk); err != nil {
				return
			}
			fl.Flush()
			select {
			case <-r.Context().Done():
				return
			case <-t.C:
			}
		}
	})}
	go func() { <-ctx.Done(); srv.Close() }()
	serve := srv.ListenAndServe
	if *caFile != "" {
		ca, err := emulator.NewCA()
		if err != nil {
			return err
		}
		if srv.TLSConfig, err = ca.ServerConfig(); err != nil {
			return err
		}
		if err := os.WriteFile(*caFile, ca.CertPEM(), 0o644); err != nil {
			return err
		}
		if *h2 {
			srv.HTTP2 = &http.HTTP2Config{MaxConcurrentStreams: 1000}
		} else {
			// HTTP/1.1 only, so that every proxy relays the stream the same way.
			srv.TLSConfig.NextProtos = []string{"http/1.1"}
			srv.TLSNextProto = map[string]func(*http.Server, *tls.Conn, http.Handler){}
		}
		serve = func() error { return srv.ListenAndServeTLS("", "") }
	}
	if err := serve(); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// streams opens n streams through url, each on its own connection, then times --probes more
// streams one after another while the n stay open: from sending the request to the first event.
// Then it prints "open N", holds the n streams for --hold while the caller measures the proxy,
// prints the results and closes them all.
func streams(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("streams", flag.ContinueOnError)
	target := fs.String("url", "", "stream URL (http)")
	n := fs.Int("n", 100, "concurrent streams")
	hold := fs.Duration("hold", 3*time.Second, "how long all streams stay open after the last one started")
	parallel := fs.Int("parallel", 64, "connections being opened at once")
	timeout := fs.Duration("timeout", 60*time.Second, "limit for opening every stream")
	probes := fs.Int("probes", 100, "streams timed one at a time while the n are open")
	var headers multiFlag
	fs.Var(&headers, "header", "request header `Name: value` (repeatable)")
	body := fs.String("body", `{"stream":true,"messages":[{"role":"user","content":"hello"}]}`, "request body")
	if err := fs.Parse(args); err != nil {
		return err
	}
	u, err := url.Parse(*target)
	if err != nil || u.Scheme != "http" {
		return fmt.Errorf("--url must be an http URL")
	}
	var req strings.Builder
	fmt.Fprintf(&req, "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n", u.RequestURI(), u.Host, len(*body))
	for _, h := range headers {
		req.WriteString(h + "\r\n")
	}
	req.WriteString("\r\n" + *body)
	raw := []byte(req.String())

	ctx, cancel := context.WithTimeout(ctx, *timeout+*hold+10*time.Second)
	defer cancel()
	openCtx, openCancel := context.WithTimeout(ctx, *timeout)
	defer openCancel()

	var failed atomic.Int64
	var firstErr error
	var errOnce sync.Once
	fail := func(err error) {
		failed.Add(1)
		errOnce.Do(func() { firstErr = err })
	}
	conns := make([]net.Conn, *n)
	sem := make(chan struct{}, *parallel)
	var wg sync.WaitGroup
	for i := range *n {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c, _, err := open(openCtx, u.Host, raw)
			if err != nil {
				fail(err)
				return
			}
			conns[i] = c
			// Keep reading so the proxy's writes never block; the events are discarded.
			go io.Copy(io.Discard, c)
		}()
	}
	wg.Wait()
	ok := *n - int(failed.Load())
	openFailed := failed.Swap(0) // from here on, failed counts probes
	var got []time.Duration
	for range *probes {
		c, d, err := open(openCtx, u.Host, raw)
		if err != nil {
			fail(err)
			continue
		}
		c.Close()
		got = append(got, d)
	}
	fmt.Printf("open %d\n", ok)
	if firstErr != nil {
		fmt.Fprintf(os.Stderr, "loadgen: %d of %d streams and %d of %d probes failed; the first: %v\n", openFailed, *n, failed.Load(), *probes, firstErr)
	}
	select {
	case <-time.After(*hold):
	case <-ctx.Done():
	}
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
	slices.Sort(got)
	fmt.Printf("streams=%d probes_failed=%d ttfc_p50_us=%d ttfc_p99_us=%d\n", ok, failed.Load(), pct(got, 50).Microseconds(), pct(got, 99).Microseconds())
	if ok == 0 && *n > 0 || len(got) == 0 && *probes > 0 {
		return errors.New("no stream opened")
	}
	return nil
}

// open dials, sends the request and waits for the response headers and the first event.
func open(ctx context.Context, host string, raw []byte) (net.Conn, time.Duration, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", host)
	if err != nil {
		return nil, 0, err
	}
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	start := time.Now()
	if _, err := c.Write(raw); err != nil {
		c.Close()
		return nil, 0, err
	}
	br := bufio.NewReaderSize(c, 4096)
	status, err := br.ReadString('\n')
	if err != nil {
		c.Close()
		return nil, 0, err
	}
	if !strings.HasPrefix(status, "HTTP/1.1 200") {
		c.Close()
		return nil, 0, fmt.Errorf("status %q", strings.TrimSpace(status))
	}
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			c.Close()
			return nil, 0, err
		}
		if strings.Contains(line, "data: ") {
			break
		}
	}
	elapsed := time.Since(start)
	c.SetDeadline(time.Time{})
	return &bufferedConn{Conn: c, r: br}, elapsed, nil
}

type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

func pct(sorted []time.Duration, p int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, len(sorted)*p/100)]
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ", ") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }
