package bridge

// Holding pushes only where a transaction may be missing. With appservice-mode encryption the bot's rooms-only
// /sync shows the order Synapse 1.163.2's pushes may break: it can leave one transaction unsent (crypto/roomsync.go).
// Waiting for /sync before every pushed event costs each message a /sync the homeserver computes as it answers
// the others (docs/BENCHMARKS.md, L5), and the unsent transaction has a sign: Synapse numbers an appservice's
// transactions from one increasing sequence and sends them one at a time, in that order, so a transaction
// stranded that way leaves a gap in the numbers ferry sees, at the very next transaction. So with HoldOnGaps
// pushed events wait for /sync only when their transaction does not follow the last one ferry recorded: the first
// after ferry's start, one after a gap (Synapse shares the sequence among its appservices, so another appservice's
// transactions make gaps too: those only cost the wait), a redelivery, and a transaction ID that is not a number.
// Between those the rooms-only /sync idles (crypto.Machine.RoomSyncWanted), and a transaction left unsent with no
// other after it is still found by its idle reads.

import (
	"strconv"
	"sync"
	"time"

	"go.ferry.im/ferry/internal/metrics"
)

// holdLinger keeps the rooms-only /sync reading for a while after a held transaction, for the transactions that
// come right after it (Synapse's retries after an outage, another appservice's turns).
const holdLinger = 5 * time.Second

// txnGaps decides which transactions' events wait for /sync (HoldOnGaps).
type txnGaps struct {
	lock sync.Mutex
	// last is the highest transaction number recorded since ferry started (0: none yet).
	last int64
	// heldAt: when the last held transaction arrived. Until a /sync batch requested after it is recorded, every
	// transaction waits: the one missing may hold events of any room, which must go before theirs.
	heldAt time.Time
}

// hold tells why the events of transaction txnID, arriving at now, wait for /sync to show their order
// (metrics.Held*), or "" when they need not. covers is Bridge.syncCovers.
func (g *txnGaps) hold(txnID string, now time.Time, covers int64) string {
	n, err := strconv.ParseInt(txnID, 10, 64)
	g.lock.Lock()
	defer g.lock.Unlock()
	var why string
	switch {
	case err != nil || n <= 0:
		why = metrics.HeldUnnumbered
	case g.last == 0:
		why = metrics.HeldStart
	case n <= g.last:
		why = metrics.HeldRedelivery
	case n > g.last+1:
		why = metrics.HeldGap
	case g.uncovered(covers):
		why = metrics.HeldUncovered
	default:
		return ""
	}
	g.heldAt = now
	return why
}

// uncovered: no /sync batch requested after the last held transaction was recorded yet. Called with lock held.
func (g *txnGaps) uncovered(covers int64) bool {
	return !g.heldAt.IsZero() && covers <= g.heldAt.UnixNano()
}

// recorded notes that transaction txnID was recorded and answered with success.
func (g *txnGaps) recorded(txnID string) {
	n, err := strconv.ParseInt(txnID, 10, 64)
	if err != nil || n <= 0 {
		return
	}
	g.lock.Lock()
	g.last = max(g.last, n)
	g.lock.Unlock()
}

// wanted tells whether the rooms-only /sync should keep reading at now.
func (g *txnGaps) wanted(now time.Time, covers int64) bool {
	g.lock.Lock()
	defer g.lock.Unlock()
	return g.uncovered(covers) || (!g.heldAt.IsZero() && now.Before(g.heldAt.Add(holdLinger)))
}

// RoomSyncWanted tells the rooms-only /sync whether to keep reading (crypto.Machine.RoomSyncWanted): always,
// unless HoldOnGaps, and then while a held transaction is recent or not yet covered by a batch.
func (b *Bridge) RoomSyncWanted() bool {
	return !b.HoldOnGaps.Load() || b.gaps.wanted(time.Now(), b.syncCovers.Load())
}
