package bridge

import (
	"errors"
	"net/http"
	"testing"
	"time"

	"maunium.net/go/mautrix"

	"go.ferry.im/ferry/database"
)

func httpErr(status int, errcode string, extra map[string]any) error {
	return mautrix.HTTPError{
		Response:  &http.Response{StatusCode: status},
		RespError: &mautrix.RespError{ErrCode: errcode, Err: "test", ExtraData: extra, StatusCode: status},
	}
}

// TestClassify pins how homeserver answers turn into retry decisions: a rate limit waits as long as the server
// asks, server and network errors retry with the worker's backoff, and other client errors are permanent (the
// source room is told once).
func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		name      string
		err       error
		permanent bool
		retryIn   time.Duration
	}{
		{"rate limited with retry_after_ms", httpErr(429, "M_LIMIT_EXCEEDED", map[string]any{"retry_after_ms": float64(2500)}), false, 2500 * time.Millisecond},
		{"rate limited without a hint", httpErr(429, "M_LIMIT_EXCEEDED", nil), false, time.Second},
		{"rate limited with a nonsense hint", httpErr(429, "M_LIMIT_EXCEEDED", map[string]any{"retry_after_ms": "soon"}), false, time.Second},
		{"forbidden", httpErr(403, "M_FORBIDDEN", nil), true, 0},
		{"too large", httpErr(413, "M_TOO_LARGE", nil), true, 0},
		{"bad gateway", httpErr(502, "", nil), false, 0},
		{"internal error", httpErr(500, "M_UNKNOWN", nil), false, 0},
		{"network error", errors.New("dial tcp 127.0.0.1:1: connect: connection refused"), false, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := classify(tc.err)
			if res.err == nil {
				t.Fatal("the error was lost")
			}
			if got := res.state == database.InboxFailed; got != tc.permanent {
				t.Fatalf("permanent = %v, want %v (state %q)", got, tc.permanent, res.state)
			}
			if !tc.permanent && res.state != "" {
				t.Fatalf("a retryable error got state %q", res.state)
			}
			if res.retryIn != tc.retryIn {
				t.Fatalf("retryIn = %v, want %v", res.retryIn, tc.retryIn)
			}
		})
	}
}
