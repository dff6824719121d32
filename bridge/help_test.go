package bridge

import (
	"context"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"maunium.net/go/mautrix/id"
)

// TestHelpIsGrouped: help lists the commands by purpose, in order, with a legend of the argument placeholders;
// a member sees no admins' group.
func TestHelpIsGrouped(t *testing.T) {
	admin := helpText("!ferry", LevelAdmin, RoomContext{Linked: true, Encrypted: true}).Plain
	last := -1
	for g := groupLinking; g <= groupAdmin; g++ {
		at := strings.Index(admin, "\n"+g.title()+"\n")
		if at < 0 || at < last {
			t.Fatalf("group %q missing or out of order:\n%s", g.title(), admin)
		}
		last = at
	}
	if !strings.Contains(admin, "\n- `!ferry link <room> [room]`") || strings.Index(admin, "`!ferry rotate`") < strings.Index(admin, "For ferry's admins") {
		t.Errorf("commands are not under their groups:\n%s", admin)
	}
	for _, l := range helpLegend {
		if !strings.Contains(admin, "- "+l) {
			t.Errorf("the legend lacks %q", l)
		}
	}
	user := helpText("!ferry", LevelUser, RoomContext{Linked: true, Encrypted: true}).Plain
	if strings.Contains(user, "For ferry's admins") {
		t.Error("a member's help shows the admins' group")
	}
}

// TestMembersReadPlainWords: the help of every command a member may run speaks the member's language.
func TestMembersReadPlainWords(t *testing.T) {
	for _, room := range []RoomContext{{Linked: true, Encrypted: true}, {Management: true, Encrypted: true}} {
		for _, h := range visibleCommands(commandTable, LevelUser, room) {
			for _, jargon := range []string{"outbound", "session", "megolm", "olm ", "to-device", "cross-sign", "appservice", "m.room"} {
				if strings.Contains(strings.ToLower(h.Help), jargon) {
					t.Errorf("%s's help says %q: %s", h.Name, jargon, h.Help)
				}
			}
		}
	}
}

func TestSuggestCommand(t *testing.T) {
	linked := RoomContext{Linked: true, Encrypted: true}
	for name, tc := range map[string]struct {
		typed string
		level Level
		want  string
	}{
		"a swap":                        {"lnik", LevelUser, "link"},
		"a missing letter":              {"stauts", LevelUser, "status"},
		"a letter too many":             {"helpp", LevelUser, "help"},
		"two typos in a long name":      {"dissapear", LevelUser, "disappear"},
		"the start of a name":           {"enc", LevelUser, "encryption"},
		"an alias's typo":               {"decilne", LevelUser, "reject"},
		"an admin command for an admin": {"relaod", LevelAdmin, "reload"},
		"an admin command for a member": {"relaod", LevelUser, "reload"},
		"nothing close":                 {"frobnicate", LevelUser, ""},
		"too short to guess":            {"x", LevelUser, ""},
		"a swap in a short name":        {"pnig", LevelUser, "ping"},
		"an unrelated short word":       {"hi", LevelUser, ""},
	} {
		t.Run(name, func(t *testing.T) {
			got := ""
			if h := suggestCommand(commandTable, tc.typed, tc.level, linked); h != nil {
				got = h.Name
			}
			if got != tc.want {
				t.Fatalf("suggestCommand(%q) = %q, want %q", tc.typed, got, tc.want)
			}
		})
	}
}

// TestRoomHealthFitsAPhone: every line of a room's status is short enough for a phone screen, whatever the room's
// name; only figures that are not zero are shown, and the sign says whether something needs attention.
func TestRoomHealthFitsAPhone(t *testing.T) {
	now := time.Unix(1767225600, 0)
	long := strings.Repeat("A very long room name ", 5)
	for name, tc := range map[string]struct {
		h        roomHealth
		sign     string
		want     []string
		wantNone []string
	}{
		"healthy": {h: roomHealth{name: "Garden", here: true, lastRelayed: now.Add(-2 * time.Minute)}, sign: healthGood,
			want: []string{"Garden (here)", "last relayed 2m 0s ago"}, wantNone: []string{"failure", "queued", "waiting"}},
		"never relayed": {h: roomHealth{name: "Kitchen"}, sign: healthGood, want: []string{"nothing relayed yet"}},
		"in trouble": {h: roomHealth{name: cleanName(long, maxStatusNameRunes), here: true, lastRelayed: now.Add(-3 * time.Hour), failures: 12, notRelayed: 1, waiting: 3, queued: 250},
			sign: healthTrouble, want: []string{"12 failures in the last hour", "1 not relayed (last day)", "3 waiting for keys", "250 queued"}},
		"busy": {h: roomHealth{name: "Hall", lastRelayed: now, queued: 1}, sign: healthBusy, want: []string{"1 queued"}},
	} {
		t.Run(name, func(t *testing.T) {
			got := tc.h.text(now).Plain
			lines := strings.Split(got, "\n")
			if !strings.HasPrefix(lines[0], tc.sign+" ") {
				t.Errorf("first line %q does not start with %s", lines[0], tc.sign)
			}
			for _, l := range lines {
				if n := utf8.RuneCountInString(l); n > maxStatusLineRunes {
					t.Errorf("line of %d characters: %q", n, l)
				}
			}
			for _, w := range tc.want {
				if !strings.Contains(got, w) {
					t.Errorf("status lacks %q:\n%s", w, got)
				}
			}
			for _, w := range tc.wantNone {
				if strings.Contains(got, w) {
					t.Errorf("status shows %q:\n%s", w, got)
				}
			}
		})
	}
}

// TestLinkTwoRoomsFromAManagementRoom: in a chat with the bot alone, `link <A> <B>` links two other rooms, under
// the same consent rules as linking from a room: erin, with power in both, links at once; carol, with power only
// in C, gets a request posted in D, which links the rooms once D's owner accepts it. Elsewhere the two-room form is
// refused.
func TestLinkTwoRoomsFromAManagementRoom(t *testing.T) {
	cr := newScriptedCrypto()
	f := newRelayFixtureWith(t, cr)
	f.br.SetPermissions(Permissions{"ferry.test": LevelUser})
	ctx := context.Background()
	carol, dave, erin := id.UserID("@carol:ferry.test"), id.UserID("@dave:ferry.test"), id.UserID("@erin:ferry.test")
	linkOf := func(room id.RoomID) string {
		l, err := f.br.DB.Links.GetByRoom(ctx, room)
		if err != nil {
			return ""
		}
		return l.ID
	}

	roomE, roomF := f.commandRoom(t, erin), f.commandRoom(t, erin)
	if err := f.hs.Join(roomF, dave); err != nil { // F has three members: not a management room
		t.Fatal(err)
	}
	erinDM := f.commandRoom(t, erin)
	f.command(t, cr, erinDM, erin, "link "+string(roomE)+" "+string(roomF))
	if got := f.lastNotice(t, erinDM); !strings.HasPrefix(got, "Linked:") || linkOf(roomE) == "" || linkOf(roomE) != linkOf(roomF) {
		t.Fatalf("erin's link from her management room: %q", got)
	}
	for _, r := range []id.RoomID{roomE, roomF} {
		if !strings.Contains(f.lastNotice(t, r), "now linked with") {
			t.Fatalf("%s was not told: %q", r, f.notices(t, r))
		}
	}

	roomC, roomD := f.commandRoom(t, carol), f.commandRoom(t, dave)
	carolDM := f.commandRoom(t, carol)
	f.command(t, cr, carolDM, carol, "!ferry link "+string(roomC)+" "+string(roomD))
	reply := f.lastNotice(t, carolDM)
	m := requestIDPattern.FindStringSubmatch(f.lastNotice(t, roomD))
	if !strings.Contains(reply, "needs consent") || m == nil || linkOf(roomC) != "" {
		t.Fatalf("carol's link without power in D: reply %q, D's notice %q", reply, f.lastNotice(t, roomD))
	}
	f.command(t, cr, roomD, dave, "!ferry accept "+m[1])
	if got := f.lastNotice(t, roomD); !strings.HasPrefix(got, "Linked:") || linkOf(roomC) == "" || linkOf(roomC) != linkOf(roomD) {
		t.Fatalf("after dave's consent: %q", got)
	}

	f.command(t, cr, roomC, carol, "!ferry link "+string(roomE)+" "+string(roomF))
	if got := f.lastNotice(t, roomC); !strings.Contains(got, "works in a chat with me alone") {
		t.Fatalf("the two-room form outside a management room answered %q", got)
	}
}

// TestJoinedItemsMakeOneList: list items joined one by one render as one HTML list, as clients expect.
func TestJoinedItemsMakeOneList(t *testing.T) {
	n := renderNotice("Head").join(renderNotice("- one")).join(renderNotice("- `two`")).join(renderNotice("Tail"))
	if want := "Head<ul><li>one</li><li><code>two</code></li></ul>Tail"; n.HTML != want {
		t.Fatalf("HTML = %s, want %s", n.HTML, want)
	}
	if n.Plain != "Head\n- one\n- `two`\nTail" {
		t.Fatalf("plain = %q", n.Plain)
	}
}
