package bridge

import (
	"testing"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// TestGhostCacheForgetsWhatAStateChangeAffects: a member, name or alias event forgets the ghost entries whose
// source or target is its room, and only those; other state events forget nothing; a failed send forgets its
// own entry; an entry computed while a change happened is not stored.
func TestGhostCacheForgetsWhatAStateChangeAffects(t *testing.T) {
	var h hotCache
	aToB := ghostKey{"!a", "@alice:x", "!b"}
	bToA := ghostKey{"!b", "@bob:x", "!a"}
	cToD := ghostKey{"!c", "@carol:x", "!d"}
	fill := func() {
		for _, k := range []ghostKey{aToB, bToA, cToD} {
			h.setGhostReady(k, h.generation())
		}
	}
	fill()
	h.stateChanged(event.StatePowerLevels, "!a")
	for _, k := range []ghostKey{aToB, bToA, cToD} {
		if !h.ghostReady(k) {
			t.Fatalf("a power-level change forgot %v", k)
		}
	}
	for _, typ := range []event.Type{event.StateMember, event.StateRoomName, event.StateCanonicalAlias} {
		fill()
		h.stateChanged(typ, "!a")
		if h.ghostReady(aToB) || h.ghostReady(bToA) {
			t.Errorf("%s in !a kept an entry of !a", typ.Type)
		}
		if !h.ghostReady(cToD) {
			t.Errorf("%s in !a forgot an entry of other rooms", typ.Type)
		}
	}
	fill()
	h.forgetGhost(aToB)
	if h.ghostReady(aToB) || !h.ghostReady(bToA) {
		t.Error("a failed send forgot the wrong entries")
	}
	gen := h.generation()
	h.stateChanged(event.StateMember, id.RoomID("!z"))
	h.setGhostReady(aToB, gen)
	if h.ghostReady(aToB) {
		t.Error("an entry computed across a state change was stored")
	}
}
