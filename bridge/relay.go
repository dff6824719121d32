package bridge

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/appservice"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/internal/metrics"
)

// relayable lists the message event types that cross a link.
func relayable(t event.Type) bool {
	switch t {
	case event.EventMessage, event.EventSticker, event.EventReaction, event.EventRedaction:
		return true
	}
	return strings.HasPrefix(t.Type, "m.call.") || isCallNotification(t) || strings.HasPrefix(t.Type, "org.matrix.msc3381.poll.") || strings.HasPrefix(t.Type, "m.poll.")
}

// TxnID derives the transaction ID of the copy of sourceEvent in targetRoom. It is deterministic (a retry after
// a crash reuses it, so the homeserver returns the first copy instead of posting a second) and unique across all
// ghosts (homeservers like Dendrite scope transaction IDs per access token, and every ghost shares the
// appservice token), because event IDs are globally unique.
func TxnID(sourceEvent id.EventID, targetRoom id.RoomID) string {
	sum := sha256.Sum256([]byte(string(sourceEvent) + "\x00" + string(targetRoom)))
	return "ferry_" + base64.RawURLEncoding.EncodeToString(sum[:18])
}

// relay sends an event's copies into every other room of its link. trustFlag is why the source room's clients
// would flag the event ("" when they would not); its copies then carry a warning (see Translate). failingSince is
// when relaying the event first failed for a reason that may pass (zero: never): a room whose homeserver has kept
// failing since bridge.give_up_after before is given up (see giveUp).
func (b *Bridge) relay(ctx context.Context, run *eventRun, evt *event.Event, trustFlag string, failingSince time.Time) outcome {
	if !relayable(evt.Type) {
		return outcome{state: database.InboxDone}
	}
	link, err := b.DB.Links.GetByRoom(ctx, evt.RoomID)
	targets := func() []id.RoomID { return link.Others(evt.RoomID) }
	if errors.Is(err, database.ErrLinkNotFound) {
		// A room the link moved out of when it was upgraded (upgrade.go): what its members do there to the
		// events from before the upgrade (edits, reactions, redactions) still crosses; new messages do not.
		if link, err = b.DB.Links.GetByRetired(ctx, evt.RoomID); errors.Is(err, database.ErrLinkNotFound) {
			return outcome{state: database.InboxDone}
		} else if err != nil {
			return outcome{err: err}
		}
		if relationTarget(evt) == "" {
			zerolog.Ctx(ctx).Debug().Msg("Not relaying a new event from a room that was upgraded")
			return outcome{state: database.InboxDone}
		}
		current := link.CurrentOf(evt.RoomID)
		targets = func() []id.RoomID { return link.Others(current) }
	} else if err != nil {
		return outcome{err: err}
	}
	log := zerolog.Ctx(ctx).With().Str("link_id", link.ID).Logger()
	ctx = log.WithContext(ctx)
	if evt.Type == event.EventRedaction {
		ok, err := b.redactionAuthorised(ctx, evt, redactsOf(evt), targets())
		if err != nil {
			return outcome{err: err}
		} else if !ok {
			// Servers accept redactions they then do not apply; this one changed nothing here, so it does not elsewhere.
			log.Info().Msg("Not relaying a redaction by a user who neither sent the original nor may redact others")
			return outcome{state: database.InboxDone}
		}
	}
	if res, stop := b.prepareCall(ctx, evt, link); stop {
		return res
	}
	// Unknown is not "unencrypted": guessing wrong would send a decrypted message in the clear.
	srcEncrypted, err := b.isEncrypted(ctx, evt.RoomID)
	if err != nil {
		return outcome{err: err}
	}
	run.disappear = b.disappearDeadline(ctx, evt, link, run.inbound) // see disappear.go
	var retry *outcome
	for _, target := range targets() {
		res := b.relayTo(ctx, run, evt, target, link, srcEncrypted, trustFlag)
		countRelayed(evt, res)
		switch {
		case res.err == nil:
			b.failing.ok(target)
		case res.state != "":
			b.reportFailure(ctx, evt, target, res.err)
		case b.giveUp(target, failingSince, res.err):
			b.reportFailure(ctx, evt, target, fmt.Errorf("%w: %w", errGaveUp, res.err))
		default:
			retry = &res
		}
	}
	if retry != nil {
		return *retry
	}
	b.stats.relayed.Add(1)
	return outcome{state: database.InboxDone}
}

// relayTo sends one copy. A zero-state outcome with err means retry later; state failed means permanent.
//
// It reads top to bottom: where the copy goes (routeCopy), whether it was sent already, whether it may go there;
// then everything it depends on outside the event is read at once (resolveCopy); Translate makes its content
// from the event and that alone; the ghost is made ready, the copy encrypted and sent (send), and recorded.
func (b *Bridge) relayTo(ctx context.Context, run *eventRun, evt *event.Event, target id.RoomID, link *database.Link, srcEncrypted bool, trustFlag string) outcome {
	// The target is added to the few debug messages below rather than to a logger of its own: building one per
	// copy costs an allocation of a few hundred bytes on every relayed message.
	log := zerolog.Ctx(ctx)
	route, err := b.routeCopy(ctx, evt, target, link)
	if err != nil {
		return outcome{err: err}
	}
	target = route.room
	if !run.first {
		if done, err := b.DB.EventMap.Get(ctx, evt.ID, target); err != nil {
			return outcome{err: err}
		} else if done != nil {
			return outcome{state: database.InboxDone}
		}
	}
	if evt.Type == event.EventRedaction {
		return b.relayRedaction(ctx, run, evt, target)
	}
	targetEncrypted, err := b.isEncrypted(ctx, target)
	if err != nil {
		return outcome{err: err}
	}
	if srcEncrypted && !targetEncrypted && !b.Config.AllowUnencryptedTargets {
		log.Debug().Stringer("target_room_id", target).Msg("Not relaying from an encrypted room into an unencrypted one")
		if kindOf(evt.Type) != kindMessage {
			return outcome{state: database.InboxDone} // reactions, call signalling: the message told already
		}
		b.tellSender(ctx, delivery{room: evt.RoomID, event: evt.ID, sender: evt.Sender}, deliveryProblem{
			status: event.MessageStatusFail, reason: event.MessageStatusNoPermission, kind: "unencrypted_" + TxnID(evt.ID, target),
			notice: renderNotice("ferry did not relay this message to %s: that room is not encrypted, and ferry does not relay from an encrypted room into an unencrypted one.", b.roomName(ctx, target)),
		})
		return outcome{state: database.InboxDone}
	}

	// Resolve: the counterparts of what the event refers to, and a call's ID, in the target room.
	refs, err := b.resolveCopy(ctx, evt, route)
	if isCallRefusal(err) {
		log.Debug().Stringer("target_room_id", target).Err(err).Msg("Call event does not cross into this room")
		return outcome{state: database.InboxDone}
	} else if err != nil {
		return outcome{err: err}
	}

	// Translate: pure, from the event and what was resolved.
	evtType, content, err := translateCopy(evt, refs, route, Origin{EventID: evt.ID, RoomID: evt.RoomID, Instance: b.instanceID(), TrustFlag: trustFlag}, b.AS.HomeserverDomain, time.Now())
	if errors.Is(err, ErrNotRelayable) || errors.Is(err, ErrRelationTargetUnknown) {
		log.Debug().Stringer("target_room_id", target).Err(err).Msg("Event does not cross the link")
		return outcome{state: database.InboxDone}
	} else if isCallRefusal(err) {
		log.Debug().Stringer("target_room_id", target).Err(err).Msg("Call event does not cross into this room")
		return outcome{state: database.InboxDone}
	} else if err != nil {
		return outcome{err: err}
	}

	// Send as the sender's ghost, encrypted where the target room is, and record the copy.
	ghost := b.Ghosts.Ghost(evt.Sender)
	intent := b.AS.Intent(ghost)
	if prep, ok := b.Crypto.(SenderPreparer); ok && targetEncrypted {
		// The account must exist before its device does; registration is remembered, so this is cheap later.
		if err = intent.EnsureRegistered(ctx); err != nil {
			return classify(fmt.Errorf("failed to register the sender's ghost: %w", err))
		}
		if err = prep.PrepareSender(ctx, ghost); err != nil {
			return outcome{err: err}
		}
	}
	if err = b.ensureGhost(ctx, intent, evt.RoomID, evt.Sender, target); errors.Is(err, errModerated) {
		b.tellModerated(ctx, evt.RoomID, target, evt.Sender)
		return outcome{state: database.InboxDone}
	} else if err != nil {
		return classify(fmt.Errorf("failed to bring the sender's ghost into the room: %w", err))
	}
	// A ghost that has just joined target waits until members' clients can know its identity (joinwait.go).
	if !b.joins.wait(ctx, ghost, target, b.Config.GhostJoinWait) {
		return outcome{err: ctx.Err()}
	}
	// Translate (and the call mapping) keep VeryRaw equal to Raw: sending the bytes spares encoding the map again.
	resp, posted, err := b.sendTimed(ctx, intent, target, targetEncrypted, evtType, &event.Content{VeryRaw: content.VeryRaw}, TxnID(evt.ID, target), run.disappear)
	if err != nil {
		// The ghost may have been removed meanwhile: check its membership again next time.
		b.hot.forgetGhost(ghostKey{evt.RoomID, evt.Sender, target})
		return classify(err)
	}
	err = b.recordCopy(ctx, run, &database.Copy{
		SourceEvent: evt.ID, SourceRoom: evt.RoomID, TargetRoom: target, TargetEvent: resp,
		Sender: ghost, CreatedAt: time.Now(), DisappearAt: run.disappear.deadline,
	})
	if err != nil {
		return outcome{err: fmt.Errorf("failed to record the copy: %w", err)}
	}
	log.Debug().Stringer("target_room_id", target).Stringer("copy_event_id", resp).Msg("Relayed event")
	return outcome{state: database.InboxDone, sent: true, processing: receivedUntil(evt, posted)}
}

// copyRoute is where one copy of an event goes.
type copyRoute struct {
	// room is where the copy is sent: the target room, or the room it replaced where the event relates to an
	// event from before the upgrade (an edit, reaction or redaction goes where its target lives).
	room id.RoomID
	// predecessors are the rooms room replaced, newest first: a reply to an event from before an upgrade links
	// to it there.
	predecessors []id.RoomID
	// restateFrom is the old room whose event the event relates to when the copy is restated in room instead,
	// because the ghost may not post in the old room (upgrade.go: restateInSuccessor); "" otherwise.
	restateFrom id.RoomID
}

// routeCopy decides where evt's copy for target goes. An edit, reaction or redaction of an event from before
// target's room upgrade goes where that event lives.
func (b *Bridge) routeCopy(ctx context.Context, evt *event.Event, target id.RoomID, link *database.Link) (copyRoute, error) {
	home, err := b.homeFor(ctx, evt, target, link)
	if err != nil {
		return copyRoute{}, err
	}
	switch {
	case home == target:
		return copyRoute{room: target, predecessors: link.Predecessors(target)}, nil
	case evt.Type != event.EventRedaction && !b.mayPost(ctx, home, b.Ghosts.Ghost(evt.Sender), evt.Type):
		// Upgrades mute the old room (its power levels let only moderators speak): the relation is restated
		// in the room that replaced it (upgrade.go: restateInSuccessor).
		return copyRoute{room: target, restateFrom: home}, nil
	}
	return copyRoute{room: home}, nil
}

// copyRefs is everything one copy of an event depends on outside the event, read before it is translated.
type copyRefs struct {
	Refs
	// callID is a 1:1 call event's call ID in the copy's room (calls.go).
	callID string
}

// resolveCopy reads what evt's copy along route depends on: the counterparts of the events it relates to, in the
// room its relation is written for (the old room when it is restated), and for a 1:1 call event the call's ID in
// the copy's room (errCallUnknown: the call does not cross into it).
func (b *Bridge) resolveCopy(ctx context.Context, evt *event.Event, route copyRoute) (copyRefs, error) {
	m := &linkMapper{b: b, target: route.room, predecessors: route.predecessors}
	if route.restateFrom != "" {
		m = &linkMapper{b: b, target: route.restateFrom}
	}
	refs, err := Resolve(ctx, evt, m, b.Ghosts)
	if err != nil {
		return copyRefs{}, err
	}
	r := copyRefs{Refs: refs}
	if isLegacyCall(evt.Type) {
		r.callID, err = b.callIDIn(ctx, evt, route.room)
	}
	return r, err
}

// translateCopy makes the type and content of evt's copy along route from evt and what resolveCopy read, and
// nothing else: Translate; then, for a relation restated in the room that replaced its target's
// (restateInSuccessor, links naming via as their server), the restatement; for a 1:1 call event, its call's ID
// there and the invite's lifetime left at now (mapCallContent).
func translateCopy(evt *event.Event, refs copyRefs, route copyRoute, origin Origin, via string, now time.Time) (event.Type, *event.Content, error) {
	evtType, content, err := Translate(evt, refs.Refs, origin)
	if err == nil && route.restateFrom != "" {
		evtType, content, err = restateInSuccessor(evtType, content, route.restateFrom, via)
	}
	if err == nil && isLegacyCall(evtType) {
		err = mapCallCopy(evt, content, refs.callID, now, refs.Ghosts)
	}
	return evtType, content, err
}

// relayRedaction redacts the copy of the redacted event in target, as the ghost that sent the copy.
func (b *Bridge) relayRedaction(ctx context.Context, run *eventRun, evt *event.Event, target id.RoomID) outcome {
	redacts := redactsOf(evt)
	counterpart, ok, err := b.DB.EventMap.Counterpart(ctx, redacts, target)
	if err != nil {
		return outcome{err: err}
	} else if !ok {
		return outcome{state: database.InboxDone}
	}
	sender := b.Ghosts.Ghost(evt.Sender)
	if c, _ := b.DB.EventMap.ByTarget(ctx, counterpart); c != nil {
		sender = c.Sender // the ghost that sent the copy may always redact it
	}
	if !b.mayPost(ctx, target, sender, event.EventRedaction) {
		// A room muted by its upgrade: the bot, a moderator there, redacts instead.
		sender = b.AS.BotMXID()
	}
	// No reason: redactions are read by the server, a reason would leak into cleartext.
	posted := time.Now()
	resp, err := b.AS.Intent(sender).RedactEvent(ctx, target, counterpart, mautrix.ReqRedact{TxnID: TxnID(evt.ID, target)})
	if err != nil {
		return classify(err)
	}
	err = b.recordCopy(ctx, run, &database.Copy{SourceEvent: evt.ID, SourceRoom: evt.RoomID, TargetRoom: target, TargetEvent: resp.EventID, Sender: sender, CreatedAt: time.Now()})
	if err != nil {
		return outcome{err: err}
	}
	return outcome{state: database.InboxDone, sent: true, processing: receivedUntil(evt, posted)}
}

// receivedUntil is the time from the transaction that brought evt to t (0 when not known).
func receivedUntil(evt *event.Event, t time.Time) time.Duration {
	if evt.Mautrix.ReceivedAt.IsZero() {
		return 0
	}
	return t.Sub(evt.Mautrix.ReceivedAt)
}

// countRelayed counts the outcome of evt in one target room, and how long it took to relay when a copy was sent.
func countRelayed(evt *event.Event, res outcome) {
	switch {
	case res.sent:
		metrics.Relayed(evt.Type.Type, metrics.OutcomeSent)
		if !evt.Mautrix.ReceivedAt.IsZero() {
			metrics.RelayLatency.Observe(receivedUntil(evt, time.Now()).Seconds())
			metrics.RelayProcessing.Observe(res.processing.Seconds())
		}
	case res.err == nil:
		metrics.Relayed(evt.Type.Type, metrics.OutcomeDropped)
	case res.state == "":
		metrics.Relayed(evt.Type.Type, metrics.OutcomeRetry)
	default:
		metrics.Relayed(evt.Type.Type, metrics.OutcomeFailed)
	}
}

// send sends content into a room as intent's user, encrypting it when the room is encrypted. dis is when the
// message disappears (zero: it stays), which decides the outbound session it may be encrypted with.
func (b *Bridge) send(ctx context.Context, intent *appservice.IntentAPI, room id.RoomID, encrypted bool, evtType event.Type, content *event.Content, txnID string, dis disappearInfo) (id.EventID, error) {
	evtID, _, err := b.sendTimed(ctx, intent, room, encrypted, evtType, content, txnID, dis)
	return evtID, err
}

// sendTimed is send, also telling when ferry's part of it ended: when its request to the homeserver began, or
// when it found that an earlier attempt had posted the event.
func (b *Bridge) sendTimed(ctx context.Context, intent *appservice.IntentAPI, room id.RoomID, encrypted bool, evtType event.Type, content *event.Content, txnID string, dis disappearInfo) (id.EventID, time.Time, error) {
	// Where ferry may have posted without knowing (reconcile.go), it reads the room back first.
	if err := b.settle(ctx, room); err != nil {
		return "", time.Time{}, err
	}
	if evtID, ok := b.sent.take(room, txnID); ok {
		// Posted by an attempt whose answer ferry never got (before an unclean stop, a dropped connection, a
		// homeserver restart), and found in the room: not again.
		zerolog.Ctx(ctx).Info().Stringer("target_room_id", room).Stringer("sent_event_id", evtID).
			Msg("Found an unanswered send in the room; not sending it again")
		return evtID, time.Now(), nil
	}
	if content.Parsed != nil && content.VeryRaw == nil {
		// Notices and replies say which transaction sent them, for the read-back after an unclean stop.
		// (Relayed copies and call events carry the origin marker or the key already.)
		raw := make(map[string]any, len(content.Raw)+1)
		for k, v := range content.Raw {
			raw[k] = v
		}
		raw[txnKey] = txnID
		content = &event.Content{Parsed: content.Parsed, Raw: raw}
	}
	sendType := evtType
	var payload any = content
	if encrypted {
		b.beforeEncrypt(ctx, intent.UserID, room, dis) // disappearing messages: rotate the session when due
		enc, err := b.Crypto.Encrypt(ctx, intent.UserID, room, evtType, content)
		if err != nil {
			return "", time.Time{}, fmt.Errorf("failed to encrypt: %w", err)
		}
		b.afterEncrypt(ctx, intent.UserID, room, enc, dis)
		sendType = event.EventEncrypted
		payload = enc
	}
	// The caller made sure the ghost is in the room (ensureGhost): the client call skips the intent's second
	// membership check.
	began := time.Now()
	resp, err := intent.Client.SendMessageEvent(ctx, room, sendType, payload, mautrix.ReqSendEvent{TransactionID: txnID, DontEncrypt: true})
	if err != nil {
		if httpErr := (mautrix.HTTPError{}); !errors.As(err, &httpErr) || httpErr.Response == nil || httpErr.Response.StatusCode >= 500 {
			// No answer, or a server error (Dendrite answers 500 when it stopped waiting for its room server,
			// which may still post the event): the request may have been processed.
			b.markReadback(ctx, room, began.Add(-b.health.clockLag()))
		}
		return "", began, err
	}
	return resp.EventID, began, nil
}

// reportFailure tells the sender, in the source room, that a copy could not be delivered, for good (status.go).
func (b *Bridge) reportFailure(ctx context.Context, evt *event.Event, target id.RoomID, err error) {
	zerolog.Ctx(ctx).Warn().Err(err).Stringer("target_room_id", target).Msg("Permanent error relaying event")
	b.stats.recordError(evt.RoomID)
	b.tellSender(ctx, delivery{room: evt.RoomID, event: evt.ID, sender: evt.Sender}, deliveryProblem{
		status: event.MessageStatusFail, reason: statusReason(err), kind: "failed_" + TxnID(evt.ID, target),
		notice: renderNotice("ferry could not relay this message to %s: %s", b.roomName(ctx, target), userFacingError(err)),
	})
}

func userFacingError(err error) string {
	var httpErr mautrix.HTTPError
	var text string
	switch {
	case errors.As(err, &httpErr) && httpErr.RespError != nil && httpErr.RespError.ErrCode != "":
		text = fmt.Sprintf("the homeserver answered %s", httpErr.RespError.ErrCode)
	case errors.As(err, &httpErr) && httpErr.Response != nil:
		text = fmt.Sprintf("the homeserver answered HTTP %d", httpErr.Response.StatusCode)
	case errors.As(err, &httpErr):
		text = "the homeserver did not answer"
	default:
		text = "an internal error occurred"
	}
	if errors.Is(err, errGaveUp) {
		text += ", again and again, so ferry gave up"
	}
	return text
}

// errGaveUp marks a failure that might have passed but lasted longer than bridge.give_up_after.
var errGaveUp = errors.New("gave up after retrying")

// maxRetryGap is more than the longest wait between two retries of an event: a room not seen failing for that
// long is not failing any more.
const maxRetryGap = 2 * time.Minute

// failingRooms remembers since when sends into a room have kept failing (in this run), so that once ferry gave
// up on a room, later messages to it are not held for bridge.give_up_after each.
type failingRooms struct {
	// guards the following fields
	lock  sync.Mutex
	rooms map[id.RoomID]failingRoom
}

type failingRoom struct {
	since, last time.Time
	gaveUp      bool // ferry gave up on the room; it stays given up until a send into it goes through
}

// fail notes a failure to send into room at now and tells whether ferry gives up on the room: it gave up before,
// or sends into it have kept failing (no gap longer than maxRetryGap between failures) for giveUpAfter.
func (f *failingRooms) fail(room id.RoomID, now, eventFailingSince time.Time, giveUpAfter time.Duration) bool {
	f.lock.Lock()
	defer f.lock.Unlock()
	if f.rooms == nil {
		f.rooms = make(map[id.RoomID]failingRoom)
	}
	r, ok := f.rooms[room]
	if !ok || (!r.gaveUp && now.Sub(r.last) > maxRetryGap) {
		r.since = now
	}
	r.last = now
	since := r.since
	if !eventFailingSince.IsZero() && eventFailingSince.Before(since) {
		since = eventFailingSince
	}
	r.gaveUp = r.gaveUp || now.Sub(since) >= giveUpAfter
	f.rooms[room] = r
	return r.gaveUp
}

// gaveUp tells whether ferry gave up on room: its copies are tried once each until one goes through.
func (f *failingRooms) gaveUp(room id.RoomID) bool {
	f.lock.Lock()
	defer f.lock.Unlock()
	return f.rooms[room].gaveUp
}

// ok notes a send into room that went through.
func (f *failingRooms) ok(room id.RoomID) {
	f.lock.Lock()
	defer f.lock.Unlock()
	delete(f.rooms, room)
}

// giveUp tells whether to stop retrying a copy into target after err: only the homeserver's failures are given
// up (a database that is away is waited for), once they have lasted bridge.give_up_after, counted from the
// event's first failure or from when sends into target started failing, whichever is earlier. Once ferry gave up
// on a room, later copies into it are tried once each until one goes through.
func (b *Bridge) giveUp(target id.RoomID, failingSince time.Time, err error) bool {
	var httpErr mautrix.HTTPError
	if !errors.As(err, &httpErr) || (httpErr.Response != nil && httpErr.Response.StatusCode == http.StatusTooManyRequests) {
		return false // a database that is away, or a rate limit: waited out
	}
	return b.failing.fail(target, time.Now(), failingSince, b.Config.GiveUpAfter)
}

// classify turns a homeserver error into an outcome: rate limits wait as told (Retry-After, else
// retry_after_ms), 5xx and network errors retry
// with backoff, other 4xx are permanent.
func classify(err error) outcome {
	var httpErr mautrix.HTTPError
	if errors.As(err, &httpErr) && httpErr.Response != nil {
		status := httpErr.Response.StatusCode
		if status == http.StatusTooManyRequests {
			return outcome{err: err, retryIn: RetryWait(err, time.Second)}
		}
		if status >= 400 && status < 500 {
			return outcome{state: database.InboxFailed, err: err}
		}
	}
	return outcome{err: err}
}

func (b *Bridge) instanceID() string {
	return b.AS.Registration.ID + "@" + b.AS.HomeserverDomain
}

// linkMapper looks up event IDs for one target room in the event map (Resolve's Mapper).
type linkMapper struct {
	b      *Bridge
	target id.RoomID
	// predecessors are the rooms target replaced (room upgrades), newest first: replies to events from before
	// the upgrades find them there.
	predecessors []id.RoomID
}

func (m *linkMapper) CopyOf(ctx context.Context, evt id.EventID) (id.EventID, bool, error) {
	return m.b.DB.EventMap.Counterpart(ctx, evt, m.target)
}
