package bridge

// A send that got no answer (the connection failed) or a server error (Dendrite answers 500 when it stopped
// waiting for its room server, which may still post the event) is treated the same way while ferry runs: before
// it is retried, ferry reads back the room since that attempt began.
//
// After an unclean stop, ferry sends again what it had not recorded as sent, under the same transaction IDs.
// Synapse remembers transaction IDs durably and answers a repeat with the first event. Dendrite 0.13.8 remembers
// them in memory, and only for requests it finished answering: a send that was in flight when ferry died is
// processed (the event exists) but not remembered, so sending it again would post it twice. So after an unclean
// stop ferry first reads back what it recently sent in the rooms it is about to work on, and a send whose event
// is already there takes that event instead of posting a new one.
//
// What ferry sent is recognised from the content: a relayed copy carries the origin marker (source event, and
// the target room is where it was found: together they give the transaction ID, see TxnID); everything else
// ferry sends through Bridge.send carries its transaction ID under txnKey. Encrypted events are read with the
// sending device's own copy of its session (OwnDecrypter).

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// txnKey is the content key under which ferry's own sends (notices, replies, ringing) carry their transaction
// ID. Relayed copies carry the origin marker instead.
const txnKey = "im.ferry.txn"

// runningKey is the kv entry that is "yes" while the relay runs and "no" after it stopped cleanly.
const runningKey = "relay_running"

// Limits of the read-back after an unclean stop.
const (
	reconcilePage     = 100              // events per /messages request
	reconcilePages    = 5                // requests per room at most
	reconcileTimeout  = 30 * time.Second // for the whole read-back
	reconcileClockLag = time.Minute      // events this much older than the oldest pending row are not looked at
	maxUncertain      = 1000             // unanswered sends remembered before old ones are dropped
)

// OwnDecrypter is implemented by E2EE layers that can decrypt what ferry's own devices encrypted.
// *crypto.Machine implements it.
type OwnDecrypter interface {
	DecryptOwn(ctx context.Context, evt *event.Event) (*event.Event, error)
}

// sentLedger holds events found in rooms after an unclean stop, by the room and the transaction ID they were
// sent with, and the sends whose outcome is unknown (the connection failed before an answer), to be read back
// before a retry. Everything is kept per room: an event found in one room never stands for a send into another.
type sentLedger struct {
	// guards the following fields
	lock      sync.Mutex
	byTxn     map[sentKey]id.EventID
	uncertain map[sentKey]time.Time // → when the unanswered attempt started
}

// sentKey names one send: the room it went into and its transaction ID.
type sentKey struct {
	room  id.RoomID
	txnID string
}

// markUncertain records that a send into room with txnID started at began got no answer: the homeserver may
// have posted the event anyway.
func (l *sentLedger) markUncertain(room id.RoomID, txnID string, began time.Time) {
	l.lock.Lock()
	defer l.lock.Unlock()
	if l.uncertain == nil {
		l.uncertain = make(map[sentKey]time.Time)
	}
	if len(l.uncertain) >= maxUncertain {
		// Sends that are never retried (one-off notices) must not pile up.
		for k, t := range l.uncertain {
			if time.Since(t) > time.Hour {
				delete(l.uncertain, k)
			}
		}
	}
	k := sentKey{room, txnID}
	if prev, ok := l.uncertain[k]; !ok || began.Before(prev) {
		l.uncertain[k] = began
	}
}

// takeUncertain returns (and forgets) when the first unanswered attempt of txnID into room started.
func (l *sentLedger) takeUncertain(room id.RoomID, txnID string) (time.Time, bool) {
	l.lock.Lock()
	defer l.lock.Unlock()
	k := sentKey{room, txnID}
	began, ok := l.uncertain[k]
	if ok {
		delete(l.uncertain, k)
	}
	return began, ok
}

// take returns (and forgets) the event found in room that was sent with txnID.
func (l *sentLedger) take(room id.RoomID, txnID string) (id.EventID, bool) {
	l.lock.Lock()
	defer l.lock.Unlock()
	if len(l.byTxn) == 0 {
		return "", false
	}
	k := sentKey{room, txnID}
	evtID, ok := l.byTxn[k]
	if ok {
		delete(l.byTxn, k)
	}
	return evtID, ok
}

func (l *sentLedger) put(room id.RoomID, txnID string, evtID id.EventID) {
	l.lock.Lock()
	defer l.lock.Unlock()
	if l.byTxn == nil {
		l.byTxn = make(map[sentKey]id.EventID)
	}
	k := sentKey{room, txnID}
	if _, ok := l.byTxn[k]; !ok {
		l.byTxn[k] = evtID
	}
}

// markRunning records that the relay runs and reports whether the previous run stopped without saying so.
func (b *Bridge) markRunning(ctx context.Context) (unclean bool, err error) {
	prev, err := b.DB.KV.Get(ctx, runningKey)
	if err != nil {
		return false, err
	}
	if err = b.DB.KV.Set(ctx, runningKey, "yes"); err != nil {
		return false, err
	}
	return prev == "yes", nil
}

// markStopped records a clean stop: every worker has finished and its batch is written.
func (b *Bridge) markStopped() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := b.DB.KV.Set(ctx, runningKey, "no"); err != nil {
		b.Log.Warn().Err(err).Msg("Failed to record the clean stop; the next start reads back recent sends first")
	}
}

// reconcile reads back, in the rooms with pending events and the rooms they relay into, what ferry sent since
// the oldest pending event arrived, and fills the ledger that Bridge.send consults.
func (b *Bridge) reconcile(ctx context.Context, rooms []id.RoomID) {
	ctx, cancel := context.WithTimeout(ctx, reconcileTimeout)
	defer cancel()
	start := time.Now()
	// The rooms to read, each with the time before which nothing can have been in flight.
	since := make(map[id.RoomID]time.Time)
	var order []id.RoomID
	note := func(room id.RoomID, t time.Time) {
		prev, ok := since[room]
		if !ok {
			order = append(order, room)
		}
		if !ok || t.Before(prev) {
			since[room] = t
		}
	}
	for _, room := range rooms {
		rows, err := b.DB.Inbox.NextInRoom(ctx, room, 1)
		if err != nil || len(rows) == 0 {
			continue
		}
		oldest := rows[0].ReceivedAt.Add(-reconcileClockLag)
		note(room, oldest)
		if link, err := b.DB.Links.GetByRoom(ctx, room); err == nil && link != nil {
			for _, other := range link.Others(room) {
				note(other, oldest)
			}
		}
	}
	found := 0
	for i, room := range order {
		if ctx.Err() != nil {
			b.Log.Warn().Int("rooms_not_read", len(order)-i).Dur("limit", reconcileTimeout).
				Msg("Stopped reading back recent sends at the time limit; sends in the other rooms may repeat")
			break
		}
		n, err := b.readBack(ctx, room, since[room])
		found += n
		if err != nil && ctx.Err() == nil {
			b.Log.Warn().Err(err).Stringer("room_id", room).Msg("Failed to read back what ferry sent before the unclean stop; its sends there may repeat")
		}
	}
	b.Log.Info().Int("rooms", len(order)).Int("found", found).Dur("elapsed", time.Since(start)).
		Msg("Read back recent sends after an unclean stop")
}

// readBack pages backwards through room until since, adding ferry's own events to the ledger.
func (b *Bridge) readBack(ctx context.Context, room id.RoomID, since time.Time) (int, error) {
	cli := b.AS.BotClient()
	found := 0
	from := ""
	for page := 0; page < reconcilePages; page++ {
		resp, err := cli.Messages(ctx, room, from, "", mautrix.DirectionBackward, nil, reconcilePage)
		if err != nil {
			return found, err
		}
		older := false
		for _, evt := range resp.Chunk {
			if time.UnixMilli(evt.Timestamp).Before(since) {
				older = true
				continue
			}
			if !b.Ghosts.IsOwn(evt.Sender) {
				continue
			}
			evt.RoomID = room
			if txnID := b.sentWith(ctx, evt); txnID != "" {
				b.sent.put(room, txnID, evt.ID)
				found++
			}
		}
		if older || resp.End == "" || len(resp.Chunk) == 0 {
			return found, nil
		}
		from = resp.End
	}
	return found, nil
}

// sentWith returns the transaction ID ferry sent evt with, or "" when evt does not say.
func (b *Bridge) sentWith(ctx context.Context, evt *event.Event) string {
	log := zerolog.Ctx(ctx)
	if evt.Type == event.EventEncrypted {
		dec, ok := b.Crypto.(OwnDecrypter)
		if !ok {
			return ""
		}
		if err := evt.Content.ParseRaw(evt.Type); err != nil {
			return ""
		}
		plain, err := dec.DecryptOwn(ctx, evt)
		if err != nil {
			if !errors.Is(err, context.Canceled) {
				log.Debug().Err(err).Stringer("event_id", evt.ID).Msg("Cannot read back an event ferry encrypted")
			}
			return ""
		}
		evt = plain
	}
	raw := evt.Content.Raw
	if raw == nil {
		return ""
	}
	if txnID, ok := raw[txnKey].(string); ok && txnID != "" {
		return txnID
	}
	if origin := OriginOf(&evt.Content); origin != nil && origin.Instance == b.instanceID() && origin.EventID != "" {
		return TxnID(origin.EventID, evt.RoomID)
	}
	return ""
}
