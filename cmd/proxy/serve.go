package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sync/errgroup"

	"github.com/tokenproxy/tokenproxy/internal/admin"
	"github.com/tokenproxy/tokenproxy/internal/broker"
	"github.com/tokenproxy/tokenproxy/internal/broker/entra"
	"github.com/tokenproxy/tokenproxy/internal/certs"
	"github.com/tokenproxy/tokenproxy/internal/config"
	"github.com/tokenproxy/tokenproxy/internal/logsink"
	"github.com/tokenproxy/tokenproxy/internal/proxy"
)

func runServe(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	return runServeWith(ctx, args, getenv, stdout, stderr, entra.Options{})
}

// runServeWith is runServe with the given way to reach Entra (tests trust an emulator's CA).
func runServeWith(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer, eo entra.Options) error {
	fs := newFlagSet("serve", "--config FILE", "Run the gateway.", stderr)
	path := configFlag(fs, getenv)
	if err := parseFlags(fs, args, stdout); err != nil {
		return err
	}
	cfg, err := loadConfig(*path, getenv, stderr)
	if err != nil {
		return err
	}
	log, logOut, access, err := newLogger(cfg.LogLevel, cfg.LogFormat, stderr)
	if err != nil {
		return err
	}
	defer logOut.Stop()
	if limit := memoryLimit(getenv, config.ContainerMemoryLimit("/")); limit > 0 {
		debug.SetMemoryLimit(limit)
		log.Info("the garbage collector keeps memory under 90% of the container's limit (set GOMEMLIMIT to choose)",
			zap.Int64("memory_limit_bytes", limit))
	}
	return serveGateway(ctx, gatewayOptions{cfg: cfg, log: log, logOut: logOut, access: access, stdout: stdout, entra: eo, configPath: *path, getenv: getenv})
}

// memoryLimit is the soft memory limit for the garbage collector: 90% of the container's memory
// limit (0 for none), so that a gateway holding many streams collects harder as it nears the
// limit instead of being killed at it; 0 (leave the runtime's) when there is no limit or
// GOMEMLIMIT is set, which the runtime applies itself.
func memoryLimit(getenv func(string) string, container int64) int64 {
	if getenv("GOMEMLIMIT") != "" {
		return 0
	}
	return container / 10 * 9
}

func runValidate(args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := newFlagSet("validate", "--config FILE", "Load and validate a configuration, and build what serve builds before it listens\n(credentials, certificates, callers); print every problem, exit 1 on any.", stderr)
	path := configFlag(fs, getenv)
	if err := parseFlags(fs, args, stdout); err != nil {
		return err
	}
	cfg, err := loadConfig(*path, getenv, stderr)
	if err != nil {
		return err
	}
	// What serve builds before it listens, built and let go: what it would refuse at start
	// (a certificate file that does not parse, a caller's key that is a route's word) is
	// refused here too.
	a, err := assemble(cfg, entra.Options{}, prometheus.NewRegistry(), zap.NewNop(), nil)
	if err != nil {
		return printProblems(stderr, *path, err)
	}
	a.api.Close()
	fmt.Fprintf(stdout, "%s: OK (%d credentials, %d upstreams, %d deployments, %d callers)\n",
		*path, len(cfg.Credentials), len(cfg.Upstreams), len(cfg.Deployments), len(cfg.Callers))
	if cfg.AllowUnauthenticated {
		fmt.Fprintln(stdout, "warning: allow_unauthenticated is on: anyone who can reach the gateway can use it")
	}
	return nil
}

func configFlag(fs *flag.FlagSet, getenv func(string) string) *string {
	return fs.String("config", getenv("PROXY_CONFIG"), "configuration `file` (default $PROXY_CONFIG)")
}

// loadConfig loads the file and prints every problem on its own line.
func loadConfig(path string, getenv func(string) string, stderr io.Writer) (*config.Config, error) {
	if path == "" {
		fmt.Fprintln(stderr, "proxy: no configuration: pass --config FILE or set PROXY_CONFIG")
		return nil, errUsage
	}
	cfg, err := config.Load(path, getenv)
	if err != nil {
		return nil, printProblems(stderr, path, err)
	}
	return cfg, nil
}

// printProblems prints err's problems, one a line, and returns errReported.
func printProblems(stderr io.Writer, path string, err error) error {
	var problems []string
	for _, line := range strings.Split(err.Error(), "\n") {
		if line != "" {
			problems = append(problems, line)
		}
	}
	fmt.Fprintf(stderr, "%s: %d problem(s):\n", path, len(problems))
	for _, p := range problems {
		fmt.Fprintf(stderr, "  - %s\n", p)
	}
	return errReported
}

// logBacklog is how far the log's destination may fall behind before lines wait for it.
const logBacklog = 8 << 20

// logLive is /healthz's check of the log's output: a destination that has taken nothing for the
// output's stall limit (a log collector that stopped reading) has lines dropped, and the
// process is better restarted.
func logLive(out *logsink.Writer, limit time.Duration) func() error {
	if out == nil {
		return nil
	}
	return func() error {
		if d := out.Stalled(); d >= limit {
			return fmt.Errorf("the log's destination has taken nothing for %s: log lines are being dropped (tokenproxy_log_lost_bytes_total)", d.Round(time.Second))
		}
		return nil
	}
}

// logStallLimit is how long the log's destination may take nothing before lines are dropped
// rather than hold the calls logging them, and /healthz fails.
const logStallLimit = 30 * time.Second

// newLogger builds the logger. Its output is a logsink.Writer: lines are gathered in memory and
// written by a goroutine of its own (at 256 KiB, and at least every second), so no call waits
// for a write(2), which to a file on a busy disk or a slowly drained pipe can take milliseconds
// (and a write(2) per line would cost about as much as the rest of the gateway's own work on a
// call). out.Stop must run before exit. access is the same output when the format is JSON, for
// the access log's own encoder (proxy.Options.AccessLog); nil otherwise.
func newLogger(level, format string, w io.Writer) (log *zap.Logger, out *logsink.Writer, access io.Writer, err error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, nil, nil, err
	}
	ec := proxy.LogEncoderConfig()
	var enc zapcore.Encoder
	if format == "console" {
		ec.EncodeLevel = zapcore.CapitalLevelEncoder
		ec.EncodeDuration = zapcore.StringDurationEncoder
		enc = zapcore.NewConsoleEncoder(ec)
	} else {
		enc = zapcore.NewJSONEncoder(ec)
	}
	out = logsink.New(w, logsink.Options{FlushSize: 256 << 10, Limit: logBacklog, Interval: time.Second, StallLimit: logStallLimit})
	if format != "console" {
		access = out
	}
	// No sampling: every access-log line is kept.
	return zap.New(zapcore.NewCore(enc, out, lvl), zap.ErrorOutput(out)), out, access, nil
}

type gatewayOptions struct {
	cfg    *config.Config
	log    *zap.Logger
	logOut *logsink.Writer // the log's output (newLogger)
	access io.Writer       // the access log's output, if it is encoded by the proxy (newLogger)
	stdout io.Writer
	// entra configures how credentials, and the verification of callers' Entra tokens, reach
	// Entra (the demo trusts its emulator's CA).
	entra entra.Options
	// banner, if set, is printed instead of the one-line "serving" notice, with the listener URLs.
	banner func(apiURL, adminURL string)
	// fallbackPorts lets the listeners move to a free port when the configured one is taken.
	fallbackPorts bool
	// configPath, if set, is reloaded (callers only) on SIGHUP and when it or a key file changes.
	configPath string
	getenv     func(string) string
}

// serveGateway runs the gateway until ctx is done, then shuts down: readiness goes false at
// once, the API keeps serving for shutdown_delay so load balancers notice, then listeners close
// and in-flight calls and streams get shutdown_grace to finish.
func serveGateway(ctx context.Context, o gatewayOptions) error {
	cfg, log := o.cfg, o.log
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{Namespace: "tokenproxy"}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: "tokenproxy", Name: "build_info", Help: "Always 1; labels say what is running.",
			ConstLabels: prometheus.Labels{"version": version, "goversion": runtime.Version()},
		}, func() float64 { return 1 }),
	)
	if out := o.logOut; out != nil {
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
			Namespace: "tokenproxy", Name: "log_lost_bytes_total",
			Help: fmt.Sprintf("Bytes of log lines lost: refused by the log's destination (a failed write(2)), or dropped while it took nothing for %s.", logStallLimit),
		}, func() float64 { return float64(out.Lost()) }))
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
			Namespace: "tokenproxy", Name: "log_waits_total",
			Help: fmt.Sprintf("Log lines that waited to be taken because the log's destination had fallen %d MiB behind (a call logging one waits with it).", logBacklog>>20),
		}, func() float64 { return float64(out.Waits()) }))
	}

	a, err := assemble(cfg, o.entra, reg, log, o.access)
	if err != nil {
		return err
	}
	b, api, apiCerts, adminCerts := a.broker, a.api, a.apiCerts, a.adminCerts
	defer api.Close()
	adm := admin.New(admin.Options{Gatherer: reg, Registerer: reg, Tokens: b, Pprof: cfg.AdminPprof, KeySHA256: cfg.AdminKeySHA256, Live: logLive(o.logOut, logStallLimit)})

	apiLn, err := listen(cfg.Listen, o.fallbackPorts)
	if err != nil {
		return fmt.Errorf("listening for the API: %w", err)
	}
	adminLn, err := listen(cfg.AdminListen, o.fallbackPorts)
	if err != nil {
		apiLn.Close()
		return fmt.Errorf("listening for the admin endpoints: %w", err)
	}
	apiSrv := api.NewServer(cfg)
	// The admin endpoints read no body: a request, body included, must be in within read_header,
	// and an answer (a pprof profile's included) taken within idle, or the connection is closed.
	adminSrv := &http.Server{
		Handler: adm, ReadHeaderTimeout: cfg.Timeouts.ReadHeader, ReadTimeout: cfg.Timeouts.ReadHeader,
		WriteTimeout: cfg.Timeouts.Idle, IdleTimeout: cfg.Timeouts.Idle,
		ErrorLog: zap.NewStdLog(log.Named("admin")),
	}

	apiURL, adminURL := "http://"+apiLn.Addr().String(), "http://"+adminLn.Addr().String()
	if apiCerts != nil {
		apiLn = tls.NewListener(apiLn, apiCerts.ServerConfig())
		apiURL = "https://" + apiLn.Addr().String()
	}
	if adminCerts != nil {
		adminLn = tls.NewListener(adminLn, adminCerts.ServerConfig())
		adminURL = "https://" + adminLn.Addr().String()
	}
	if cfg.AllowUnauthenticated {
		log.Warn("allow_unauthenticated is on: callers without a key are let in and may use every deployment")
	}
	log.Info("starting", zap.String("version", version), zap.String("api", apiURL), zap.String("admin", adminURL),
		zap.Int("upstreams", len(cfg.Upstreams)), zap.Int("callers", len(cfg.Callers)))
	if o.banner != nil {
		o.banner(apiURL, adminURL)
	} else {
		fmt.Fprintf(o.stdout, "proxy: serving the API on %s, admin on %s\n", apiURL, adminURL)
	}

	brokerCtx, stopBroker := context.WithCancel(context.Background())
	defer stopBroker()
	g, gctx := errgroup.WithContext(ctx)
	if o.configPath != "" {
		r := &reloader{path: o.configPath, getenv: o.getenv, log: log.Named("reload"), api: api, current: cfg}
		for _, c := range []*certs.Source{apiCerts, adminCerts} {
			if c != nil {
				r.certs = append(r.certs, c)
			}
		}
		rctx, stopReloads := context.WithCancel(gctx)
		defer stopReloads()
		defer r.stop()
		if err := r.start(rctx, reg); err != nil {
			apiLn.Close()
			adminLn.Close()
			return fmt.Errorf("watching the configuration's files: %w", err)
		}
	}
	g.Go(func() error { return b.Run(brokerCtx) })
	var stopping atomic.Bool
	g.Go(func() error {
		if err := apiSrv.Serve(apiLn); err != nil && !stopping.Load() {
			return fmt.Errorf("serving the API: %w", err)
		}
		return nil
	})
	g.Go(func() error { return serveUntilClosed(adminSrv, adminLn) })
	g.Go(func() error {
		<-gctx.Done()
		adm.SetDraining()
		if ctx.Err() != nil { // a signal, not a failed listener: give load balancers time
			log.Info("shutting down: not ready; still serving during shutdown_delay", zap.Duration("shutdown_delay", cfg.Timeouts.ShutdownDelay))
			sleep(cfg.Timeouts.ShutdownDelay)
		}
		log.Info("closing listeners; waiting for in-flight calls", zap.Duration("shutdown_grace", cfg.Timeouts.ShutdownGrace))
		stopping.Store(true)
		sctx, cancel := context.WithTimeout(context.Background(), cfg.Timeouts.ShutdownGrace)
		defer cancel()
		if cut, err := apiSrv.Shutdown(sctx); err != nil {
			log.Warn("shutdown_grace elapsed; cut the connections still open", zap.Int("connections", cut))
		}
		adminSrv.Close()
		stopBroker()
		log.Info("stopped")
		return nil
	})
	return g.Wait()
}

// assembled is what the gateway is built of before it listens.
type assembled struct {
	broker               *broker.Broker
	api                  *proxy.Handler
	apiCerts, adminCerts *certs.Source
}

// assemble builds the gateway from cfg as far as it goes without listening or reaching Entra:
// the credentials (their certificate files read), the token broker and its sources, the
// listeners' certificates, and the API handler (its callers checked). Whatever serve would
// refuse at start, this refuses, so validate runs it too. The handler must be closed.
func assemble(cfg *config.Config, eo entra.Options, reg prometheus.Registerer, log *zap.Logger, access io.Writer) (*assembled, error) {
	fetchers := map[string]broker.Fetcher{}
	for _, name := range slices.Sorted(maps.Keys(cfg.Credentials)) {
		f, err := entra.New(name, cfg.Credentials[name], eo)
		if err != nil {
			return nil, err
		}
		fetchers[name] = f
	}
	b, err := broker.New(broker.Options{
		Fetchers: fetchers, Logger: log.Named("broker"), Registerer: reg, AcquireTimeout: cfg.Timeouts.TokenAcquire,
	})
	if err != nil {
		return nil, err
	}
	sources := map[string]broker.TokenSource{}
	for name, u := range cfg.Upstreams {
		if sources[name], err = b.Source(u.Credential, u.Scope); err != nil {
			return nil, err
		}
	}
	a := &assembled{broker: b}
	var clientCAs func() *x509.CertPool
	if cfg.TLS != nil {
		if a.apiCerts, err = certs.New(cfg.TLS); err != nil {
			return nil, fmt.Errorf("tls: %w", err)
		}
		if cfg.TLS.ClientCAFile != "" {
			clientCAs = a.apiCerts.ClientCAs
		}
	}
	if cfg.AdminTLS != nil {
		if a.adminCerts, err = certs.New(cfg.AdminTLS); err != nil {
			return nil, fmt.Errorf("admin_tls: %w", err)
		}
	}
	a.api, err = proxy.New(proxy.Options{
		Config: cfg, Sources: sources, Logger: log.Named("access"), AccessLog: access, Registerer: reg, EntraHTTPClient: eo.HTTPClient,
		ClientCAs: clientCAs,
	})
	if err != nil {
		return nil, err
	}
	return a, nil
}

func serveUntilClosed(srv *http.Server, ln net.Listener) error {
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// listen opens addr; with fallback, a taken port is replaced by a free one on the same host.
func listen(addr string, fallback bool) (net.Listener, error) {
	ln, err := proxy.Listen(addr)
	if err != nil && fallback && errors.Is(err, syscall.EADDRINUSE) {
		host, _, _ := net.SplitHostPort(addr)
		return proxy.Listen(net.JoinHostPort(host, "0"))
	}
	return ln, err
}

func sleep(d time.Duration) {
	if d > 0 {
		time.Sleep(d)
	}
}
