package bridge

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"time"

	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
)

// workerBatch is how many inbox rows a room worker reads per query.
const workerBatch = 64

// slowEventWarning is when a worker logs that one event is taking unusually long.
const slowEventWarning = 10 * time.Second

// roomWorker drains one source room's inbox in order.
type roomWorker struct {
	room id.RoomID
	wake chan struct{}
}

// Notify wakes (or starts) the worker of a room because it has new inbox rows.
func (b *Bridge) Notify(room id.RoomID) {
	b.workersLock.Lock()
	w, ok := b.workers[room]
	if !ok {
		w = &roomWorker{room: room, wake: make(chan struct{}, 1)}
		b.workers[room] = w
		if b.rootCtx != nil {
			b.wg.Add(1)
			go func() {
				defer b.wg.Done()
				b.runWorker(b.rootCtx, w)
			}()
		}
	}
	b.workersLock.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// outcome is what happened to one inbox event.
type outcome struct {
	state     database.InboxState // done, failed or waiting_keys; empty = retry later
	sessionID id.SessionID        // with waiting_keys
	retryIn   time.Duration       // with retry
	err       error
}

func (b *Bridge) runWorker(ctx context.Context, w *roomWorker) {
	log := b.Log.With().Str("component", "worker").Stringer("room_id", w.room).Logger()
	ctx = log.WithContext(ctx)
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.wake:
		}
		for ctx.Err() == nil {
			rows, err := b.DB.Inbox.NextInRoom(ctx, w.room, workerBatch)
			if err != nil {
				log.Err(err).Msg("Failed to read inbox, retrying")
				sleep(ctx, time.Second)
				continue
			}
			if len(rows) == 0 {
				break
			}
			for _, row := range rows {
				if !b.processRow(ctx, row) {
					break
				}
			}
		}
	}
}

// processRow handles one inbox row until it is done, parked or failed. It keeps retrying transient errors
// (holding the room's order). It returns false when the context ended.
func (b *Bridge) processRow(ctx context.Context, row *database.InboxEvent) bool {
	log := b.Log.With().Str("component", "worker").Stringer("room_id", row.RoomID).Stringer("event_id", row.EventID).Logger()
	ctx = log.WithContext(ctx)
	backoff := time.Second
	for attempt := 1; ; attempt++ {
		if wait := time.Until(row.NotBefore); wait > 0 && !sleep(ctx, wait) {
			return false
		}
		start := time.Now()
		res := b.safeHandle(ctx, row)
		if took := time.Since(start); took > slowEventWarning {
			log.Warn().Dur("took", took).Msg("Handling an event took unusually long")
		}
		if ctx.Err() != nil {
			return false
		}
		var err error
		switch res.state {
		case database.InboxDone, database.InboxFailed:
			msg := ""
			if res.err != nil {
				msg = res.err.Error()
			}
			err = b.DB.Inbox.Finish(ctx, row.Seq, res.state, msg)
		case database.InboxWaitingKeys:
			err = b.DB.Inbox.Park(ctx, row.Seq, res.sessionID)
		default:
			retry := res.retryIn
			if retry <= 0 {
				retry = backoff
				backoff = min(backoff*2, time.Minute)
			}
			log.Warn().Err(res.err).Int("attempt", attempt).Dur("retry_in", retry).Msg("Relaying failed, will retry")
			b.stats.recordError(row.RoomID)
			row.NotBefore = time.Now().Add(retry)
			if err = b.DB.Inbox.Retry(ctx, row.Seq, row.NotBefore, res.err.Error()); err != nil {
				log.Err(err).Msg("Failed to record retry")
			}
			continue
		}
		if err == nil && res.state == database.InboxDone && row.Type == "m.room.encrypted" && row.Attempts > 0 {
			// A "could not decrypt" notice posted while the event was parked is redacted now that it relayed.
			// Only parked events (Park counts an attempt) can have one.
			b.keyArrived(ctx, row.EventID)
		}
		if err != nil {
			log.Err(err).Msg("Failed to record event outcome, retrying")
			if !sleep(ctx, time.Second) {
				return false
			}
			continue
		}
		return true
	}
}

func (b *Bridge) safeHandle(ctx context.Context, row *database.InboxEvent) (res outcome) {
	defer func() {
		if p := recover(); p != nil {
			b.Log.Error().Str("panic", fmt.Sprint(p)).Bytes("stack", debug.Stack()).Stringer("event_id", row.EventID).Msg("Panic while handling event")
			res = outcome{state: database.InboxFailed, err: errors.New("internal error")}
		}
	}()
	return b.handle(ctx, row)
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
