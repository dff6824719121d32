package bridge

import (
	"context"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
)

// bridgeStateKey is the state key of ferry's m.bridge events for a link (unique per bridge and link).
func bridgeStateKey(link *database.Link) string { return "im.ferry://" + link.ID }

// updateLinkState writes m.bridge (and uk.half-shot.bridge) and io.element.functional_members into every room
// of a link, so Element shows the bridge in room settings and does not count the bot as a member.
func (b *Bridge) updateLinkState(ctx context.Context, link *database.Link) {
	bot := b.AS.BotIntent()
	for _, room := range link.Rooms {
		content := &event.BridgeEventContent{
			BridgeBot: b.AS.BotMXID(),
			Creator:   link.CreatedBy,
			Protocol:  event.BridgeInfoSection{ID: "ferry", DisplayName: "ferry"},
			Channel:   event.BridgeInfoSection{ID: link.ID, DisplayName: b.linkDisplayName(ctx, link, room)},
		}
		for _, t := range []event.Type{event.StateBridge, event.StateHalfShotBridge} {
			if _, err := bot.SendStateEvent(ctx, room, t, bridgeStateKey(link), content); err != nil {
				zerolog.Ctx(ctx).Warn().Err(err).Stringer("room_id", room).Str("type", t.Type).Msg("Failed to set bridge state")
			}
		}
		b.ensureFunctionalMember(ctx, room)
	}
}

// clearLinkState removes ferry's m.bridge state from a room that left a link.
func (b *Bridge) clearLinkState(ctx context.Context, link *database.Link, room id.RoomID) {
	bot := b.AS.BotIntent()
	for _, t := range []event.Type{event.StateBridge, event.StateHalfShotBridge} {
		if _, err := bot.SendStateEvent(ctx, room, t, bridgeStateKey(link), struct{}{}); err != nil {
			zerolog.Ctx(ctx).Warn().Err(err).Stringer("room_id", room).Msg("Failed to clear bridge state")
		}
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

// ensureFunctionalMember lists the bot in io.element.functional_members, keeping members already listed.
func (b *Bridge) ensureFunctionalMember(ctx context.Context, room id.RoomID) {
	bot := b.AS.BotIntent()
	var content event.ElementFunctionalMembersContent
	_ = bot.StateEvent(ctx, room, event.StateElementFunctionalMembers, "", &content)
	for _, m := range content.ServiceMembers {
		if m == b.AS.BotMXID() {
			return
		}
	}
	content.Add(b.AS.BotMXID())
	if _, err := bot.SendStateEvent(ctx, room, event.StateElementFunctionalMembers, "", &content); err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Stringer("room_id", room).Msg("Failed to set functional members")
	}
}
