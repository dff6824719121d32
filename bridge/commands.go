package bridge

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"slices"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
)

// Bot commands. A message is a command when it starts with bridge.command_prefix, or, in a management room (a
// room whose only joined or invited members are the sender and the bot, and which is not linked), when it is any
// text at all. The sender's permission level and the room decide which commands run; every command is answered
// with an m.notice reply, and every refusal says why.

// maxEchoedName caps how much of an unknown command name a refusal repeats back.
const maxEchoedName = 40

// CommandEvent is one bot command being handled.
type CommandEvent struct {
	Ctx     context.Context
	Bridge  *Bridge
	Event   *event.Event
	RoomID  id.RoomID
	Sender  id.UserID
	Level   Level
	Room    RoomContext
	Command string
	Args    []string

	replies int // replies sent so far; each gets its own deterministic transaction ID
}

// Reply answers the command with an m.notice reply. format uses ferry's notice markup (see renderNotice); args
// are inserted as text.
func (ce *CommandEvent) Reply(format string, args ...any) {
	ce.reply(renderNotice(format, args...))
}

// reply sends a rendered notice as a reply to the command. Its transaction ID derives from the command's event
// ID, so a command handled again after a crash is not answered twice.
func (ce *CommandEvent) reply(n noticeText) {
	if ce.replies == 0 && !ce.Bridge.mayNotice(ce.Ctx, ce.RoomID, ce.Sender, noticeReply) {
		ce.replies = -1 // this command's answers are not sent at all: a user flooding commands (bounded.go)
	}
	if ce.replies < 0 {
		return
	}
	txnID := "ferry_reply_" + TxnID(ce.Event.ID, ce.RoomID)
	if ce.replies > 0 {
		txnID += fmt.Sprintf("_%d", ce.replies)
	}
	ce.replies++
	if _, err := ce.Bridge.sendRenderedNotice(ce.Ctx, ce.RoomID, n, ce.Event.ID, txnID); err != nil {
		zerolog.Ctx(ce.Ctx).Err(err).Msg("Failed to reply to command")
	}
}

// announce posts n in each of rooms, the other rooms of the command's link. Its transaction ID derives from the
// command and the room (kind tells announcements of one command apart), so a command handled again after a
// crash announces once. A failure is logged: the command itself succeeded.
func (ce *CommandEvent) announce(rooms []id.RoomID, kind string, n noticeText) {
	for _, r := range rooms {
		if _, err := ce.Bridge.sendRenderedNotice(ce.Ctx, r, n, "", "ferry_"+kind+"_"+TxnID(ce.Event.ID, r)); err != nil {
			zerolog.Ctx(ce.Ctx).Warn().Err(err).Stringer("target_room_id", r).Str("announcement", kind).Msg("Failed to post an announcement")
		}
	}
}

// cmd renders a command line as the sender would type it here: without the prefix in a management room.
func (ce *CommandEvent) cmd(line string) string {
	return commandLine(ce.Bridge.Config.CommandPrefix, ce.Room.Management, line)
}

// commandLine renders a command line with the prefix, or without it in a management room.
func commandLine(prefix string, management bool, line string) string {
	if management || prefix == "" {
		return line
	}
	return prefix + " " + line
}

// RoomContext is what command dispatch knows about the room a command was sent in.
type RoomContext struct {
	// Management: the room's only joined or invited members are the sender and the bot, and it is not linked.
	// Commands need no prefix there.
	Management bool
	// Linked: the room belongs to a link.
	Linked bool
	// Encrypted: the room is encrypted.
	Encrypted bool
}

// roomNeeds says where a command may run.
type roomNeeds uint8

const (
	needLinked     roomNeeds = 1 << iota // the room must belong to a link
	needManagement                       // the room must be a management room
	needEncrypted                        // the room must be encrypted
)

// unmet explains why a command with these needs cannot run in room, or returns "".
func (n roomNeeds) unmet(room RoomContext) string {
	switch {
	case n&needLinked != 0 && !room.Linked:
		return "works only in a linked room, and this room is not linked"
	case n&needManagement != 0 && !room.Management:
		return "works only in a management room (a direct chat between you and me)"
	case n&needEncrypted != 0 && !room.Encrypted:
		return "works only in an encrypted room"
	}
	return ""
}

// commandGroup is what a command is for: help lists the commands by group, in this order.
type commandGroup uint8

const (
	groupLinking commandGroup = iota // linking rooms and answering requests
	groupLink                        // how this room's link behaves
	groupAbout                       // ferry itself
	groupAdmin                       // ferry's admins
)

// title is the group's heading in help.
func (g commandGroup) title() string {
	switch g {
	case groupLinking:
		return "Linking rooms"
	case groupLink:
		return "This room's link"
	case groupAbout:
		return "About ferry"
	}
	return "For ferry's admins"
}

// commandHandler describes one bot command.
type commandHandler struct {
	Name     string
	Aliases  []string // other names that run it
	Group    commandGroup
	MinLevel Level
	Needs    roomNeeds
	Usage    string // arguments, e.g. "<room>" (see helpLegend)
	MinArgs  int
	MaxArgs  int    // -1: unlimited
	Help     string // one line, in words a member understands
	Example  string // arguments of an example, e.g. "#team:example.org"
	Func     func(ce *CommandEvent)
}

// helpLegend explains the argument placeholders of usage lines.
var helpLegend = []string{
	"`<…>`: fill in; `[…]`: optional",
	"`<room>`: a room ID (!…), an alias (#…) or a matrix.to link",
	"`<request>`: the ID a request notice shows, e.g. 3f9a2c",
	"`<time>`: 5s to 24h, e.g. 90s, 10m, 1h30m",
}

// line is the command's usage line without prefix, e.g. "link <room> [room]".
func (h *commandHandler) line() string {
	if h.Usage == "" {
		return h.Name
	}
	return h.Name + " " + h.Usage
}

// commandTable lists every command. It is filled in init because the help command reads it.
var commandTable []*commandHandler

func init() {
	commandTable = []*commandHandler{
		{Name: "link", Aliases: []string{"connect"}, Group: groupLinking, MinLevel: LevelUser, Usage: "<room> [room]", MinArgs: 1, MaxArgs: 2, Example: "#team:example.org",
			Help: "Link this room with another room I am in; in a chat with me alone, link two rooms. Where your power does not count, someone there accepts.", Func: cmdLink},
		{Name: "accept", Aliases: []string{"approve"}, Group: groupLinking, MinLevel: LevelUser, Usage: "[request]", MaxArgs: 1, Example: "3f9a2c",
			Help: "Agree, for this room, to a request waiting here (a link, a disappearing timer); without an ID, the only one, or a list.", Func: cmdAccept},
		{Name: "reject", Aliases: []string{"deny", "decline", "refuse"}, Group: groupLinking, MinLevel: LevelUser, Usage: "[request]", MaxArgs: 1, Example: "3f9a2c",
			Help: "Refuse a request waiting for this room's agreement; nothing changes.", Func: cmdReject},
		{Name: "unlink", Aliases: []string{"disconnect"}, Group: groupLinking, MinLevel: LevelUser, Needs: needLinked,
			Help: "Take this room out of its link: messages stop crossing.", Func: cmdUnlink},
		{Name: "links", Aliases: []string{"list"}, Group: groupLinking, MinLevel: LevelUser, Usage: "[all]", MaxArgs: 1,
			Help: "Show this room's link: its rooms, their encryption and what crossed (admins: all links).", Func: cmdLinks},
		{Name: "status", Aliases: []string{"health"}, Group: groupLink, MinLevel: LevelUser,
			Help: "Show how this room's link is doing: when messages last crossed, failures, messages waiting for their keys.", Func: cmdStatus},
		{Name: "disappear", Aliases: []string{"timer"}, Group: groupLink, MinLevel: LevelUser, Needs: needLinked, Usage: "[<time>|off]", MaxArgs: 1, Example: "10m",
			Help: "Show or set disappearing messages for the link: new messages then disappear after that time, everywhere.", Func: cmdDisappear},
		{Name: "encryption", Group: groupLink, MinLevel: LevelUser, Usage: "[require|optional]", MaxArgs: 1, Example: "require",
			Help: "Show whose rooms are encrypted; room admins can require encryption for the whole link.", Func: cmdEncryption},
		{Name: "help", Aliases: []string{"commands"}, Group: groupAbout, MinLevel: LevelUser, Usage: "[command]", MaxArgs: 1, Example: "link",
			Help: "List the commands you may use here, or show how to use one.", Func: cmdHelp},
		{Name: "devices", Group: groupAbout, MinLevel: LevelUser,
			Help: "Show ferry's devices, whether they are verified, and which devices get the keys to its messages.", Func: cmdDevices},
		{Name: "ping", Group: groupAbout, MinLevel: LevelUser,
			Help: "Check that ferry answers, and how fast.", Func: cmdPing},
		{Name: "version", Aliases: []string{"about"}, Group: groupAbout, MinLevel: LevelUser,
			Help: "Show ferry's version.", Func: cmdVersion},
		{Name: "rotate", Group: groupAdmin, MinLevel: LevelAdmin, Needs: needEncrypted,
			Help: "Make ferry start new encryption keys for its messages in this room.", Func: cmdRotate},
		{Name: "recovery-key", Group: groupAdmin, MinLevel: LevelAdmin, Needs: needManagement,
			Help: "Show the recovery key of ferry's identity.", Func: cmdRecoveryKey},
		{Name: "admin-helper", Group: groupAdmin, MinLevel: LevelAdmin, Usage: "[remove]", MaxArgs: 1, Example: "remove",
			Help: "Show ferry's homeserver admin helper account (if any), or remove it for good.", Func: cmdAdminHelper},
		{Name: "reload", Group: groupAdmin, MinLevel: LevelAdmin,
			Help: "Re-read the permissions from the config file without restarting.", Func: cmdReload},
	}
}

// findCommand returns the command with this name or alias, or nil.
func findCommand(table []*commandHandler, name string) *commandHandler {
	for _, h := range table {
		if h.Name == name || slices.Contains(h.Aliases, name) {
			return h
		}
	}
	return nil
}

// suggestCommand returns the command an unknown name most likely meant: one of the commands the sender may run
// here whose name or alias is a typo away (see closeEnough) or starts with the name, else any such command;
// nil when none is close.
func suggestCommand(table []*commandHandler, name string, level Level, room RoomContext) *commandHandler {
	if name == "" || utf8.RuneCountInString(name) > maxEchoedName {
		return nil
	}
	for _, candidates := range [][]*commandHandler{visibleCommands(table, level, room), table} {
		var best *commandHandler
		bestDist := -1
		for _, h := range candidates {
			for _, n := range append([]string{h.Name}, h.Aliases...) {
				d := editDistance(name, n)
				if utf8.RuneCountInString(name) >= 3 && strings.HasPrefix(n, name) {
					d = 0 // "stat" for status
				}
				if closeEnough(name, d) && (bestDist < 0 || d < bestDist) {
					best, bestDist = h, d
				}
			}
		}
		if best != nil {
			return best
		}
	}
	return nil
}

// closeEnough tells whether a name d edits away from a command name is likely a typo of it: one edit for short
// names, two from six characters on.
func closeEnough(name string, d int) bool {
	if utf8.RuneCountInString(name) >= 6 {
		return d <= 2
	}
	return d <= 1
}

// editDistance is the number of single-character insertions, deletions, substitutions and swaps of neighbours
// that turn a into b (optimal string alignment).
func editDistance(a, b string) int {
	ra, rb := []rune(a), []rune(b)
	prev2 := make([]int, len(rb)+1)
	prev := make([]int, len(rb)+1)
	cur := make([]int, len(rb)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(ra); i++ {
		cur[0] = i
		for j := 1; j <= len(rb); j++ {
			cost := 1
			if ra[i-1] == rb[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
			if i > 1 && j > 1 && ra[i-1] == rb[j-2] && ra[i-2] == rb[j-1] {
				cur[j] = min(cur[j], prev2[j-2]+1)
			}
		}
		prev2, prev, cur = prev, cur, prev2
	}
	return prev[len(rb)]
}

// visibleCommands lists the commands a user of this level may run in this room, in table order.
func visibleCommands(table []*commandHandler, level Level, room RoomContext) []*commandHandler {
	var out []*commandHandler
	for _, h := range table {
		if level >= h.MinLevel && h.Needs.unmet(room) == "" {
			out = append(out, h)
		}
	}
	return out
}

// ParseCommand splits a message body into a command name (lower case) and its arguments. The body is addressed
// to ferry when it starts with prefix (in any letter case) followed by whitespace or nothing — a bare prefix
// means help — or, when management is true, when it is not blank. Arguments are separated by whitespace; an
// argument that starts with a quote (" ' “ ‘) runs to the matching closing quote and may contain spaces. ok is
// false when the body is not addressed to ferry.
func ParseCommand(body, prefix string, management bool) (name string, args []string, ok bool) {
	body = strings.TrimSpace(body)
	if rest, found := cutCommandPrefix(body, prefix); found {
		body = rest
	} else if !management || body == "" {
		return "", nil, false
	}
	fields := splitCommandArgs(body)
	if len(fields) == 0 || fields[0] == "" {
		return "help", nil, true
	}
	return strings.ToLower(fields[0]), fields[1:], true
}

// cutCommandPrefix removes prefix and the whitespace after it from body.
func cutCommandPrefix(body, prefix string) (string, bool) {
	if prefix == "" || len(body) < len(prefix) || !strings.EqualFold(body[:len(prefix)], prefix) {
		return "", false
	}
	rest := body[len(prefix):]
	if rest == "" {
		return "", true
	}
	if r, _ := utf8.DecodeRuneInString(rest); !unicode.IsSpace(r) {
		return "", false
	}
	return strings.TrimLeftFunc(rest, unicode.IsSpace), true
}

// commandQuotes maps each opening quote to its closing quote. Typographic quotes are included because phone
// keyboards replace straight quotes with them.
var commandQuotes = map[rune]rune{'"': '"', '\'': '\'', '“': '”', '‘': '’', '«': '»'}

// splitCommandArgs splits on whitespace. A field that starts with an opening quote runs to its closing quote
// (or the end of the text) and may contain whitespace; characters right after the closing quote belong to the
// same field. Quotes inside a field are kept as they are.
func splitCommandArgs(s string) []string {
	var out []string
	for {
		s = strings.TrimLeftFunc(s, unicode.IsSpace)
		if s == "" {
			return out
		}
		var field strings.Builder
		r, size := utf8.DecodeRuneInString(s)
		if closing, quoted := commandQuotes[r]; quoted {
			s = s[size:]
			end := strings.IndexRune(s, closing)
			if end < 0 {
				end = len(s)
				field.WriteString(s)
				s = ""
			} else {
				field.WriteString(s[:end])
				_, closeSize := utf8.DecodeRuneInString(s[end:])
				s = s[end+closeSize:]
			}
		}
		end := strings.IndexFunc(s, unicode.IsSpace)
		if end < 0 {
			end = len(s)
		}
		field.WriteString(s[:end])
		s = s[end:]
		out = append(out, field.String())
	}
}

// commandRequest is everything command dispatch depends on.
type commandRequest struct {
	Body   string
	Prefix string
	Level  Level
	Room   RoomContext
}

// dispatchResult is the decision of dispatchCommand.
type dispatchResult struct {
	// Command: the message is addressed to ferry. When false, the message is not a command (relay it).
	Command bool
	Name    string
	Args    []string
	// Handler runs the command; nil when it is refused (or ignored, when Refusal is empty too).
	Handler *commandHandler
	// Refusal is the reply when Handler is nil.
	Refusal noticeText
}

// dispatchCommand decides what a message means: not a command, a command to run, or a refusal to send. It is
// pure, so permission gating is tested without a homeserver. Blocked users are ignored without an answer (the
// bot does not talk to them at all); everyone else gets a handler or a reply saying why not.
func dispatchCommand(table []*commandHandler, req commandRequest) dispatchResult {
	name, args, ok := ParseCommand(req.Body, req.Prefix, req.Room.Management)
	if !ok {
		return dispatchResult{}
	}
	res := dispatchResult{Command: true, Name: name, Args: args}
	switch {
	case req.Level <= LevelBlock:
		return res
	case req.Level < LevelUser:
		res.Refusal = renderNotice("ferry's commands need permission level `%s`; yours is `%s`.", LevelUser, req.Level)
		return res
	}
	h := findCommand(table, name)
	if h == nil {
		res.Refusal = unknownCommand(table, name, req.Prefix, req.Level, req.Room)
		return res
	}
	if req.Level < h.MinLevel {
		res.Refusal = renderNotice("`%s` needs permission level `%s`; yours is `%s`.", h.Name, h.MinLevel, req.Level)
		return res
	}
	if reason := h.Needs.unmet(req.Room); reason != "" {
		res.Refusal = renderNotice("`%s` %s.", h.Name, reason)
		return res
	}
	if len(args) < h.MinArgs || h.MaxArgs >= 0 && len(args) > h.MaxArgs {
		res.Refusal = usageNotice(req.Prefix, req.Room.Management, h)
		return res
	}
	res.Handler = h
	return res
}

// unknownCommand is the reply to a command name ferry does not know: what it probably meant, and where to look.
func unknownCommand(table []*commandHandler, name, prefix string, level Level, room RoomContext) noticeText {
	help := commandLine(prefix, room.Management, "help")
	if h := suggestCommand(table, name, level, room); h != nil {
		return renderNotice("Unknown command `%s`. Did you mean `%s`? Try `%s` to see the commands you may use here.",
			truncateName(name), commandLine(prefix, room.Management, h.Name), help)
	}
	return renderNotice("Unknown command `%s`. Try `%s` to see the commands you may use here.", truncateName(name), help)
}

// usageNotice is the reply to a command with missing or extra arguments.
func usageNotice(prefix string, management bool, h *commandHandler) noticeText {
	n := renderNotice("Usage: `%s`", commandLine(prefix, management, h.line()))
	// What the usage's placeholders mean (the legend lines of help that name them): a member who got the
	// arguments wrong learns, for example, the allowed range of a time.
	for _, legend := range helpLegend[1:] {
		placeholder, _, _ := strings.Cut(legend, ":")
		if strings.Contains(h.Usage, strings.Trim(placeholder, "`")) {
			n = n.join(renderNotice(legend))
		}
	}
	if h.Example != "" {
		n = n.join(renderNotice("Example: `%s`", commandLine(prefix, management, h.Name+" "+h.Example)))
	}
	return n
}

// truncateName shortens an unknown command name before it is repeated back.
func truncateName(name string) string {
	if utf8.RuneCountInString(name) <= maxEchoedName {
		return name
	}
	runes := []rune(name)
	return string(runes[:maxEchoedName]) + "…"
}

// handleCommand handles a message that may be a bot command. It returns false when the message is not
// addressed to ferry (the caller relays it).
func (b *Bridge) handleCommand(ctx context.Context, evt *event.Event) bool {
	msg := evt.Content.AsMessage()
	// Notices are bot output (never answer them: two bots would loop); edits re-send a command's text.
	if msg.MsgType != event.MsgText || msg.RelatesTo != nil && msg.RelatesTo.Type == event.RelReplace {
		return false
	}
	body := msg.Body
	if msg.RelatesTo.GetReplyTo() != "" {
		if stripped, ok := cutReplyFallbackText(body, msg.FormattedBody != "" && hasPrefixFold(msg.FormattedBody, mxReplyOpen)); ok {
			body = stripped
		}
	}
	prefix := b.Config.CommandPrefix
	req := commandRequest{Body: body, Prefix: prefix, Level: b.Permission(evt.Sender)}
	if _, _, ok := ParseCommand(body, prefix, false); !ok {
		// Only a management room takes commands without the prefix; check it only for such messages.
		if !b.isManagementRoom(ctx, evt.RoomID, evt.Sender) {
			return false
		}
		req.Room.Management = true
	} else {
		req.Room.Management = b.isManagementRoom(ctx, evt.RoomID, evt.Sender)
	}
	if !req.Room.Management {
		_, err := b.DB.Links.GetByRoom(ctx, evt.RoomID)
		req.Room.Linked = err == nil
	}
	req.Room.Encrypted, _ = b.StateStore.IsEncrypted(ctx, evt.RoomID)

	res := dispatchCommand(commandTable, req)
	ce := &CommandEvent{Ctx: ctx, Bridge: b, Event: evt, RoomID: evt.RoomID, Sender: evt.Sender, Level: req.Level,
		Room: req.Room, Command: res.Name, Args: res.Args}
	log := zerolog.Ctx(ctx).With().Stringer("sender", evt.Sender).Stringer("permission_level", req.Level).Logger()
	if res.Handler == nil {
		// The name is logged only for known commands: in a management room any message is a command, and an
		// unknown name may be the first word of a message meant for a person.
		log.Info().Bool("known_command", findCommand(commandTable, res.Name) != nil).Msg("Refusing command")
		if res.Refusal.Plain != "" {
			ce.reply(res.Refusal)
		}
		return true
	}
	log.Info().Str("command", res.Handler.Name).Msg("Handling command")
	defer func() {
		if p := recover(); p != nil {
			log.Error().Str("panic", fmt.Sprint(p)).Bytes("stack", debug.Stack()).Str("command", res.Handler.Name).Msg("Panic while handling command")
			ce.Reply("Something went wrong while handling `%s`; the details are in ferry's log.", res.Handler.Name)
		}
	}()
	res.Handler.Func(ce)
	return true
}

// isManagementRoom tells whether room is a management room for sender: its only joined or invited members are
// the sender and the bot, and it is not linked (a linked room's messages are relayed, not commands).
func (b *Bridge) isManagementRoom(ctx context.Context, room id.RoomID, sender id.UserID) bool {
	// The link lookup is cached; the member list is read only for unlinked rooms.
	if _, err := b.DB.Links.GetByRoom(ctx, room); !errors.Is(err, database.ErrLinkNotFound) {
		return false
	}
	if _, err := b.DB.Links.GetByRetired(ctx, room); !errors.Is(err, database.ErrLinkNotFound) {
		return false // a linked room until it was upgraded: its messages are not commands either
	}
	members, err := b.StateStore.GetRoomJoinedOrInvitedMembers(ctx, room)
	if err != nil || len(members) != 2 {
		return false
	}
	bot := b.AS.BotMXID()
	if sender == bot || !(members[0] == sender && members[1] == bot || members[0] == bot && members[1] == sender) {
		return false
	}
	return true
}

func cmdHelp(ce *CommandEvent) {
	prefix, mgmt := ce.Bridge.Config.CommandPrefix, ce.Room.Management
	if len(ce.Args) == 1 {
		name := strings.ToLower(ce.Args[0])
		h := findCommand(commandTable, name)
		if h == nil {
			ce.reply(unknownCommand(commandTable, name, prefix, ce.Level, ce.Room))
			return
		}
		n := renderNotice("`%s`: %s", commandLine(prefix, mgmt, h.line()), h.Help)
		if h.Example != "" {
			n = n.join(renderNotice("Example: `%s`", commandLine(prefix, mgmt, h.Name+" "+h.Example)))
		}
		if len(h.Aliases) > 0 {
			n = n.join(renderNotice("Also: `%s`", strings.Join(h.Aliases, "`, `")))
		}
		if ce.Level < h.MinLevel {
			n = n.join(renderNotice("It needs permission level `%s`; yours is `%s`.", h.MinLevel, ce.Level))
		} else if reason := h.Needs.unmet(ce.Room); reason != "" {
			n = n.join(renderNotice("It %s.", reason))
		}
		ce.reply(n)
		return
	}
	ce.reply(helpText(prefix, ce.Level, ce.Room))
}

// helpText lists the commands a user of this level may run in this room, by purpose, one line each, with a
// legend of the argument placeholders.
func helpText(prefix string, level Level, room RoomContext) noticeText {
	var n noticeText
	if room.Management {
		n = renderNotice("Commands you may use here (this is a management room, so no `%s` prefix is needed):", prefix)
	} else {
		n = renderNotice("Commands you may use here (permission level `%s`):", level)
	}
	visible := visibleCommands(commandTable, level, room)
	for g := groupLinking; g <= groupAdmin; g++ {
		var lines []*commandHandler
		for _, h := range visible {
			if h.Group == g {
				lines = append(lines, h)
			}
		}
		if len(lines) == 0 {
			continue
		}
		n = n.join(renderNotice("**%s**", g.title()))
		for _, h := range lines {
			n = n.join(renderNotice("- `%s`: %s", commandLine(prefix, room.Management, h.line()), h.Help))
		}
	}
	legend := renderNotice("**Arguments**")
	for _, l := range helpLegend {
		legend = legend.join(renderNotice("- " + l))
	}
	return n.join(legend).join(renderNotice("Details and an example: `%s`", commandLine(prefix, room.Management, "help <command>")))
}
