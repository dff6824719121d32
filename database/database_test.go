package database_test

import (
	"context"
	"errors"
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
		n, err = db.Inbox.Insert(ctx, []*database.InboxEvent{mk("$2", "!a"), mk("$1", "!a"), mk("$4", "!a")})
		if err != nil || n != 1 {
			t.Fatalf("redelivery: n=%d err=%v, want exactly the one new event", n, err)
		}
		evts, err := db.Inbox.NextInRoom(ctx, "!a", 10)
		if err != nil {
			t.Fatal(err)
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
		req := &database.LinkRequest{RoomID: "!b", FromRoom: "!a", RequestedBy: "@u:x", CreatedAt: now}
		if err = db.Links.PutRequest(ctx, req); err != nil {
			t.Fatal(err)
		}
		got, err := db.Links.TakeRequest(ctx, "!b")
		if err != nil || got == nil || got.FromRoom != "!a" {
			t.Fatalf("take request = %+v, %v", got, err)
		}
		if got, _ = db.Links.TakeRequest(ctx, "!b"); got != nil {
			t.Fatalf("request taken twice")
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
		copies, err := db.EventMap.CopiesOf(ctx, "$orig")
		if err != nil || len(copies) != 2 {
			t.Fatalf("copies = %v, %v", copies, err)
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
	})
}
