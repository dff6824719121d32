package bridge

import (
	"context"
	"errors"
	"slices"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
)

// Room state ferry keeps in linked rooms: m.bridge (and its unstable twin uk.half-shot.bridge) describing the
// link, and io.element.functional_members listing the bot, so Element shows the bridge in room settings and
// treats a linked DM as a 1:1 room. ferry works with moderator power (50); where it lacks the power for this
// state, it tells the room once and keeps relaying.

// Protocol section of ferry's m.bridge events.
const (
	bridgeProtocolID   = "ferry"
	bridgeProtocolName = "ferry"
	bridgeStatePrefix  = "im.ferry://" // + link ID: the state key, unique per bridge and link
)

// capabilityRoomState names the power ferry needs to keep m.bridge and io.element.functional_members in a room.
// Capabilities are the unit of lackPower's once-per-room notices.
const capabilityRoomState = "room_state"

// moderatorPower is the power level ferry asks for when it lacks power.
const moderatorPower = 50

// bridgeStateTypes are the state event types ferry writes with bridgeStateKey.
var bridgeStateTypes = []event.Type{event.StateBridge, event.StateHalfShotBridge}

// bridgeStateKey is the state key of ferry's m.bridge events for a link (unique per bridge and link).
func bridgeStateKey(link *database.Link) string { return bridgeStatePrefix + link.ID }

// powerNoticeKey names the kv entry remembering that room was told ferry lacks power for capability.
func powerNoticeKey(room id.RoomID, capability string) string {
	return "power_notice:" + capability + ":" + string(room)
}

// bridgeInfo is the m.bridge content ferry writes into room for link.
func (b *Bridge) bridgeInfo(ctx context.Context, link *database.Link, room id.RoomID) *event.BridgeEventContent {
	return &event.BridgeEventContent{
		BridgeBot: b.AS.BotMXID(),
		Creator:   link.CreatedBy,
		Protocol:  event.BridgeInfoSection{ID: bridgeProtocolID, DisplayName: bridgeProtocolName},
		Channel:   event.BridgeInfoSection{ID: link.ID, DisplayName: b.linkDisplayName(ctx, link, room)},
	}
}

// updateLinkState writes m.bridge (and uk.half-shot.bridge) and io.element.functional_members into every room
// of a link. A room where the bot lacks the power is told once (see lackPower); relaying is not affected.
func (b *Bridge) updateLinkState(ctx context.Context, link *database.Link) {
	bot := b.AS.BotIntent()
	for _, room := range link.Rooms {
		log := zerolog.Ctx(ctx).With().Stringer("room_id", room).Str("link_id", link.ID).Logger()
		if ok, have, need := b.botMaySendState(ctx, room, event.StateBridge); !ok {
			b.lackStatePower(ctx, room, have, need)
			continue
		}
		content := b.bridgeInfo(ctx, link, room)
		failed := false
		for _, t := range bridgeStateTypes {
			if _, err := bot.SendStateEvent(ctx, room, t, bridgeStateKey(link), content); err != nil {
				failed = true
				log.Warn().Err(err).Str("event_type", t.Type).Msg("Failed to set bridge state")
				if errors.Is(err, mautrix.MForbidden) {
					b.lackStatePower(ctx, room, -1, -1)
					break
				}
			}
		}
		if failed {
			continue
		}
		if err := b.setFunctionalMember(ctx, room, true); err != nil {
			log.Warn().Err(err).Msg("Failed to set functional members")
			if errors.Is(err, mautrix.MForbidden) {
				b.lackStatePower(ctx, room, -1, -1)
			}
			continue
		}
		b.powerRestored(ctx, room, capabilityRoomState)
	}
}

// clearLinkState removes ferry's m.bridge state from a room that left a link (same state key, empty content)
// and takes the bot out of its functional members. Failures are logged: the room is no longer linked, so
// nothing is relayed either way.
func (b *Bridge) clearLinkState(ctx context.Context, link *database.Link, room id.RoomID) {
	bot := b.AS.BotIntent()
	log := zerolog.Ctx(ctx).With().Stringer("room_id", room).Str("link_id", link.ID).Logger()
	if ok, _, _ := b.botMaySendState(ctx, room, event.StateBridge); !ok {
		// Without the power ferry could not have written the state either.
		log.Debug().Msg("No power to clear bridge state")
		return
	}
	for _, t := range bridgeStateTypes {
		if _, err := bot.SendStateEvent(ctx, room, t, bridgeStateKey(link), struct{}{}); err != nil {
			log.Warn().Err(err).Str("event_type", t.Type).Msg("Failed to clear bridge state")
		}
	}
	if err := b.setFunctionalMember(ctx, room, false); err != nil {
		log.Warn().Err(err).Msg("Failed to update functional members")
	}
}

// linkLeft updates room state after room left a link: the room's own state is cleared, and the other rooms
// either get updated state (the link lives on) or are cleared too (the link was dissolved).
func (b *Bridge) linkLeft(ctx context.Context, before *database.Link, room id.RoomID) {
	b.clearLinkState(ctx, before, room)
	after, err := b.DB.Links.Get(ctx, before.ID)
	if err == nil {
		b.updateLinkState(ctx, after)
		return
	} else if !errors.Is(err, database.ErrLinkNotFound) {
		zerolog.Ctx(ctx).Warn().Err(err).Str("link_id", before.ID).Msg("Failed to read link after a room left it")
	}
	for _, r := range before.Others(room) {
		b.clearLinkState(ctx, before, r)
	}
}

func (b *Bridge) linkDisplayName(ctx context.Context, link *database.Link, room id.RoomID) string {
	name := ""
	for _, r := range link.Others(room) {
		if name != "" {
			name += ", "
		}
		name += b.roomName(ctx, r)
	}
	return name
}

// setFunctionalMember adds the bot to io.element.functional_members (keeping members already listed), or
// removes it. When the bot was the only member listed, the content becomes empty. Nothing is sent when the
// state already says what it should.
func (b *Bridge) setFunctionalMember(ctx context.Context, room id.RoomID, present bool) error {
	bot := b.AS.BotIntent()
	botID := b.AS.BotMXID()
	var content event.ElementFunctionalMembersContent
	if err := bot.StateEvent(ctx, room, event.StateElementFunctionalMembers, "", &content); err != nil && !errors.Is(err, mautrix.MNotFound) {
		return err
	}
	listed := slices.Contains(content.ServiceMembers, botID)
	if listed == present {
		return nil
	}
	var payload any
	if present {
		content.Add(botID)
		payload = &content
	} else {
		content.ServiceMembers = slices.DeleteFunc(content.ServiceMembers, func(u id.UserID) bool { return u == botID })
		payload = &content
		if len(content.ServiceMembers) == 0 {
			payload = struct{}{}
		}
	}
	_, err := bot.SendStateEvent(ctx, room, event.StateElementFunctionalMembers, "", payload)
	return err
}

// powerLevels returns a room's power levels from the state store, fetching them when the store has none.
func (b *Bridge) powerLevels(ctx context.Context, room id.RoomID) (*event.PowerLevelsEventContent, error) {
	pl, err := b.StateStore.GetPowerLevels(ctx, room)
	if err == nil && pl != nil {
		return pl, nil
	}
	var content event.PowerLevelsEventContent
	if err = b.AS.BotClient().StateEvent(ctx, room, event.StatePowerLevels, "", &content); err != nil {
		return nil, err
	}
	return &content, nil
}

// botMaySendState tells whether the bot's power in room allows sending state of type t, and the levels it has
// and needs. When the power levels cannot be read, it answers yes: the homeserver decides.
func (b *Bridge) botMaySendState(ctx context.Context, room id.RoomID, t event.Type) (ok bool, have, need int) {
	pl, err := b.powerLevels(ctx, room)
	if err != nil {
		return true, 0, 0
	}
	t.Class = event.StateEventType
	have, need = pl.GetUserLevel(b.AS.BotMXID()), pl.GetEventLevel(t)
	return have >= need, have, need
}

// lackStatePower tells room, once, that ferry cannot keep its link state there. have and need are the power
// levels, or negative when unknown (the homeserver refused).
func (b *Bridge) lackStatePower(ctx context.Context, room id.RoomID, have, need int) {
	var levels noticeText
	if need >= 0 {
		levels = renderNotice("That needs power level %d, and I have %d.", need, have)
	} else {
		levels = renderNotice("The homeserver refused it.")
	}
	n := renderNotice("I cannot show this room's link in its settings (`m.bridge` and `io.element.functional_members` state).").
		join(levels).
		join(renderNotice("Messages are relayed all the same. Give me moderator power (%d) to fix this; I will not mention it again.", moderatorPower))
	b.lackPower(ctx, room, capabilityRoomState, n)
}

// lackPower tells a room what ferry cannot do there for lack of power, once per room and capability (a kv
// flag remembers it until powerRestored). Relaying goes on regardless.
func (b *Bridge) lackPower(ctx context.Context, room id.RoomID, capability string, n noticeText) {
	log := zerolog.Ctx(ctx).With().Stringer("room_id", room).Str("capability", capability).Logger()
	key := powerNoticeKey(room, capability)
	if told, err := b.DB.KV.Get(ctx, key); err != nil {
		log.Warn().Err(err).Msg("Failed to read power notice flag")
		return
	} else if told != "" {
		return
	}
	log.Info().Msg("Lacking power in room, telling it once")
	// A random transaction ID: after powerRestored, a later notice must not be deduplicated into this one.
	evtID, err := b.sendRenderedNotice(ctx, room, n, "", "")
	if err != nil {
		log.Warn().Err(err).Msg("Failed to tell the room about missing power")
		return
	}
	if err = b.DB.KV.Set(ctx, key, string(evtID)); err != nil {
		log.Warn().Err(err).Msg("Failed to store power notice flag")
	}
}

// powerRestored forgets a lack-of-power notice once ferry succeeded, so a later loss of power is told again.
func (b *Bridge) powerRestored(ctx context.Context, room id.RoomID, capability string) {
	if err := b.DB.KV.Delete(ctx, powerNoticeKey(room, capability)); err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Stringer("room_id", room).Msg("Failed to clear power notice flag")
	}
}
