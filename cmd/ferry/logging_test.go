package main

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
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
