package bridge

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strconv"
	"syscall"
	"time"

	"maunium.net/go/mautrix"

	"go.ferry.im/ferry/database"
)

// Transient tells whether an error from the homeserver or the database may pass on a later try: no answer
// (network errors, resets, timeouts), a rate limit, a server or gateway error, or a lost database connection.
// Everything else (the homeserver's 4xx, bad data, bad config) is definite. A cancelled context is neither: the
// caller is stopping.
func Transient(err error) bool {
	if err == nil || errors.Is(err, context.Canceled) {
		return false
	}
	var httpErr mautrix.HTTPError
	if errors.As(err, &httpErr) {
		if httpErr.Response == nil {
			return true // no answer: the request failed on the way (the wrapped error says how)
		}
		status := httpErr.Response.StatusCode
		return status == http.StatusTooManyRequests || status >= 500
	}
	var netErr net.Error
	return errors.Is(err, context.DeadlineExceeded) || errors.As(err, &netErr) || errors.Is(err, syscall.ECONNREFUSED) ||
		errors.Is(err, syscall.ECONNRESET) || database.Transient(err)
}

// RetryAfter returns how long a rate-limited request asked the client to wait: the Retry-After header (seconds or
// an HTTP date) when present, else the deprecated retry_after_ms of the body. ok is false when the error is not a
// rate limit or names no wait.
func RetryAfter(err error) (wait time.Duration, ok bool) {
	var httpErr mautrix.HTTPError
	if !errors.As(err, &httpErr) || httpErr.Response == nil || httpErr.Response.StatusCode != http.StatusTooManyRequests {
		return 0, false
	}
	if h := httpErr.Response.Header.Get("Retry-After"); h != "" {
		if secs, err := strconv.Atoi(h); err == nil && secs >= 0 {
			return time.Duration(secs) * time.Second, true
		}
		if at, err := http.ParseTime(h); err == nil {
			return max(time.Until(at), 0), true
		}
	}
	if httpErr.RespError != nil {
		if ms, ok := httpErr.RespError.ExtraData["retry_after_ms"].(float64); ok && ms > 0 {
			return time.Duration(ms) * time.Millisecond, true
		}
	}
	return 0, false
}

// maxRateLimitWait bounds what a rate limit may make ferry wait at once; a longer wait is taken in steps.
const maxRateLimitWait = 5 * time.Minute

// RetryWait is how long to wait before trying again after a transient err, given the caller's current backoff:
// what a rate limit asked for, else the backoff.
func RetryWait(err error, backoff time.Duration) time.Duration {
	if wait, ok := RetryAfter(err); ok {
		return min(wait, maxRateLimitWait)
	}
	return backoff
}
