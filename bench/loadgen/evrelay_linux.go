package main

import (
	"bytes"
	"context"
	"errors"
	"net/netip"
	"syscall"
	"unsafe"
)

// evrelay is relay's job on one thread with an event loop of its own (epoll, non-blocking
// sockets, no goroutine per connection), as nginx serves: the same key check, added headers,
// keep-alive pool and streams copied through. It answers one question for the suite: how much
// of the distance from a Go proxy to nginx is the goroutine-per-connection model, and how much
// is Go. It is a measuring tool, not a server: no timeouts, no limits, no TLS, unbounded
// output buffers, and requests without pipelining.
func evrelay(ctx context.Context, args []string) error {
	o, err := relayFlags("evrelay", "127.0.0.1:18012", args)
	if err != nil {
		return err
	}
	la, err := sockaddr(o.listen)
	if err != nil {
		return err
	}
	ua, err := sockaddr(o.upstream)
	if err != nil {
		return err
	}
	l := &loop{up: ua, key: o.key, add: o.add, conns: map[int]*evConn{}}
	if l.ep, err = syscall.EpollCreate1(syscall.EPOLL_CLOEXEC); err != nil {
		return err
	}
	if l.ln, err = syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0); err != nil {
		return err
	}
	syscall.SetsockoptInt(l.ln, syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1)
	if err := syscall.Bind(l.ln, la); err != nil {
		return err
	}
	if err := syscall.Listen(l.ln, 4096); err != nil {
		return err
	}
	if err := l.watch(l.ln, syscall.EPOLLIN, syscall.EPOLL_CTL_ADD); err != nil {
		return err
	}
	// Ctrl-C or the suite's kill ends the process; the loop itself polls with a timeout so it
	// notices a cancelled context.
	return l.run(ctx)
}

func sockaddr(hostport string) (*syscall.SockaddrInet4, error) {
	ap, err := netip.ParseAddrPort(hostport)
	if err != nil || !ap.Addr().Is4() {
		return nil, errors.New("want an IPv4 host:port, got " + hostport)
	}
	return &syscall.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}, nil
}

type loop struct {
	ep, ln int
	up     *syscall.SockaddrInet4
	key    []byte
	add    []byte
	conns  map[int]*evConn
	idle   []*evConn // upstream connections kept alive
	req    []byte    // the request being sent, reused
	buf    [64 << 10]byte
}

// evConn is a caller's connection or an upstream one; peer links the two while a call runs.
type evConn struct {
	fd       int
	upstream bool
	peer     *evConn
	in       []byte // bytes read and not yet used
	out      []byte // bytes to write once the socket takes them
	outOn    bool   // EPOLLOUT is being watched
	// On an upstream connection, while a response comes through: left is what remains of its
	// body (-1: until the connection closes), and headDone whether its head has been parsed.
	left     int
	headDone bool
}

func (l *loop) watch(fd int, events uint32, op int) error {
	return syscall.EpollCtl(l.ep, op, fd, &syscall.EpollEvent{Events: events, Fd: int32(fd)})
}

func (l *loop) run(ctx context.Context) error {
	events := make([]syscall.EpollEvent, 256)
	for ctx.Err() == nil {
		n, err := syscall.EpollWait(l.ep, events, 500)
		if err != nil {
			if err == syscall.EINTR {
				continue
			}
			return err
		}
		for _, ev := range events[:n] {
			fd := int(ev.Fd)
			if fd == l.ln {
				l.accept()
				continue
			}
			c := l.conns[fd]
			if c == nil {
				continue
			}
			if ev.Events&syscall.EPOLLOUT != 0 {
				if !l.flush(c) {
					continue
				}
			}
			if ev.Events&(syscall.EPOLLIN|syscall.EPOLLHUP|syscall.EPOLLERR) != 0 {
				l.readable(c)
			}
		}
	}
	return nil
}

func (l *loop) accept() {
	for {
		fd, _, err := syscall.Accept4(l.ln, syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC)
		if err != nil {
			return // EAGAIN, or a failure the next event retries
		}
		syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1)
		c := &evConn{fd: fd}
		l.conns[fd] = c
		l.watch(fd, syscall.EPOLLIN, syscall.EPOLL_CTL_ADD)
	}
}

// close closes c, and the connection it is linked with. An idle upstream connection leaves the
// pool, so that no call is sent on it.
func (l *loop) close(c *evConn) {
	if c.fd < 0 {
		return
	}
	if c.upstream && c.peer == nil {
		l.dropIdle(c)
	}
	delete(l.conns, c.fd)
	syscall.Close(c.fd) // also removes it from the epoll set
	c.fd = -1
	if p := c.peer; p != nil {
		c.peer, p.peer = nil, nil
		l.close(p)
	}
}

// send writes b to c, keeping what the socket does not take for EPOLLOUT. It reports false if
// c was closed.
func (l *loop) send(c *evConn, b []byte) bool {
	if len(c.out) == 0 {
		n, err := rawWrite(c.fd, b)
		if err != nil && err != syscall.EAGAIN {
			l.close(c)
			return false
		}
		if n < 0 {
			n = 0
		}
		b = b[n:]
		if len(b) == 0 {
			return true
		}
	}
	c.out = append(c.out, b...)
	if !c.outOn {
		c.outOn = true
		l.watch(c.fd, syscall.EPOLLIN|syscall.EPOLLOUT, syscall.EPOLL_CTL_MOD)
	}
	return true
}

// flush writes what c has pending; it reports false if c was closed.
func (l *loop) flush(c *evConn) bool {
	for len(c.out) > 0 {
		n, err := rawWrite(c.fd, c.out)
		if err == syscall.EAGAIN {
			return true
		}
		if err != nil {
			l.close(c)
			return false
		}
		c.out = c.out[n:]
	}
	c.out = nil
	if c.outOn {
		c.outOn = false
		l.watch(c.fd, syscall.EPOLLIN, syscall.EPOLL_CTL_MOD)
	}
	return true
}

// readable reads what c has and acts on it.
func (l *loop) readable(c *evConn) {
	n, err := rawRead(c.fd, l.buf[:])
	if err == syscall.EAGAIN {
		return
	}
	if n <= 0 || err != nil {
		l.close(c)
		return
	}
	data := l.buf[:n]
	if c.upstream {
		l.fromUpstream(c, data)
		return
	}
	if c.peer != nil { // a caller sending while its call runs: not expected here
		return
	}
	c.in = append(c.in, data...)
	l.request(c)
}

// request forwards the caller's request once it is whole.
func (l *loop) request(c *evConn) {
	end := bytes.Index(c.in, crlfcrlf)
	if end < 0 {
		return
	}
	head := c.in[:end+2] // up to the last header line's CRLF
	cl, keyOK := 0, false
	out := l.req[:0] // send copies what the socket does not take at once
	for i := 0; i < len(head); {
		j := bytes.IndexByte(head[i:], '\n') + i + 1
		line := head[i:j]
		i = j
		if v, ok := headerValue(line, contentLength); ok {
			var err error
			if cl, err = parseLength(v); err != nil {
				l.close(c)
				return
			}
		} else if v, ok := headerValue(line, apiKey); ok {
			keyOK = bytes.Equal(v, l.key)
			continue
		}
		out = append(out, line...)
	}
	if len(c.in) < end+4+cl {
		return // the body is still coming
	}
	if !keyOK {
		l.send(c, unauthorized)
		l.close(c)
		return
	}
	out = append(append(append(out, l.add...), "\r\n"...), c.in[end+4:end+4+cl]...)
	l.req = out
	c.in = c.in[:0]
	u := l.upstreamConn()
	if u == nil {
		l.close(c)
		return
	}
	u.peer, c.peer = c, u
	u.headDone, u.left, u.in = false, 0, u.in[:0]
	l.send(u, out)
}

// upstreamConn returns an idle upstream connection or a new one (its connect may still be
// under way: what is sent to it waits for EPOLLOUT).
func (l *loop) upstreamConn() *evConn {
	if n := len(l.idle); n > 0 {
		u := l.idle[n-1]
		l.idle = l.idle[:n-1]
		return u
	}
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil
	}
	syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1)
	if err := syscall.Connect(fd, l.up); err != nil && err != syscall.EINPROGRESS {
		syscall.Close(fd)
		return nil
	}
	// Until the connect completes, a write finds EAGAIN and what it had waits for EPOLLOUT.
	u := &evConn{fd: fd, upstream: true, outOn: true}
	l.conns[fd] = u
	l.watch(fd, syscall.EPOLLIN|syscall.EPOLLOUT, syscall.EPOLL_CTL_ADD)
	return u
}

// fromUpstream passes an answer's bytes to the caller: a response with a Content-Length
// returns both connections to their keep-alive once whole; any other is a stream, copied
// until one side closes.
func (l *loop) fromUpstream(u *evConn, data []byte) {
	c := u.peer
	if c == nil { // an idle connection sent something unasked
		l.close(u)
		return
	}
	if !u.headDone {
		u.in = append(u.in, data...)
		end := bytes.Index(u.in, crlfcrlf)
		if end < 0 {
			return
		}
		u.headDone, u.left = true, -1
		head := u.in[:end+2]
		for i := 0; i < len(head); {
			j := bytes.IndexByte(head[i:], '\n') + i + 1
			line := head[i:j]
			i = j
			if v, ok := headerValue(line, contentLength); ok {
				if n, err := parseLength(v); err == nil {
					u.left = n
				}
			}
		}
		data = u.in
		if u.left >= 0 {
			u.left += end + 4 // count the head too
		}
	}
	if !l.send(c, data) {
		return
	}
	if u.left < 0 {
		return // a stream: on until one side closes
	}
	if u.left -= len(data); u.left <= 0 {
		u.peer, c.peer = nil, nil
		u.in = u.in[:0]
		l.idle = append(l.idle, u)
	}
}

func (l *loop) dropIdle(u *evConn) {
	for i, v := range l.idle {
		if v == u {
			l.idle = append(l.idle[:i], l.idle[i+1:]...)
			return
		}
	}
}

var crlfcrlf = []byte("\r\n\r\n")

// rawRead and rawWrite are read(2) and write(2) without Go's hand-off to the scheduler around
// a system call that may block: on a non-blocking socket neither blocks, and the loop has the
// thread to itself.
func rawRead(fd int, p []byte) (int, error) {
	n, _, e := syscall.RawSyscall(syscall.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
	if e != 0 {
		return -1, e
	}
	return int(n), nil
}

func rawWrite(fd int, p []byte) (int, error) {
	n, _, e := syscall.RawSyscall(syscall.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
	if e != 0 {
		return -1, e
	}
	return int(n), nil
}
