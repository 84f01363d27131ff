//go:build race

package proxy

// raceEnabled says whether the tests run under the race detector.
const raceEnabled = true
