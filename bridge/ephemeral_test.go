package bridge

import (
	"context"
	"encoding/json"
	"slices"
	"testing"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/internal/fakehs"
)

// TestParseEphemeral: typing and receipts come under the stable and the unstable key; anything else is skipped.
func TestParseEphemeral(t *testing.T) {
	for name, tc := range map[string]struct {
		body  string
		types []string
	}{
		"stable key": {`{"events":[],"ephemeral":[{"type":"m.typing","room_id":"!r:x","content":{"user_ids":["@a:x"]}}]}`, []string{"m.typing"}},
		"unstable key": {`{"events":[],"de.sorunome.msc2409.ephemeral":[{"type":"m.receipt","room_id":"!r:x","content":{"$e":{"m.read":{"@a:x":{"ts":1}}}}}]}`,
			[]string{"m.receipt"}},
		"both keys":                 {`{"ephemeral":[{"type":"m.typing","room_id":"!r:x","content":{"user_ids":[]}}],"de.sorunome.msc2409.ephemeral":[{"type":"m.typing","room_id":"!s:x","content":{"user_ids":[]}}]}`, []string{"m.typing", "m.typing"}},
		"presence is not relayed":   {`{"ephemeral":[{"type":"m.presence","sender":"@a:x","content":{"presence":"online"}}]}`, nil},
		"an event without a room":   {`{"ephemeral":[{"type":"m.typing","content":{"user_ids":["@a:x"]}}]}`, nil},
		"content of the wrong type": {`{"ephemeral":[{"type":"m.typing","room_id":"!r:x","content":{"user_ids":"@a:x"}},{"type":"m.receipt","room_id":"!r:x","content":[]}]}`, nil},
		"junk":                      {`{"ephemeral":[null,7,"x",{}]}`, nil},
		"not JSON":                  {`{"ephemeral":`, nil},
		"no ephemeral events":       {`{"events":[{"type":"m.typing"}]}`, nil},
	} {
		t.Run(name, func(t *testing.T) {
			var got []string
			for _, evt := range ParseEphemeral([]byte(tc.body)) {
				got = append(got, evt.Type.Type)
				if evt.Type.Class != event.EphemeralEventType || evt.Content.Parsed == nil {
					t.Fatalf("%s: class %v, parsed %T", evt.Type.Type, evt.Type.Class, evt.Content.Parsed)
				}
			}
			if !slices.Equal(got, tc.types) {
				t.Fatalf("ParseEphemeral = %v, want %v", got, tc.types)
			}
		})
	}
}

func typingEvent(room id.RoomID, users ...id.UserID) *event.Event {
	return &event.Event{Type: event.EphemeralEventTyping, RoomID: room, Content: event.Content{Parsed: &event.TypingEventContent{UserIDs: users}}}
}

func receiptEvent(room id.RoomID, evtID id.EventID, user id.UserID, typ event.ReceiptType, thread event.ThreadID) *event.Event {
	content := event.ReceiptEventContent{}
	content.Set(evtID, typ, user, event.ReadReceipt{Timestamp: time.Now(), ThreadID: thread})
	return &event.Event{Type: event.EphemeralEventReceipt, RoomID: room, Content: event.Content{Parsed: &content}}
}

// TestEphemeralRelay: a member's public read receipts and typing cross from their ghost, only where the ghost is
// already a member, naming the counterpart of the event read, throttled; private receipts, ferry's own users and
// events ferry never relayed do not cross.
func TestEphemeralRelay(t *testing.T) {
	f := newUpgradeFixture(t)
	ctx := context.Background()
	eph := f.br.ephemeral()
	t0 := time.Now()
	aliceMsg, aliceMsgInB := f.message(t, f.roomA, f.roomB, f.alice, "hello")
	aliceGhost, bobGhost := f.br.Ghosts.Ghost(f.alice), f.br.Ghosts.Ghost(f.bob)
	take := func() ([]fakehs.Typing, []fakehs.Receipt) { return f.hs.Ephemeral() }

	// bob reads alice's message in B, but his ghost is not in A: nothing crosses.
	f.br.relayEphemeral(ctx, eph, receiptEvent(f.roomB, aliceMsgInB, f.bob, event.ReceiptTypeRead, ""), t0)
	if _, r := take(); len(r) != 0 {
		t.Fatalf("a ghost that is not in the room sent receipts: %v", r)
	}
	// Once bob spoke (his ghost joined A), his receipt marks alice's original read, from his ghost.
	f.message(t, f.roomB, f.roomA, f.bob, "hi")
	f.br.relayEphemeral(ctx, eph, receiptEvent(f.roomB, aliceMsgInB, f.bob, event.ReceiptTypeRead, ""), t0)
	if _, r := take(); !slices.Equal(r, []fakehs.Receipt{{Room: f.roomA, User: bobGhost, Type: event.ReceiptTypeRead, Event: aliceMsg}}) {
		t.Fatalf("receipts = %+v, want bob's ghost reading alice's original", r)
	}
	// Private receipts stay private; a ghost's own receipt (an echo) and a receipt on an event ferry never relayed
	// do not cross.
	f.br.relayEphemeral(ctx, eph, receiptEvent(f.roomB, aliceMsgInB, f.bob, event.ReceiptTypeReadPrivate, ""), t0.Add(time.Minute))
	f.br.relayEphemeral(ctx, eph, receiptEvent(f.roomB, aliceMsgInB, aliceGhost, event.ReceiptTypeRead, ""), t0.Add(time.Minute))
	f.br.relayEphemeral(ctx, eph, receiptEvent(f.roomB, "$never-relayed", f.bob, event.ReceiptTypeRead, ""), t0.Add(time.Minute))
	if _, r := take(); len(r) != 0 {
		t.Fatalf("receipts that must not cross did: %+v", r)
	}

	// Throttled: a second receipt right after the first waits, and a third replaces it; it goes when the time
	// has come.
	second, secondInB := f.message(t, f.roomA, f.roomB, f.alice, "second")
	third, thirdInB := f.message(t, f.roomA, f.roomB, f.alice, "third")
	t1 := t0.Add(time.Hour)
	f.br.relayEphemeral(ctx, eph, receiptEvent(f.roomB, aliceMsgInB, f.bob, event.ReceiptTypeRead, ""), t1)
	f.br.relayEphemeral(ctx, eph, receiptEvent(f.roomB, secondInB, f.bob, event.ReceiptTypeRead, ""), t1.Add(100*time.Millisecond))
	f.br.relayEphemeral(ctx, eph, receiptEvent(f.roomB, thirdInB, f.bob, event.ReceiptTypeRead, "main"), t1.Add(200*time.Millisecond))
	if _, r := take(); len(r) != 1 || r[0].Event != aliceMsg {
		t.Fatalf("receipts within the throttle = %+v, want only the first", r)
	}
	f.br.flushEphemeral(ctx, eph, t1.Add(time.Second))
	if _, r := take(); len(r) != 0 {
		t.Fatalf("a receipt went before its time: %+v", r)
	}
	f.br.flushEphemeral(ctx, eph, t1.Add(receiptEvery))
	if _, r := take(); len(r) != 1 || r[0].Event != third || r[0].Thread != "main" {
		t.Fatalf("after the wait = %+v, want the latest receipt (%s), not %s", r, third, second)
	}

	// Typing: alice types in A: her ghost types in B; carol, whose ghost is nowhere, does not; alice stops.
	carol := id.UserID("@carol:ferry.test")
	f.br.relayEphemeral(ctx, eph, typingEvent(f.roomA, f.alice, carol), t1)
	f.br.relayEphemeral(ctx, eph, typingEvent(f.roomA, f.alice, carol), t1.Add(time.Second)) // no change: nothing new
	if ty, _ := take(); !slices.Equal(ty, []fakehs.Typing{{Room: f.roomB, User: aliceGhost, Typing: true}}) {
		t.Fatalf("typing = %+v, want alice's ghost typing in B once", ty)
	}
	// Still typing after typingRefresh: renewed (the homeserver reports only changes).
	f.br.flushEphemeral(ctx, eph, t1.Add(typingRefresh))
	if ty, _ := take(); !slices.Equal(ty, []fakehs.Typing{{Room: f.roomB, User: aliceGhost, Typing: true}}) {
		t.Fatalf("renewal = %+v", ty)
	}
	f.br.relayEphemeral(ctx, eph, typingEvent(f.roomA, carol), t1.Add(typingRefresh+time.Second))
	if ty, _ := take(); !slices.Equal(ty, []fakehs.Typing{{Room: f.roomB, User: aliceGhost, Typing: false}}) {
		t.Fatalf("typing after alice stopped = %+v", ty)
	}
	f.br.flushEphemeral(ctx, eph, t1.Add(time.Hour))
	if ty, _ := take(); len(ty) != 0 {
		t.Fatalf("a stopped typer was renewed: %+v", ty)
	}
}

// TestEphemeralFromTransaction: the transaction endpoint hands ephemeral events to the relay.
func TestEphemeralFromTransaction(t *testing.T) {
	br := newTestBridge(t, "postgres")
	body, _ := json.Marshal(map[string]any{"events": []any{}, "ephemeral": []any{map[string]any{"type": "m.typing", "room_id": "!r:x", "content": map[string]any{"user_ids": []string{"@a:x"}}}}})
	rec := doRequest(br.Router(nil), "PUT", "/_matrix/app/v1/transactions/t1", "Bearer "+br.AS.Registration.ServerToken, string(body))
	if rec.Code != 200 {
		t.Fatalf("transaction answered %d", rec.Code)
	}
	select {
	case evt := <-br.ephemeral().queue:
		if evt.RoomID != "!r:x" || evt.Type != event.EphemeralEventTyping {
			t.Fatalf("queued %+v", evt)
		}
	default:
		t.Fatal("the typing notification was not queued")
	}
}
