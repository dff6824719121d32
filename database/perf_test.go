package database_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/database/dbtest"
)

// TestLinkChangesApplyAtOnce: GetByRoom is cached, and every way a link changes is visible to the next lookup.
func TestLinkChangesApplyAtOnce(t *testing.T) {
	forEachDialect(t, func(t *testing.T, db *database.Database) {
		ctx := context.Background()
		now := time.Now()
		// A negative answer is cached too; linking must replace it.
		if _, err := db.Links.GetByRoom(ctx, "!a"); !errors.Is(err, database.ErrLinkNotFound) {
			t.Fatalf("unlinked: %v", err)
		}
		if _, err := db.Links.Join(ctx, "L1", "!a", "!b", "@u:x", now); err != nil {
			t.Fatal(err)
		}
		link, err := db.Links.GetByRoom(ctx, "!a")
		if err != nil || len(link.Rooms) != 2 {
			t.Fatalf("after join: %+v, %v", link, err)
		}
		// Callers cannot change the cached link through what they got.
		link.Rooms[0], link.DisappearAfter = "!mutated", time.Hour
		if again, _ := db.Links.GetByRoom(ctx, "!a"); again.Rooms[0] == "!mutated" || again.DisappearAfter != 0 {
			t.Fatalf("cached link changed through a returned copy: %+v", again)
		}
		if err = db.Links.SetDisappear(ctx, "L1", time.Minute); err != nil {
			t.Fatal(err)
		}
		if err = db.Links.SetRequireEncryption(ctx, "L1", true); err != nil {
			t.Fatal(err)
		}
		if link, _ = db.Links.GetByRoom(ctx, "!b"); link.DisappearAfter != time.Minute || !link.RequireEncryption {
			t.Fatalf("settings not seen: %+v", link)
		}
		if _, err = db.Links.Join(ctx, "x", "!c", "!a", "@u:x", now); err != nil {
			t.Fatal(err)
		}
		if link, _ = db.Links.GetByRoom(ctx, "!b"); len(link.Rooms) != 3 {
			t.Fatalf("third room not seen from !b: %v", link.Rooms)
		}
		if _, err = db.Links.Leave(ctx, "!c"); err != nil {
			t.Fatal(err)
		}
		if _, err = db.Links.GetByRoom(ctx, "!c"); !errors.Is(err, database.ErrLinkNotFound) {
			t.Fatalf("left room still linked: %v", err)
		}
		if _, err = db.Links.Leave(ctx, "!a"); err != nil {
			t.Fatal(err)
		}
		if _, err = db.Links.GetByRoom(ctx, "!b"); !errors.Is(err, database.ErrLinkNotFound) {
			t.Fatalf("dissolved link still there: %v", err)
		}
	})
}

// TestStagedCopies: a staged copy is found by lookups before it is written, PutMany writes it (keeping the
// first copy of a pair), and a handle without the staging (a restart) sees only written copies.
func TestStagedCopies(t *testing.T) {
	forEachDialect(t, func(t *testing.T, db *database.Database) {
		ctx := context.Background()
		other := database.New(db.Database, dbutil.NoopLogger) // another process's view
		now := time.Now()
		c := &database.Copy{SourceEvent: "$orig", SourceRoom: "!a", TargetRoom: "!b", TargetEvent: "$inB", Sender: "@g:x", CreatedAt: now}
		db.EventMap.Stage(c)
		if got, ok, err := db.EventMap.Counterpart(ctx, "$orig", "!b"); err != nil || !ok || got != "$inB" {
			t.Fatalf("staged copy not found: %s %v %v", got, ok, err)
		}
		if got, ok, _ := db.EventMap.Counterpart(ctx, "$inB", "!a"); !ok || got != "$orig" {
			t.Fatalf("staged copy not found by target: %s %v", got, ok)
		}
		if got, _ := other.EventMap.Get(ctx, "$orig", "!b"); got != nil {
			t.Fatalf("staged copy written before PutMany: %+v", got)
		}
		dup := *c
		dup.TargetEvent = "$second"
		if err := db.EventMap.PutMany(ctx, []*database.Copy{c, &dup}); err != nil {
			t.Fatal(err)
		}
		db.EventMap.Unstage([]*database.Copy{c})
		for _, q := range []*database.EventMapQuery{db.EventMap, other.EventMap} {
			if got, err := q.Get(ctx, "$orig", "!b"); err != nil || got == nil || got.TargetEvent != "$inB" {
				t.Fatalf("written copy = %+v, %v; want the first one", got, err)
			}
		}
	})
}

// TestFinishMany marks a batch done in one statement and leaves other rows alone.
func TestFinishMany(t *testing.T) {
	forEachDialect(t, func(t *testing.T, db *database.Database) {
		ctx := context.Background()
		var evts []*database.InboxEvent
		for _, e := range []id.EventID{"$1", "$2", "$3"} {
			evts = append(evts, &database.InboxEvent{EventID: e, RoomID: "!a", Sender: "@a:x", Type: "m.room.message", Raw: []byte(`{}`), State: database.InboxPending, ReceivedAt: time.Now()})
		}
		if _, err := db.Inbox.Insert(ctx, evts); err != nil {
			t.Fatal(err)
		}
		rows, _ := db.Inbox.NextInRoom(ctx, "!a", 10)
		if err := db.Inbox.FinishMany(ctx, []int64{rows[0].Seq, rows[2].Seq}, database.InboxDone); err != nil {
			t.Fatal(err)
		}
		left, _ := db.Inbox.NextInRoom(ctx, "!a", 10)
		if len(left) != 1 || left[0].EventID != "$2" {
			t.Fatalf("pending after FinishMany: %v", left)
		}
		if done, _ := db.Inbox.Get(ctx, "$1"); done.State != database.InboxDone || done.Raw != nil {
			t.Fatalf("finished row = %+v", done)
		}
	})
}

// TestPostgresDriverJSONB: with binary parameters, JSON given as []byte still lands in jsonb columns (as
// mautrix's stores write it), and binary bytea values stay byte-exact.
func TestPostgresDriverJSONB(t *testing.T) {
	ctx := context.Background()
	db := dbtest.Postgres(t)
	if _, err := db.Exec(ctx, `CREATE TABLE t (j jsonb, b bytea)`); err != nil {
		t.Fatal(err)
	}
	bin := []byte{'{', 0, 0xff, '\\', '}'}
	if _, err := db.Exec(ctx, `INSERT INTO t (j, b) VALUES ($1, $2)`, []byte(`{"algorithm":"m.megolm.v1.aes-sha2","x":"\u00e9\\n"}`), bin); err != nil {
		t.Fatalf("insert: %v", err)
	}
	var alg string
	var got []byte
	if err := db.QueryRow(ctx, `SELECT j->>'algorithm', b FROM t`).Scan(&alg, &got); err != nil {
		t.Fatal(err)
	}
	if alg != "m.megolm.v1.aes-sha2" || string(got) != string(bin) {
		t.Fatalf("read back %q, %q", alg, got)
	}
}

// TestCommitBatch records another package's rows (the replay index in ferry), copies and inbox states together,
// in the single-statement form (no failures) and the transaction form (with a failure), on both dialects.
func TestCommitBatch(t *testing.T) {
	forEachDialect(t, func(t *testing.T, db *database.Database) {
		ctx := context.Background()
		// The replay index belongs to the crypto store, which writes its own statement (crypto/mautrixstore.go);
		// a table of another owner stands in for it here.
		if _, err := db.Exec(ctx, `CREATE TABLE other_owner (k TEXT, n INTEGER, v TEXT NOT NULL, PRIMARY KEY (k, n))`); err != nil {
			t.Fatal(err)
		}
		foreign := func(args ...any) database.RowInsert {
			return database.RowInsert{Head: `INSERT INTO other_owner (k, n, v) VALUES `, Tail: ` ON CONFLICT (k, n) DO NOTHING`, Width: 3, Args: args}
		}
		var evts []*database.InboxEvent
		for _, e := range []id.EventID{"$1", "$2", "$3"} {
			evts = append(evts, &database.InboxEvent{EventID: e, RoomID: "!a", Sender: "@a:x", Type: "m.room.encrypted", Raw: []byte(`{}`), State: database.InboxPending, ReceivedAt: time.Now()})
		}
		if _, err := db.Inbox.Insert(ctx, evts); err != nil {
			t.Fatal(err)
		}
		rows, _ := db.Inbox.NextInRoom(ctx, "!a", 10)
		now := time.Now()
		err := db.CommitBatch(ctx, &database.Batch{
			Replay: foreign("S", 0, "$1", "S", 1, "$2"),
			Copies: []*database.Copy{
				{SourceEvent: "$1", SourceRoom: "!a", TargetRoom: "!b", TargetEvent: "$1b", Sender: "@g:x", CreatedAt: now},
				{SourceEvent: "$2", SourceRoom: "!a", TargetRoom: "!b", TargetEvent: "$2b", Sender: "@g:x", CreatedAt: now, DisappearAt: now.Add(time.Hour)},
				{SourceEvent: "$2", SourceRoom: "!a", TargetRoom: "!c", TargetEvent: "$2c", Sender: "@g:x", CreatedAt: now, DisappearAt: now.Add(30 * time.Minute)},
			},
			Done: []int64{rows[0].Seq, rows[1].Seq},
		})
		if err != nil {
			t.Fatalf("single-statement batch: %v", err)
		}
		err = db.CommitBatch(ctx, &database.Batch{
			Replay: foreign("S", 0, "$1"), // again: kept once
			Failed: []database.FailedEvent{{Seq: rows[2].Seq, Error: "refused"}},
		})
		if err != nil {
			t.Fatalf("transaction batch: %v", err)
		}
		var foreignRows int
		if err = db.QueryRow(ctx, `SELECT COUNT(*) FROM other_owner`).Scan(&foreignRows); err != nil || foreignRows != 2 {
			t.Fatalf("rows of the other owner = %d, %v", foreignRows, err)
		}
		if c, _ := db.EventMap.Get(ctx, "$2", "!b"); c == nil || c.TargetEvent != "$2b" || c.DisappearAt.IsZero() {
			t.Fatalf("copy = %+v", c)
		}
		// Both copies and their original (once, with the earlier deadline) are scheduled.
		due, err := db.Disappear.Due(ctx, now.Add(2*time.Hour), 10)
		if err != nil {
			t.Fatal(err)
		}
		got := map[id.EventID]time.Time{}
		for _, r := range due {
			got[r.EventID] = r.Deadline
		}
		if len(due) != 3 || got["$2b"].IsZero() || got["$2c"].IsZero() || got["$2"].UnixMilli() != now.Add(30*time.Minute).UnixMilli() {
			t.Fatalf("scheduled redactions %v, want $2b, $2c and $2 at the earlier deadline", got)
		}
		for i, want := range []database.InboxState{database.InboxDone, database.InboxDone, database.InboxFailed} {
			if got, _ := db.Inbox.Get(ctx, rows[i].EventID); got.State != want || got.Raw != nil {
				t.Fatalf("%s = %s (raw %q), want %s", rows[i].EventID, got.State, got.Raw, want)
			}
		}
	})
}

// TestStagedDeadline: the deadline of a message whose copies are still staged (their batch has not committed)
// is found from the original and from a copy, so a reaction handled meanwhile disappears with it.
func TestStagedDeadline(t *testing.T) {
	db := database.New(dbtest.Open(t, "postgres"), dbutil.NoopLogger)
	deadline := time.UnixMilli(time.Now().Add(time.Minute).UnixMilli())
	later := &database.Copy{SourceEvent: "$orig", SourceRoom: "!a", TargetRoom: "!c", TargetEvent: "$inC", DisappearAt: deadline.Add(time.Second)}
	c := &database.Copy{SourceEvent: "$orig", SourceRoom: "!a", TargetRoom: "!b", TargetEvent: "$inB", DisappearAt: deadline}
	plain := &database.Copy{SourceEvent: "$plain", SourceRoom: "!a", TargetRoom: "!b", TargetEvent: "$plainInB"}
	for _, s := range []*database.Copy{later, c, plain} {
		db.EventMap.Stage(s)
	}
	for _, evt := range []id.EventID{"$orig", "$inB"} {
		if got := db.EventMap.StagedDeadline(evt); !got.Equal(deadline) {
			t.Errorf("staged deadline of %s = %v, want %v", evt, got, deadline)
		}
	}
	if got := db.EventMap.StagedDeadline("$plain"); !got.IsZero() {
		t.Errorf("a message without a timer has staged deadline %v", got)
	}
	db.EventMap.Unstage([]*database.Copy{later, c, plain})
	if got := db.EventMap.StagedDeadline("$orig"); !got.IsZero() {
		t.Errorf("unstaged copies still give a deadline: %v", got)
	}
}
