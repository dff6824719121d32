package bridge

// Moderation is not bypassed through a link. A user banned or kicked from a room is not heard there through
// their ghost: ferry drops the copies and tells them once, in the room they wrote in. A ghost that a moderator
// kicked or banned stays out: ferry does not invite it back on its own (the bot could, with its power). Either
// lifts when a moderator lets the user (or the ghost) back: an invite, or a join after an unban.
//
// Bans are room state (the member's membership). Kicks are not distinguishable from leaving afterwards, so
// ferry records them as it handles member events (removedKey); a kick from before ferry was in the room is not
// known.

import (
	"context"
	"errors"
	"sync"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
)

// errModerated is returned by ensureGhost when the real user or their ghost was removed from the target room by
// a moderator. Callers drop the copy: it is not a failure to retry.
var errModerated = errors.New("removed from the room by a moderator")

// removal is how a moderator removed someone from a room.
type removal string

const (
	removalNone removal = ""
	removalKick removal = "kick"
	removalBan  removal = "ban"
)

// removedPrefix starts every removedKey.
const removedPrefix = "removed:"

// removedKey names the kv entry recording that user was kicked or banned from room.
func removedKey(room id.RoomID, user id.UserID) string {
	return removedPrefix + string(room) + " " + string(user)
}

// removalCache holds every removal entry in memory once read: each ghost's join, and each check of a ghost not yet
// known to be ready in a target room, asks for one (two statements of a new sender's first message each), and a
// removal is rare. noteRemoval writes through it.
type removalCache struct {
	lock sync.Mutex
	// marks holds every removedKey in the store with its removal; nil: not read yet, or forgotten after a write
	// that failed (whether it was stored is unknown).
	marks map[string]removal
	// gen counts writes: a read of the store that overlapped one is used for its answer but not kept.
	gen uint64
}

// get returns the removal recorded under key.
func (r *removalCache) get(ctx context.Context, kv *database.KVQuery, key string) (removal, error) {
	r.lock.Lock()
	if r.marks != nil {
		v := r.marks[key]
		r.lock.Unlock()
		return v, nil
	}
	gen := r.gen
	r.lock.Unlock()
	stored, err := kv.Prefixed(ctx, removedPrefix)
	if err != nil {
		return removalNone, err
	}
	marks := make(map[string]removal, len(stored))
	for k, v := range stored {
		marks[k] = removal(v)
	}
	r.lock.Lock()
	if r.gen == gen {
		r.marks = marks
	}
	r.lock.Unlock()
	return marks[key], nil
}

// set records removal v under key (removalNone deletes it) in the store, then in memory.
func (r *removalCache) set(ctx context.Context, kv *database.KVQuery, key string, v removal) error {
	var err error
	if v == removalNone {
		err = kv.Delete(ctx, key)
	} else {
		err = kv.Set(ctx, key, string(v))
	}
	r.lock.Lock()
	defer r.lock.Unlock()
	r.gen++
	switch {
	case err != nil:
		r.marks = nil
	case r.marks == nil:
	case v == removalNone:
		delete(r.marks, key)
	default:
		r.marks[key] = v
	}
	return err
}

// moderatedNoticeKey names the kv entry recording that user was told their messages do not reach room.
func moderatedNoticeKey(room id.RoomID, user id.UserID) string {
	return "moderated_notice:" + string(room) + " " + string(user)
}

// removalOf classifies a member event: a kick or ban (someone else removed the target), a lift (the target is let
// back: invited, joined, or unbanned), or neither.
func removalOf(sender, target id.UserID, membership event.Membership, prev event.Membership) (r removal, lifted bool) {
	switch membership {
	case event.MembershipBan:
		return removalBan, false
	case event.MembershipLeave:
		if prev == event.MembershipBan {
			return removalNone, true // an unban: the user may come back
		}
		if sender != target && (prev == event.MembershipJoin || prev == event.MembershipInvite || prev == event.MembershipKnock || prev == "") {
			return removalKick, false
		}
		return removalNone, false
	case event.MembershipInvite, event.MembershipJoin:
		return removalNone, true
	}
	return removalNone, false
}

// noteRemoval records kicks and bans as member events are handled, and forgets them when lifted.
func (b *Bridge) noteRemoval(ctx context.Context, evt *event.Event, member *event.MemberEventContent) {
	target := id.UserID(evt.GetStateKey())
	var prev event.Membership
	if evt.Unsigned.PrevContent != nil {
		_ = evt.Unsigned.PrevContent.ParseRaw(event.StateMember)
		if pm, ok := evt.Unsigned.PrevContent.Parsed.(*event.MemberEventContent); ok {
			prev = pm.Membership
		}
	}
	r, lifted := removalOf(evt.Sender, target, member.Membership, prev)
	if r == removalKick && b.Ghosts.IsOwn(evt.Sender) {
		return // ferry's own doing, not a moderator's
	}
	log := zerolog.Ctx(ctx)
	switch {
	case r != removalNone:
		if err := b.removals.set(ctx, b.DB.KV, removedKey(evt.RoomID, target), r); err != nil {
			log.Warn().Err(err).Msg("Failed to record a removal")
		}
	case lifted:
		if v, err := b.removals.get(ctx, b.DB.KV, removedKey(evt.RoomID, target)); err == nil && v != removalNone {
			_ = b.removals.set(ctx, b.DB.KV, removedKey(evt.RoomID, target), removalNone)
			_ = b.DB.KV.Delete(ctx, moderatedNoticeKey(evt.RoomID, target))
		}
	}
}

// removedFrom tells whether user, whose membership in room by the state store is m, is banned from room (its
// state says so) or was kicked from it and not let back.
func (b *Bridge) removedFrom(ctx context.Context, room id.RoomID, user id.UserID, m event.Membership) (removal, error) {
	if m == event.MembershipBan {
		return removalBan, nil
	}
	v, err := b.removals.get(ctx, b.DB.KV, removedKey(room, user))
	if err != nil {
		return removalNone, err
	}
	if v == removalBan {
		// The ban was lifted in state the store already has (the user is not banned any more) but its event
		// has not been handled yet; the state store is the room's current state.
		return removalNone, nil
	}
	return v, nil
}

// checkModeration returns errModerated when realUser or their ghost was removed from target by a moderator, given
// their memberships there as the state store holds them.
func (b *Bridge) checkModeration(ctx context.Context, realUser, ghost id.UserID, target id.RoomID, realMembership, ghostMembership event.Membership) error {
	for _, u := range []struct {
		id id.UserID
		m  event.Membership
	}{{realUser, realMembership}, {ghost, ghostMembership}} {
		if r, err := b.removedFrom(ctx, target, u.id, u.m); err != nil {
			return err
		} else if r != removalNone {
			return errModerated
		}
	}
	return nil
}

// tellModerated tells source room, once per target room and user, that the user's messages do not reach target
// because a moderator removed them (or their ghost) there.
func (b *Bridge) tellModerated(ctx context.Context, source, target id.RoomID, user id.UserID) {
	key := moderatedNoticeKey(target, user)
	if v, err := b.DB.KV.Get(ctx, key); err != nil || v != "" {
		return
	}
	if err := b.DB.KV.Set(ctx, key, string(source)); err != nil {
		return
	}
	zerolog.Ctx(ctx).Info().Stringer("target_room_id", target).Stringer("sender", user).Msg("Not relaying a user removed from the target room")
	n := renderNotice("%s, your messages do not reach **%s**: you (or the one who stands for you there) were removed from it by its moderators. ferry will not say this again.",
		user, b.roomName(ctx, target))
	if _, err := b.sendRenderedNotice(ctx, source, n, "", "ferry_moderated_"+TxnID(id.EventID(key), source)); err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to tell a user their messages are not relayed")
	}
}
