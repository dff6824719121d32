package bridge

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
)

// TestNoticeLimiter: each room, user and kind has its own budget, spent by a burst and refilled over time.
func TestNoticeLimiter(t *testing.T) {
	var l noticeLimiter
	t0 := time.Unix(1767225600, 0)
	burst := int(noticeBudgets[noticeReply].burst)
	for i := 0; i < burst; i++ {
		if !l.allow("!a", "@u", noticeReply, t0) {
			t.Fatalf("reply %d of a burst of %d was refused", i+1, burst)
		}
	}
	if l.allow("!a", "@u", noticeReply, t0) {
		t.Fatal("a reply beyond the burst was allowed")
	}
	// In order: the last two cases spend the refill one after the other.
	for _, tc := range []struct {
		name string
		room id.RoomID
		user id.UserID
		kind noticeKind
		at   time.Time
		want bool
	}{
		{name: "another user in the room", room: "!a", user: "@v", kind: noticeReply, at: t0, want: true},
		{name: "the same user in another room", room: "!b", user: "@u", kind: noticeReply, at: t0, want: true},
		{name: "another kind", room: "!a", user: "@u", kind: noticeAboutSender, at: t0, want: true},
		{name: "too soon after the burst", room: "!a", user: "@u", kind: noticeReply, at: t0.Add(time.Second)},
		{name: "after one refill period", room: "!a", user: "@u", kind: noticeReply, at: t0.Add(noticeBudgets[noticeReply].refill + time.Second), want: true},
		{name: "right after that refill was spent", room: "!a", user: "@u", kind: noticeReply, at: t0.Add(noticeBudgets[noticeReply].refill + 2*time.Second)},
	} {
		if got := l.allow(tc.room, tc.user, tc.kind, tc.at); got != tc.want {
			t.Errorf("%s: allow = %t, want %t", tc.name, got, tc.want)
		}
	}
	// A flood of distinct users cannot grow the table past its cap.
	var flood noticeLimiter
	for i := 0; i < maxNoticeBuckets+100; i++ {
		flood.allow("!a", id.UserID(fmt.Sprintf("@u%d", i)), noticeReply, t0)
	}
	if n := len(flood.buckets); n > maxNoticeBuckets {
		t.Fatalf("%d buckets, more than the cap %d", n, maxNoticeBuckets)
	}
}

// TestIdleWorkerIsFreed: a room worker without work leaves the worker table; the room's next event makes a new
// one, which handles it.
func TestIdleWorkerIsFreed(t *testing.T) {
	b := newTestBridge(t, "postgres")
	b.idleForTest = 50 * time.Millisecond
	ctx := context.Background()
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer b.Stop()
	const room = id.RoomID("!idle:ferry.test")
	workers := func() int {
		b.workersLock.Lock()
		defer b.workersLock.Unlock()
		return len(b.workers)
	}
	b.Notify(room)
	if workers() != 1 {
		t.Fatal("no worker for the room")
	}
	deadline := time.Now().Add(5 * time.Second)
	for workers() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the idle worker was not freed")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// A membership event of an unlinked room: handled without the homeserver.
	raw := []byte(`{"event_id":"$after-idle","room_id":"!idle:ferry.test","sender":"@alice:ferry.test","type":"m.room.member","state_key":"@alice:ferry.test","origin_server_ts":1,"content":{"membership":"join"}}`)
	row := &database.InboxEvent{EventID: "$after-idle", RoomID: room, Sender: "@alice:ferry.test", Type: "m.room.member", Raw: raw, State: database.InboxPending, ReceivedAt: time.Now()}
	if _, err := b.DB.Inbox.Insert(ctx, []*database.InboxEvent{row}); err != nil {
		t.Fatal(err)
	}
	b.Notify(room)
	deadline = time.Now().Add(5 * time.Second)
	for {
		got, err := b.DB.Inbox.Get(ctx, "$after-idle")
		if err != nil {
			t.Fatal(err)
		}
		if got.State != database.InboxPending {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the room's next event was not handled after its worker was freed")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestParkedEventsExpireWithOneNotice: undecryptable events wait at most parkedExpiry, and at most
// maxParkedPerRoom per room; the rest are given up together, with one notice per room naming the senders.
func TestParkedEventsExpireWithOneNotice(t *testing.T) {
	cr := newScriptedCrypto()
	f := newRelayFixtureWith(t, cr)
	ctx := context.Background()
	now := time.Now()
	park := func(n int, sender id.UserID, receivedAt time.Time) {
		rows := make([]*database.InboxEvent, n)
		for i := range rows {
			f.n++
			evtID := id.EventID(fmt.Sprintf("$parked%d", f.n))
			rows[i] = &database.InboxEvent{EventID: evtID, RoomID: f.roomA, Sender: sender, Type: "m.room.encrypted", Raw: []byte(`{}`), State: database.InboxPending, ReceivedAt: receivedAt}
		}
		if _, err := f.br.DB.Inbox.Insert(ctx, rows); err != nil {
			t.Fatal(err)
		}
		for _, r := range rows {
			if err := f.br.DB.Inbox.Park(ctx, r.Seq, "S"); err != nil {
				t.Fatal(err)
			}
		}
	}
	park(3, "@old:ferry.test", now.Add(-parkedExpiry-time.Minute))
	park(maxParkedPerRoom+2, f.alice, now)
	parked, err := f.br.DB.Inbox.Parked(ctx)
	if err != nil {
		t.Fatal(err)
	}
	keep := f.br.expireParked(ctx, parked, now)
	if len(keep) != maxParkedPerRoom {
		t.Fatalf("%d events still wait, want the cap %d", len(keep), maxParkedPerRoom)
	}
	counts, _ := f.br.DB.Inbox.CountByState(ctx, f.roomA)
	if counts[database.InboxFailed] != 5 || counts[database.InboxWaitingKeys] != maxParkedPerRoom {
		t.Fatalf("inbox states = %v, want 5 given up and %d waiting", counts, maxParkedPerRoom)
	}
	notices := f.notices(t, f.roomA)
	if len(notices) != 1 || !strings.Contains(notices[0], "5 message(s) from @old:ferry.test, @alice:ferry.test") {
		t.Fatalf("notices = %q, want one naming both senders", notices)
	}
}

// TestStalledSendIsTold: a send the homeserver keeps refusing holds its room; after maxSendAttempts its sender is
// told once, and the event is still relayed when the homeserver recovers.
func TestStalledSendIsTold(t *testing.T) {
	f := newRelayFixtureWith(t, newScriptedCrypto())
	f.relayOne(t) // the ghost registers, joins and sets its profile once
	f.flaky.lock.Lock()
	for i := 0; i < maxSendAttempts+2; i++ {
		f.flaky.script = append(f.flaky.script, answer(http.StatusTooManyRequests, `{"errcode":"M_LIMIT_EXCEEDED","error":"slow down","retry_after_ms":1}`))
	}
	f.flaky.lock.Unlock()
	row := f.relayOne(t)
	if row.State != database.InboxDone {
		t.Fatalf("state = %s", row.State)
	}
	var told []string
	for _, n := range f.notices(t, f.roomA) {
		if strings.Contains(n, "has not managed to relay this message") {
			told = append(told, n)
		}
	}
	if len(told) != 1 || !strings.Contains(told[0], "429 M_LIMIT_EXCEEDED") {
		t.Fatalf("stall notices = %q, want one", told)
	}
	if got := f.copiesIn(f.roomB, f.br.Ghosts.Ghost(f.alice)); got != 2 {
		t.Fatalf("%d copies in B, want 2", got)
	}
}
