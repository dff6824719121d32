package bridge

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
)

// Fuzz targets for what reaches ferry from outside: transaction bodies (FuzzTransaction), decrypted content
// (FuzzTranslate in translate_test.go, FuzzDecryptedEvent), call content (FuzzCallContent), commands
// (FuzzParseCommand), and durations (FuzzParseDisappear). Seeds are below and in testdata/fuzz/<target>; `make
// fuzz` runs each for a bounded time.

// FuzzTransaction: any body the homeserver could push is either refused as a whole (not JSON) or split into
// events that each have an event ID, a room and a type; every recorded event parses back for the worker
// without a panic, and an encrypted event's fast path agrees with the generic decoding.
func FuzzTransaction(f *testing.F) {
	f.Add([]byte(`{"events":[{"event_id":"$a","room_id":"!r:x","sender":"@u:x","type":"m.room.message","origin_server_ts":1,"content":{"msgtype":"m.text","body":"hi"}}]}`))
	f.Add([]byte(`{"events":[{"event_id":"$e","room_id":"!r:x","sender":"@u:x","type":"m.room.encrypted","content":{"algorithm":"m.megolm.v1.aes-sha2","ciphertext":"AwgA","session_id":"S","sender_key":"K","device_id":"D"}}]}`))
	f.Add([]byte(`{"events":[{"event_id":"$s","room_id":"!r:x","sender":"@u:x","type":"m.room.member","state_key":"@u:x","content":{"membership":"join"},"unsigned":{"prev_content":{"membership":"leave"}}}]}`))
	f.Add([]byte(`{"events":[{"event_id":"$r","room_id":"!r:x","sender":"@u:x","type":"m.room.redaction","redacts":"$a","content":{"redacts":"$a"}}]}`))
	f.Add([]byte(`{"events":[{"room_id":"!r:x","type":"m.room.message"},{"event_id":7,"room_id":"!r:x","type":"x"},null,[],"x"]}`))
	f.Add([]byte(`{"events":[{"event_id":"$e","room_id":"!r:x","type":"m.room.encrypted","state_key":"","content":"not an object"}],"de.sorunome.msc2409.to_device":[{}]}`))
	f.Add([]byte(`{"events":{}}`))
	f.Add([]byte(`[]`))
	f.Add([]byte(`{"events":[],"ephemeral":[{"type":"m.receipt","room_id":"!r:x","content":{"$e":{"m.read":{"@u:x":{"ts":1,"thread_id":"main"}},"m.read.private":{"@u:x":{"ts":2}}}}}],"de.sorunome.msc2409.ephemeral":[{"type":"m.typing","room_id":"!r:x","content":{"user_ids":["@u:x",7]}}]}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		// Typing and receipts (ephemeral.go): whatever comes, only parsed m.typing and m.receipt of a room.
		for _, evt := range ParseEphemeral(body) {
			if evt.RoomID == "" || evt.Type.Class != event.EphemeralEventType {
				t.Fatalf("ephemeral event without a room or class: %+v", evt)
			}
			switch evt.Content.Parsed.(type) {
			case *event.TypingEventContent, *event.ReceiptEventContent:
			default:
				t.Fatalf("ephemeral %s parsed as %T", evt.Type.Type, evt.Content.Parsed)
			}
		}
		events, skipped, err := parseTransaction(body)
		if err != nil {
			if events != nil || skipped != 0 {
				t.Fatal("a refused body still produced events")
			}
			return
		}
		for _, e := range events {
			if e.head.ID == "" || e.head.RoomID == "" || e.head.Type == "" {
				t.Fatalf("event without ID, room or type recorded: %+v", e.head)
			}
			row := &database.InboxEvent{EventID: e.head.ID, RoomID: e.head.RoomID, Sender: e.head.Sender, Type: e.head.Type, Raw: e.raw}
			evt, err := parseEvent(row)
			if err != nil {
				continue // recorded, then failed by the worker with a reason
			}
			if evt.StateKey != nil && evt.Type.Class != event.StateEventType {
				t.Fatal("a state event was not classed as state")
			}
			if evt.Type == event.StateTombstone {
				// Room upgrades (upgrade.go) read the replacement room of any tombstone.
				_ = evt.Content.AsTombstone().GetReplacementRoom()
			}
			if fast := parseEncryptedEvent(e.raw); fast != nil {
				if fast.StateKey != nil || fast.Type != event.EventEncrypted || fast.ID != evt.ID || fast.RoomID != evt.RoomID {
					t.Fatalf("the encrypted fast path disagrees: %+v vs %+v", fast, evt)
				}
			}
		}
	})
}

// FuzzDecryptedEvent: whatever an encrypted event decrypts to, ferry never obeys a control type from inside it,
// reads a redaction target without a panic, and a copy never carries a user's im.ferry.* key (only ferry's
// origin marker and, for a flagged sender, its trust marker).
func FuzzDecryptedEvent(f *testing.F) {
	f.Add("m.room.redaction", []byte(`{"redacts":"$victim"}`), uint8(0))
	f.Add("m.room.message", []byte(`{"msgtype":"m.text","body":"x","im.ferry.txn":"t","im.ferry.origin":{"event_id":"$x"},"m.new_content":{"body":"y","im.ferry.sender_trust":{}}}`), uint8(1))
	f.Add("m.room.member", []byte(`{"membership":"join"}`), uint8(0))
	f.Add("m.call.hangup", []byte(`{"call_id":"c","party_id":"p","version":"1","im.ferry.x":1}`), uint8(2))
	f.Add("m.sticker", []byte(`{"body":"s","url":"mxc://x/y","format":"org.matrix.custom.html","formatted_body":"<b>"}`), uint8(3))
	flags := []string{"", "unsigned_device", "untrusted_forwarded_key", "not a known flag"}
	f.Fuzz(func(t *testing.T, evtType string, content []byte, flag uint8) {
		dec := &event.Event{Type: event.Type{Type: evtType, Class: event.MessageEventType}, ID: "$fuzz", RoomID: "!a:ferry.example", Sender: "@alice:example.org"}
		_ = json.Unmarshal(content, &dec.Content)
		dec.Content.VeryRaw = content
		_ = dec.Content.ParseRaw(dec.Type)
		if evtType == event.EventRedaction.Type && !isControlType(dec.Type) {
			t.Fatal("a decrypted redaction is not a control type")
		}
		_ = redactsOf(dec)
		_ = relatedEvent(dec)
		_ = relationTarget(dec) // room upgrades: where an edit, reaction or redaction belongs
		origin := testOrigin(dec)
		origin.TrustFlag = flags[int(flag)%len(flags)]
		_, out, err := resolveAndTranslate(dec, newFakeMapper(), origin)
		if err != nil {
			return
		}
		check := func(where string, m map[string]any) {
			for k := range m {
				if strings.HasPrefix(k, ferryKeyPrefix) && k != OriginKey && !(k == SenderTrustKey && origin.TrustFlag != "" && where != "m.new_content") {
					t.Fatalf("%s carries the user's %s", where, k)
				}
			}
		}
		check("content", out.Raw)
		if nc, ok := out.Raw[keyNewContent].(map[string]any); ok {
			check("m.new_content", nc)
		}
		if origin.TrustFlag != "" {
			if _, ok := out.Raw[SenderTrustKey]; !ok {
				t.Fatal("a flagged sender's copy carries no trust marker")
			}
		}
		// Restated in a room that replaced the target's room (upgrade.go): a message, never a relation, and still
		// free of the user's markers.
		if typ, restated, err := restateInSuccessor(dec.Type, out, "!b-old:ferry.example", "ferry.example"); err == nil {
			if typ != event.EventMessage {
				t.Fatalf("restated as %s", typ.Type)
			} else if _, ok := restated.Raw[keyRelatesTo]; ok {
				t.Fatal("a restated relation still relates to an event of another room")
			}
			check("restated", restated.Raw)
		}
	})
}

// FuzzCallContent: any call content maps into a target room without a panic: the call_id is the target's, an
// invite's lifetime only shrinks, and content without a call_id is refused.
func FuzzCallContent(f *testing.F) {
	f.Add(callInvite, []byte(`{"call_id":"c1","party_id":"p","version":"1","lifetime":60000,"invitee":"@_ferry_bob=3ax:ferry.example","offer":{"type":"offer","sdp":"v=0"}}`), int64(1000))
	f.Add(callHangup, []byte(`{"call_id":"c1","party_id":"p","version":0,"reason":"user_hangup"}`), int64(0))
	f.Add(callNegotiate, []byte(`{"call_id":"c1","lifetime":"90000","description":{"type":"offer"}}`), int64(-5))
	f.Add(callCandidates, []byte(`{"call_id":7,"candidates":[{"candidate":""}]}`), int64(0))
	f.Add(callInvite, []byte(`{"call_id":"c1","lifetime":1e308}`), int64(1<<40))
	f.Fuzz(func(t *testing.T, evtType string, content []byte, elapsedMS int64) {
		var raw map[string]any
		if json.Unmarshal(content, &raw) != nil || raw == nil {
			return
		}
		before, hadLifetime := callLifetime(raw)
		hadCallID := callString(raw, "call_id") != ""
		sentAt := time.UnixMilli(1767225600000)
		err := mapCallContent(evtType, raw, "target-call", sentAt, sentAt.Add(time.Duration(elapsedMS)*time.Millisecond), func(u id.UserID) id.UserID { return u })
		switch {
		case !hadCallID:
			if err == nil {
				t.Fatal("content without a call_id was mapped")
			}
		case err == nil:
			if callString(raw, "call_id") != "target-call" {
				t.Fatal("the call_id was not mapped")
			}
			if after, ok := callLifetime(raw); (evtType == callInvite || evtType == callNegotiate) && hadLifetime && ok && after > before {
				t.Fatalf("lifetime grew from %s to %s", before, after)
			}
		}
	})
}

// FuzzParseDisappear: a timer argument is either refused or a duration from 5 s to 24 h (0 for off).
func FuzzParseDisappear(f *testing.F) {
	for _, s := range []string{"5s", "90s", "10m", "1h30m", "24h", "1d", "off", "0", "4s", "25h", "-5s", "10", "1.5h", "2d", " OFF ", "9999999999999h", "1ns"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, arg string) {
		d, err := ParseDisappear(arg)
		if err != nil {
			if d != 0 {
				t.Fatalf("refused %q with a duration %s", arg, d)
			}
			return
		}
		if d != 0 && (d < MinDisappear || d > MaxDisappear) {
			t.Fatalf("%q gave %s, outside 5s..24h", arg, d)
		}
	})
}
