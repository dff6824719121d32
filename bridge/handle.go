package bridge

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/crypto"
	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/internal/metrics"
)

// parseEvent rebuilds an event from its inbox row.
func parseEvent(row *database.InboxEvent) (*event.Event, error) {
	if row.Type == event.EventEncrypted.Type {
		if evt := parseEncryptedEvent(row.Raw); evt != nil {
			return evt, nil
		}
	}
	var evt event.Event
	if err := json.Unmarshal(row.Raw, &evt); err != nil {
		return nil, fmt.Errorf("stored event is not valid JSON: %w", err)
	}
	if evt.StateKey != nil {
		evt.Type.Class = event.StateEventType
	} else {
		evt.Type.Class = event.MessageEventType
	}
	// Content that does not parse as its type is still handled: translation works on the raw map.
	_ = evt.Content.ParseRaw(evt.Type)
	return &evt, nil
}

// encryptedEventJSON is the JSON of an m.room.encrypted message event with its content left undecoded.
type encryptedEventJSON struct {
	StateKey  *string         `json:"state_key"`
	Sender    id.UserID       `json:"sender"`
	Type      string          `json:"type"`
	Timestamp int64           `json:"origin_server_ts"`
	ID        id.EventID      `json:"event_id"`
	RoomID    id.RoomID       `json:"room_id"`
	Content   json.RawMessage `json:"content"`
	Redacts   id.EventID      `json:"redacts"`
	Unsigned  *event.Unsigned `json:"unsigned"`
	Sticky    *event.Sticky   `json:"msc4354_sticky"`
}

// parseEncryptedEvent decodes an m.room.encrypted message event in one pass: its content straight into
// EncryptedEventContent (Parsed) and kept as received (VeryRaw), without the generic map (Raw) that
// event.Event's decoding builds and the second decode of ParseRaw. Decryption reads only Parsed and VeryRaw; the
// decrypted event carries its own content. It returns nil for anything else (a state event, content that is not
// an encrypted object), which the generic path handles as before.
func parseEncryptedEvent(raw []byte) *event.Event {
	var w encryptedEventJSON
	if err := json.Unmarshal(raw, &w); err != nil || w.StateKey != nil || w.Type != event.EventEncrypted.Type ||
		len(w.Content) == 0 || w.Content[0] != '{' {
		return nil
	}
	var content event.EncryptedEventContent
	if err := json.Unmarshal(w.Content, &content); err != nil {
		return nil
	}
	evt := &event.Event{
		Sender: w.Sender, Type: event.EventEncrypted, Timestamp: w.Timestamp, ID: w.ID, RoomID: w.RoomID,
		Content: event.Content{VeryRaw: w.Content, Parsed: &content}, Redacts: w.Redacts, Sticky: w.Sticky,
	}
	if w.Unsigned != nil {
		evt.Unsigned = *w.Unsigned
	}
	return evt
}

// handle decides what one inbox event means and does it. run carries what the handling learns on the way.
func (b *Bridge) handle(ctx context.Context, row *database.InboxEvent, run *eventRun) outcome {
	if row.Raw == nil {
		return outcome{state: database.InboxDone}
	}
	evt, err := parseEvent(row)
	if err != nil {
		return outcome{state: database.InboxFailed, err: err}
	}
	evt.Mautrix.ReceivedAt = row.ReceivedAt // decryption keeps it: relay latency counts from here
	if evt.Type.Class == event.StateEventType {
		// The echoes of what ferry's own ghost and bot sent that the store already holds change nothing: not
		// applied again, and the ghost's cached entries (computed with them) are kept.
		forget := !b.ownInviteEcho(ctx, evt) && !b.ownJoinEcho(ctx, evt)
		if forget {
			b.hot.stateChanged(evt.Type, evt.RoomID, *evt.StateKey)
		}
		// The state store decides who gets room keys, and a member who left must not get the next one: a
		// transient failure (the database restarting) retries the event, holding the room's order, rather than
		// passing it with the state unapplied or a rotation skipped. Applying an event again is harmless.
		if forget {
			err = b.applyState(ctx, evt)
		}
		if err == nil {
			err = b.handleState(ctx, evt)
		}
		// Again once what the event changed is recorded (a kick, moderation.go): a ghost checked in between
		// must not stay cached.
		if forget {
			b.hot.stateChanged(evt.Type, evt.RoomID, *evt.StateKey)
		}
		if err != nil && Transient(err) {
			return outcome{err: err}
		} else if err != nil {
			zerolog.Ctx(ctx).Err(err).Msg("Failed to apply a state event")
		}
		if evt.Type == event.StateTombstone {
			return b.handleTombstone(ctx, evt) // upgrade.go
		}
		return outcome{state: database.InboxDone}
	}
	// ferry's own users, and other ferry instances' (bridge.peer_users): relaying their copies would echo.
	if b.Ghosts.IsOwn(evt.Sender) || b.Config.isPeer(string(evt.Sender)) || b.Permission(evt.Sender) == LevelBlock {
		return outcome{state: database.InboxDone}
	}
	var trustFlag string
	if evt.Type == event.EventEncrypted {
		dec, res, ok := b.decrypt(ctx, evt, row)
		if !ok {
			return res
		}
		if tf, ok := b.Crypto.(TrustFlagger); ok {
			var err error
			if trustFlag, err = tf.TrustFlag(ctx, dec); err != nil {
				return outcome{err: fmt.Errorf("failed to judge the sender's trust: %w", err)}
			}
		}
		run.inbound = inboundSessionOf(evt) // disappearing messages track the session
		if isControlType(dec.Type) {
			// The homeserver saw only ciphertext and authorised nothing: content, never control (authority.go).
			zerolog.Ctx(ctx).Info().Str("decrypted_type", dec.Type.Type).Msg("Dropping an encrypted event of a control type")
			return outcome{state: database.InboxDone}
		}
		evt = dec
	}
	if evt.Type == event.EventMessage && b.handleCommand(ctx, evt) {
		return outcome{state: database.InboxDone}
	}
	return b.relay(ctx, run, evt, trustFlag, row.FailingSince)
}

// keyRequestAfter is how long a missing room key may be merely in flight (sent to ferry's device just before or
// after the event) before ferry asks the sender's device for it. Keys can be lost on the way for good: Synapse
// drops to-device messages for an appservice while it counts it as down, and the sender's client then still
// answers a key request from a device it shared the session with.
const keyRequestAfter = 250 * time.Millisecond

// decrypt decrypts an encrypted inbox event. When its room key is missing, the first attempt holds the room's
// order for at most bridge.key_wait: it waits briefly, asks the sender's device for the key, waits for the rest
// of key_wait, and then parks the event. Later events of a session that was waited for already park at once: a
// burst of 100 messages whose key was lost would otherwise hold the room for 100 key_waits.
func (b *Bridge) decrypt(ctx context.Context, evt *event.Event, row *database.InboxEvent) (*event.Event, outcome, bool) {
	dec, err := b.Crypto.Decrypt(ctx, evt)
	if err == nil {
		return dec, outcome{}, true
	}
	content, _ := evt.Content.Parsed.(*event.EncryptedEventContent)
	if Transient(err) {
		// The crypto store's database went away (a restart): the key is there, the event must not fail.
		return nil, outcome{err: fmt.Errorf("failed to decrypt: %w", err)}, false
	}
	if content == nil || !(errors.Is(err, crypto.ErrKeyMissing) || errors.Is(err, crypto.ErrKeyWithheld)) {
		reason := metrics.ReasonDecryptError
		if errors.Is(err, crypto.ErrUntrustedSender) {
			reason = metrics.ReasonUntrustedDevice
		}
		metrics.UndecryptableEvents.WithLabelValues(reason).Inc()
		zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to decrypt event")
		return nil, outcome{state: database.InboxFailed, err: err}, false
	}
	if row.Attempts == 0 && errors.Is(err, crypto.ErrKeyMissing) && !b.keyWaitedFor(content.SessionID) {
		first := min(keyRequestAfter, b.Config.KeyWait)
		arrived := b.Crypto.WaitForKey(ctx, evt, first)
		if !arrived {
			b.requestKey(ctx, evt, content.SessionID)
			arrived = b.Crypto.WaitForKey(ctx, evt, b.Config.KeyWait-first)
		}
		if arrived {
			if dec, err = b.Crypto.Decrypt(ctx, evt); err == nil {
				return dec, outcome{}, true
			} else if Transient(err) {
				return nil, outcome{err: fmt.Errorf("failed to decrypt: %w", err)}, false
			}
		}
	}
	reason := metrics.ReasonKeyMissing
	if errors.Is(err, crypto.ErrKeyWithheld) {
		reason = metrics.ReasonKeyWithheld
	}
	metrics.UndecryptableEvents.WithLabelValues(reason).Inc()
	metrics.ParkedEvents.WithLabelValues(reason).Inc()
	zerolog.Ctx(ctx).Info().Stringer("session_id", content.SessionID).Msg("Room key missing, parking event until it arrives")
	return nil, outcome{state: database.InboxWaitingKeys, sessionID: content.SessionID}, false
}

// keyAsk is where ferry stands in asking for one session's key: how often it asked in this run and when it asks
// again.
type keyAsk struct {
	asked int
	first time.Time // the first request of this run
	next  time.Time
}

// keyAskFirst and keyAskMax bound the wait before ferry asks again for a key it asked for: the answer can be lost
// like the key itself (Synapse drops to-device messages for an appservice while it counts it as down, which it
// does after any failed transaction, for 2 s to 8.5 min), so asking once is not enough; the sender's client
// answers only while the session is its current one, so the first repeats come soon.
const (
	keyAskFirst = 5 * time.Second
	keyAskMax   = 10 * time.Minute
)

// keyAskAgainAfter is the wait after the n-th request (n ≥ 1): 5 s, 10 s, 20 s, … up to 10 min.
func keyAskAgainAfter(n int) time.Duration {
	d := keyAskFirst
	for i := 1; i < n && d < keyAskMax; i++ {
		d *= 2
	}
	return min(d, keyAskMax)
}

// requestKey asks the sender's device for the session of evt: at once the first time in this run (the parked loop
// asks again after a restart: an answer that came while ferry was down may have been dropped), then again on the
// keyAskAgainAfter schedule while the session is missing (the parked loop calls it on every pass).
func (b *Bridge) requestKey(ctx context.Context, evt *event.Event, sessionID id.SessionID) {
	b.requestKeyAt(ctx, evt, sessionID, time.Now())
}

func (b *Bridge) requestKeyAt(ctx context.Context, evt *event.Event, sessionID id.SessionID, now time.Time) {
	b.keyRequestsLock.Lock()
	if b.keyRequests == nil {
		b.keyRequests = make(map[id.SessionID]*keyAsk)
	}
	ask := b.keyRequests[sessionID]
	if ask == nil {
		ask = &keyAsk{}
		b.keyRequests[sessionID] = ask
	}
	due := !now.Before(ask.next)
	if due {
		if ask.asked == 0 {
			ask.first = now
		}
		ask.asked++
		ask.next = now.Add(keyAskAgainAfter(ask.asked))
	}
	again := ask.asked > 1
	b.keyRequestsLock.Unlock()
	if !due {
		return
	}
	if again {
		b.pokeHomeserver(ctx)
	}
	if err := b.Crypto.RequestKey(ctx, evt); err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to request missing room key")
	}
}

// keyWaitedFor tells whether an event of the session already waited key_wait for its key in this run: its
// first request went out that long ago and the key has not come since.
func (b *Bridge) keyWaitedFor(sessionID id.SessionID) bool {
	b.keyRequestsLock.Lock()
	defer b.keyRequestsLock.Unlock()
	ask := b.keyRequests[sessionID]
	return ask != nil && ask.asked > 0 && time.Since(ask.first) >= b.Config.KeyWait-keyRequestAfter
}

// forgetKeyAsk drops the request schedule of a session whose key arrived.
func (b *Bridge) forgetKeyAsk(sessionID id.SessionID) {
	b.keyRequestsLock.Lock()
	delete(b.keyRequests, sessionID)
	b.keyRequestsLock.Unlock()
}

// appserviceModer is implemented by E2EE layers that receive to-device messages in transactions (*crypto.Machine).
type appserviceModer interface{ AppserviceMode() bool }

// pokeHomeserver pings the homeserver before ferry asks for a key again, where to-device messages come in
// transactions: a homeserver that counts ferry as down drops them, and a ping that reaches ferry makes Synapse
// resend what it holds at once and count ferry as up again, so the answer is not dropped as well.
func (b *Bridge) pokeHomeserver(ctx context.Context) {
	if m, ok := b.Crypto.(appserviceModer); !ok || !m.AppserviceMode() || b.AS == nil {
		return
	}
	if _, err := b.AS.BotIntent().AppservicePing(ctx, b.AS.Registration.ID, ""); err != nil {
		zerolog.Ctx(ctx).Debug().Err(err).Msg("Ping before asking for a room key again failed")
	}
}

// applyState records a state event in the state store, as mautrix.UpdateStateStore does, but returns the
// store's error instead of logging it.
func (b *Bridge) applyState(ctx context.Context, evt *event.Event) error {
	if evt.StateKey == nil || (evt.Type != event.StateMember && evt.GetStateKey() != "") {
		return nil
	}
	var err error
	switch content := evt.Content.Parsed.(type) {
	case *event.MemberEventContent:
		err = b.StateStore.SetMember(ctx, evt.RoomID, id.UserID(evt.GetStateKey()), content)
	case *event.PowerLevelsEventContent:
		err = b.StateStore.SetPowerLevels(ctx, evt.RoomID, content)
	case *event.EncryptionEventContent:
		err = b.StateStore.SetEncryptionEvent(ctx, evt.RoomID, content)
	case *event.CreateEventContent:
		err = b.StateStore.SetCreate(ctx, evt)
	case *event.JoinRulesEventContent:
		err = b.StateStore.SetJoinRules(ctx, evt.RoomID, content)
	case *event.HistoryVisibilityEventContent:
		err = b.StateStore.SetHistoryVisibility(ctx, evt.RoomID, content)
	}
	if err != nil {
		return fmt.Errorf("failed to record %s in the state store: %w", evt.Type.Type, err)
	}
	return nil
}

// handleState reacts to state changes the relay cares about. Its error is one worth retrying the event for.
func (b *Bridge) handleState(ctx context.Context, evt *event.Event) error {
	switch evt.Type {
	case event.StateMember:
		member := evt.Content.AsMember()
		target := id.UserID(evt.GetStateKey())
		if target == b.AS.BotMXID() {
			return b.handleBotMembership(ctx, evt, member)
		}
		b.noteRemoval(ctx, evt, member) // moderation.go: kicks and bans hold across the link
		if b.Ghosts.IsOwn(target) {
			return nil
		}
		if err := b.Crypto.HandleMemberEvent(ctx, evt); err != nil {
			return fmt.Errorf("failed to rotate the room's sessions after a membership change: %w", err)
		}
		if member.Membership == event.MembershipJoin {
			b.refreshGhostProfile(ctx, evt.RoomID, target)
		}
	case event.StateRoomName, event.StateCanonicalAlias:
		b.roomNames.lock.Lock()
		delete(b.roomNames.names, evt.RoomID)
		b.roomNames.lock.Unlock()
		b.roomRenamed(ctx, evt.RoomID) // ghostprofile.go: ghosts' names carry the room's name
	default:
		if isCallMember(evt.Type) {
			b.handleCallMember(ctx, evt)
		}
	}
	return nil
}

// handleBotMembership joins rooms the bot is invited to and unlinks rooms it is removed from. Transient failures
// (the homeserver busy or away, the database restarting) are returned, to retry the event.
func (b *Bridge) handleBotMembership(ctx context.Context, evt *event.Event, member *event.MemberEventContent) error {
	log := zerolog.Ctx(ctx)
	switch member.Membership {
	case event.MembershipInvite:
		bot := b.AS.BotIntent()
		if level := b.Permission(evt.Sender); level < LevelUser {
			log.Info().Stringer("inviter", evt.Sender).Stringer("level", level).Msg("Declining invite from a user without permission")
			_, err := bot.LeaveRoom(ctx, evt.RoomID, &mautrix.ReqLeave{Reason: "ferry: you are not allowed to invite this bot (permission level user is needed)"})
			if err != nil && Transient(err) {
				return fmt.Errorf("failed to decline an invite: %w", err)
			} else if err != nil {
				log.Warn().Err(err).Msg("Failed to decline invite")
			}
			return nil
		}
		if _, err := bot.JoinRoomByID(ctx, evt.RoomID); err != nil && Transient(err) {
			return fmt.Errorf("failed to join a room after an invite: %w", err)
		} else if err != nil {
			log.Err(err).Msg("Failed to join room after invite")
			return nil
		}
		if _, err := bot.State(ctx, evt.RoomID); err != nil && Transient(err) {
			return fmt.Errorf("failed to load a room's state after joining: %w", err)
		} else if err != nil {
			log.Warn().Err(err).Msg("Failed to load room state after joining")
		}
		log.Info().Stringer("inviter", evt.Sender).Msg("Joined room after invite")
		b.upgradeInvited(ctx, evt.RoomID) // the room may replace a linked room (upgrade.go)
	case event.MembershipLeave, event.MembershipBan:
		_, err := b.DB.Links.GetByRoom(ctx, evt.RoomID)
		if err != nil && !errors.Is(err, database.ErrLinkNotFound) {
			return fmt.Errorf("failed to look up the link of a room the bot left: %w", err)
		} else if err == nil {
			log.Warn().Msg("The bot was removed from a linked room; unlinking it")
			before, err := b.DB.Links.Leave(ctx, evt.RoomID)
			if err != nil {
				return fmt.Errorf("failed to unlink a room the bot left: %w", err)
			}
			b.endCallsForUnlink(ctx, before, evt.RoomID)
		}
	}
	return nil
}

func missingKeyNotice(sender id.UserID) noticeText {
	return renderNotice("ferry could not decrypt a message from %s: their device has not shared its room key with ferry. It will be relayed as soon as the key arrives.", sender)
}

// parkedLoop wakes parked events periodically (a key may have arrived while the event was being parked) and
// tells source rooms about events whose keys have not come within bridge.key_notice_after.
func (b *Bridge) parkedLoop(ctx context.Context) {
	log := b.Log.With().Str("component", "parked").Logger()
	ctx = log.WithContext(ctx)
	tick := time.NewTicker(5 * time.Second)
	defer tick.Stop()
	var swept, pruned time.Time
	for first := true; ; first = false {
		if !first {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
		if time.Since(swept) >= consentSweepEvery {
			// Expired consent requests answer nothing any more; they are dropped so they take no room.
			swept = time.Now()
			if n, err := b.DB.Consent.DeleteExpired(ctx, swept); err != nil {
				log.Warn().Err(err).Msg("Failed to delete expired consent requests")
			} else if n > 0 {
				log.Info().Int64("requests", n).Msg("Deleted expired consent requests")
			}
		}
		if time.Since(pruned) >= inboxPruneEvery {
			pruned = time.Now()
			b.pruneInbox(ctx, pruned)
		}
		parked, err := b.DB.Inbox.Parked(ctx)
		if err != nil {
			log.Err(err).Msg("Failed to list parked events")
			continue
		}
		parked = b.expireParked(ctx, parked, time.Now()) // bounded.go
		for _, row := range parked {
			if time.Since(row.ReceivedAt) > b.Config.KeyNoticeAfter {
				b.noticeMissingKey(ctx, row)
			}
			// Parked before this run (or its request's answer lost): ask the sender again, once per run.
			if evt := parseEncryptedEvent(row.Raw); evt != nil {
				b.requestKey(ctx, evt, row.SessionID)
			}
			b.wakeSession(ctx, row.RoomID, row.SessionID)
		}
	}
}

// noticeMissingKey tells the sender of an event parked for its key, once, in their room (status.go).
func (b *Bridge) noticeMissingKey(ctx context.Context, row *database.InboxEvent) {
	v, err := b.DB.KV.Get(ctx, deliveryKey(row.EventID))
	if err != nil || (v != "" && !strings.Contains(v, " "+noticeMarkerPending+" ")) {
		return // told already (or rate-limited: told by status only)
	}
	if cur, err := b.DB.Inbox.Get(ctx, row.EventID); err != nil || cur == nil || cur.State != database.InboxWaitingKeys {
		return
	}
	b.tellSender(ctx, deliveryOf(row), deliveryProblem{
		status: event.MessageStatusRetriable, reason: event.MessageStatusUndecryptable, kind: "nokey", notice: missingKeyNotice(row.Sender),
	})
	// The worker checks for a notice after it marks an event done; checking the state after recording the
	// notice covers every interleaving: one of the two sides always sees the other.
	if cur, err := b.DB.Inbox.Get(ctx, row.EventID); err == nil && cur != nil && cur.State == database.InboxDone {
		b.deliveredLate(ctx, row)
	}
}

// SessionArrived wakes events parked for a Megolm session. The crypto layer calls it when a key arrives.
func (b *Bridge) SessionArrived(ctx context.Context, roomID id.RoomID, sessionID id.SessionID) {
	b.forgetKeyAsk(sessionID)
	b.wakeSession(ctx, roomID, sessionID)
}

// wakeSession wakes events parked for a Megolm session whose key may be there now.
func (b *Bridge) wakeSession(ctx context.Context, roomID id.RoomID, sessionID id.SessionID) {
	b.enforceFloor(ctx, roomID, sessionID) // disappear.go: nothing below an expired message comes back
	rooms, err := b.DB.Inbox.Wake(ctx, sessionID)
	if err != nil {
		b.Log.Err(err).Msg("Failed to wake parked events")
		return
	}
	for _, r := range rooms {
		b.Notify(r)
	}
}
