package bridge

import (
	"context"
	"net/http"
	"sync"
	"time"

	"github.com/rs/zerolog"
)

// Outages of the homeserver. A single failed request (a reset connection, one gateway error) says little; a run
// of them with no success in between, lasting outageMin, means the homeserver went away: it restarted, or
// everything in front of it failed. Sends in flight then may have been posted, and a homeserver that restarted
// has forgotten the transaction IDs it remembered, so ferry treats an outage like its own crash: the rooms with
// pending events are read back before the next send into them, and read-backs wait until the homeserver has
// answered for settleAfterOutage (a homeserver that restarted may still be posting events it had accepted). After
// ferry's own unclean stop they wait as long from the start (settleFrom).
const (
	outageMin         = time.Second
	outageFailures    = 2
	settleAfterOutage = 3 * time.Second
)

// hsHealth watches every request ferry makes to the homeserver (it wraps the appservice's HTTP transport): its
// outages, and how far its clock is from ferry's.
type hsHealth struct {
	next      http.RoundTripper
	recovered func(outageStart time.Time)
	log       zerolog.Logger

	// guards the following fields
	lock        sync.Mutex
	streakStart time.Time // first failure since the last success (zero: the last request succeeded)
	streak      int
	recoveredAt time.Time // when the homeserver answered again after the last outage
	skew        time.Duration
}

// Clock lag of the read-back. Events carry the homeserver's clock (origin_server_ts) and ferry compares them with
// its own: the read-back looks that much further back than ferry's clock says, more when the homeserver's Date
// headers show its clock off by more (capped).
const (
	clockLagMargin = 10 * time.Second
	maxClockSkew   = 10 * time.Minute
)

// clockLag is how much earlier than ferry's own clock says the read-back starts looking.
func (h *hsHealth) clockLag() time.Duration {
	if h == nil {
		return clockLagMargin + maxClockSkew
	}
	h.lock.Lock()
	defer h.lock.Unlock()
	return clockLagMargin + h.skew
}

// noteClock records how far the homeserver's clock (its Date header, whole seconds) is from ferry's.
func (h *hsHealth) noteClock(req *http.Request, resp *http.Response, sent, received time.Time) {
	date, err := http.ParseTime(resp.Header.Get("Date"))
	if err != nil {
		return
	}
	// The header was written between sent and received and rounded down to the second.
	var off time.Duration
	if date.Before(sent.Add(-time.Second)) {
		off = sent.Add(-time.Second).Sub(date)
	} else if date.After(received) {
		off = date.Sub(received)
	}
	off = min(off, maxClockSkew)
	h.lock.Lock()
	grew := off > h.skew
	h.skew = max(h.skew, off)
	h.lock.Unlock()
	if grew {
		h.log.Debug().Dur("off", off).Str("date", resp.Header.Get("Date")).Time("sent", sent).
			Time("received", received).Str("method", req.Method).Str("path", req.URL.Path).Int("status", resp.StatusCode).
			Msg("The homeserver's clock looks off from ferry's; read-backs look that much further back")
	}
}

// watchHomeserver wraps client's transport; recovered is called (in its own goroutine) when the homeserver
// answers again after an outage.
func watchHomeserver(client *http.Client, log zerolog.Logger, recovered func(outageStart time.Time)) *hsHealth {
	next := client.Transport
	if next == nil {
		next = http.DefaultTransport
	}
	h := &hsHealth{next: next, recovered: recovered, log: log}
	client.Transport = h
	return h
}

func (h *hsHealth) RoundTrip(req *http.Request) (*http.Response, error) {
	sent := time.Now()
	resp, err := h.next.RoundTrip(req)
	if req.Context().Err() != nil {
		return resp, err // the caller gave up: says nothing about the homeserver
	}
	if resp != nil {
		h.noteClock(req, resp, sent, time.Now())
	}
	failed := err != nil
	if resp != nil {
		switch resp.StatusCode {
		case http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
			failed = true
		}
	}
	h.observe(failed, time.Now())
	return resp, err
}

func (h *hsHealth) observe(failed bool, now time.Time) {
	h.lock.Lock()
	if failed {
		if h.streakStart.IsZero() {
			h.streakStart = now
		}
		h.streak++
		h.lock.Unlock()
		return
	}
	start, n := h.streakStart, h.streak
	h.streakStart, h.streak = time.Time{}, 0
	outage := !start.IsZero() && n >= outageFailures && now.Sub(start) >= outageMin
	if outage {
		h.recoveredAt = now
	}
	h.lock.Unlock()
	if outage && h.recovered != nil {
		go h.recovered(start)
	}
}

// waitSettled waits until the homeserver has answered for settleAfterOutage since its last outage. It returns
// false when ctx ended first.
func (h *hsHealth) waitSettled(ctx context.Context) bool {
	if h == nil {
		return true
	}
	for {
		h.lock.Lock()
		wait := time.Until(h.recoveredAt.Add(settleAfterOutage))
		h.lock.Unlock()
		if wait <= 0 {
			return true
		}
		if !sleep(ctx, wait) {
			return false
		}
	}
}

// settleFrom makes read-backs wait until settleAfterOutage after t, as after an outage that ended at t. ferry's
// own unclean stop calls for it: sends the dead run left on their way (held by a proxy in front of the homeserver,
// or in a socket's buffer) may still reach the homeserver after the next run has started.
func (h *hsHealth) settleFrom(t time.Time) {
	if h == nil {
		return
	}
	h.lock.Lock()
	defer h.lock.Unlock()
	if t.After(h.recoveredAt) {
		h.recoveredAt = t
	}
}

// recoveredSince tells whether the homeserver came back from an outage at or after t.
func (h *hsHealth) recoveredSince(t time.Time) bool {
	if h == nil {
		return false
	}
	h.lock.Lock()
	defer h.lock.Unlock()
	return !h.recoveredAt.Before(t)
}

// homeserverRecovered treats an outage of the homeserver like a crash of ferry (see hsHealth).
func (b *Bridge) homeserverRecovered(outageStart time.Time) {
	// The homeserver's pushes to ferry likely failed during the outage too.
	b.pushes.due(time.Now())
	b.workersLock.Lock()
	ctx := b.workerCtx
	b.workersLock.Unlock()
	if ctx == nil || ctx.Err() != nil {
		// Not relaying yet (start-up retries): an unclean start marks the rooms itself, a clean one had nothing
		// in flight.
		return
	}
	ctx = b.Log.WithContext(ctx)
	// Requests that began up to a minute before the outage may still have been in flight.
	n, err := b.markInFlight(ctx, outageStart.Add(-time.Minute))
	if err != nil {
		b.Log.Warn().Err(err).Msg("Failed to mark the rooms to read back after an outage of the homeserver")
	}
	b.Log.Warn().Time("outage_start", outageStart).Int("rooms", n).
		Msg("The homeserver answers again after an outage: rooms with pending events are read back before ferry sends into them")
}
