package proxy

import (
	"context"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"syscall"
	"time"

	"github.com/valyala/fasthttp"
	"go.uber.org/zap"

	"github.com/tokenproxy/tokenproxy/internal/config"
)

// MaxHeaderBytes caps a caller's request line and headers; keys, and even Entra tokens, are far
// smaller. It is also the per-connection read buffer.
const MaxHeaderBytes = 32 << 10

// Server serves a Handler on listeners and shuts down gracefully.
type Server struct {
	srv     *fasthttp.Server
	log     *zap.Logger
	m       *metrics
	streams *streamSet

	// The connections being served (not handed over to a stream), with their read timeouts.
	conns *deadlines
	// clientCAs is Options.ClientCAs: a TLS connection records the CAs in force when it is
	// accepted, which its handshake, coming after, verifies against unless they change.
	clientCAs func() *x509.CertPool

	// The listeners Serve was given, and whether Shutdown has begun: fasthttp closes only the
	// listeners its Serve has taken, so one whose Serve had not got that far would be served
	// for ever after a Shutdown; Shutdown closes them all (see Serve).
	lmu  sync.Mutex
	lns  []net.Listener
	shut bool
}

// NewServer returns the API server for h with cfg's timeouts and limits.
func (h *Handler) NewServer(cfg *config.Config) *Server {
	if h.streams == nil {
		h.streams = newStreamSet()
	}
	s := &Server{log: h.log, m: h.m, streams: h.streams, conns: newDeadlines(cfg.Timeouts.ReadHeader, cfg.Timeouts.Idle), clientCAs: h.clientCAs}
	s.conns.answerCut = h.m.answerCuts.Inc
	s.srv = &fasthttp.Server{
		// The request line and headers must arrive within read_header; the body is read by the
		// handler once the caller is authenticated (StreamRequestBody), within idle; a
		// keep-alive connection is closed after idle. The gateway keeps these timeouts itself
		// (deadlines), so fasthttp's ReadTimeout and IdleTimeout stay unset.
		Handler: func(fc *fasthttp.RequestCtx) {
			h.serve(fc, s.conns.of(fc.Conn()))
		},
		ErrorHandler: func(fc *fasthttp.RequestCtx, err error) {
			h.serverError(fc, err)
			s.conns.of(fc.Conn()).waitAnswer()
		},
		ReadBufferSize:               MaxHeaderBytes,
		MaxRequestBodySize:           int(cfg.MaxRequestBytes),
		StreamRequestBody:            true,
		DisablePreParseMultipartForm: true,
		NoDefaultServerHeader:        true,
		NoDefaultContentType:         true,
		SecureErrorLogMessage:        true,
		// Also: each response is flushed as it ends, so a stream's handler may write its head
		// to the connection itself with nothing of the server's left to go first (detach).
		ReduceMemoryUsage: true,
		CloseOnShutdown:   true,
		// Event streams are relayed on connections the server hands over (Handler.detach),
		// which then close them: the server's own close of them does nothing (handOver).
		// Without KeepHijackedConns the server takes back their read buffers.
		// TCP keep-alive comes from the listener (Listen), not from a setting per connection.
		Logger:    fasthttpLogger{h.log.Named("http")},
		ConnState: s.track,
	}
	return s
}

// serverError answers requests the server could not read: malformed, too slow, headers too big.
func (h *Handler) serverError(fc *fasthttp.RequestCtx, err error) {
	var e *apiError
	var big *fasthttp.ErrSmallBuffer
	switch {
	case errors.As(err, &big):
		e = errorf(http.StatusRequestHeaderFieldsTooLarge, CodeInvalidRequest, "the request headers exceed %d bytes", MaxHeaderBytes)
	case errors.Is(err, fasthttp.ErrBodyTooLarge):
		e = errorf(http.StatusRequestEntityTooLarge, CodeRequestTooLarge, "the request body exceeds the gateway's limit (max_request_bytes)")
	case isTimeout(err):
		e = errorf(http.StatusRequestTimeout, CodeInvalidRequest, "the request did not arrive in time")
	default:
		e = errorf(http.StatusBadRequest, CodeInvalidRequest, "the request is not valid HTTP/1.1")
	}
	h.m.requestsFor("", "", statusLabel(e.status)).Inc()
	fc.SetConnectionClose()
	writeError(fc, e, requestID(&fc.Request.Header, h.callers.Load()))
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// track follows the server's connections: what each one waits for, and which are open.
func (s *Server) track(c net.Conn, state fasthttp.ConnState) {
	switch state {
	case fasthttp.StateNew:
		s.conns.open(c)
	case fasthttp.StateActive: // a request's first byte is in
		s.conns.of(c).waitHeaders()
	case fasthttp.StateIdle: // answered; waiting for the next request
		s.conns.of(c).waitIdle()
	case fasthttp.StateHijacked:
		s.conns.forget(c)
	case fasthttp.StateClosed:
		s.conns.forget(c)
		s.streams.closed(c)
	}
}

// Serve serves connections from ln until Shutdown. The read timeouts are kept while a Serve
// call runs; during a graceful shutdown, what is still open is bounded by the shutdown's grace.
// A Serve called after Shutdown closes ln and returns nil at once.
func (s *Server) Serve(ln net.Listener) error {
	s.lmu.Lock()
	if s.shut {
		s.lmu.Unlock()
		ln.Close()
		return nil
	}
	s.lns = append(s.lns, ln)
	s.lmu.Unlock()
	defer s.conns.start()()
	return s.srv.Serve(servedListener{ln, s.conns, s.clientCAs})
}

// closeListeners closes the listeners of Serve calls fasthttp's Shutdown may not have known
// of (fasthttp's Serve then returns nil), and makes later Serve calls return at once.
func (s *Server) closeListeners() {
	s.lmu.Lock()
	s.shut = true
	lns := s.lns
	s.lmu.Unlock()
	for _, ln := range lns {
		ln.Close() // closed already, most often: fasthttp's Shutdown did it
	}
}

// Shutdown stops accepting connections and waits for in-flight calls and streams to finish
// until ctx is done; then it closes the connections still open and reports how many there were.
func (s *Server) Shutdown(ctx context.Context) (cut int, err error) {
	err = s.srv.ShutdownWithContext(ctx)
	s.closeListeners()
	if err == nil {
		// The server is done with its connections; relayed streams may still be running.
		select {
		case <-s.streams.drained():
			return 0, nil
		case <-ctx.Done():
			err = ctx.Err()
		}
	}
	s.conns.conns.Range(func(c, _ any) bool {
		c.(net.Conn).Close()
		cut++
		return true
	})
	cut += s.streams.cut()
	s.m.shutdownCut.Add(float64(cut))
	// Give the closed connections' handlers and streams the moment they need to see the close.
	wctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s.srv.ShutdownWithContext(wctx)
	select {
	case <-s.streams.drained():
	case <-wctx.Done():
	}
	return cut, err
}

// fasthttpLogger sends fasthttp's own messages (failed reads, broken connections) to zap at
// debug level. SecureErrorLogMessage keeps request data out of most of them, but not all: a
// header parse error quotes the offending value, which may be a caller's key. So the errors in
// a message are replaced by what kind of failure they were.
type fasthttpLogger struct{ log *zap.Logger }

func (l fasthttpLogger) Printf(format string, args ...any) {
	safe := make([]any, len(args))
	for i, a := range args {
		if err, ok := a.(error); ok {
			a = errorKind(err)
		}
		safe[i] = a
	}
	l.log.Sugar().Debugf(format, safe...)
}

// errorKind names a connection-serving error without its text.
func errorKind(err error) string {
	var big *fasthttp.ErrSmallBuffer
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "the connection ended"
	case isTimeout(err):
		return "timed out"
	case errors.As(err, &big):
		return "the request headers are too large"
	case errors.Is(err, fasthttp.ErrBodyTooLarge):
		return "the request body is too large"
	case errors.Is(err, net.ErrClosed), errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return "the connection was closed"
	default:
		return "the request could not be parsed (details withheld: they may quote request headers)"
	}
}
