package bridge

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
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
