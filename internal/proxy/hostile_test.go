package proxy

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/tokenproxy/tokenproxy/internal/config"
)

func dial(t *testing.T, g *gateway) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", strings.TrimPrefix(g.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// dialSmallWindow dials addr with a 4 KiB receive buffer, for a caller that stops reading to
// stall the gateway's writes soon.
func dialSmallWindow(t *testing.T, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		return c.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
	}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// closedByServer waits for the server to end the connection (with or without a last answer).
func closedByServer(t *testing.T, c net.Conn, within time.Duration) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(within))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Errorf("the server kept the connection open for %v", within)
	}
}

func TestSlowlorisDoesNotStarveOthers(t *testing.T) {
	g := newGateway(t, func(c *config.Config) { c.Timeouts.ReadHeader = 300 * time.Millisecond })
	// Many clients that start a request and never finish its headers.
	var slow []net.Conn
	for range 200 {
		c := dial(t, g)
		fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: gw\r\nX-Trickle: a", chatPath)
		slow = append(slow, c)
	}
	// Everyone else is served meanwhile.
	for i := range 20 {
		if resp, _ := g.do("POST", chatPath, map[string]string{"api-key": keyProd}, chatBody); resp.StatusCode != 200 {
			t.Fatalf("call %d during the slowloris got %d", i, resp.StatusCode)
		}
	}
	// And the slow ones are cut off once read_header has passed.
	for _, c := range slow {
		closedByServer(t, c, 10*time.Second)
	}
}

func TestOversizedAndIdleClients(t *testing.T) {
	g := newGateway(t, func(c *config.Config) { c.Timeouts.Idle = 300 * time.Millisecond })

	c := dial(t, g)
	fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: gw\r\nApi-Key: %s\r\nX-Huge: %s\r\nContent-Length: 2\r\n\r\n{}", chatPath, keyProd, strings.Repeat("x", MaxHeaderBytes+1))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge || !strings.Contains(string(b), CodeInvalidRequest) {
		t.Errorf("headers over %d bytes: got %d %s, want 431", MaxHeaderBytes, resp.StatusCode, b)
	}
	// Counted as a request no caller or deployment could be told for.
	if n := testutil.ToFloat64(g.handler.m.requests.WithLabelValues("", "", "431")); n != 1 {
		t.Errorf("requests_total{caller=\"\",deployment=\"\",code=\"431\"} = %v, want 1", n)
	}

	// A keep-alive connection left idle is closed after timeouts.idle.
	c = dial(t, g)
	fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: gw\r\nApi-Key: %s\r\nContent-Length: %d\r\n\r\n%s", chatPath, keyProd, len(chatBody), chatBody)
	br := bufio.NewReader(c)
	resp, err = http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("got %v %v", resp, err)
	}
	io.Copy(io.Discard, resp.Body)
	closedByServer(t, c, 10*time.Second)
	if len(g.emu.OpenAI.Requests()) != 1 {
		t.Errorf("the oversized request reached the upstream")
	}
}
