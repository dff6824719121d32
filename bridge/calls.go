package bridge

// Calls across a link.
//
// 1:1 calls (m.call.*, version "1") are relayed like messages, by the caller's and callee's ghosts and encrypted
// where the room is, with three differences:
//   - call_id is mapped per room. The caller's room keeps the caller's ID; every other room of the link gets
//     copyCallID(original, origin room, that room). Answers, candidates and hangups sent in a copy room carry
//     the copy's ID and are mapped back through the call_room table. party_id is never changed, so each device's
//     party stays the same on both sides of the link.
//   - an invite (or negotiate) whose lifetime has run out is not relayed; one still valid is relayed with its
//     lifetime shortened by the time already spent, because the copy gets a fresh timestamp.
//   - glare: when two users in different rooms of a link call each other at once, ferry sees both invites.
//     It applies the spec's rule itself (the lesser call_id wins) to the two original IDs: the losing invite is
//     not relayed (or, when it already was, its copy is hung up) and the loser's own call is hung up in its
//     room by the winner's ghost. Copy IDs keep the original as their prefix, so a client that runs the same
//     rule between its own invite and a copy reaches the same verdict. Glare is judged only between the two
//     parties: two invites collide only when each caller may answer the other's call (callParties).
//   - only a party of a call acts on it (callParty): in the caller's room the caller; in the other rooms the
//     user whose answer was relayed, or before that the invite's invitee (anyone there when it named nobody).
//     Another member's hangup, reject, answer, select_answer or candidates for the call are dropped.
//   - a copy's call_id ends with a random suffix, so nobody can tell it from public data before ferry sends it.
//
// Group calls (MatrixRTC) stay in their own room. When someone joins a call in one room of a link, the other
// rooms get a notification event from that person's ghost and a bot notice naming who is in the call in which
// room. Explicit ringing events (m.rtc.notification and its predecessors) are relayed like messages.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
)

// Legacy 1:1 call event types ferry knows by name. Every m.call.* message event except group-call ringing is
// treated as 1:1 signaling: its call_id is mapped, and it crosses only for a call ferry relays.
const (
	callInvite          = "m.call.invite"
	callCandidates      = "m.call.candidates"
	callAnswer          = "m.call.answer"
	callSelectAnswer    = "m.call.select_answer"
	callReject          = "m.call.reject"
	callNegotiate       = "m.call.negotiate"
	callHangup          = "m.call.hangup"
	callStreamsMetadata = "m.call.sdp_stream_metadata_changed"
)

func isLegacyCall(t event.Type) bool {
	return strings.HasPrefix(t.Type, "m.call.") && !isCallNotification(t) && !isCallMember(t)
}

// Group call ringing, as message events, newest first.
const (
	rtcNotification         = "m.rtc.notification"
	rtcNotificationUnstable = "org.matrix.msc4075.rtc.notification"
	callNotify              = "m.call.notify"
	callNotifyUnstable      = "org.matrix.msc4075.call.notify"
)

func isCallNotification(t event.Type) bool {
	switch t.Type {
	case rtcNotification, rtcNotificationUnstable, callNotify, callNotifyUnstable:
		return true
	}
	return false
}

// Group call membership, as state events.
func isCallMember(t event.Type) bool {
	return t.Type == "m.call.member" || t.Type == "org.matrix.msc3401.call.member"
}

// defaultInviteLifetime is assumed for invites that state no lifetime.
const defaultInviteLifetime = 90 * time.Second

// hangupTimeout bounds one hangup ferry sends on its own (glare, unlink): it is not retried later.
const hangupTimeout = 30 * time.Second

// callNotifyWindow: a second notification for the same room within this window is not sent.
const callNotifyWindow = time.Minute

var (
	errCallExpired   = errors.New("the call event expired before it could be relayed")
	errCallMalformed = errors.New("the call event has no usable call_id")
	errCallUnknown   = errors.New("the call is not one ferry relays into this room")
)

// callGlareLock serialises invite decisions, so two invites of one glare are never judged at the same time.
var callGlareLock sync.Mutex

// maxCallID is the longest call_id the spec allows.
const maxCallID = 255

// copyCallIDRandomBytes is the size of the random suffix of a copy's call_id: 64 bits nobody can guess.
const copyCallIDRandomBytes = 8

// copyCallID returns a new call_id for a copy of a call placed with originalID. It starts with the original ID
// (so glare comparisons between an original and a copy agree with those between the originals) and ends with a
// random suffix: each room gets its own, and nobody can compute it from the original ID and the rooms (a member
// of the callee room could otherwise send events for the call before ferry's copy arrived). The call table keeps
// it, so retries reuse it. It stays within the spec's grammar ([0-9a-zA-Z._~-], at most 255 characters) when the
// original does.
func copyCallID(originalID string) string {
	suffix := "-" + randomHex(copyCallIDRandomBytes)
	if len(originalID)+len(suffix) > maxCallID {
		originalID = originalID[:maxCallID-len(suffix)]
	}
	return originalID + suffix
}

// callParty tells whether sender may act on call with an event sent in room: in the caller's room only the
// caller; in another room the callee once an answer was relayed, before that the invitee the invite named, or
// anyone there when it named nobody.
func callParty(call *database.Call, room id.RoomID, sender id.UserID) bool {
	switch {
	case room == call.OriginRoom:
		return sender == call.Caller
	case call.Callee != "":
		return sender == call.Callee
	}
	return call.Invitee == "" || sender == call.Invitee
}

// callParties tells whether two invites are a glare, the two parties calling each other: each caller may answer
// the other's call (it named them as invitee, or nobody).
func callParties(caller, invitee, rivalCaller, rivalInvitee id.UserID) bool {
	return (invitee == "" || invitee == rivalCaller) && (rivalInvitee == "" || rivalInvitee == caller)
}

// glareWinner reports whether the invite with call ID a (placed in room roomA) survives a glare with the one
// with call ID b (in roomB): the lesser call ID wins, as the spec tells clients; equal IDs fall back to the room.
func glareWinner(a string, roomA id.RoomID, b string, roomB id.RoomID) bool {
	if a != b {
		return a < b
	}
	return roomA < roomB
}

// callString reads a string field of call content.
func callString(raw map[string]any, key string) string {
	s, _ := raw[key].(string)
	return s
}

// callLifetime reads the lifetime of an invite or negotiate; ok=false when absent or not a positive number.
func callLifetime(raw map[string]any) (time.Duration, bool) {
	switch v := raw["lifetime"].(type) {
	case float64:
		if v > 0 {
			return time.Duration(v) * time.Millisecond, true
		}
	case json.Number:
		if f, err := v.Float64(); err == nil && f > 0 {
			return time.Duration(f) * time.Millisecond, true
		}
	}
	return 0, false
}

// mapCallContent rewrites the content of a legacy call event for a room where the call has targetCallID: the
// call_id, the invitee (through userIn), and the lifetime of invites and negotiates, shortened by the time
// between sentAt and now. SDP, candidates, party IDs, version and unknown keys pass unchanged. It returns
// errCallExpired when the lifetime ran out and errCallMalformed when the content has no call_id.
func mapCallContent(evtType string, raw map[string]any, targetCallID string, sentAt, now time.Time, userIn func(id.UserID) id.UserID) error {
	if callString(raw, "call_id") == "" || targetCallID == "" {
		return errCallMalformed
	}
	raw["call_id"] = targetCallID
	if evtType == callInvite || evtType == callNegotiate {
		if lifetime, ok := callLifetime(raw); ok {
			left := lifetime - max(now.Sub(sentAt), 0)
			if left <= 0 {
				return errCallExpired
			}
			raw["lifetime"] = float64(left.Milliseconds())
		}
	}
	if invitee := callString(raw, "invitee"); invitee != "" && userIn != nil {
		raw["invitee"] = string(userIn(id.UserID(invitee)))
	}
	return nil
}

// contentRaw returns an event's content as a fresh map.
func contentRaw(evt *event.Event) map[string]any {
	raw, err := contentMap(&evt.Content)
	if err != nil {
		return map[string]any{}
	}
	return raw
}

// prepareCall runs before a call-related event is relayed. It records invites, resolves glare, follows the
// state of each call, and posts group-call ringing. stop=true means the event is finished with res.
func (b *Bridge) prepareCall(ctx context.Context, evt *event.Event, link *database.Link) (res outcome, stop bool) {
	switch {
	case isCallNotification(evt.Type):
		return b.prepareCallNotification(ctx, evt, link)
	case !isLegacyCall(evt.Type):
		return outcome{}, false
	}
	log := zerolog.Ctx(ctx)
	raw := contentRaw(evt)
	callID := callString(raw, "call_id")
	if callID == "" {
		log.Debug().Str("event_type", evt.Type.Type).Msg("Call event without call_id, not relayed")
		return outcome{state: database.InboxDone}, true
	}
	if evt.Type.Type == callInvite {
		return b.prepareInvite(ctx, evt, link, raw, callID)
	}
	call, err := b.DB.Calls.ByRoomCallID(ctx, evt.RoomID, callID)
	if err != nil {
		return outcome{err: err}, true
	} else if call == nil {
		log.Debug().Str("event_type", evt.Type.Type).Msg("Call event for a call ferry does not relay")
		return outcome{state: database.InboxDone}, true
	}
	if !callParty(call, evt.RoomID, evt.Sender) {
		log.Info().Str("event_type", evt.Type.Type).Str("call_key", call.Key).Msg("Call event from someone who is not a party of the call, not relayed")
		return outcome{state: database.InboxDone}, true
	}
	switch evt.Type.Type {
	case callHangup, callReject:
		// Relayed even when ferry already ended the call: a retry must not lose it, and a second hangup is
		// harmless to clients.
		if err = b.DB.Calls.SetState(ctx, call.Key, database.CallEnded); err != nil {
			return outcome{err: err}, true
		}
		return outcome{}, false
	}
	if call.State == database.CallEnded {
		log.Debug().Str("event_type", evt.Type.Type).Str("call_key", call.Key).Msg("Call already ended, event not relayed")
		return outcome{state: database.InboxDone}, true
	}
	if evt.Type.Type == callAnswer && evt.RoomID != call.OriginRoom {
		if err = b.DB.Calls.Answered(ctx, call.Key, evt.Sender, callString(raw, "party_id")); err != nil {
			return outcome{err: err}, true
		}
	}
	return outcome{}, false
}

// prepareInvite records a new call and settles glare with calls already ringing in the link. The hangups glare
// calls for are sent after the decision, outside the lock.
func (b *Bridge) prepareInvite(ctx context.Context, evt *event.Event, link *database.Link, raw map[string]any, callID string) (outcome, bool) {
	var hangups []func()
	res, stop := b.decideInvite(ctx, evt, link, raw, callID, &hangups)
	for _, hangup := range hangups {
		hangup()
	}
	return res, stop
}

func (b *Bridge) decideInvite(ctx context.Context, evt *event.Event, link *database.Link, raw map[string]any, callID string, hangups *[]func()) (outcome, bool) {
	log := zerolog.Ctx(ctx).With().Str("call_id", callID).Logger()
	callGlareLock.Lock()
	defer callGlareLock.Unlock()
	existing, err := b.DB.Calls.ByRoomCallID(ctx, evt.RoomID, callID)
	if err != nil {
		return outcome{err: err}, true
	} else if existing != nil {
		// A retry, or a client re-sending its invite: relay only what is still ringing.
		if existing.State == database.CallEnded {
			return outcome{state: database.InboxDone}, true
		}
		return outcome{}, false
	}
	now := time.Now()
	sentAt := time.UnixMilli(evt.Timestamp)
	lifetime, ok := callLifetime(raw)
	if !ok {
		lifetime = defaultInviteLifetime
	}
	expires := sentAt.Add(lifetime)
	if !expires.After(now) {
		log.Info().Dur("late_by", now.Sub(expires)).Msg("Call invite expired before it could be relayed; not relaying it")
		return outcome{state: database.InboxDone}, true
	}
	call := &database.Call{
		Key: "call_" + randomHex(12), LinkID: link.ID, OriginRoom: evt.RoomID, OriginCallID: callID,
		Caller: evt.Sender, CallerParty: callString(raw, "party_id"), Invitee: b.realInvitee(callString(raw, "invitee")),
		State: database.CallRinging, ExpiresAt: expires, CreatedAt: now, UpdatedAt: now, Rooms: map[id.RoomID]string{evt.RoomID: callID},
	}
	live, err := b.DB.Calls.Live(ctx, link.ID)
	if err != nil {
		return outcome{err: err}, true
	}
	for _, rival := range live {
		if rival.State != database.CallRinging || rival.OriginRoom == evt.RoomID || !rival.ExpiresAt.After(now) {
			continue // not glare: answered calls are busy lines, same-room glare is the clients' to settle
		}
		if !callParties(call.Caller, call.Invitee, rival.Caller, rival.Invitee) {
			continue // not the two parties calling each other: someone else's call is none of this one's business
		}
		if glareWinner(callID, evt.RoomID, rival.OriginCallID, rival.OriginRoom) {
			log.Info().Str("lost_call_key", rival.Key).Msg("Glare: this invite wins over one already relayed; hanging that one up")
			if err = b.DB.Calls.SetState(ctx, rival.Key, database.CallEnded); err != nil {
				return outcome{err: err}, true
			}
			*hangups = append(*hangups, func() { b.hangUpCall(ctx, rival, evt.Sender, evt.RoomID, call.CallerParty, "user_busy") })
			continue
		}
		log.Info().Str("winning_call_key", rival.Key).Msg("Glare: an invite already relayed wins; hanging this one up")
		call.State = database.CallEnded
		if err = b.DB.Calls.Insert(ctx, call); err != nil {
			return outcome{err: err}, true
		}
		*hangups = append(*hangups, func() {
			b.sendHangup(ctx, rival.Caller, rival.OriginRoom, evt.RoomID, callID, rival.CallerParty, "user_busy", call.Key)
		})
		return outcome{state: database.InboxDone}, true
	}
	for _, target := range link.Others(evt.RoomID) {
		call.Rooms[target] = copyCallID(callID)
	}
	if err = b.DB.Calls.Insert(ctx, call); err != nil {
		return outcome{err: err}, true
	}
	return outcome{}, false
}

// isCallRefusal tells whether err means a call event does not cross into a room: the call is not one ferry relays
// there, the event expired, or it has no usable call_id.
func isCallRefusal(err error) bool {
	return errors.Is(err, errCallUnknown) || errors.Is(err, errCallExpired) || errors.Is(err, errCallMalformed)
}

// callIDIn returns the call ID that the call of legacy call event evt has in target. errCallUnknown means: do not
// relay into target.
func (b *Bridge) callIDIn(ctx context.Context, evt *event.Event, target id.RoomID) (string, error) {
	call, err := b.DB.Calls.ByRoomCallID(ctx, evt.RoomID, callString(contentRaw(evt), "call_id"))
	if err != nil {
		return "", err
	} else if call == nil || call.Rooms[target] == "" {
		return "", errCallUnknown
	} else if evt.RoomID != call.OriginRoom && target != call.OriginRoom {
		// In a link of more than two rooms, the callee side talks only to the caller, never to other callees.
		return "", errCallUnknown
	}
	return call.Rooms[target], nil
}

// mapCallCopy rewrites the translated content of legacy call event evt for a room where its call has
// targetCallID, at now (see mapCallContent), keeping VeryRaw equal to Raw. errCallExpired and errCallMalformed
// mean: do not relay.
func mapCallCopy(evt *event.Event, content *event.Content, targetCallID string, now time.Time, ghosts GhostNamer) error {
	if err := mapCallContent(evt.Type.Type, content.Raw, targetCallID, time.UnixMilli(evt.Timestamp), now, ghosts.Counterpart); err != nil {
		return err
	}
	data, err := json.Marshal(content.Raw)
	if err != nil {
		return err
	}
	content.VeryRaw = data
	return nil
}

// realInvitee maps an invite's invitee (in the caller's room the callee is a ghost) to the real user; "" stays "".
func (b *Bridge) realInvitee(invitee string) id.UserID {
	if invitee == "" {
		return ""
	}
	if real, ok := b.Ghosts.Real(id.UserID(invitee)); ok {
		return real
	}
	return id.UserID(invitee)
}

// hangUpCall ends a call in every room it has: the caller's own room hears it from the ghost of stranger (the
// other side, a member of strangerRoom), every copy room from the caller's ghost.
func (b *Bridge) hangUpCall(ctx context.Context, call *database.Call, stranger id.UserID, strangerRoom id.RoomID, strangerParty, reason string) {
	for room, callID := range call.Rooms {
		if room == call.OriginRoom {
			b.sendHangup(ctx, stranger, strangerRoom, room, callID, strangerParty, reason, call.Key)
		} else {
			b.sendHangup(ctx, call.Caller, call.OriginRoom, room, callID, call.CallerParty, reason, call.Key)
		}
	}
}

// sendHangup sends m.call.hangup for callID into room as real's ghost (or the bot when real is empty).
// Failures are logged: a hangup that cannot be sent leaves the client to time the call out.
func (b *Bridge) sendHangup(ctx context.Context, real id.UserID, realRoom, room id.RoomID, callID, party, reason, callKey string) {
	if party == "" {
		party = "ferry"
	}
	raw := map[string]any{"call_id": callID, "party_id": party, "version": "1", "reason": reason}
	txnID := TxnID(id.EventID("hangup:"+callKey+":"+callID), room)
	ctx, cancel := context.WithTimeout(ctx, hangupTimeout)
	defer cancel()
	if err := b.sendAs(ctx, real, realRoom, room, event.Type{Type: callHangup, Class: event.MessageEventType}, raw, txnID); err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Stringer("target_room_id", room).Msg("Failed to hang up a call")
	}
}

// sendAs sends content ferry made up into room as real's ghost (joining and encrypting as a relayed copy
// would), or as the bot when real is empty. realRoom names where real is a member, for the ghost's profile.
func (b *Bridge) sendAs(ctx context.Context, real id.UserID, realRoom, room id.RoomID, evtType event.Type, raw map[string]any, txnID string) error {
	raw[OriginKey] = Origin{Instance: b.instanceID()}.raw()
	raw[txnKey] = txnID // read back after an unclean stop (reconcile.go)
	data, err := json.Marshal(raw)
	if err != nil {
		return err
	}
	content := &event.Content{Raw: raw, VeryRaw: data}
	encrypted, err := b.StateStore.IsEncrypted(ctx, room)
	if err != nil {
		return err
	}
	intent := b.AS.BotIntent()
	if real != "" {
		ghost := b.Ghosts.Ghost(real)
		intent = b.AS.Intent(ghost)
		if prep, ok := b.Crypto.(SenderPreparer); ok && encrypted {
			if err = intent.EnsureRegistered(ctx); err != nil {
				return err
			}
			if err = prep.PrepareSender(ctx, ghost); err != nil {
				return err
			}
		}
		if realRoom == "" {
			realRoom = room
		}
		if err = b.ensureGhost(ctx, intent, realRoom, real, room); err != nil {
			return err
		}
	}
	_, err = b.send(ctx, intent, room, encrypted, evtType, content, txnID, disappearInfo{})
	return err
}

// endCallsForUnlink hangs up, on both sides, every call that crossed between room and the rest of link (room
// just left link). The other side is gone from the caller's view, so each side hears the hangup from the ghost
// of the person it was talking to (the bot, when nobody answered yet).
func (b *Bridge) endCallsForUnlink(ctx context.Context, link *database.Link, room id.RoomID) {
	calls, err := b.DB.Calls.Live(ctx, link.ID)
	if err != nil {
		zerolog.Ctx(ctx).Err(err).Msg("Failed to list calls of an unlinked room")
		return
	}
	for _, call := range calls {
		if _, ok := call.Rooms[room]; !ok {
			continue
		}
		if err = b.DB.Calls.SetState(ctx, call.Key, database.CallEnded); err != nil {
			zerolog.Ctx(ctx).Err(err).Msg("Failed to end a call of an unlinked room")
		}
		zerolog.Ctx(ctx).Info().Str("call_key", call.Key).Msg("Hanging up a call whose rooms were unlinked")
		var calleeRoom id.RoomID
		for r := range call.Rooms {
			if r != call.OriginRoom && (calleeRoom == "" || r < calleeRoom) {
				calleeRoom = r
			}
		}
		b.hangUpCall(ctx, call, call.Callee, calleeRoom, call.CalleeParty, "user_hangup")
	}
}

// callNotifiedKey names the kv entry holding when ferry last sent call ringing into a room.
func callNotifiedKey(room id.RoomID) string { return "call_notified:" + string(room) }

// claimCallNotification reports whether call ringing caused by event cause may go into room now, and records
// that it did. The same cause may claim again (a retry of its relay), another one only after callNotifyWindow.
func (b *Bridge) claimCallNotification(ctx context.Context, room id.RoomID, cause id.EventID) bool {
	now := time.Now()
	if v, err := b.DB.KV.Get(ctx, callNotifiedKey(room)); err == nil && v != "" {
		msText, prevCause, _ := strings.Cut(v, " ")
		if id.EventID(prevCause) == cause {
			return true
		}
		if ms, perr := strconv.ParseInt(msText, 10, 64); perr == nil && now.Sub(time.UnixMilli(ms)) < callNotifyWindow {
			return false
		}
	}
	_ = b.DB.KV.Set(ctx, callNotifiedKey(room), strconv.FormatInt(now.UnixMilli(), 10)+" "+string(cause))
	return true
}

// prepareCallNotification lets an explicit group-call notification through unless ferry already rang the
// other rooms for this call (a member joining rings them first).
func (b *Bridge) prepareCallNotification(ctx context.Context, evt *event.Event, link *database.Link) (outcome, bool) {
	for _, target := range link.Others(evt.RoomID) {
		if done, err := b.DB.EventMap.Get(ctx, evt.ID, target); err == nil && done != nil {
			continue
		}
		if !b.claimCallNotification(ctx, target, evt.ID) {
			zerolog.Ctx(ctx).Debug().Stringer("target_room_id", target).Msg("Call ringing already sent, not relaying another")
			return outcome{state: database.InboxDone}, true
		}
	}
	return outcome{}, false
}

// handleCallMember reacts to a group call membership state event: when a real user joins a call in a linked
// room, the other rooms get a notification from their ghost (unless ringing was sent moments ago) and a notice
// naming who is in the call and where. Nobody is made a member of another room's call.
func (b *Bridge) handleCallMember(ctx context.Context, evt *event.Event) {
	if b.Ghosts.IsOwn(evt.Sender) || b.Permission(evt.Sender) == LevelBlock {
		return
	}
	raw := contentRaw(evt)
	if !activeCallMember(raw) {
		return // leaving
	}
	if prev := evt.Unsigned.PrevContent; prev != nil && activeCallMember(contentRaw(&event.Event{Content: *prev})) {
		return // a refresh of a membership that was already active
	}
	link, err := b.DB.Links.GetByRoom(ctx, evt.RoomID)
	if err != nil {
		return
	}
	log := zerolog.Ctx(ctx).With().Str("link_id", link.ID).Logger()
	members := b.callMembers(ctx, evt.RoomID, evt.Sender)
	names := make([]string, len(members))
	for i, m := range members {
		names[i] = b.memberName(ctx, evt.RoomID, m)
	}
	where := b.roomName(ctx, evt.RoomID)
	for _, target := range link.Others(evt.RoomID) {
		if b.claimCallNotification(ctx, target, evt.ID) {
			notif := map[string]any{
				"notification_type": "notification",
				"sender_ts":         float64(evt.Timestamp),
				"lifetime":          float64(30000),
				"m.mentions":        map[string]any{},
			}
			if intent, ok := raw["m.call.intent"].(string); ok {
				notif["m.call.intent"] = intent
			}
			if err = b.sendAs(ctx, evt.Sender, evt.RoomID, target, event.Type{Type: rtcNotification, Class: event.MessageEventType}, notif, TxnID(evt.ID, target)+"_ring"); err != nil {
				log.Warn().Err(err).Stringer("target_room_id", target).Msg("Failed to send call notification")
			}
		}
		n := renderNotice("%s joined a call in **%s**. In that call now: %s. Join it from %s; calls stay in their own room.",
			b.memberName(ctx, evt.RoomID, evt.Sender), where, strings.Join(names, ", "), where)
		if _, err = b.sendRenderedNotice(ctx, target, n, "", TxnID(evt.ID, target)+"_call"); err != nil {
			log.Warn().Err(err).Stringer("target_room_id", target).Msg("Failed to post call notice")
		}
	}
}

// activeCallMember reports whether call member content says its sender is in a call (an empty object, or a
// legacy m.calls list that is empty, means they left).
func activeCallMember(raw map[string]any) bool {
	if len(raw) == 0 {
		return false
	}
	if calls, ok := raw["m.calls"].([]any); ok {
		return len(calls) > 0
	}
	_, hasApp := raw["application"]
	_, hasFocus := raw["focus_active"]
	return hasApp || hasFocus || raw["call_id"] != nil
}

// callMembers lists the users in room's call according to its current state, always including joiner.
func (b *Bridge) callMembers(ctx context.Context, room id.RoomID, joiner id.UserID) []id.UserID {
	seen := map[id.UserID]bool{joiner: true}
	out := []id.UserID{joiner}
	state, err := b.AS.BotIntent().State(ctx, room)
	if err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to read call members")
		return out
	}
	var others []id.UserID
	for evtType, byKey := range state {
		if !isCallMember(evtType) {
			continue
		}
		for _, e := range byKey {
			if e == nil || seen[e.Sender] || b.Ghosts.IsOwn(e.Sender) || !activeCallMember(contentRaw(e)) {
				continue
			}
			seen[e.Sender] = true
			others = append(others, e.Sender)
		}
	}
	sort.Slice(others, func(i, j int) bool { return others[i] < others[j] })
	return append(out, others...)
}

// memberName is how a notice names a user of room: their display name there with the user ID, or the ID.
func (b *Bridge) memberName(ctx context.Context, room id.RoomID, user id.UserID) string {
	if m, _ := b.StateStore.TryGetMember(ctx, room, user); m != nil && m.Displayname != "" {
		return fmt.Sprintf("%s (%s)", m.Displayname, user)
	}
	return string(user)
}
