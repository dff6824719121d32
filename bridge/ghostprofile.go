package bridge

import (
	"bytes"
	"context"
	"errors"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/appservice"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
)

// ensureGhost makes sure the ghost of realUser is in target with the per-room name and avatar derived from
// realUser's profile in sourceRoom.
func (b *Bridge) ensureGhost(ctx context.Context, intent *appservice.IntentAPI, sourceRoom id.RoomID, realUser id.UserID, target id.RoomID) error {
	key := ghostKey{source: sourceRoom, real: realUser, target: target}
	if b.hot.ghostReady(key) {
		return nil
	}
	gen := b.hot.generation()
	// Checked only when the cache has no entry: a member event in target (a kick, a ban) drops the entry.
	if err := b.checkModeration(ctx, realUser, intent.UserID, target); err != nil {
		return err
	}
	if err := intent.EnsureJoined(ctx, target); err != nil {
		return err
	}
	if err := b.syncGhostProfile(ctx, intent, sourceRoom, realUser, target); err != nil {
		return err
	}
	b.hot.setGhostReady(key, gen)
	return nil
}

// syncGhostProfile sends the ghost's m.room.member event in target when its name or avatar is out of date.
func (b *Bridge) syncGhostProfile(ctx context.Context, intent *appservice.IntentAPI, sourceRoom id.RoomID, realUser id.UserID, target id.RoomID) error {
	wantName, wantAvatar := b.ghostProfile(ctx, sourceRoom, realUser)
	current, err := b.StateStore.TryGetMember(ctx, target, intent.UserID)
	if err != nil {
		return err
	}
	if current != nil && current.Displayname == wantName && current.AvatarURL == wantAvatar {
		return nil
	}
	content := &event.MemberEventContent{Membership: event.MembershipJoin, Displayname: wantName, AvatarURL: wantAvatar}
	if _, err = intent.SendStateEvent(ctx, target, event.StateMember, intent.UserID.String(), content); err != nil {
		return err
	}
	return b.StateStore.SetMember(ctx, target, intent.UserID, content)
}

// ghostProfile renders the per-room display name and avatar of realUser's ghost.
func (b *Bridge) ghostProfile(ctx context.Context, sourceRoom id.RoomID, realUser id.UserID) (string, id.ContentURIString) {
	params := GhostNameParams{UserID: realUser.String(), RoomName: b.roomName(ctx, sourceRoom)}
	var avatar id.ContentURIString
	if m, _ := b.StateStore.TryGetMember(ctx, sourceRoom, realUser); m != nil {
		params.DisplayName = m.Displayname
		avatar = m.AvatarURL
	}
	if params.DisplayName == "" {
		params.DisplayName = realUser.Localpart()
	}
	if b.Config.DisplaynameTmpl == nil {
		return params.DisplayName, avatar
	}
	var buf bytes.Buffer
	if err := b.Config.DisplaynameTmpl.Execute(&buf, params); err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Msg("Display name template failed")
		return params.DisplayName, avatar
	}
	return buf.String(), avatar
}

// refreshGhostProfile updates the ghost of a real user in the other rooms of the link after the user changed
// their name or avatar in room.
func (b *Bridge) refreshGhostProfile(ctx context.Context, room id.RoomID, realUser id.UserID) {
	link, err := b.DB.Links.GetByRoom(ctx, room)
	if errors.Is(err, database.ErrLinkNotFound) || err != nil {
		return
	}
	intent := b.AS.Intent(b.Ghosts.Ghost(realUser))
	for _, target := range link.Others(room) {
		if !b.StateStore.IsInRoom(ctx, target, intent.UserID) {
			continue
		}
		if err = b.syncGhostProfile(ctx, intent, room, realUser, target); err != nil {
			zerolog.Ctx(ctx).Warn().Err(err).Stringer("target_room_id", target).Msg("Failed to update ghost profile")
		}
	}
}

// roomName returns a room's name, canonical alias or ID, cached until the name changes.
func (b *Bridge) roomName(ctx context.Context, room id.RoomID) string {
	b.roomNames.lock.Lock()
	name, ok := b.roomNames.names[room]
	b.roomNames.lock.Unlock()
	if ok {
		return name
	}
	bot := b.AS.BotClient()
	var nameContent event.RoomNameEventContent
	if err := bot.StateEvent(ctx, room, event.StateRoomName, "", &nameContent); err == nil && nameContent.Name != "" {
		name = nameContent.Name
	} else {
		var alias event.CanonicalAliasEventContent
		if err = bot.StateEvent(ctx, room, event.StateCanonicalAlias, "", &alias); err == nil && alias.Alias != "" {
			name = alias.Alias.String()
		} else {
			name = room.String()
		}
	}
	b.roomNames.lock.Lock()
	if boundedCacheFull(len(b.roomNames.names)) {
		b.roomNames.names = make(map[id.RoomID]string)
	}
	b.roomNames.names[room] = name
	b.roomNames.lock.Unlock()
	return name
}
