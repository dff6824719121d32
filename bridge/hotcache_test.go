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
// forgets its own entry; an entry computed while its source or target room changed is not stored, one computed
// while other rooms changed is.
func TestGhostCacheForgetsWhatAStateChangeAffects(t *testing.T) {
	var h hotCache
	aToB := ghostKey{"!a", "@alice:x", "!b"}
	bToA := ghostKey{"!b", "@bob:x", "!a"}
	cToD := ghostKey{"!c", "@carol:x", "!d"}
	ghostOf := map[ghostKey]id.UserID{aToB: "@_g_alice:x", bToA: "@_g_bob:x", cToD: "@_g_carol:x"}
	keys := []ghostKey{aToB, bToA, cToD}
	fill := func() {
		for _, k := range keys {
			h.setGhostReady(k, ghostOf[k], h.generation(k))
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

	for _, changed := range []id.RoomID{"!a", "!b"} {
		h.forgetGhost(aToB)
		gen := h.generation(aToB)
		h.stateChanged(event.StateMember, changed, "@dave:x")
		h.setGhostReady(aToB, ghostOf[aToB], gen)
		if h.ghostReady(aToB) {
			t.Errorf("an entry computed across a member change in %s was stored", changed)
		}
	}
	h.forgetGhost(aToB)
	gen := h.generation(aToB)
	h.stateChanged(event.StateMember, "!z", "@dave:x")
	h.forgetGhost(cToD)
	h.setGhostReady(aToB, ghostOf[aToB], gen)
	if !h.ghostReady(aToB) {
		t.Error("a change in other rooms kept an entry of !a and !b from being stored")
	}
	if !h.concerns("!b", "@_g_alice:x") || !h.concerns("!a", "@alice:x") || h.concerns("!b", "@dave:x") || h.concerns("!z", "@alice:x") {
		t.Error("concerns disagrees with what a member event forgets")
	}
}

// TestGhostCacheCountersStayBounded: rooms' change counters start again empty once maxCacheEntries rooms have
// changed, and a computation under way across that is not stored (its rooms' counters may read the same again).
func TestGhostCacheCountersStayBounded(t *testing.T) {
	var h hotCache
	k := ghostKey{"!a", "@alice:x", "!b"}
	h.stateChanged(event.StateMember, "!a", "@alice:x")
	gen := h.generation(k)
	for i := 0; i < maxCacheEntries; i++ {
		h.stateChanged(event.StateMember, id.RoomID(fmt.Sprintf("!r%d", i)), "@alice:x")
	}
	h.stateChanged(event.StateMember, "!a", "@alice:x")
	if len(h.roomGen) > maxCacheEntries {
		t.Fatalf("%d counters kept", len(h.roomGen))
	}
	h.setGhostReady(k, "@_g_alice:x", gen)
	if h.ghostReady(k) {
		t.Error("an entry computed across a clear of the counters was stored")
	}
}
