//go:build !linux

package main

import (
	"context"
	"errors"
)

// evrelay runs on Linux only: its event loop is epoll's.
func evrelay(context.Context, []string) error { return errors.New("evrelay needs Linux (epoll)") }
