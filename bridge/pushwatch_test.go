package bridge

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database/dbtest"
	"go.ferry.im/ferry/internal/fakehs"
)

// TestPushWatchPingsOnlyWhenPushesLookHeld: the watch pings when an event ferry sent has not come back after
// pushOverdue, when ferry answered a transaction with an error, and after pushQuiet without any transaction;
// pings that bring nothing back are spaced out; an echo, or any transaction, ends it.
func TestPushWatchPingsOnlyWhenPushesLookHeld(t *testing.T) {
	var w pushWatch
	t0 := time.Unix(1000, 0)
	at := func(d time.Duration) time.Time { return t0.Add(d) }
	check := func(d time.Duration, want bool) {
		t.Helper()
		if got := w.shouldPing(at(d)); got != want {
			t.Fatalf("at +%v: ping = %v, want %v", d, got, want)
		}
	}
	check(0, false)
	w.sent("$a", at(0))
	check(500*time.Millisecond, false)
	w.pushed(at(600*time.Millisecond), []id.EventID{"$other", "$a"})
	check(3*time.Second, false) // it came back

	// $b does not come back: pings at +1 s, then spaced 1 s, 2 s, 4 s.
	w.sent("$b", at(10*time.Second))
	check(10*time.Second+900*time.Millisecond, false)
	check(11*time.Second, true)
	check(11*time.Second+500*time.Millisecond, false)
	check(12*time.Second, true)
	check(13*time.Second+900*time.Millisecond, false)
	check(14*time.Second, true)
	check(17*time.Second, false)
	check(18*time.Second, true)
	// A transaction without $b: the homeserver pushes again, and $b (sent long before) is not waited for.
	w.pushed(at(19*time.Second), nil)
	check(25*time.Second, false)

	// ferry answered a transaction with an error.
	w.due(at(30 * time.Second))
	check(30*time.Second+500*time.Millisecond, false)
	check(31*time.Second, true)
	w.pushed(at(32*time.Second), nil)

	// Quiet: no transaction for pushQuiet.
	check(32*time.Second+pushQuiet-time.Millisecond, false)
	check(32*time.Second+pushQuiet, true)
	check(32*time.Second+pushQuiet+time.Second, false)
	check(32*time.Second+2*pushQuiet, true)
}

// heldPushFixture is a relay fixture whose fake homeserver pushes to ferry's router like Synapse: its own
// events come back as pushes, and after a failed transaction it holds everything for 10 minutes unless a ping
// reaches ferry. failNext makes the next transaction attempt fail on the way.
func heldPushFixture(t *testing.T) (*relayFixture, *atomic.Bool) {
	t.Helper()
	failNext := new(atomic.Bool)
	f := newRelayFixtureOn(t, &sealCrypto{benchCrypto{plaintext: benchMessage()}}, dbtest.Postgres(t), func(o *fakehs.Options) {
		o.NoEcho = false
		o.HoldAfterFailure = 10 * time.Minute
		o.FailTransaction = func(string, int) bool { return failNext.CompareAndSwap(true, false) }
	})
	f.br.AS.SpecVersions = &mautrix.RespVersions{Versions: []mautrix.SpecVersion{mautrix.SpecV17}}
	srv := httptest.NewServer(f.br.Router(nil))
	t.Cleanup(srv.Close)
	f.hs.SetAppserviceURL(srv.URL)
	if err := f.br.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.br.Stop)
	return f, failNext
}

// TestHeldPushesResumeAfterFerrysOwnEventIsLate: a transaction carrying the echo of ferry's copy fails on the
// way (ferry never sees it), and the homeserver holds everything after it. The echo is late, so ferry pings;
// the next message crosses at once instead of after the homeserver's 10-minute hold.
func TestHeldPushesResumeAfterFerrysOwnEventIsLate(t *testing.T) {
	f, failNext := heldPushFixture(t)
	ghost := f.br.Ghosts.Ghost(f.alice)
	var armed atomic.Bool
	f.hs.OnSend = func(e fakehs.SentEvent) {
		if e.Sender == ghost && e.RoomID == f.roomB && armed.CompareAndSwap(false, true) {
			failNext.Store(true) // the transaction with this copy's echo fails
		}
	}
	f.hs.Deliver([]id.EventID{"$held1"}, []json.RawMessage{encryptedEvent("$held1", f.roomA, f.alice)})
	waitFor(t, "the first copy", func() bool { return f.copiesIn(f.roomB, ghost) == 1 })
	f.hs.Deliver([]id.EventID{"$held2"}, []json.RawMessage{encryptedEvent("$held2", f.roomA, f.alice)})
	waitFor(t, "the second copy, before the homeserver's own retry", func() bool { return f.copiesIn(f.roomB, ghost) == 2 })
	if f.hs.AppserviceFailures() == 0 || f.hs.AppservicePings() == 0 {
		t.Fatalf("failed transactions %d, pings %d: the test did not hold pushes", f.hs.AppserviceFailures(), f.hs.AppservicePings())
	}
}

// TestHeldPushesResumeWhenQuiet: a transaction fails on the way while ferry sends nothing; after pushQuiet
// without a transaction ferry pings, and the held message crosses.
func TestHeldPushesResumeWhenQuiet(t *testing.T) {
	// Restored after the fixture's bridge has stopped (cleanups run last first): its watch reads pushQuiet.
	old := pushQuiet
	t.Cleanup(func() { pushQuiet = old })
	pushQuiet = 2 * time.Second
	f, failNext := heldPushFixture(t)
	ghost := f.br.Ghosts.Ghost(f.alice)
	failNext.Store(true)
	f.hs.Deliver([]id.EventID{"$quiet1"}, []json.RawMessage{encryptedEvent("$quiet1", f.roomA, f.alice)})
	waitFor(t, "the copy, before the homeserver's own retry", func() bool { return f.copiesIn(f.roomB, ghost) == 1 })
	if f.hs.AppserviceFailures() == 0 || f.hs.AppservicePings() == 0 {
		t.Fatalf("failed transactions %d, pings %d: the test did not hold pushes", f.hs.AppserviceFailures(), f.hs.AppservicePings())
	}
}

// TestSendWatcherReadsAnswersOnlyWhenOn: where the homeserver has no ping (the watch off) the answers of sends
// are left alone; with the watch on, an accepted event is awaited as a push and the caller still reads the answer.
func TestSendWatcherReadsAnswersOnlyWhenOn(t *testing.T) {
	var w pushWatch
	client := &http.Client{Transport: roundTripFunc(func(*http.Request) (*http.Response, error) {
		return &http.Response{StatusCode: http.StatusOK, Body: io.NopCloser(strings.NewReader(`{"event_id":"$copy"}`))}, nil
	})}
	w.watchSends(client)
	send := func() string {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPut, "http://hs/_matrix/client/v3/rooms/!r/send/m.room.message/t1", nil)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		return string(body)
	}
	if body := send(); body != `{"event_id":"$copy"}` || len(w.awaited) != 0 {
		t.Fatalf("off: answer %q, awaited %v", body, w.awaited)
	}
	w.on.Store(true)
	if body := send(); body != `{"event_id":"$copy"}` || len(w.awaited) != 1 {
		t.Fatalf("on: answer %q, awaited %v", body, w.awaited)
	}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
