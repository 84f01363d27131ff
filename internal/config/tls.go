package config

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
)

// Certificate reads the certificate and key files. The files are read anew on each call, so a
// listener can pick up a renewed certificate.
func (t *TLS) Certificate() (tls.Certificate, error) {
	cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("loading %s and %s: %w", t.CertFile, t.KeyFile, err)
	}
	return cert, nil
}

// ClientCAs reads ClientCAFile.
func (t *TLS) ClientCAs() (*x509.CertPool, error) {
	return readPool(t.ClientCAFile)
}

// Version is the minimum TLS version.
func (t *TLS) Version() uint16 {
	if t.MinVersion == "1.3" {
		return tls.VersionTLS13
	}
	return tls.VersionTLS12
}

// Pool returns a pool of the upstream's CA, or nil for the system roots.
func (u *Upstream) Pool() (*x509.CertPool, error) {
	if len(u.CA) == 0 {
		return nil, nil
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(u.CA) {
		return nil, errors.New("no PEM certificate found")
	}
	return pool, nil
}

func readPool(path string) (*x509.CertPool, error) {
	b, err := readFile(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("%s: no PEM certificate found", path)
	}
	return pool, nil
}

func (t *TLS) validate(v *validator, p string, api bool) {
	if t.CertFile == "" || t.KeyFile == "" {
		v.add(p, "cert_file and key_file are both required")
	} else if _, err := t.Certificate(); err != nil {
		v.add(p, "%v", err)
	}
	if t.ClientCAFile != "" {
		if !api {
			v.add(p+".client_ca_file", "is for the API listener only")
		} else if _, err := t.ClientCAs(); err != nil {
			v.add(p+".client_ca_file", "%v", err)
		}
	}
	if t.MinVersion != "" && t.MinVersion != "1.2" && t.MinVersion != "1.3" {
		v.add(p+".min_version", "%s is not 1.2 or 1.3", shown(t.MinVersion))
	}
}
