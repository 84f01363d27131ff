package proxy

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"math"
	"math/rand/v2"
	"strconv"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// accessLines renders c's access-log line through zap (a JSON encoder with LogEncoderConfig)
// and through the handler's own encoder.
func accessLines(t testing.TB, c *call, status int, end time.Time) (viaZap, own []byte) {
	t.Helper()
	var z, o bytes.Buffer
	newLog := func(w *bytes.Buffer) *zap.Logger {
		return zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(LogEncoderConfig()), zapcore.AddSync(w), zap.InfoLevel)).Named("access")
	}
	(&Handler{log: newLog(&z)}).accessLog(c, status, end)
	(&Handler{log: newLog(new(bytes.Buffer)), accessOut: &o}).accessLog(c, status, end)
	return z.Bytes(), o.Bytes()
}

func TestAccessLogMatchesZap(t *testing.T) {
	start := time.Date(2026, 11, 23, 7, 34, 40, 123456789, time.Local)
	full := func() *call {
		c := &call{
			start: start, proxyStart: start.Add(310 * time.Microsecond), headerAt: start.Add(41*time.Millisecond + 7),
			id: "6a1b2c3d-0000-4000-8000-000000000000", path: "/openai/deployments/gpt-4.1-mini/chat/completions",
			query: "api-version=2024-10-21&x=y", caller: "a360-prod", deployment: "gpt-4.1-mini", upstream: "eastca",
			code: CodeInternal, err: errors.New("upstream said \"no\"\n\tat line 1"), status: 502,
			bytesIn: 67, bytesOut: 1024, streaming: true, aborted: true, attempts: 3, backend: "eastca/deploy-gpt-4.1",
		}
		c.kept.method, c.kept.apimID, c.kept.region = []byte("POST"), []byte("apim-1"), []byte("Canada East")
		return c
	}
	cases := map[string]func(*call){
		"every field": func(*call) {},
		"fewest fields": func(c *call) {
			*c = call{start: start, id: "x"}
		},
		"escapes and invalid UTF-8": func(c *call) {
			c.path = "/openai/deployments/\x00\x1f\"\\é\xff\xfe/ü\u2028"
			c.deployment = "dép\x7f\r"
			c.kept.method = []byte("P\xc3\x28ST")
			c.err = errors.New("bad \xe2\x82 byte")
		},
		"the credential is scrubbed": func(c *call) {
			c.credStr = "tpk_secret_key_value"
			c.path = "/openai/deployments/tpk_secret_key_value/chat/completions"
			c.err = errors.New("deployment tpk_secret_key_value not found")
		},
		"long durations": func(c *call) {
			c.headerAt = c.proxyStart.Add(3*time.Hour + 1)
		},
	}
	for name, edit := range cases {
		t.Run(name, func(t *testing.T) {
			c := full()
			edit(c)
			// Lines of the same second share its text, unless their zones differ.
			end := start.Add(1500 * time.Millisecond)
			for _, end := range []time.Time{end, end.Add(time.Millisecond), end.In(time.FixedZone("", 3600)), end.Add(time.Minute)} {
				viaZap, own := accessLines(t, c, 502, end)
				if !bytes.Equal(viaZap, own) {
					t.Fatalf("lines differ:\nzap: %s\nown: %s", viaZap, own)
				}
				if !json.Valid(bytes.TrimSpace(own)) || bytes.Contains(own, []byte("tpk_secret")) {
					t.Fatalf("bad line: %s", own)
				}
			}
		})
	}
}

func TestAccessLogFollowsTheLevel(t *testing.T) {
	var out bytes.Buffer
	log := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(LogEncoderConfig()), zapcore.AddSync(new(bytes.Buffer)), zap.WarnLevel))
	(&Handler{log: log, accessOut: &out}).accessLog(&call{start: time.Now(), id: "x"}, 200, time.Now())
	if out.Len() != 0 {
		t.Fatalf("an info line was written at level warn: %s", out.Bytes())
	}
}

func FuzzAccessLog(f *testing.F) {
	f.Add("/openai/deployments/d/chat/completions", "gpt-4.1", "POST", "boom", "apim", int64(1500))
	f.Add("/\x00\xff\"\\", "\xe2\x82", "G\tET", "\u2028\n", "\x7f", int64(-5))
	f.Add("/openai/deployments/\"gpt\\4.1\"/chat/\xc3\xa9t\xc3", "gpt-4.1-mini-2025-04-14\x01", "POST", "a long error text \u2028 with\tcontrols", "6a1b2c3d-0000-4000-8000-000000000000", int64(1))
	f.Fuzz(func(t *testing.T, path, deployment, method, errText, apim string, d int64) {
		start := time.Unix(1_790_000_000, 0)
		c := &call{start: start, id: "id", path: path, deployment: deployment, err: errors.New(errText), caller: "c"}
		c.kept.method, c.kept.apimID = []byte(method), []byte(apim)
		viaZap, own := accessLines(t, c, 200, start.Add(time.Duration(d)))
		if !bytes.Equal(viaZap, own) {
			t.Fatalf("lines differ:\nzap: %q\nown: %q", viaZap, own)
		}
	})
}

func TestAppendSeconds(t *testing.T) {
	ds := []time.Duration{0, 1, -1, 9, 10, 999_999_999, 1e9, -1e9, 1e9 + 1, 1_500_000, 412_345,
		1e15 - 1, -(1e15 - 1), 1e15, -1e15, 1<<53 + 1, math.MaxInt64, math.MinInt64, 123_456_789_012_345}
	r := rand.New(rand.NewPCG(1, 2))
	for range 200_000 {
		ds = append(ds, time.Duration(r.Int64N(1e16)-5e15), time.Duration(r.Int64N(1e10)), time.Duration(r.Int64()))
	}
	for _, d := range ds {
		want := strconv.AppendFloat(nil, float64(d)/float64(time.Second), 'f', -1, 64)
		if got := appendSeconds(nil, d); !bytes.Equal(got, want) {
			t.Fatalf("appendSeconds(%d) = %s, want %s", int64(d), got, want)
		}
	}
}

func BenchmarkAppendSeconds(b *testing.B) {
	buf := make([]byte, 0, 32)
	for _, d := range []time.Duration{412_345, 1_234_567_891} {
		b.Run("own/"+d.String(), func(b *testing.B) {
			for b.Loop() {
				buf = appendSeconds(buf[:0], d)
			}
		})
		b.Run("strconv/"+d.String(), func(b *testing.B) {
			for b.Loop() {
				buf = strconv.AppendFloat(buf[:0], float64(d)/float64(time.Second), 'f', -1, 64)
			}
		})
	}
}

func BenchmarkAccessLog(b *testing.B) {
	c := &call{
		start: time.Now(), id: "6a1b2c3d-0000-4000-8000-000000000000", path: "/openai/deployments/gpt-4.1-mini/chat/completions",
		query: "api-version=2024-10-21", caller: "a360-prod", deployment: "gpt-4.1-mini", upstream: "eastca", status: 200,
		bytesIn: 67, bytesOut: 1024,
	}
	c.proxyStart, c.headerAt = c.start, c.start.Add(time.Millisecond)
	c.kept.method, c.kept.apimID, c.kept.region = []byte("POST"), []byte("6a1b2c3d-0000-4000-8000-000000000000"), []byte("Canada East")
	for _, own := range []bool{false, true} {
		name := map[bool]string{false: "zap", true: "own"}[own]
		b.Run(name, func(b *testing.B) {
			h := &Handler{log: zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(LogEncoderConfig()), zapcore.AddSync(discard{}), zap.InfoLevel)).Named("access")}
			if own {
				h.accessOut = discard{}
			}
			b.ReportAllocs()
			for b.Loop() {
				h.accessLog(c, 200, time.Now())
			}
		})
	}
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

// plainWord agrees with plainJSON on every byte value at every place in a word, among plain
// bytes and among others.
func TestPlainWord(t *testing.T) {
	for _, fill := range []byte{'a', ' ', '~', '!', '#', '[', ']'} {
		for pos := range 8 {
			for c := range 256 {
				var b [8]byte
				for i := range b {
					b[i] = fill
				}
				b[pos] = byte(c)
				w := binary.LittleEndian.Uint64(b[:])
				if got, want := plainWord(w), plainJSON[c]; got != want {
					t.Fatalf("plainWord(%q) = %v, want %v", b, got, want)
				}
			}
		}
	}
	// Two bytes apart: the trick's borrow must not hide one behind the other.
	for c := range 256 {
		for d := range 256 {
			b := [8]byte{'x', byte(c), byte(d), 'x', 'x', 'x', 'x', 'x'}
			if got, want := plainWord(binary.LittleEndian.Uint64(b[:])), plainJSON[c] && plainJSON[d]; got != want {
				t.Fatalf("plainWord(%q) = %v, want %v", b, got, want)
			}
		}
	}
}
