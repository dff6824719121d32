package bridge

import (
	"context"
	"database/sql"
	"fmt"
	"testing"
	"time"

	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/database/dbtest"
)

// TestRowsAreRecordedWhileThePoolIsTaken: the group commit records every room worker's rows, so it keeps a
// connection of its own instead of queueing for the pool's. When new senders' set-up takes every pooled
// connection (a busy room just linked, hundreds of first messages), an established link's batches are still
// recorded, and its next messages go on. Before, each batch waited for a pooled connection among hundreds of
// waiters: seconds per batch.
func TestRowsAreRecordedWhileThePoolIsTaken(t *testing.T) {
	ctx := context.Background()
	root := dbtest.Open(t, "postgres")
	const poolSize = 12
	root.RawDB.SetMaxOpenConns(poolSize)
	b := newTestBridgeOn(t, root)
	room := id.RoomID("!established:ferry.test")
	insert := func(n int) []*database.InboxEvent {
		var evts []*database.InboxEvent
		for range n {
			evts = append(evts, &database.InboxEvent{EventID: id.EventID(fmt.Sprintf("$e%d-%d", time.Now().UnixNano(), len(evts))), RoomID: room,
				Sender: "@alice:ferry.test", Type: "m.room.message", Raw: []byte(`{}`), State: database.InboxPending, ReceivedAt: time.Now()})
		}
		if _, err := b.DB.Inbox.Insert(ctx, evts); err != nil {
			t.Fatal(err)
		}
		return evts
	}
	record := func(evts []*database.InboxEvent) error {
		wctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		return b.writeBatch(wctx, &batchWrites{done: evts})
	}
	if err := record(insert(1)); err != nil {
		t.Fatal(err)
	}
	second := insert(2)

	// Every other connection the pool may open is taken, for longer than the batch may wait.
	var held []*sql.Conn
	defer func() {
		for _, c := range held {
			_ = c.Close()
		}
	}()
	for {
		cctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		c, err := root.RawDB.Conn(cctx)
		cancel()
		if err != nil {
			break
		}
		held = append(held, c)
	}
	if len(held) > poolSize {
		t.Fatalf("took %d connections from a pool of %d", len(held), poolSize)
	}
	if err := record(second); err != nil {
		t.Fatalf("a batch was not recorded while the pool's connections were taken: %v", err)
	}
	for _, c := range held {
		_ = c.Close()
	}
	held = nil
	for _, evt := range second {
		got, err := b.DB.Inbox.Get(ctx, evt.EventID)
		if err != nil || got.State != database.InboxDone {
			t.Fatalf("%s: %+v, %v; want done", evt.EventID, got, err)
		}
	}
}

// TestRowsAreRecordedAfterTheServerDroppedTheKeptConnection: a committer's kept connection may be gone when it
// is next used (PostgreSQL restarted, a proxy dropped it); the batch is then recorded through a fresh one
// rather than failing.
func TestRowsAreRecordedAfterTheServerDroppedTheKeptConnection(t *testing.T) {
	ctx := context.Background()
	root := dbtest.Open(t, "postgres")
	b := newTestBridgeOn(t, root)
	room := id.RoomID("!established:ferry.test")
	insert := func() []*database.InboxEvent {
		evts := []*database.InboxEvent{{EventID: id.EventID(fmt.Sprintf("$e%d", time.Now().UnixNano())), RoomID: room,
			Sender: "@alice:ferry.test", Type: "m.room.message", Raw: []byte(`{}`), State: database.InboxPending, ReceivedAt: time.Now()}}
		if _, err := b.DB.Inbox.Insert(ctx, evts); err != nil {
			t.Fatal(err)
		}
		return evts
	}
	if err := b.writeBatch(ctx, &batchWrites{done: insert()}); err != nil {
		t.Fatal(err)
	}
	second := insert()
	// Every other server connection of this database goes, the committer's kept one with them.
	if _, err := root.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()`); err != nil {
		t.Fatal(err)
	}
	if err := b.writeBatch(ctx, &batchWrites{done: second}); err != nil {
		t.Fatalf("a batch after the kept connection was dropped: %v", err)
	}
	if got, err := b.DB.Inbox.Get(ctx, second[0].EventID); err != nil || got.State != database.InboxDone {
		t.Fatalf("%+v, %v; want done", got, err)
	}
}
