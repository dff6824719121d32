package bridge

import (
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestFirstMessageWaitsForMembersToSeeTheJoin: a ghost's first message into a room is sent bridge.ghost_join_wait
// after its join there at the earliest. Members' clients fetch the ghost's keys (its cross-signing identity) when
// they see it join; a message that reaches a client before those keys is shown as sent from a device its owner
// did not sign, and clients do not look at it again (Element keeps the warning; with "exclude insecure devices"
// the message never shows). The ghost's later messages there do not wait.
func TestFirstMessageWaitsForMembersToSeeTheJoin(t *testing.T) {
	f := newRelayFixture(t)
	const wait = 400 * time.Millisecond
	f.br.Config.GhostJoinWait = wait
	var lock sync.Mutex
	var joins, sends []time.Time
	roomB := string(f.roomB)
	f.faultOn(func(r *http.Request) bool { // watches, injects nothing
		if r.Method != http.MethodPut || !strings.Contains(r.URL.Path, "/rooms/"+roomB+"/") {
			return false
		}
		lock.Lock()
		defer lock.Unlock()
		switch {
		case strings.Contains(r.URL.Path, "/state/m.room.member/@_ferry_") && strings.Contains(r.URL.RawQuery, "user_id=%40_ferry_"):
			joins = append(joins, time.Now())
		case strings.Contains(r.URL.Path, "/send/m.room.encrypted/"):
			sends = append(sends, time.Now())
		}
		return false
	})

	f.relayOne(t)
	lock.Lock()
	// (A join the room refuses until the bot invites the ghost is tried again after the invite.)
	joined := len(joins)
	if joined == 0 || len(sends) != 1 {
		lock.Unlock()
		t.Fatalf("the first message made %d joins and %d sends into B, want one of each at least", joined, len(sends))
	}
	if gap := sends[0].Sub(joins[joined-1]); gap < wait {
		t.Errorf("the ghost's first message went out %s after its join, want %s at least", gap, wait)
	}
	lock.Unlock()

	f.relayOne(t)
	lock.Lock()
	defer lock.Unlock()
	if len(joins) != joined || len(sends) != 2 {
		t.Fatalf("after the second message: %d joins and %d sends into B, want %d and 2", len(joins), len(sends), joined)
	}
	if n := f.br.joins.pending(); n != 0 {
		t.Errorf("%d joins still wait to be settled, want none once the ghost has spoken", n)
	}
}

// TestJoinsOlderThanAnyWaitAreForgotten: a join whose ghost never spoke (its message was moderated away, say)
// does not stay in memory once no wait could be left of it.
func TestJoinsOlderThanAnyWaitAreForgotten(t *testing.T) {
	var j joinWaits
	start := time.Now()
	j.note("@_ferry_a:x", "!r:x", start)
	j.note("@_ferry_b:x", "!r:x", start.Add(MaxGhostJoinWait))
	if n := j.pending(); n != 2 {
		t.Fatalf("%d joins noted, want 2", n)
	}
	j.note("@_ferry_c:x", "!r:x", start.Add(MaxGhostJoinWait+time.Millisecond))
	if n := j.pending(); n != 2 {
		t.Errorf("%d joins kept, want 2: the first is older than any wait", n)
	}
}
