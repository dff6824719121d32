package bridge

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/internal/fakehs"
)

// TestJudgeStanding is the rule for commands acting on a room: who may do what, where.
func TestJudgeStanding(t *testing.T) {
	const need = 50
	for name, tc := range map[string]struct {
		level      Level
		here       bool
		membership event.Membership
		power      int
		want       denial
	}{
		"member with the power here":               {level: LevelUser, here: true, membership: event.MembershipJoin, power: 50, want: denyNone},
		"member with the power elsewhere":          {level: LevelUser, membership: event.MembershipJoin, power: 100, want: denyNone},
		"member without the power here":            {level: LevelUser, here: true, membership: event.MembershipJoin, power: 49, want: denyPower},
		"member without the power elsewhere":       {level: LevelUser, membership: event.MembershipJoin, power: 0, want: denyPower},
		"left, power still listed":                 {level: LevelUser, membership: event.MembershipLeave, power: 100, want: denyNotJoined},
		"banned, power still listed":               {level: LevelUser, membership: event.MembershipBan, power: 100, want: denyNotJoined},
		"invited with power":                       {level: LevelUser, membership: event.MembershipInvite, power: 100, want: denyNotJoined},
		"knocking with power":                      {level: LevelUser, membership: event.MembershipKnock, power: 100, want: denyNotJoined},
		"never a member":                           {level: LevelUser, membership: "", power: 100, want: denyNotJoined},
		"kicked from the command's own room":       {level: LevelUser, here: true, membership: event.MembershipLeave, power: 100, want: denyNotJoined},
		"ferry admin without power elsewhere":      {level: LevelAdmin, membership: event.MembershipJoin, power: 0, want: denyNone},
		"ferry admin not a member elsewhere":       {level: LevelAdmin, membership: "", power: 0, want: denyNone},
		"ferry admin without power here":           {level: LevelAdmin, here: true, membership: event.MembershipJoin, power: 0, want: denyNone},
		"ferry admin who left the command's room":  {level: LevelAdmin, here: true, membership: event.MembershipLeave, power: 100, want: denyNotJoined},
		"ferry admin banned from the command room": {level: LevelAdmin, here: true, membership: event.MembershipBan, power: 100, want: denyNotJoined},
	} {
		t.Run(name, func(t *testing.T) {
			got := judgeStanding(tc.level, tc.here, standing{Membership: tc.membership, Level: tc.power, Need: need})
			if got != tc.want {
				t.Fatalf("judgeStanding = %d, want %d", got, tc.want)
			}
		})
	}
}

func TestIsControlType(t *testing.T) {
	for typ, want := range map[string]bool{
		"m.room.redaction":               true,
		"m.room.member":                  true,
		"m.room.power_levels":            true,
		"m.room.encryption":              true,
		"m.room.create":                  true,
		"m.bridge":                       true,
		"io.element.functional_members":  true,
		"com.beeper.disappearing_timer":  true,
		"m.call.member":                  true,
		"org.matrix.msc3401.call.member": true,
		"m.room.message":                 false,
		"m.reaction":                     false,
		"m.sticker":                      false,
		"m.call.invite":                  false,
		"m.call.hangup":                  false,
		"m.rtc.notification":             false,
		"org.example.custom":             false,
	} {
		t.Run(typ, func(t *testing.T) {
			if got := isControlType(event.Type{Type: typ, Class: event.MessageEventType}); got != want {
				t.Fatalf("isControlType(%s) = %t, want %t", typ, got, want)
			}
		})
	}
}

func TestRedactionCrosses(t *testing.T) {
	for name, tc := range map[string]struct {
		sentOriginal bool
		level, need  int
		want         bool
	}{
		"own message, no power":        {sentOriginal: true, level: 0, need: 50, want: true},
		"someone else's, no power":     {level: 0, need: 50, want: false},
		"someone else's, just short":   {level: 49, need: 50, want: false},
		"someone else's, redact power": {level: 50, need: 50, want: true},
		"someone else's, admin":        {level: 100, need: 50, want: true},
		"redact level lowered to 0":    {level: 0, need: 0, want: true},
	} {
		t.Run(name, func(t *testing.T) {
			if got := redactionCrosses(tc.sentOriginal, tc.level, tc.need); got != tc.want {
				t.Fatalf("redactionCrosses = %t, want %t", got, tc.want)
			}
		})
	}
}

func TestRedactsOf(t *testing.T) {
	top := &event.Event{Type: event.EventRedaction, Redacts: "$top", Content: event.Content{Parsed: &event.RedactionEventContent{Redacts: "$content"}}}
	if got := redactsOf(top); got != "$top" {
		t.Errorf("top-level redacts: got %s", got)
	}
	v11 := &event.Event{Type: event.EventRedaction, Content: event.Content{Parsed: &event.RedactionEventContent{Redacts: "$content"}}}
	if got := redactsOf(v11); got != "$content" {
		t.Errorf("content redacts: got %s", got)
	}
}

// scriptedCrypto decrypts each event to the cleartext scripted for its ID (a message when none is); what ferry
// encrypts stays readable (sealCrypto), so tests read its notices.
type scriptedCrypto struct {
	sealCrypto
	cleartext map[id.EventID]*event.Event
}

func newScriptedCrypto() *scriptedCrypto {
	return &scriptedCrypto{sealCrypto: sealCrypto{benchCrypto{plaintext: benchMessage()}}, cleartext: map[id.EventID]*event.Event{}}
}

func (c *scriptedCrypto) Decrypt(ctx context.Context, evt *event.Event) (*event.Event, error) {
	if clear := c.cleartext[evt.ID]; clear != nil {
		dec := *clear
		dec.ID, dec.RoomID, dec.Sender, dec.Timestamp = evt.ID, evt.RoomID, evt.Sender, evt.Timestamp
		dec.Mautrix.WasEncrypted = true
		dec.Mautrix.ReceivedAt = evt.Mautrix.ReceivedAt // as ferry's crypto keeps it
		return &dec, nil
	}
	return c.benchCrypto.Decrypt(ctx, evt)
}

// process records one event, as the homeserver would deliver it, and runs it through the room worker's handling.
func (f *relayFixture) process(t *testing.T, evt map[string]any) {
	t.Helper()
	ctx := context.Background()
	raw, _ := json.Marshal(evt)
	str := func(key string) string { return fmt.Sprint(evt[key]) }
	evtID, room := id.EventID(str("event_id")), id.RoomID(str("room_id"))
	row := &database.InboxEvent{EventID: evtID, RoomID: room, Sender: id.UserID(str("sender")), Type: str("type"), Raw: raw, State: database.InboxPending, ReceivedAt: time.Now()}
	if _, err := f.br.DB.Inbox.Insert(ctx, []*database.InboxEvent{row}); err != nil {
		t.Fatal(err)
	}
	rows, err := f.br.DB.Inbox.NextInRoom(ctx, room, workerBatch)
	if err != nil || len(rows) != 1 {
		t.Fatalf("inbox: %d rows, %v", len(rows), err)
	}
	bw := &batchWrites{}
	if !f.br.processRow(ctx, rows[0], bw) || !f.br.commitBatch(ctx, bw) {
		t.Fatal("the worker gave up")
	}
}

// encryptedFrom is an m.room.encrypted event from sender in room.
func encryptedFrom(evtID id.EventID, room id.RoomID, sender id.UserID) map[string]any {
	return map[string]any{
		"event_id": evtID, "room_id": room, "sender": sender, "type": "m.room.encrypted", "origin_server_ts": time.Now().UnixMilli(),
		"content": map[string]any{"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AAAA", "session_id": "S", "sender_key": "K", "device_id": "D"},
	}
}

// redactions lists the events redacted in room through the client API.
func (f *relayFixture) redactions(room id.RoomID) []id.EventID {
	var out []id.EventID
	for _, raw := range f.hs.Timeline(room) {
		var e struct {
			Type    string     `json:"type"`
			Redacts id.EventID `json:"redacts"`
		}
		_ = json.Unmarshal(raw, &e)
		if e.Type == event.EventRedaction.Type {
			out = append(out, e.Redacts)
		}
	}
	return out
}

// TestRedactionAuthority: in room A (alice created it: power 100; dave is a moderator at 50; carol has 0), only
// real redactions by the original's sender or by someone with the redact power redact the copy in room B. An
// encrypted event whose cleartext is a redaction, and a real redaction the server would not apply, do nothing.
func TestRedactionAuthority(t *testing.T) {
	cr := newScriptedCrypto()
	f := newRelayFixtureWith(t, cr)
	carol, dave := id.UserID("@carol:ferry.test"), id.UserID("@dave:ferry.test")
	for _, u := range []id.UserID{carol, dave} {
		if err := f.hs.Join(f.roomA, u); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.hs.SetState(f.roomA, f.alice, "m.room.power_levels", "", map[string]any{
		"users": map[id.UserID]int{f.alice: 100, dave: 50}, "state_default": 50, "redact": 50,
	}); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	n := 0
	message := func(from id.UserID) (original, copy id.EventID) {
		n++
		original = id.EventID(fmt.Sprintf("$msg%d", n))
		f.process(t, encryptedFrom(original, f.roomA, from))
		c, err := f.br.DB.EventMap.Get(ctx, original, f.roomB)
		if err != nil || c == nil {
			t.Fatalf("no copy of %s: %v", original, err)
		}
		return original, c.TargetEvent
	}
	realRedaction := func(from id.UserID, redacts id.EventID) {
		n++
		f.process(t, map[string]any{
			"event_id": fmt.Sprintf("$red%d", n), "room_id": f.roomA, "sender": from, "type": "m.room.redaction",
			"redacts": redacts, "origin_server_ts": time.Now().UnixMilli(), "content": map[string]any{"redacts": redacts},
		})
	}
	for _, tc := range []struct {
		name   string
		author id.UserID
		redact func(original id.EventID)
		want   bool
	}{
		{"encrypted cleartext redaction by a plain member", f.alice, func(original id.EventID) {
			n++
			evtID := id.EventID(fmt.Sprintf("$fake%d", n))
			cr.cleartext[evtID] = &event.Event{Type: event.EventRedaction, Content: event.Content{Parsed: &event.RedactionEventContent{Redacts: original}, Raw: map[string]any{"redacts": string(original)}}}
			f.process(t, encryptedFrom(evtID, f.roomA, carol))
		}, false},
		{"encrypted cleartext redaction by the original's sender", f.alice, func(original id.EventID) {
			n++
			evtID := id.EventID(fmt.Sprintf("$fake%d", n))
			cr.cleartext[evtID] = &event.Event{Type: event.EventRedaction, Content: event.Content{Parsed: &event.RedactionEventContent{Redacts: original}, Raw: map[string]any{"redacts": string(original)}}}
			f.process(t, encryptedFrom(evtID, f.roomA, f.alice))
		}, false},
		{"real redaction by a plain member the server does not apply", f.alice, func(original id.EventID) { realRedaction(carol, original) }, false},
		{"real redaction by the original's sender", carol, func(original id.EventID) { realRedaction(carol, original) }, true},
		{"real redaction by a moderator", carol, func(original id.EventID) { realRedaction(dave, original) }, true},
		{"real redaction by the room's creator", carol, func(original id.EventID) { realRedaction(f.alice, original) }, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			original, copy := message(tc.author)
			tc.redact(original)
			got := false
			for _, r := range f.redactions(f.roomB) {
				got = got || r == copy
			}
			if got != tc.want {
				t.Fatalf("copy redacted: %t, want %t", got, tc.want)
			}
		})
	}
}

// commandRoom makes an encrypted room on the fake homeserver with creator (power 100), the bot and members
// joined, known to ferry's state store as the homeserver has it.
func (f *relayFixture) commandRoom(t *testing.T, creator id.UserID, members ...id.UserID) id.RoomID {
	t.Helper()
	ctx := context.Background()
	enc := &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1}
	bot := f.br.AS.BotMXID()
	room := f.hs.CreateRoom(creator, fakehs.RoomOptions{Encryption: enc, Members: append([]id.UserID{bot}, members...)})
	for _, u := range append([]id.UserID{creator, bot}, members...) {
		if err := f.br.StateStore.SetMembership(ctx, room, u, event.MembershipJoin); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.br.StateStore.SetEncryptionEvent(ctx, room, enc); err != nil {
		t.Fatal(err)
	}
	return room
}

// command sends body as an encrypted message from sender in room and handles it.
func (f *relayFixture) command(t *testing.T, cr *scriptedCrypto, room id.RoomID, sender id.UserID, body string) {
	t.Helper()
	f.n++
	evtID := id.EventID(fmt.Sprintf("$cmd%d", f.n))
	cr.cleartext[evtID] = &event.Event{Type: event.EventMessage, Content: event.Content{Parsed: &event.MessageEventContent{MsgType: event.MsgText, Body: body}}}
	f.process(t, encryptedFrom(evtID, room, sender))
}

// TestCommandAuthority: power levels outlive leaving and bans, but a command acting on a room needs its sender
// joined there now. Attack 2 of issue 12: a user who left or was banned from a room, still listed at power 50
// there, links it from a room of her own; ferry only asks the room (a link request). A ferry admin needs no
// membership in the other room; everyone must still be in the room they send a command in.
func TestCommandAuthority(t *testing.T) {
	cr := newScriptedCrypto()
	f := newRelayFixtureWith(t, cr)
	ctx := context.Background()
	admin := id.UserID("@admin:ferry.test")
	f.br.SetPermissions(Permissions{"ferry.test": LevelUser, string(admin): LevelAdmin})
	bob := id.UserID("@bob:ferry.test")
	linkedTo := func(room id.RoomID) string {
		link, err := f.br.DB.Links.GetByRoom(ctx, room)
		if err != nil {
			return ""
		}
		return link.ID
	}
	for _, tc := range []struct {
		name       string
		membership event.Membership // the linker's membership in the target room when she links
		linker     id.UserID
		wantLinked bool
	}{
		{"left, power still listed", event.MembershipLeave, "@mallory:ferry.test", false},
		{"banned, power still listed", event.MembershipBan, "@mallory2:ferry.test", false},
		{"invited, power listed", event.MembershipInvite, "@mallory3:ferry.test", false},
		{"joined with power", event.MembershipJoin, "@moderator:ferry.test", true},
		{"ferry admin who never joined", "", admin, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			own := f.commandRoom(t, tc.linker)
			target := f.commandRoom(t, bob)
			pl := map[string]any{"users": map[id.UserID]int{bob: 100}, "state_default": 50}
			if tc.linker != admin {
				pl["users"].(map[id.UserID]int)[tc.linker] = 50
			}
			if err := f.hs.SetState(target, bob, "m.room.power_levels", "", pl); err != nil {
				t.Fatal(err)
			}
			if tc.membership != "" {
				if err := f.hs.SetState(target, bob, "m.room.member", string(tc.linker), map[string]any{"membership": tc.membership}); err != nil {
					t.Fatal(err)
				}
			}
			f.command(t, cr, own, tc.linker, "!ferry link "+string(target))
			linked := linkedTo(own) != "" && linkedTo(own) == linkedTo(target)
			if linked != tc.wantLinked {
				t.Fatalf("linked: %t, want %t", linked, tc.wantLinked)
			}
		})
	}

	t.Run("a member kicked after sending a command", func(t *testing.T) {
		roomX := f.commandRoom(t, bob)
		roomY := f.commandRoom(t, bob)
		f.command(t, cr, roomX, bob, "!ferry link "+string(roomY))
		if linkedTo(roomX) == "" {
			t.Fatal("bob could not link his own rooms")
		}
		// bob (power 100 in X) sends unlink and is banned before ferry handles it: the command does nothing.
		if err := f.hs.SetState(roomX, admin, "m.room.member", string(bob), map[string]any{"membership": "ban"}); err != nil {
			t.Fatal(err)
		}
		f.command(t, cr, roomX, bob, "!ferry unlink")
		if linkedTo(roomX) == "" {
			t.Fatal("a banned member's unlink was obeyed")
		}
	})
}
