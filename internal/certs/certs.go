// Package certs serves a listener's TLS certificate, and the CAs its clients' certificates must
// chain to, from files that can change while the gateway runs (a renewed certificate, a
// rotated CA): Reload reads them again, and new handshakes use them.
package certs

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"sync/atomic"

	"github.com/tokenproxy/tokenproxy/internal/config"
)

// Source holds a listener's current certificate and client CAs.
type Source struct {
	cfg  *config.TLS
	cert atomic.Pointer[tls.Certificate]
	cas  atomic.Pointer[x509.CertPool]
}

// New loads the files of cfg.
func New(cfg *config.TLS) (*Source, error) {
	s := &Source{cfg: cfg}
	if err := s.Reload(); err != nil {
		return nil, err
	}
	return s, nil
}

// Reload reads the files again; on error the current certificate and CAs stay.
func (s *Source) Reload() error {
	cert, err := s.cfg.Certificate()
	if err != nil {
		return err
	}
	var cas *x509.CertPool
	if s.cfg.ClientCAFile != "" {
		if cas, err = s.cfg.ClientCAs(); err != nil {
			return fmt.Errorf("loading client_ca_file: %w", err)
		}
	}
	s.cert.Store(&cert)
	if cas != nil {
		s.cas.Store(cas)
	}
	return nil
}

// ClientCAs returns the client CAs as they are now (nil without client_ca_file). A reload
// that reads them replaces the pool, so a pool other than the one a connection's certificate
// was verified against means they have been read again.
func (s *Source) ClientCAs() *x509.CertPool { return s.cas.Load() }

// Files are the files Reload reads.
func (s *Source) Files() []string {
	files := []string{s.cfg.CertFile, s.cfg.KeyFile}
	if s.cfg.ClientCAFile != "" {
		files = append(files, s.cfg.ClientCAFile)
	}
	return files
}

// tls12Suites are the cipher suites offered to TLS 1.2 clients: forward-secret key exchange
// and authenticated encryption only (Go's defaults add ECDHE with CBC and SHA-1). TLS 1.3's
// suites are not configurable, and are all of this kind.
var tls12Suites = []uint16{
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
	tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
}

// ServerConfig returns the listener's TLS configuration. Each handshake takes the current
// certificate and CAs. With client CAs, a client may present a certificate, which must then
// chain to them; presenting none is allowed (mtls callers are one kind among others).
func (s *Source) ServerConfig() *tls.Config {
	base := &tls.Config{MinVersion: s.cfg.Version(), NextProtos: []string{"http/1.1"}, CipherSuites: tls12Suites}
	return &tls.Config{
		MinVersion: base.MinVersion,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			c := base.Clone()
			c.Certificates = []tls.Certificate{*s.cert.Load()}
			if cas := s.cas.Load(); cas != nil {
				c.ClientCAs = cas
				c.ClientAuth = tls.VerifyClientCertIfGiven
			}
			return c, nil
		},
	}
}
