package bridge

import (
	"encoding/json"
	"reflect"
	"testing"

	"maunium.net/go/mautrix/event"

	"go.ferry.im/ferry/database"
)

// The one-pass decoding of encrypted events gives decryption the same event as the generic decoding.
func TestParseEncryptedEventMatchesGenericDecoding(t *testing.T) {
	cases := map[string]string{
		"megolm": `{"event_id":"$e","room_id":"!r:x","sender":"@a:x","type":"m.room.encrypted","origin_server_ts":1700000000000,
			"content":{"algorithm":"m.megolm.v1.aes-sha2","ciphertext":"AwgAEnAB","device_id":"DEV","sender_key":"SK","session_id":"S1",
			"m.relates_to":{"rel_type":"m.annotation","event_id":"$t","key":"x"}},"unsigned":{"age":12,"transaction_id":"t1"}}`,
		"no unsigned": `{"event_id":"$e","room_id":"!r:x","sender":"@a:x","type":"m.room.encrypted","origin_server_ts":5,
			"content":{"algorithm":"m.megolm.v1.aes-sha2","ciphertext":"AA","session_id":"S2"}}`,
	}
	for name, raw := range cases {
		t.Run(name, func(t *testing.T) {
			fast := parseEncryptedEvent([]byte(raw))
			if fast == nil {
				t.Fatal("fast path refused a plain encrypted event")
			}
			var slow event.Event
			if err := json.Unmarshal([]byte(raw), &slow); err != nil {
				t.Fatal(err)
			}
			slow.Type.Class = event.MessageEventType
			if err := slow.Content.ParseRaw(slow.Type); err != nil {
				t.Fatal(err)
			}
			if fast.ID != slow.ID || fast.RoomID != slow.RoomID || fast.Sender != slow.Sender || fast.Type != slow.Type ||
				fast.Timestamp != slow.Timestamp || !reflect.DeepEqual(fast.Unsigned, slow.Unsigned) {
				t.Errorf("head differs: fast %+v, generic %+v", fast, slow)
			}
			if !reflect.DeepEqual(fast.Content.Parsed, slow.Content.Parsed) {
				t.Errorf("content differs: fast %+v, generic %+v", fast.Content.Parsed, slow.Content.Parsed)
			}
			if string(fast.Content.VeryRaw) != string(slow.Content.VeryRaw) {
				t.Errorf("raw content differs")
			}
		})
	}
	// Anything unusual goes through the generic decoding, which keeps its behaviour.
	for name, tc := range map[string]struct {
		raw     string
		wantErr bool // the event is stored as failed
	}{
		"state":          {raw: `{"event_id":"$e","room_id":"!r","sender":"@a:x","type":"m.room.encrypted","state_key":"","content":{"algorithm":"m.megolm.v1.aes-sha2","ciphertext":"AA"}}`},
		"bad ciphertext": {raw: `{"event_id":"$e","room_id":"!r","sender":"@a:x","type":"m.room.encrypted","content":{"algorithm":"m.megolm.v1.aes-sha2","ciphertext":5}}`},
		"content array":  {raw: `{"event_id":"$e","room_id":"!r","sender":"@a:x","type":"m.room.encrypted","content":[]}`, wantErr: true},
	} {
		if parseEncryptedEvent([]byte(tc.raw)) != nil {
			t.Errorf("%s: fast path accepted it", name)
		}
		evt, err := parseEvent(&database.InboxEvent{Type: "m.room.encrypted", Raw: []byte(tc.raw)})
		if tc.wantErr != (err != nil) || (err == nil && evt.Content.Raw == nil) {
			t.Errorf("%s: generic decoding: %v", name, err)
		}
	}
}
