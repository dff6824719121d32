package bridge

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"go.mau.fi/util/dbutil"
	mcrypto "maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/crypto"
	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/database/dbtest"
)

// replaySession is the Megolm session of replayCrypto's events.
var replaySession = id.SessionID(strings.Repeat("S", 43))

// replayCrypto is benchCrypto with replay protection kept in memory as the real E2EE layer keeps it: each
// event it decrypts takes the session's next message index once (decrypting it again adds nothing), and the
// relay takes the new entries (TakeReplayIndex); entries not committed are handed over again.
type replayCrypto struct {
	benchCrypto
	lock    sync.Mutex
	next    uint
	seen    map[id.EventID]bool
	pending []crypto.ReplayEntry
}

func (c *replayCrypto) Decrypt(ctx context.Context, evt *event.Event) (*event.Event, error) {
	dec, err := c.benchCrypto.Decrypt(ctx, evt)
	c.lock.Lock()
	defer c.lock.Unlock()
	if c.seen == nil {
		c.seen = make(map[id.EventID]bool)
	}
	if !c.seen[evt.ID] {
		c.seen[evt.ID] = true
		c.pending = append(c.pending, crypto.ReplayEntry{SessionID: replaySession, Index: c.next, EventID: evt.ID, Timestamp: evt.Timestamp})
		c.next++
	}
	return dec, err
}

func (c *replayCrypto) TakeReplayIndex() ([]crypto.ReplayEntry, func(committed bool)) {
	c.lock.Lock()
	batch := c.pending
	c.pending = nil
	c.lock.Unlock()
	return batch, func(committed bool) {
		if !committed {
			c.lock.Lock()
			c.pending = append(batch, c.pending...)
			c.lock.Unlock()
		}
	}
}

// replayWrites counts, per event, the statements that wrote its replay index entry (crypto_message_index): the
// entry's session ID is followed by its index and its event ID in the statement's parameters.
type replayWrites struct {
	dbutil.DatabaseLogger
	lock    sync.Mutex
	byEvent map[id.EventID]int
}

func (w *replayWrites) QueryTiming(_ context.Context, method, query string, args []any, _ int, _ time.Duration, err error) {
	if err != nil || method != "Exec" || !strings.Contains(query, "crypto_message_index") {
		return
	}
	w.lock.Lock()
	defer w.lock.Unlock()
	for i, a := range args {
		if _, ok := a.(id.SessionID); ok && i+2 < len(args) {
			if evtID, ok := args[i+2].(id.EventID); ok {
				w.byEvent[evtID]++
			}
		}
	}
}

func (w *replayWrites) count(evtID id.EventID) int {
	w.lock.Lock()
	defer w.lock.Unlock()
	return w.byEvent[evtID]
}

// TestReplayIndexWrittenOnceWithItsEvent: each decrypted event's replay index entry is written once, by the
// statement (PostgreSQL) or transaction (SQLite) that records the event as done, into the crypto store's own
// table; and it is there for the next process after a stop without any clean-up (a kill), so that process's
// crypto store refuses the event's message index to any other event. Nothing else writes it: there is no
// flush at Stop.
func TestReplayIndexWrittenOnceWithItsEvent(t *testing.T) {
	for _, dialect := range dbtest.Dialects {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			root := dbtest.Open(t, dialect)
			writes := &replayWrites{DatabaseLogger: dbutil.NoopLogger, byEvent: map[id.EventID]int{}}
			root.Log = writes // every statement of the shared pool is logged through the root's logger
			store := mcrypto.NewSQLCryptoStore(root, dbutil.NoopLogger, "acct", "", []byte("pickle key"))
			if err := store.DB.Upgrade(ctx); err != nil {
				t.Fatal(err)
			}
			cr := &replayCrypto{benchCrypto: benchCrypto{plaintext: benchMessage()}}
			f := newRelayFixtureOn(t, cr, root)

			// One message in a batch of its own, then two in one batch, one of them handled twice (a retry).
			relayed := []id.EventID{f.relayOne(t).EventID}
			for range 2 {
				f.n++
				evtID := id.EventID(fmt.Sprintf("$replay%d", f.n))
				raw, _ := json.Marshal(map[string]any{
					"event_id": evtID, "room_id": f.roomA, "sender": f.alice, "type": "m.room.encrypted", "origin_server_ts": 1000 + f.n,
					"content": map[string]any{"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AAAA", "session_id": replaySession, "sender_key": "K", "device_id": "D"},
				})
				row := &database.InboxEvent{EventID: evtID, RoomID: f.roomA, Sender: f.alice, Type: "m.room.encrypted", Raw: raw, State: database.InboxPending, ReceivedAt: time.Now()}
				if _, err := f.br.DB.Inbox.Insert(ctx, []*database.InboxEvent{row}); err != nil {
					t.Fatal(err)
				}
				relayed = append(relayed, evtID)
			}
			rows, err := f.br.DB.Inbox.NextInRoom(ctx, f.roomA, workerBatch)
			if err != nil || len(rows) != 2 {
				t.Fatalf("inbox: %d rows, %v", len(rows), err)
			}
			if _, err = cr.Decrypt(ctx, &event.Event{ID: rows[0].EventID, RoomID: f.roomA, Sender: f.alice}); err != nil { // decrypted once before, as a retry would
				t.Fatal(err)
			}
			bw := &batchWrites{}
			if !f.br.processRow(ctx, rows[0], bw) || !f.br.processRow(ctx, rows[1], bw) || !f.br.commitBatch(ctx, bw) {
				t.Fatal("the worker gave up")
			}

			// A kill: no Stop, no flush. What the next process finds is what was committed.
			next := mcrypto.NewSQLCryptoStore(root, dbutil.NoopLogger, "acct", "", []byte("pickle key"))
			for i, evtID := range relayed {
				row, err := f.br.DB.Inbox.Get(ctx, evtID)
				if err != nil || row == nil || row.State != database.InboxDone {
					t.Fatalf("%s: inbox row %+v, %v; want done", evtID, row, err)
				}
				if n := writes.count(evtID); n != 1 {
					t.Errorf("%s: its replay index entry was written by %d statements, want 1", evtID, n)
				}
				var stored id.EventID
				err = root.QueryRow(ctx, `SELECT event_id FROM crypto_message_index WHERE session_id=$1 AND "index"=$2`, replaySession, i).Scan(&stored)
				if err != nil || stored != evtID {
					t.Errorf("index %d: stored for %q (%v), want %s", i, stored, err, evtID)
				}
				if ok, err := next.ValidateMessageIndex(ctx, replaySession, "$replayed", uint(i), 1); ok || err != nil {
					t.Errorf("index %d: the next process accepts it for another event (%v)", i, err)
				}
			}
			if entries, _ := cr.TakeReplayIndex(); len(entries) != 0 {
				t.Fatalf("entries still waiting after their events were recorded: %+v", entries)
			}
		})
	}
}
