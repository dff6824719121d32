package bridge

// Held pushes. A homeserver that failed to deliver a transaction stops pushing: Synapse counts the appservice
// as down and retries only after 2 s, then 4, 8 … up to 8.5 min while its retries keep failing, holding every
// event (and dropping to-device messages) meanwhile. The failure may be one ferry never saw (a proxy in between
// answered 502, a connection reset before ferry read the request), so ferry watches for its signs and pings the
// homeserver (MSC2659), which makes Synapse retry at once when the ping reaches ferry:
//   - ferry's own events come back to it as pushes (the homeserver pushes every event of the appservice's
//     users), so an event ferry sent pushOverdue ago that has not come back means pushes are held;
//   - ferry answered a transaction with an error;
//   - no transaction came for pushQuiet (an idle bridge pings that rarely; a held one resumes within that time);
//   - the homeserver answers again after an outage (its pushes to ferry likely failed meanwhile).
// Pings that bring no transaction back are spaced out, doubling up to pushQuiet. Homeservers without the ping
// (Dendrite 0.13.8) retry on their own schedule, and the watch stays off.

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/id"
)

// Timing of the watch (variables for tests).
var (
	pushOverdue = time.Second // a send's echo is overdue after this
	pushQuiet   = time.Minute // ping when no transaction came for this long
	pushTick    = 250 * time.Millisecond
	pingSpacing = time.Second // first wait between pings that bring nothing back; doubles up to pushQuiet
	maxAwaited  = 1000        // own events awaited at most (the oldest are forgotten)
)

// pushWatch tracks the signs that the homeserver holds its pushes back.
type pushWatch struct {
	// on: the homeserver offers the ping, and the watch runs (Bridge.Start). Off, it records nothing: the
	// answers of sends are not read and transactions are not looked into.
	on atomic.Bool

	// guards the following fields
	lock     sync.Mutex
	lastPush time.Time                // the last transaction that came in
	expect   time.Time                // first sign since lastPush that a push is due, other than awaited events (zero: none)
	awaited  map[id.EventID]time.Time // ferry's own events not pushed back yet, with when they were sent
	lastPing time.Time
	spacing  time.Duration // wait before the next ping while pings bring nothing back
}

// pushed records a transaction that ferry answered with success, and the events in it.
func (w *pushWatch) pushed(now time.Time, events []id.EventID) {
	w.lock.Lock()
	w.lastPush = now
	w.expect = time.Time{}
	w.spacing = 0
	for _, e := range events {
		delete(w.awaited, e)
	}
	// The homeserver pushes in its own order: an event of ferry's sent well before this transaction and not in
	// it or an earlier one is not coming (or comes in the recovery that is running): it must not keep the watch
	// pinging.
	for e, t := range w.awaited {
		if now.Sub(t) >= pushOverdue {
			delete(w.awaited, e)
		}
	}
	w.lock.Unlock()
}

// sent records an event the homeserver accepted from ferry: it is due to come back as a push.
func (w *pushWatch) sent(evtID id.EventID, now time.Time) {
	w.lock.Lock()
	defer w.lock.Unlock()
	if w.awaited == nil {
		w.awaited = make(map[id.EventID]time.Time)
	}
	if len(w.awaited) >= maxAwaited {
		// Events the homeserver never pushes back must not pile up: forget the oldest.
		var oldest id.EventID
		var at time.Time
		for e, t := range w.awaited {
			if oldest == "" || t.Before(at) {
				oldest, at = e, t
			}
		}
		delete(w.awaited, oldest)
	}
	w.awaited[evtID] = now
}

// due records another sign that the homeserver has something to push (ferry answered a transaction with an
// error, or the homeserver is back after an outage).
func (w *pushWatch) due(now time.Time) {
	w.lock.Lock()
	if w.expect.IsZero() {
		w.expect = now
	}
	w.lock.Unlock()
}

// shouldPing tells whether to ping at now, and records the ping if so.
func (w *pushWatch) shouldPing(now time.Time) bool {
	w.lock.Lock()
	defer w.lock.Unlock()
	if w.lastPush.IsZero() {
		w.lastPush = now // the start counts as a push: ferry pinged the homeserver while starting
	}
	held := !w.expect.IsZero() && now.Sub(w.expect) >= pushOverdue
	for _, t := range w.awaited {
		if held {
			break
		}
		held = now.Sub(t) >= pushOverdue
	}
	quiet := now.Sub(w.lastPush) >= pushQuiet && now.Sub(w.lastPing) >= pushQuiet
	if !quiet && (!held || now.Sub(w.lastPing) < w.spacing) {
		return false
	}
	w.lastPing = now
	if w.spacing == 0 {
		w.spacing = pingSpacing
	} else {
		w.spacing = min(w.spacing*2, pushQuiet)
	}
	return true
}

// watchSends wraps client's transport so that each event the homeserver accepted from ferry (a send, a state
// event, a redaction) is awaited as a push.
func (w *pushWatch) watchSends(client *http.Client) {
	next := client.Transport
	if next == nil {
		next = http.DefaultTransport
	}
	client.Transport = sendWatcher{next: next, w: w}
}

type sendWatcher struct {
	next http.RoundTripper
	w    *pushWatch
}

func (s sendWatcher) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := s.next.RoundTrip(req)
	if !s.w.on.Load() || err != nil || resp.StatusCode != http.StatusOK || req.Method != http.MethodPut || !createsEvent(req.URL.Path) {
		return resp, err
	}
	// The answer is small ({"event_id": …}): read it here, and hand the caller the same bytes.
	body, rerr := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	resp.Body = io.NopCloser(bytes.NewReader(body))
	if rerr != nil {
		resp.Body = io.NopCloser(io.MultiReader(bytes.NewReader(body), errReader{rerr}))
		return resp, nil
	}
	var answer struct {
		EventID id.EventID `json:"event_id"`
	}
	if json.Unmarshal(body, &answer) == nil && answer.EventID != "" {
		s.w.sent(answer.EventID, time.Now())
	}
	return resp, nil
}

// errReader fails every read with err (an answer whose body broke off stays broken for its reader).
type errReader struct{ err error }

func (e errReader) Read([]byte) (int, error) { return 0, e.err }

// createsEvent tells whether a PUT to path creates a room event.
func createsEvent(path string) bool {
	return strings.Contains(path, "/rooms/") &&
		(strings.Contains(path, "/send/") || strings.Contains(path, "/state/") || strings.Contains(path, "/redact/"))
}

// pushWatchLoop pings the homeserver when the watch says pushes are held, until ctx ends.
func (b *Bridge) pushWatchLoop(ctx context.Context) {
	log := zerolog.Ctx(ctx)
	t := time.NewTicker(pushTick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			if !b.pushes.shouldPing(now) {
				continue
			}
			pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			_, err := b.AS.BotIntent().AppservicePing(pctx, b.AS.Registration.ID, "")
			cancel()
			if err != nil && ctx.Err() == nil {
				log.Debug().Err(err).Msg("Ping for held pushes failed")
			} else {
				log.Debug().Msg("Pinged the homeserver: its pushes looked held")
			}
		}
	}
}
