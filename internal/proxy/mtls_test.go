package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509/pkix"
	"encoding/asn1"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tokenproxy/tokenproxy/internal/certs"
	"github.com/tokenproxy/tokenproxy/internal/config"
	"github.com/tokenproxy/tokenproxy/internal/emulator"
)

// mtlsGateway is a gateway served over TLS with client CAs, as `proxy serve` serves it, with an
// mtls caller batch-job (subject "CN=batch-job,O=Contoso", gpt-4.1-mini) beside newGateway's
// key callers.
type mtlsGateway struct {
	*gateway
	addr               string
	caFile             string
	src                *certs.Source
	serverCA, clientCA *emulator.CA
}

func newMTLSGateway(t *testing.T, opts ...gatewayOption) *mtlsGateway {
	t.Helper()
	dir := t.TempDir()
	serverCA, err := emulator.NewCA()
	if err != nil {
		t.Fatal(err)
	}
	clientCA, err := emulator.NewCA()
	if err != nil {
		t.Fatal(err)
	}
	certPEM, keyPEM, err := serverCA.IssuePEM(emulator.Leaf{CommonName: "gateway", IPs: []net.IP{net.IPv4(127, 0, 0, 1)}})
	if err != nil {
		t.Fatal(err)
	}
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	tlsCfg := &config.TLS{CertFile: write("server.pem", certPEM), KeyFile: write("server.key", keyPEM), ClientCAFile: write("client-ca.pem", clientCA.CertPEM())}
	g := newGateway(t, append([]gatewayOption{func(c *config.Config) {
		c.TLS = tlsCfg
		c.Callers = append(c.Callers, &config.Caller{Name: "batch-job", MTLS: &config.MTLSCaller{Subject: "CN=batch-job,O=Contoso"}, Deployments: []string{"gpt-4.1-mini"}})
	}}, opts...)...)
	src, err := certs.New(tlsCfg)
	if err != nil {
		t.Fatal(err)
	}
	g.handler.clientCAs = src.ClientCAs // as proxy serve's Options.ClientCAs
	ln, err := Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := g.handler.NewServer(g.cfg)
	done := make(chan struct{})
	go func() { srv.Serve(tls.NewListener(ln, src.ServerConfig())); close(done) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		<-done
	})
	return &mtlsGateway{gateway: g, addr: ln.Addr().String(), caFile: tlsCfg.ClientCAFile, src: src, serverCA: serverCA, clientCA: clientCA}
}

// clientCert issues a client certificate of the gateway's client CA.
func (g *mtlsGateway) clientCert(leaf emulator.Leaf) tls.Certificate {
	g.t.Helper()
	leaf.Client = true
	certPEM, keyPEM, err := g.clientCA.IssuePEM(leaf)
	if err != nil {
		g.t.Fatal(err)
	}
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		g.t.Fatal(err)
	}
	return c
}

// tlsClient is a client presenting cert (none if nil) that keeps one connection alive.
func (g *mtlsGateway) tlsClient(cert *tls.Certificate) *http.Client {
	cfg := &tls.Config{RootCAs: g.serverCA.Pool()}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: cfg, MaxIdleConnsPerHost: 1}}
	g.t.Cleanup(c.CloseIdleConnections)
	return c
}

// chat calls gpt-4.1-mini through c with header's fields; it returns the status and body, or
// the error of a call that got no answer (a refused handshake).
func (g *mtlsGateway) chat(c *http.Client, header map[string]string) (int, string, error) {
	req, _ := http.NewRequest("POST", "https://"+g.addr+"/openai/deployments/gpt-4.1-mini/chat/completions?api-version=2024-10-21", strings.NewReader(chatBody))
	req.Header.Set("Content-Type", "application/json")
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), nil
}

// newConns counts the TLS handshakes c's transport makes from now on.
func newConns(c *http.Client) *int {
	n := new(int)
	tr := c.Transport.(*http.Transport)
	dial := (&net.Dialer{}).DialContext
	tr.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		*n++
		return dial(ctx, network, addr)
	}
	return n
}

func TestClientCertificateCheckedAgainOnAKeptConnection(t *testing.T) {
	t.Run("the client CAs change", func(t *testing.T) {
		g := newMTLSGateway(t)
		batch := g.clientCert(emulator.Leaf{CommonName: "batch-job"})
		kept := g.tlsClient(&batch)
		dials := newConns(kept)
		if code, body, err := g.chat(kept, nil); code != 200 {
			t.Fatalf("before the change: %d %s %v", code, body, err)
		}
		// The same CA read again: the certificate still chains, and is admitted.
		if err := g.src.Reload(); err != nil {
			t.Fatal(err)
		}
		if code, body, err := g.chat(kept, nil); code != 200 {
			t.Fatalf("the same CAs read again: %d %s %v", code, body, err)
		}
		// The CA withdrawn: refused on the connection made before.
		other, _ := emulator.NewCA()
		if err := os.WriteFile(g.caFile, other.CertPEM(), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := g.src.Reload(); err != nil {
			t.Fatal(err)
		}
		for i := range 2 {
			code, body, err := g.chat(kept, nil)
			if code != 401 || !strings.Contains(body, "no longer chains to the gateway's client CAs") {
				t.Errorf("call %d after the CA was withdrawn: got %d %s %v, want 401", i, code, body, err)
			}
		}
		if *dials != 1 {
			t.Errorf("%d connections, want the one kept throughout", *dials)
		}
		if _, _, err := g.chat(g.tlsClient(&batch), nil); err == nil {
			t.Error("a new connection with the withdrawn CA's certificate was accepted")
		}
	})
	t.Run("the certificate expires", func(t *testing.T) {
		g := newMTLSGateway(t)
		batch := g.clientCert(emulator.Leaf{CommonName: "batch-job"}) // valid for a day
		kept := g.tlsClient(&batch)
		dials := newConns(kept)
		if code, body, err := g.chat(kept, nil); code != 200 {
			t.Fatalf("before expiry: %d %s %v", code, body, err)
		}
		g.clock.advance(25 * time.Hour)
		code, body, err := g.chat(kept, nil)
		if code != 401 || !strings.Contains(body, "has expired since the connection was made") {
			t.Errorf("after expiry: got %d %s %v, want 401", code, body, err)
		}
		if *dials != 1 {
			t.Errorf("%d connections, want the one kept throughout", *dials)
		}
	})
}

// A certificate is verified by its connection's handshake, and not again at its calls while the
// client CAs stay those in force when the connection was accepted. The probe: the gateway's
// clock is set back before the certificate's start, which a verification at a call refuses and
// the handshake, on the real clock, does not.
func TestClientCertificateVerifiedOnceUnderTheSameCAs(t *testing.T) {
	g := newMTLSGateway(t)
	batch := g.clientCert(emulator.Leaf{CommonName: "batch-job"})
	g.clock.advance(-48 * time.Hour)
	kept := g.tlsClient(&batch)
	for i := range 2 {
		if code, body, err := g.chat(kept, nil); code != 200 {
			t.Fatalf("call %d: %d %s %v", i, code, body, err)
		}
	}
	// Read again, the CAs are a new set: the next call verifies the certificate, on the
	// gateway's clock.
	if err := g.src.Reload(); err != nil {
		t.Fatal(err)
	}
	if code, body, err := g.chat(kept, nil); code != 401 {
		t.Errorf("after the CAs were read again: got %d %s %v, want 401 from a verification before the certificate's start", code, body, err)
	}
}

func TestClientCertificateSubjectAsIssued(t *testing.T) {
	g := newMTLSGateway(t)
	cn, o := asn1.ObjectIdentifier{2, 5, 4, 3}, asn1.ObjectIdentifier{2, 5, 4, 10}
	// Go's pkix.Name keeps the last of two CNs and writes O before CN whatever the order: both
	// of these read "CN=batch-job,O=Contoso" through it.
	for name, subject := range map[string]pkix.Name{
		"two CNs":   {ExtraNames: []pkix.AttributeTypeAndValue{{Type: o, Value: "Contoso"}, {Type: cn, Value: "someone-else"}, {Type: cn, Value: "batch-job"}}},
		"reordered": {ExtraNames: []pkix.AttributeTypeAndValue{{Type: cn, Value: "batch-job"}, {Type: o, Value: "Contoso"}}},
	} {
		cert := g.clientCert(emulator.Leaf{Subject: &subject})
		if code, body, err := g.chat(g.tlsClient(&cert), nil); code != 403 {
			t.Errorf("%s: got %d %s %v, want 403", name, code, body, err)
		}
	}
	// As Go writes it (O, then CN, as CAs do), the subject matches.
	plain := pkix.Name{ExtraNames: []pkix.AttributeTypeAndValue{{Type: o, Value: "Contoso"}, {Type: cn, Value: "batch-job"}}}
	cert := g.clientCert(emulator.Leaf{Subject: &plain})
	if code, body, err := g.chat(g.tlsClient(&cert), nil); code != 200 {
		t.Errorf("O=Contoso, then CN=batch-job: got %d %s %v, want 200", code, body, err)
	}
}

func TestClientCertificateAndAKeyAreTwoCredentials(t *testing.T) {
	g := newMTLSGateway(t)
	batch := g.clientCert(emulator.Leaf{CommonName: "batch-job"})
	for name, key := range map[string]string{"another caller's key": keyAdmin, "an unknown key": "tpk_unknown-0123456789abcdefghijklmnop"} {
		code, body, err := g.chat(g.tlsClient(&batch), map[string]string{"api-key": key})
		if code != 401 || !strings.Contains(body, "names caller batch-job, and a key or token was sent as well") {
			t.Errorf("batch-job's certificate and %s: got %d %s %v, want 401", name, code, body, err)
		}
	}
	// A certificate that names no caller leaves the key to be judged alone.
	stranger := g.clientCert(emulator.Leaf{CommonName: "someone-else"})
	if code, body, err := g.chat(g.tlsClient(&stranger), map[string]string{"api-key": keyAdmin}); code != 200 {
		t.Errorf("a certificate naming no caller and the admin key: got %d %s %v, want 200", code, body, err)
	}
}

func TestClientCertificateNamingNoCaller(t *testing.T) {
	g := newMTLSGateway(t)
	long := pkix.Name{CommonName: "evil\n" + strings.Repeat("A", 20000), Organization: []string{"Contoso"}}
	cert := g.clientCert(emulator.Leaf{Subject: &long})
	code, body, err := g.chat(g.tlsClient(&cert), nil)
	if code != 403 || !strings.Contains(body, "names no caller of this gateway") || len(body) > 600 {
		t.Errorf("a long subject naming no caller: got %d, %d bytes, %.300s %v; want 403 quoting at most %d bytes of it", code, len(body), body, err, maxShownSubject)
	}
	// The mtls callers removed by a reload: a connection made before presents its certificate.
	batch := g.clientCert(emulator.Leaf{CommonName: "batch-job"})
	kept := g.tlsClient(&batch)
	if code, body, err := g.chat(kept, nil); code != 200 {
		t.Fatalf("before the reload: %d %s %v", code, body, err)
	}
	cfg := *g.cfg
	cfg.Callers = cfg.Callers[:len(cfg.Callers)-1]
	if err := g.handler.SetCallers(&cfg); err != nil {
		t.Fatal(err)
	}
	if code, body, err := g.chat(kept, nil); code != 403 || !strings.Contains(body, "(CN=batch-job,O=Contoso) names no caller") {
		t.Errorf("after batch-job's removal: got %d %s %v, want 403", code, body, err)
	}
}

func TestTLS12SuitesAreAEADOnly(t *testing.T) {
	g := newMTLSGateway(t)
	for _, suite := range []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA, tls.TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA} {
		conn, err := tls.Dial("tcp", g.addr, &tls.Config{RootCAs: g.serverCA.Pool(), MaxVersion: tls.VersionTLS12, CipherSuites: []uint16{suite}})
		if err == nil {
			conn.Close()
			t.Errorf("%s was negotiated", tls.CipherSuiteName(suite))
		}
	}
	conn, err := tls.Dial("tcp", g.addr, &tls.Config{RootCAs: g.serverCA.Pool(), MaxVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatalf("TLS 1.2 with Go's default suites: %v", err)
	}
	conn.Close()
}

func TestTLSHandshakeWithinReadHeader(t *testing.T) {
	g := newMTLSGateway(t, func(c *config.Config) { c.Timeouts.ReadHeader = 200 * time.Millisecond })
	for name, sent := range map[string][]byte{
		"nothing":                nil,
		"part of a client hello": {0x16, 0x03, 0x01, 0x02, 0x00, 0x01},
	} {
		conn, err := net.Dial("tcp", g.addr)
		if err != nil {
			t.Fatal(err)
		}
		conn.Write(sent)
		conn.SetReadDeadline(time.Now().Add(10 * time.Second)) // a bound, not a wait
		_, err = io.ReadAll(conn)
		conn.Close()
		if err != nil {
			t.Errorf("%s sent: the connection is still open (%v), want it closed past read_header", name, err)
		}
	}
}

func TestPlainHTTPOnTheTLSListenerIsToldSo(t *testing.T) {
	g := newMTLSGateway(t)
	resp, err := http.Post("http://"+g.addr+"/openai/deployments/gpt-4.1-mini/chat/completions?api-version=2024-10-21", "application/json", strings.NewReader(chatBody))
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 400 || !strings.Contains(string(b), "call it with an https:// URL") || resp.Header.Get("Content-Type") != "application/json" ||
		resp.Header.Get("X-Tokenproxy-Error") != CodeInvalidRequest || resp.Header.Get("X-Ms-Error-Code") != CodeInvalidRequest {
		t.Errorf("got %d %s %q, want 400 saying to use https", resp.StatusCode, resp.Header.Get("Content-Type"), b)
	}
}
