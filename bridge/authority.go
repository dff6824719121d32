package bridge

// The link boundary. ferry acts in one room because of what happened in another, so every crossing needs the
// authority the homeserver would have demanded had the actor been in the room acted on:
//   - Only what the homeserver authorised acts. A decrypted event is content, never control: an encrypted event
//     whose cleartext type is a redaction or a state type is dropped (isControlType). A real redaction crosses
//     only when its sender sent the original or holds the redact power in the source room when ferry handles it
//     (redactionCrosses): servers accept redaction events that they then do not apply.
//   - Power counts only with membership. Power levels outlive leaving, kicks and bans, so a command that acts on a
//     room needs its sender joined there now, as the homeserver answers when ferry asks, and the power
//     (judgeStanding). ferry admins (permission level admin) hold the power everywhere, but they too must be
//     joined to the room they send a command in.

import (
	"context"
	"errors"
	"fmt"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// right is a power in a room that a command needs.
type right uint8

const (
	// rightMember: membership alone (commands ferry admins run on the room they are in, e.g. rotate).
	rightMember right = iota
	// rightSettings: the power to change room settings (power level ≥ state_default): link, accept, reject,
	// unlink, disappear.
	rightSettings
	// rightRoomAdmin: the power to change power levels: the link's encryption policy.
	rightRoomAdmin
)

// describe says in words what the right allows, for refusals.
func (r right) describe() string {
	switch r {
	case rightSettings:
		return "change room settings"
	case rightRoomAdmin:
		return "change power levels"
	}
	return "be there"
}

// needFrom returns the power level the right needs in a room with these power levels.
func (r right) needFrom(pl *event.PowerLevelsEventContent) int {
	switch r {
	case rightSettings:
		return pl.StateDefault()
	case rightRoomAdmin:
		return pl.GetEventLevel(event.StatePowerLevels)
	}
	return 0
}

// standing is what the homeserver says about one user in one room, now.
type standing struct {
	Membership event.Membership // "" when the user never had a membership there
	Level      int              // the user's power level
	Need       int              // the level the right needs
}

// denial is why judgeStanding refused; denyNone means allowed.
type denial uint8

const (
	denyNone      denial = iota
	denyNotJoined        // not joined now: stale power counts for nothing
	denyPower            // joined, without the power
)

// judgeStanding is the rule for a command acting on a room. Everyone must be joined to the room the command was
// sent in (here) when ferry handles it. In any room, a ferry admin may act; anyone else must be joined now and
// hold the power: a user who left, was kicked or banned, or is only invited keeps no power, whatever the power
// levels still list.
func judgeStanding(level Level, here bool, s standing) denial {
	joined := s.Membership == event.MembershipJoin
	switch {
	case here && !joined:
		return denyNotJoined
	case level >= LevelAdmin:
		return denyNone
	case !joined:
		return denyNotJoined
	case s.Level < s.Need:
		return denyPower
	}
	return denyNone
}

// errStandingUnknown is returned by standingOf when the homeserver could not say what a user is in a room.
// Callers refuse the command (failing closed) and say so.
var errStandingUnknown = errors.New("could not read the room's membership and power levels")

// standingOf asks the homeserver (not ferry's state store, which a room's worker may not have caught up with)
// for user's membership in room and the power right needs there.
func (b *Bridge) standingOf(ctx context.Context, room id.RoomID, user id.UserID, r right) (standing, error) {
	cli := b.AS.BotClient()
	var s standing
	var member event.MemberEventContent
	if err := cli.StateEvent(ctx, room, event.StateMember, string(user), &member); err == nil {
		s.Membership = member.Membership
	} else if !errors.Is(err, mautrix.MNotFound) {
		zerolog.Ctx(ctx).Warn().Err(err).Stringer("target_room_id", room).Msg("Failed to read a member's state for a permission check")
		return s, errStandingUnknown
	}
	var pl event.PowerLevelsEventContent
	if err := cli.StateEvent(ctx, room, event.StatePowerLevels, "", &pl); err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Stringer("target_room_id", room).Msg("Failed to read power levels for a permission check")
		return s, errStandingUnknown
	}
	pl.CreateEvent = b.createEvent(ctx, room) // room v12: creators hold unlimited power without a users entry
	s.Level, s.Need = pl.GetUserLevel(user), r.needFrom(&pl)
	return s, nil
}

// createEvent returns a room's m.room.create event from the state store, fetching (and storing) it when the store
// has none; nil when it cannot be read. Power levels need it to know a room v12's creators.
func (b *Bridge) createEvent(ctx context.Context, room id.RoomID) *event.Event {
	if create, err := b.StateStore.GetCreate(ctx, room); err == nil && create != nil {
		return create
	}
	create, err := b.AS.BotClient().FullStateEvent(ctx, room, event.StateCreate, "")
	if err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Stringer("target_room_id", room).Msg("Failed to read the room's create event")
		return nil
	}
	create.RoomID = room
	_ = create.Content.ParseRaw(event.StateCreate)
	if err = b.StateStore.SetCreate(ctx, create); err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to store the room's create event")
	}
	return create
}

// authority is the outcome of one permission check of a command.
type authority struct {
	ok      bool
	unknown bool // the homeserver could not be asked: refused, failing closed
	denial  denial
	room    string // the room's name, for the refusal
	here    bool   // the room is the command's own room
	right   right
	s       standing
}

// authorize checks whether the command's sender may act on room with right (see judgeStanding).
func (ce *CommandEvent) authorize(room id.RoomID, r right) authority {
	return ce.Bridge.checkAuthority(ce.Ctx, ce.Sender, room, r, room == ce.RoomID)
}

// checkAuthority checks whether user may act on room with right now (see judgeStanding); here: room is where
// the user's command was sent.
func (b *Bridge) checkAuthority(ctx context.Context, user id.UserID, room id.RoomID, r right, here bool) authority {
	a := authority{here: here, right: r}
	s, err := b.standingOf(ctx, room, user, r)
	if err != nil {
		a.unknown, a.room = true, b.roomName(ctx, room)
		return a
	}
	a.s, a.denial = s, judgeStanding(b.Permission(user), here, s)
	a.ok = a.denial == denyNone
	if !a.ok {
		a.room = b.roomName(ctx, room)
		zerolog.Ctx(ctx).Info().Stringer("user_id", user).Stringer("target_room_id", room).Str("membership", string(s.Membership)).
			Int("power_level", s.Level).Int("needed", s.Need).Msg("User lacks authority in a room")
	}
	return a
}

// because renders why a refused check failed, after lead (e.g. "Cannot link"), as one sentence.
func (a authority) because(lead string) noticeText {
	switch {
	case a.unknown:
		return renderNotice("%s: I could not check your membership and power in **%s**; try again later.", lead, a.room)
	case a.denial == denyNotJoined && a.here:
		return renderNotice("%s: you are not a member of this room any more.", lead)
	case a.denial == denyNotJoined:
		return renderNotice("%s: you are not a member of **%s** now, and power there counts only while you are joined.", lead, a.room)
	case a.here:
		return renderNotice("%s: you need the power to %s here (power level ≥ %d; you have %d).", lead, a.right.describe(), a.s.Need, a.s.Level)
	}
	return renderNotice("%s: you need the power to %s in **%s** (power level ≥ %d; you have %d).", lead, a.right.describe(), a.room, a.s.Need, a.s.Level)
}

// ---- redactions -----------------------------------------------------------------------------------------------

// isControlType tells whether ferry would act on an event of this type beyond relaying its content: a redaction,
// or a type that is room state (membership, power, encryption, ferry's own link and timer state, group call
// membership). Such an event acts only as the homeserver delivered it; inside an encrypted event it is never
// obeyed, because the homeserver authorised nothing.
func isControlType(t event.Type) bool {
	switch t.Type {
	case event.EventRedaction.Type,
		event.StateMember.Type, event.StatePowerLevels.Type, event.StateCreate.Type, event.StateJoinRules.Type,
		event.StateEncryption.Type, event.StateHistoryVisibility.Type, event.StateTombstone.Type,
		event.StateRoomName.Type, event.StateTopic.Type, event.StateRoomAvatar.Type, event.StateCanonicalAlias.Type,
		event.StateServerACL.Type, event.StatePinnedEvents.Type,
		event.StateBridge.Type, event.StateHalfShotBridge.Type, event.StateElementFunctionalMembers.Type,
		event.StateBeeperDisappearingTimer.Type:
		return true
	}
	return isCallMember(t)
}

// redactionCrosses is the rule for a real redaction: it crosses when its sender sent the original, or holds the
// redact power (level ≥ need) in the source room.
func redactionCrosses(sentOriginal bool, level, need int) bool {
	return sentOriginal || level >= need
}

// redactionAuthorised tells whether a real redaction of redacts in the source room may cross. The original's
// sender comes from the event map: a copy of it elsewhere was sent by the ghost of whoever sent it; an event that
// is itself a copy was sent by a ghost, never by the redactor. The power comes from the state store, which the
// source room's worker keeps in the room's order: the power the redactor held when the redaction arrived.
func (b *Bridge) redactionAuthorised(ctx context.Context, evt *event.Event, redacts id.EventID, others []id.RoomID) (bool, error) {
	sentOriginal := false
	if c, err := b.DB.EventMap.ByTarget(ctx, redacts); err != nil {
		return false, err
	} else if c == nil {
		ghost := b.Ghosts.Ghost(evt.Sender)
		for _, target := range others {
			c, err := b.DB.EventMap.Get(ctx, redacts, target)
			if err != nil {
				return false, err
			} else if c != nil {
				sentOriginal = c.Sender == ghost
				break
			}
		}
	}
	if sentOriginal {
		return true, nil
	}
	pl, err := b.powerLevels(ctx, evt.RoomID)
	if err != nil {
		return false, fmt.Errorf("failed to read the source room's power levels: %w", err)
	}
	if pl.CreateEvent == nil {
		pl.CreateEvent = b.createEvent(ctx, evt.RoomID)
	}
	return redactionCrosses(false, pl.GetUserLevel(evt.Sender), pl.Redact()), nil
}

// redactsOf returns the event a redaction redacts: the top-level redacts, or (room version 11 and later) the
// content's.
func redactsOf(evt *event.Event) id.EventID {
	if evt.Redacts != "" {
		return evt.Redacts
	}
	return evt.Content.AsRedaction().Redacts
}
