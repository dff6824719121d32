package bridge

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/database/dbtest"
)

func TestRemovalOf(t *testing.T) {
	const mod, user = id.UserID("@mod:x"), id.UserID("@user:x")
	for name, tc := range map[string]struct {
		sender           id.UserID
		membership, prev event.Membership
		want             removal
		lifted           bool
	}{
		"ban":                    {sender: mod, membership: event.MembershipBan, prev: event.MembershipJoin, want: removalBan},
		"kick":                   {sender: mod, membership: event.MembershipLeave, prev: event.MembershipJoin, want: removalKick},
		"kick without history":   {sender: mod, membership: event.MembershipLeave, want: removalKick},
		"invite withdrawn":       {sender: mod, membership: event.MembershipLeave, prev: event.MembershipInvite, want: removalKick},
		"leaving":                {sender: user, membership: event.MembershipLeave, prev: event.MembershipJoin},
		"declining an invite":    {sender: user, membership: event.MembershipLeave, prev: event.MembershipInvite},
		"unban":                  {sender: mod, membership: event.MembershipLeave, prev: event.MembershipBan, lifted: true},
		"invited back":           {sender: mod, membership: event.MembershipInvite, prev: event.MembershipLeave, lifted: true},
		"joining":                {sender: user, membership: event.MembershipJoin, lifted: true},
		"knocking is no lifting": {sender: user, membership: event.MembershipKnock, prev: event.MembershipLeave},
	} {
		t.Run(name, func(t *testing.T) {
			got, lifted := removalOf(tc.sender, user, tc.membership, tc.prev)
			if got != tc.want || lifted != tc.lifted {
				t.Fatalf("removalOf = %q, %t; want %q, %t", got, lifted, tc.want, tc.lifted)
			}
		})
	}
}

// member sets target's membership in room on the fake homeserver and hands ferry the member event, as the
// homeserver would push it.
func (f *relayFixture) member(t *testing.T, room id.RoomID, sender, target id.UserID, membership, prev event.Membership) {
	t.Helper()
	if err := f.hs.SetState(room, sender, "m.room.member", string(target), map[string]any{"membership": membership}); err != nil {
		t.Fatal(err)
	}
	f.n++
	key := string(target)
	f.process(t, map[string]any{
		"event_id": fmt.Sprintf("$member%d", f.n), "room_id": room, "sender": sender, "type": "m.room.member", "state_key": key,
		"origin_server_ts": time.Now().UnixMilli(), "content": map[string]any{"membership": membership},
		"unsigned": map[string]any{"prev_content": map[string]any{"membership": prev}},
	})
}

// TestModerationHoldsAcrossTheLink: carol, banned from room B, is not heard there through her ghost and is told
// once in room A; a ghost that B's moderator kicked is not invited back by ferry, until the moderator invites it.
func TestModerationHoldsAcrossTheLink(t *testing.T) {
	cr := newScriptedCrypto()
	f := newRelayFixtureWith(t, cr)
	ctx := context.Background()
	bob, carol := id.UserID("@bob:ferry.test"), id.UserID("@carol:ferry.test")
	if err := f.hs.Join(f.roomA, carol); err != nil {
		t.Fatal(err)
	}
	send := func(from id.UserID) bool {
		f.n++
		evtID := id.EventID(fmt.Sprintf("$mod%d", f.n))
		f.process(t, encryptedFrom(evtID, f.roomA, from))
		c, err := f.br.DB.EventMap.Get(ctx, evtID, f.roomB)
		if err != nil {
			t.Fatal(err)
		}
		return c != nil
	}
	if !send(carol) {
		t.Fatal("carol's first message did not cross")
	}
	// bob bans carol from B (she had joined it once).
	f.member(t, f.roomB, carol, carol, event.MembershipJoin, "")
	f.member(t, f.roomB, bob, carol, event.MembershipBan, event.MembershipJoin)
	if send(carol) || send(carol) {
		t.Fatal("a message of carol, banned from B, crossed into B")
	}
	told := 0
	for _, n := range f.notices(t, f.roomA) {
		if strings.Contains(n, "your messages do not reach") {
			told++
		}
	}
	if told != 1 {
		t.Fatalf("carol was told %d times, want once", told)
	}
	// Unbanned: heard again.
	f.member(t, f.roomB, bob, carol, event.MembershipLeave, event.MembershipBan)
	if !send(carol) {
		t.Fatal("after the unban carol's message did not cross")
	}

	// bob kicks alice's ghost from B: ferry does not invite it back.
	if !send(f.alice) {
		t.Fatal("alice's message did not cross")
	}
	ghost := f.br.Ghosts.Ghost(f.alice)
	f.member(t, f.roomB, bob, ghost, event.MembershipLeave, event.MembershipJoin)
	invites := f.hs.Counts()["POST /_matrix/client/v3/rooms/{roomID}/invite"]
	if send(f.alice) {
		t.Fatal("a message crossed through a kicked ghost")
	}
	if got := f.hs.Counts()["POST /_matrix/client/v3/rooms/{roomID}/invite"]; got != invites {
		t.Fatalf("ferry invited the kicked ghost back (%d invites)", got-invites)
	}
	// bob invites the ghost back: it joins and relays again.
	f.member(t, f.roomB, bob, ghost, event.MembershipInvite, event.MembershipLeave)
	if !send(f.alice) {
		t.Fatal("after bob invited the ghost back, alice's message did not cross")
	}
}

// TestGhostJoinEchoKeepsItsCacheEntry: the homeserver's echoes of the bot's invite of a ghost and of the join the
// ghost then sent (the target room is invite only) leave the ghost's cached entry alone (it was computed with the
// join) and the stored member joined (the invite is older than the join ferry recorded when it sent it); an echo
// that disagrees with the stored member (an older name) forgets the entry, and so does a moderator's kick of the
// ghost sent after it; an invite of the ghost by the bot after that is recorded. The join's echo handled while the
// entry is being computed does not keep it from being stored.
func TestGhostJoinEchoKeepsItsCacheEntry(t *testing.T) {
	cr := newScriptedCrypto()
	f := newRelayFixtureWith(t, cr)
	ctx := context.Background()
	f.n++
	f.process(t, encryptedFrom(id.EventID(fmt.Sprintf("$echo%d", f.n)), f.roomA, f.alice))
	ghost := f.br.Ghosts.Ghost(f.alice)
	key := ghostKey{f.roomA, f.alice, f.roomB}
	if !f.br.hot.ghostReady(key) {
		t.Fatal("the ghost's entry was not cached after its first message")
	}
	stored, err := f.br.StateStore.TryGetMember(ctx, f.roomB, ghost)
	if err != nil || stored == nil || stored.Membership != event.MembershipJoin {
		t.Fatalf("the ghost's stored member: %+v, %v", stored, err)
	}
	echo := func(name string) {
		f.n++
		f.process(t, map[string]any{
			"event_id": fmt.Sprintf("$echo%d", f.n), "room_id": f.roomB, "sender": ghost, "type": "m.room.member", "state_key": string(ghost),
			"origin_server_ts": time.Now().UnixMilli(), "content": map[string]any{"membership": "join", "displayname": name, "avatar_url": stored.AvatarURL},
		})
	}
	invite := func() {
		f.n++
		f.process(t, map[string]any{
			"event_id": fmt.Sprintf("$echo%d", f.n), "room_id": f.roomB, "sender": f.br.AS.BotMXID(), "type": "m.room.member", "state_key": string(ghost),
			"origin_server_ts": time.Now().UnixMilli(), "content": map[string]any{"membership": "invite", "displayname": stored.Displayname, "avatar_url": stored.AvatarURL},
		})
	}
	invite()
	if !f.br.hot.ghostReady(key) {
		t.Error("the echo of the bot's invite of the ghost forgot its entry")
	}
	if m, err := f.br.StateStore.GetMembership(ctx, f.roomB, ghost); err != nil || m != event.MembershipJoin {
		t.Errorf("after the echo of the bot's invite, the ghost's stored membership is %q (%v), want join", m, err)
	}
	echo(stored.Displayname)
	if !f.br.hot.ghostReady(key) {
		t.Error("the echo of the ghost's own join forgot its entry")
	}
	// The echo often comes while the ghost's first message is still being relayed, its entry computed but not
	// stored yet: it must not keep the entry from being stored.
	f.br.hot.forgetGhost(key)
	gen := f.br.hot.generation(key, ghost)
	echo(stored.Displayname)
	f.br.hot.setGhostReady(key, ghost, gen)
	if !f.br.hot.ghostReady(key) {
		t.Error("the echo of the ghost's own join, handled while its entry was computed, kept it from being stored")
	}
	echo(stored.Displayname + " (old)")
	if f.br.hot.ghostReady(key) {
		t.Error("an echo that disagrees with the stored member kept the entry")
	}
	f.n++
	f.process(t, encryptedFrom(id.EventID(fmt.Sprintf("$echo%d", f.n)), f.roomA, f.alice))
	if !f.br.hot.ghostReady(key) {
		t.Fatal("the entry was not cached again")
	}
	f.member(t, f.roomB, "@bob:ferry.test", ghost, event.MembershipLeave, event.MembershipJoin)
	if f.br.hot.ghostReady(key) {
		t.Error("the kick of the ghost kept its entry")
	}
	invite()
	if m, err := f.br.StateStore.GetMembership(ctx, f.roomB, ghost); err != nil || m != event.MembershipInvite {
		t.Errorf("the bot's invite of the kicked ghost: stored membership %q (%v), want invite", m, err)
	}
}

// TestRemovalCacheWritesThrough: removals are read from the store once, then answered from memory; a removal
// recorded or lifted is written to the store and to memory; after a write that failed, the store is read again.
func TestRemovalCacheWritesThrough(t *testing.T) {
	for _, dialect := range dbtest.Dialects {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			db := upgradedDBOn(t, dialect)
			kicked, banned := removedKey("!r:x", "@kicked:x"), removedKey("!r:x", "@banned:x")
			if err := db.KV.Set(ctx, kicked, string(removalKick)); err != nil {
				t.Fatal(err)
			}
			var r removalCache
			expect := func(key string, want removal) {
				t.Helper()
				if got, err := r.get(ctx, db.KV, key); err != nil || got != want {
					t.Fatalf("get %s = %q, %v; want %q", key, got, err, want)
				}
			}
			stored := func(key string, want removal) {
				t.Helper()
				if got, err := db.KV.Get(ctx, key); err != nil || removal(got) != want {
					t.Fatalf("stored %s = %q, %v; want %q", key, got, err, want)
				}
			}
			expect(kicked, removalKick) // read from the store
			expect(banned, removalNone)
			// Behind the cache's back: not seen, the answers come from memory.
			if err := db.KV.Set(ctx, banned, string(removalBan)); err != nil {
				t.Fatal(err)
			}
			expect(banned, removalNone)
			if err := db.KV.Delete(ctx, banned); err != nil {
				t.Fatal(err)
			}
			// Through the cache: in the store and in memory.
			if err := r.set(ctx, db.KV, banned, removalBan); err != nil {
				t.Fatal(err)
			}
			expect(banned, removalBan)
			stored(banned, removalBan)
			if err := r.set(ctx, db.KV, kicked, removalNone); err != nil {
				t.Fatal(err)
			}
			expect(kicked, removalNone)
			stored(kicked, removalNone)
			// A write that fails leaves the store's answer to the next read.
			broken := database.New(dbtest.Open(t, dialect), dbutil.NoopLogger) // no tables
			if err := r.set(ctx, broken.KV, kicked, removalKick); err == nil {
				t.Fatal("a write to a store without its tables succeeded")
			}
			if err := db.KV.Set(ctx, kicked, string(removalKick)); err != nil { // as if the failed write had landed
				t.Fatal(err)
			}
			expect(kicked, removalKick)
		})
	}
}

// queryCounter counts the statements a database runs (dbutil reports each to its logger) whose text match picks,
// and passes each on to the logger it wraps.
type queryCounter struct {
	dbutil.DatabaseLogger
	match func(q string) bool
	n     atomic.Int32
}

func (c *queryCounter) QueryTiming(ctx context.Context, method, query string, args []any, nrows int, duration time.Duration, err error) {
	if method != "EndRows" && c.match(strings.TrimSpace(query)) {
		c.n.Add(1)
	}
	c.DatabaseLogger.QueryTiming(ctx, method, query, args, nrows, duration, err)
}

// countQueries puts a queryCounter of the statements match picks in front of db's logger until the test ends.
func countQueries(t *testing.T, db *dbutil.Database, match func(q string) bool) *queryCounter {
	c := &queryCounter{DatabaseLogger: db.Log, match: match}
	db.Log = c
	t.Cleanup(func() { db.Log = c.DatabaseLogger })
	return c
}

func isMemberQuery(q string) bool { return strings.Contains(q, "mx_user_profile") }
func isMemberRead(q string) bool  { return isMemberQuery(q) && strings.HasPrefix(q, "SELECT") }
func isMemberWrite(q string) bool { return isMemberQuery(q) && !strings.HasPrefix(q, "SELECT") }

// TestModerationCheckReadsOnce: the moderation check before a ghost speaks in a room reads the real user's and the
// ghost's memberships in one statement (readGhostFacts, with what else bringing the ghost in needs), and decides as the state store's answers one by one say: a banned real
// user or ghost is refused, a member, a stranger and a ghost that left are not.
func TestModerationCheckReadsOnce(t *testing.T) {
	for _, dialect := range dbtest.Dialects {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			root := dbtest.Open(t, dialect)
			b := newTestBridgeOn(t, root)
			room := id.RoomID("!target:x")
			ghost := id.UserID("@_ferry_alice:ferry.test")
			set := map[id.UserID]event.Membership{
				"@member:x": event.MembershipJoin, "@banned:x": event.MembershipBan, "@left:x": event.MembershipLeave,
				ghost: event.MembershipJoin, "@_ferry_banned:ferry.test": event.MembershipBan,
				"@_ferry_left:ferry.test": event.MembershipLeave,
			}
			for u, m := range set {
				if err := b.StateStore.SetMembership(ctx, room, u, m); err != nil {
					t.Fatal(err)
				}
			}
			users := []id.UserID{"@member:x", "@banned:x", "@left:x", "@stranger:x", ghost, "@_ferry_banned:ferry.test",
				"@_ferry_left:ferry.test", "@_ferry_new:ferry.test"}
			for _, u1 := range users {
				for _, u2 := range users {
					want1, _ := b.StateStore.GetMembership(ctx, room, u1)
					want2, _ := b.StateStore.GetMembership(ctx, room, u2)
					counter := &queryCounter{DatabaseLogger: root.Log, match: isMemberQuery}
					root.Log = counter
					facts, err := b.readGhostFacts(ctx, "!source:x", u1, u2, room)
					root.Log = counter.DatabaseLogger
					if err != nil {
						t.Fatal(err)
					}
					got1, got2 := facts.realMembership, facts.ghostMembership()
					modErr := b.checkModeration(ctx, u1, u2, room, got1, got2)
					if got1 != want1 || got2 != want2 {
						t.Errorf("%s and %s: read %s and %s, the state store says %s and %s", u1, u2, got1, got2, want1, want2)
					}
					wantModerated := want1 == event.MembershipBan || want2 == event.MembershipBan
					if moderated := errors.Is(modErr, errModerated); moderated != wantModerated || (modErr != nil && !moderated) {
						t.Errorf("%s and %s: moderation check %v, want moderated %v", u1, u2, modErr, wantModerated)
					}
					if n := counter.n.Load(); n != 1 {
						t.Errorf("%s and %s: the moderation check read members in %d statements, want 1", u1, u2, n)
					}
				}
			}
		})
	}
}

// TestGhostInviteEchoWritesNothingNew: the homeserver's echo of the bot's invite of a ghost, which mautrix's client
// recorded when the bot sent it, is not written again (a new sender's first message in an invite-only room); an
// invite echo that differs from what is stored (another name) is applied.
func TestGhostInviteEchoWritesNothingNew(t *testing.T) {
	root := dbtest.Postgres(t)
	f := newRelayFixtureOn(t, newScriptedCrypto(), root)
	ctx := context.Background()
	ghost := f.br.Ghosts.Ghost(f.alice)
	sent := &event.MemberEventContent{Membership: event.MembershipInvite, Displayname: "alice (A)"}
	if err := f.br.StateStore.SetMember(ctx, f.roomB, ghost, sent); err != nil {
		t.Fatal(err)
	}
	counter := countQueries(t, root, isMemberWrite)
	echo := func(name string) {
		f.n++
		f.process(t, map[string]any{
			"event_id": fmt.Sprintf("$invite%d", f.n), "room_id": f.roomB, "sender": f.br.AS.BotMXID(), "type": "m.room.member", "state_key": string(ghost),
			"origin_server_ts": time.Now().UnixMilli(), "content": map[string]any{"membership": "invite", "displayname": name},
		})
	}
	echo(sent.Displayname)
	if n := counter.n.Load(); n != 0 {
		t.Errorf("the echo of the invite the store holds wrote members %d times, want none", n)
	}
	echo("alice (renamed)")
	if n := counter.n.Load(); n != 1 {
		t.Errorf("an invite echo that differs from the store wrote members %d times, want once", n)
	}
	if m, err := f.br.StateStore.TryGetMember(ctx, f.roomB, ghost); err != nil || m == nil || m.Membership != event.MembershipInvite || m.Displayname != "alice (renamed)" {
		t.Errorf("after the differing echo the store holds %+v (%v), want the invite with the new name", m, err)
	}
}

// TestGhostFirstJoinWritesItsMembershipOnce: a new sender's ghost, invited by the bot into an invite-only room
// and joining it, is recorded in the state store once (joined); the homeserver's echoes of that invite and that
// join are then recognised as ferry's own without reading the store. An echo that differs from what ferry sent
// (another name) is still applied.
func TestGhostFirstJoinWritesItsMembershipOnce(t *testing.T) {
	root := dbtest.Postgres(t)
	f := newRelayFixtureOn(t, newScriptedCrypto(), root)
	ctx := context.Background()
	ghost := f.br.Ghosts.Ghost(f.alice)
	reads, writes := countQueries(t, root, isMemberRead), countQueries(t, root, isMemberWrite)

	if row := f.relayOne(t); row.State != database.InboxDone {
		t.Fatalf("the first message ended %s (%s)", row.State, row.LastError)
	}
	if n := writes.n.Load(); n != 1 {
		t.Errorf("the ghost's invite and join were written to the state store %d times, want once", n)
	}
	joined, err := f.br.StateStore.TryGetMember(ctx, f.roomB, ghost)
	if err != nil || joined == nil || joined.Membership != event.MembershipJoin {
		t.Fatalf("after the first message the store holds %+v (%v), want the ghost joined", joined, err)
	}
	reads.n.Store(0)
	writes.n.Store(0)
	member := func(sender id.UserID, membership event.Membership, name string) {
		f.n++
		f.process(t, map[string]any{
			"event_id": fmt.Sprintf("$member%d", f.n), "room_id": f.roomB, "sender": sender, "type": "m.room.member", "state_key": string(ghost),
			"origin_server_ts": time.Now().UnixMilli(), "content": map[string]any{"membership": membership, "displayname": name},
		})
	}
	member(f.br.AS.BotMXID(), event.MembershipInvite, joined.Displayname)
	member(ghost, event.MembershipJoin, joined.Displayname)
	if r, w := reads.n.Load(), writes.n.Load(); r != 0 || w != 0 {
		t.Errorf("the echoes of the ghost's invite and join read the store's members %d times and wrote them %d times, want neither", r, w)
	}
	member(ghost, event.MembershipJoin, "alice (renamed)")
	if m, err := f.br.StateStore.TryGetMember(ctx, f.roomB, ghost); err != nil || m == nil || m.Displayname != "alice (renamed)" {
		t.Errorf("after a join echo with another name the store holds %+v (%v), want that name", m, err)
	}
}

// TestGhostFirstCheckReadsOnce: bringing a new sender's ghost into the target room reads what it needs of the
// state (the sender's and the ghost's memberships there, the sender's name and avatar in the source room, whether
// the ghost's global profile was set) in one query, and the ghost then joins with the sender's name. (What a
// moderator's kick or ban does to it is in the other tests of this file.)
func TestGhostFirstCheckReadsOnce(t *testing.T) {
	root := dbtest.Postgres(t)
	f := newRelayFixtureOn(t, newScriptedCrypto(), root)
	ctx := context.Background()
	if err := f.br.StateStore.SetMember(ctx, f.roomA, f.alice, &event.MemberEventContent{Membership: event.MembershipJoin, Displayname: "Alice Liddell"}); err != nil {
		t.Fatal(err)
	}
	counter := countQueries(t, root, func(q string) bool {
		return strings.HasPrefix(q, "SELECT") && (strings.Contains(q, "FROM mx_user_profile") || strings.Contains(q, "FROM kv_store WHERE key="))
	})
	if row := f.relayOne(t); row.State != database.InboxDone {
		t.Fatalf("the first message ended %s (%s)", row.State, row.LastError)
	}
	if n := counter.n.Load(); n != 1 {
		t.Errorf("bringing the ghost in read the members and the key-value table %d times, want once", n)
	}
	ghost := f.br.Ghosts.Ghost(f.alice)
	if m, err := f.br.StateStore.TryGetMember(ctx, f.roomB, ghost); err != nil || m == nil || m.Membership != event.MembershipJoin || !strings.Contains(m.Displayname, "Alice Liddell") {
		t.Errorf("the ghost in the target room: %+v (%v), want joined with the sender's name", m, err)
	}
}
