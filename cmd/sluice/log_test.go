package main

import (
	"encoding/json"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"
)

// A JSON log line's time is RFC 3339 (UTC, milliseconds), not an epoch.
func TestLogTimeRFC3339(t *testing.T) {
	cfg, err := logConfig("json")
	if err != nil {
		t.Fatal(err)
	}
	at := time.Date(2026, 11, 24, 0, 20, 54, 169e6, time.FixedZone("x", 3600))
	buf, err := zapcore.NewJSONEncoder(cfg.EncoderConfig).EncodeEntry(zapcore.Entry{Time: at, Message: "m"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(buf.Bytes(), &m); err != nil {
		t.Fatalf("%s: %v", buf, err)
	}
	ts, _ := m[cfg.EncoderConfig.TimeKey].(string)
	if ts != "2026-11-23T23:20:54.169Z" {
		t.Fatalf("time %v in %s, want 2026-11-23T23:20:54.169Z", m[cfg.EncoderConfig.TimeKey], buf)
	}
	if p, err := time.Parse(time.RFC3339, ts); err != nil || !p.Equal(at) {
		t.Fatalf("%q: %v, %v", ts, p, err)
	}
	if _, err := logConfig("yaml"); err == nil {
		t.Fatal("log format yaml accepted")
	}
}
