package bridge

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/internal/fakehs"
)

// sealedEvent is an event ferry sent into a room, with its content as ferry encrypted it (sealCrypto).
type sealedEvent struct {
	ID      id.EventID
	Sender  id.UserID
	Content map[string]any
}

// sealed lists what ferry's users (bot and ghosts) sent into room, oldest first, with readable content.
func (f *relayFixture) sealed(room id.RoomID) []sealedEvent {
	var out []sealedEvent
	for _, raw := range f.hs.Timeline(room) {
		var e struct {
			ID      id.EventID                  `json:"event_id"`
			Type    string                      `json:"type"`
			Sender  id.UserID                   `json:"sender"`
			Content event.EncryptedEventContent `json:"content"`
		}
		if json.Unmarshal(raw, &e) != nil || e.Type != event.EventEncrypted.Type || !f.br.Ghosts.IsOwn(e.Sender) {
			continue
		}
		data, err := base64.RawStdEncoding.DecodeString(string(e.Content.MegolmCiphertext))
		if err != nil {
			continue
		}
		var c map[string]any
		_ = json.Unmarshal(data, &c)
		out = append(out, sealedEvent{ID: e.ID, Sender: e.Sender, Content: c})
	}
	return out
}

// upgradeFixture is a relay fixture whose room A (alice's) can be upgraded.
type upgradeFixture struct {
	*relayFixture
	cr  *scriptedCrypto
	bob id.UserID
}

func newUpgradeFixture(t *testing.T) *upgradeFixture {
	cr := newScriptedCrypto()
	f := &upgradeFixture{relayFixture: newRelayFixtureWith(t, cr), cr: cr, bob: "@bob:ferry.test"}
	f.br.SetPermissions(Permissions{"ferry.test": LevelUser})
	return f
}

// message relays a text message from sender in room and returns its copy in the link's other room.
func (f *upgradeFixture) message(t *testing.T, room, other id.RoomID, sender id.UserID, body string) (original, copy id.EventID) {
	t.Helper()
	f.n++
	original = id.EventID(fmt.Sprintf("$m%d", f.n))
	f.cr.cleartext[original] = &event.Event{Type: event.EventMessage, Content: event.Content{Parsed: &event.MessageEventContent{MsgType: event.MsgText, Body: body}}}
	f.process(t, encryptedFrom(original, room, sender))
	c, err := f.br.DB.EventMap.Get(context.Background(), original, other)
	if err != nil || c == nil {
		t.Fatalf("no copy of %s in %s: %v", original, other, err)
	}
	return original, c.TargetEvent
}

// relation relays an encrypted event from sender in room whose cleartext is typ with content.
func (f *upgradeFixture) relation(t *testing.T, room id.RoomID, sender id.UserID, typ event.Type, content map[string]any) {
	t.Helper()
	f.n++
	evtID := id.EventID(fmt.Sprintf("$r%d", f.n))
	data, _ := json.Marshal(content)
	f.cr.cleartext[evtID] = &event.Event{Type: typ, Content: event.Content{VeryRaw: data}}
	f.process(t, encryptedFrom(evtID, room, sender))
}

// upgrade creates the room replacing A (alice upgrades it) and delivers A's tombstone.
func (f *upgradeFixture) upgrade(t *testing.T, opts fakehs.RoomOptions) id.RoomID {
	t.Helper()
	if opts.Encryption == nil {
		opts.Encryption = &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1}
	}
	if opts.Predecessor == "" {
		opts.Predecessor = f.roomA
	}
	successor := f.hs.CreateRoom(f.alice, opts)
	// An upgrade copies the old room's power levels: the bot keeps its moderator power.
	if err := f.hs.SetState(successor, f.alice, event.StatePowerLevels.Type, "", map[string]any{
		"users": map[id.UserID]int{f.alice: 100, f.br.AS.BotMXID(): moderatorPower}, "state_default": 50, "redact": 50,
	}); err != nil {
		t.Fatal(err)
	}
	f.n++
	f.process(t, map[string]any{
		"event_id": fmt.Sprintf("$tomb%d", f.n), "room_id": f.roomA, "sender": f.alice, "type": "m.room.tombstone", "state_key": "",
		"origin_server_ts": time.Now().UnixMilli(), "content": map[string]any{"body": "This room has been replaced", "replacement_room": successor},
	})
	return successor
}

func (f *upgradeFixture) linkRooms(t *testing.T) []id.RoomID {
	t.Helper()
	link, err := f.br.DB.Links.GetByRoom(context.Background(), f.roomB)
	if err != nil {
		t.Fatal(err)
	}
	return link.Rooms
}

func anyContains(list []string, part string) bool {
	return slices.ContainsFunc(list, func(s string) bool { return strings.Contains(s, part) })
}

// TestRoomUpgradeMovesTheLink: alice upgrades room A. ferry joins the new room, moves A's place in the link
// there, writes its room state, announces the move everywhere, and relays as before; edits, reactions and
// redactions of messages from before the upgrade go to the old room, where those messages live, and what alice
// does there to them still crosses; a reply to them links to the old room.
func TestRoomUpgradeMovesTheLink(t *testing.T) {
	f := newUpgradeFixture(t)
	ctx := context.Background()
	aliceOld, aliceOldInB := f.message(t, f.roomA, f.roomB, f.alice, "before the upgrade")
	bobOld, bobOldInA := f.message(t, f.roomB, f.roomA, f.bob, "bob before the upgrade")

	a2 := f.upgrade(t, fakehs.RoomOptions{Public: true})
	if got := f.linkRooms(t); !slices.Equal(got, []id.RoomID{a2, f.roomB}) {
		t.Fatalf("link rooms after the upgrade = %v, want the new room in A's place", got)
	}
	if m := f.hs.Membership(a2, f.br.AS.BotMXID()); m != event.MembershipJoin {
		t.Fatalf("the bot's membership in the new room = %q", m)
	}
	var bridgeState struct {
		Sender  id.UserID `json:"sender"`
		Content struct {
			Channel struct {
				ID string `json:"id"`
			} `json:"channel"`
		} `json:"content"`
	}
	link, _ := f.br.DB.Links.GetByRoom(ctx, a2)
	if err := json.Unmarshal(f.hs.StateEvent(a2, event.StateBridge.Type, bridgeStatePrefix+link.ID), &bridgeState); err != nil || bridgeState.Content.Channel.ID != link.ID {
		t.Fatalf("m.bridge in the new room = %+v, %v", bridgeState, err)
	}
	if !strings.Contains(string(f.hs.StateEvent(a2, event.StateElementFunctionalMembers.Type, "")), string(f.br.AS.BotMXID())) {
		t.Fatal("the bot is not a functional member of the new room")
	}
	if !anyContains(f.notices(t, f.roomB), "was upgraded to a new room") || !anyContains(f.notices(t, a2), "This room replaces") ||
		!anyContains(f.notices(t, f.roomA), "link moved into the room that replaced it") {
		t.Fatalf("announcements: B %q, new room %q, old room %q", f.notices(t, f.roomB), f.notices(t, a2), f.notices(t, f.roomA))
	}

	// Messages cross between the new room and B.
	f.message(t, a2, f.roomB, f.alice, "after the upgrade")
	f.message(t, f.roomB, a2, f.bob, "bob after the upgrade")

	// Bob reacts in B to alice's message from before the upgrade: the reaction lands on her original, in the
	// old room.
	before := len(f.sealed(f.roomA))
	f.relation(t, f.roomB, f.bob, event.EventReaction, map[string]any{"m.relates_to": map[string]any{"rel_type": "m.annotation", "event_id": aliceOldInB, "key": "👍"}})
	// Bob edits his message from before the upgrade: the edit goes to its copy in the old room.
	f.relation(t, f.roomB, f.bob, event.EventMessage, map[string]any{"msgtype": "m.text", "body": "* edited",
		"m.new_content": map[string]any{"msgtype": "m.text", "body": "edited"},
		"m.relates_to":  map[string]any{"rel_type": "m.replace", "event_id": bobOld}})
	got := f.sealed(f.roomA)[before:]
	if len(got) != 2 {
		t.Fatalf("the old room got %d events from ferry, want a reaction and an edit", len(got))
	}
	if relType, target := relatesTo(got[0].Content); relType != "m.annotation" || target != aliceOld {
		t.Fatalf("reaction in the old room relates to %s %s, want %s", relType, target, aliceOld)
	}
	if relType, target := relatesTo(got[1].Content); relType != "m.replace" || target != bobOldInA {
		t.Fatalf("edit in the old room relates to %s %s, want %s", relType, target, bobOldInA)
	}
	for _, e := range f.sealed(a2) {
		if relType, _ := relatesTo(e.Content); relType != "" {
			t.Fatalf("a relation to an event of the old room was sent into the new room: %v", e.Content)
		}
	}

	// Bob replies in B to alice's old message: the reply arrives in the new room, linking to the old room.
	f.relation(t, f.roomB, f.bob, event.EventMessage, map[string]any{"msgtype": "m.text", "body": "answering late",
		"m.relates_to": map[string]any{"m.in_reply_to": map[string]any{"event_id": aliceOldInB}}})
	inNew := f.sealed(a2)
	reply := inNew[len(inNew)-1].Content
	if _, ok := reply["m.relates_to"]; ok {
		t.Fatalf("the reply in the new room points at an event it cannot load: %v", reply["m.relates_to"])
	}
	if html, _ := reply["formatted_body"].(string); !strings.Contains(html, string(f.roomA.EventURI(aliceOld, "ferry.test").MatrixToURL())) {
		t.Fatalf("the reply does not link to the old room's event: %q", html)
	}

	// Bob redacts his old message: its copy in the old room goes.
	f.n++
	f.process(t, map[string]any{"event_id": fmt.Sprintf("$red%d", f.n), "room_id": f.roomB, "sender": f.bob, "type": "m.room.redaction",
		"redacts": bobOld, "origin_server_ts": time.Now().UnixMilli(), "content": map[string]any{"redacts": bobOld}})
	if !slices.Contains(f.redactions(f.roomA), bobOldInA) {
		t.Fatal("the copy in the old room was not redacted")
	}

	// Alice, in the old room, reacts to bob's old message: it crosses to B. A new message there does not.
	beforeB := len(f.sealed(f.roomB))
	f.relation(t, f.roomA, f.alice, event.EventReaction, map[string]any{"m.relates_to": map[string]any{"rel_type": "m.annotation", "event_id": bobOldInA, "key": "🎉"}})
	f.relation(t, f.roomA, f.alice, event.EventMessage, map[string]any{"msgtype": "m.text", "body": "talking in the old room"})
	gotB := f.sealed(f.roomB)[beforeB:]
	if len(gotB) != 1 {
		t.Fatalf("B got %d events from the old room, want only the reaction", len(gotB))
	}
	if relType, target := relatesTo(gotB[0].Content); relType != "m.annotation" || target != bobOld {
		t.Fatalf("the reaction from the old room relates to %s %s in B, want %s", relType, target, bobOld)
	}
}

// TestRoomUpgradeIntoInviteOnlyRoom: ferry cannot join the new room; it asks in the old room to be invited, and
// the invite completes the move.
func TestRoomUpgradeIntoInviteOnlyRoom(t *testing.T) {
	f := newUpgradeFixture(t)
	a2 := f.upgrade(t, fakehs.RoomOptions{})
	if got := f.linkRooms(t); !slices.Contains(got, f.roomA) {
		t.Fatalf("the link moved without ferry in the new room: %v", got)
	}
	if !anyContains(f.notices(t, f.roomA), "Invite me") {
		t.Fatalf("the old room was not asked for an invite: %q", f.notices(t, f.roomA))
	}
	if err := f.hs.SetState(a2, f.alice, event.StateMember.Type, string(f.br.AS.BotMXID()), map[string]any{"membership": "invite"}); err != nil {
		t.Fatal(err)
	}
	f.n++
	f.process(t, map[string]any{"event_id": fmt.Sprintf("$inv%d", f.n), "room_id": a2, "sender": f.alice, "type": "m.room.member",
		"state_key": f.br.AS.BotMXID(), "origin_server_ts": time.Now().UnixMilli(), "content": map[string]any{"membership": "invite"}})
	if got := f.linkRooms(t); !slices.Equal(got, []id.RoomID{a2, f.roomB}) {
		t.Fatalf("link rooms after the invite = %v, want the new room in A's place", got)
	}
	if !anyContains(f.notices(t, f.roomB), "was upgraded to a new room") {
		t.Fatalf("B was not told: %q", f.notices(t, f.roomB))
	}
}

// TestRoomUpgradeNeedsAuthority: a tombstone moves the link only into a room that names the old one as its
// predecessor, and only when whoever upgraded may change the new room's settings (the link boundary: no room's
// power reaches another room unasked).
func TestRoomUpgradeNeedsAuthority(t *testing.T) {
	for name, tc := range map[string]struct {
		opts  func(f *upgradeFixture) fakehs.RoomOptions
		setup func(t *testing.T, f *upgradeFixture, successor id.RoomID)
		why   string
	}{
		"a room that does not claim to replace A": {
			opts: func(f *upgradeFixture) fakehs.RoomOptions {
				return fakehs.RoomOptions{Public: true, Predecessor: "!elsewhere:ferry.test"}
			},
			why: "does not name this room as its predecessor",
		},
		"a room where the upgrader has no power": {
			opts: func(f *upgradeFixture) fakehs.RoomOptions { return fakehs.RoomOptions{Public: true} },
			setup: func(t *testing.T, f *upgradeFixture, successor id.RoomID) {
				// Alice's room, but bob holds the power there now.
				if err := f.hs.SetState(successor, f.alice, event.StatePowerLevels.Type, "", map[string]any{
					"users": map[id.UserID]int{f.bob: 100}, "state_default": 50,
				}); err != nil {
					t.Fatal(err)
				}
			},
			why: "may not change the new room's settings",
		},
		"a room of another link": {
			opts: func(f *upgradeFixture) fakehs.RoomOptions {
				return fakehs.RoomOptions{Public: true, Members: []id.UserID{f.br.AS.BotMXID()}}
			},
			setup: func(t *testing.T, f *upgradeFixture, successor id.RoomID) {
				other := f.commandRoom(t, f.bob)
				if _, err := f.br.DB.Links.Join(context.Background(), "other", successor, other, f.bob, time.Now()); err != nil {
					t.Fatal(err)
				}
			},
			why: "belongs to another link",
		},
	} {
		t.Run(name, func(t *testing.T) {
			f := newUpgradeFixture(t)
			opts := tc.opts(f)
			var successor id.RoomID
			if tc.setup != nil {
				// The room exists before the tombstone names it.
				opts.Predecessor = f.roomA
				successor = f.hs.CreateRoom(f.alice, opts)
				tc.setup(t, f, successor)
				f.n++
				f.process(t, map[string]any{
					"event_id": fmt.Sprintf("$tomb%d", f.n), "room_id": f.roomA, "sender": f.alice, "type": "m.room.tombstone", "state_key": "",
					"origin_server_ts": time.Now().UnixMilli(), "content": map[string]any{"replacement_room": successor},
				})
			} else {
				successor = f.upgrade(t, opts)
			}
			if got := f.linkRooms(t); !slices.Contains(got, f.roomA) {
				t.Fatalf("the link moved: %v", got)
			}
			if !anyContains(f.notices(t, f.roomA), tc.why) {
				t.Fatalf("the old room was not told why: %q", f.notices(t, f.roomA))
			}
			if _, err := f.br.DB.Links.GetByRetired(context.Background(), f.roomA); err != database.ErrLinkNotFound {
				t.Fatalf("A retired: %v", err)
			}
			// The bot leaves a room it does not link, and stays in one it links elsewhere.
			want := event.Membership("") // left (the fake homeserver forgets who left)
			if link, err := f.br.DB.Links.GetByRoom(context.Background(), successor); err == nil {
				want = event.MembershipJoin
				if link.ID != "other" {
					t.Fatalf("the other link changed: %v", link)
				}
			}
			if got := f.hs.Membership(successor, f.br.AS.BotMXID()); got != want {
				t.Fatalf("the bot's membership in the refused room = %q, want %q", got, want)
			}
		})
	}
}

// TestRoomUpgradeMutedOldRoom: homeservers mute the old room on upgrade (only moderators may speak there), so a
// ghost cannot edit or react there: the edit arrives in the new room as its new text under a link to the edited
// message, the reaction as an emote linking to the message; the bot, a moderator, redacts the old copy.
func TestRoomUpgradeMutedOldRoom(t *testing.T) {
	f := newUpgradeFixture(t)
	aliceOld, aliceOldInB := f.message(t, f.roomA, f.roomB, f.alice, "before the upgrade")
	bobOld, bobOldInA := f.message(t, f.roomB, f.roomA, f.bob, "bob before the upgrade")
	a2 := f.upgrade(t, fakehs.RoomOptions{Public: true})
	f.n++
	f.process(t, map[string]any{
		"event_id": fmt.Sprintf("$pl%d", f.n), "room_id": f.roomA, "sender": f.alice, "type": "m.room.power_levels", "state_key": "",
		"origin_server_ts": time.Now().UnixMilli(), "content": map[string]any{
			"users": map[id.UserID]int{f.alice: 100, f.br.AS.BotMXID(): moderatorPower}, "events_default": 50, "invite": 50, "state_default": 50, "redact": 50,
		},
	})
	before := len(f.sealed(f.roomA))
	f.relation(t, f.roomB, f.bob, event.EventReaction, map[string]any{"m.relates_to": map[string]any{"rel_type": "m.annotation", "event_id": aliceOldInB, "key": "👍"}})
	f.relation(t, f.roomB, f.bob, event.EventMessage, map[string]any{"msgtype": "m.text", "body": "* edited",
		"m.new_content": map[string]any{"msgtype": "m.text", "body": "edited <now>"},
		"m.relates_to":  map[string]any{"rel_type": "m.replace", "event_id": bobOld}})
	if got := f.sealed(f.roomA)[before:]; len(got) != 0 {
		t.Fatalf("ferry posted %d events into the muted old room", len(got))
	}
	inNew := f.sealed(a2)
	if len(inNew) < 2 {
		t.Fatalf("the new room got %d events", len(inNew))
	}
	reaction, edit := inNew[len(inNew)-2].Content, inNew[len(inNew)-1].Content
	oldLink := func(evt id.EventID) string { return f.roomA.EventURI(evt, "ferry.test").MatrixToURL() }
	if reaction["msgtype"] != "m.emote" || !strings.Contains(reaction["body"].(string), "reacted 👍 to") || !strings.Contains(reaction["formatted_body"].(string), oldLink(aliceOld)) {
		t.Fatalf("restated reaction = %v", reaction)
	}
	if _, ok := reaction["m.relates_to"]; ok {
		t.Fatalf("the restated reaction relates to an event of another room: %v", reaction)
	}
	if body := edit["body"].(string); !strings.HasSuffix(body, "\n\nedited <now>") || !strings.Contains(edit["formatted_body"].(string), oldLink(bobOldInA)) ||
		!strings.HasSuffix(edit["formatted_body"].(string), "edited &lt;now&gt;") {
		t.Fatalf("restated edit = %v", edit)
	}
	// Bob redacts his old message: the bot redacts its copy in the old room.
	f.n++
	f.process(t, map[string]any{"event_id": fmt.Sprintf("$red%d", f.n), "room_id": f.roomB, "sender": f.bob, "type": "m.room.redaction",
		"redacts": bobOld, "origin_server_ts": time.Now().UnixMilli(), "content": map[string]any{"redacts": bobOld}})
	var redactedBy id.UserID
	for _, raw := range f.hs.Timeline(f.roomA) {
		var e struct {
			Type    string     `json:"type"`
			Sender  id.UserID  `json:"sender"`
			Redacts id.EventID `json:"redacts"`
		}
		if json.Unmarshal(raw, &e) == nil && e.Type == "m.room.redaction" && e.Redacts == bobOldInA {
			redactedBy = e.Sender
		}
	}
	if redactedBy != f.br.AS.BotMXID() {
		t.Fatalf("the copy in the muted old room was redacted by %q, want the bot", redactedBy)
	}
}
