package broker

import (
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the broker's Prometheus metrics. Counters and the histogram record events as they
// happen; the state gauges (expiry, last error, readiness) are computed from the sources at
// scrape time, so they are never stale and need no bookkeeping.
type metrics struct {
	b         *Broker
	requests  *prometheus.CounterVec
	durations *prometheus.HistogramVec
	expiry    *prometheus.Desc
	lastError *prometheus.Desc
	ready     *prometheus.Desc
}

type sourceMetrics struct {
	successes, errors prometheus.Counter
	duration          prometheus.Observer
}

func newMetrics(b *Broker) *metrics {
	return &metrics{
		b: b,
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "tokenproxy",
			Name:      "token_requests_total",
			Help:      "Token acquisitions from the identity provider, by credential and result (success, error).",
		}, []string{"credential", "result"}),
		durations: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "tokenproxy",
			Name:      "token_request_duration_seconds",
			Help:      "Time taken by token acquisitions from the identity provider.",
			Buckets:   []float64{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30},
		}, []string{"credential"}),
		expiry: prometheus.NewDesc("tokenproxy_token_expiry_timestamp_seconds",
			"When the token currently held expires (unix seconds).", []string{"credential", "scope"}, nil),
		lastError: prometheus.NewDesc("tokenproxy_token_last_error_timestamp_seconds",
			"When the last failed acquisition happened (unix seconds); absent while the source is healthy.", []string{"credential", "scope"}, nil),
		ready: prometheus.NewDesc("tokenproxy_token_ready",
			"1 when the source holds a valid token, else 0.", []string{"credential", "scope"}, nil),
	}
}

func (m *metrics) register(reg prometheus.Registerer) error {
	return errors.Join(reg.Register(m.requests), reg.Register(m.durations), reg.Register(m))
}

func (m *metrics) forSource(credential string) sourceMetrics {
	return sourceMetrics{
		successes: m.requests.WithLabelValues(credential, "success"),
		errors:    m.requests.WithLabelValues(credential, "error"),
		duration:  m.durations.WithLabelValues(credential),
	}
}

// Describe implements prometheus.Collector for the state gauges.
func (m *metrics) Describe(ch chan<- *prometheus.Desc) {
	ch <- m.expiry
	ch <- m.lastError
	ch <- m.ready
}

// Collect implements prometheus.Collector for the state gauges.
func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	for _, st := range m.b.Status() {
		ready := 0.0
		if st.Ready {
			ready = 1
		}
		ch <- prometheus.MustNewConstMetric(m.ready, prometheus.GaugeValue, ready, st.Credential, st.Scope)
		if !st.ExpiresOn.IsZero() {
			ch <- prometheus.MustNewConstMetric(m.expiry, prometheus.GaugeValue, unix(st.ExpiresOn), st.Credential, st.Scope)
		}
		if !st.ErrorAt.IsZero() {
			ch <- prometheus.MustNewConstMetric(m.lastError, prometheus.GaugeValue, unix(st.ErrorAt), st.Credential, st.Scope)
		}
	}
}

func unix(t time.Time) float64 { return float64(t.UnixNano()) / 1e9 }
