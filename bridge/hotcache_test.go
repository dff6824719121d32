package bridge

import (
	"fmt"
	"slices"
	"testing"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// TestGhostCacheForgetsWhatAStateChangeAffects: a member event forgets the entries of the member it is about
// (the real user in the source, the real user or the ghost in the target) and only those; a name or alias event
// forgets every entry whose source or target is its room; other state events forget nothing; a failed send
// forgets its own entry; an entry computed across a change that would have forgotten it is not stored, one
// computed across other changes is.
func TestGhostCacheForgetsWhatAStateChangeAffects(t *testing.T) {
	var h hotCache
	aToB := ghostKey{"!a", "@alice:x", "!b"}
	bToA := ghostKey{"!b", "@bob:x", "!a"}
	cToD := ghostKey{"!c", "@carol:x", "!d"}
	ghostOf := map[ghostKey]id.UserID{aToB: "@_g_alice:x", bToA: "@_g_bob:x", cToD: "@_g_carol:x"}
	keys := []ghostKey{aToB, bToA, cToD}
	fill := func() {
		for _, k := range keys {
			h.setGhostReady(k, ghostOf[k], h.generation(k, ghostOf[k]))
		}
	}
	want := func(what string, kept ...ghostKey) {
		t.Helper()
		for _, k := range keys {
			if h.ghostReady(k) != slices.Contains(kept, k) {
				t.Errorf("%s: entry %v kept %v, want %v", what, k, h.ghostReady(k), slices.Contains(kept, k))
			}
		}
	}
	fill()
	h.stateChanged(event.StatePowerLevels, "!a", "")
	want("a power-level change", aToB, bToA, cToD)
	for _, typ := range []event.Type{event.StateRoomName, event.StateCanonicalAlias} {
		fill()
		h.stateChanged(typ, "!a", "")
		want(typ.Type+" in !a", cToD)
	}
	fill()
	h.stateChanged(event.StateMember, "!a", "@alice:x") // alice in her source room: her profile
	want("alice's member event in !a", bToA, cToD)
	fill()
	h.stateChanged(event.StateMember, "!a", "@_g_bob:x") // bob's ghost in its target: a kick
	want("bob's ghost's member event in !a", aToB, cToD)
	fill()
	h.stateChanged(event.StateMember, "!a", "@bob:x") // bob himself in the target: a ban
	want("bob's member event in !a", aToB, cToD)
	fill()
	h.stateChanged(event.StateMember, "!a", "@dave:x") // someone else joining
	want("another member's event in !a", aToB, bToA, cToD)
	fill()
	h.forgetGhost(aToB)
	want("a failed send", bToA, cToD)

	// An entry computed across a change is not stored when the change would have forgotten it; across others
	// (another ghost joining the same busy room, as when a room is linked and its members start to speak) it is.
	for _, c := range []struct {
		typ    event.Type
		room   id.RoomID
		member id.UserID
		stored bool
	}{
		{event.StateMember, "!a", "@alice:x", false},    // alice's profile in her source room
		{event.StateMember, "!b", "@alice:x", false},    // alice herself in the target
		{event.StateMember, "!b", "@_g_alice:x", false}, // her ghost in the target
		{event.StateRoomName, "!a", "", false},
		{event.StateCanonicalAlias, "!b", "", false},
		{event.StateMember, "!a", "@dave:x", true},
		{event.StateMember, "!b", "@_g_dave:x", true},
		{event.StateMember, "!b", "@bob:x", true},
		{event.StatePowerLevels, "!b", "", true},
	} {
		h.forgetGhost(aToB)
		gen := h.generation(aToB, ghostOf[aToB])
		h.stateChanged(c.typ, c.room, string(c.member))
		h.setGhostReady(aToB, ghostOf[aToB], gen)
		if h.ghostReady(aToB) != c.stored {
			t.Errorf("an entry computed across %s of %q in %s: stored %v, want %v", c.typ.Type, c.member, c.room, h.ghostReady(aToB), c.stored)
		}
	}
	h.forgetGhost(aToB)
	gen := h.generation(aToB, ghostOf[aToB])
	h.stateChanged(event.StateMember, "!z", "@dave:x")
	h.forgetGhost(cToD)
	h.setGhostReady(aToB, ghostOf[aToB], gen)
	if !h.ghostReady(aToB) {
		t.Error("a change in other rooms kept an entry of !a and !b from being stored")
	}
}

// TestGhostCacheCountersStayBounded: rooms' and members' change counters start again empty once maxCacheEntries
// of either have changed, and a computation under way across that is not stored (its counters may read the same
// again).
func TestGhostCacheCountersStayBounded(t *testing.T) {
	var h hotCache
	k := ghostKey{"!a", "@alice:x", "!b"}
	h.stateChanged(event.StateMember, "!a", "@alice:x")
	gen := h.generation(k, "@_g_alice:x")
	for i := 0; i < maxCacheEntries; i++ {
		h.stateChanged(event.StateMember, id.RoomID(fmt.Sprintf("!r%d", i)), "@alice:x")
		h.stateChanged(event.StateRoomName, id.RoomID(fmt.Sprintf("!r%d", i)), "")
	}
	h.stateChanged(event.StateMember, "!a", "@alice:x")
	if len(h.roomGen) > maxCacheEntries || len(h.memberGen) > maxCacheEntries {
		t.Fatalf("%d room and %d member counters kept", len(h.roomGen), len(h.memberGen))
	}
	h.setGhostReady(k, "@_g_alice:x", gen)
	if h.ghostReady(k) {
		t.Error("an entry computed across a clear of the counters was stored")
	}
}
