package bridge

// Read receipts and typing notifications cross a link too: when a member reads or types in one room, their ghost
// does in the other rooms. They are ephemeral, so nothing here is durable: the homeserver pushes them in
// transactions (`ephemeral`, or `de.sorunome.msc2409.ephemeral`, with receive_ephemeral in the registration:
// appservice-mode encryption) or ferry's bot /sync sees them (every other path; Dendrite 0.13.8 pushes no
// ephemeral events), and one goroutine relays them from a bounded queue; what does not fit is dropped.
//   - Only public read receipts (m.read) cross. Private ones (m.read.private) stay private: ferry never reads them.
//   - Only ghosts already in a target room read or type there: a member who only reads must not make their ghost
//     join (a membership event, key shares) in rooms they never spoke to.
//   - A receipt names the counterpart of the event read: the copy of an original, or the original of a copy.
//     Receipts on events ferry never relayed (its own notices, commands) do not cross.
//   - Both are throttled per ghost and room: at most one receipt per receiptEvery (the latest one waits and is
//     sent when the time has come), and a typing ghost is told again at most every typingRefresh.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"slices"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
)

// Limits of the ephemeral relay.
const (
	// ephemeralQueueSize bounds the ephemeral events waiting to be relayed; more are dropped.
	ephemeralQueueSize = 256
	// receiptEvery is the least time between two receipts of one ghost in one room.
	receiptEvery = 2 * time.Second
	// typingTimeout is how long a ghost's typing notification lasts unless renewed; typingRefresh how often
	// ferry renews it while the member still types (a typing member's client renews its own every ~20-30 s, but
	// the homeserver only reports changes of who types).
	typingTimeout = 30 * time.Second
	typingRefresh = 20 * time.Second
	// ephemeralTick is how often pending receipts and typing renewals are looked at.
	ephemeralTick = time.Second
)

// ParseEphemeral reads the ephemeral events of a transaction body (outside input): `ephemeral` and its unstable
// name `de.sorunome.msc2409.ephemeral`. Entries that are not events with a room and a type ferry relays (m.typing,
// m.receipt) are skipped; a body that is not JSON yields nothing.
func ParseEphemeral(body []byte) []*event.Event {
	if !bytes.Contains(body, []byte(`ephemeral"`)) {
		return nil // most transactions carry none: spare decoding them twice
	}
	var txn struct {
		Stable   []json.RawMessage `json:"ephemeral"`
		Unstable []json.RawMessage `json:"de.sorunome.msc2409.ephemeral"`
	}
	if json.Unmarshal(body, &txn) != nil {
		return nil
	}
	var out []*event.Event
	for _, raw := range append(txn.Stable, txn.Unstable...) {
		if evt := parseEphemeralEvent(raw); evt != nil {
			out = append(out, evt)
		}
	}
	return out
}

// parseEphemeralEvent decodes one ephemeral event, or returns nil when it is not a typing or receipt event of a
// room whose content parses.
func parseEphemeralEvent(raw json.RawMessage) *event.Event {
	var evt event.Event
	if json.Unmarshal(raw, &evt) != nil {
		return nil
	}
	return checkEphemeral(&evt)
}

// checkEphemeral classes and parses an ephemeral event ferry relays, or returns nil for anything else.
func checkEphemeral(evt *event.Event) *event.Event {
	if evt == nil || evt.RoomID == "" {
		return nil
	}
	switch evt.Type.Type {
	case event.EphemeralEventTyping.Type:
		evt.Type = event.EphemeralEventTyping
	case event.EphemeralEventReceipt.Type:
		evt.Type = event.EphemeralEventReceipt
	default:
		return nil
	}
	if evt.Content.Parsed == nil && evt.Content.ParseRaw(evt.Type) != nil {
		return nil
	}
	if _, ok := evt.Content.Parsed.(*event.TypingEventContent); evt.Type == event.EphemeralEventTyping && !ok {
		return nil
	}
	if _, ok := evt.Content.Parsed.(*event.ReceiptEventContent); evt.Type == event.EphemeralEventReceipt && !ok {
		return nil
	}
	return evt
}

// HandleEphemeral queues ephemeral events (typing, receipts) for relaying: from a transaction, or from the bot's
// /sync (in the sync loop, which must not wait for the homeserver). Events that do not fit are dropped.
func (b *Bridge) HandleEphemeral(_ context.Context, evts []*event.Event) {
	eph := b.ephemeral()
	for _, evt := range evts {
		if evt = checkEphemeral(evt); evt == nil {
			continue
		}
		select {
		case eph.queue <- evt:
		default:
			eph.dropped.Add(1)
		}
	}
}

// ephemeralRelay is the state of relaying typing and receipts: only the relay's goroutine touches it.
type ephemeralRelay struct {
	queue   chan *event.Event
	dropped atomic.Int64

	// typing: who types in each source room, as the homeserver last reported.
	typing map[id.RoomID][]id.UserID
	// typingSent: ghosts ferry told to type in a target room, and when.
	typingSent map[ghostInRoom]typingState
	// receipts: per ghost and target room, when the last receipt went and the one waiting.
	receipts map[ghostInRoom]*receiptSlot
}

type ghostInRoom struct {
	ghost id.UserID
	room  id.RoomID
}

type typingState struct {
	real   id.UserID // the member the ghost stands for
	source id.RoomID // the room they type in
	at     time.Time
}

type receiptSlot struct {
	last    time.Time
	pending id.EventID // the event to mark read when receiptEvery has passed; "" when none waits
	thread  string     // its thread ("" unthreaded)
}

func (b *Bridge) ephemeral() *ephemeralRelay {
	b.ephemeralOnce.Do(func() {
		b.eph = &ephemeralRelay{
			queue:      make(chan *event.Event, ephemeralQueueSize),
			typing:     make(map[id.RoomID][]id.UserID),
			typingSent: make(map[ghostInRoom]typingState),
			receipts:   make(map[ghostInRoom]*receiptSlot),
		}
	})
	return b.eph
}

// ephemeralLoop relays queued ephemeral events until ctx ends.
func (b *Bridge) ephemeralLoop(ctx context.Context) {
	log := b.Log.With().Str("component", "ephemeral").Logger()
	ctx = log.WithContext(ctx)
	eph := b.ephemeral()
	tick := time.NewTicker(ephemeralTick)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case evt := <-eph.queue:
			b.relayEphemeral(ctx, eph, evt, time.Now())
		case now := <-tick.C:
			if n := eph.dropped.Swap(0); n > 0 {
				log.Warn().Int64("events", n).Msg("Dropped typing notifications and read receipts: too many at once")
			}
			b.flushEphemeral(ctx, eph, now)
		}
	}
}

// relayEphemeral handles one ephemeral event.
func (b *Bridge) relayEphemeral(ctx context.Context, eph *ephemeralRelay, evt *event.Event, now time.Time) {
	defer func() {
		if p := recover(); p != nil {
			zerolog.Ctx(ctx).Error().Any("panic", p).Msg("Panic while relaying an ephemeral event")
		}
	}()
	link, err := b.DB.Links.GetByRoom(ctx, evt.RoomID)
	if errors.Is(err, database.ErrLinkNotFound) {
		return
	} else if err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to read the link of an ephemeral event")
		return
	}
	switch evt.Type {
	case event.EphemeralEventTyping:
		b.relayTyping(ctx, eph, link, evt.RoomID, evt.Content.AsTyping().UserIDs, now)
	case event.EphemeralEventReceipt:
		b.relayReceipts(ctx, eph, link, evt.RoomID, *evt.Content.AsReceipt(), now)
	}
}

// ephemeralFrom tells whether a member's typing and receipts cross: real users, not blocked, not another ferry's.
func (b *Bridge) ephemeralFrom(user id.UserID) bool {
	return !b.Ghosts.IsOwn(user) && !b.Config.isPeer(string(user)) && b.Permission(user) > LevelBlock
}

// relayTyping compares who types in room with what the homeserver reported before and tells the targets.
func (b *Bridge) relayTyping(ctx context.Context, eph *ephemeralRelay, link *database.Link, room id.RoomID, now []id.UserID, at time.Time) {
	var typing []id.UserID
	for _, u := range now {
		if b.ephemeralFrom(u) && !slices.Contains(typing, u) {
			typing = append(typing, u)
		}
	}
	before := eph.typing[room]
	if len(typing) == 0 {
		delete(eph.typing, room)
	} else {
		if boundedCacheFull(len(eph.typing)) {
			eph.typing = make(map[id.RoomID][]id.UserID)
		}
		eph.typing[room] = typing
	}
	for _, target := range link.Others(room) {
		for _, u := range typing {
			if !slices.Contains(before, u) {
				b.sendTyping(ctx, eph, u, room, target, true, at)
			}
		}
		for _, u := range before {
			if !slices.Contains(typing, u) {
				b.sendTyping(ctx, eph, u, room, target, false, at)
			}
		}
	}
}

// sendTyping tells target that real's ghost types (or stopped), when the ghost is there.
func (b *Bridge) sendTyping(ctx context.Context, eph *ephemeralRelay, real id.UserID, source, target id.RoomID, typing bool, now time.Time) {
	ghost := b.Ghosts.Ghost(real)
	key := ghostInRoom{ghost, target}
	if !typing {
		if _, told := eph.typingSent[key]; !told {
			return
		}
		delete(eph.typingSent, key)
	} else if !b.StateStore.IsInRoom(ctx, target, ghost) {
		return
	} else {
		if boundedCacheFull(len(eph.typingSent)) {
			eph.typingSent = make(map[ghostInRoom]typingState)
		}
		eph.typingSent[key] = typingState{real: real, source: source, at: now}
	}
	if _, err := b.AS.Intent(ghost).UserTyping(ctx, target, typing, typingTimeout); err != nil {
		zerolog.Ctx(ctx).Debug().Err(err).Stringer("target_room_id", target).Msg("Failed to relay a typing notification")
	}
}

// relayReceipts relays the public read receipts of real members in room.
func (b *Bridge) relayReceipts(ctx context.Context, eph *ephemeralRelay, link *database.Link, room id.RoomID, content event.ReceiptEventContent, now time.Time) {
	for evtID, receipts := range content {
		// Only m.read: m.read.private is the member's own business and stays in their room.
		for user, receipt := range receipts[event.ReceiptTypeRead] {
			if !b.ephemeralFrom(user) {
				continue
			}
			for _, target := range link.Others(room) {
				b.queueReceipt(ctx, eph, user, evtID, string(receipt.ThreadID), target, now)
			}
		}
	}
}

// queueReceipt marks the counterpart of evtID read in target for real's ghost: now, or once receiptEvery has
// passed since its last receipt there (a later receipt replaces a waiting one).
func (b *Bridge) queueReceipt(ctx context.Context, eph *ephemeralRelay, real id.UserID, evtID id.EventID, thread string, target id.RoomID, now time.Time) {
	ghost := b.Ghosts.Ghost(real)
	if !b.StateStore.IsInRoom(ctx, target, ghost) {
		return
	}
	counterpart, ok, err := b.DB.EventMap.Counterpart(ctx, evtID, target)
	if err != nil || !ok {
		return
	}
	switch thread {
	case "", string(event.ReadReceiptThreadMain):
	default:
		// A thread's receipt names its root, which has its own counterpart; without one it goes unthreaded.
		if root, ok, err := b.DB.EventMap.Counterpart(ctx, id.EventID(thread), target); err == nil && ok {
			thread = string(root)
		} else {
			thread = ""
		}
	}
	key := ghostInRoom{ghost, target}
	slot := eph.receipts[key]
	if slot == nil {
		if boundedCacheFull(len(eph.receipts)) {
			b.flushEphemeral(ctx, eph, now.Add(receiptEvery)) // sends what waits, and forgets idle slots
		}
		slot = &receiptSlot{}
		eph.receipts[key] = slot
	}
	slot.pending, slot.thread = counterpart, thread
	if now.Sub(slot.last) >= receiptEvery {
		b.sendReceipt(ctx, key, slot, now)
	}
}

func (b *Bridge) sendReceipt(ctx context.Context, key ghostInRoom, slot *receiptSlot, now time.Time) {
	var content any = struct{}{}
	if slot.thread != "" {
		content = map[string]string{"thread_id": slot.thread}
	}
	evtID := slot.pending
	slot.pending, slot.thread, slot.last = "", "", now
	if err := b.AS.Intent(key.ghost).SendReceipt(ctx, key.room, evtID, event.ReceiptTypeRead, content); err != nil {
		zerolog.Ctx(ctx).Debug().Err(err).Stringer("target_room_id", key.room).Msg("Failed to relay a read receipt")
	}
}

// flushEphemeral sends receipts whose wait is over, renews typing notifications of members still typing, and
// forgets what is idle.
func (b *Bridge) flushEphemeral(ctx context.Context, eph *ephemeralRelay, now time.Time) {
	for key, slot := range eph.receipts {
		switch {
		case slot.pending != "" && now.Sub(slot.last) >= receiptEvery:
			b.sendReceipt(ctx, key, slot, now)
		case slot.pending == "" && now.Sub(slot.last) >= receiptEvery:
			delete(eph.receipts, key) // nothing waits, and the next receipt may go at once anyway
		}
	}
	for key, st := range eph.typingSent {
		if now.Sub(st.at) < typingRefresh {
			continue
		}
		if slices.Contains(eph.typing[st.source], st.real) {
			b.sendTyping(ctx, eph, st.real, st.source, key.room, true, now)
		} else {
			delete(eph.typingSent, key) // it ran out on the homeserver by itself
		}
	}
}
