package main

import (
	"bytes"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestDoctorClock: the homeserver's Date header is compared with the local time of the request, allowing for its
// one-second resolution and the round trip.
func TestDoctorClock(t *testing.T) {
	sent := time.Date(2026, 12, 4, 12, 0, 0, 400_000_000, time.UTC)
	received := sent.Add(20 * time.Millisecond)
	for name, tc := range map[string]struct {
		offset time.Duration
		want   string
	}{
		"same time":        {0, "ok    clock: within 1s"},
		"a second behind":  {-time.Second, "ok    clock: within 1s"},
		"ten seconds fast": {10 * time.Second, "warn  clock: ferry's clock is 10s off"},
		"two minutes slow": {-2 * time.Minute, "FAIL  clock: ferry's clock is -2m0s off"},
	} {
		t.Run(name, func(t *testing.T) {
			var out bytes.Buffer
			d := &doctor{out: &out}
			d.checkClock(sent.Add(tc.offset).Format(http.TimeFormat), sent, received)
			if !strings.HasPrefix(out.String(), tc.want) {
				t.Errorf("got %q, want it to start with %q", out.String(), tc.want)
			}
		})
	}
	var out bytes.Buffer
	(&doctor{out: &out}).checkClock("", sent, received)
	if !strings.HasPrefix(out.String(), "skip") {
		t.Errorf("without a Date header: %q", out.String())
	}
}
