package bridge

import (
	"context"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/crypto"
	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/internal/metrics"
)

// TestTxnGapsHold: which transactions wait for /sync with HoldOnGaps. Each step is a transaction arriving (and,
// unless failed, recorded), or a /sync batch recorded.
func TestTxnGapsHold(t *testing.T) {
	type step struct {
		txn    string // "" for a /sync batch requested now
		failed bool   // answered with an error: not recorded
		why    string // why it waits ("": it does not)
	}
	const (
		start, gap, again, unnumbered, uncovered = metrics.HeldStart, metrics.HeldGap, metrics.HeldRedelivery, metrics.HeldUnnumbered, metrics.HeldUncovered
	)
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{"the first after the start waits", []step{{txn: "7", why: start}}},
		{"the ones that follow do not", []step{{txn: "7", why: start}, {txn: ""}, {txn: "8"}, {txn: "9"}}},
		{"a gap waits", []step{{txn: "7", why: start}, {txn: ""}, {txn: "8"}, {txn: "10", why: gap}}},
		{"until a batch covers the gap, the following ones wait too", []step{{txn: "7", why: start}, {txn: ""}, {txn: "9", why: gap}, {txn: "10", why: uncovered}, {txn: ""}, {txn: "11"}}},
		{"a redelivery waits", []step{{txn: "7", why: start}, {txn: ""}, {txn: "8"}, {txn: "8", why: again}}},
		{"an older one (sent late) waits", []step{{txn: "7", why: start}, {txn: ""}, {txn: "9", why: gap}, {txn: ""}, {txn: "8", why: again}, {txn: ""}, {txn: "10"}}},
		{"a failed one is not recorded: its retry follows", []step{{txn: "7", why: start}, {txn: ""}, {txn: "8", failed: true}, {txn: "8"}, {txn: "9"}}},
		{"IDs that are not numbers always wait", []step{{txn: "a", why: unnumbered}, {txn: ""}, {txn: "b", why: unnumbered}, {txn: "-3", why: unnumbered}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var g txnGaps
			var covers int64
			for i, s := range tc.steps {
				time.Sleep(time.Millisecond) // distinct times
				now := time.Now()
				if s.txn == "" {
					covers = now.UnixNano()
					continue
				}
				if why := g.hold(s.txn, now, covers); why != s.why {
					t.Fatalf("step %d (transaction %s): held for %q, want %q", i, s.txn, why, s.why)
				}
				if !s.failed {
					g.recorded(s.txn)
				}
			}
		})
	}
}

// TestTxnGapsWanted: the rooms-only /sync reads while a held transaction is not covered or is recent, and idles
// otherwise.
func TestTxnGapsWanted(t *testing.T) {
	var g txnGaps
	start := time.Now()
	if g.wanted(start, 0) {
		t.Fatal("wanted before any transaction")
	}
	g.hold("1", start, 0)
	if !g.wanted(start.Add(holdLinger+time.Second), 0) {
		t.Fatal("not wanted while the held transaction is not covered")
	}
	covered := start.Add(time.Millisecond).UnixNano()
	if !g.wanted(start.Add(time.Second), covered) {
		t.Fatal("not wanted right after the held transaction")
	}
	if g.wanted(start.Add(holdLinger+time.Second), covered) {
		t.Fatal("still wanted long after the held transaction was covered")
	}
}

// TestPushesWaitForSyncOnlyAtAGap: with HoldOnGaps, a transaction that follows the last one is relayed without
// waiting for /sync; at a gap (a transaction the homeserver never sent: here 4 after 2), the events wait and the
// /sync is woken, and the missing transaction's event, which the /sync shows, is relayed first.
func TestPushesWaitForSyncOnlyAtAGap(t *testing.T) {
	ctx := context.Background()
	f := startSyncOrdered(t)
	defer f.br.Stop()
	f.br.HoldOnGaps.Store(true)
	var wakes atomic.Int32
	f.br.WakeRoomSync = func() { wakes.Add(1) }
	pending := func(evtID id.EventID) bool {
		row, _ := f.br.DB.Inbox.Get(ctx, evtID)
		return row != nil && row.State == database.InboxPending
	}
	ghost := f.br.Ghosts.Ghost(f.alice)

	f.pushTxn(t, "1", "$first")
	time.Sleep(200 * time.Millisecond)
	if !pending("$first") || wakes.Load() != 1 {
		t.Fatalf("the first transaction after the start did not wait for /sync (wakes %d)", wakes.Load())
	}
	if err := f.br.IngestSynced(ctx, crypto.SyncedBatch{Events: syncedEvents(t, f.roomA, f.alice, "$first"), Covers: time.Now()}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the first copy", func() bool { return len(f.ghostEvents(f.roomB, ghost)) == 2 })

	f.pushTxn(t, "2", "$second")
	waitFor(t, "the second copy, with no /sync batch", func() bool { return len(f.ghostEvents(f.roomB, ghost)) == 3 })
	if wakes.Load() != 1 {
		t.Fatalf("a transaction that follows the last one woke the /sync (wakes %d)", wakes.Load())
	}

	f.pushTxn(t, "4", "$fourth")
	time.Sleep(200 * time.Millisecond)
	if !pending("$fourth") || wakes.Load() != 2 {
		t.Fatalf("a transaction after a gap did not wait for /sync (wakes %d)", wakes.Load())
	}
	if !f.br.RoomSyncWanted() {
		t.Fatal("the rooms-only /sync may idle while a transaction waits for it")
	}
	if err := f.br.IngestSynced(ctx, crypto.SyncedBatch{Events: syncedEvents(t, f.roomA, f.alice, "$third", "$fourth"), Covers: time.Now()}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "all copies", func() bool { return len(f.ghostEvents(f.roomB, ghost)) == 5 })
	if order := copiedFrom(t, f, ghost); !slices.Equal(order[1:], []id.EventID{"$first", "$second", "$third", "$fourth"}) {
		t.Fatalf("copies in B come from %v", order)
	}
}

// pushTxn hands ferry transaction txnID with alice's encrypted event evtID in room A.
func (f *relayFixture) pushTxn(t *testing.T, txnID string, evtID id.EventID) {
	t.Helper()
	txn := fmt.Sprintf(`{"events":[%s]}`, encryptedEvent(evtID, f.roomA, f.alice))
	if rec := doRequest(f.br.Router(nil), "PUT", "/_matrix/app/v1/transactions/"+txnID, "Bearer "+benchHSToken, txn); rec.Code != 200 {
		t.Fatalf("transaction = %d %s", rec.Code, rec.Body.String())
	}
}
