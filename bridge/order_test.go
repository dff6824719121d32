package bridge

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/crypto"
	"go.ferry.im/ferry/database"
)

// encryptedEvent is a Megolm event of sender in room as the homeserver shows it, sent now.
func encryptedEvent(evtID id.EventID, room id.RoomID, sender id.UserID) json.RawMessage {
	return encryptedEventAt(evtID, room, sender, time.Now())
}

// encryptedEventAt is encryptedEvent sent at ts.
func encryptedEventAt(evtID id.EventID, room id.RoomID, sender id.UserID, ts time.Time) json.RawMessage {
	raw, _ := json.Marshal(map[string]any{
		"event_id": evtID, "room_id": room, "sender": sender, "type": "m.room.encrypted", "origin_server_ts": ts.UnixMilli(),
		"content": map[string]any{"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AAAA", "session_id": "S", "sender_key": "K", "device_id": "D"},
	})
	return raw
}

// TestLatePushIsRelayedInRoomOrder: the homeserver pushes a message late, after the one that followed it (Dendrite
// does with an event that was in flight to ferry when it restarted). The bot's /sync shows the room's order; ferry
// waits for it before relaying pushed events, and relays both in that order.
func TestLatePushIsRelayedInRoomOrder(t *testing.T) {
	ctx := context.Background()
	f := startSyncOrdered(t)
	defer f.br.Stop()
	early, late := id.EventID("$sent-first"), id.EventID("$sent-second")
	sentEarly := time.Now().Add(-time.Millisecond)
	// The push of the first is delayed; the second is pushed at once.
	f.push(t, late)
	time.Sleep(500 * time.Millisecond)
	// The bot's /sync shows both, in the room's order.
	evts := syncedEvents(t, f.roomA, f.alice, early, late)
	evts[0].Timestamp = sentEarly.UnixMilli()
	if err := f.br.IngestSynced(ctx, crypto.SyncedBatch{Events: evts, Covers: time.Now()}); err != nil {
		t.Fatal(err)
	}
	wantCopiesFrom(t, f, early, late)
}

// TestCoveringSyncReleasesPushes: a pushed event that no /sync batch shows (a type or room the sync does not
// carry) waits only until a batch that must have shown it is recorded, not the whole syncOrderWait: after a
// restart, ferry relays as soon as its /sync has caught up. A batch that holds only echoes of ferry's own copies
// (recorded without a database write) covers it too, and its echoes are not recorded.
func TestCoveringSyncReleasesPushes(t *testing.T) {
	for _, tc := range []struct {
		name    string
		batch   func(f *relayFixture) []*event.Event
		release string
	}{
		{"empty batch", func(*relayFixture) []*event.Event { return nil }, "a covering /sync batch"},
		{"own echoes", func(f *relayFixture) []*event.Event {
			return syncedEvents(t, f.roomB, f.br.Ghosts.Ghost(f.alice), "$echo-1", "$echo-2")
		}, "a covering batch of echoes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			f := startSyncOrdered(t)
			defer f.br.Stop()
			pushed := id.EventID("$pushed-only")
			f.push(t, pushed)
			time.Sleep(200 * time.Millisecond)
			if row, _ := f.br.DB.Inbox.Get(ctx, pushed); row == nil || row.State != database.InboxPending {
				t.Fatalf("the pushed event did not wait for /sync: %+v", row)
			}
			// A batch without it, requested after it arrived: it will not be shown.
			evts := tc.batch(f)
			if err := f.br.IngestSynced(ctx, crypto.SyncedBatch{Events: evts, Covers: time.Now()}); err != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(syncOrderWait / 2)
			for {
				if row, _ := f.br.DB.Inbox.Get(ctx, pushed); row != nil && row.State == database.InboxDone {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("the pushed event still waits %v after %s", syncOrderWait/2, tc.release)
				}
				time.Sleep(20 * time.Millisecond)
			}
			for _, e := range evts {
				if row, _ := f.br.DB.Inbox.Get(ctx, e.ID); row != nil {
					t.Errorf("an echo of ferry's own copy was recorded: %+v", row)
				}
			}
		})
	}
}

// TestLatePushAcrossSyncBatches: the homeserver pushes a message before the one that preceded it, and the bot's
// /sync shows them in two batches: the earlier message in the first, the later one (which was pushed before the
// first batch was recorded) in the next. ferry relays the earlier message first. Seen in a chaos run on Dendrite
// after its restart: 7 messages of each member relayed after the 9 that followed them.
func TestLatePushAcrossSyncBatches(t *testing.T) {
	ctx := context.Background()
	f := startSyncOrdered(t)
	defer f.br.Stop()
	early, late := id.EventID("$sent-first"), id.EventID("$sent-second")
	firstRequested := time.Now()
	time.Sleep(5 * time.Millisecond)
	f.push(t, late)
	time.Sleep(100 * time.Millisecond)
	// The first batch was requested before the push arrived: it shows the earlier message only (sent before).
	first := syncedEvents(t, f.roomA, f.alice, early)
	first[0].Timestamp = firstRequested.UnixMilli() - 1
	if err := f.br.IngestSynced(ctx, crypto.SyncedBatch{Events: first, Covers: firstRequested}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if err := f.br.IngestSynced(ctx, crypto.SyncedBatch{Events: syncedEvents(t, f.roomA, f.alice, late), Covers: time.Now()}); err != nil {
		t.Fatal(err)
	}
	wantCopiesFrom(t, f, early, late)
}

// TestPushSkippedBySyncKeepsItsPlace: the bot's /sync never shows a pushed message, but shows the one sent after
// it. Seen in a chaos run on Dendrite: the first message a member sent as the homeserver restarted was pushed to
// ferry, but the bot's /sync, answered during the shutdown with a position Dendrite then gave that message, never
// showed it; ferry relayed it after the 18 that followed it. Its timestamp, older than theirs by the same
// server's clock, says /sync skipped it: ferry relays it first.
func TestPushSkippedBySyncKeepsItsPlace(t *testing.T) {
	ctx := context.Background()
	f := startSyncOrdered(t)
	defer f.br.Stop()
	skipped, next := id.EventID("$skipped"), id.EventID("$next")
	f.push(t, skipped)
	time.Sleep(5 * time.Millisecond)
	f.push(t, next)
	time.Sleep(100 * time.Millisecond)
	// A batch that holds all the room had since the previous one, by its own account, shows next only.
	if err := f.br.IngestSynced(ctx, crypto.SyncedBatch{Events: syncedEvents(t, f.roomA, f.alice, next), Covers: time.Now()}); err != nil {
		t.Fatal(err)
	}
	wantCopiesFrom(t, f, skipped, next)
}

// wantCopiesFrom waits for alice's ghost to have sent two copies into B after the fixture's first, and checks
// they come from first and second, in that order.
func wantCopiesFrom(t *testing.T, f *relayFixture, first, second id.EventID) {
	t.Helper()
	ghost := f.br.Ghosts.Ghost(f.alice)
	waitFor(t, "both copies", func() bool { return len(f.ghostEvents(f.roomB, ghost)) == 3 })
	if order := copiedFrom(t, f, ghost); len(order) != 3 || order[1] != first || order[2] != second {
		t.Fatalf("copies in B come from %v, want …, %s, %s", order, first, second)
	}
}

// syncedEvents are encrypted events of sender in room as the bot's /sync shows them.
func syncedEvents(t *testing.T, room id.RoomID, sender id.UserID, ids ...id.EventID) []*event.Event {
	t.Helper()
	var evts []*event.Event
	for _, evtID := range ids {
		var evt event.Event
		if err := json.Unmarshal(encryptedEvent(evtID, room, sender), &evt); err != nil {
			t.Fatal(err)
		}
		evts = append(evts, &evt)
	}
	return evts
}

// copiedFrom lists, in room B's order, the originals of the copies ghost sent there.
func copiedFrom(t *testing.T, f *relayFixture, ghost id.UserID) []id.EventID {
	t.Helper()
	var order []id.EventID
	for _, raw := range f.hs.Timeline(f.roomB) {
		var evt event.Event
		if json.Unmarshal(raw, &evt) != nil || evt.Sender != ghost || evt.Type != event.EventEncrypted {
			continue
		}
		_ = evt.Content.ParseRaw(evt.Type)
		dec, err := (&sealCrypto{}).DecryptOwn(context.Background(), &evt)
		if err != nil {
			t.Fatal(err)
		}
		if o := OriginOf(&dec.Content); o != nil {
			order = append(order, o.EventID)
		}
	}
	return order
}

// startSyncOrdered starts a relay of room A to B (one message relayed already) that checks pushes against /sync.
func startSyncOrdered(t *testing.T) *relayFixture {
	t.Helper()
	f := newRelayFixtureWith(t, &sealCrypto{benchCrypto{plaintext: benchMessage()}})
	f.relayOne(t)
	f.br.SyncOrders.Store(true)
	if err := f.br.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	return f
}

// push hands ferry a transaction (always numbered 1) with alice's encrypted event evtID in room A.
func (f *relayFixture) push(t *testing.T, evtID id.EventID) {
	t.Helper()
	f.pushTxn(t, "1", evtID)
}

// TestOldEventsAtAGapsEdgeAreNotRecordedAgain: filling a gap on Dendrite reads a page past the previous batch's
// end, which can hold an event of an earlier batch. One older than the inbox keeps handled rows (so that its row
// may be gone) is not recorded again: it would be relayed a second time. A recent one, and any old event inside
// the gap, are.
func TestOldEventsAtAGapsEdgeAreNotRecordedAgain(t *testing.T) {
	ctx := context.Background()
	f := startSyncOrdered(t)
	defer f.br.Stop()
	evts := syncedEvents(t, f.roomA, f.alice, "$edge-old", "$edge-new", "$gap-old")
	old := time.Now().Add(-inboxRetention).UnixMilli()
	evts[0].Timestamp, evts[2].Timestamp = old, old
	batch := crypto.SyncedBatch{Events: evts, Covers: time.Now(), Edge: map[id.EventID]bool{"$edge-old": true, "$edge-new": true}}
	if err := f.br.IngestSynced(ctx, batch); err != nil {
		t.Fatal(err)
	}
	for evtID, want := range map[id.EventID]bool{"$edge-old": false, "$edge-new": true, "$gap-old": true} {
		row, err := f.br.DB.Inbox.Get(ctx, evtID)
		if err != nil {
			t.Fatal(err)
		}
		if (row != nil) != want {
			t.Errorf("%s recorded: %v, want %v", evtID, row != nil, want)
		}
	}
}

// TestHistoryBeforeTheBotsJoinIsNotRecorded: a /sync batch that shows the bot's join shows some of the room's
// history with it. Those events are only confirmed: recorded, the relay would apply old state over newer state
// it has handled since (an old power-levels event taking the bot's power away again) and could relay messages
// from before the bot was there.
func TestHistoryBeforeTheBotsJoinIsNotRecorded(t *testing.T) {
	ctx := context.Background()
	f := startSyncOrdered(t)
	defer f.br.Stop()
	evts := syncedEvents(t, f.roomA, f.alice, "$before-join", "$after-join")
	batch := crypto.SyncedBatch{Events: evts, Covers: time.Now(), BeforeJoin: map[id.EventID]bool{"$before-join": true}}
	if err := f.br.IngestSynced(ctx, batch); err != nil {
		t.Fatal(err)
	}
	if row, _ := f.br.DB.Inbox.Get(ctx, "$before-join"); row != nil {
		t.Errorf("an event from before the bot's join was recorded: %+v", row)
	}
	if row, _ := f.br.DB.Inbox.Get(ctx, "$after-join"); row == nil {
		t.Error("an event after the bot's join was not recorded")
	}
}
