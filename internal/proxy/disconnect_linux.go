package proxy

import (
	"context"
	"crypto/tls"
	"net"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// disconnectFirstCheck and disconnectInterval pace the checks for a caller that went away while
// its call waits on the upstream (a slow reasoning model can take minutes to answer). A fast
// call never reaches the first check, so it costs only a timer.
const (
	disconnectFirstCheck = time.Second
	disconnectInterval   = time.Second
)

// watchDisconnect cancels a call when its caller closes the connection. The server does not
// read from a connection while its handler runs, so nothing else would notice until a response
// byte is written; this polls the socket for a hang-up (POLLRDHUP: the peer closed its side)
// without reading from it, so a pipelined request is left alone. stop ends the watch.
func watchDisconnect(conn net.Conn, cancel context.CancelFunc) (stop func()) {
	raw := rawConn(conn)
	if raw == nil {
		return func() {}
	}
	var t *time.Timer
	var stopped atomic.Bool
	t = time.AfterFunc(disconnectFirstCheck, func() {
		if stopped.Load() {
			return
		}
		gone := false
		raw.Control(func(fd uintptr) {
			fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLRDHUP}}
			if n, err := unix.Poll(fds, 0); err == nil && n > 0 && fds[0].Revents&(unix.POLLRDHUP|unix.POLLHUP|unix.POLLERR) != 0 {
				gone = true
			}
		})
		if gone {
			cancel()
			return
		}
		if !stopped.Load() {
			t.Reset(disconnectInterval)
		}
	})
	return func() {
		stopped.Store(true)
		t.Stop()
	}
}

func rawConn(c net.Conn) syscall.RawConn {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return raw
}
