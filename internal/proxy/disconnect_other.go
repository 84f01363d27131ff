//go:build !linux

package proxy

import "net"

// watched is a no-op off Linux: a caller that goes away is noticed when the response is written
// (which ends a stream at its next event).
type watched struct{}

func (*watched) start(net.Conn, *callCtx) {}
func (*watched) stop()                    {}
