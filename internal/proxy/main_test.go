package proxy

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package if any goroutine outlives its test: every call, stream, token wait
// and upstream connection the tests start must end, cancelled callers' included. Two fasthttp
// internals are exempt: the worker pool's cleaner, which sleeps up to MaxIdleWorkerDuration
// before it notices Stop, and the process-wide Date header updater.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		goleak.IgnoreAnyFunction("github.com/valyala/fasthttp.(*workerPool).Start.func2"),
		goleak.IgnoreAnyFunction("github.com/valyala/fasthttp.updateServerDate.func1"),
	)
}
