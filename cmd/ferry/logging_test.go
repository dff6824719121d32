package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rs/zerolog"
	"go.mau.fi/zeroconfig"
	"maunium.net/go/mautrix"

	"go.ferry.im/ferry/internal/config"
)

func TestStripRequestBody(t *testing.T) {
	for name, tc := range map[string]struct{ in, want string }{
		"a request with a body":    {`{"level":"debug","method":"PUT","req_body":{"msgtype":"m.text","body":"secret words"},"message":"Request completed"}`, `{"level":"debug","method":"PUT","message":"Request completed"}`},
		"a body logged as text":    {`{"level":"error","req_body":"<sensitive content omitted>","message":"Request failed"}`, `{"level":"error","message":"Request failed"}`},
		"no body":                  {`{"level":"info","message":"Relayed event"}`, `{"level":"info","message":"Relayed event"}`},
		"the word only in a value": {`{"level":"info","note":"\"req_body\" is stripped","message":"x"}`, `{"level":"info","note":"\"req_body\" is stripped","message":"x"}`},
	} {
		t.Run(name, func(t *testing.T) {
			if got := string(stripRequestBody([]byte(tc.in))); got != tc.want {
				t.Fatalf("got  %s\nwant %s", got, tc.want)
			}
		})
	}
}

// TestLoggerDropsRequestBodies: a mautrix request logged through ferry's logger, the way mautrix's client logs
// it, reaches neither the console nor the log file with its body.
func TestLoggerDropsRequestBodies(t *testing.T) {
	var console, file bytes.Buffer
	log := zerolog.New(bodylessWriter{out: zerolog.MultiLevelWriter(&console, &file)}).Level(zerolog.DebugLevel)
	log.Debug().RawJSON("req_body", []byte(`{"body":"secret words"}`)).Str("method", "PUT").Msg("Request completed")
	log.Error().Err(errors.Join(mautrix.MForbidden)).Str("req_body", "secret words").Msg("Request failed")
	for name, out := range map[string]string{"console": console.String(), "file": file.String()} {
		if strings.Contains(out, "secret words") || !strings.Contains(out, "Request completed") || !strings.Contains(out, "Request failed") {
			t.Errorf("%s: %s", name, out)
		}
	}
}

// TestLogWriters: standard output and the file each get their own format, and the file is reopened on demand
// (SIGHUP) whether or not another tool moved it away first.
func TestLogWriters(t *testing.T) {
	var stdout bytes.Buffer
	zeroconfig.Stdout = &stdout
	t.Cleanup(func() { zeroconfig.Stdout = os.Stdout })
	dir := t.TempDir()
	path := filepath.Join(dir, "ferry.log")
	cfg := config.Default().Logging
	cfg.File.Path = path
	log, files, err := newLogger(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer files.Close()
	log.Info().Str("n", "one").Msg("First line")
	log.Debug().Msg("Below the level")
	if got := stdout.String(); !strings.Contains(got, "INF First line n=one") || strings.Contains(got, "Below") {
		t.Errorf("stdout (pretty) = %q", got)
	}
	var line map[string]any
	if err = json.Unmarshal([]byte(readLog(t, path)), &line); err != nil || line["message"] != "First line" {
		t.Fatalf("file (json) = %q: %v", readLog(t, path), err)
	}

	// Moved away by another tool: ferry writes a new file at the path.
	if err = os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	if err = files.Reopen(); err != nil {
		t.Fatal(err)
	}
	log.Info().Msg("Second line")
	if got := readLog(t, path); !strings.Contains(got, "Second line") || strings.Contains(got, "First line") {
		t.Errorf("new file = %q", got)
	}
	if got := readLog(t, path+".1"); strings.Contains(got, "Second line") {
		t.Errorf("the moved file got the line written after reopening: %q", got)
	}

	// Still in place: ferry rotates it itself, keeping a backup.
	if err = files.Reopen(); err != nil {
		t.Fatal(err)
	}
	log.Info().Msg("Third line")
	if got := readLog(t, path); !strings.Contains(got, "Third line") || strings.Contains(got, "Second line") {
		t.Errorf("file after rotation = %q", got)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 3 {
		t.Errorf("files %v, want ferry.log, the moved one and one backup", entries)
	}
	if info, _ := os.Stat(path); info.Mode().Perm() != 0o600 {
		t.Errorf("log file mode %o", info.Mode().Perm())
	}
}

func TestLogFileUnwritable(t *testing.T) {
	cfg := config.Default().Logging
	cfg.File.Path = filepath.Join(t.TempDir(), "file", "in", "a", "file")
	if err := os.WriteFile(filepath.Dir(filepath.Dir(filepath.Dir(cfg.File.Path))), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := newLogger(cfg); err == nil || !strings.Contains(err.Error(), "logging.file.path") {
		t.Fatalf("err = %v, want one naming logging.file.path", err)
	}
}

func readLog(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}
