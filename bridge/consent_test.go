package bridge

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
)

func TestLinkScope(t *testing.T) {
	ab := &database.Link{ID: "L", Rooms: []id.RoomID{"!a", "!b"}}
	de := &database.Link{ID: "M", Rooms: []id.RoomID{"!d", "!e"}}
	for name, tc := range map[string]struct {
		from, target         id.RoomID
		fromLink, targetLink *database.Link
		want                 []id.RoomID
	}{
		"two unlinked rooms":             {from: "!c", target: "!a", want: []id.RoomID{"!a", "!c"}},
		"joining an existing link":       {from: "!c", target: "!a", targetLink: ab, want: []id.RoomID{"!a", "!b", "!c"}},
		"bringing a room into one's own": {from: "!a", target: "!c", fromLink: ab, want: []id.RoomID{"!a", "!b", "!c"}},
		"two links (refused elsewhere)":  {from: "!a", target: "!d", fromLink: ab, targetLink: de, want: []id.RoomID{"!a", "!b", "!d", "!e"}},
	} {
		t.Run(name, func(t *testing.T) {
			if got := linkScope(tc.from, tc.target, tc.fromLink, tc.targetLink); !slices.Equal(got, tc.want) {
				t.Fatalf("linkScope = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestMergeConsents(t *testing.T) {
	stillValid := func(id.RoomID, id.UserID) bool { return true }
	for name, tc := range map[string]struct {
		scope       []id.RoomID
		recorded    []database.ConsentRoom
		valid       func(id.RoomID, id.UserID) bool
		wantWaiting []id.RoomID
		wantRooms   []database.ConsentRoom
	}{
		"all consented and valid": {
			scope: []id.RoomID{"!a", "!b"}, recorded: []database.ConsentRoom{{RoomID: "!a", ConsentedBy: "@u"}, {RoomID: "!b", ConsentedBy: "@v"}}, valid: stillValid,
			wantRooms: []database.ConsentRoom{{RoomID: "!a", ConsentedBy: "@u"}, {RoomID: "!b", ConsentedBy: "@v"}},
		},
		"one waiting": {
			scope: []id.RoomID{"!a", "!b"}, recorded: []database.ConsentRoom{{RoomID: "!a", ConsentedBy: "@u"}, {RoomID: "!b", ConsentedBy: ""}}, valid: stillValid,
			wantWaiting: []id.RoomID{"!b"}, wantRooms: []database.ConsentRoom{{RoomID: "!a", ConsentedBy: "@u"}, {RoomID: "!b", ConsentedBy: ""}},
		},
		"a consenter who lost the power waits again": {
			scope: []id.RoomID{"!a", "!b"}, recorded: []database.ConsentRoom{{RoomID: "!a", ConsentedBy: "@u"}, {RoomID: "!b", ConsentedBy: "@gone"}},
			valid:       func(_ id.RoomID, by id.UserID) bool { return by != "@gone" },
			wantWaiting: []id.RoomID{"!b"}, wantRooms: []database.ConsentRoom{{RoomID: "!a", ConsentedBy: "@u"}, {RoomID: "!b", ConsentedBy: ""}},
		},
		"a room that joined the link meanwhile is asked too": {
			scope: []id.RoomID{"!a", "!b", "!new"}, recorded: []database.ConsentRoom{{RoomID: "!a", ConsentedBy: "@u"}, {RoomID: "!b", ConsentedBy: "@v"}}, valid: stillValid,
			wantWaiting: []id.RoomID{"!new"}, wantRooms: []database.ConsentRoom{{RoomID: "!a", ConsentedBy: "@u"}, {RoomID: "!b", ConsentedBy: "@v"}, {RoomID: "!new", ConsentedBy: ""}},
		},
		"a room that left the link is dropped": {
			scope: []id.RoomID{"!a", "!b"}, recorded: []database.ConsentRoom{{RoomID: "!a", ConsentedBy: "@u"}, {RoomID: "!b", ConsentedBy: "@v"}, {RoomID: "!left", ConsentedBy: ""}}, valid: stillValid,
			wantRooms: []database.ConsentRoom{{RoomID: "!a", ConsentedBy: "@u"}, {RoomID: "!b", ConsentedBy: "@v"}},
		},
	} {
		t.Run(name, func(t *testing.T) {
			rooms, waiting := mergeConsents(tc.scope, tc.recorded, tc.valid)
			if !slices.Equal(rooms, tc.wantRooms) || !slices.Equal(waiting, tc.wantWaiting) {
				t.Fatalf("mergeConsents = %v, %v; want %v, %v", rooms, waiting, tc.wantRooms, tc.wantWaiting)
			}
		})
	}
}

// notices returns the plain bodies of the bot's notices in room, oldest first (sealCrypto keeps them readable);
// its other events (message statuses) are not notices.
func (f *relayFixture) notices(t *testing.T, room id.RoomID) []string {
	t.Helper()
	var out []string
	for _, raw := range f.hs.Timeline(room) {
		var e struct {
			Type    string                      `json:"type"`
			Sender  id.UserID                   `json:"sender"`
			Content event.EncryptedEventContent `json:"content"`
		}
		if json.Unmarshal(raw, &e) != nil || e.Type != event.EventEncrypted.Type || e.Sender != f.br.AS.BotMXID() {
			continue
		}
		data, err := base64.RawStdEncoding.DecodeString(string(e.Content.MegolmCiphertext))
		if err != nil {
			continue
		}
		var c struct {
			MsgType string `json:"msgtype"`
			Body    string `json:"body"`
		}
		if json.Unmarshal(data, &c) == nil && c.MsgType == string(event.MsgNotice) {
			out = append(out, c.Body)
		}
	}
	return out
}

// lastNotice returns the bot's latest notice in room.
func (f *relayFixture) lastNotice(t *testing.T, room id.RoomID) string {
	t.Helper()
	all := f.notices(t, room)
	if len(all) == 0 {
		t.Fatalf("no notice in %s", room)
	}
	return all[len(all)-1]
}

var requestIDPattern = regexp.MustCompile("Request `([0-9a-f]+)`")

// TestConsentInEveryRoomTouched: carol, with power only in her room C, links it with room A, which is linked with
// B. ferry asks A and B; the rooms join only when both consented, after a re-check that every consent still
// holds: alice's consent in A stops counting once she left A, and A is asked again.
func TestConsentInEveryRoomTouched(t *testing.T) {
	cr := newScriptedCrypto()
	f := newRelayFixtureWith(t, cr)
	f.br.SetPermissions(Permissions{"ferry.test": LevelUser})
	ctx := context.Background()
	bob, carol, dora := id.UserID("@bob:ferry.test"), id.UserID("@carol:ferry.test"), id.UserID("@dora:ferry.test")
	roomC := f.commandRoom(t, carol)
	linked := func(room id.RoomID) bool {
		l, err := f.br.DB.Links.GetByRoom(ctx, room)
		return err == nil && len(l.Rooms) == 3
	}

	f.command(t, cr, roomC, carol, "!ferry link "+string(f.roomA))
	reply := f.lastNotice(t, roomC)
	m := regexp.MustCompile("request `([0-9a-f]+)`").FindStringSubmatch(reply)
	if m == nil || !strings.Contains(reply, "needs consent") {
		t.Fatalf("reply to the link = %q", reply)
	}
	reqID := m[1]
	for _, room := range []id.RoomID{f.roomA, f.roomB} {
		got := requestIDPattern.FindStringSubmatch(f.lastNotice(t, room))
		if got == nil || got[1] != reqID {
			t.Fatalf("request notice in %s: %q", room, f.lastNotice(t, room))
		}
	}
	if linked(roomC) {
		t.Fatal("linked before any consent")
	}

	// dora (power 0 in A) cannot accept for A.
	if err := f.hs.Join(f.roomA, dora); err != nil {
		t.Fatal(err)
	}
	f.command(t, cr, f.roomA, dora, "!ferry accept "+reqID)
	if !strings.Contains(f.lastNotice(t, f.roomA), "Cannot accept") {
		t.Fatalf("dora's accept answered %q", f.lastNotice(t, f.roomA))
	}
	// alice accepts for A: B still waits.
	f.command(t, cr, f.roomA, f.alice, "!ferry accept "+reqID)
	if got := f.lastNotice(t, f.roomA); !strings.Contains(got, "still waits for consent") || linked(roomC) {
		t.Fatalf("after A's consent: %q, linked %t", got, linked(roomC))
	}
	// alice leaves A: her consent stops counting. bob's consent for B is not enough, and A is asked again.
	if err := f.hs.SetState(f.roomA, f.alice, "m.room.member", string(f.alice), map[string]any{"membership": "leave"}); err != nil {
		t.Fatal(err)
	}
	before := len(f.notices(t, f.roomA))
	f.command(t, cr, f.roomB, bob, "!ferry accept")
	if got := f.lastNotice(t, f.roomB); !strings.Contains(got, "still waits for consent in") || linked(roomC) {
		t.Fatalf("after B's consent with A's void: %q, linked %t", got, linked(roomC))
	}
	if len(f.notices(t, f.roomA)) != before+1 {
		t.Fatal("room A was not asked again")
	}
	// A's new moderator consents: now every room consented now, and the three rooms are one link.
	if err := f.hs.SetState(f.roomA, f.alice, "m.room.power_levels", "", map[string]any{"users": map[id.UserID]int{dora: 50}, "state_default": 50}); err != nil {
		t.Fatal(err)
	}
	f.command(t, cr, f.roomA, dora, "!ferry accept "+reqID)
	if got := f.lastNotice(t, f.roomA); !strings.HasPrefix(got, "Linked:") || !linked(roomC) {
		t.Fatalf("after every consent: %q, linked %t", got, linked(roomC))
	}
	if req, _ := f.br.DB.Consent.Get(ctx, reqID); req != nil {
		t.Fatal("the granted request is still stored")
	}
}

// TestConsentRequestAnswers: accept and reject name the request they answer, list several, refuse an expired
// one, and a rejected request changes nothing.
func TestConsentRequestAnswers(t *testing.T) {
	cr := newScriptedCrypto()
	f := newRelayFixtureWith(t, cr)
	f.br.SetPermissions(Permissions{"ferry.test": LevelUser})
	ctx := context.Background()
	bob := id.UserID("@bob:ferry.test")
	carol, erin := id.UserID("@carol:ferry.test"), id.UserID("@erin:ferry.test")
	target := f.commandRoom(t, bob)
	roomC, roomE := f.commandRoom(t, carol), f.commandRoom(t, erin)
	requestIn := func(room id.RoomID) string {
		m := regexp.MustCompile("request `([0-9a-f]+)`").FindStringSubmatch(f.lastNotice(t, room))
		if m == nil {
			t.Fatalf("no request ID in %q", f.lastNotice(t, room))
		}
		return m[1]
	}
	f.command(t, cr, roomC, carol, "!ferry link "+string(target))
	fromC := requestIn(roomC)
	f.command(t, cr, roomE, erin, "!ferry link "+string(target))
	fromE := requestIn(roomE)

	f.command(t, cr, target, bob, "!ferry accept")
	if got := f.lastNotice(t, target); !strings.Contains(got, "2 requests wait") || !strings.Contains(got, fromC) || !strings.Contains(got, fromE) {
		t.Fatalf("accept without an ID among two: %q", got)
	}
	f.command(t, cr, target, bob, "!ferry reject "+fromE)
	if got := f.lastNotice(t, target); !strings.Contains(got, "Rejected request `"+fromE+"`") {
		t.Fatalf("reject answered %q", got)
	}
	if got := f.lastNotice(t, roomE); !strings.Contains(got, "was rejected") {
		t.Fatalf("erin's room was told %q", got)
	}
	f.command(t, cr, target, bob, "!ferry accept "+fromE)
	if got := f.lastNotice(t, target); !strings.Contains(got, "No request `"+fromE+"`") {
		t.Fatalf("accepting a rejected request answered %q", got)
	}
	// The request from C expires: accepting it is refused.
	if _, err := f.br.DB.Exec(ctx, `UPDATE consent_request SET expires_at=$2 WHERE id=$1`, fromC, time.Now().Add(-time.Minute).UnixMilli()); err != nil {
		t.Fatal(err)
	}
	f.command(t, cr, target, bob, "!ferry accept "+fromC)
	if got := f.lastNotice(t, target); !strings.Contains(got, "expired") {
		t.Fatalf("accepting an expired request answered %q", got)
	}
	for _, room := range []id.RoomID{roomC, roomE} {
		if _, err := f.br.DB.Links.GetByRoom(ctx, room); err == nil {
			t.Fatalf("%s was linked", room)
		}
	}
}

// TestDisappearNeedsConsentWhereOriginalsGo: with bridge.redact_originals, alice (power only in A) sets the
// timer of the A–B link; it takes effect only once B consents. Turning it off needs no consent.
func TestDisappearNeedsConsentWhereOriginalsGo(t *testing.T) {
	cr := newScriptedCrypto()
	f := newRelayFixtureWith(t, cr)
	f.br.SetPermissions(Permissions{"ferry.test": LevelUser})
	ctx := context.Background()
	bob := id.UserID("@bob:ferry.test")
	timer := func() time.Duration {
		l, err := f.br.DB.Links.GetByRoom(ctx, f.roomA)
		if err != nil {
			t.Fatal(err)
		}
		return l.DisappearAfter
	}
	f.command(t, cr, f.roomA, f.alice, "!ferry disappear 10m")
	if got := f.lastNotice(t, f.roomA); !strings.Contains(got, "needs consent") || timer() != 0 {
		t.Fatalf("disappear without consent: %q, timer %s", got, timer())
	}
	if got := f.lastNotice(t, f.roomB); !strings.Contains(got, "disappear 10m 0s after they are sent") {
		t.Fatalf("request in B: %q", got)
	}
	f.command(t, cr, f.roomB, bob, "!ferry accept")
	if timer() != 10*time.Minute {
		t.Fatalf("after B's consent the timer is %s; B was told %q", timer(), f.lastNotice(t, f.roomB))
	}
	f.command(t, cr, f.roomA, f.alice, "!ferry disappear off")
	if timer() != 0 {
		t.Fatalf("turning the timer off needed more than A: %q", f.lastNotice(t, f.roomA))
	}
}
