package bridge

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/crypto"
	"go.ferry.im/ferry/database"
)

// DeviceReporter is implemented by E2EE layers that can describe ferry's devices (the devices command).
// *crypto.Machine implements it.
type DeviceReporter interface {
	DeviceSummary(ctx context.Context) (crypto.DeviceSummary, error)
}

// RecoveryKeyProvider is implemented by E2EE layers that hold a recovery key for ferry's cross-signing identity
// (the recovery-key command). RecoveryKey returns "" when cross-signing is not set up yet.
type RecoveryKeyProvider interface {
	RecoveryKey(ctx context.Context) (string, error)
}

// AdminHelperManager is implemented by E2EE layers that may keep a homeserver admin helper account (Dendrite
// without appservice-mode encryption needs one to give ferry's accounts passwords). *crypto.Machine implements it.
type AdminHelperManager interface {
	AdminHelper(ctx context.Context) (crypto.AdminHelperStatus, error)
	RemoveAdminHelper(ctx context.Context) (bool, error)
}

// Limits of list replies, so a large installation does not produce a notice too big to send.
const (
	maxListedLinks = 25
)

// resolveRoom turns a command argument (room ID, alias or matrix.to / matrix: link) into a room ID.
func (b *Bridge) resolveRoom(ctx context.Context, arg string) (id.RoomID, error) {
	if strings.HasPrefix(arg, "https://matrix.to/") || strings.HasPrefix(arg, "matrix:") {
		uri, err := id.ParseMatrixURIOrMatrixToURL(arg)
		if err != nil {
			return "", fmt.Errorf("%q is not a link to a room", arg)
		}
		switch {
		case uri.RoomID() != "":
			return uri.RoomID(), nil
		case uri.RoomAlias() != "":
			arg = uri.RoomAlias().String()
		default:
			return "", fmt.Errorf("%q is not a link to a room", arg)
		}
	}
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
	return "", fmt.Errorf("%q is not a room ID (!…), alias (#…) or matrix.to link", arg)
}

// newLinkID returns a random link ID (lowercase hex, as m.bridge IDs should be).
func newLinkID() string { return randomHex(8) }

func cmdLink(ce *CommandEvent) {
	b, ctx := ce.Bridge, ce.Ctx
	usage := usageNotice(b.Config.CommandPrefix, ce.Room.Management, findCommand(commandTable, "link"))
	from := ce.RoomID
	if len(ce.Args) == 2 {
		// Two rooms, from a management room: neither is the command's room, so the sender's power counts in
		// both only as it does for any room a command acts on (joined there now, with the power).
		if !ce.Room.Management {
			ce.reply(renderNotice("Linking two other rooms works in a chat with me alone (a management room); here, `%s` links this room.", ce.cmd("link <room>")))
			return
		}
		var err error
		if from, err = b.resolveRoom(ctx, ce.Args[0]); err != nil {
			ce.reply(renderNotice("Cannot link: %s.", err).join(usage))
			return
		}
	}
	targetArg := ce.Args[len(ce.Args)-1]
	target, err := b.resolveRoom(ctx, targetArg)
	if err != nil {
		ce.reply(renderNotice("Cannot link: %s.", err).join(usage))
		return
	}
	if target == from {
		ce.Reply("Cannot link a room to itself.")
		return
	}
	for _, r := range []struct {
		room id.RoomID
		arg  string
	}{{from, ce.Args[0]}, {target, targetArg}} {
		if r.room != ce.RoomID && !b.StateStore.IsInRoom(ctx, r.room, b.AS.BotMXID()) {
			ce.Reply("Cannot link: I am not in %s. Invite me there first.", r.arg)
			return
		}
	}
	if from == ce.RoomID {
		if a := ce.authorize(ce.RoomID, rightSettings); !a.ok {
			ce.reply(a.because("Cannot link"))
			return
		}
	}
	// A room joins the link of the other room when one of them is linked; two rooms in different links stay
	// apart (a room belongs to at most one link).
	existing, _ := b.DB.Links.GetByRoom(ctx, target)
	current, _ := b.DB.Links.GetByRoom(ctx, from)
	if existing != nil && current != nil {
		if current.ID == existing.ID {
			ce.Reply("%s is already linked with %s.", b.roomName(ctx, from), targetArg)
		} else {
			ce.Reply("Cannot link: %s and %s belong to different links. Unlink one of them first.", b.roomName(ctx, from), targetArg)
		}
		return
	}
	if reason, refused := b.linkRefusal(ctx, from, target, existing, current); refused {
		ce.reply(renderNotice("Cannot link:").join(reason))
		return
	}
	// Linking acts on both rooms and on every room of a link either belongs to: each needs consent from someone
	// with power there (consent.go). The sender consents where their own power counts.
	att := ce.requesterConsents(linkScope(from, target, current, existing))
	if att.unknown != nil {
		ce.reply(att.unknown.because("Cannot link"))
		return
	}
	if len(att.waiting) > 0 {
		ce.askConsent(&database.ConsentRequest{Kind: database.ConsentLink, FromRoom: from, TargetRoom: target}, att)
		return
	}
	b.completeLink(ce, from, target)
}

// linkRefusal explains why rooms a and c may not be linked, given the links they already belong to (nil when
// none): the encryption rule, and the require-encryption policy of a link they would join.
func (b *Bridge) linkRefusal(ctx context.Context, a, c id.RoomID, links ...*database.Link) (noticeText, bool) {
	if reason, refused := b.encryptionMismatch(ctx, a, c); refused {
		return reason, true
	}
	require := false
	for _, l := range links {
		require = require || l != nil && l.RequireEncryption
	}
	if !require {
		return noticeText{}, false
	}
	for _, r := range []id.RoomID{a, c} {
		if enc, _ := b.StateStore.IsEncrypted(ctx, r); !enc {
			return renderNotice("the link requires encryption, and **%s** is not encrypted. Enable encryption there first.", b.roomName(ctx, r)), true
		}
	}
	return noticeText{}, false
}

// encryptionMismatch explains why two rooms may not be linked under the encryption rule (ferry does not relay
// from an encrypted room into an unencrypted one unless bridge.allow_unencrypted_targets is set).
func (b *Bridge) encryptionMismatch(ctx context.Context, a, c id.RoomID) (noticeText, bool) {
	if b.Config.AllowUnencryptedTargets {
		return noticeText{}, false
	}
	encA, _ := b.StateStore.IsEncrypted(ctx, a)
	encC, _ := b.StateStore.IsEncrypted(ctx, c)
	if encA == encC {
		return noticeText{}, false
	}
	plain := a
	if encA {
		plain = c
	}
	return renderNotice("**%s** is not encrypted, and ferry does not relay messages from encrypted rooms into unencrypted ones. Enable encryption there first (or an admin sets `bridge.allow_unencrypted_targets`).",
		b.roomName(ctx, plain)), true
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
	zerolog.Ctx(ctx).Info().Str("link_id", link.ID).Int("rooms", len(link.Rooms)).Msg("Rooms linked")
	b.updateLinkState(ctx, link)
	names := b.joinRoomNames(ctx, link.Rooms)
	ce.Reply("Linked: %s. Messages now cross between these rooms.", names)
	ce.announce(link.Others(ce.RoomID), "linked", renderNotice("This room is now linked with %s by %s.", names, ce.Sender))
}

// joinRoomNames joins the names of rooms for a notice.
func (b *Bridge) joinRoomNames(ctx context.Context, rooms []id.RoomID) string {
	names := make([]string, 0, len(rooms))
	for _, r := range rooms {
		names = append(names, b.roomName(ctx, r))
	}
	return strings.Join(names, ", ")
}

func cmdUnlink(ce *CommandEvent) {
	b, ctx := ce.Bridge, ce.Ctx
	if a := ce.authorize(ce.RoomID, rightSettings); !a.ok {
		ce.reply(a.because("Cannot unlink"))
		return
	}
	before, err := b.DB.Links.Leave(ctx, ce.RoomID)
	if errors.Is(err, database.ErrLinkNotFound) {
		ce.Reply("This room is not linked.")
		return
	} else if err != nil {
		zerolog.Ctx(ctx).Err(err).Msg("Failed to unlink room")
		ce.Reply("Failed to unlink.")
		return
	}
	zerolog.Ctx(ctx).Info().Str("link_id", before.ID).Msg("Room unlinked")
	b.linkLeft(ctx, before, ce.RoomID)
	b.endCallsForUnlink(ctx, before, ce.RoomID)
	ce.Reply("Unlinked. Messages no longer cross between this room and %s.", b.joinRoomNames(ctx, before.Others(ce.RoomID)))
	ce.announce(before.Others(ce.RoomID), "unlinked", renderNotice("**%s** was unlinked from this room by %s.", b.roomName(ctx, ce.RoomID), ce.Sender))
}

func cmdLinks(ce *CommandEvent) {
	b, ctx := ce.Bridge, ce.Ctx
	all := len(ce.Args) == 1
	if all && !strings.EqualFold(ce.Args[0], "all") {
		ce.reply(usageNotice(b.Config.CommandPrefix, ce.Room.Management, findCommand(commandTable, "links")))
		return
	}
	if all && ce.Level < LevelAdmin {
		ce.Reply("`links all` needs permission level `%s`; yours is `%s`.", LevelAdmin, ce.Level)
		return
	}
	if all || !ce.Room.Linked && ce.Level >= LevelAdmin {
		ce.reply(b.allLinksText(ctx))
		return
	}
	link, err := b.DB.Links.GetByRoom(ctx, ce.RoomID)
	if errors.Is(err, database.ErrLinkNotFound) {
		ce.Reply("This room is not linked. Link it with `%s`.", ce.cmd("link <room>"))
		return
	} else if err != nil {
		zerolog.Ctx(ctx).Err(err).Msg("Failed to read link")
		ce.Reply("Failed to read this room's link.")
		return
	}
	n := renderNotice("This room's link `%s` (created by %s on %s) has %d rooms:", link.ID, link.CreatedBy, link.CreatedAt.UTC().Format("2006-01-02 15:04 MST"), len(link.Rooms))
	for _, r := range link.Rooms {
		enc, _ := b.StateStore.IsEncrypted(ctx, r)
		copies, err := b.DB.EventMap.CountForRoom(ctx, r)
		if err != nil {
			zerolog.Ctx(ctx).Warn().Err(err).Stringer("target_room_id", r).Msg("Failed to count relayed events")
		}
		here := ""
		if r == ce.RoomID {
			here = " (this room)"
		}
		n = n.join(renderNotice("- **%s**%s: %s, %d copies relayed out of it", b.roomName(ctx, r), here, encryptionWord(enc), copies))
	}
	n = n.join(b.policyText(link))
	if link.DisappearAfter > 0 {
		n = n.join(renderNotice("Disappearing messages: after %s.", formatDuration(link.DisappearAfter)))
	}
	ce.reply(n)
}

// allLinksText lists every link, for admins.
func (b *Bridge) allLinksText(ctx context.Context) noticeText {
	links, err := b.DB.Links.All(ctx)
	if err != nil {
		zerolog.Ctx(ctx).Err(err).Msg("Failed to list links")
		return renderNotice("Failed to list the links.")
	}
	if len(links) == 0 {
		return renderNotice("There are no links.")
	}
	n := renderNotice("%d links:", len(links))
	for i, link := range links {
		if i == maxListedLinks {
			n = n.join(renderNotice("… and %d more.", len(links)-i))
			break
		}
		policy := ""
		if link.RequireEncryption {
			policy = " (encryption required)"
		}
		n = n.join(renderNotice("- `%s`: %s%s", link.ID, b.joinRoomNames(ctx, link.Rooms), policy))
	}
	return n
}

func encryptionWord(encrypted bool) string {
	if encrypted {
		return "encrypted"
	}
	return "not encrypted"
}

// policyText describes a link's encryption policy.
func (b *Bridge) policyText(link *database.Link) noticeText {
	switch {
	case link.RequireEncryption:
		return renderNotice("Policy: every room of this link must be encrypted.")
	case b.Config.AllowUnencryptedTargets:
		return renderNotice("Policy: encryption is not required, and this ferry relays from encrypted rooms into unencrypted ones (`bridge.allow_unencrypted_targets`).")
	}
	return renderNotice("Policy: encryption is not required, but ferry never relays from an encrypted room into an unencrypted one.")
}

func cmdStatus(ce *CommandEvent) {
	b, ctx := ce.Bridge, ce.Ctx
	// The path's short name (its details are for admins, below).
	path, _, _ := strings.Cut(orUnknown(b.EncryptionPath), " (")
	n := renderNotice("ferry %s · up %s", Version, formatDuration(b.Uptime())).
		join(renderNotice("Encryption: %s", path))
	link, err := b.DB.Links.GetByRoom(ctx, ce.RoomID)
	switch {
	case err == nil:
		n = n.join(renderNotice("**This room's link** `%s`", link.ID))
		for _, r := range link.Rooms {
			n = n.join(b.roomHealth(ctx, r, ce.RoomID).text(time.Now()))
		}
	case errors.Is(err, database.ErrLinkNotFound):
		n = n.join(renderNotice("This room is not linked."))
	default:
		zerolog.Ctx(ctx).Err(err).Msg("Failed to read link")
		n = n.join(renderNotice("Failed to read this room's link."))
	}
	if ce.Level >= LevelAdmin {
		n = n.join(b.globalStatus(ctx, ce.RoomID))
	}
	ce.reply(n)
}

// queuedExcept counts a room's pending inbox events. The command being answered is itself pending until its
// handler returns, so it is not counted when the room is the command's room.
func queuedExcept(counts map[database.InboxState]int, room, commandRoom id.RoomID) int {
	n := counts[database.InboxPending]
	if (room == commandRoom || room == "") && n > 0 {
		n--
	}
	return n
}

// roomHealth is how relaying out of one room of a link is doing, for the status command.
type roomHealth struct {
	name        string
	here        bool      // the room the command was sent in
	lastRelayed time.Time // when the latest copy of one of its messages was made; zero: never
	failures    int       // failed sends out of it in the last hour (retried or given up)
	notRelayed  int       // its events ferry gave up on, kept a day (inbox rows failed)
	waiting     int       // its events waiting for their room keys
	queued      int       // its events waiting their turn
}

// roomHealth gathers one room's health.
func (b *Bridge) roomHealth(ctx context.Context, room, commandRoom id.RoomID) roomHealth {
	counts, err := b.DB.Inbox.CountByState(ctx, room)
	if err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Stringer("target_room_id", room).Msg("Failed to count queued events")
	}
	last, err := b.DB.EventMap.LastForRoom(ctx, room)
	if err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Stringer("target_room_id", room).Msg("Failed to read last relayed event")
	}
	return roomHealth{
		name: cleanName(b.roomName(ctx, room), maxStatusNameRunes), here: room == commandRoom, lastRelayed: last,
		failures: b.stats.errorsLastHour([]id.RoomID{room}), notRelayed: counts[database.InboxFailed],
		waiting: counts[database.InboxWaitingKeys], queued: queuedExcept(counts, room, commandRoom),
	}
}

// The status command fits a phone screen: lines of at most maxStatusLineRunes characters, room names shortened to
// maxStatusNameRunes.
const (
	maxStatusLineRunes = 40
	maxStatusNameRunes = 28
)

// Signs of a room's health in the status command.
const (
	healthGood    = "✅"
	healthTrouble = "⚠️"
	healthBusy    = "⏳"
)

// text renders a room's health in short lines that fit a phone screen: a sign and the room's name, when a
// message last crossed out of it, then only the figures that are not zero.
func (h roomHealth) text(now time.Time) noticeText {
	sign := healthGood
	switch {
	case h.failures > 0 || h.notRelayed > 0 || h.waiting > 0:
		sign = healthTrouble
	case h.queued > 0:
		sign = healthBusy
	}
	here := ""
	if h.here {
		here = " (here)"
	}
	n := renderNotice("%s **%s**%s", sign, h.name, here)
	if h.lastRelayed.IsZero() {
		n = n.join(renderNotice("nothing relayed yet"))
	} else {
		n = n.join(renderNotice("last relayed %s", formatAge(h.lastRelayed, now)))
	}
	for _, f := range []struct {
		n          int
		one, other string
	}{
		{h.failures, "1 failure in the last hour", "%d failures in the last hour"},
		{h.notRelayed, "1 not relayed (last day)", "%d not relayed (last day)"},
		{h.waiting, "1 waiting for its key", "%d waiting for keys"},
		{h.queued, "1 queued", "%d queued"},
	} {
		switch {
		case f.n == 1:
			n = n.join(renderNotice(f.one))
		case f.n > 1:
			n = n.join(renderNotice(f.other, f.n))
		}
	}
	return n
}

// globalStatus is the admins' part of the status command: every link and the totals, in short lines.
func (b *Bridge) globalStatus(ctx context.Context, commandRoom id.RoomID) noticeText {
	links, err := b.DB.Links.All(ctx)
	if err != nil {
		zerolog.Ctx(ctx).Err(err).Msg("Failed to list links")
		return renderNotice("Failed to list the links.")
	}
	counts, err := b.DB.Inbox.CountByState(ctx, "")
	if err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to count queued events")
	}
	rooms := 0
	for _, l := range links {
		rooms += len(l.Rooms)
	}
	n := renderNotice("**All links** (%d, with %d rooms)", len(links), rooms).
		join(renderNotice("Encryption path: %s", orUnknown(b.EncryptionPath))).
		join(renderNotice("%d relayed since start", b.stats.relayed.Load())).
		join(renderNotice("%d failures in the last hour", b.stats.errorsLastHour(nil))).
		join(renderNotice("%d not relayed (last day)", counts[database.InboxFailed])).
		join(renderNotice("%d waiting for keys · %d queued", counts[database.InboxWaitingKeys], queuedExcept(counts, "", commandRoom)))
	for i, l := range links {
		if i == maxListedLinks {
			n = n.join(renderNotice("… and %d more.", len(links)-i))
			break
		}
		sign := healthGood
		for _, r := range l.Rooms {
			if h := b.roomHealth(ctx, r, commandRoom); h.failures > 0 || h.notRelayed > 0 || h.waiting > 0 {
				sign = healthTrouble
			}
		}
		n = n.join(renderNotice("- %s `%s`: %s", sign, l.ID, b.joinRoomNames(ctx, l.Rooms)))
	}
	return n
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

// formatDuration renders a duration for people: "45s", "3m 20s", "2h 5m", "3d 4h".
func formatDuration(d time.Duration) string {
	if d < 0 {
		d = 0
	}
	d = d.Round(time.Second)
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d/time.Second))
	case d < time.Hour:
		return fmt.Sprintf("%dm %ds", int(d/time.Minute), int(d%time.Minute/time.Second))
	case d < 24*time.Hour:
		return fmt.Sprintf("%dh %dm", int(d/time.Hour), int(d%time.Hour/time.Minute))
	}
	return fmt.Sprintf("%dd %dh", int(d/(24*time.Hour)), int(d%(24*time.Hour)/time.Hour))
}

// formatAge renders how long ago t was, or "never" for the zero time.
func formatAge(t, now time.Time) string {
	if t.IsZero() {
		return "never"
	}
	return formatDuration(now.Sub(t)) + " ago"
}

func cmdEncryption(ce *CommandEvent) {
	b, ctx := ce.Bridge, ce.Ctx
	link, err := b.DB.Links.GetByRoom(ctx, ce.RoomID)
	if err != nil && !errors.Is(err, database.ErrLinkNotFound) {
		zerolog.Ctx(ctx).Err(err).Msg("Failed to read link")
		ce.Reply("Failed to read this room's link.")
		return
	}
	if len(ce.Args) == 0 {
		n := renderNotice("This room is %s.", encryptionWord(ce.Room.Encrypted))
		if link == nil {
			ce.reply(n.join(renderNotice("It is not linked, so no link policy applies.")))
			return
		}
		for _, r := range link.Others(ce.RoomID) {
			enc, _ := b.StateStore.IsEncrypted(ctx, r)
			n = n.join(renderNotice("- **%s**: %s", b.roomName(ctx, r), encryptionWord(enc)))
		}
		ce.reply(n.join(b.policyText(link)))
		return
	}
	var require bool
	switch strings.ToLower(ce.Args[0]) {
	case "require":
		require = true
	case "optional":
	default:
		ce.reply(usageNotice(b.Config.CommandPrefix, ce.Room.Management, findCommand(commandTable, "encryption")))
		return
	}
	if a := ce.authorize(ce.RoomID, rightRoomAdmin); !a.ok {
		ce.reply(a.because("Cannot change the link's encryption policy"))
		return
	}
	if link == nil {
		ce.Reply("This room is not linked; the encryption policy belongs to a link.")
		return
	}
	if require {
		var plain []id.RoomID
		for _, r := range link.Rooms {
			if enc, _ := b.StateStore.IsEncrypted(ctx, r); !enc {
				plain = append(plain, r)
			}
		}
		if len(plain) > 0 {
			ce.Reply("Cannot require encryption: %s not encrypted. Enable encryption there first, or unlink it.", b.joinRoomNames(ctx, plain))
			return
		}
	}
	if link.RequireEncryption == require {
		ce.reply(renderNotice("Nothing to change.").join(b.policyText(link)))
		return
	}
	if err = b.DB.Links.SetRequireEncryption(ctx, link.ID, require); err != nil {
		zerolog.Ctx(ctx).Err(err).Msg("Failed to change link encryption policy")
		ce.Reply("Failed to change the link's encryption policy.")
		return
	}
	zerolog.Ctx(ctx).Info().Str("link_id", link.ID).Bool("require_encryption", require).Msg("Link encryption policy changed")
	if require {
		ce.Reply("Done: this link now requires encryption, and refuses any unencrypted room.")
	} else {
		ce.Reply("Done: this link no longer requires encryption. ferry still never relays from an encrypted room into an unencrypted one.")
	}
}

func cmdDevices(ce *CommandEvent) {
	reporter, ok := ce.Bridge.Crypto.(DeviceReporter)
	if !ok {
		ce.Reply("Device information is unavailable.")
		return
	}
	s, err := reporter.DeviceSummary(ce.Ctx)
	if err != nil {
		zerolog.Ctx(ce.Ctx).Err(err).Msg("Failed to summarise devices")
		ce.Reply("Device information is unavailable right now; the details are in ferry's log.")
		return
	}
	ce.reply(devicesText(s))
}

// devicesText renders a device summary.
func devicesText(s crypto.DeviceSummary) noticeText {
	signed := "not cross-signed (clients may warn about it)"
	if s.BotCrossSigned {
		signed = "verified by ferry's own identity (cross-signed)"
	}
	return renderNotice("- My device: `%s`, %s", orUnknown(string(s.BotDeviceID)), signed).
		join(renderNotice("- Devices of the people I relay (ghost devices): %d", s.GhostDevices)).
		join(renderNotice("- Device mode: `%s`", orUnknown(s.Mode))).
		join(renderNotice("- I give the keys to my messages to devices trusted at least `%s`", orUnknown(s.ShareMinTrust))).
		join(renderNotice("- I relay messages from devices trusted at least `%s`", orUnknown(s.ReceiveMinTrust)))
}

func cmdPing(ce *CommandEvent) {
	if ce.Event.Timestamp > 0 {
		ce.Reply("Pong (your message reached me %s after you sent it).", formatLatency(time.Since(time.UnixMilli(ce.Event.Timestamp))))
		return
	}
	ce.Reply("Pong.")
}

// formatLatency renders a short delay in milliseconds, or as a duration when long.
func formatLatency(d time.Duration) string {
	if d < time.Second {
		return fmt.Sprintf("%d ms", max(d.Milliseconds(), 0))
	}
	return formatDuration(d)
}

func cmdVersion(ce *CommandEvent) {
	ce.Reply("ferry %s", Version)
}

func cmdRotate(ce *CommandEvent) {
	if a := ce.authorize(ce.RoomID, rightMember); !a.ok {
		ce.reply(a.because("Cannot rotate"))
		return
	}
	if ce.Bridge.Crypto == nil {
		ce.Reply("Encryption is unavailable.")
		return
	}
	if err := ce.Bridge.Crypto.Rotate(ce.Ctx, ce.RoomID); err != nil {
		zerolog.Ctx(ce.Ctx).Err(err).Msg("Failed to rotate outbound sessions")
		ce.Reply("Failed to start new encryption keys; the details are in ferry's log.")
		return
	}
	zerolog.Ctx(ce.Ctx).Info().Msg("Outbound sessions discarded by command")
	ce.Reply("Done: ferry's next message in this room is encrypted with new keys, shared with the room's devices as they are now.")
}

func cmdRecoveryKey(ce *CommandEvent) {
	if !ce.Room.Encrypted {
		ce.Reply("I only show the recovery key in an encrypted chat. Enable encryption here first.")
		return
	}
	provider, ok := ce.Bridge.Crypto.(RecoveryKeyProvider)
	if !ok {
		ce.Reply("The recovery key will be available here once ferry's cross-signing is set up.")
		return
	}
	key, err := provider.RecoveryKey(ce.Ctx)
	if err != nil {
		zerolog.Ctx(ce.Ctx).Err(err).Msg("Failed to read recovery key")
		ce.Reply("Failed to read the recovery key; the details are in ferry's log.")
		return
	} else if key == "" {
		ce.Reply("The recovery key will be available here once ferry's cross-signing is set up.")
		return
	}
	zerolog.Ctx(ce.Ctx).Info().Msg("Recovery key shown to an admin")
	ce.Reply("ferry's recovery key: `%s`\nStore it somewhere safe, then redact this message.", key)
}

func cmdReload(ce *CommandEvent) {
	b := ce.Bridge
	if b.Reload == nil {
		ce.Reply("Reloading is not available in this ferry process.")
		return
	}
	perms, err := b.Reload()
	if err != nil {
		zerolog.Ctx(ce.Ctx).Err(err).Msg("Failed to reload permissions")
		ce.Reply("Reload failed; the permissions are unchanged: %s", firstLine(err.Error()))
		return
	}
	b.SetPermissions(perms)
	zerolog.Ctx(ce.Ctx).Info().Int("entries", len(perms)).Msg("Permissions reloaded")
	ce.Reply("Reloaded the permissions from the config: %d entries. Your level is now `%s`.", len(perms), b.Permission(ce.Sender))
}

// firstLine returns the first line of s.
func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}

func cmdAdminHelper(ce *CommandEvent) {
	mgr, ok := ce.Bridge.Crypto.(AdminHelperManager)
	if !ok {
		ce.Reply("ferry keeps no homeserver admin helper account.")
		return
	}
	if len(ce.Args) == 1 {
		if !strings.EqualFold(ce.Args[0], "remove") {
			ce.reply(usageNotice(ce.Bridge.Config.CommandPrefix, ce.Room.Management, findCommand(commandTable, "admin-helper")))
			return
		}
		if a := ce.authorize(ce.RoomID, rightMember); !a.ok {
			ce.reply(a.because("Cannot remove the admin helper"))
			return
		}
		existed, err := mgr.RemoveAdminHelper(ce.Ctx)
		if err != nil {
			zerolog.Ctx(ce.Ctx).Err(err).Msg("Failed to remove the admin helper")
			ce.Reply("Failed to remove the admin helper; the details are in ferry's log. Nothing was changed.")
			return
		}
		zerolog.Ctx(ce.Ctx).Info().Bool("existed", existed).Msg("Admin helper removed by command")
		if existed {
			ce.Reply("Deactivated ferry's admin helper account and forgot its password. ferry will not create it again: accounts that still need a password to publish their cross-signing keys use the bot's device (single-device mode).")
		} else {
			ce.Reply("There was no admin helper account to deactivate. ferry will not create one from now on.")
		}
		return
	}
	s, err := mgr.AdminHelper(ce.Ctx)
	if err != nil {
		zerolog.Ctx(ce.Ctx).Err(err).Msg("Failed to read the admin helper's state")
		ce.Reply("Failed to read the admin helper's state; the details are in ferry's log.")
		return
	}
	ce.reply(adminHelperText(s, ce.cmd("admin-helper remove")))
}

// adminHelperText describes the admin helper for the admin-helper command.
func adminHelperText(s crypto.AdminHelperStatus, removeCmd string) noticeText {
	switch {
	case s.Removed:
		return renderNotice("ferry's admin helper `%s` was removed; ferry will not create it again.", s.UserID)
	case s.Exists:
		login := "It is logged out: ferry logs it in only for the call that needs it and logs it out right after."
		if s.LoggedIn {
			login = "It is logged in right now, for a call in progress; ferry logs it out when the call ends."
		}
		return renderNotice("ferry's admin helper `%s` exists: a homeserver admin account ferry created through the registration shared secret, used only to set passwords on its own accounts (this homeserver asks for them before cross-signing keys are uploaded).", s.UserID).
			join(renderNotice("%s", login)).
			join(renderNotice("Remove it for good with `%s`.", removeCmd))
	case s.Possible:
		return renderNotice("ferry has no admin helper account. It would create `%s` only if one of its accounts needed a password, which this homeserver asks for before cross-signing keys are uploaded.", s.UserID)
	}
	return renderNotice("ferry has no admin helper account and does not need one here (appservice-mode encryption, or no registration shared secret).")
}
