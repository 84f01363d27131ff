package config

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
)

// Certificate reads the certificate and key files. The files are read anew on each call, so a
// listener can pick up a renewed certificate. They are read as every file the configuration
// names is (readFile): regular files of bounded size, read within a time.
func (t *TLS) Certificate() (tls.Certificate, error) {
	certPEM, err := readFile(t.CertFile)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("loading %s and %s: %w", t.CertFile, t.KeyFile, err)
	}
	keyPEM, err := readFile(t.KeyFile)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("loading %s and %s: %w", t.CertFile, t.KeyFile, err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
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
	return parsePool(u.CA)
}

func readPool(path string) (*x509.CertPool, error) {
	b, err := readFile(path)
	if err != nil {
		return nil, err
	}
	pool, err := parsePool(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return pool, nil
}

// parsePool reads a bundle of PEM certificates. Every block must be a certificate that parses:
// one that does not is an error, not skipped (as x509.CertPool.AppendCertsFromPEM and
// pem.Decode skip it), so that a CA meant to be trusted, or a bundle cut short, is not left out
// unseen. Text between blocks (comments, openssl's subject lines) is ignored.
func parsePool(b []byte) (*x509.CertPool, error) {
	begun := bytes.Count(b, []byte("-----BEGIN "))
	pool := x509.NewCertPool()
	n := 0
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			break
		}
		n++
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("PEM block %d is a %s, not a CERTIFICATE", n, shown(block.Type))
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("PEM block %d: %w", n, err)
		}
		pool.AddCert(cert)
	}
	if n < begun {
		return nil, fmt.Errorf("%d of its %d PEM blocks cannot be decoded", begun-n, begun)
	}
	if n == 0 {
		return nil, errors.New("no PEM certificate found")
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
