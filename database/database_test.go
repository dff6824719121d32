package database_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/database/dbtest"
)

func newDB(t *testing.T, dbType string) *database.Database {
	t.Helper()
	db := database.New(dbtest.Open(t, dbType), dbutil.NoopLogger)
	if err := db.Upgrade(context.Background()); err != nil {
		t.Fatalf("upgrade: %v", err)
	}
	return db
}

// forEachDialect runs the store suite against real Postgres and against SQLite.
func forEachDialect(t *testing.T, fn func(t *testing.T, db *database.Database)) {
	for _, dialect := range dbtest.Dialects {
		t.Run(dialect, func(t *testing.T) { fn(t, newDB(t, dialect)) })
	}
}

func TestInboxDedupesByEventID(t *testing.T) {
	forEachDialect(t, func(t *testing.T, db *database.Database) {
		ctx := context.Background()
		now := time.Now()
		mk := func(evtID id.EventID, room id.RoomID) *database.InboxEvent {
			return &database.InboxEvent{EventID: evtID, RoomID: room, Sender: "@a:x", Type: "m.room.encrypted", Raw: []byte(`{"x":1}`), State: database.InboxPending, ReceivedAt: now}
		}
		n, err := db.Inbox.Insert(ctx, []*database.InboxEvent{mk("$1", "!a"), mk("$2", "!a"), mk("$3", "!b")})
		if err != nil || n != 3 {
			t.Fatalf("first insert: n=%d err=%v", n, err)
		}
		// The same events redelivered under another transaction, plus one new one.
		again := []*database.InboxEvent{mk("$2", "!a"), mk("$1", "!a"), mk("$4", "!a")}
		n, err = db.Inbox.Insert(ctx, again)
		if err != nil || n != 1 {
			t.Fatalf("redelivery: n=%d err=%v, want exactly the one new event", n, err)
		}
		evts, err := db.Inbox.NextInRoom(ctx, "!a", 10)
		if err != nil {
			t.Fatal(err)
		}
		// Only the new event learns its seq (the room worker takes it from memory); redeliveries keep 0.
		if again[0].Seq != 0 || again[1].Seq != 0 || len(evts) != 3 || again[2].Seq != evts[2].Seq || again[2].Seq == 0 {
			t.Fatalf("seqs after redelivery = %d %d %d, want 0 0 and the stored seq of $4", again[0].Seq, again[1].Seq, again[2].Seq)
		}
		var got []id.EventID
		for _, e := range evts {
			got = append(got, e.EventID)
		}
		if len(got) != 3 || got[0] != "$1" || got[1] != "$2" || got[2] != "$4" {
			t.Fatalf("room order = %v, want [$1 $2 $4]", got)
		}
		if err = db.Inbox.Finish(ctx, evts[0].Seq, database.InboxDone, ""); err != nil {
			t.Fatal(err)
		}
		done, err := db.Inbox.Get(ctx, "$1")
		if err != nil || done.State != database.InboxDone || done.Raw != nil {
			t.Fatalf("finished event = %+v, %v; want done with payload cleared", done, err)
		}
		rooms, err := db.Inbox.RoomsWithWork(ctx)
		if err != nil || len(rooms) != 2 {
			t.Fatalf("rooms with work = %v, %v", rooms, err)
		}
	})
}

func TestInboxParkAndWake(t *testing.T) {
	forEachDialect(t, func(t *testing.T, db *database.Database) {
		ctx := context.Background()
		_, err := db.Inbox.Insert(ctx, []*database.InboxEvent{{EventID: "$1", RoomID: "!a", Sender: "@a:x", Type: "m.room.encrypted", Raw: []byte(`{}`), State: database.InboxPending, ReceivedAt: time.Now()}})
		if err != nil {
			t.Fatal(err)
		}
		evt, _ := db.Inbox.Get(ctx, "$1")
		if err = db.Inbox.Park(ctx, evt.Seq, "sess1"); err != nil {
			t.Fatal(err)
		}
		if next, _ := db.Inbox.NextInRoom(ctx, "!a", 10); len(next) != 0 {
			t.Fatalf("parked event still pending: %v", next)
		}
		if rooms, err := db.Inbox.Wake(ctx, "other"); err != nil || len(rooms) != 0 {
			t.Fatalf("wake for another session = %v, %v", rooms, err)
		}
		rooms, err := db.Inbox.Wake(ctx, "sess1")
		if err != nil || len(rooms) != 1 || rooms[0] != "!a" {
			t.Fatalf("wake = %v, %v", rooms, err)
		}
		if next, _ := db.Inbox.NextInRoom(ctx, "!a", 10); len(next) != 1 || string(next[0].Raw) != `{}` {
			t.Fatalf("woken event = %v", next)
		}
	})
}

func TestLinks(t *testing.T) {
	forEachDialect(t, func(t *testing.T, db *database.Database) {
		ctx := context.Background()
		now := time.Now()
		if _, err := db.Links.GetByRoom(ctx, "!a"); !errors.Is(err, database.ErrLinkNotFound) {
			t.Fatalf("unlinked room: %v", err)
		}
		link, err := db.Links.Join(ctx, "L1", "!a", "!b", "@u:x", now)
		if err != nil || len(link.Rooms) != 2 || link.ID != "L1" {
			t.Fatalf("join = %+v, %v", link, err)
		}
		// Read back whole, by room and by ID (one statement each since the link's read was merged).
		for _, read := range []func() (*database.Link, error){
			func() (*database.Link, error) { return db.Links.GetByRoom(ctx, "!b") },
			func() (*database.Link, error) { return db.Links.Get(ctx, "L1") },
		} {
			got, err := read()
			if err != nil || got.ID != "L1" || got.CreatedBy != "@u:x" || got.CreatedAt.UnixMilli() != now.UnixMilli() ||
				got.RequireEncryption || got.DisappearAfter != 0 || !slices.Equal(got.Rooms, []id.RoomID{"!a", "!b"}) || len(got.Retired) != 0 {
				t.Fatalf("link read back = %+v, %v", got, err)
			}
		}
		if _, err = db.Links.Join(ctx, "L2", "!a", "!b", "@u:x", now); !errors.Is(err, database.ErrRoomAlreadyLinked) {
			t.Fatalf("linking two linked rooms: %v, want ErrRoomAlreadyLinked", err)
		}
		// A third room joins the existing link through any of its rooms, from either side.
		link, err = db.Links.Join(ctx, "unused", "!c", "!b", "@u:x", now)
		if err != nil || link.ID != "L1" || len(link.Rooms) != 3 {
			t.Fatalf("three-room link = %+v, %v", link, err)
		}
		if others := link.Others("!b"); len(others) != 2 {
			t.Fatalf("others = %v", others)
		}
		if _, err = db.Links.Leave(ctx, "!c"); err != nil {
			t.Fatal(err)
		}
		if link, _ = db.Links.GetByRoom(ctx, "!a"); len(link.Rooms) != 2 {
			t.Fatalf("after leave: %v", link.Rooms)
		}
		// Two rooms left: leaving dissolves the link.
		if _, err = db.Links.Leave(ctx, "!a"); err != nil {
			t.Fatal(err)
		}
		if _, err = db.Links.GetByRoom(ctx, "!b"); !errors.Is(err, database.ErrLinkNotFound) {
			t.Fatalf("dissolved link still there: %v", err)
		}
	})
}

// TestLinkFollowsRoomUpgrades: an upgraded room's place in its link moves to its successor, twice in a row; the
// old rooms are remembered as retired (for relations to events from before the upgrades), a second move changes
// nothing, and a room leaving the link takes its predecessors along.
func TestLinkFollowsRoomUpgrades(t *testing.T) {
	forEachDialect(t, func(t *testing.T, db *database.Database) {
		ctx := context.Background()
		now := time.Now()
		if _, err := db.Links.Join(ctx, "L1", "!a", "!b", "@u:x", now); err != nil {
			t.Fatal(err)
		}
		if _, err := db.Links.Join(ctx, "L1", "!c", "!b", "@u:x", now.Add(time.Second)); err != nil {
			t.Fatal(err)
		}
		if _, err := db.Links.Join(ctx, "L2", "!x", "!y", "@u:x", now); err != nil {
			t.Fatal(err)
		}
		if _, _, err := db.Links.MoveRoom(ctx, "!a", "!x", now); !errors.Is(err, database.ErrRoomAlreadyLinked) {
			t.Fatalf("moving into a room of another link: %v, want ErrRoomAlreadyLinked", err)
		}
		if _, _, err := db.Links.MoveRoom(ctx, "!nowhere", "!z", now); !errors.Is(err, database.ErrLinkNotFound) {
			t.Fatalf("moving an unlinked room: %v, want ErrLinkNotFound", err)
		}
		// Warm the cache: a move must not leave stale answers behind.
		if _, err := db.Links.GetByRoom(ctx, "!a2"); !errors.Is(err, database.ErrLinkNotFound) {
			t.Fatal(err)
		}
		link, moved, err := db.Links.MoveRoom(ctx, "!a", "!a2", now.Add(time.Minute))
		if err != nil || !moved || !slices.Equal(link.Rooms, []id.RoomID{"!a2", "!b", "!c"}) {
			t.Fatalf("first move = %v, %t, %v; want !a2 in !a's place", link, moved, err)
		}
		if again, moved, err := db.Links.MoveRoom(ctx, "!a", "!a2", now.Add(2*time.Minute)); err != nil || moved || again.ID != "L1" {
			t.Fatalf("the same move again = %v, %t, %v; want no change", again, moved, err)
		}
		if _, _, err = db.Links.MoveRoom(ctx, "!a2", "!a3", now.Add(3*time.Minute)); err != nil {
			t.Fatal(err)
		}
		link, err = db.Links.GetByRoom(ctx, "!a3")
		if err != nil || link.ID != "L1" {
			t.Fatalf("successor's link = %v, %v", link, err)
		}
		if _, err = db.Links.GetByRoom(ctx, "!a"); !errors.Is(err, database.ErrLinkNotFound) {
			t.Fatalf("the retired room is still linked: %v", err)
		}
		for _, old := range []id.RoomID{"!a", "!a2"} {
			if retired, err := db.Links.GetByRetired(ctx, old); err != nil || retired.ID != "L1" || retired.CurrentOf(old) != "!a3" {
				t.Fatalf("retired %s = %v, %v; want L1 with !a3 standing for it", old, retired, err)
			}
		}
		if got := link.Predecessors("!a3"); !slices.Equal(got, []id.RoomID{"!a2", "!a"}) {
			t.Fatalf("predecessors = %v, want newest first", got)
		}
		if got := link.Predecessors("!b"); len(got) != 0 {
			t.Fatalf("predecessors of a room never upgraded = %v", got)
		}
		// Leaving takes the retired rooms along.
		if _, err = db.Links.Leave(ctx, "!a3"); err != nil {
			t.Fatal(err)
		}
		if _, err = db.Links.GetByRetired(ctx, "!a"); !errors.Is(err, database.ErrLinkNotFound) {
			t.Fatalf("a retired room outlived its successor's leaving: %v", err)
		}
		link, _ = db.Links.GetByRoom(ctx, "!b")
		if len(link.Retired) != 0 {
			t.Fatalf("retired rooms left behind: %v", link.Retired)
		}
	})
}

func TestEventMapCounterpart(t *testing.T) {
	forEachDialect(t, func(t *testing.T, db *database.Database) {
		ctx := context.Background()
		now := time.Now()
		for _, c := range []*database.Copy{
			{SourceEvent: "$orig", SourceRoom: "!a", TargetRoom: "!b", TargetEvent: "$inB", Sender: "@g:x", CreatedAt: now},
			{SourceEvent: "$orig", SourceRoom: "!a", TargetRoom: "!c", TargetEvent: "$inC", Sender: "@g:x", CreatedAt: now},
		} {
			if err := db.EventMap.Put(ctx, c); err != nil {
				t.Fatal(err)
			}
		}
		cases := []struct {
			name   string
			evt    id.EventID
			target id.RoomID
			want   id.EventID
			ok     bool
		}{
			{"original to copy", "$orig", "!b", "$inB", true},
			{"copy back to original", "$inB", "!a", "$orig", true},
			{"copy to sibling copy", "$inB", "!c", "$inC", true},
			{"unknown event", "$nope", "!b", "", false},
		}
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				got, ok, err := db.EventMap.Counterpart(ctx, tc.evt, tc.target)
				if err != nil || ok != tc.ok || got != tc.want {
					t.Fatalf("Counterpart(%s, %s) = %s, %v, %v; want %s, %v", tc.evt, tc.target, got, ok, err, tc.want, tc.ok)
				}
			})
		}
		for _, target := range []id.RoomID{"!b", "!c"} {
			if c, err := db.EventMap.Get(ctx, "$orig", target); err != nil || c == nil {
				t.Fatalf("the copy in %s = %v, %v", target, c, err)
			}
		}
	})
}

func TestNewerSchemaIsRefused(t *testing.T) {
	forEachDialect(t, func(t *testing.T, db *database.Database) {
		ctx := context.Background()
		if _, err := db.Exec(ctx, `UPDATE `+database.VersionTable+` SET version=version+5, compat=compat+5`); err != nil {
			t.Fatal(err)
		}
		err := db.Upgrade(ctx)
		var ue database.UpgradeError
		if !errors.As(err, &ue) || !errors.Is(err, dbutil.ErrUnsupportedDatabaseVersion) {
			t.Fatalf("upgrade of a newer database = %v, want UpgradeError wrapping ErrUnsupportedDatabaseVersion", err)
		}
		if msg := err.Error(); !strings.Contains(msg, "newer ferry") {
			t.Fatalf("message %q does not tell the admin what happened", msg)
		}
	})
}

func TestKV(t *testing.T) {
	forEachDialect(t, func(t *testing.T, db *database.Database) {
		ctx := context.Background()
		if v, err := db.KV.Get(ctx, "k"); err != nil || v != "" {
			t.Fatalf("unset = %q, %v", v, err)
		}
		_ = db.KV.Set(ctx, "k", "1")
		_ = db.KV.Set(ctx, "k", "2")
		if v, _ := db.KV.Get(ctx, "k"); v != "2" {
			t.Fatalf("got %q", v)
		}
		_ = db.KV.Delete(ctx, "k")
		if v, _ := db.KV.Get(ctx, "k"); v != "" {
			t.Fatalf("deleted = %q", v)
		}
		for _, k := range []string{"ab:1", "ab:2", "AB:3", "aXb:4", "a:5"} {
			_ = db.KV.Set(ctx, k, "v"+k)
		}
		got, err := db.KV.Prefixed(ctx, "ab:")
		if err != nil || len(got) != 2 || got["ab:1"] != "vab:1" || got["ab:2"] != "vab:2" {
			t.Fatalf("prefixed ab: = %v, %v; want exactly ab:1 and ab:2", got, err)
		}
		if got, _ = db.KV.Prefixed(ctx, "a_:"); len(got) != 0 {
			t.Fatalf("prefixed a_: = %v; _ is not a wildcard", got)
		}
	})
}

// TestReadback: a room keeps the earliest since marked; reading it back from a later since than one marked, or
// in a read that began before the room was marked again, leaves the row.
func TestReadback(t *testing.T) {
	forEachDialect(t, func(t *testing.T, db *database.Database) {
		ctx := context.Background()
		t0 := time.UnixMilli(1_700_000_000_000)
		for _, since := range []time.Time{t0.Add(time.Minute), t0, t0.Add(2 * time.Minute)} {
			if err := db.Readback.Mark(ctx, "!a", since, t0.Add(time.Hour)); err != nil {
				t.Fatal(err)
			}
		}
		_ = db.Readback.Mark(ctx, "!b", t0, t0.Add(time.Hour))
		_ = db.Readback.Mark(ctx, "!c", t0, t0.Add(time.Hour))
		all, err := db.Readback.All(ctx)
		if err != nil || len(all) != 3 || !all["!a"].Since.Equal(t0) {
			t.Fatalf("all = %v, %v", all, err)
		}
		_ = db.Readback.Done(ctx, "!a", t0.Add(time.Second), t0.Add(2*time.Hour)) // read from later than marked
		_ = db.Readback.Done(ctx, "!b", t0, t0.Add(2*time.Hour))
		_ = db.Readback.Done(ctx, "!c", t0, t0.Add(time.Hour-time.Second)) // marked again while it was read
		if all, _ = db.Readback.All(ctx); len(all) != 2 || !all["!a"].Since.Equal(t0) || !all["!c"].Since.Equal(t0) {
			t.Fatalf("after reading back: %v", all)
		}
	})
}

// TestReadbackProgress: how far a room's read-back got is kept with its mark, survives a later mark, and is
// cleared when the room is marked from earlier than the progress reads back to; progress for a since later than
// the mark's is not kept.
func TestReadbackProgress(t *testing.T) {
	forEachDialect(t, func(t *testing.T, db *database.Database) {
		ctx := context.Background()
		t0 := time.UnixMilli(1_700_000_000_000)
		progress := func(room id.RoomID) string {
			all, err := db.Readback.All(ctx)
			if err != nil {
				t.Fatal(err)
			}
			return all[room].Progress
		}
		if err := db.Readback.Mark(ctx, "!a", t0, t0); err != nil {
			t.Fatal(err)
		}
		if err := db.Readback.SaveProgress(ctx, "!a", t0, `{"p":1}`); err != nil {
			t.Fatal(err)
		}
		_ = db.Readback.Mark(ctx, "!a", t0.Add(time.Minute), t0.Add(time.Minute)) // later since: progress stays
		if got := progress("!a"); got != `{"p":1}` {
			t.Fatalf("progress after a later mark = %q", got)
		}
		_ = db.Readback.SaveProgress(ctx, "!a", t0.Add(time.Second), `{"p":2}`) // reads back less far than marked
		if got := progress("!a"); got != `{"p":1}` {
			t.Fatalf("progress from a later since was kept: %q", got)
		}
		_ = db.Readback.Mark(ctx, "!a", t0.Add(-time.Minute), t0.Add(2*time.Minute)) // earlier since: cleared
		if got := progress("!a"); got != "" {
			t.Fatalf("progress after an earlier mark = %q, want none", got)
		}
		_ = db.Readback.SaveProgress(ctx, "!gone", t0, `{"p":3}`) // no row: nothing is created
		if all, _ := db.Readback.All(ctx); len(all) != 1 {
			t.Fatalf("rows after saving progress for an unmarked room: %v", all)
		}
	})
}

// queueOf lists the room's pending events in the order the worker takes them.
func queueOf(ctx context.Context, t *testing.T, db *database.Database, room id.RoomID) []*database.InboxEvent {
	t.Helper()
	rows, err := db.Inbox.NextInRoom(ctx, room, 10)
	if err != nil {
		t.Fatal(err)
	}
	return rows
}

// idsOf lists the event IDs of rows.
func idsOf(rows []*database.InboxEvent) []id.EventID {
	ids := make([]id.EventID, len(rows))
	for i, r := range rows {
		ids[i] = r.EventID
	}
	return ids
}

// TestConfirmOrder: events delivered out of the room's order (e3 late) take the order /sync showed, keeping the
// places pending events hold among the room's others; they are marked synced; done events stay where they are.
func TestConfirmOrder(t *testing.T) {
	forEachDialect(t, func(t *testing.T, db *database.Database) {
		ctx := context.Background()
		row := func(evtID id.EventID) *database.InboxEvent {
			return &database.InboxEvent{EventID: evtID, RoomID: "!r", Sender: "@a:x", Type: "m.room.message", Raw: []byte(`{}`), State: database.InboxPending, ReceivedAt: time.Now()}
		}
		// Delivered: e1, e2, e4, e5, e3 (late), e6.
		for _, e := range []id.EventID{"$e1", "$e2", "$e4", "$e5", "$e3", "$e6"} {
			if _, err := db.Inbox.Insert(ctx, []*database.InboxEvent{row(e)}); err != nil {
				t.Fatal(err)
			}
		}
		done, _ := db.Inbox.Get(ctx, "$e1")
		if err := db.Inbox.FinishMany(ctx, []int64{done.Seq}, database.InboxDone); err != nil {
			t.Fatal(err)
		}
		// /sync shows e1 … e5 in the room's order.
		moved, _, err := db.Inbox.ConfirmOrder(ctx, "!r", shown("$e1", "$e2", "$e3", "$e4", "$e5", "$unknown"), false)
		if err != nil || moved != 3 {
			t.Fatalf("moved %d rows (%v), want 3 (e3, e4, e5)", moved, err)
		}
		rows := queueOf(ctx, t, db, "!r")
		for _, r := range rows {
			if r.Synced != (r.EventID != "$e6") {
				t.Fatalf("%s synced = %v", r.EventID, r.Synced)
			}
		}
		if got, want := idsOf(rows), []id.EventID{"$e2", "$e3", "$e4", "$e5", "$e6"}; !slices.Equal(got, want) {
			t.Fatalf("queue %v, want %v", got, want)
		}
	})
}

// TestConfirmOrderPlacesUnshownPushesAfter: a batch that shows all the room had since the previous one (complete)
// puts the pushed events it does not show after its own, whose rows may be newer (first seen in this batch);
// an incomplete one leaves them where they are.
func TestConfirmOrderPlacesUnshownPushesAfter(t *testing.T) {
	forEachDialect(t, func(t *testing.T, db *database.Database) {
		ctx := context.Background()
		insert := func(evtID id.EventID, synced bool) {
			t.Helper()
			row := &database.InboxEvent{EventID: evtID, RoomID: "!r", Sender: "@a:x", Type: "m.room.message", Raw: []byte(`{}`),
				State: database.InboxPending, ReceivedAt: time.Now(), Synced: synced}
			if _, err := db.Inbox.Insert(ctx, []*database.InboxEvent{row}); err != nil {
				t.Fatal(err)
			}
		}
		queue := func() []id.EventID { return idsOf(queueOf(ctx, t, db, "!r")) }
		// Pushed: p3, p4 (not shown yet). The batch then shows e1, e2 for the first time.
		insert("$p3", false)
		insert("$p4", false)
		insert("$e1", true)
		insert("$e2", true)
		if _, _, err := db.Inbox.ConfirmOrder(ctx, "!r", shown("$e1", "$e2"), false); err != nil {
			t.Fatal(err)
		}
		if got, want := queue(), []id.EventID{"$p3", "$p4", "$e1", "$e2"}; !slices.Equal(got, want) {
			t.Fatalf("after an incomplete batch: queue %v, want %v", got, want)
		}
		moved, _, err := db.Inbox.ConfirmOrder(ctx, "!r", shown("$e1", "$e2"), true)
		if err != nil || moved != 4 {
			t.Fatalf("moved %d rows (%v), want 4", moved, err)
		}
		if got, want := queue(), []id.EventID{"$e1", "$e2", "$p3", "$p4"}; !slices.Equal(got, want) {
			t.Fatalf("after a complete batch: queue %v, want %v", got, want)
		}
		// The next batch shows p4 before p3: they take that order, still after e1 and e2.
		if _, _, err = db.Inbox.ConfirmOrder(ctx, "!r", shown("$p4", "$p3"), true); err != nil {
			t.Fatal(err)
		}
		if got, want := queue(), []id.EventID{"$e1", "$e2", "$p4", "$p3"}; !slices.Equal(got, want) {
			t.Fatalf("after the second batch: queue %v, want %v", got, want)
		}
	})
}

// shown lists events as /sync shows them, without timestamps.
func shown(ids ...id.EventID) []database.ShownEvent {
	evts := make([]database.ShownEvent, len(ids))
	for i, e := range ids {
		evts[i] = database.ShownEvent{ID: e, Server: "x"}
	}
	return evts
}

// TestConfirmOrderKeepsSkippedPushesInPlace: a complete batch that does not show a pushed event older than one
// it shows from the same server skipped it (Dendrite's /sync did, after its restart: the first message sent then
// was pushed but never shown to the bot, and went after the 18 that followed it). It keeps its place before the
// first such event; pushes with no older-than evidence (a later one, one of another server, whose clock says
// nothing) still follow the batch.
func TestConfirmOrderKeepsSkippedPushesInPlace(t *testing.T) {
	forEachDialect(t, func(t *testing.T, db *database.Database) {
		ctx := context.Background()
		insert := func(evtID id.EventID, sender id.UserID, ts int64, synced bool) {
			t.Helper()
			row := &database.InboxEvent{EventID: evtID, RoomID: "!r", Sender: sender, Type: "m.room.message",
				Raw: []byte(fmt.Sprintf(`{"event_id":%q,"origin_server_ts":%d}`, evtID, ts)), State: database.InboxPending,
				ReceivedAt: time.Now(), Synced: synced}
			if _, err := db.Inbox.Insert(ctx, []*database.InboxEvent{row}); err != nil {
				t.Fatal(err)
			}
		}
		// Pushed in this order: s1, r (another server, its clock behind), e2, e3, p5 (sent later), m (sent
		// between e2 and e3, pushed late); /sync then shows e2, e3 and, for the first time, e4.
		insert("$s1", "@a:x", 100, false)
		insert("$r", "@b:y", 50, false)
		insert("$e2", "@a:x", 200, false)
		insert("$e3", "@a:x", 300, false)
		insert("$p5", "@a:x", 500, false)
		insert("$m", "@c:x", 250, false)
		insert("$e4", "@a:x", 400, true)
		batch := []database.ShownEvent{{ID: "$e2", Server: "x", TS: 200}, {ID: "$e3", Server: "x", TS: 300}, {ID: "$e4", Server: "x", TS: 400}}
		if _, skipped, err := db.Inbox.ConfirmOrder(ctx, "!r", batch, true); err != nil || skipped != 2 {
			t.Fatalf("skipped %d (%v), want 2 (s1, m)", skipped, err)
		}
		if got, want := idsOf(queueOf(ctx, t, db, "!r")), []id.EventID{"$s1", "$e2", "$m", "$e3", "$e4", "$r", "$p5"}; !slices.Equal(got, want) {
			t.Fatalf("queue %v, want %v", got, want)
		}
	})
}

func TestDisappearQueue(t *testing.T) {
	forEachDialect(t, func(t *testing.T, db *database.Database) {
		ctx := context.Background()
		t0 := time.UnixMilli(1_700_000_000_000)
		// A copy with a deadline schedules the copy and its original in one step.
		err := db.EventMap.Put(ctx, &database.Copy{SourceEvent: "$orig", SourceRoom: "!a", TargetRoom: "!b", TargetEvent: "$copy",
			Sender: "@_ferry_alice:x", CreatedAt: t0, DisappearAt: t0.Add(5 * time.Second)})
		if err != nil {
			t.Fatal(err)
		}
		// The same original copied into a third room keeps one row for the original.
		err = db.EventMap.Put(ctx, &database.Copy{SourceEvent: "$orig", SourceRoom: "!a", TargetRoom: "!c", TargetEvent: "$copy2",
			Sender: "@_ferry_alice:x", CreatedAt: t0, DisappearAt: t0.Add(5 * time.Second)})
		if err != nil {
			t.Fatal(err)
		}
		if due, err := db.Disappear.Due(ctx, t0.Add(4999*time.Millisecond), 10); err != nil || len(due) != 0 {
			t.Fatalf("due before the deadline: %v, %v", due, err)
		}
		next, ok, err := db.Disappear.Next(ctx)
		if err != nil || !ok || !next.Equal(t0.Add(5*time.Second)) {
			t.Fatalf("next = %v %v %v", next, ok, err)
		}
		due, err := db.Disappear.Due(ctx, t0.Add(5*time.Second), 10)
		if err != nil || len(due) != 3 {
			t.Fatalf("due at the deadline: %d rows, %v; want copy, copy2 and original", len(due), err)
		}
		byID := map[id.EventID]*database.Redaction{}
		for _, r := range due {
			byID[r.EventID] = r
		}
		if c := byID["$copy"]; c == nil || c.RedactAs != "@_ferry_alice:x" || c.Original || c.RoomID != "!b" {
			t.Fatalf("copy row = %+v", c)
		}
		if o := byID["$orig"]; o == nil || !o.Original || o.RoomID != "!a" || o.RedactAs != "" {
			t.Fatalf("original row = %+v", o)
		}
		// A relation's earlier deadline wins; the deadline of a known event is readable.
		if dl, err := db.Disappear.DeadlineOf(ctx, "$copy"); err != nil || !dl.Equal(t0.Add(5*time.Second)) {
			t.Fatalf("DeadlineOf(copy) = %v, %v", dl, err)
		}
		if dl, err := db.Disappear.DeadlineOf(ctx, "$unknown"); err != nil || !dl.IsZero() {
			t.Fatalf("DeadlineOf(unknown) = %v, %v", dl, err)
		}
		if err = db.Disappear.Schedule(ctx, &database.Redaction{EventID: "$copy", RoomID: "!b", Deadline: t0.Add(time.Hour)}); err != nil {
			t.Fatal(err)
		}
		// Retry postpones, Done removes, Fail keeps a failed row that is no longer due.
		if err = db.Disappear.Retry(ctx, "$copy", t0.Add(time.Minute), "502"); err != nil {
			t.Fatal(err)
		}
		if err = db.Disappear.Done(ctx, "$copy2"); err != nil {
			t.Fatal(err)
		}
		if err = db.Disappear.Fail(ctx, "$orig", "M_FORBIDDEN"); err != nil {
			t.Fatal(err)
		}
		if due, _ = db.Disappear.Due(ctx, t0.Add(30*time.Second), 10); len(due) != 0 {
			t.Fatalf("due while retrying: %d rows", len(due))
		}
		if next, _, _ = db.Disappear.Next(ctx); !next.Equal(t0.Add(time.Minute)) {
			t.Fatalf("next during retry = %v, want the retry time", next)
		}
		if due, _ = db.Disappear.Due(ctx, t0.Add(time.Minute), 10); len(due) != 1 || due[0].Attempts != 1 || !due[0].Deadline.Equal(t0.Add(5*time.Second)) {
			t.Fatalf("due after retry time: %+v (the earlier deadline must be kept)", due)
		}
		if n, _ := db.Disappear.Count(ctx, database.RedactionFailed); n != 1 {
			t.Fatalf("failed rows = %d, want 1", n)
		}
	})
}

func TestDisappearSessions(t *testing.T) {
	forEachDialect(t, func(t *testing.T, db *database.Database) {
		ctx := context.Background()
		t0 := time.UnixMilli(1_700_000_000_000)
		use := func(session id.SessionID, outbound bool, at, deadline time.Time) {
			t.Helper()
			if _, err := db.Disappear.NoteSession(ctx, &database.SessionUse{RoomID: "!r", SessionID: session, Sender: "@u:x", Outbound: outbound, At: at, Deadline: deadline}); err != nil {
				t.Fatal(err)
			}
		}
		use("out", true, t0, t0.Add(5*time.Second))
		use("out", true, t0.Add(time.Second), t0.Add(6*time.Second))
		use("in", false, t0, t0.Add(5*time.Second))
		use("mixed", false, t0, t0.Add(5*time.Second))
		use("mixed", false, t0.Add(time.Second), time.Time{}) // a message without deadline: kept for good
		use("kept", true, t0, t0.Add(5*time.Second))
		if err := db.Disappear.KeepSession(ctx, "!r", "kept"); err != nil {
			t.Fatal(err)
		}
		expired := func(now time.Time) []id.SessionID {
			t.Helper()
			got, err := db.Disappear.ExpiredSessions(ctx, now, now.Add(-10*time.Second), now.Add(-30*time.Second), now.Add(-2*time.Minute))
			if err != nil {
				t.Fatal(err)
			}
			var ids []id.SessionID
			for _, s := range got {
				ids = append(ids, s.SessionID)
			}
			return ids
		}
		if got := expired(t0.Add(5500 * time.Millisecond)); len(got) != 0 {
			t.Fatalf("expired before the last deadline and idle time: %v", got)
		}
		if got := expired(t0.Add(11 * time.Second)); len(got) != 1 || got[0] != "out" {
			t.Fatalf("expired at t0+11s = %v, want only the outbound session", got)
		}
		if got := expired(t0.Add(31 * time.Second)); len(got) != 2 {
			t.Fatalf("expired at t0+31s = %v, want out and in (mixed and kept are kept)", got)
		}
		if err := db.Disappear.SessionDeleted(ctx, "!r", "out", t0.Add(31*time.Second)); err != nil {
			t.Fatal(err)
		}
		if got := expired(t0.Add(time.Hour)); len(got) != 1 || got[0] != "in" {
			t.Fatalf("expired an hour later = %v, want only the session not deleted yet", got)
		}
		s, err := db.Disappear.GetSession(ctx, "!r", "out")
		if err != nil || s == nil || !s.Deleted || !s.LastDeadline.Equal(t0.Add(6*time.Second)) || !s.FirstUsed.Equal(t0) {
			t.Fatalf("out = %+v, %v", s, err)
		}
	})
}

// TestInboxPrune: handled rows older than the cut-off go, a batch at a time; pending and parked rows stay.
func TestInboxPrune(t *testing.T) {
	forEachDialect(t, func(t *testing.T, db *database.Database) {
		ctx := context.Background()
		old, recent := time.Now().Add(-48*time.Hour), time.Now()
		var rows []*database.InboxEvent
		for i, at := range []time.Time{old, old, old, old, recent} {
			rows = append(rows, &database.InboxEvent{EventID: id.EventID(fmt.Sprintf("$p%d", i)), RoomID: "!a", Sender: "@a:x", Type: "m.room.message", Raw: []byte(`{}`), State: database.InboxPending, ReceivedAt: at})
		}
		if _, err := db.Inbox.Insert(ctx, rows); err != nil {
			t.Fatal(err)
		}
		if err := db.Inbox.FinishMany(ctx, []int64{rows[0].Seq, rows[1].Seq, rows[4].Seq}, database.InboxDone); err != nil {
			t.Fatal(err)
		}
		if err := db.Inbox.Park(ctx, rows[2].Seq, "S"); err != nil {
			t.Fatal(err)
		}
		cut := time.Now().Add(-24 * time.Hour)
		if n, err := db.Inbox.Prune(ctx, cut, 1); err != nil || n != 1 {
			t.Fatalf("first batch = %d, %v", n, err)
		}
		if n, err := db.Inbox.Prune(ctx, cut, 10); err != nil || n != 1 {
			t.Fatalf("second batch = %d, %v", n, err)
		}
		for i, want := range []bool{false, false, true, true, true} {
			got, err := db.Inbox.Get(ctx, rows[i].EventID)
			if err != nil || (got != nil) != want {
				t.Errorf("row %d present = %t, want %t (%v)", i, got != nil, want, err)
			}
		}
	})
}

// TestFoundSends: a send found twice keeps its first record; Since returns what was found from then on; Prune
// forgets what was found before.
func TestFoundSends(t *testing.T) {
	forEachDialect(t, func(t *testing.T, db *database.Database) {
		ctx := context.Background()
		t0 := time.UnixMilli(1_700_000_000_000)
		put := func(room id.RoomID, txn string, evt id.EventID, at time.Time) {
			t.Helper()
			if err := db.FoundSends.Put(ctx, database.FoundSend{RoomID: room, TxnID: txn, EventID: evt, FoundAt: at}); err != nil {
				t.Fatal(err)
			}
		}
		put("!a", "t1", "$1", t0)
		put("!a", "t1", "$other", t0.Add(time.Hour)) // found again: the first record stays
		put("!b", "t1", "$2", t0.Add(time.Minute))
		put("!a", "t2", "$3", t0.Add(2*time.Minute))
		got, err := db.FoundSends.Since(ctx, t0.Add(time.Second))
		if err != nil || len(got) != 2 {
			t.Fatalf("since t0+1s: %+v, %v", got, err)
		}
		all, _ := db.FoundSends.Since(ctx, t0)
		for _, f := range all {
			if f.RoomID == "!a" && f.TxnID == "t1" && (f.EventID != "$1" || !f.FoundAt.Equal(t0)) {
				t.Fatalf("the send found twice holds %+v, want its first record", f)
			}
		}
		if err = db.FoundSends.Prune(ctx, t0.Add(90*time.Second)); err != nil {
			t.Fatal(err)
		}
		if all, _ = db.FoundSends.Since(ctx, time.UnixMilli(0)); len(all) != 1 || all[0].EventID != "$3" {
			t.Fatalf("after pruning: %+v", all)
		}
	})
}
