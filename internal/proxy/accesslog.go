package proxy

import (
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// The access log is one line per call. Through zap's JSON encoder a line cost about a quarter
// of the handler's own time and 1.5 KB of garbage (a slice of twenty fields, each encoded
// through an interface), so when the log is JSON the handler writes the line itself, in the
// shape zap's production JSON encoder gives it (see TestAccessLogMatchesZap); otherwise, and
// for any other message, zap does.

// LogEncoderConfig is the configuration of the gateway's zap encoders. The access log's own
// encoder writes exactly what a JSON encoder with it writes.
func LogEncoderConfig() zapcore.EncoderConfig {
	ec := zap.NewProductionEncoderConfig()
	ec.TimeKey = "ts"
	ec.EncodeTime = zapcore.ISO8601TimeEncoder
	return ec
}

// logFields receives an access-log line's fields, in order. The line is built once, by
// call.logFields, for either encoder.
type logFields interface {
	str(key, v string)
	bytes(key string, v []byte)
	int(key string, v int)
	dur(key string, d time.Duration)
	flag(key string) // a field whose value is true
}

// logFields sends the call's access-log fields to f. end is when the call ended.
func (c *call) logFields(f logFields, status int, end time.Time) {
	method, apimID, region := c.kept.method, c.kept.apimID, c.kept.region
	if c.fc != nil {
		method = c.fc.Request.Header.Method()
	}
	f.str("request_id", c.id)
	f.str("caller", c.caller)
	f.str("deployment", c.scrub(c.deployment))
	f.str("upstream", c.upstream)
	f.bytes("method", method)
	// The path only: query strings can carry things that do not belong in logs.
	f.str("path", c.scrub(c.path))
	f.int("status", status)
	f.dur("duration", end.Sub(c.start))
	f.int("bytes_in", c.bytesIn)
	f.int("bytes_out", c.bytesOut)
	if v := apiVersion(c.query); v != "" {
		// A key in its place, the caller's own or another's, is not left in the log (nor
		// sent upstream: stripCredentialParams).
		if c.keys.holdsKey(readOnly(v)) {
			v = "[REDACTED]"
		}
		f.str("api_version", c.scrub(v))
	}
	if !c.proxyStart.IsZero() && !c.headerAt.IsZero() {
		f.dur("upstream_duration", c.headerAt.Sub(c.proxyStart))
	}
	if len(apimID) > 0 {
		f.bytes("apim_request_id", apimID)
	}
	if len(region) > 0 {
		f.bytes("x_ms_region", region)
	}
	if c.backend != "" {
		f.str("backend", c.backend)
	}
	if c.attempts > 1 {
		f.int("attempts", c.attempts)
	}
	if c.streaming {
		f.flag("stream")
	}
	if c.code != "" {
		f.str("error_code", c.code)
	}
	if c.err != nil {
		f.str("error", c.scrub(c.err.Error()))
	}
	if c.aborted {
		f.flag("aborted")
	}
}

// accessLog writes the call's access-log line, at info level.
func (h *Handler) accessLog(c *call, status int, end time.Time) {
	if h.accessOut != nil {
		if !h.log.Core().Enabled(zapcore.InfoLevel) {
			return
		}
		e := lineEncoders.Get().(*lineEncoder)
		e.begin(h.log.Name(), end)
		c.logFields(e, status, end)
		e.b = append(e.b, "}\n"...)
		h.accessOut.Write(e.b) // as zap does, a line that cannot be written is dropped
		if cap(e.b) <= 16<<10 {
			lineEncoders.Put(e)
		}
		return
	}
	ce := h.log.Check(zapcore.InfoLevel, "request")
	if ce == nil {
		return
	}
	ce.Time = end
	z := zapFields{f: make([]zap.Field, 0, 20)}
	c.logFields(&z, status, end)
	ce.Write(z.f...)
}

// zapFields collects a line's fields for zap.
type zapFields struct{ f []zap.Field }

func (z *zapFields) str(k, v string)               { z.f = append(z.f, zap.String(k, v)) }
func (z *zapFields) bytes(k string, v []byte)      { z.f = append(z.f, zap.ByteString(k, v)) }
func (z *zapFields) int(k string, v int)           { z.f = append(z.f, zap.Int(k, v)) }
func (z *zapFields) dur(k string, d time.Duration) { z.f = append(z.f, zap.Duration(k, d)) }
func (z *zapFields) flag(k string)                 { z.f = append(z.f, zap.Bool(k, true)) }

// lineEncoder writes a line as zap's JSON encoder does with LogEncoderConfig: keys level, ts,
// logger, msg, then the fields; durations in seconds; strings escaped the same way (quotes,
// backslashes and control bytes escaped, invalid UTF-8 replaced by \ufffd).
type lineEncoder struct{ b []byte }

var lineEncoders = sync.Pool{New: func() any { return &lineEncoder{b: make([]byte, 0, 1024)} }}

func (e *lineEncoder) begin(logger string, t time.Time) {
	e.b = append(e.b[:0], `{"level":"info","ts":"`...)
	e.b = appendISO8601(e.b, t)
	e.b = append(e.b, '"')
	if logger != "" {
		e.b = append(e.b, `,"logger":`...)
		e.b = appendJSONString(e.b, logger, utf8.DecodeRuneInString)
	}
	e.b = append(e.b, `,"msg":"request"`...)
}

func (e *lineEncoder) key(k string) {
	e.b = append(e.b, ',', '"')
	e.b = append(e.b, k...)
	e.b = append(e.b, '"', ':')
}

func (e *lineEncoder) str(k, v string) {
	e.key(k)
	e.b = appendJSONString(e.b, v, utf8.DecodeRuneInString)
}

func (e *lineEncoder) bytes(k string, v []byte) {
	e.key(k)
	e.b = appendJSONString(e.b, v, utf8.DecodeRune)
}

func (e *lineEncoder) int(k string, v int) {
	e.key(k)
	e.b = strconv.AppendInt(e.b, int64(v), 10)
}

func (e *lineEncoder) dur(k string, d time.Duration) {
	e.key(k)
	e.b = appendSeconds(e.b, d)
}

// appendSeconds appends d in seconds as zap does, strconv.AppendFloat(b, float64(d)/1e9, 'f',
// -1, 64), at a fraction of its cost. Below 10^15 ns (11 days) d/1e9 has at most 15
// significant digits, and distinct decimals of at most 15 digits are distinct float64s, so
// the shortest decimal that reads back as the (correctly rounded) quotient is d/1e9's own:
// d's digits, with the point and no trailing zeros.
func appendSeconds(b []byte, d time.Duration) []byte {
	if d <= -1e15 || d >= 1e15 {
		return strconv.AppendFloat(b, float64(d)/float64(time.Second), 'f', -1, 64)
	}
	if d < 0 {
		b, d = append(b, '-'), -d
	}
	b = strconv.AppendInt(b, int64(d/time.Second), 10)
	ns := int64(d % time.Second)
	if ns == 0 {
		return b
	}
	var frac [9]byte
	for i := len(frac) - 1; i >= 0; i-- {
		frac[i], ns = byte('0'+ns%10), ns/10
	}
	n := len(frac)
	for frac[n-1] == '0' {
		n--
	}
	return append(append(b, '.'), frac[:n]...)
}

func (e *lineEncoder) flag(k string) {
	e.key(k)
	e.b = append(e.b, "true"...)
}

const hexDigits = "0123456789abcdef"

// plainJSON marks the bytes a JSON string holds as they are: printable ASCII but the quote and
// the backslash.
var plainJSON = func() (t [256]bool) {
	for c := 0x20; c < utf8.RuneSelf; c++ {
		t[c] = c != '"' && c != '\\'
	}
	return t
}()

// plainWord reports whether all eight bytes of w are plainJSON ones: none from 0x80, none below
// 0x20, no quote, no backslash. (x - n…) &^ x has a byte's high bit set if x has a byte below n
// (n ≤ 0x80), and has none set otherwise; a zero byte of x ^ c is a byte c of x.
func plainWord(w uint64) bool {
	const ones, highs = 0x0101010101010101, 0x8080808080808080
	quote, backslash := w^'"'*ones, w^'\\'*ones
	return (w|(w-0x20*ones)&^w|(quote-ones)&^quote|(backslash-ones)&^backslash)&highs == 0
}

// appendJSONString appends s quoted as zap quotes a string; decode is utf8.DecodeRuneInString
// or utf8.DecodeRune.
func appendJSONString[S string | []byte](b []byte, s S, decode func(S) (rune, int)) []byte {
	b = append(b, '"')
	last := 0
	for i := 0; i < len(s); {
		for i+8 <= len(s) { // the common case, eight bytes at a time
			w := uint64(s[i]) | uint64(s[i+1])<<8 | uint64(s[i+2])<<16 | uint64(s[i+3])<<24 |
				uint64(s[i+4])<<32 | uint64(s[i+5])<<40 | uint64(s[i+6])<<48 | uint64(s[i+7])<<56
			if !plainWord(w) {
				break
			}
			i += 8
		}
		for i < len(s) && plainJSON[s[i]] {
			i++
		}
		if i == len(s) {
			break
		}
		c := s[i]
		if c >= utf8.RuneSelf {
			if r, size := decode(s[i:]); r != utf8.RuneError || size != 1 {
				i += size
				continue
			}
			b = append(b, s[last:i]...)
			b = append(b, `\ufffd`...)
			i++
			last = i
			continue
		}
		if c >= 0x20 && c != '\\' && c != '"' {
			i++
			continue
		}
		b = append(b, s[last:i]...)
		switch c {
		case '\\', '"':
			b = append(b, '\\', c)
		case '\n':
			b = append(b, '\\', 'n')
		case '\r':
			b = append(b, '\\', 'r')
		case '\t':
			b = append(b, '\\', 't')
		default:
			b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xF])
		}
		i++
		last = i
	}
	b = append(b, s[last:]...)
	return append(b, '"')
}

// iso8601Layout is zapcore.ISO8601TimeEncoder's layout.
const iso8601Layout = "2006-01-02T15:04:05.000Z0700"

// stamp is one second's ISO 8601 text: lines within the same second share it, and only the
// milliseconds are written per line.
type stamp struct {
	sec          int64
	loc          *time.Location
	date, offset string // "2006-01-02T15:04:05" and the zone offset ("Z" or "+0100")
}

var lastStamp atomic.Pointer[stamp]

// appendISO8601 appends t (in its location) as zapcore.ISO8601TimeEncoder does.
func appendISO8601(b []byte, t time.Time) []byte {
	s := lastStamp.Load()
	if s == nil || s.sec != t.Unix() || s.loc != t.Location() {
		full := t.Truncate(time.Second).Format(iso8601Layout)
		date, offset, _ := strings.Cut(full, ".000")
		s = &stamp{sec: t.Unix(), loc: t.Location(), date: date, offset: offset}
		lastStamp.Store(s)
	}
	ms := t.Nanosecond() / int(time.Millisecond)
	b = append(b, s.date...)
	b = append(b, '.', byte('0'+ms/100), byte('0'+ms/10%10), byte('0'+ms%10))
	return append(b, s.offset...)
}
