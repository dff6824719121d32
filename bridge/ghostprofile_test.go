package bridge

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/internal/fakehs"
)

// TestRenamedRoomRenamesItsGhosts: a ghost's per-room name carries its source room's name; renaming the source room
// renames its members' ghosts in the link's other rooms.
func TestRenamedRoomRenamesItsGhosts(t *testing.T) {
	f := newUpgradeFixture(t)
	if err := f.br.Config.CompileDisplaynameTemplate(); err != nil {
		t.Fatal(err)
	}
	ghost := f.br.Ghosts.Ghost(f.alice)
	nameIn := func(room id.RoomID) string {
		var m struct {
			Content struct {
				Displayname string `json:"displayname"`
			} `json:"content"`
		}
		_ = json.Unmarshal(f.hs.StateEvent(room, event.StateMember.Type, string(ghost)), &m)
		return m.Content.Displayname
	}
	rename := func(name string) {
		if err := f.hs.SetState(f.roomA, f.alice, event.StateRoomName.Type, "", map[string]any{"name": name}); err != nil {
			t.Fatal(err)
		}
		f.n++
		f.process(t, map[string]any{"event_id": fmt.Sprintf("$name%d", f.n), "room_id": f.roomA, "sender": f.alice, "type": "m.room.name",
			"state_key": "", "origin_server_ts": time.Now().UnixMilli(), "content": map[string]any{"name": name}})
	}
	rename("Garden")
	f.message(t, f.roomA, f.roomB, f.alice, "hello")
	if got := nameIn(f.roomB); !strings.HasSuffix(got, " (Garden)") {
		t.Fatalf("the ghost's name in B = %q", got)
	}
	rename("Orchard")
	if got := nameIn(f.roomB); !strings.HasSuffix(got, " (Orchard)") {
		t.Fatalf("after the rename, the ghost's name in B = %q", got)
	}
}

// TestGhostsAfterTheFirstAreInvitedBeforeJoining: in a room only invited users may join (what Element creates for a
// private room), the first ghost learns it the hard way (its join is refused, the bot invites it, it joins); the
// ghosts after it are invited before they join, so the homeserver refuses none of their joins. In a room anyone
// may join, a ghost joins with one request and is never invited.
func TestGhostsAfterTheFirstAreInvitedBeforeJoining(t *testing.T) {
	for _, public := range []bool{false, true} {
		t.Run(map[bool]string{false: "invite only", true: "public"}[public], func(t *testing.T) {
			f := newRelayFixtureWith(t, newScriptedCrypto())
			target := f.roomB
			if public {
				target = f.hs.CreateRoom("@bob:ferry.test", fakehs.RoomOptions{Public: true,
					Encryption: &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1}, Members: []id.UserID{f.br.AS.BotMXID()}})
				if err := f.br.StateStore.SetMembership(context.Background(), target, f.br.AS.BotMXID(), event.MembershipJoin); err != nil {
					t.Fatal(err)
				}
			}
			var lock sync.Mutex
			requests := map[id.UserID][]string{} // each ghost's member requests in target, in order
			f.faultOn(func(r *http.Request) bool {
				prefix := "/_matrix/client/v3/rooms/" + string(target) + "/state/m.room.member/"
				if r.Method == http.MethodPut && strings.HasPrefix(r.URL.Path, prefix) {
					body, _ := io.ReadAll(r.Body)
					r.Body = io.NopCloser(bytes.NewReader(body))
					var c event.MemberEventContent
					_ = json.Unmarshal(body, &c)
					lock.Lock()
					ghost := id.UserID(strings.TrimPrefix(r.URL.Path, prefix))
					requests[ghost] = append(requests[ghost], string(c.Membership))
					lock.Unlock()
				}
				return false
			})
			ctx := context.Background()
			senders := []id.UserID{f.alice, "@carol:ferry.test", "@dave:ferry.test"}
			for i, sender := range senders {
				if i > 0 {
					if err := f.hs.Join(f.roomA, sender); err != nil {
						t.Fatal(err)
					}
				}
				intent := f.br.AS.Intent(f.br.Ghosts.Ghost(sender))
				if err := f.br.ensureGhost(ctx, intent, f.roomA, sender, target); err != nil {
					t.Fatalf("%s's ghost: %v", sender, err)
				}
			}
			lock.Lock()
			defer lock.Unlock()
			for i, sender := range senders {
				ghost := f.br.Ghosts.Ghost(sender)
				got := strings.Join(requests[ghost], ",")
				want := "invite,join"
				switch {
				case public:
					want = "join"
				case i == 0:
					want = "join,invite,join"
				}
				if got != want {
					t.Errorf("%s's ghost: member requests %q, want %q", sender, got, want)
				}
				if !f.br.StateStore.IsInRoom(ctx, target, ghost) {
					t.Errorf("%s's ghost is not in the target room by ferry's state store", sender)
				}
			}
		})
	}
}
