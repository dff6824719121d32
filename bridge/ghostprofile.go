package bridge

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/http"
	"time"
	"unicode"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
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
	gen := b.hot.generation(key, intent.UserID)
	// Checked only when the cache has no entry: a member event in target (a kick, a ban) drops the entry.
	facts, err := b.readGhostFacts(ctx, sourceRoom, realUser, intent.UserID, target)
	if err != nil {
		return err
	}
	if err = b.checkModeration(ctx, realUser, intent.UserID, target, facts.realMembership, facts.ghostMembership()); err != nil {
		return err
	}
	realName, realAvatar := realProfileOf(facts.real, realUser)
	if facts.ghostMembership() == event.MembershipJoin {
		if err := b.syncGhostProfileTo(ctx, intent, sourceRoom, realUser, target, realName, realAvatar, facts.ghost); err != nil {
			return err
		}
	} else if err := b.joinGhost(ctx, intent, sourceRoom, realUser, target, realName, realAvatar, facts.profileSet); err != nil {
		return err
	}
	b.hot.setGhostReady(key, intent.UserID, gen)
	return nil
}

// ghostFacts is what bringing a ghost into a target room reads of the stores, in one query (sqlGhostFacts).
type ghostFacts struct {
	realMembership event.Membership          // the real user's in the target (leave when the store has none)
	ghost          *event.MemberEventContent // the ghost's member event in the target; nil when the store has none
	real           *event.MemberEventContent // the real user's in the source room; nil when the store has none
	profileSet     bool                      // ferry set the ghost's global profile (globalProfileKey)
}

// ghostMembership is the ghost's membership in the target as the state store's GetMembership answers it.
func (f ghostFacts) ghostMembership() event.Membership {
	if f.ghost == nil {
		return event.MembershipLeave
	}
	return f.ghost.Membership
}

// sqlGhostFacts reads, each row led by its kind: the members ($2, $3: the real user, the ghost) of the target
// room ($1) with their names and avatars ('t'), the real user's member event in the source room ($4, 's'), and
// the ghost's global profile marker ($5, 'k').
const sqlGhostFacts = `SELECT 't', user_id, CAST(membership AS TEXT), displayname, avatar_url FROM mx_user_profile WHERE room_id=$1 AND user_id IN ($2, $3)
	UNION ALL SELECT 's', user_id, CAST(membership AS TEXT), displayname, avatar_url FROM mx_user_profile WHERE room_id=$4 AND user_id=$2
	UNION ALL SELECT 'k', key, value, NULL, NULL FROM kv_store WHERE key=$5`

// readGhostFacts reads ghostFacts for realUser's ghost in target, with realUser's profile in sourceRoom.
func (b *Bridge) readGhostFacts(ctx context.Context, sourceRoom id.RoomID, realUser, ghost id.UserID, target id.RoomID) (ghostFacts, error) {
	facts := ghostFacts{realMembership: event.MembershipLeave}
	rows, err := b.StateStore.Query(ctx, sqlGhostFacts, target, realUser, ghost, sourceRoom, globalProfileKey(ghost))
	if err != nil {
		return facts, err
	}
	defer rows.Close()
	for rows.Next() {
		var kind, user string
		var membership, name, avatar sql.NullString
		if err = rows.Scan(&kind, &user, &membership, &name, &avatar); err != nil {
			return facts, err
		}
		m := &event.MemberEventContent{Membership: event.Membership(membership.String), Displayname: name.String, AvatarURL: id.ContentURIString(avatar.String)}
		switch kind {
		case "k":
			facts.profileSet = membership.String != ""
		case "s":
			facts.real = m
		default:
			if id.UserID(user) == ghost {
				facts.ghost = m
			}
			if id.UserID(user) == realUser {
				facts.realMembership = m.Membership
			}
		}
	}
	return facts, rows.Err()
}

// joinGhost brings realUser's ghost into target with its per-room name and avatar in the join event itself, so
// members never see the ghost's raw ID join and then change its name. A ghost that joins its first room gets its
// global profile first (the real user's own name and avatar, realName and realAvatar; profileSet when ferry set it
// already): homeservers copy the global profile into every room of the user when it changes, so it is set only
// while the ghost is in no room. The bot invites the ghost when the room does not let it join by itself; once one
// ghost needed that in target, the ghosts after it are invited before they join rather than refused first (see
// Bridge.inviteFirst).
func (b *Bridge) joinGhost(ctx context.Context, intent *appservice.IntentAPI, sourceRoom id.RoomID, realUser id.UserID, target id.RoomID, realName string, realAvatar id.ContentURIString, profileSet bool) error {
	if err := intent.EnsureRegistered(ctx); err != nil {
		return err
	}
	name, avatar := b.renderGhostProfile(ctx, sourceRoom, realUser, realName, realAvatar)
	if !profileSet {
		if err := b.setGlobalProfile(ctx, intent, realName, realAvatar); err != nil {
			return err
		}
	}
	invited := false
	if _, ok := b.inviteFirst.Load(target); ok {
		// If this invite fails (the ghost is already invited, say), the join below tells what holds.
		invited = b.inviteGhost(ctx, target, intent.UserID, name, avatar) == nil
	}
	content := &event.MemberEventContent{Membership: event.MembershipJoin, Displayname: name, AvatarURL: avatar}
	_, err := intent.SendStateEvent(ctx, target, event.StateMember, intent.UserID.String(), content)
	if errors.Is(err, mautrix.MForbidden) && !invited {
		if inviteErr := b.inviteGhost(ctx, target, intent.UserID, name, avatar); inviteErr != nil {
			return fmt.Errorf("failed to invite the ghost: %w", inviteErr)
		}
		b.inviteFirst.Store(target, struct{}{})
		_, err = intent.SendStateEvent(ctx, target, event.StateMember, intent.UserID.String(), content)
	}
	if err != nil {
		return fmt.Errorf("failed to join the ghost: %w", err)
	}
	b.joins.note(intent.UserID, target, time.Now())
	return b.recordOwnMember(ctx, intent, target, content)
}

// inviteGhost has the bot invite ghost into target. The invite carries the ghost's name too (Dendrite leaves it
// out of an ordinary invite). It is sent without the intent's check that the bot is in target: ferry only brings
// ghosts into rooms the bot is in, and a bot removed from target gets the homeserver's refusal either way. The
// state store does not record it (the client's send would): the ghost's join follows at once and is recorded,
// and a ghost found not joined is invited again; its echo is known by what ferry sent (ownInviteEcho).
func (b *Bridge) inviteGhost(ctx context.Context, target id.RoomID, ghost id.UserID, name string, avatar id.ContentURIString) error {
	invite := &event.MemberEventContent{Membership: event.MembershipInvite, Displayname: name, AvatarURL: avatar}
	bot := b.AS.BotClient()
	url := bot.BuildClientURL("v3", "rooms", target, "state", event.StateMember.String(), ghost.String())
	if _, err := bot.MakeRequest(ctx, http.MethodPut, url, invite, nil); err != nil {
		return err
	}
	b.hot.noteSent(target, ghost, invite)
	return nil
}

// recordOwnMember puts the member event a ghost just sent in target into the state store, unless the ghost's
// client did that itself (mautrix's client records the state events it sends when it has a state store: the
// appservice gives every intent the bridge's), and notes it for its echo (ownJoinEcho).
func (b *Bridge) recordOwnMember(ctx context.Context, intent *appservice.IntentAPI, target id.RoomID, content *event.MemberEventContent) error {
	if intent.Client.StateStore == nil {
		if err := b.StateStore.SetMember(ctx, target, intent.UserID, content); err != nil {
			return err
		}
	}
	b.hot.noteSent(target, intent.UserID, content)
	return nil
}

// syncGhostProfile sends the ghost's m.room.member event in target when its name or avatar is out of date.
func (b *Bridge) syncGhostProfile(ctx context.Context, intent *appservice.IntentAPI, sourceRoom id.RoomID, realUser id.UserID, target id.RoomID) error {
	realName, realAvatar := b.realProfile(ctx, sourceRoom, realUser)
	current, err := b.StateStore.TryGetMember(ctx, target, intent.UserID)
	if err != nil {
		return err
	}
	return b.syncGhostProfileTo(ctx, intent, sourceRoom, realUser, target, realName, realAvatar, current)
}

// syncGhostProfileTo is syncGhostProfile with realUser's own name and avatar (realProfile's) and the ghost's
// member event in target as the store holds it (current; nil: none) already read.
func (b *Bridge) syncGhostProfileTo(ctx context.Context, intent *appservice.IntentAPI, sourceRoom id.RoomID, realUser id.UserID, target id.RoomID, realName string, realAvatar id.ContentURIString, current *event.MemberEventContent) error {
	wantName, wantAvatar := b.renderGhostProfile(ctx, sourceRoom, realUser, realName, realAvatar)
	if current != nil && current.Displayname == wantName && current.AvatarURL == wantAvatar {
		return nil
	}
	content := &event.MemberEventContent{Membership: event.MembershipJoin, Displayname: wantName, AvatarURL: wantAvatar}
	if _, err := intent.SendStateEvent(ctx, target, event.StateMember, intent.UserID.String(), content); err != nil {
		return err
	}
	return b.recordOwnMember(ctx, intent, target, content)
}

// globalProfileKey marks (in the kv table) a ghost whose global profile ferry has set.
func globalProfileKey(ghost id.UserID) string { return "ghost_profile:" + string(ghost) }

// setGlobalProfile gives a ghost the real user's name and avatar as its global profile and marks it set. Its caller
// calls it before the ghost's first join and never again (the marker, read with the ghost's facts, says): a
// homeserver copies a changed global profile into every room the user is in, over the per-room names ferry gives
// it there.
func (b *Bridge) setGlobalProfile(ctx context.Context, intent *appservice.IntentAPI, name string, avatar id.ContentURIString) error {
	key := globalProfileKey(intent.UserID)
	if err := intent.Client.SetDisplayName(ctx, name); err != nil {
		return fmt.Errorf("failed to set the ghost's global display name: %w", err)
	}
	if avatar != "" {
		if err := intent.Client.SetAvatarURL(ctx, avatar.ParseOrIgnore()); err != nil {
			return fmt.Errorf("failed to set the ghost's global avatar: %w", err)
		}
	}
	return b.DB.KV.Set(ctx, key, "set")
}

// realProfile is realUser's display name (their localpart when they have none) and avatar in room.
func (b *Bridge) realProfile(ctx context.Context, room id.RoomID, realUser id.UserID) (string, id.ContentURIString) {
	m, _ := b.StateStore.TryGetMember(ctx, room, realUser)
	return realProfileOf(m, realUser)
}

// realProfileOf is realProfile from realUser's member event in the room (nil: none stored).
func realProfileOf(m *event.MemberEventContent, realUser id.UserID) (string, id.ContentURIString) {
	var name string
	var avatar id.ContentURIString
	if m != nil {
		name, avatar = m.Displayname, m.AvatarURL
	}
	if name = cleanName(name, maxNameRunes); name == "" {
		name = realUser.Localpart()
	}
	return name, avatar
}

// ghostProfile renders the per-room display name and avatar of realUser's ghost.
func (b *Bridge) ghostProfile(ctx context.Context, sourceRoom id.RoomID, realUser id.UserID) (string, id.ContentURIString) {
	name, avatar := b.realProfile(ctx, sourceRoom, realUser)
	return b.renderGhostProfile(ctx, sourceRoom, realUser, name, avatar)
}

// renderGhostProfile renders the per-room display name and avatar of realUser's ghost from realUser's own (name,
// avatar: realProfile's).
func (b *Bridge) renderGhostProfile(ctx context.Context, sourceRoom id.RoomID, realUser id.UserID, name string, avatar id.ContentURIString) (string, id.ContentURIString) {
	if b.Config.DisplaynameTmpl == nil {
		return name, avatar
	}
	params := GhostNameParams{DisplayName: name, UserID: realUser.String(), RoomName: cleanName(b.roomName(ctx, sourceRoom), maxRoomNameRunes)}
	var buf bytes.Buffer
	if err := b.Config.DisplaynameTmpl.Execute(&buf, params); err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Msg("Display name template failed")
		return name, avatar
	}
	return cleanName(buf.String(), maxGhostNameRunes), avatar
}

// Name lengths that stay readable in a member list: a display name and a room name are shortened on their own,
// so that a long display name does not push the room name (which tells two ghosts of one user apart) out of
// sight, and the rendered name as a whole is bounded too.
const (
	maxNameRunes      = 48
	maxRoomNameRunes  = 32
	maxGhostNameRunes = 96
)

// cleanName makes a name one readable line: bidi controls are dropped, control characters (line breaks, tabs)
// become spaces, runs of spaces one, and a name longer than max runes ends in an ellipsis.
func cleanName(s string, max int) string {
	var out []rune
	space := false
	for _, r := range s {
		if unicode.Is(unicode.Bidi_Control, r) {
			continue // would reorder the rest of the member list's line
		}
		if unicode.IsControl(r) || unicode.IsSpace(r) {
			space = len(out) > 0
			continue
		}
		if space {
			out = append(out, ' ')
			space = false
		}
		out = append(out, r)
	}
	if len(out) > max {
		out = append(out[:max-1], '…')
	}
	return string(out)
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

// roomRenamed updates, in the other rooms of its link, the ghosts of room's members after the room's name changed:
// the display name template may carry it. Only ghosts already there change (nothing is sent when the name they
// have is still right).
func (b *Bridge) roomRenamed(ctx context.Context, room id.RoomID) {
	if _, err := b.DB.Links.GetByRoom(ctx, room); err != nil || b.Config.DisplaynameTmpl == nil {
		return // not linked: no ghosts of its members anywhere
	}
	members, err := b.StateStore.GetRoomJoinedOrInvitedMembers(ctx, room)
	if err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to list the members of a renamed room")
		return
	}
	for _, member := range members {
		if b.Ghosts.IsOwn(member) || b.Config.isPeer(string(member)) {
			continue
		}
		b.refreshGhostProfile(ctx, room, member)
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
