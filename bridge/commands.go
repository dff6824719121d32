package bridge

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
)

// CommandEvent is one bot command being handled.
type CommandEvent struct {
	Ctx     context.Context
	Bridge  *Bridge
	Event   *event.Event
	RoomID  id.RoomID
	Sender  id.UserID
	Level   Level
	Command string
	Args    []string
}

// Reply answers the command with an m.notice reply (Markdown rendered to HTML, plain text body).
func (ce *CommandEvent) Reply(format string, args ...any) {
	text := fmt.Sprintf(format, args...)
	if _, err := ce.Bridge.sendNotice(ce.Ctx, ce.RoomID, text, ce.Event.ID, "ferry_reply_"+TxnID(ce.Event.ID, ce.RoomID)); err != nil {
		zerolog.Ctx(ce.Ctx).Err(err).Msg("Failed to reply to command")
	}
}

// commandHandler describes one bot command.
type commandHandler struct {
	Name     string
	MinLevel Level
	Usage    string // arguments, e.g. "<room ID or alias>"
	Help     string // one line
	Example  string
	Func     func(ce *CommandEvent)
}

func (b *Bridge) commands() []*commandHandler {
	return []*commandHandler{
		{Name: "link", MinLevel: LevelUser, Usage: "<room ID or alias>", Help: "Link this room with another room the bot is in.", Example: "link #team:example.org", Func: cmdLink},
		{Name: "accept", MinLevel: LevelUser, Help: "Accept a pending link request for this room.", Func: cmdAccept},
		{Name: "unlink", MinLevel: LevelUser, Help: "Remove this room from its link.", Func: cmdUnlink},
	}
}

// ParseCommand splits a command message into the command name and its arguments. ok=false when the body is
// not addressed to ferry.
func ParseCommand(body, prefix string) (cmd string, args []string, ok bool) {
	body = strings.TrimSpace(body)
	if body != prefix && !strings.HasPrefix(body, prefix+" ") {
		return "", nil, false
	}
	fields := strings.Fields(body[len(prefix):])
	if len(fields) == 0 {
		return "help", nil, true
	}
	return strings.ToLower(fields[0]), fields[1:], true
}

func (b *Bridge) handleCommand(ctx context.Context, evt *event.Event) {
	msg := evt.Content.AsMessage()
	name, args, ok := ParseCommand(msg.Body, b.Config.CommandPrefix)
	if !ok {
		return
	}
	ce := &CommandEvent{Ctx: ctx, Bridge: b, Event: evt, RoomID: evt.RoomID, Sender: evt.Sender, Level: b.Permission(evt.Sender), Command: name, Args: args}
	zerolog.Ctx(ctx).Info().Str("command", name).Stringer("sender", evt.Sender).Msg("Handling command")
	if ce.Level < LevelUser {
		ce.Reply("You are not allowed to use ferry's commands (your permission level is `%s`; `user` is needed).", ce.Level)
		return
	}
	for _, h := range b.commands() {
		if h.Name != name {
			continue
		}
		if ce.Level < h.MinLevel {
			ce.Reply("`%s` needs permission level `%s`; yours is `%s`.", name, h.MinLevel, ce.Level)
			return
		}
		h.Func(ce)
		return
	}
	ce.Reply("Unknown command `%s`. Try `%s help`.", name, b.Config.CommandPrefix)
}

// hasStatePower tells whether user may change state in room (power level ≥ state_default). Admins of ferry
// always may.
func (b *Bridge) hasStatePower(ctx context.Context, room id.RoomID, user id.UserID) bool {
	if b.Permission(user) >= LevelAdmin {
		return true
	}
	pl, err := b.StateStore.GetPowerLevels(ctx, room)
	if err != nil || pl == nil {
		var content event.PowerLevelsEventContent
		if err = b.AS.BotClient().StateEvent(ctx, room, event.StatePowerLevels, "", &content); err != nil {
			return false
		}
		pl = &content
	}
	return pl.GetUserLevel(user) >= pl.StateDefault()
}

func (b *Bridge) resolveRoom(ctx context.Context, arg string) (id.RoomID, error) {
	switch {
	case strings.HasPrefix(arg, "!"):
		return id.RoomID(arg), nil
	case strings.HasPrefix(arg, "#"):
		resp, err := b.AS.BotClient().ResolveAlias(ctx, id.RoomAlias(arg))
		if err != nil {
			return "", fmt.Errorf("could not resolve %s", arg)
		}
		return resp.RoomID, nil
	}
	return "", fmt.Errorf("%q is not a room ID (!…) or alias (#…)", arg)
}

func newLinkID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func cmdLink(ce *CommandEvent) {
	b, ctx := ce.Bridge, ce.Ctx
	if len(ce.Args) != 1 {
		ce.Reply("Usage: `%s link <room ID or alias>`", b.Config.CommandPrefix)
		return
	}
	target, err := b.resolveRoom(ctx, ce.Args[0])
	if err != nil {
		ce.Reply("Cannot link: %s.", err)
		return
	}
	if target == ce.RoomID {
		ce.Reply("Cannot link a room to itself.")
		return
	}
	if !b.StateStore.IsInRoom(ctx, target, b.AS.BotMXID()) {
		ce.Reply("Cannot link: I am not in %s. Invite me there first.", ce.Args[0])
		return
	}
	if !b.hasStatePower(ctx, ce.RoomID, ce.Sender) {
		ce.Reply("Cannot link: you need the power to change room settings here (power level ≥ state_default).")
		return
	}
	if existing, err := b.DB.Links.GetByRoom(ctx, target); err == nil {
		if current, _ := b.DB.Links.GetByRoom(ctx, ce.RoomID); current != nil && current.ID == existing.ID {
			ce.Reply("This room is already linked with %s.", ce.Args[0])
		} else {
			ce.Reply("Cannot link: %s already belongs to another link. Unlink it there first.", ce.Args[0])
		}
		return
	}
	if reason := b.encryptionMismatch(ctx, ce.RoomID, target); reason != "" {
		ce.Reply("Cannot link: %s", reason)
		return
	}
	if !b.hasStatePower(ctx, target, ce.Sender) {
		req := &database.LinkRequest{RoomID: target, FromRoom: ce.RoomID, RequestedBy: ce.Sender, CreatedAt: time.Now()}
		if err = b.DB.Links.PutRequest(ctx, req); err != nil {
			ce.Reply("Failed to store the link request.")
			return
		}
		text := fmt.Sprintf("%s asks to link this room with **%s**. Someone who may change room settings here can accept with `%s accept`.",
			ce.Sender, b.roomName(ctx, ce.RoomID), b.Config.CommandPrefix)
		if _, err = b.sendNotice(ctx, target, text, "", "ferry_linkreq_"+TxnID(ce.Event.ID, target)); err != nil {
			ce.Reply("Failed to post the link request in %s.", ce.Args[0])
			return
		}
		ce.Reply("You lack the power to change room settings in %s, so I posted a link request there. Someone with power there can accept it with `%s accept`.", ce.Args[0], b.Config.CommandPrefix)
		return
	}
	b.completeLink(ce, ce.RoomID, target)
}

func cmdAccept(ce *CommandEvent) {
	b, ctx := ce.Bridge, ce.Ctx
	if !b.hasStatePower(ctx, ce.RoomID, ce.Sender) {
		ce.Reply("Cannot accept: you need the power to change room settings here (power level ≥ state_default).")
		return
	}
	req, err := b.DB.Links.TakeRequest(ctx, ce.RoomID)
	if err != nil {
		ce.Reply("Failed to read the link request.")
		return
	} else if req == nil {
		ce.Reply("There is no pending link request for this room.")
		return
	}
	if reason := b.encryptionMismatch(ctx, req.FromRoom, ce.RoomID); reason != "" {
		ce.Reply("Cannot link: %s", reason)
		return
	}
	b.completeLink(ce, req.FromRoom, ce.RoomID)
}

func (b *Bridge) completeLink(ce *CommandEvent, from, to id.RoomID) {
	ctx := ce.Ctx
	link, err := b.DB.Links.Join(ctx, newLinkID(), from, to, ce.Sender, time.Now())
	if errors.Is(err, database.ErrRoomAlreadyLinked) {
		ce.Reply("Cannot link: the room already belongs to a link.")
		return
	} else if err != nil {
		zerolog.Ctx(ctx).Err(err).Msg("Failed to store link")
		ce.Reply("Failed to store the link.")
		return
	}
	b.updateLinkState(ctx, link)
	names := make([]string, 0, len(link.Rooms))
	for _, r := range link.Rooms {
		names = append(names, "**"+b.roomName(ctx, r)+"**")
	}
	ce.Reply("Linked: %s. Messages now cross between these rooms.", strings.Join(names, ", "))
	for _, r := range link.Rooms {
		if r != ce.RoomID {
			if _, err = b.sendNotice(ctx, r, fmt.Sprintf("This room is now linked with %s by %s.", strings.Join(names, ", "), ce.Sender), "", "ferry_linked_"+TxnID(ce.Event.ID, r)); err != nil {
				zerolog.Ctx(ctx).Warn().Err(err).Stringer("target_room_id", r).Msg("Failed to announce link")
			}
		}
	}
}

func cmdUnlink(ce *CommandEvent) {
	b, ctx := ce.Bridge, ce.Ctx
	if !b.hasStatePower(ctx, ce.RoomID, ce.Sender) {
		ce.Reply("Cannot unlink: you need the power to change room settings here (power level ≥ state_default).")
		return
	}
	before, err := b.DB.Links.Leave(ctx, ce.RoomID)
	if errors.Is(err, database.ErrLinkNotFound) {
		ce.Reply("This room is not linked.")
		return
	} else if err != nil {
		ce.Reply("Failed to unlink.")
		return
	}
	b.clearLinkState(ctx, before, ce.RoomID)
	if after, err := b.DB.Links.Get(ctx, before.ID); err == nil {
		b.updateLinkState(ctx, after)
	} else {
		for _, r := range before.Others(ce.RoomID) {
			b.clearLinkState(ctx, before, r)
		}
	}
	ce.Reply("Unlinked. Messages no longer cross between this room and the others.")
	for _, r := range before.Others(ce.RoomID) {
		_, _ = b.sendNotice(ctx, r, fmt.Sprintf("%s was unlinked from this room by %s.", b.roomName(ctx, ce.RoomID), ce.Sender), "", "ferry_unlinked_"+TxnID(ce.Event.ID, r))
	}
}

// encryptionMismatch explains why two rooms may not be linked under the encryption policy, or returns "".
func (b *Bridge) encryptionMismatch(ctx context.Context, a, c id.RoomID) string {
	if b.Config.AllowUnencryptedTargets {
		return ""
	}
	encA, _ := b.StateStore.IsEncrypted(ctx, a)
	encC, _ := b.StateStore.IsEncrypted(ctx, c)
	if encA == encC {
		return ""
	}
	plain := a
	if encA {
		plain = c
	}
	return fmt.Sprintf("%s is not encrypted, and ferry does not relay messages from encrypted rooms into unencrypted ones. Enable encryption there first (or an admin sets `bridge.allow_unencrypted_targets`).", b.roomName(ctx, plain))
}
