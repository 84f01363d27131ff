package proxy

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// deadlines keeps the timeouts on callers' connections:
//   - a new connection's first byte within read_header;
//   - a request's line and headers within read_header of their first byte (with the first
//     8 KiB of the body, which the server reads along);
//   - the rest of the body within idle of the handler starting (it reads the body once the
//     caller is known);
//   - an answer the server writes (read whole, an error, or the last of a large body of known
//     length) taken by the caller within idle of the call's end, with whatever of the body the
//     call left unread, which the server reads and drops after the answer;
//   - a keep-alive connection's next request within idle of the last answer.
//
// Nothing is read from a caller while its call is with the upstream, so no timeout runs then.
// A stream relayed as it comes is bounded by its own idle watch (timeouts.stream_idle).
//
// fasthttp can keep these itself, but it sets three socket deadlines on every call for them,
// and each reads the clock five times and moves a runtime timer: about 2-4% of the gateway's
// throughput (bench/README.md). Here a connection's wait only stores when it times out, on a
// coarse clock that one goroutine advances every tick. That goroutine cuts each connection
// whose time has passed by giving it a read deadline in the past, which fails the blocked read
// as a deadline of its own would have: a request that did not arrive in time is answered 408,
// an idle keep-alive connection (or a new one that sent nothing) is closed, a stalled body is
// answered 400. The read deadline stays in the past, so a connection that was cut, if anything
// was still to be read from it, is closed. An answer not taken in time has its connection's
// write deadline put in the past as well: the blocked write fails and the connection is closed.
//
// A timeout takes effect between its length and its length plus two ticks (later if the
// process is starved of CPU); a tick is an eighth of the shorter of the two timeouts, between
// 10 ms and 1 s.
type deadlines struct {
	readHeader, idle time.Duration
	tick             time.Duration
	epoch            time.Time
	now              atomic.Int64 // nanoseconds since epoch as of the last tick
	// answerCut, if set, is called for each connection cut because its caller did not take an
	// answer in time.
	answerCut func()
	// The connections being served, net.Conn → *connWait: what the clock's goroutine goes
	// through. A connection from a servedListener carries its wait along (servedConn), so the
	// three times a call looks it up are a type switch; others are looked up here.
	conns sync.Map

	mu      sync.Mutex
	serving int           // Serve calls running
	stop    chan struct{} // closed to end the clock
	done    chan struct{} // closed when the clock has ended
}

// connWait is a connection's current wait.
type connWait struct {
	d *deadlines
	c net.Conn
	// until is when the wait times out, on the deadlines' clock; 0 when the connection is not
	// being waited for (a call is being handled, or the connection is poisoned already). Its
	// lowest bit is set for a wait for the caller to take an answer (waitAnswer), so that the
	// kind of a wait changes with its time, in one store.
	until atomic.Int64
}

func newDeadlines(readHeader, idle time.Duration) *deadlines {
	return &deadlines{readHeader: readHeader, idle: idle, tick: tickFor(readHeader, idle), epoch: time.Now()}
}

// tickFor is how often the clock advances for these timeouts.
func tickFor(readHeader, idle time.Duration) time.Duration {
	return min(max(min(readHeader, idle)/8, 10*time.Millisecond), time.Second)
}

// open starts waiting for c's first request, within read_header.
func (d *deadlines) open(c net.Conn) {
	w := d.carried(c)
	if w == nil {
		w = &connWait{d: d, c: c}
	}
	w.await(d.readHeader)
	d.conns.Store(c, w)
}

// of returns c's wait, nil if c is not one of the server's connections. A connection from the
// server's listener carries its wait, which stays with it once forgotten (handed over or
// closed), but then the clock no longer sees it: its wait can no longer cut it.
func (d *deadlines) of(c net.Conn) *connWait {
	if d == nil || c == nil {
		return nil
	}
	if w := d.carried(c); w != nil {
		return w
	}
	if w, ok := d.conns.Load(c); ok {
		return w.(*connWait)
	}
	return nil
}

// carried returns the wait c carries, if it came from d's listener.
func (d *deadlines) carried(c net.Conn) *connWait {
	var w *connWait
	switch c := c.(type) {
	case *servedConn:
		w = &c.w
	case *servedTLSConn:
		w = &c.w
	default:
		return nil
	}
	if w.d != d {
		return nil // another server's
	}
	return w
}

// A servedConn and a servedTLSConn are connections accepted by a servedListener, with their
// waits. They embed the connection they wrap, so every method of it is theirs: TLS state for
// fasthttp, SyscallConn and NetConn for the disconnect watch, ReadFrom for copies.
type (
	servedConn struct {
		*net.TCPConn
		w       connWait
		relayed atomic.Bool // handed over to a stream's relay (handOver)
	}
	servedTLSConn struct {
		*tls.Conn
		w       connWait
		relayed atomic.Bool
		// checkedUnder is the client CAs the connection's certificate was last verified
		// against: at first, those in force when it was accepted (servedListener.Accept).
		checkedUnder atomic.Pointer[x509.CertPool]
	}
)

// Close closes c, unless it has been handed over to a relay: then the relay closes it.
func (c *servedConn) Close() error {
	if c.relayed.Load() {
		return nil
	}
	return c.TCPConn.Close()
}

// Read reads from the TLS connection. A caller that speaks plain HTTP to it (an http:// URL
// for an https:// gateway) fails the handshake; it is told so in plain HTTP, as Go's own
// server tells it, rather than left with a connection closed on it unanswered.
func (c *servedTLSConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if err != nil {
		var re tls.RecordHeaderError
		if errors.As(err, &re) && re.Conn != nil && looksLikeHTTP(re.RecordHeader[:]) {
			re.Conn.SetWriteDeadline(time.Now().Add(time.Second))
			io.WriteString(re.Conn, plainHTTPToTLS)
		}
	}
	return n, err
}

// plainHTTPToTLS is the answer to a plain HTTP request on a TLS listener.
var plainHTTPToTLS = func() string {
	body := `{"error":{"code":"` + CodeInvalidRequest + `","message":"this gateway speaks HTTPS on this port: call it with an https:// URL, not http://"}}`
	return "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nX-Ms-Error-Code: " + CodeInvalidRequest +
		"\r\nX-Tokenproxy-Error: " + CodeInvalidRequest + "\r\nConnection: close\r\nContent-Length: " +
		strconv.Itoa(len(body)) + "\r\n\r\n" + body
}()

// looksLikeHTTP reports whether a connection's first bytes, taken for a TLS record's header,
// are the start of a plain HTTP request.
func looksLikeHTTP(hdr []byte) bool {
	for _, m := range []string{"GET ", "POST ", "PUT ", "HEAD ", "DELETE ", "OPTIONS ", "PATCH "} {
		if strings.HasPrefix(m, string(hdr)) || strings.HasPrefix(string(hdr), m) {
			return true
		}
	}
	return false
}

// Close closes c, unless it has been handed over to a relay: then the relay closes it.
func (c *servedTLSConn) Close() error {
	if c.relayed.Load() {
		return nil
	}
	return c.Conn.Close()
}

// handOver takes c from the server for a stream's relay. fasthttp closes a hijacked connection
// once the hijack handler returns, and only then takes back the connection's read buffer (with
// KeepHijackedConns it never does, and each stream would leave 32 KiB to the garbage
// collector). A connection from a servedListener ignores that close once handed over; the
// connection it wraps is returned, for the relay to write to and close, with relayed true.
// Any other connection is returned as it is, with relayed false: its relay must be done before
// the hijack handler returns.
func handOver(c net.Conn) (conn net.Conn, relayed bool) {
	switch c := c.(type) {
	case *servedConn:
		c.relayed.Store(true)
		return c.TCPConn, true
	case *servedTLSConn:
		c.relayed.Store(true)
		return c.Conn, true
	}
	return c, false
}

// servedListener gives the TCP and TLS connections it accepts a wait of d's to carry. Others
// (not made by Listen or tls.NewListener) are served as they are, their waits looked up.
type servedListener struct {
	net.Listener
	d   *deadlines
	cas func() *x509.CertPool // Server.clientCAs
}

func (l servedListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return c, err
	}
	switch t := c.(type) {
	case *net.TCPConn:
		sc := &servedConn{TCPConn: t}
		sc.w.d, sc.w.c = l.d, sc
		return sc, nil
	case *tls.Conn:
		sc := &servedTLSConn{Conn: t}
		sc.w.d, sc.w.c = l.d, sc
		if l.cas != nil {
			// The handshake comes later and takes the CAs then in force. Pools are replaced,
			// never changed, and this one is kept alive here: if it is still the one in force
			// at a call, the handshake verified against it too (see Handler.peerOf).
			sc.checkedUnder.Store(l.cas())
		}
		return sc, nil
	}
	return c, nil
}

// forget stops keeping c's timeouts: it was closed or handed over.
func (d *deadlines) forget(c net.Conn) { d.conns.Delete(c) }

// await has w time out after timeout, cutting reads. The clock's reading can be a tick old, so
// a tick is added for the wait to last at least timeout.
func (w *connWait) await(timeout time.Duration) {
	if w != nil {
		w.until.Store(w.d.until(timeout) &^ writing)
	}
}

// writing marks a wait for the caller to take an answer in connWait.until.
const writing = 1

// until is when a wait of timeout begun now ends, on d's clock.
func (d *deadlines) until(timeout time.Duration) int64 {
	return d.now.Load() + int64(timeout+d.tick)
}

// waitHeaders has w wait for a request's headers, within read_header.
func (w *connWait) waitHeaders() {
	if w != nil {
		w.await(w.d.readHeader)
	}
}

// waitIdle has w wait within idle: for the next request, or for the body of this one.
func (w *connWait) waitIdle() {
	if w != nil {
		w.await(w.d.idle)
	}
}

// waitAnswer has w wait within idle for the caller to take the answer the server is about to
// write, and for the rest of the body the call left, which the server reads and drops after it.
// Past it, the connection's reads and writes fail, and it is closed: a caller that takes
// nothing does not hold the connection, its goroutine and the answer's buffers for ever. The
// server's next wait (the next request's) replaces it once the answer is written.
func (w *connWait) waitAnswer() {
	if w != nil {
		w.until.Store(w.d.until(w.d.idle) | writing)
	}
}

// done ends w's wait: nothing is read from the connection until the next one.
func (w *connWait) done() {
	if w != nil {
		w.until.Store(0)
	}
}

// start runs the clock while a Serve call runs; the returned function is to be called when it
// returns.
func (d *deadlines) start() (stop func()) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.serving++
	if d.serving == 1 {
		d.now.Store(int64(time.Since(d.epoch))) // the clock stood still while nothing was served
		d.stop, d.done = make(chan struct{}), make(chan struct{})
		go d.run(d.stop, d.done)
	}
	return func() {
		d.mu.Lock()
		defer d.mu.Unlock()
		d.serving--
		if d.serving == 0 {
			close(d.stop)
			<-d.done
		}
	}
}

func (d *deadlines) run(stop, done chan struct{}) {
	defer close(done)
	t := time.NewTicker(d.tick)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			d.cut()
		}
	}
}

// cut advances the clock and poisons the connections whose wait is over.
func (d *deadlines) cut() {
	now := int64(time.Since(d.epoch))
	d.now.Store(now)
	d.conns.Range(func(_, v any) bool {
		w := v.(*connWait)
		u := w.until.Load()
		if u == 0 || u > now || !w.until.CompareAndSwap(u, 0) {
			return true
		}
		if u&writing == 0 {
			w.c.SetReadDeadline(aLongTimeAgo)
			return true
		}
		w.c.SetDeadline(aLongTimeAgo)
		if d.answerCut != nil {
			d.answerCut()
		}
		return true
	})
}

// aLongTimeAgo is a deadline that has passed.
var aLongTimeAgo = time.Unix(1, 0)
