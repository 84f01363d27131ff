package main

import (
	"context"
	"os"
	"os/signal"
	"reflect"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/tokenproxy/tokenproxy/internal/certs"
	"github.com/tokenproxy/tokenproxy/internal/config"
	"github.com/tokenproxy/tokenproxy/internal/proxy"
	"github.com/tokenproxy/tokenproxy/internal/watch"
)

// reloader re-reads the configuration on SIGHUP and when the file or a caller's key file
// changes, and puts the new callers in force without touching connections or calls in flight.
// A configuration with problems is refused, with a log line saying why, and the current one
// stays. Changes beyond callers (upstreams, credentials, listeners) need a restart.
type reloader struct {
	path   string
	getenv func(string) string
	log    *zap.Logger
	api    *proxy.Handler
	certs  []*certs.Source // listener certificates, reloaded when their files change

	mu      sync.Mutex
	current *config.Config
	stopW   context.CancelFunc // ends the file watch of the current configuration

	reloads *prometheus.CounterVec
	last    prometheus.Gauge
}

func (r *reloader) start(ctx context.Context, reg prometheus.Registerer) error {
	r.reloads = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "tokenproxy", Name: "config_reloads_total",
		Help: "Configuration reloads (SIGHUP or a file change), by result (success, error).",
	}, []string{"result"})
	r.last = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "tokenproxy", Name: "config_last_reload_success_timestamp_seconds",
		Help: "When the configuration was last loaded successfully (unix seconds).",
	})
	reg.MustRegister(r.reloads, r.last)
	r.last.SetToCurrentTime()

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	go func() {
		defer signal.Stop(hup)
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
				r.reload(ctx, "SIGHUP")
				r.reloadCerts("SIGHUP")
			}
		}
	}()
	for _, c := range r.certs {
		if err := watch.Files(ctx, c.Files(), 250*time.Millisecond, func() { r.reloadCerts("file change") }); err != nil {
			return err
		}
	}
	return r.watch(ctx)
}

// reloadCerts reads the listeners' certificates and client CAs again; a broken file is refused
// and the certificates in use stay.
func (r *reloader) reloadCerts(why string) {
	for _, c := range r.certs {
		if err := c.Reload(); err != nil {
			r.reloads.WithLabelValues("error").Inc()
			r.log.Error("certificate reload refused; the current certificate stays", zap.String("trigger", why), zap.Error(err))
			continue
		}
		r.log.Info("certificates reloaded", zap.String("trigger", why), zap.Strings("files", c.Files()))
	}
}

// watch (re)starts the file watch for the current configuration's files.
func (r *reloader) watch(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.stopW != nil {
		r.stopW()
	}
	wctx, cancel := context.WithCancel(ctx)
	r.stopW = cancel
	files := []string{r.path}
	for _, c := range r.current.Callers {
		files = append(files, c.KeyFiles...)
	}
	return watch.Files(wctx, files, 250*time.Millisecond, func() { r.reload(ctx, "file change") })
}

func (r *reloader) reload(ctx context.Context, why string) {
	cfg, err := config.Load(r.path, r.getenv)
	if err != nil {
		r.reloads.WithLabelValues("error").Inc()
		r.log.Error("configuration reload refused; the current configuration stays", zap.String("trigger", why), zap.Error(err))
		return
	}
	if err := r.api.SetCallers(cfg); err != nil {
		r.reloads.WithLabelValues("error").Inc()
		r.log.Error("configuration reload refused; the current configuration stays", zap.String("trigger", why), zap.Error(err))
		return
	}
	r.mu.Lock()
	old := r.current
	r.current = cfg
	r.mu.Unlock()
	r.reloads.WithLabelValues("success").Inc()
	r.last.SetToCurrentTime()
	r.log.Info("callers reloaded", zap.String("trigger", why), zap.Int("callers", len(cfg.Callers)))
	if !sameOutsideCallers(old, cfg) {
		r.log.Warn("the configuration changed beyond callers; those changes take effect at the next restart")
	}
	if err := r.watch(ctx); err != nil {
		r.log.Error("watching the configuration's files", zap.Error(err))
	}
}

// sameOutsideCallers reports whether a and b differ only in what a reload applies.
func sameOutsideCallers(a, b *config.Config) bool {
	x, y := *a, *b
	x.Callers, y.Callers = nil, nil
	x.AllowUnauthenticated, y.AllowUnauthenticated = false, false
	x.MaxConcurrent, y.MaxConcurrent = 0, 0
	return reflect.DeepEqual(x, y)
}
