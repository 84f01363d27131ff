package proxy

import (
	"context"
	"net"
	"time"
)

// TCP keep-alive on callers' connections: a caller that vanished without closing is found
// after keepAliveIdle of silence and keepAliveCount unanswered probes keepAliveInterval apart
// (Go's defaults).
const (
	keepAliveIdle     = 15 * time.Second
	keepAliveInterval = 15 * time.Second
	keepAliveCount    = 9
)

// Listen opens a TCP listener for the API (or admin) server. Its connections have TCP
// keep-alive on; where the system lets accepted connections inherit it from the listening
// socket (Linux), it is set there once rather than with four system calls per connection.
func Listen(addr string) (net.Listener, error) {
	return listenConfig().Listen(context.Background(), "tcp", addr)
}
