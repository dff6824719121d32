package crypto

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
	"maunium.net/go/mautrix/sqlstatestore"

	"go.ferry.im/ferry/database/dbtest"
)

// TestHandleTransactionCrypto feeds the Machine appservice transactions shaped like Synapse's with MSC2409,
// MSC3202 (unstable field names, as Synapse sends them) and then the stable names: a room key for the bot's
// device, a member's room key request to a ghost's device and an outsider's one, a member's device-list change
// and a low one-time key count for the bot. It checks what users would notice: the bot decrypts the member's
// message, the member gets the ghost's session again and the outsider does not, the ghost's session in the
// member's room is replaced, and the bot's one-time keys are topped up on the server.
func TestHandleTransactionCrypto(t *testing.T) {
	for _, stable := range []bool{false, true} {
		name := "msc_prefixes"
		if stable {
			name = "stable_names"
		}
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			db := dbtest.Open(t, "postgres")
			r := newShareRig(t, db, 3)
			member, outsider := r.members[0], r.members[2]
			bot := r.openDevice(t, id.NewUserID("bot", r.srv.Domain()), "")
			ss := sqlstatestore.NewSQLStateStore(db, dbutil.NoopLogger, false)
			if err := ss.Upgrade(ctx); err != nil {
				t.Fatal(err)
			}
			isOwn := func(u id.UserID) bool { return u == bot.userID || u == r.ghost.userID }
			m := NewMachine(zerolog.Nop(), Config{}, db, ss, bot.client, isOwn)
			m.bot, m.perGhost, m.shareLevel = bot, true, levelCrossSignedTOFU
			m.botReady.Store(true)
			m.asMode.Store(true)
			m.setGhost(r.ghost.userID, &ghostState{dev: r.ghost})
			r.ghost.mach.AllowKeyShare = m.allowKeyShare(r.ghost)
			bot.mach.AllowKeyShare = m.allowKeyShare(bot)
			enc := &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1}
			if err := ss.SetEncryptionEvent(ctx, r.room, enc); err != nil {
				t.Fatal(err)
			}
			inRoom := []id.UserID{r.members[0].ID, r.members[1].ID, bot.userID, r.ghost.userID}
			for _, u := range inRoom {
				if err := ss.SetMembership(ctx, r.room, u, event.MembershipJoin); err != nil {
					t.Fatal(err)
				}
			}

			// The ghost shares its session with the room's members (not with the outsider).
			ghostShare, err := r.ghost.share(ctx, r.room, []id.UserID{r.members[0].ID, r.members[1].ID}, r.policy())
			if err != nil {
				t.Fatal(err)
			}
			ghostMsg := r.encryptAsGhost(t, "from the ghost")
			member.ReceiveToDevice(ctx)
			member.Store.GroupSessions = make(map[id.RoomID]map[id.SessionID]*crypto.InboundGroupSession) // the member's client lost the key and asks again
			if _, err = member.Decrypt(ctx, ghostMsg); err == nil {
				t.Fatal("the member still decrypts after dropping the session")
			}

			// The member sends the bot a room key (the homeserver queues it; the transaction carries it).
			if err = member.SetRoom(ctx, r.room, inRoom, enc); err != nil {
				t.Fatal(err)
			}
			encrypted, _, err := member.Encrypt(ctx, r.room, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: "to the bot"})
			if err != nil {
				t.Fatal(err)
			}
			toDevice := pushedTo(bot, r.srv.TakeToDevice(bot.userID, bot.client.DeviceID))
			if len(toDevice) == 0 {
				t.Fatal("the member sent the bot no room key")
			}
			r.srv.TakeToDevice(r.ghost.userID, r.ghost.client.DeviceID)
			keyRequest := func(from *userDevice, reqID string) map[string]any {
				return map[string]any{"type": event.ToDeviceRoomKeyRequest.Type, "sender": from.user,
					"to_user_id": r.ghost.userID, "to_device_id": r.ghost.client.DeviceID,
					"content": map[string]any{"action": "request", "request_id": reqID, "requesting_device_id": from.device,
						"body": map[string]any{"algorithm": id.AlgorithmMegolmV1, "room_id": r.room, "session_id": ghostShare.SessionID,
							"sender_key": r.ghost.mach.OwnIdentity().IdentityKey}}}
			}
			toDevice = append(toDevice, keyRequest(&userDevice{member.ID, member.DeviceID}, "req1"),
				keyRequest(&userDevice{outsider.ID, outsider.DeviceID}, "req2"))
			// Members' clients used up most of the bot's one-time keys.
			for i := 0; i < 40; i++ {
				if _, err = outsider.Client.ClaimKeys(ctx, &mautrix.ReqClaimKeys{OneTimeKeys: mautrix.OneTimeKeysRequest{
					bot.userID: {bot.client.DeviceID: id.KeyAlgorithmSignedCurve25519}}}); err != nil {
					t.Fatal(err)
				}
			}
			otkBefore := r.srv.OTKCount(bot.userID, bot.client.DeviceID)
			txn := map[string]any{"events": []any{}}
			lists := map[string]any{"changed": []id.UserID{r.members[1].ID}, "left": []id.UserID{}}
			counts := map[id.UserID]map[id.DeviceID]map[string]int{bot.userID: {bot.client.DeviceID: {"signed_curve25519": otkBefore}}}
			if stable {
				txn["to_device"], txn["device_lists"], txn["device_one_time_keys_count"] = toDevice, lists, counts
			} else {
				txn["de.sorunome.msc2409.to_device"], txn["org.matrix.msc3202.device_lists"] = toDevice, lists
				txn["org.matrix.msc3202.device_one_time_keys_count"] = counts
				txn["org.matrix.msc3202.device_unused_fallback_key_types"] = map[id.UserID]map[id.DeviceID][]string{bot.userID: {bot.client.DeviceID: {"signed_curve25519"}}}
			}
			raw, err := json.Marshal(txn)
			if err != nil {
				t.Fatal(err)
			}
			if err = m.HandleTransactionCrypto(ctx, raw); err != nil {
				t.Fatal(err)
			}

			// The bot decrypts the member's message.
			dec, err := m.Decrypt(ctx, &event.Event{ID: "$member", RoomID: r.room, Sender: member.ID, Type: event.EventEncrypted,
				Content: event.Content{Parsed: encrypted}})
			if err != nil || dec.Content.AsMessage().Body != "to the bot" {
				t.Errorf("the bot cannot decrypt the member's message after the transaction: %v", err)
			}
			// The member got the ghost's session back; the outsider got nothing it could use.
			member.ReceiveToDevice(ctx)
			if dec, err = member.Decrypt(ctx, ghostMsg); err != nil || dec.Content.AsMessage().Body != "from the ghost" {
				t.Errorf("the member's key request was not answered: %v", err)
			}
			for _, evt := range r.srv.TakeToDevice(outsider.ID, outsider.DeviceID) {
				if evt.Type == event.ToDeviceEncrypted {
					t.Errorf("the outsider got an encrypted to-device event (%s) in answer to its key request", evt.Type.Type)
				}
			}
			// A member's device list changed: the ghost's session in their room is replaced.
			if out, err := r.ghost.store.GetOutboundGroupSession(ctx, r.room); err != nil || out != nil {
				t.Errorf("the ghost's outbound session survived a member's device change (err %v)", err)
			}
			// The bot's one-time keys were topped up.
			if after := r.srv.OTKCount(bot.userID, bot.client.DeviceID); after <= otkBefore {
				t.Errorf("the bot's one-time keys on the server went from %d to %d, want more", otkBefore, after)
			}
		})
	}
}

// pushedTo shapes to-device events queued for dev as a transaction pushes them (with to_user_id and to_device_id).
func pushedTo(dev *device, evts []*event.Event) []map[string]any {
	out := make([]map[string]any, 0, len(evts))
	for _, e := range evts {
		out = append(out, map[string]any{"type": e.Type.Type, "sender": e.Sender,
			"to_user_id": dev.userID, "to_device_id": dev.client.DeviceID, "content": e.Content.VeryRaw})
	}
	return out
}

type userDevice struct {
	user   id.UserID
	device id.DeviceID
}

// encryptAsGhost encrypts a message with the ghost's current session.
func (r *shareRig) encryptAsGhost(t *testing.T, body string) *event.Event {
	t.Helper()
	enc, err := r.ghost.mach.EncryptMegolmEvent(context.Background(), r.room, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: body})
	if err != nil {
		t.Fatal(err)
	}
	return &event.Event{ID: id.EventID("$" + body), RoomID: r.room, Sender: r.ghost.userID, Type: event.EventEncrypted, Content: event.Content{Parsed: enc}}
}

// TestCatchUpFetchesDroppedToDevice: the homeserver dropped a member's room key instead of pushing it (Synapse does
// while it counts ferry as down) but keeps it in the bot device's inbox. Before asking the member for the key, the
// bot fetches it from there and decrypts; no key request goes out. A message the push delivered and the inbox
// still holds is not handled twice.
func TestCatchUpFetchesDroppedToDevice(t *testing.T) {
	ctx := context.Background()
	db := dbtest.Open(t, "postgres")
	r := newShareRig(t, db, 2)
	member := r.members[0]
	bot := r.openDevice(t, id.NewUserID("bot", r.srv.Domain()), "")
	ss := sqlstatestore.NewSQLStateStore(db, dbutil.NoopLogger, false)
	if err := ss.Upgrade(ctx); err != nil {
		t.Fatal(err)
	}
	m := NewMachine(zerolog.Nop(), Config{}, db, ss, bot.client, func(u id.UserID) bool { return u == bot.userID })
	m.bot = bot
	m.botReady.Store(true)
	m.asMode.Store(true)
	enc := &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1}
	inRoom := []id.UserID{member.ID, bot.userID}
	if err := member.SetRoom(ctx, r.room, inRoom, enc); err != nil {
		t.Fatal(err)
	}
	send := func(body string) *event.Event {
		encrypted, _, err := member.Encrypt(ctx, r.room, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: body})
		if err != nil {
			t.Fatal(err)
		}
		return &event.Event{ID: id.EventID("$" + body), RoomID: r.room, Sender: member.ID, Type: event.EventEncrypted, Content: event.Content{Parsed: encrypted}}
	}
	evt := send("dropped")
	if _, err := m.Decrypt(ctx, evt); err == nil {
		t.Fatal("the bot decrypts before it has the key")
	}
	if err := m.RequestKey(ctx, evt); err != nil {
		t.Fatal(err)
	}
	if dec, err := m.Decrypt(ctx, evt); err != nil || dec.Content.AsMessage().Body != "dropped" {
		t.Fatalf("the bot cannot decrypt after fetching its inbox: %v", err)
	}
	for _, e := range r.srv.TakeToDevice(member.ID, member.DeviceID) {
		if e.Type == event.ToDeviceRoomKeyRequest {
			t.Error("the bot asked the member for a key its inbox held")
		}
	}
	// The next key arrives by push and stays in the inbox too: a catch-up does not handle it again.
	if err := member.Machine.CryptoStore.RemoveOutboundGroupSession(ctx, r.room); err != nil { // a rotation
		t.Fatal(err)
	}
	pushedEvt := send("pushed")
	toDevice := pushedTo(bot, r.srv.PeekToDevice(bot.userID, bot.client.DeviceID))
	if len(toDevice) == 0 {
		t.Fatal("the member shared no new session with the bot")
	}
	raw, _ := json.Marshal(map[string]any{"events": []any{}, "to_device": toDevice})
	if err := m.HandleTransactionCrypto(ctx, raw); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Decrypt(ctx, pushedEvt); err != nil {
		t.Fatalf("the pushed key does not decrypt: %v", err)
	}
	if n, err := m.CatchUpToDevice(ctx, time.Now()); err != nil || n != 0 {
		t.Fatalf("a catch-up handled %d messages again (err %v), want 0", n, err)
	}
}
