package bridge

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
)

func handoffRows(seqs ...int64) []*database.InboxEvent {
	rows := make([]*database.InboxEvent, len(seqs))
	for i, s := range seqs {
		rows[i] = &database.InboxEvent{Seq: s, RoomID: "!r"}
	}
	return rows
}

func seqsOf(rows []*database.InboxEvent) []int64 {
	out := make([]int64, len(rows))
	for i, r := range rows {
		out[i] = r.Seq
	}
	return out
}

// The worker takes rows from memory only when the inbox cannot hold other pending rows of its room.
func TestHandoffFallsBackToInbox(t *testing.T) {
	const room = id.RoomID("!r")
	b := &Bridge{workers: map[id.RoomID]*roomWorker{}}
	b.notify(room, handoffRows(1, 2))
	w := b.workers[room]
	// A new worker (a restart, or the first rows of a room) reads the inbox: rows may be pending from before.
	if rows, ok := w.next(0); ok || rows != nil {
		t.Fatalf("new worker: took %v from memory, want an inbox read", seqsOf(rows))
	}
	// Rows recorded afterwards come from memory, in seq order even if handed over out of order.
	b.notify(room, handoffRows(5))
	b.notify(room, handoffRows(4))
	rows, ok := w.next(2)
	if !ok || len(rows) != 2 || rows[0].Seq != 4 || rows[1].Seq != 5 {
		t.Fatalf("handed over: %v (ok %v), want [4 5] from memory", seqsOf(rows), ok)
	}
	if rows, ok = w.next(5); !ok || len(rows) != 0 {
		t.Fatalf("nothing more handed over: %v (ok %v)", seqsOf(rows), ok)
	}
	// A row at or below what the worker already took was read from the inbox already, or committed out of
	// order: only the inbox can tell.
	b.notify(room, handoffRows(3))
	if _, ok = w.next(5); ok {
		t.Fatal("row 3 after 5 was taken from memory, want an inbox read")
	}
	// Rows that became pending without being handed over (parked rows waking, events from /sync) make the worker
	// read the inbox, and what was handed over before is dropped (the inbox has it too).
	b.notify(room, handoffRows(6))
	b.Notify(room)
	b.notify(room, handoffRows(7))
	if _, ok = w.next(5); ok {
		t.Fatal("after Notify the worker took rows from memory, want an inbox read")
	}
	if rows, ok = w.next(7); !ok || len(rows) != 0 {
		t.Fatalf("after the inbox read: %v (ok %v), want nothing in memory", seqsOf(rows), ok)
	}
	// A long backlog is taken a batch at a time; beyond maxHandoff the worker reads the inbox instead.
	var many []int64
	for i := int64(0); i < workerBatch+3; i++ {
		many = append(many, 100+i)
	}
	b.notify(room, handoffRows(many...))
	if rows, ok = w.next(7); !ok || len(rows) != workerBatch || rows[0].Seq != 100 {
		t.Fatalf("first batch: %d rows (ok %v)", len(rows), ok)
	}
	if rows, ok = w.next(100 + workerBatch - 1); !ok || len(rows) != 3 || rows[0].Seq != 100+workerBatch {
		t.Fatalf("rest: %v (ok %v)", seqsOf(rows), ok)
	}
	for i := 0; i <= maxHandoff; i++ {
		b.notify(room, handoffRows(int64(1000+i)))
	}
	if _, ok = w.next(200); ok {
		t.Fatal("an overfull handoff was taken from memory, want an inbox read")
	}
}

// Batches of many rooms written at once are all recorded (group commit), each worker learning only when its own
// rows are.
func TestGroupCommitRecordsEveryRoomsBatch(t *testing.T) {
	br := newBenchBridge(t, &benchCrypto{plaintext: benchMessage()}, "http://127.0.0.1:1")
	ctx := context.Background()
	const rooms, perRoom = 12, 5
	var all []*database.InboxEvent
	for r := 0; r < rooms; r++ {
		for i := 0; i < perRoom; i++ {
			all = append(all, &database.InboxEvent{
				EventID: id.EventID(fmt.Sprintf("$g%d_%d", r, i)), RoomID: id.RoomID(fmt.Sprintf("!room%d", r)),
				Sender: "@u:x", Type: "m.room.encrypted", Raw: []byte(`{}`), State: database.InboxPending, ReceivedAt: time.Now(),
			})
		}
	}
	if _, err := br.DB.Inbox.Insert(ctx, all); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, rooms)
	for r := 0; r < rooms; r++ {
		bw := &batchWrites{}
		for i := 0; i < perRoom; i++ {
			row := all[r*perRoom+i]
			bw.done = append(bw.done, row)
			bw.copies = append(bw.copies, &database.Copy{SourceEvent: row.EventID, SourceRoom: row.RoomID,
				TargetRoom: "!target", TargetEvent: id.EventID("$copy_" + string(row.EventID[1:])), Sender: "@_ferry_u:x", CreatedAt: time.Now()})
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- br.writeBatch(ctx, bw)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	counts, err := br.DB.Inbox.CountByState(ctx, "")
	if err != nil || counts[database.InboxDone] != rooms*perRoom || counts[database.InboxPending] != 0 {
		t.Fatalf("inbox states %v (%v), want all %d done", counts, err, rooms*perRoom)
	}
	for _, row := range all {
		if c, err := br.DB.EventMap.Get(ctx, row.EventID, "!target"); err != nil || c == nil {
			t.Fatalf("copy of %s not recorded (%v)", row.EventID, err)
		}
	}
}
