package proxy

import (
	"net"
	"testing"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (server, client net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if server, err = ln.Accept(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { server.Close(); client.Close() })
	return server, client
}

func TestWatchCancelsOnlyCallsWhoseCallerLeft(t *testing.T) {
	var l watchList
	l.running = true // checked by hand below, not by a goroutine
	type watchedCall struct {
		w   watched
		ctx callCtx
	}
	watch := func(conn net.Conn) *watchedCall {
		c := &watchedCall{}
		c.w.conn, c.w.ctx = conn, &c.ctx
		l.add(&c.w)
		return c
	}
	cancelled := func(c *watchedCall) bool { return c.ctx.Err() != nil }
	stays, _ := tcpPair(t)
	leaves, leavesPeer := tcpPair(t)
	ended, endedPeer := tcpPair(t)
	young, youngPeer := tcpPair(t)
	a, b, c := watch(stays), watch(leaves), watch(ended)
	leavesPeer.Close()
	endedPeer.Close()
	l.remove(&c.w) // the call ended before any check

	l.check() // nothing has waited a whole interval yet
	if cancelled(b) {
		t.Fatal("a call was checked before it had waited a whole interval")
	}
	d := watch(young)
	youngPeer.Close()
	l.check()
	if cancelled(a) || !cancelled(b) || cancelled(c) || cancelled(d) {
		t.Fatalf("after the first due check, cancelled: stays %v, leaves %v, ended %v, young %v; want only leaves",
			cancelled(a), cancelled(b), cancelled(c), cancelled(d))
	}
	l.check()
	if cancelled(a) || !cancelled(d) {
		t.Fatalf("a later check: stays cancelled %v, young %v; want only young", cancelled(a), cancelled(d))
	}
	for _, w := range []*watchedCall{a, b, c, d} {
		l.remove(&w.w)
	}
	if l.check() || l.running {
		t.Fatal("the watch goes on with nothing to watch")
	}
}
