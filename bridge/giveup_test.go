package bridge

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/internal/fakehs"
)

// addRoom creates an encrypted room of owner with the bot in it, known to ferry's state store.
func (f *relayFixture) addRoom(t *testing.T, owner id.UserID) id.RoomID {
	t.Helper()
	ctx := context.Background()
	enc := &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1}
	bot := f.br.AS.BotMXID()
	room := f.hs.CreateRoom(owner, fakehs.RoomOptions{Encryption: enc, Members: []id.UserID{bot}})
	for _, u := range []id.UserID{owner, bot} {
		if err := f.br.StateStore.SetMembership(ctx, room, u, event.MembershipJoin); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.br.StateStore.SetEncryptionEvent(ctx, room, enc); err != nil {
		t.Fatal(err)
	}
	return room
}

// record puts a message of sender in room into the inbox and wakes the room's worker.
func (f *relayFixture) record(t *testing.T, room id.RoomID, sender id.UserID) id.EventID {
	t.Helper()
	f.n++
	evtID := id.EventID(fmt.Sprintf("$msg%d", f.n))
	raw, _ := json.Marshal(map[string]any{
		"event_id": evtID, "room_id": room, "sender": sender, "type": "m.room.encrypted", "origin_server_ts": time.Now().UnixMilli(),
		"content": map[string]any{"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AAAA", "session_id": "S", "sender_key": "K", "device_id": "D"},
	})
	row := &database.InboxEvent{EventID: evtID, RoomID: room, Sender: sender, Type: "m.room.encrypted", Raw: raw, State: database.InboxPending, ReceivedAt: time.Now()}
	if _, err := f.br.DB.Inbox.Insert(context.Background(), []*database.InboxEvent{row}); err != nil {
		t.Fatal(err)
	}
	f.br.Notify(room)
	return evtID
}

// noticesIn counts the notices (msgtype m.notice) from in room, sealed by sealCrypto: besides them the bot sends
// message statuses (com.beeper.message_send_status), which are no notices.
func (f *relayFixture) noticesIn(t *testing.T, room id.RoomID, from id.UserID) int {
	t.Helper()
	n := 0
	for _, raw := range f.hs.Timeline(room) {
		var e struct {
			Type    string    `json:"type"`
			Sender  id.UserID `json:"sender"`
			Content struct {
				Ciphertext string `json:"ciphertext"`
			} `json:"content"`
		}
		_ = json.Unmarshal(raw, &e)
		if e.Type != "m.room.encrypted" || e.Sender != from {
			continue
		}
		plain, err := base64.RawStdEncoding.DecodeString(e.Content.Ciphertext)
		if err != nil {
			continue // not sealed by sealCrypto
		}
		var content struct {
			MsgType string `json:"msgtype"`
		}
		if json.Unmarshal(plain, &content) == nil && content.MsgType == "m.notice" {
			n++
		}
	}
	return n
}

// waitFor polls cond for up to 60 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(60 * time.Second); !cond(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// TestRoomFailingForGoodIsGivenUp: the homeserver answers every request about one room of a link (B) with a
// server error, for good. Another link keeps flowing meanwhile; after bridge.give_up_after the sender's room (A)
// gets a failure notice for B, the message's copy in the link's third room (C) is there, and later messages of A
// reach C without waiting that long again.
func TestRoomFailingForGoodIsGivenUp(t *testing.T) {
	ctx := context.Background()
	f := newRelayFixtureWith(t, &sealCrypto{benchCrypto{plaintext: benchMessage()}})
	f.br.Config.GiveUpAfter = 2 * time.Second
	f.relayOne(t) // the ghost registers, joins B and sets its profile while B still works
	carol, dave, erin := id.UserID("@carol:ferry.test"), id.UserID("@dave:ferry.test"), id.UserID("@erin:ferry.test")
	roomC, roomD, roomE := f.addRoom(t, carol), f.addRoom(t, dave), f.addRoom(t, erin)
	if _, err := f.br.DB.Links.Join(ctx, "", f.roomA, roomC, f.alice, time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := f.br.DB.Links.Join(ctx, "other", roomD, roomE, dave, time.Now()); err != nil {
		t.Fatal(err)
	}
	var intoB atomic.Int64 // requests about B
	f.faultOn(func(r *http.Request) bool {
		if strings.Contains(r.URL.Path, "/rooms/"+string(f.roomB)+"/") {
			intoB.Add(1)
			return true
		}
		return false
	})
	if err := f.br.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer f.br.Stop()
	bot, aliceGhost, daveGhost := f.br.AS.BotMXID(), f.br.Ghosts.Ghost(f.alice), f.br.Ghosts.Ghost(dave)

	stuck := f.record(t, f.roomA, f.alice)
	other := f.record(t, roomD, dave)
	waitFor(t, "the other link's copy", func() bool { return f.copiesIn(roomE, daveGhost) == 1 })
	// The row is marked done in the room's batch commit, just after its copy was sent.
	waitFor(t, "the other link's message to be done", func() bool {
		row, _ := f.br.DB.Inbox.Get(ctx, other)
		return row != nil && row.State == database.InboxDone
	})
	waitFor(t, "the failure notice in A", func() bool { return f.noticesIn(t, f.roomA, bot) == 1 })
	waitFor(t, "the message to be finished", func() bool {
		row, _ := f.br.DB.Inbox.Get(ctx, stuck)
		return row != nil && row.State != database.InboxPending
	})
	if got := f.copiesIn(roomC, aliceGhost); got != 1 {
		t.Fatalf("room C holds %d copies of alice's message, want 1", got)
	}
	if c, _ := f.br.DB.EventMap.Get(ctx, stuck, f.roomB); c != nil {
		t.Fatalf("the event map holds a copy in B, which never got one: %+v", c)
	}

	// B still fails: the next message is not held for give_up_after again, nor retried into B: its copy there
	// (with the read-back the outage calls for, which is where its request goes) is tried once.
	f.br.Config.GiveUpAfter = time.Hour
	intoB.Store(0)
	f.record(t, f.roomA, f.alice)
	waitFor(t, "the next message's copy in C", func() bool { return f.copiesIn(roomC, aliceGhost) == 2 })
	waitFor(t, "the next failure notice in A", func() bool { return f.noticesIn(t, f.roomA, bot) == 2 })
	if n := intoB.Load(); n != 1 {
		t.Errorf("the next message made %d requests into B, which ferry gave up on; want 1", n)
	}
}
