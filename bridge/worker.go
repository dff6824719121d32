package bridge

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"runtime/debug"
	"slices"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/crypto"
	"go.ferry.im/ferry/database"
)

// workerBatch is how many inbox rows a room worker reads per query.
const workerBatch = 64

// slowEventWarning is when a worker logs that one event is taking unusually long.
const slowEventWarning = 10 * time.Second

// maxHandoff bounds the rows intake hands a room worker in memory; beyond it the worker reads them from the
// inbox instead.
const maxHandoff = 1024

// roomWorker drains one source room's inbox in order.
type roomWorker struct {
	room id.RoomID
	wake chan struct{}

	// Rows intake recorded (committed, with their seq) and handed over in memory, so that the worker need not
	// read them back. They are only a shortcut: every one of them is also pending in the inbox. The worker takes
	// them only while it knows the inbox holds no other pending rows of the room (dirty false); anything that
	// makes rows pending without handing them over (a restart, parked rows waking, events from /sync) sets dirty,
	// and the worker reads the inbox instead.
	lock    sync.Mutex
	handoff []*database.InboxEvent
	dirty   bool

	running bool // its goroutine was started; guarded by Bridge.workersLock
}

// Notify wakes (or starts) the worker of a room because it has new inbox rows: the worker reads them from the
// inbox.
func (b *Bridge) Notify(room id.RoomID) {
	b.notify(room, nil)
}

// notify wakes (or starts) a room's worker. Without rows, the worker reads the room's pending rows from the
// inbox; with rows (all of the room, just committed, Seq set), it may take them from memory.
func (b *Bridge) notify(room id.RoomID, rows []*database.InboxEvent) {
	// Under workersLock throughout: an idle worker leaves the map under the same lock, only when it has no work
	// (see runWorker), so the work handed over here always reaches a worker that will run.
	b.workersLock.Lock()
	defer b.workersLock.Unlock()
	w, ok := b.workers[room]
	if !ok {
		w = &roomWorker{room: room, wake: make(chan struct{}, 1), dirty: true}
		b.workers[room] = w
	}
	// Before Start (transactions are taken as soon as ferry listens), the worker waits for Start to run it.
	if b.workerCtx != nil && !w.running {
		b.runWorkerLocked(w)
	}
	w.lock.Lock()
	if rows == nil || w.dirty || len(w.handoff)+len(rows) > maxHandoff {
		w.dirty = true
		w.handoff = nil
	} else {
		w.handoff = append(w.handoff, rows...)
	}
	w.lock.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// retireIfIdle removes an idle worker from the map, so a room that went quiet costs nothing; the next event makes
// a new one. It reports false (keep running) when work arrived meanwhile.
func (b *Bridge) retireIfIdle(w *roomWorker) bool {
	b.workersLock.Lock()
	defer b.workersLock.Unlock()
	if w.hasWork() || len(w.wake) > 0 {
		return false
	}
	if b.workers[w.room] == w {
		delete(b.workers, w.room)
	}
	w.running = false
	return true
}

// runWorkerLocked starts w's goroutine, unless the relay is stopping (Stop waits for the workers it has: none
// may be added meanwhile). Callers hold workersLock and have set workerCtx.
func (b *Bridge) runWorkerLocked(w *roomWorker) {
	if b.workerCtx.Err() != nil {
		return
	}
	w.running = true
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		b.runWorker(b.workerCtx, w)
	}()
}

// next returns the rows a worker handles next: handed-over rows when the inbox has no others (ok true), or
// ok false when the worker must read the inbox. highWater is the highest seq the worker has taken so far: a
// handed-over row at or below it was either handled already (read from the inbox) or committed out of order,
// and only the inbox can tell, so the worker reads it.
func (w *roomWorker) next(highWater int64) (rows []*database.InboxEvent, ok bool) {
	w.lock.Lock()
	defer w.lock.Unlock()
	if w.dirty {
		w.dirty = false
		w.handoff = nil
		return nil, false
	}
	if len(w.handoff) == 0 {
		return nil, true
	}
	rows = w.handoff
	w.handoff = nil
	if !slices.IsSortedFunc(rows, bySeq) {
		slices.SortFunc(rows, bySeq)
	}
	if rows[0].Seq <= highWater {
		return nil, false
	}
	if len(rows) > workerBatch {
		w.handoff = rows[workerBatch:]
		rows = rows[:workerBatch:workerBatch]
	}
	return rows, true
}

func bySeq(a, b *database.InboxEvent) int { return cmp.Compare(a.Seq, b.Seq) }

// outcome is what happened to one inbox event.
type outcome struct {
	state     database.InboxState // done, failed or waiting_keys; empty = retry later
	sessionID id.SessionID        // with waiting_keys
	retryIn   time.Duration       // with retry
	err       error
	sent      bool // the homeserver accepted a copy (for the relayed-events metric)
	// processing is, with sent, the time from the transaction that brought the event to the copy's request to the
	// homeserver (the copy encrypted).
	processing time.Duration
}

func (b *Bridge) runWorker(ctx context.Context, w *roomWorker) {
	log := b.Log.With().Str("component", "worker").Stringer("room_id", w.room).Logger()
	ctx = log.WithContext(ctx)
	var highWater int64 // the highest seq taken from memory or the inbox
	idle := time.NewTimer(b.workerIdle())
	defer idle.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-idle.C:
			if b.retireIfIdle(w) {
				log.Debug().Msg("Room worker idle, freed")
				return
			}
			idle.Reset(b.workerIdle())
			continue
		case <-w.wake:
		}
		if !idle.Stop() {
			select {
			case <-idle.C:
			default:
			}
		}
		idle.Reset(b.workerIdle())
		for ctx.Err() == nil {
			// What /sync had covered before the rows are taken: a batch recorded after the read below may have
			// moved or confirmed them, and the rows in hand would not show it (orderHold).
			covers := b.syncCovers.Load()
			rows, fromMemory := w.next(highWater)
			if fromMemory && len(rows) == 0 {
				break
			}
			drained := true
			if !fromMemory {
				var err error
				rows, err = b.DB.Inbox.NextInRoom(ctx, w.room, workerBatch)
				if err != nil {
					log.Err(err).Msg("Failed to read inbox, retrying")
					w.setDirty()
					sleep(ctx, time.Second)
					continue
				}
				drained = len(rows) < workerBatch
			}
			var held time.Duration
			if len(rows) > 0 {
				for _, row := range rows {
					highWater = max(highWater, row.Seq)
				}
				b.prepareSenders(ctx, w.room, rows)
				bw := &batchWrites{}
				for _, row := range rows {
					if held = b.orderHold(row, covers); held > 0 {
						break
					}
					if !b.processRow(ctx, row, bw) {
						break
					}
				}
				if !b.commitBatch(ctx, bw) {
					return
				}
			}
			if held > 0 {
				// An event waits for /sync to show the room's order (see Bridge.SyncOrders); IngestSynced wakes
				// the worker, which then reads the inbox in that order.
				w.setDirty()
				if !waitWake(ctx, w.wake, min(held, 250*time.Millisecond)) {
					return
				}
				continue
			}
			if !drained {
				// More pending rows than one read returns: read the inbox again.
				w.setDirty()
			}
			// Otherwise the room had no more pending rows when they were read; rows recorded since then are
			// handed over or marked with notify, which also woke the worker. The loop takes them now.
			if !fromMemory && drained {
				if !w.hasWork() {
					break
				}
			}
		}
	}
}

// syncOrderWait bounds how long an event the homeserver pushed waits for /sync to show it (Bridge.SyncOrders):
// longer than /sync normally takes (it answers as soon as the event exists), short enough that a broken /sync
// only slows a room down.
const syncOrderWait = 10 * time.Second

// orderHold is how long row must still wait for /sync to show the room's order, or 0: until a /sync batch
// that must have shown it was recorded (one whose request started after the push arrived), at most
// syncOrderWait. The wait counts from the relay's start for rows pushed before it: the /sync of this run has not
// had its chance yet. covers is syncCovers as it was before row was read: a batch recorded after the read may
// have placed an earlier event before row, which row, as read, does not show.
func (b *Bridge) orderHold(row *database.InboxEvent, covers int64) time.Duration {
	if !b.SyncOrders.Load() || row.Synced {
		return 0
	}
	// The inbox keeps received_at in milliseconds: a batch requested in the same millisecond may not show row.
	if covers > row.ReceivedAt.Add(time.Millisecond).UnixNano() {
		return 0
	}
	from := row.ReceivedAt
	if b.startedAt.After(from) {
		from = b.startedAt
	}
	return max(syncOrderWait-time.Since(from), 0)
}

// waitWake waits until wake fires or d passed; false when ctx ended.
func waitWake(ctx context.Context, wake <-chan struct{}, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-wake:
	case <-t.C:
	}
	return true
}

func (w *roomWorker) setDirty() {
	w.lock.Lock()
	w.dirty = true
	w.handoff = nil
	w.lock.Unlock()
}

func (w *roomWorker) hasWork() bool {
	w.lock.Lock()
	defer w.lock.Unlock()
	return w.dirty || len(w.handoff) > 0
}

// batchWrites collects what a worker records about one batch of inbox rows: the copies it sent and the rows
// it finished. commitBatch writes them in one transaction (one commit per batch instead of two per message).
// Until then the rows stay pending: after a crash they are handled again, find no copy recorded, and send it
// again with the same transaction ID, which the homeserver answers with the first copy (or which the read-back
// after the unclean stop finds in the room, where the homeserver forgot it: see reconcile.go).
type batchWrites struct {
	copies []*database.Copy
	done   []*database.InboxEvent
	failed []failedRow
}

type failedRow struct {
	row *database.InboxEvent
	msg string
}

// eventRun is what handling one inbox event carries besides the event itself, handed down the path as a
// parameter: where the relay records its copies, whether the row is on its first try, and what handle and relay
// learn about the event on the way that sending its copies needs (disappearing messages, disappear.go).
type eventRun struct {
	// batch is the worker's batch the copies are staged in (recordCopy); nil writes them at once.
	batch *batchWrites
	// first: the row was never tried before (attempts 0, first try in this process). Its copies can only have
	// been recorded together with its inbox state, so the relay skips the "already relayed?" lookup; a copy sent
	// before a crash is sent again with the same transaction ID and deduplicated by the homeserver or by the
	// read-back (reconcile.go).
	first bool
	// inbound is the Megolm session the original came with, when it was encrypted (handle sets it after
	// decrypting).
	inbound inboundSession
	// disappear is when the event's copies disappear (relay sets it before sending any).
	disappear disappearInfo
}

// recordCopy records a copy: staged with the worker's batch when run has one, written at once otherwise.
func (b *Bridge) recordCopy(ctx context.Context, run *eventRun, c *database.Copy) error {
	if run.batch != nil {
		b.DB.EventMap.Stage(c)
		run.batch.copies = append(run.batch.copies, c)
		return nil
	}
	return b.DB.EventMap.Put(ctx, c)
}

// ReplayIndexTaker is implemented by E2EE layers that keep Megolm replay protection in memory: the relay writes
// the new entries in the statement or transaction that records the decrypted events as done, then tells whether
// that committed.
type ReplayIndexTaker interface {
	TakeReplayIndex() (entries []crypto.ReplayEntry, settle func(committed bool))
}

// commitBatch writes a batch's copies and inbox states, retrying until it succeeds. It returns false when the
// context ended first (the rows stay pending and are handled again after a restart).
func (b *Bridge) commitBatch(ctx context.Context, bw *batchWrites) bool {
	if len(bw.copies) == 0 && len(bw.done) == 0 && len(bw.failed) == 0 {
		return true
	}
	defer b.DB.EventMap.Unstage(bw.copies)
	for {
		// A worker that is stopping still records what it already sent (bounded), so that a clean restart
		// does not send those copies again.
		wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		err := b.writeBatch(wctx, bw)
		cancel()
		if err == nil {
			break
		}
		zerolog.Ctx(ctx).Err(err).Msg("Failed to record event outcomes, retrying")
		if !sleep(ctx, time.Second) {
			return false
		}
	}
	for _, row := range bw.done {
		if row.Attempts > 0 {
			// A notice posted while the event waited (its key, a homeserver that kept failing) is redacted now
			// that it relayed (status.go). Only events tried before (Park and Retry count attempts) can have one.
			b.deliveredLate(ctx, row)
		}
	}
	*bw = batchWrites{}
	return true
}

// writeBatch records a worker's batch. Batches of different rooms that are ready at the same time are written
// in one statement (group commit): each worker still waits until its own rows are committed, but Postgres parses,
// plans and commits once for all of them instead of once per room.
func (b *Bridge) writeBatch(ctx context.Context, bw *batchWrites) error {
	batch := &database.Batch{Copies: bw.copies}
	for _, row := range bw.done {
		batch.Done = append(batch.Done, row.Seq)
	}
	for _, f := range bw.failed {
		batch.Failed = append(batch.Failed, database.FailedEvent{Seq: f.row.Seq, Error: f.msg})
	}
	req := &commitRequest{batch: batch, done: make(chan error, 1)}
	b.commits.submit(b, req)
	select {
	case err := <-req.done:
		return err
	case <-ctx.Done():
		// The statement may still commit; the rows then are done, otherwise they are handled again: either way
		// nothing is lost, as with a statement cut off by the timeout.
		return ctx.Err()
	}
}

// maxCommitters is how many group commits may run at once (one can collect the next batches while another
// waits for Postgres).
const maxCommitters = 2

// maxGroupRows bounds the rows (copies and inbox rows) of one group commit, keeping it one statement.
const maxGroupRows = 2000

// groupCommit collects the batches of room workers that wait for their rows to be recorded.
type groupCommit struct {
	lock    sync.Mutex
	queue   []*commitRequest
	running int
	// kept holds the committers' own connections between runs (see committerConn).
	kept []*keptConn
}

// keptConn is a committer's connection (through the database's logging, like the pool's), idle since at.
type keptConn struct {
	dbutil.Execable
	raw *sql.Conn
	at  time.Time
}

// keptConnIdle is how long a committer's connection may stay unused before it is closed rather than used
// again (a server or a network in between may have dropped it meanwhile).
const keptConnIdle = time.Minute

type commitRequest struct {
	batch *database.Batch
	done  chan error
}

func (g *groupCommit) submit(b *Bridge, req *commitRequest) {
	g.lock.Lock()
	g.queue = append(g.queue, req)
	start := g.running < maxCommitters
	if start {
		g.running++
	}
	g.lock.Unlock()
	if start {
		go g.run(b)
	}
}

// committerConn returns a connection for a committer of its own, taken out of the pool's queue once and kept:
// the group commit records every room worker's rows, so when other work keeps every pooled connection busy
// (new senders' set-up: hundreds of first messages at once), an established link's batches would otherwise
// wait for one at every batch, among as many waiters, and the link's messages behind them. It is a kept
// connection if one is idle, a new one otherwise, or nil (the pool's, per statement) where the pool is too
// small to spare one per committer.
func (g *groupCommit) committerConn(b *Bridge) *keptConn {
	g.lock.Lock()
	for len(g.kept) > 0 {
		k := g.kept[len(g.kept)-1]
		g.kept = g.kept[:len(g.kept)-1]
		if time.Since(k.at) < keptConnIdle {
			g.lock.Unlock()
			return k
		}
		_ = k.raw.Close()
	}
	g.lock.Unlock()
	if b.DB.Dialect != dbutil.Postgres {
		return nil
	}
	if limit := b.DB.RawDB.Stats().MaxOpenConnections; limit > 0 && limit < 4*maxCommitters {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, raw, err := b.DB.KeepConn(ctx)
	if err != nil {
		return nil
	}
	return &keptConn{Execable: conn, raw: raw}
}

// keep puts a committer's connection back for the next run.
func (g *groupCommit) keep(conn *keptConn) {
	if conn == nil {
		return
	}
	conn.at = time.Now()
	g.lock.Lock()
	g.kept = append(g.kept, conn)
	g.lock.Unlock()
}

// closeKept closes the connections kept between runs (the relay stopped).
func (g *groupCommit) closeKept() {
	g.lock.Lock()
	defer g.lock.Unlock()
	for _, k := range g.kept {
		_ = k.raw.Close()
	}
	g.kept = nil
}

// run writes queued batches until the queue is empty.
func (g *groupCommit) run(b *Bridge) {
	var conn *keptConn
	defer func() { g.keep(conn) }()
	commit := func(batch *database.Batch) error {
		if conn == nil {
			conn = g.committerConn(b)
		}
		var on dbutil.Execable
		if conn != nil {
			on = conn
		}
		err := b.commitGroup(batch, on)
		if err != nil && conn != nil {
			// Whatever went wrong, the next statement gets a fresh connection; this one goes once more through
			// the pool's, which replaces a connection the server dropped (a restart) as a kept one cannot.
			_ = conn.raw.Close()
			conn = nil
			err = b.commitGroup(batch, nil)
		}
		return err
	}
	for {
		g.lock.Lock()
		n, rows := 0, 0
		for n < len(g.queue) && (n == 0 || rows+batchRows(g.queue[n].batch) <= maxGroupRows) {
			rows += batchRows(g.queue[n].batch)
			n++
		}
		if n == 0 {
			g.running--
			g.lock.Unlock()
			return
		}
		reqs := slices.Clone(g.queue[:n])
		g.queue = slices.Delete(g.queue, 0, n)
		g.lock.Unlock()
		if len(reqs) == 1 {
			reqs[0].done <- commit(reqs[0].batch)
			continue
		}
		merged := &database.Batch{}
		for _, r := range reqs {
			merged.Copies = append(merged.Copies, r.batch.Copies...)
			merged.Done = append(merged.Done, r.batch.Done...)
			merged.Failed = append(merged.Failed, r.batch.Failed...)
		}
		if err := commit(merged); err == nil {
			for _, r := range reqs {
				r.done <- nil
			}
			continue
		}
		// One room's rows must not hold back the others: on an error each batch is written on its own.
		for _, r := range reqs {
			r.done <- commit(r.batch)
		}
	}
}

func batchRows(b *database.Batch) int { return len(b.Copies) + len(b.Done) + len(b.Failed) }

// commitGroup writes one batch with the replay protection entries of the events decrypted so far, on conn (nil:
// a pooled connection).
func (b *Bridge) commitGroup(batch *database.Batch, conn dbutil.Execable) error {
	settle := func(bool) {}
	batch.Replay = database.RowInsert{}
	if t, ok := b.Crypto.(ReplayIndexTaker); ok {
		var entries []crypto.ReplayEntry
		entries, settle = t.TakeReplayIndex()
		// The statement on the crypto store's table is crypto's; the batch adds it to its own.
		batch.Replay = database.RowInsert(crypto.ReplayIndexInsert(entries))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := b.DB.CommitBatchOn(ctx, conn, batch)
	settle(err == nil)
	return err
}

// processRow handles one inbox row until it is done, parked or failed; done and failed rows join the batch. It
// keeps retrying transient errors (holding the room's order, after writing what the batch has so far). It
// returns false when the context ended.
func (b *Bridge) processRow(ctx context.Context, row *database.InboxEvent, bw *batchWrites) bool {
	log := b.Log.With().Str("component", "worker").Stringer("room_id", row.RoomID).Stringer("event_id", row.EventID).Logger()
	ctx = log.WithContext(ctx)
	backoff := time.Second
	for attempt := 1; ; attempt++ {
		if wait := time.Until(row.NotBefore); wait > 0 {
			if !b.commitBatch(ctx, bw) || !sleep(ctx, wait) {
				return false
			}
		}
		start := time.Now()
		res := b.safeHandle(ctx, row, &eventRun{batch: bw, first: row.Attempts == 0 && attempt == 1})
		if took := time.Since(start); took > slowEventWarning {
			log.Warn().Dur("took", took).Msg("Handling an event took unusually long")
		}
		if ctx.Err() != nil {
			return false
		}
		switch res.state {
		case database.InboxDone:
			row.Attempts += attempt - 1 // retries in this call: the inbox counted them (Retry)
			bw.done = append(bw.done, row)
			return true
		case database.InboxFailed:
			msg := ""
			if res.err != nil {
				msg = res.err.Error()
			}
			bw.failed = append(bw.failed, failedRow{row: row, msg: msg})
			return true
		case database.InboxWaitingKeys:
			// Rows parked after it must not overtake what the batch already relayed.
			if !b.commitBatch(ctx, bw) {
				return false
			}
			if err := b.DB.Inbox.Park(ctx, row.Seq, res.sessionID); err != nil {
				log.Err(err).Msg("Failed to record event outcome, retrying")
				if !sleep(ctx, time.Second) {
					return false
				}
				continue
			}
			return true
		default:
			if row.Attempts+attempt == maxSendAttempts {
				// The room has been held for minutes: its sender learns it, once, instead of a silent stall. ferry
				// keeps trying (an outage must not lose the message; bounded.go).
				log.Warn().Err(res.err).Int("attempts", row.Attempts+attempt).Msg("Relaying an event keeps failing; telling its sender")
				b.tellStalled(ctx, row, res.err)
			}
			retry := res.retryIn
			if retry <= 0 {
				retry = backoff
				backoff = min(backoff*2, time.Minute)
			}
			log.Warn().Err(res.err).Int("attempt", attempt).Dur("retry_in", retry).Msg("Relaying failed, will retry")
			b.stats.recordError(row.RoomID)
			now := time.Now()
			row.NotBefore = now.Add(retry)
			if row.FailingSince.IsZero() {
				row.FailingSince = now
			}
			if err := b.DB.Inbox.Retry(ctx, row.Seq, now, row.NotBefore, res.err.Error()); err != nil {
				log.Err(err).Msg("Failed to record retry")
			}
			continue
		}
	}
}

func (b *Bridge) safeHandle(ctx context.Context, row *database.InboxEvent, run *eventRun) (res outcome) {
	defer func() {
		if p := recover(); p != nil {
			b.Log.Error().Str("panic", fmt.Sprint(p)).Bytes("stack", debug.Stack()).Stringer("event_id", row.EventID).Msg("Panic while handling event")
			res = outcome{state: database.InboxFailed, err: errors.New("internal error")}
		}
	}()
	return b.handle(ctx, row, run)
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
