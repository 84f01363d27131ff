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
	api    callerSetter
	certs  []*certs.Source // listener certificates, reloaded when their files change

	// reloading makes reloads one at a time, SIGHUP's and the file watches' alike: otherwise a
	// reload that read the files before an edit could finish after one that read them after it,
	// and put the older callers (a key since removed) back in force.
	reloading sync.Mutex

	mu      sync.Mutex
	current *config.Config
	stopW   context.CancelFunc // ends the file watch of the current configuration
	hup     chan os.Signal     // SIGHUP, caught until stop

	reloads *prometheus.CounterVec
	last    prometheus.Gauge
}

// callerSetter puts callers in force: the API's handler (*proxy.Handler).
type callerSetter interface {
	SetCallers(*config.Config) error
}

func (r *reloader) start(ctx context.Context, reg prometheus.Registerer) error {
	r.register(reg)
	r.hup = make(chan os.Signal, 1)
	signal.Notify(r.hup, syscall.SIGHUP)
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-r.hup:
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

// register makes the reload metrics, in reg.
func (r *reloader) register(reg prometheus.Registerer) {
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
}

// stop lets SIGHUP go back to its default action, which ends the process. It is called once
// the gateway has stopped, not when reloads stop (as shutdown begins): a SIGHUP during
// shutdown_delay or shutdown_grace would otherwise end the process and cut the calls in flight.
// A SIGHUP meanwhile is caught and ignored.
func (r *reloader) stop() {
	if r.hup != nil {
		signal.Stop(r.hup)
	}
}

// reloadCerts reads the listeners' certificates and client CAs again; a broken file is refused
// and the certificates in use stay.
func (r *reloader) reloadCerts(why string) {
	r.reloading.Lock()
	defer r.reloading.Unlock()
	for _, c := range r.certs {
		if err := c.Reload(); err != nil {
			r.reloads.WithLabelValues("error").Inc()
			r.log.Error("certificate reload refused; the current certificate stays", zap.String("trigger", why), zap.Error(err))
			continue
		}
		r.log.Info("certificates reloaded", zap.String("trigger", why), zap.Strings("files", c.Files()))
	}
}

// watch (re)starts the file watch for the current configuration's files. The watch in force
// stays if the new one cannot be set up.
func (r *reloader) watch(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	files := []string{r.path}
	for _, c := range r.current.Callers {
		files = append(files, c.KeyFiles...)
	}
	wctx, cancel := context.WithCancel(ctx)
	if err := watch.Files(wctx, files, 250*time.Millisecond, func() { r.reload(ctx, "file change") }); err != nil {
		cancel()
		return err
	}
	if r.stopW != nil {
		r.stopW()
	}
	r.stopW = cancel
	return nil
}

func (r *reloader) reload(ctx context.Context, why string) {
	r.reloading.Lock()
	defer r.reloading.Unlock()
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
	if cfg.AllowUnauthenticated && !old.AllowUnauthenticated {
		r.log.Warn("allow_unauthenticated is on: callers without a key are let in and may use every deployment")
	}
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
