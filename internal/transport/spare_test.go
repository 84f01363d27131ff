package transport

import (
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

// sparesDialled waits for the spares being dialled (none start while no call runs).
func (t *Transport) sparesDialled() { t.spares.Wait() }

func TestSpareConnections(t *testing.T) {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	call := func(t *testing.T, tr *Transport, url string, close bool) {
		t.Helper()
		o, req := request(t, "POST", url, "x")
		if close {
			req.Header.SetConnectionClose() // as a stream cut short: its connection is not reused
		}
		resp := &fasthttp.Response{}
		stream, err := tr.Do(t.Context(), o, req, "", resp)
		if err != nil {
			t.Fatal(err)
		}
		if got := (result{resp, stream}).body(t); got != "ok" {
			t.Fatalf("body %q", got)
		}
	}

	t.Run("kept in reserve", func(t *testing.T) {
		srv, conns := countingServer(t, h)
		tr := newTransport(t, Options{Spares: 1})
		call(t, tr, srv.URL, false)
		tr.sparesDialled()
		// The call dialled for itself and a spare was dialled beside it: both are idle now.
		if got, want := tr.Stats(), []PoolStats{{Origin: srv.URL, Opened: 2, Idle: 2}}; !slices.Equal(got, want) {
			t.Fatalf("after the first call: %+v, want %+v", got, want)
		}
		// Sequential calls leave an idle connection behind them each time: nothing more is dialled.
		for range 5 {
			call(t, tr, srv.URL, false)
			tr.sparesDialled()
		}
		if got, want := tr.Stats(), []PoolStats{{Origin: srv.URL, Opened: 2, Idle: 2}}; !slices.Equal(got, want) {
			t.Errorf("after sequential calls: %+v, want %+v", got, want)
		}
		// The server may not have accepted the unused spare yet, but it saw nothing more.
		if n := conns.Load(); n > 2 {
			t.Errorf("the server saw %d connections, want at most 2", n)
		}
	})

	t.Run("replaced as used", func(t *testing.T) {
		srv, conns := countingServer(t, h)
		tr := newTransport(t, Options{Spares: 1})
		// Each call closes its connection. After the first, each takes the spare dialled
		// during the call before it, and another is dialled for the next.
		for range 4 {
			call(t, tr, srv.URL, true)
			tr.sparesDialled()
		}
		if got, want := tr.Stats(), []PoolStats{{Origin: srv.URL, Opened: 5, Idle: 1}}; !slices.Equal(got, want) {
			t.Errorf("stats %+v, want %+v", got, want)
		}
		if n := conns.Load(); n > 5 {
			t.Errorf("the server saw %d connections, want at most 5: 4 calls and a spare", n)
		}
	})

	t.Run("TLS", func(t *testing.T) {
		srv := httptest.NewTLSServer(h)
		defer srv.Close()
		roots := x509.NewCertPool()
		roots.AddCert(srv.Certificate())
		tr := newTransport(t, Options{Spares: 2, TLSConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}})
		call(t, tr, srv.URL, true)
		tr.sparesDialled()
		st := tr.Stats()
		if len(st) != 1 || st[0].Opened+st[0].Resumed != 3 || st[0].Idle != 2 {
			t.Errorf("stats %+v, want 3 connections opened (the call's and 2 spares), 2 idle", st)
		}
	})

	t.Run("none by default", func(t *testing.T) {
		srv, conns := countingServer(t, h)
		tr := newTransport(t, Options{})
		call(t, tr, srv.URL, true)
		call(t, tr, srv.URL, false)
		tr.sparesDialled()
		if n := conns.Load(); n != 2 {
			t.Errorf("the server saw %d connections, want 2 (one per call)", n)
		}
	})

	// A TLS server whose first connection is served and whose later ones are closed at once
	// (fail) or held unanswered (stall). The pool gets its first connection by a plain dial,
	// with no spare beside it, so that calls then use it and only spares dial.
	stalling := func(t *testing.T, hold bool) (*Transport, string, func()) {
		srv := httptest.NewUnstartedServer(h)
		l := &firstThen{Listener: srv.Listener, hold: hold}
		srv.Listener = l
		srv.StartTLS()
		roots := x509.NewCertPool()
		roots.AddCert(srv.Certificate())
		tr := New(Options{Spares: 1, TLSConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}})
		o, _ := request(t, "POST", srv.URL, "")
		p, err := tr.pool(o)
		if err != nil {
			t.Fatal(err)
		}
		c, err := p.dial(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		p.put(c, time.Now())
		return tr, srv.URL, func() { l.release(); srv.Close() }
	}

	t.Run("a failed spare is let go", func(t *testing.T) {
		tr, url, stop := stalling(t, false)
		defer stop()
		defer tr.Close()
		for range 2 {
			// The call takes the idle connection and a spare is dialled beside it, which fails.
			call(t, tr, url, false)
			tr.sparesDialled()
			if st := tr.Stats(); len(st) != 1 || st[0].Opened != 1 || st[0].Idle != 1 {
				t.Fatalf("stats %+v, want the first connection only, idle", st)
			}
		}
		if st := tr.Stats(); st[0].SpareFailures != 2 {
			t.Errorf("%d spare failures counted, want 2", st[0].SpareFailures)
		}
	})

	t.Run("Close stops a spare mid-handshake", func(t *testing.T) {
		tr, url, stop := stalling(t, true)
		defer stop()
		call(t, tr, url, false) // a spare is dialled, and its handshake stalls
		done := make(chan struct{})
		go func() { tr.Close(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("Close waited for a spare's handshake (10 s by default)")
		}
		if st := tr.Stats(); st[0].SpareFailures != 0 {
			t.Errorf("a spare stopped by Close counted as a failure: %+v", st)
		}
	})
}

// firstThen is a listener whose first connection is served; later ones are closed at once, or
// with hold, kept unanswered until release.
type firstThen struct {
	net.Listener
	hold bool

	mu    sync.Mutex
	first bool
	held  []net.Conn
}

func (l *firstThen) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return c, err
		}
		l.mu.Lock()
		first := !l.first
		l.first = true
		if !first && l.hold {
			l.held = append(l.held, c)
		}
		l.mu.Unlock()
		switch {
		case first:
			return c, nil
		case !l.hold:
			c.Close()
		}
	}
}

func (l *firstThen) release() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, c := range l.held {
		c.Close()
	}
}
