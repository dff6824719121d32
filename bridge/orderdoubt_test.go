package bridge

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"go.ferry.im/ferry/database"
)

// TestPushedEventsWaitForSyncOnlyWhileOrderIsInDoubt: on a homeserver whose pushes may come out of order
// (SyncOrders), a pushed event waits for /sync to show its room's order after ferry's start, while a /sync fails
// and for orderDoubtWindow after it answers again, and after a redelivered event; otherwise it is relayed at once.
func TestPushedEventsWaitForSyncOnlyWhileOrderIsInDoubt(t *testing.T) {
	f := newRelayFixture(t)
	f.br.SyncOrders.Store(true)
	if err := f.br.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer f.br.Stop()
	pushedAt := func(at time.Time) *database.InboxEvent {
		return &database.InboxEvent{EventID: "$p", RoomID: f.roomA, ReceivedAt: at}
	}
	held := func(what string, at time.Time, want bool) {
		t.Helper()
		if got := f.br.orderHold(pushedAt(at), 0) > 0; got != want {
			t.Fatalf("%s: held = %v, want %v", what, got, want)
		}
	}
	now := time.Now()
	held("just after the start", now, true)
	held("a backlog from before the start", now.Add(-time.Hour), true)
	held("after the start's window", now.Add(orderDoubtWindow+time.Second), false)

	// The bot's /sync fails (the homeserver went away), then answers again.
	fails := true
	health := &hsHealth{next: roundTripFunc(func(*http.Request) (*http.Response, error) {
		if fails {
			return nil, errors.New("connection refused")
		}
		return &http.Response{StatusCode: http.StatusOK, Body: http.NoBody}, nil
	}), order: &f.br.order}
	sync := httptest.NewRequest(http.MethodGet, "http://hs/_matrix/client/v3/sync?timeout=30000", nil)
	later := now.Add(10 * orderDoubtWindow)
	held("long after the start", later, false)
	if _, err := health.RoundTrip(sync); err == nil {
		t.Fatal("the failing /sync did not fail")
	}
	held("while /sync fails", later, true)
	fails = false
	if _, err := health.RoundTrip(sync); err != nil {
		t.Fatal(err)
	}
	held("just after /sync answers again", time.Now(), true)
	held("a window after /sync answers again", time.Now().Add(orderDoubtWindow+time.Second), false)

	// A transaction that carries an event again: the homeserver counted an earlier try as failed.
	f.br.order.lock.Lock()
	f.br.order.until = time.Time{}
	f.br.order.lock.Unlock()
	held("with no doubt", time.Now(), false)
	txn := `{"events":[` + string(encryptedEvent("$again", f.roomA, f.alice)) + `]}`
	for i := 0; i < 2; i++ {
		if rec := doRequest(f.br.Router(nil), "PUT", "/_matrix/app/v1/transactions/again", "Bearer "+benchHSToken, txn); rec.Code != 200 {
			t.Fatalf("transaction = %d %s", rec.Code, rec.Body.String())
		}
	}
	held("after a redelivered event", time.Now(), true)
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
