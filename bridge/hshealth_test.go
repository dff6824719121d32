package bridge

import (
	"bytes"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// TestClockLagFollowsHomeserverClock: the read-back looks back further when the homeserver's Date headers show
// its clock behind ferry's (its events then carry earlier timestamps than ferry's clock would say).
func TestClockLagFollowsHomeserverClock(t *testing.T) {
	var logged bytes.Buffer
	h := &hsHealth{log: zerolog.New(&logged)}
	if lag := h.clockLag(); lag != clockLagMargin {
		t.Fatalf("lag %v before any answer, want %v", lag, clockLagMargin)
	}
	now := time.Now()
	for _, off := range []time.Duration{0, -30 * time.Second, 5 * time.Second} {
		resp := &http.Response{Header: http.Header{"Date": {now.Add(off).UTC().Format(http.TimeFormat)}}}
		req, _ := http.NewRequest(http.MethodGet, "http://hs/_matrix/client/v3/sync", nil)
		h.noteClock(req, resp, now, now)
	}
	if lag := h.clockLag(); lag < clockLagMargin+28*time.Second || lag > clockLagMargin+31*time.Second {
		t.Fatalf("lag %v with the homeserver's clock 30 s behind, want about %v", lag, clockLagMargin+30*time.Second)
	}
	// The estimate grew once (to 30 s): one line says so, naming the request.
	if n := strings.Count(logged.String(), "clock looks off"); n != 1 || !strings.Contains(logged.String(), "/_matrix/client/v3/sync") {
		t.Fatalf("%d lines about the clock, want 1 naming the request: %s", n, logged.String())
	}
}

// TestOutageNeedsARunOfFailures: single failed requests between successes are no outage; a run of failures
// lasting outageMin is, and it ends with the next success.
func TestOutageNeedsARunOfFailures(t *testing.T) {
	h := &hsHealth{}
	t0 := time.Now()
	h.observe(true, t0)
	h.observe(false, t0.Add(100*time.Millisecond))
	h.observe(true, t0.Add(2*time.Second))
	h.observe(false, t0.Add(2100*time.Millisecond))
	if h.recoveredSince(t0) {
		t.Fatal("isolated failures counted as an outage")
	}
	h.observe(true, t0.Add(3*time.Second))
	h.observe(true, t0.Add(4500*time.Millisecond))
	h.observe(false, t0.Add(5*time.Second))
	if !h.recoveredSince(t0.Add(5 * time.Second)) {
		t.Fatal("a run of failures lasting 1.5 s was no outage")
	}
}
