package proxy

import (
	"errors"
	"hash/maphash"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenproxy/tokenproxy/internal/backend"
	"github.com/tokenproxy/tokenproxy/internal/transport"
)

// maxPassthroughLabels bounds the deployment label values when deployments pass through
// unconfigured: names then come from callers, and must not grow the series without limit.
const maxPassthroughLabels = 100

// latencyBuckets span a cached embedding (milliseconds) to a long reasoning stream (minutes).
var latencyBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600}

type metrics struct {
	requests        *prometheus.CounterVec
	duration        *prometheus.HistogramVec
	upstreamLatency *prometheus.HistogramVec
	inflight        prometheus.Gauge
	attempts        *prometheus.CounterVec
	failovers       *prometheus.CounterVec
	budgetExhausted prometheus.Counter
	shutdownCut     prometheus.Counter
	streamIdleCuts  *prometheus.CounterVec
	answerCuts      prometheus.Counter
	backends        *backendCollector
	pools           *poolCollector // nil unless the transport is the gateway's own

	// Deployment label values: the configured names, or in pass-through mode the first
	// maxPassthroughLabels names seen.
	passthrough bool
	configured  map[string]bool
	mu          sync.RWMutex
	seen        map[string]bool

	// The series each call counts in, remembered by their labels (seriesCache).
	requestsBy *seriesCache[prometheus.Counter]
	durationBy *seriesCache[prometheus.Observer]
	latencyBy  *seriesCache[prometheus.Observer]
	attemptsBy *seriesCache[prometheus.Counter]
}

// seriesCache remembers series of a metric vector by their label values (up to three), so
// counting a call costs a maphash of its labels and a comparison, not client_golang's lookup
// (FNV over every byte of the labels, then a map under a read lock: ≈ 60 ns a series, four
// series a call). A series is kept in one of two slots (slotPairs), replaced on a miss, so the
// cache never holds more than its slots, and a series it holds is the vector's own: vectors
// here never delete series, so it stays the one WithLabelValues would return.
type seriesCache[M any] struct {
	vec   interface{ WithLabelValues(...string) M }
	n     int // labels used
	seed  maphash.Seed
	slots slotPairs[cachedSeries[M]]
}

type cachedSeries[M any] struct {
	labels [3]string
	m      M
}

func newSeriesCache[M any](vec interface{ WithLabelValues(...string) M }, labels int) *seriesCache[M] {
	return &seriesCache[M]{vec: vec, n: labels, seed: maphash.MakeSeed(), slots: newSlotPairs[cachedSeries[M]](64)}
}

// labelsHash hashes the label values of a series.
func labelsHash(seed maphash.Seed, labels []string) uint64 {
	var h uint64
	for _, l := range labels {
		h = h*0x9e3779b97f4a7c15 + maphash.String(seed, l)
	}
	return h
}

// get returns the series of labels (the unused ones empty).
func (c *seriesCache[M]) get(labels [3]string) M {
	h := labelsHash(c.seed, labels[:c.n])
	a, b := c.slots.pair(h)
	if e := a.Load(); e != nil && e.labels == labels {
		return e.m
	}
	if e := b.Load(); e != nil && e.labels == labels {
		return e.m
	}
	e := &cachedSeries[M]{labels: labels}
	e.m = c.vec.WithLabelValues(e.labels[:c.n]...)
	c.slots.put(h, e)
	return e.m
}

func (m *metrics) requestsFor(caller, deployment, code string) prometheus.Counter {
	return m.requestsBy.get([3]string{caller, deployment, code})
}

func (m *metrics) durationFor(deployment string) prometheus.Observer {
	return m.durationBy.get([3]string{deployment})
}

func (m *metrics) latencyFor(upstream string) prometheus.Observer {
	return m.latencyBy.get([3]string{upstream})
}

func (m *metrics) attemptsFor(backend, result string) prometheus.Counter {
	return m.attemptsBy.get([3]string{backend, result})
}

func newMetrics(passthrough bool, configured map[string]bool, reg *backend.Registry) *metrics {
	m := &metrics{
		attempts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "tokenproxy",
			Name:      "backend_attempts_total",
			Help:      "Attempts sent to each backend (upstream/deployment), by the upstream's status or the failure (connect_error, timeout, token_unavailable).",
		}, []string{"backend", "result"}),
		failovers: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "tokenproxy",
			Name:      "backend_failovers_total",
			Help:      "Calls moved from a backend to another, by the reason: the backend's status (429, 408, 500, 502, 503, 504), connect_error or token_unavailable.",
		}, []string{"backend", "reason"}),
		budgetExhausted: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "tokenproxy",
			Name:      "retry_budget_exhausted_total",
			Help:      "Failovers not made because the retry budget was spent; the caller got the last answer.",
		}),
		shutdownCut: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "tokenproxy",
			Name:      "shutdown_cut_connections_total",
			Help:      "Connections (calls or streams still running) closed because shutdown_grace ran out.",
		}),
		streamIdleCuts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "tokenproxy",
			Name:      "stream_idle_cuts_total",
			Help:      "Streamed answers cut because nothing of them moved for timeouts.stream_idle, by upstream and by the side that stalled: upstream (sent nothing) or caller (took nothing).",
		}, []string{"upstream", "side"}),
		answerCuts: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "tokenproxy",
			Name:      "answer_timeouts_total",
			Help:      "Caller connections closed because the caller did not take an answer the server writes (read whole, an error, or the end of a large body) within timeouts.idle of the call's end.",
		}),
		backends: &backendCollector{reg: reg,
			state: prometheus.NewDesc("tokenproxy_backend_state",
				"1 for the backend's current state (healthy, cooldown, open, half_open), else 0.", []string{"backend", "state"}, nil),
			cooldown: prometheus.NewDesc("tokenproxy_backend_cooldown_seconds_total",
				"Time the backend has spent resting from rate limits (429 Retry-After).", []string{"backend"}, nil),
		},
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "tokenproxy",
			Name:      "requests_total",
			Help:      "API requests by caller, exposed deployment and HTTP status (499: the caller went away).",
		}, []string{"caller", "deployment", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "tokenproxy",
			Name:      "request_duration_seconds",
			Help:      "Time from request to the end of the response (streams included), by exposed deployment.",
			Buckets:   latencyBuckets,
		}, []string{"deployment"}),
		upstreamLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "tokenproxy",
			Name:      "upstream_response_seconds",
			Help:      "Time from forwarding a request to the upstream's response headers, by upstream.",
			Buckets:   latencyBuckets,
		}, []string{"upstream"}),
		inflight: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "tokenproxy",
			Name:      "inflight_requests",
			Help:      "API requests being served, streams included.",
		}),
		passthrough: passthrough,
		configured:  configured,
		seen:        map[string]bool{},
	}
	m.requestsBy = newSeriesCache(m.requests, 3)
	m.durationBy = newSeriesCache(m.duration, 1)
	m.latencyBy = newSeriesCache(m.upstreamLatency, 1)
	m.attemptsBy = newSeriesCache(m.attempts, 2)
	return m
}

func (m *metrics) register(reg prometheus.Registerer) error {
	err := errors.Join(reg.Register(m.requests), reg.Register(m.duration), reg.Register(m.upstreamLatency),
		reg.Register(m.inflight), reg.Register(m.attempts), reg.Register(m.failovers), reg.Register(m.budgetExhausted),
		reg.Register(m.shutdownCut), reg.Register(m.streamIdleCuts), reg.Register(m.answerCuts), reg.Register(m.backends))
	if m.pools != nil {
		err = errors.Join(err, reg.Register(m.pools))
	}
	return err
}

// poolCollector reports the upstream connections at scrape time, by origin (an origin reached
// with two CA sets has two pools, added together here).
type poolCollector struct {
	stats                      func() []transport.PoolStats
	opened, idle, spareFailure *prometheus.Desc
	http2                      *prometheus.Desc
}

func newPoolCollector(stats func() []transport.PoolStats) *poolCollector {
	return &poolCollector{stats: stats,
		opened: prometheus.NewDesc("tokenproxy_upstream_connections_opened_total",
			"Connections opened to an upstream origin, by TLS handshake: full, resumed (a resumed TLS session), or none (plain http).",
			[]string{"origin", "tls"}, nil),
		idle: prometheus.NewDesc("tokenproxy_upstream_idle_connections",
			"Idle keep-alive connections kept to an upstream origin.", []string{"origin"}, nil),
		spareFailure: prometheus.NewDesc("tokenproxy_upstream_spare_dial_failures_total",
			"Spare connections (spare_connections) that could not be dialled to an upstream origin; the next call then dials for itself.",
			[]string{"origin"}, nil),
		http2: prometheus.NewDesc("tokenproxy_upstream_http2_connections",
			"HTTP/2 connections open to an upstream origin (upstreams.NAME.http2), each carrying many calls.",
			[]string{"origin"}, nil),
	}
}

func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.opened
	ch <- c.idle
	ch <- c.spareFailure
	ch <- c.http2
}

func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	type sums struct {
		tls                                 bool
		opened, resumed, idle, spareFailure float64
		http2                               float64
	}
	by := map[string]*sums{}
	for _, p := range c.stats() {
		s := by[p.Origin]
		if s == nil {
			s = &sums{tls: p.TLS}
			by[p.Origin] = s
		}
		s.opened += float64(p.Opened)
		s.resumed += float64(p.Resumed)
		s.idle += float64(p.Idle)
		s.spareFailure += float64(p.SpareFailures)
		s.http2 += float64(p.HTTP2)
	}
	for origin, s := range by {
		if s.tls {
			ch <- prometheus.MustNewConstMetric(c.opened, prometheus.CounterValue, s.opened, origin, "full")
			ch <- prometheus.MustNewConstMetric(c.opened, prometheus.CounterValue, s.resumed, origin, "resumed")
		} else {
			ch <- prometheus.MustNewConstMetric(c.opened, prometheus.CounterValue, s.opened, origin, "none")
		}
		ch <- prometheus.MustNewConstMetric(c.idle, prometheus.GaugeValue, s.idle, origin)
		ch <- prometheus.MustNewConstMetric(c.spareFailure, prometheus.CounterValue, s.spareFailure, origin)
		ch <- prometheus.MustNewConstMetric(c.http2, prometheus.GaugeValue, s.http2, origin)
	}
}

// backendCollector reports backend health at scrape time.
type backendCollector struct {
	reg             *backend.Registry
	state, cooldown *prometheus.Desc
}

func (b *backendCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- b.state
	ch <- b.cooldown
}

func (b *backendCollector) Collect(ch chan<- prometheus.Metric) {
	for _, be := range b.reg.All() {
		cur := be.State()
		for _, s := range []backend.State{backend.Healthy, backend.Cooldown, backend.Open, backend.HalfOpen} {
			v := 0.0
			if s == cur {
				v = 1
			}
			ch <- prometheus.MustNewConstMetric(b.state, prometheus.GaugeValue, v, be.Key, s.String())
		}
		ch <- prometheus.MustNewConstMetric(b.cooldown, prometheus.CounterValue, be.CooldownSeconds(), be.Key)
	}
}

// deploymentLabel bounds the label's values: a name a caller made up is counted under "".
// Passed through, a name becomes a value of its own (up to maxPassthroughLabels, then
// "_other") only once a call to it has been answered by the upstream without error (known):
// names refused by the gateway or unknown upstream would otherwise use up the values for good.
func (m *metrics) deploymentLabel(d string, known bool) string {
	if !m.passthrough {
		if m.configured[d] {
			return d
		}
		return ""
	}
	m.mu.RLock()
	ok := m.seen[d]
	m.mu.RUnlock()
	if ok || d == "" {
		return d
	}
	if !known {
		return ""
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.seen[d] {
		return d
	}
	if len(m.seen) >= maxPassthroughLabels {
		return "_other"
	}
	m.seen[d] = true
	return d
}

// statusLabels holds the label text of every status code, so counting does not format one.
var statusLabels = func() (s [600]string) {
	for i := range s {
		s[i] = strconv.Itoa(i)
	}
	return s
}()

func statusLabel(status int) string {
	if status >= 0 && status < len(statusLabels) {
		return statusLabels[status]
	}
	return strconv.Itoa(status)
}

func (h *Handler) observe(c *call, status int, end time.Time) {
	code := statusLabel(status)
	dep := h.m.deploymentLabel(c.deployment, !c.headerAt.IsZero() && status < 400)
	h.m.requestsFor(c.caller, dep, code).Inc()
	h.m.durationFor(dep).Observe(end.Sub(c.start).Seconds())
	if c.upstream != "" && !c.headerAt.IsZero() && !c.proxyStart.IsZero() {
		h.m.latencyFor(c.upstream).Observe(c.headerAt.Sub(c.proxyStart).Seconds())
	}
	if c.aborted {
		switch {
		case errors.As(c.err, new(transport.StreamIdleError)):
			h.m.streamIdleCuts.WithLabelValues(c.upstream, "upstream").Inc()
		case c.err == errCallerStalled:
			h.m.streamIdleCuts.WithLabelValues(c.upstream, "caller").Inc()
		}
	}
}
