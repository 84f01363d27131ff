package proxy

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package if any goroutine outlives its test: every call, stream, token wait
// and upstream connection the tests start must end, cancelled callers' included. Two fasthttp
// internals are exempt: the worker pool's cleaner, which sleeps up to MaxIdleWorkerDuration
// before it notices Stop, and the process-wide Date header updater; and so is the watch for
// callers going away, which ends at its first check (within a second) that finds no call.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		goleak.IgnoreAnyFunction("github.com/valyala/fasthttp.(*workerPool).Start.func2"),
		goleak.IgnoreAnyFunction("github.com/valyala/fasthttp.updateServerDate.func1"),
		goleak.IgnoreAnyFunction("github.com/tokenproxy/tokenproxy/internal/proxy.(*watchList).loop"),
	)
}
