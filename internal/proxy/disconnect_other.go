//go:build !linux

package proxy

import (
	"context"
	"net"
)

// watchDisconnect is a no-op off Linux: a caller that goes away is noticed when the response is
// written (which ends a stream at its next event).
func watchDisconnect(net.Conn, context.CancelFunc) (stop func()) { return func() {} }
