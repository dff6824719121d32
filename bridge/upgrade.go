package bridge

// Room upgrades. When a linked room is upgraded, its m.room.tombstone names the room that replaces it. ferry joins
// that room (when it may not, because the new room is invite-only, it asks in the old room to be invited and
// completes the move when the invite comes), checks that the new room names the old one as its predecessor and
// that whoever upgraded holds the power to change settings there (the authority linking it would need), moves
// the old room's place in the link to the new one, writes its room state there (m.bridge, functional members,
// the disappearing timer) and announces the move in every room of the link.
//
// The old room stays a retired room of the link: the events from before the upgrade live there. Edits,
// reactions and redactions of them go where their target lives: into the old room when it is what they relate
// to, and from the old room when its members act there on its events. A reply in another room to an event from
// before the upgrade arrives in the new room with a link to that event in the old room (translate.go:
// quoteReplyElsewhere): clients look a reply's target up in the reply's own room and would show "unable to load".
// New messages sent in the old room after the move are not relayed: the conversation moved.

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

	"go.ferry.im/ferry/database"
)

// upgradeKey names the kv entry of an upgrade ferry has not completed yet, by the new room:
// "<old room> <user who upgraded>". It goes when the move is done or refused.
func upgradeKey(successor id.RoomID) string { return "upgrade:" + string(successor) }

// upgradeTxnID is the transaction ID of a notice about the upgrade of old, in room: posting it again (a tombstone
// handled twice, the invite and the tombstone both completing) finds the first.
func upgradeTxnID(kind string, old, room id.RoomID) string {
	return "ferry_upgrade_" + kind + "_" + TxnID(id.EventID("upgrade:"+string(old)), room)
}

// handleTombstone follows the upgrade of a linked room. A failure that may pass (the homeserver did not answer)
// is returned, so that the inbox keeps the tombstone and the worker tries again.
func (b *Bridge) handleTombstone(ctx context.Context, evt *event.Event) outcome {
	successor := evt.Content.AsTombstone().GetReplacementRoom()
	if successor == "" || successor == evt.RoomID || !strings.HasPrefix(string(successor), "!") {
		return outcome{state: database.InboxDone}
	}
	if _, err := b.DB.Links.GetByRoom(ctx, evt.RoomID); errors.Is(err, database.ErrLinkNotFound) {
		return outcome{state: database.InboxDone}
	} else if err != nil {
		return outcome{err: err}
	}
	log := zerolog.Ctx(ctx).With().Stringer("successor_room_id", successor).Logger()
	ctx = log.WithContext(ctx)
	log.Info().Stringer("upgraded_by", evt.Sender).Msg("A linked room was upgraded; following it")
	if err := b.DB.KV.Set(ctx, upgradeKey(successor), string(evt.RoomID)+" "+string(evt.Sender)); err != nil {
		return outcome{err: err}
	}
	via := []string{b.AS.HomeserverDomain}
	if server := evt.Sender.Homeserver(); server != "" && server != b.AS.HomeserverDomain {
		via = append(via, server)
	}
	_, err := b.AS.BotIntent().JoinRoom(ctx, successor.String(), &mautrix.ReqJoinRoom{Via: via})
	if err != nil {
		if res := classify(err); res.state == "" {
			return res // no answer, a server error or a rate limit: the tombstone is handled again later
		}
		// Refused (an invite-only room, typically): the invite into the new room completes the move.
		log.Info().Err(err).Msg("Cannot join the room that replaced a linked room; asking to be invited")
		n := renderNotice("This room was upgraded, and I cannot join the new room to move its link there (the homeserver answered: %s). Invite me (%s) into the new room, and the link moves with it.",
			userFacingError(err), b.AS.BotMXID())
		if _, nerr := b.sendRenderedNotice(ctx, evt.RoomID, n, "", upgradeTxnID("invite", evt.RoomID, evt.RoomID)); nerr != nil {
			log.Warn().Err(nerr).Msg("Failed to ask to be invited into the new room")
		}
		return outcome{state: database.InboxDone}
	}
	if err = b.completeUpgrade(ctx, evt.RoomID, successor, evt.Sender); err != nil {
		return outcome{err: err}
	}
	return outcome{state: database.InboxDone}
}

// upgradeInvited completes the move of a link into room when ferry was invited there after it learned that room
// replaces a linked room (and joined it).
func (b *Bridge) upgradeInvited(ctx context.Context, room id.RoomID) {
	pending, err := b.DB.KV.Get(ctx, upgradeKey(room))
	if err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to read pending room upgrades")
		return
	}
	old, upgrader, ok := strings.Cut(pending, " ")
	if !ok {
		return
	}
	if err = b.completeUpgrade(ctx, id.RoomID(old), room, id.UserID(upgrader)); err != nil {
		zerolog.Ctx(ctx).Err(err).Msg("Failed to move a link into the room that replaced a linked room")
	}
}

// completeUpgrade moves old's place in its link to successor, which ferry's bot has joined, when successor names
// old as its predecessor and upgrader may change successor's settings; otherwise the bot leaves successor again
// and the old room is told why. Errors are those worth trying again.
func (b *Bridge) completeUpgrade(ctx context.Context, old, successor id.RoomID, upgrader id.UserID) error {
	log := zerolog.Ctx(ctx).With().Stringer("old_room_id", old).Stringer("successor_room_id", successor).Logger()
	ctx = log.WithContext(ctx)
	bot := b.AS.BotIntent()
	if _, err := bot.State(ctx, successor); err != nil {
		return fmt.Errorf("failed to load the new room's state: %w", err)
	}
	refuse := func(why noticeText) {
		log.Warn().Msg("Not following a room upgrade")
		_ = b.DB.KV.Delete(ctx, upgradeKey(successor))
		n := renderNotice("I did not move this room's link into the room that replaced it:").join(why)
		if _, err := b.sendRenderedNotice(ctx, old, n, "", upgradeTxnID("refused", old, old)); err != nil {
			log.Warn().Err(err).Msg("Failed to say why a room upgrade was not followed")
		}
		if _, err := b.DB.Links.GetByRoom(ctx, successor); !errors.Is(err, database.ErrLinkNotFound) {
			return // the bot stays where it links (leaving would unlink the room)
		}
		if _, err := bot.LeaveRoom(ctx, successor); err != nil {
			log.Warn().Err(err).Msg("Failed to leave a room ferry does not link")
		}
	}
	// The new room must say it continues the old one: otherwise a tombstone could point the link at any room.
	create := b.createEvent(ctx, successor)
	if create == nil {
		return errors.New("failed to read the new room's create event")
	}
	if pred := create.Content.AsCreate().GetPredecessor(); pred.RoomID != old {
		refuse(renderNotice("the new room does not name this room as its predecessor."))
		return nil
	}
	// Moving the link acts on the new room as linking it would: whoever upgraded must have the power there.
	if a := b.checkAuthority(ctx, upgrader, successor, rightSettings, false); a.unknown {
		return errStandingUnknown
	} else if !a.ok {
		refuse(renderNotice("%s, who upgraded it, may not change the new room's settings.", upgrader))
		return nil
	}
	link, moved, err := b.DB.Links.MoveRoom(ctx, old, successor, time.Now())
	if errors.Is(err, database.ErrRoomAlreadyLinked) {
		refuse(renderNotice("the new room belongs to another link."))
		return nil
	} else if errors.Is(err, database.ErrLinkNotFound) {
		_ = b.DB.KV.Delete(ctx, upgradeKey(successor))
		return nil // unlinked meanwhile
	} else if err != nil {
		return fmt.Errorf("failed to move the link: %w", err)
	}
	if err = b.DB.KV.Delete(ctx, upgradeKey(successor)); err != nil {
		log.Warn().Err(err).Msg("Failed to forget a completed room upgrade")
	}
	if !moved {
		return nil // the tombstone or the invite got here first
	}
	log.Info().Str("link_id", link.ID).Msg("Moved a link into the room that replaced a linked room")
	b.updateLinkState(ctx, link)
	if link.DisappearAfter > 0 {
		b.writeDisappearState(ctx, successor, link.DisappearAfter)
	}
	b.announceUpgrade(ctx, link, old, successor, upgrader)
	return nil
}

// announceUpgrade tells every room of the link, and the old room, that the link moved.
func (b *Bridge) announceUpgrade(ctx context.Context, link *database.Link, old, successor id.RoomID, upgrader id.UserID) {
	oldName := b.roomName(ctx, old)
	others := link.Others(successor)
	notices := map[id.RoomID]noticeText{
		old: renderNotice("This room's link moved into the room that replaced it: messages cross with %s from there. Edits, reactions and redactions of the messages here still cross.",
			b.joinRoomNames(ctx, others)),
		successor: renderNotice("This room replaces **%s** (upgraded by %s) and stays linked with %s: messages cross as before. Messages from before the upgrade stay in the old room.",
			oldName, upgrader, b.joinRoomNames(ctx, others)),
	}
	for _, r := range others {
		notices[r] = renderNotice("**%s** was upgraded to a new room by %s; the link moved with it, and messages now cross with the new room.", oldName, upgrader)
	}
	for room, n := range notices {
		if _, err := b.sendRenderedNotice(ctx, room, n, "", upgradeTxnID("moved", old, room)); err != nil {
			zerolog.Ctx(ctx).Warn().Err(err).Stringer("target_room_id", room).Msg("Failed to announce a room upgrade")
		}
	}
}

// relationTarget returns the event that an event is nothing but a relation to: what a redaction redacts, what an
// edit replaces, what a reaction annotates, the poll a poll response or end refers to; "" for anything else
// (a message, a reply).
func relationTarget(evt *event.Event) id.EventID {
	if evt.Type == event.EventRedaction {
		return redactsOf(evt)
	}
	kind := kindOf(evt.Type)
	if kind != kindReaction && kind != kindPollFollowUp && kind != kindMessage {
		return ""
	}
	raw, err := contentMap(&evt.Content)
	if err != nil {
		return ""
	}
	rel, _ := raw[keyRelatesTo].(map[string]any)
	relType, _ := rel[keyRelType].(string)
	target, _ := rel[keyEventID].(string)
	switch {
	case kind == kindMessage && relType != string(event.RelReplace):
		return ""
	case !strings.HasPrefix(target, "$"):
		return ""
	}
	return id.EventID(target)
}

// homeFor returns the room evt's copy for target belongs in: target itself, or, for an event that is nothing but
// a relation to an event whose counterpart lives in a room target replaced (room upgrades), that old room: edits,
// reactions and redactions must be in the room of their target.
func (b *Bridge) homeFor(ctx context.Context, evt *event.Event, target id.RoomID, link *database.Link) (id.RoomID, error) {
	preds := link.Predecessors(target)
	if len(preds) == 0 {
		return target, nil
	}
	related := relationTarget(evt)
	if related == "" {
		return target, nil
	}
	if _, ok, err := b.DB.EventMap.Counterpart(ctx, related, target); err != nil || ok {
		return target, err
	}
	for _, p := range preds {
		if _, ok, err := b.DB.EventMap.Counterpart(ctx, related, p); err != nil {
			return target, err
		} else if ok {
			return p, nil
		}
	}
	return target, nil
}

// CopyInPredecessor finds an event's counterpart in the rooms the mapper's target room replaced (PredecessorMapper).
func (m *linkMapper) CopyInPredecessor(ctx context.Context, evt id.EventID) (*id.MatrixURI, error) {
	for _, p := range m.predecessors {
		if c, ok, err := m.b.DB.EventMap.Counterpart(ctx, evt, p); err != nil {
			return nil, err
		} else if ok {
			return p.EventURI(c, m.b.AS.HomeserverDomain), nil
		}
	}
	return nil, nil
}

// mayPost tells whether user may send an event of type t into room, by the room's power levels as ferry knows
// them (an encrypted room's events are sent as m.room.encrypted). When they cannot be read it answers yes: the
// homeserver decides.
func (b *Bridge) mayPost(ctx context.Context, room id.RoomID, user id.UserID, t event.Type) bool {
	pl, err := b.powerLevels(ctx, room)
	if err != nil {
		return true
	}
	if t != event.EventRedaction {
		if enc, err := b.isEncrypted(ctx, room); err == nil && enc {
			t = event.EventEncrypted
		}
	}
	if pl.CreateEvent == nil {
		pl.CreateEvent = b.createEvent(ctx, room)
	}
	t.Class = event.MessageEventType
	return pl.GetUserLevel(user) >= pl.GetEventLevel(t)
}

// Texts of relations restated in the room that replaced the room of their target.
const (
	editedElsewhereText  = "Edited a message from before this room was upgraded"
	reactedElsewhereText = "a message from before this room was upgraded"
)

// restateInSuccessor turns a translated relation to an event in an old room (content as Translate made it for
// that room) into a message for the room that replaced it, for when ferry's ghost may not post in the old room:
// homeservers mute a room when it is upgraded (Synapse and Dendrite raise the level needed to send to 50). An edit
// becomes its new text under a link to the edited message; a reaction becomes an emote naming its key, linking to
// the message. Other relations (poll responses and ends) do not cross: ErrRelationTargetUnknown.
func restateInSuccessor(evtType event.Type, content *event.Content, oldRoom id.RoomID, via string) (event.Type, *event.Content, error) {
	raw := content.Raw
	relType, target := relatesTo(raw)
	if !strings.HasPrefix(string(target), "$") {
		return evtType, nil, fmt.Errorf("%w: restating %s", ErrRelationTargetUnknown, evtType.Type)
	}
	url := oldRoom.EventURI(target, via).MatrixToURL()
	link := `<a href="` + htmlEscaper.Replace(url) + `">`
	out := map[string]any{OriginKey: raw[OriginKey]}
	if trust, ok := raw[SenderTrustKey]; ok {
		out[SenderTrustKey] = trust
	}
	switch {
	case evtType == event.EventReaction && relType == string(event.RelAnnotation):
		key, _ := raw["m.relates_to"].(map[string]any)["key"].(string)
		out[keyMsgType] = string(event.MsgEmote)
		out[keyBody] = "reacted " + key + " to " + reactedElsewhereText + ": " + url
		out[keyFormat] = string(event.FormatHTML)
		out[keyFormattedBody] = "reacted " + htmlEscaper.Replace(key) + " to " + link + reactedElsewhereText + "</a>"
		out[keyMentions] = map[string]any{}
	case evtType == event.EventMessage && relType == string(event.RelReplace):
		newContent, ok := raw[keyNewContent].(map[string]any)
		if !ok {
			return evtType, nil, fmt.Errorf("%w: an edit without new content", ErrNotRelayable)
		}
		for k, v := range newContent {
			out[k] = v
		}
		body, _ := out[keyBody].(string)
		html, hasHTML := out[keyFormattedBody].(string)
		if format, _ := out[keyFormat].(string); format != string(event.FormatHTML) || !hasHTML {
			html = strings.ReplaceAll(htmlEscaper.Replace(body), "\n", "<br>")
		}
		out[keyBody] = "✏️ " + editedElsewhereText + ": " + url + "\n\n" + body
		out[keyFormat] = string(event.FormatHTML)
		out[keyFormattedBody] = "<blockquote>✏️ " + link + editedElsewhereText + "</a></blockquote>" + html
	default:
		return evtType, nil, fmt.Errorf("%w: restating %s", ErrRelationTargetUnknown, evtType.Type)
	}
	data, err := json.Marshal(out)
	if err != nil {
		return evtType, nil, err
	}
	return event.EventMessage, &event.Content{VeryRaw: data, Raw: out}, nil
}

// relatesTo returns a content's relation type and target.
func relatesTo(content map[string]any) (string, id.EventID) {
	rel, _ := content[keyRelatesTo].(map[string]any)
	relType, _ := rel[keyRelType].(string)
	target, _ := rel[keyEventID].(string)
	return relType, id.EventID(target)
}
