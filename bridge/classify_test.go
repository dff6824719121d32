package bridge

import (
	"context"
	"database/sql/driver"
	"errors"
	"fmt"
	"net/http"
	"syscall"
	"testing"
	"time"

	"github.com/lib/pq"
	"maunium.net/go/mautrix"

	"go.ferry.im/ferry/database"
)

func httpErr(status int, errcode string, extra map[string]any) error {
	return mautrix.HTTPError{
		Response:  &http.Response{StatusCode: status},
		RespError: &mautrix.RespError{ErrCode: errcode, Err: "test", ExtraData: extra, StatusCode: status},
	}
}

func httpErrHeader(status int, errcode, retryAfter string, extra map[string]any) error {
	err := httpErr(status, errcode, extra).(mautrix.HTTPError)
	err.Response.Header = http.Header{"Retry-After": []string{retryAfter}}
	return err
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
		{"rate limited with a Retry-After header", httpErrHeader(429, "M_LIMIT_EXCEEDED", "3", map[string]any{"retry_after_ms": float64(2500)}), false, 3 * time.Second},
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

// TestTransient pins which failures ferry waits out (start-up, the read-back, decryption and state) and which
// are definite.
func TestTransient(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want bool
	}{
		{"rate limited", httpErr(429, "M_LIMIT_EXCEEDED", nil), true},
		{"server error", httpErr(500, "M_UNKNOWN", nil), true},
		{"gateway timeout", httpErr(504, "", nil), true},
		{"no answer", mautrix.HTTPError{Message: "request error", WrappedError: syscall.ECONNRESET}, true},
		{"connection refused", fmt.Errorf("dial: %w", syscall.ECONNREFUSED), true},
		{"request timeout", fmt.Errorf("get: %w", context.DeadlineExceeded), true},
		{"database restarting", fmt.Errorf("failed to get group session: %w", &pq.Error{Code: "57P01"}), true},
		{"database starting", &pq.Error{Code: "57P03"}, true},
		{"database connection lost", fmt.Errorf("query: %w", driver.ErrBadConn), true},
		{"unknown token", httpErr(401, "M_UNKNOWN_TOKEN", nil), false},
		{"forbidden", httpErr(403, "M_FORBIDDEN", nil), false},
		{"unique violation", &pq.Error{Code: "23505"}, false},
		{"stopping", context.Canceled, false},
		{"bad data", errors.New("stored event is not valid JSON"), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Transient(tc.err); got != tc.want {
				t.Fatalf("Transient(%v) = %v, want %v", tc.err, got, tc.want)
			}
		})
	}
}
