package bridge

// A send that got no answer (the connection failed) or a server error (Dendrite answers 500 when it stopped
// waiting for its room server, which may still post the event) may have been posted. So may every send in flight
// when ferry died, or when the homeserver went away (a restart). Synapse remembers transaction IDs durably and
// answers a repeat with the first event; Dendrite 0.13.8 remembers them in memory, only for requests it finished
// answering, and forgets them when it restarts. So ferry never counts on the homeserver to recognise a repeat:
// before it sends into a room where it may have posted without knowing, it reads the room back from then, and a
// send whose event is already there takes that event instead of posting a new one.
//
// Which rooms need that, and since when, is durable (the readback table): a send that got no answer marks its
// room; an unclean stop marks the rooms with pending events and the rooms they relay into, since the oldest
// pending event arrived; an outage of the homeserver marks them since the outage began. A room stays marked until
// a read-back of it succeeds: transient errors are retried with the event's backoff, holding the room's order,
// and a clean stop keeps the marks. How far a read-back got is durable too (readbackProgress): one cut short goes
// on from there, so that under long trouble the window still to read does not grow with the room's history.
//
// What ferry sent is recognised from the content: a relayed copy carries the origin marker (source event, and
// the target room is where it was found: together they give the transaction ID, see TxnID); everything else
// ferry sends through Bridge.send carries its transaction ID under txnKey. Encrypted events are read with the
// sending device's own copy of its session (OwnDecrypter).

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
)

// txnKey is the content key under which ferry's own sends (notices, replies, ringing) carry their transaction
// ID. Relayed copies carry the origin marker instead.
const txnKey = "im.ferry.txn"

// runningKey is the kv entry that is "yes" while the relay runs and "no" after it stopped cleanly.
const runningKey = "relay_running"

// Limits of the read-back.
const (
	reconcilePage  = 100   // events per /messages request
	reconcileLimit = 50000 // events one pass reads at most, over every run that carries it on
	maxFound       = 10000 // events found remembered before old ones are dropped
	foundKeep      = 30 * time.Minute
)

// OwnDecrypter is implemented by E2EE layers that can decrypt what ferry's own devices encrypted.
// *crypto.Machine implements it.
type OwnDecrypter interface {
	DecryptOwn(ctx context.Context, evt *event.Event) (*event.Event, error)
}

// sentLedger holds the rooms to read back before the next send into them (a copy of the readback table), and the
// events such read-backs found, by the room and the transaction ID they were sent with. Everything is kept per
// room: an event found in one room never stands for a send into another.
type sentLedger struct {
	// guards the following fields
	lock     sync.Mutex
	byTxn    map[sentKey]foundSend
	byEvent  map[id.EventID]sentKey // the same, by event
	readback map[id.RoomID]readbackMark
	settling map[id.RoomID]*sync.Mutex
}

// sentKey names one send: the room it went into and its transaction ID.
type sentKey struct {
	room  id.RoomID
	txnID string
}

type foundSend struct {
	evtID id.EventID
	at    time.Time
}

type readbackMark struct {
	since, markedAt time.Time
	progress        *readbackProgress // how far a read-back got; nil when none did
}

// mark records at now that room must be read back from since (keeping an earlier since; an earlier since drops
// the progress of read-backs from the later one).
func (l *sentLedger) mark(room id.RoomID, since, now time.Time) {
	l.lock.Lock()
	defer l.lock.Unlock()
	if l.readback == nil {
		l.readback = make(map[id.RoomID]readbackMark)
	}
	m, ok := l.readback[room]
	if !ok || since.Before(m.since) {
		m.since = since
		m.progress = nil
	}
	m.markedAt = now
	l.readback[room] = m
}

// pending returns since when room must be read back, if it must, and a copy of how far a read-back got.
func (l *sentLedger) pending(room id.RoomID) (time.Time, *readbackProgress, bool) {
	l.lock.Lock()
	defer l.lock.Unlock()
	m, ok := l.readback[room]
	return m.since, m.progress.clone(), ok
}

// setProgress keeps p as how far room's read-back got, unless the room was marked from earlier than p reads back
// to, or is no longer marked.
func (l *sentLedger) setProgress(room id.RoomID, p *readbackProgress) {
	l.lock.Lock()
	defer l.lock.Unlock()
	if m, ok := l.readback[room]; ok && m.since.UnixMilli() >= p.Since {
		m.progress = p.clone()
		l.readback[room] = m
	}
}

// roomLock returns the lock that one read-back of room at a time holds (rooms a link relays into from several
// rooms are settled by several workers).
func (l *sentLedger) roomLock(room id.RoomID) *sync.Mutex {
	l.lock.Lock()
	defer l.lock.Unlock()
	if l.settling == nil {
		l.settling = make(map[id.RoomID]*sync.Mutex)
	}
	mu := l.settling[room]
	if mu == nil {
		mu = &sync.Mutex{}
		l.settling[room] = mu
	}
	return mu
}

// done forgets room's mark after a read-back from since that began at began, unless the room was marked again
// since then.
func (l *sentLedger) done(room id.RoomID, since, began time.Time) {
	l.lock.Lock()
	defer l.lock.Unlock()
	if m, ok := l.readback[room]; ok && !m.since.Before(since) && m.markedAt.Before(began) {
		delete(l.readback, room)
	}
}

// take returns (and forgets) the event found in room that was sent with txnID.
func (l *sentLedger) take(room id.RoomID, txnID string) (id.EventID, bool) {
	l.lock.Lock()
	defer l.lock.Unlock()
	if len(l.byTxn) == 0 {
		return "", false
	}
	k := sentKey{room, txnID}
	f, ok := l.byTxn[k]
	if ok {
		delete(l.byTxn, k)
		delete(l.byEvent, f.evtID)
	}
	return f.evtID, ok
}

// has tells whether the ledger holds evtID (a second pass of a read-back need not decrypt it again).
func (l *sentLedger) has(evtID id.EventID) bool {
	l.lock.Lock()
	defer l.lock.Unlock()
	_, ok := l.byEvent[evtID]
	return ok
}

// put records that txnID was sent into room as evtID; it reports whether that was new.
func (l *sentLedger) put(room id.RoomID, txnID string, evtID id.EventID) bool {
	l.lock.Lock()
	defer l.lock.Unlock()
	if l.byTxn == nil {
		l.byTxn = make(map[sentKey]foundSend)
		l.byEvent = make(map[id.EventID]sentKey)
	}
	if len(l.byTxn) >= maxFound {
		// Events found for sends that were recorded already are never taken: they must not pile up.
		for k, f := range l.byTxn {
			if time.Since(f.at) > foundKeep {
				delete(l.byTxn, k)
				delete(l.byEvent, f.evtID)
			}
		}
	}
	k := sentKey{room, txnID}
	if _, ok := l.byTxn[k]; ok {
		return false
	}
	l.byTxn[k] = foundSend{evtID: evtID, at: time.Now()}
	l.byEvent[evtID] = k
	return true
}

// markReadback records, durably, that room must be read back from since before ferry sends into it again. A
// failure to write it is logged: the mark still holds for this run, and an unclean stop marks the room anyway
// while its events are pending.
func (b *Bridge) markReadback(ctx context.Context, room id.RoomID, since time.Time) {
	now := time.Now()
	b.sent.mark(room, since, now)
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := b.DB.Readback.Mark(wctx, room, since, now); err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Stringer("room_id", room).Msg("Failed to record that a room needs reading back")
	}
}

// loadReadback reads the rooms marked for reading back and the sends found by earlier runs into memory.
func (b *Bridge) loadReadback(ctx context.Context) error {
	if err := b.loadFound(ctx); err != nil {
		return err
	}
	marks, err := b.DB.Readback.All(ctx)
	if err != nil {
		return fmt.Errorf("failed to read the rooms to read back: %w", err)
	}
	now := time.Now()
	for room, m := range marks {
		b.sent.mark(room, m.Since, now)
		if p := parseProgress(m.Progress); p != nil {
			b.sent.setProgress(room, p)
		}
	}
	return nil
}

// markRunning records that the relay runs and reports whether the previous run stopped without saying so.
// After an unclean stop it also returns when that run started (zero when it did not say), as no send of it can
// have begun before.
func (b *Bridge) markRunning(ctx context.Context) (unclean bool, prevStart time.Time, err error) {
	prev, err := b.DB.KV.Get(ctx, runningKey)
	if err != nil {
		return false, time.Time{}, err
	}
	// "yes <start, Unix ms>" while running; plain "yes" from older versions.
	if err = b.DB.KV.Set(ctx, runningKey, fmt.Sprintf("yes %d", time.Now().UnixMilli())); err != nil {
		return false, time.Time{}, err
	}
	state, started, _ := strings.Cut(prev, " ")
	if ms, perr := strconv.ParseInt(started, 10, 64); perr == nil && ms > 0 {
		prevStart = time.UnixMilli(ms)
	}
	return state == "yes", prevStart, nil
}

// markStopped records a clean stop: every worker has finished and its batch is written.
func (b *Bridge) markStopped() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := b.DB.KV.Set(ctx, runningKey, "no"); err != nil {
		b.Log.Warn().Err(err).Msg("Failed to record the clean stop; the next start reads back recent sends first")
	}
}

// markInFlight marks for reading back the rooms with pending events and the rooms they relay into: ferry may
// have posted into them without knowing (it died, or the homeserver went away, with sends in flight). Each is
// read back from its oldest pending event's arrival or from floor (before which no send in question began: the
// start of the run that died), whichever is later, minus the clock lag. A room whose backlog goes back far is
// then read back only as far as that run can have sent.
func (b *Bridge) markInFlight(ctx context.Context, floor time.Time) (int, error) {
	rooms, err := b.DB.Inbox.RoomsWithWork(ctx)
	if err != nil {
		return 0, err
	}
	marked := make(map[id.RoomID]bool)
	for _, room := range rooms {
		rows, err := b.DB.Inbox.NextInRoom(ctx, room, 1)
		if err != nil {
			return len(marked), err
		} else if len(rows) == 0 {
			continue
		}
		from := rows[0].ReceivedAt
		if floor.After(from) {
			from = floor
		}
		since := from.Add(-b.health.clockLag())
		targets := []id.RoomID{room}
		if link, err := b.DB.Links.GetByRoom(ctx, room); err == nil && link != nil {
			targets = append(targets, link.Others(room)...)
		}
		for _, r := range targets {
			b.markReadback(ctx, r, since)
			marked[r] = true
		}
	}
	return len(marked), nil
}

// settle reads room back if it is marked, before a send into it. The error is the read-back's: the caller retries
// the send later (transient errors with backoff), and the room stays marked until a read-back succeeds; how far it
// got is kept, and the next read-back goes on from there.
func (b *Bridge) settle(ctx context.Context, room id.RoomID) error {
	if _, _, ok := b.sent.pending(room); !ok {
		return nil
	}
	mu := b.sent.roomLock(room)
	mu.Lock()
	defer mu.Unlock()
	since, prog, ok := b.sent.pending(room) // another worker may have read it back meanwhile
	if !ok {
		return nil
	}
	resumed := prog.continues(since)
	if !resumed {
		prog = newProgress(since)
	}
	var began time.Time
	var res readBackResult
	step := func(read func(*readbackProgress) (readBackResult, error)) error {
		r, err := read(prog)
		if err != nil && resumed && !Transient(err) && ctx.Err() == nil {
			// The homeserver refuses where the last read-back stopped (a pagination token it no longer takes,
			// after an upgrade): read the room again from its newest event.
			zerolog.Ctx(ctx).Warn().Err(err).Stringer("room_id", room).
				Msg("Could not go on with a read-back where the last one stopped; reading the room back from its newest event")
			prog, resumed = newProgress(since), false
			r, err = read(prog)
		}
		res.found += r.found
		res.read += r.read
		res.complete = r.complete
		if err != nil {
			return fmt.Errorf("failed to read back what ferry may have sent: %w", err)
		}
		return nil
	}
	// The passes an earlier read-back began go on first: what lies below where they began is in place (what the
	// homeserver held then was posted before their barrier), so they need not wait for a new barrier, nor for the
	// homeserver to settle. A run that dies every few seconds still gets on with them meanwhile.
	if err := step(func(p *readbackProgress) (readBackResult, error) { return b.readBackRest(ctx, room, since, p, true) }); err != nil {
		return err
	}
	for {
		// After an outage of the homeserver, events it accepted before going away may still be appearing: a
		// read-back counts only when the homeserver had been answering for a while before it began.
		if !b.health.waitSettled(ctx) {
			return ctx.Err()
		}
		began = time.Now()
		head, err := b.postBarrier(ctx, room)
		if err != nil {
			return fmt.Errorf("failed to read back what ferry may have sent: %w", err)
		}
		// What the homeserver posts after the barrier carries a later timestamp than the barrier's (give or take
		// a send it was still preparing); without a barrier, ferry's clock says, give or take the clocks' lag.
		if head.IsZero() {
			head = began.Add(-b.health.clockLag())
		} else {
			head = head.Add(-clockLagMargin)
		}
		if err := step(func(p *readbackProgress) (readBackResult, error) { return b.readBack(ctx, room, since, p, head) }); err != nil {
			return err
		}
		if !b.health.recoveredSince(began) {
			break
		}
	}
	log := zerolog.Ctx(ctx)
	if !res.complete {
		log.Warn().Stringer("room_id", room).Time("since", since).Int("events", reconcileLimit).
			Msg("Read back only the most recent events of a room; sends older than them may repeat")
	}
	b.sent.done(room, since, began)
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := b.DB.Readback.Done(dctx, room, since, began); err != nil {
		log.Warn().Err(err).Stringer("room_id", room).Msg("Failed to record that a room was read back; it is read again later")
	}
	log.Info().Stringer("room_id", room).Int("found", res.found).Int("read", res.read).Bool("resumed", resumed).
		Time("since", since).Dur("elapsed", time.Since(began)).Msg("Read back recent sends")
	return nil
}

// barrierType is the type of the event ferry's bot posts into a room before it reads the room back. A homeserver
// may queue a send, then answer it with an error or not at all, and post the event only later: Dendrite puts each
// event into its room server's queue before it waits for the room server, answers 500 when it stops waiting (or
// nothing, when the request was cut off), and its room server posts the event when it gets to it, which under load
// is after any read-back ferry could make at once. The room server takes a room's events in order, so once the
// barrier shows in the room's history, every send queued before it has been posted or refused. The barrier has no
// content and a type clients do not show.
var barrierType = event.Type{Type: "im.ferry.barrier", Class: event.MessageEventType}

// barrierWait bounds the wait for a barrier to show in the room's history.
const barrierWait = 30 * time.Second

// postBarrier posts a barrier into room and waits until the room's history shows it; it returns the barrier's
// timestamp (the homeserver's clock). Where the bot may not post (the room's power levels), the read-back goes on
// without one, and says so (the time is zero then). A transient failure is retried here,
// as a failed page of the read-back is (pageAttempts), under one transaction ID: failing the whole read-back for it
// would send the event back to wait with its backoff while the room's history, which the read-back must cover,
// grows.
func (b *Bridge) postBarrier(ctx context.Context, room id.RoomID) (time.Time, error) {
	cli := b.AS.BotClient()
	req := mautrix.ReqSendEvent{DontEncrypt: true, TransactionID: cli.TxnID()}
	var resp *mautrix.RespSendEvent
	err := b.retryInPlace(ctx, room, func() (err error) {
		resp, err = cli.SendMessageEvent(ctx, room, barrierType, struct{}{}, req)
		return err
	})
	if err != nil {
		if Transient(err) || ctx.Err() != nil {
			return time.Time{}, fmt.Errorf("failed to post a barrier: %w", err)
		}
		zerolog.Ctx(ctx).Warn().Err(err).Stringer("room_id", room).
			Msg("Could not post a barrier before reading a room back; a send the homeserver still holds may repeat")
		return time.Time{}, nil
	}
	deadline := time.Now().Add(barrierWait)
	wait := 20 * time.Millisecond
	for {
		msgs, err := cli.Messages(ctx, room, "", "", mautrix.DirectionBackward, nil, 50)
		if err == nil {
			for _, evt := range msgs.Chunk {
				if evt.ID == resp.EventID {
					return time.UnixMilli(evt.Timestamp), nil
				}
			}
		} else if !Transient(err) {
			return time.Time{}, fmt.Errorf("failed to look for the barrier: %w", err)
		}
		if time.Now().After(deadline) {
			return time.Time{}, fmt.Errorf("the barrier %s did not show in the room's history within %s", resp.EventID, barrierWait)
		}
		if !sleep(ctx, wait) {
			return time.Time{}, ctx.Err()
		}
		wait = min(2*wait, time.Second)
	}
}

// readBackPageSizes are the page sizes of the read-back's passes through a room. Dendrite 0.13.8's backward
// /messages skips the rest of a group of events that share a depth (concurrent events) when a page ends inside the
// group; passes with other page boundaries find what one skipped. (Two passes missed the same event in one chaos
// run of 1,000 messages: three.)
var readBackPageSizes = [...]int{reconcilePage, 87, 61}

// pageAttempts bounds the tries of one request of a read-back (the barrier, a /messages page): a read-back makes
// many requests, and starting over after each transient failure would rarely get through a faulty path.
const pageAttempts = 5

// retryInPlace runs one request of a read-back of room, trying a transient failure again up to pageAttempts times
// with backoff; into a room ferry gave up on (bridge.give_up_after) it is tried once, as the copies into it are:
// otherwise every later message of the link would wait out the retries of a room that keeps failing. It returns
// the last error (ctx's when it ended while waiting).
func (b *Bridge) retryInPlace(ctx context.Context, room id.RoomID, request func() error) error {
	attempts := pageAttempts
	if b.failing.gaveUp(room) {
		attempts = 1
	}
	backoff := 500 * time.Millisecond
	for attempt := 1; ; attempt++ {
		err := request()
		if err == nil || attempt >= attempts || !Transient(err) {
			return err
		}
		if !sleep(ctx, RetryWait(err, backoff)) {
			return ctx.Err()
		}
		backoff *= 2
	}
}

// readbackProgress is how far the read-back of a room got, kept so that a read-back cut short (ferry died, a
// request kept failing) goes on from there next time instead of starting over from the room's newest event: under
// trouble long enough, the window to read (from since to the newest event) would otherwise grow with the room's
// history while no read-back gets through, until it is more than a read-back reads. Each pass keeps the ranges of
// history it has still to read: a range runs from a pagination token (or the newest event, for one not begun) down
// to a time. A read-back first carries on with the ranges begun (what lies below them is in place: the homeserver
// posted what it held before the barrier of the read that began them); after its own barrier each pass adds the
// range from the newest event down to where its last such range began. Kept in the room's mark, in memory and as
// JSON in the readback table.
type readbackProgress struct {
	Since  int64          `json:"since"` // ms: the passes read back to here
	Passes []readbackPass `json:"passes"`
}

type readbackPass struct {
	Ranges []readbackRange `json:"ranges,omitempty"`
	// Newer (ms): what the pass's ranges do not cover is newer than this (zero: the pass has not begun).
	Newer int64 `json:"newer,omitempty"`
	Read  int   `json:"read,omitempty"` // events it has read, in every run
	Cut   bool  `json:"cut,omitempty"`  // it stopped at reconcileLimit with history left to read
}

type readbackRange struct {
	From string `json:"from,omitempty"` // pagination token to go on from; "" for a range not begun (the newest event)
	Down int64  `json:"down"`           // ms: down to here
}

func newProgress(since time.Time) *readbackProgress {
	return &readbackProgress{Since: since.UnixMilli(), Passes: make([]readbackPass, len(readBackPageSizes))}
}

// continues tells whether p is the progress of a read-back back to since (or further).
func (p *readbackProgress) continues(since time.Time) bool {
	return p != nil && p.Since <= since.UnixMilli() && len(p.Passes) == len(readBackPageSizes)
}

func (p *readbackProgress) clone() *readbackProgress {
	if p == nil {
		return nil
	}
	c := *p
	c.Passes = append([]readbackPass(nil), p.Passes...)
	for i := range c.Passes {
		c.Passes[i].Ranges = append([]readbackRange(nil), p.Passes[i].Ranges...)
	}
	return &c
}

// parseProgress reads the progress kept in the readback table; nil when there is none or it does not parse.
func parseProgress(data string) *readbackProgress {
	if data == "" {
		return nil
	}
	var p readbackProgress
	if json.Unmarshal([]byte(data), &p) != nil {
		return nil
	}
	return &p
}

// saveProgress keeps prog for room, in memory and in the database.
func (b *Bridge) saveProgress(ctx context.Context, room id.RoomID, prog *readbackProgress) error {
	b.sent.setProgress(room, prog)
	data, err := json.Marshal(prog)
	if err != nil {
		return err
	}
	if err = b.DB.Readback.SaveProgress(ctx, room, time.UnixMilli(prog.Since), string(data)); err != nil {
		return fmt.Errorf("failed to record how far a read-back got: %w", err)
	}
	return nil
}

type readBackResult struct {
	found, read int  // ferry's events found that the ledger did not have; events read
	complete    bool // every pass read all its ranges
}

// readBack pages backwards through room until since, adding ferry's own events to the ledger, in a read after
// which the homeserver posts only events with later timestamps than head (see settle). It goes on with prog, which
// it updates and keeps after each page: each pass adds the range from the newest event down to what it has
// covered (down to since, for a pass not begun), and reads all its ranges.
func (b *Bridge) readBack(ctx context.Context, room id.RoomID, since time.Time, prog *readbackProgress, head time.Time) (readBackResult, error) {
	for i := range prog.Passes {
		p := &prog.Passes[i]
		if p.Cut || slices.ContainsFunc(p.Ranges, func(r readbackRange) bool { return r.From == "" }) {
			continue // a range from the newest event is waiting already
		}
		p.Ranges = append(p.Ranges, readbackRange{Down: max(p.Newer, since.UnixMilli())})
		p.Newer = head.UnixMilli()
	}
	if err := b.saveProgress(ctx, room, prog); err != nil {
		return readBackResult{}, err
	}
	return b.readBackRest(ctx, room, since, prog, false)
}

// readBackRest reads the ranges of every pass of prog (with begun, only those begun), keeping prog after each
// page; complete tells whether every pass read all its ranges.
func (b *Bridge) readBackRest(ctx context.Context, room id.RoomID, since time.Time, prog *readbackProgress, begun bool) (res readBackResult, err error) {
	complete := true
	for i, size := range readBackPageSizes {
		p := &prog.Passes[i]
		for k := 0; k < len(p.Ranges); {
			rg := &p.Ranges[k]
			if begun && rg.From == "" {
				k++
				continue
			}
			n, r, c, err := b.readBackPass(ctx, room, rg.From, time.UnixMilli(max(rg.Down, since.UnixMilli())), size, reconcileLimit-p.Read, func(from string, read int) error {
				rg.From = from
				p.Read += read
				return b.saveProgress(ctx, room, prog)
			})
			res.found += n
			res.read += r
			if err != nil {
				return res, err
			}
			if !c {
				// At its limit: the pass gives up on what it has left to read.
				p.Cut, p.Ranges = true, nil
			} else {
				p.Ranges = slices.Delete(p.Ranges, k, k+1)
			}
			if err = b.saveProgress(ctx, room, prog); err != nil {
				return res, err
			}
		}
		complete = complete && !p.Cut && len(p.Ranges) == 0
	}
	res.complete = complete
	return res, nil
}

// readBackPass is one pass of readBack with pages of size events, from the pagination token from ("": the newest
// event) back to since, reading at most limit events. After each page but the last it calls kept (when not nil)
// with the token of the next page and the events read; the events of ferry's found on the page are kept by then.
// It returns how many of ferry's events it found that the ledger did not have, how many events it read, and
// whether it reached since (or the room's first event).
func (b *Bridge) readBackPass(ctx context.Context, room id.RoomID, from string, since time.Time, size, limit int, kept func(from string, read int) error) (found, read int, complete bool, err error) {
	cli := b.AS.BotClient()
	for read < limit {
		var resp *mautrix.RespMessages
		err = b.retryInPlace(ctx, room, func() (err error) {
			resp, err = cli.Messages(ctx, room, from, "", mautrix.DirectionBackward, nil, size)
			return err
		})
		if err != nil {
			return found, read, false, err
		}
		read += len(resp.Chunk)
		older := false
		for _, evt := range resp.Chunk {
			if time.UnixMilli(evt.Timestamp).Before(since) {
				older = true
				continue
			}
			if !b.Ghosts.IsOwn(evt.Sender) || b.sent.has(evt.ID) {
				continue
			}
			evt.RoomID = room
			txnID, origin, err := b.sentWith(ctx, evt)
			if err != nil {
				return found, read, false, err
			}
			if txnID == "" {
				continue
			}
			if err = b.keepFound(ctx, room, txnID, origin, evt.ID); err != nil {
				return found, read, false, err
			}
			if b.sent.put(room, txnID, evt.ID) {
				found++
			}
		}
		if older || resp.End == "" || len(resp.Chunk) == 0 || resp.End == from {
			return found, read, true, nil
		}
		from = resp.End
		if kept != nil {
			if err = kept(from, len(resp.Chunk)); err != nil {
				return found, read, false, err
			}
		}
	}
	return found, read, false, nil
}

// foundKeepFor is how long a found send is kept durably (found_sends) when ferry has not recorded it.
const foundKeepFor = 24 * time.Hour

// keepFound records durably that the read-back found evtID, sent into room with txnID as a copy of origin (empty
// for ferry's own notices), unless ferry has recorded that copy already: a run that dies before it records the
// send leaves it to the next, which may not read back that far (markInFlight reads back only as far as the run
// that died could have sent).
func (b *Bridge) keepFound(ctx context.Context, room id.RoomID, txnID string, origin, evtID id.EventID) error {
	if origin != "" {
		if done, err := b.DB.EventMap.Get(ctx, origin, room); err != nil {
			return fmt.Errorf("failed to check whether a found send was recorded: %w", err)
		} else if done != nil {
			return nil
		}
	}
	if err := b.DB.FoundSends.Put(ctx, database.FoundSend{RoomID: room, TxnID: txnID, EventID: evtID, FoundAt: time.Now()}); err != nil {
		return fmt.Errorf("failed to record a found send: %w", err)
	}
	return nil
}

// loadFound puts the sends read-backs of earlier runs found (and ferry may not have recorded) into the ledger,
// and forgets those older than foundKeepFor.
func (b *Bridge) loadFound(ctx context.Context) error {
	since := time.Now().Add(-foundKeepFor)
	if err := b.DB.FoundSends.Prune(ctx, since); err != nil {
		return fmt.Errorf("failed to forget old found sends: %w", err)
	}
	found, err := b.DB.FoundSends.Since(ctx, since)
	if err != nil {
		return fmt.Errorf("failed to read the found sends: %w", err)
	}
	for _, f := range found {
		b.sent.put(f.RoomID, f.TxnID, f.EventID)
	}
	return nil
}

// sentWith returns the transaction ID ferry sent evt with, or "" when evt does not say, and for a relayed copy
// the event it copies. The error is a transient one (the crypto store's database went away): the read-back must
// not take the event for someone else's.
func (b *Bridge) sentWith(ctx context.Context, evt *event.Event) (string, id.EventID, error) {
	log := zerolog.Ctx(ctx)
	if evt.Type == event.EventEncrypted {
		dec, ok := b.Crypto.(OwnDecrypter)
		if !ok {
			return "", "", nil
		}
		if err := evt.Content.ParseRaw(evt.Type); err != nil {
			return "", "", nil
		}
		plain, err := dec.DecryptOwn(ctx, evt)
		if err != nil {
			if Transient(err) || ctx.Err() != nil {
				return "", "", fmt.Errorf("failed to read an event ferry encrypted: %w", err)
			}
			log.Debug().Err(err).Stringer("event_id", evt.ID).Msg("Cannot read back an event ferry encrypted")
			return "", "", nil
		}
		evt = plain
	}
	raw := evt.Content.Raw
	if raw == nil {
		return "", "", nil
	}
	if txnID, ok := raw[txnKey].(string); ok && txnID != "" {
		return txnID, "", nil
	}
	if origin := OriginOf(&evt.Content); origin != nil && origin.Instance == b.instanceID() && origin.EventID != "" {
		return TxnID(origin.EventID, evt.RoomID), origin.EventID, nil
	}
	return "", "", nil
}
