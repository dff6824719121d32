package bridge

// Consent in every room an action touches. Linking two rooms acts on both and on every room of a link either
// already belongs to (they all start to exchange messages); a disappearing timer, with bridge.redact_originals,
// redacts originals in every room of its link. Such an action needs, in each of those rooms, someone who may
// change room settings there now (or a ferry admin). The requester consents where they have that authority;
// every other room gets a request notice with the request's ID, and someone with the authority there answers
// `accept <id>` or `reject <id>`. A request expires after consentLifetime. When the last room consents, ferry
// checks everything again before it acts: every consent must still be backed by authority now (a consenter who
// left or lost power no longer counts, and that room is asked again), rooms that joined a link meanwhile are
// asked too, and the link rules (encryption) must still allow the action.

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
)

// Limits of consent requests: how long one waits, and how many may wait in one room and from one user (what a
// user of level user can make ferry keep is bounded).
const (
	consentLifetime       = 24 * time.Hour
	maxWaitingPerRoom     = 10
	maxWaitingPerUser     = 10
	consentSweepEvery     = time.Minute
	consentRequestTxnKind = "consentreq"
)

// linkScope lists the rooms that linking from with target acts on: both rooms and the rooms of the links they
// belong to (nil when none), sorted, each once.
func linkScope(from, target id.RoomID, fromLink, targetLink *database.Link) []id.RoomID {
	rooms := []id.RoomID{from, target}
	for _, l := range []*database.Link{fromLink, targetLink} {
		if l != nil {
			rooms = append(rooms, l.Rooms...)
		}
	}
	slices.Sort(rooms)
	return slices.Compact(rooms)
}

// mergeConsents is the consent table of a request for scope: each room keeps its recorded consenter when valid
// says that consent still holds, and waits ("") otherwise, including rooms new to the scope. Rooms no longer in
// the scope are dropped. waiting lists the rooms without consent.
func mergeConsents(scope []id.RoomID, recorded []database.ConsentRoom, valid func(room id.RoomID, by id.UserID) bool) (rooms []database.ConsentRoom, waiting []id.RoomID) {
	by := make(map[id.RoomID]id.UserID, len(recorded))
	for _, c := range recorded {
		by[c.RoomID] = c.ConsentedBy
	}
	for _, room := range scope {
		consenter := by[room]
		if consenter != "" && !valid(room, consenter) {
			consenter = ""
		}
		if consenter == "" {
			waiting = append(waiting, room)
		}
		rooms = append(rooms, database.ConsentRoom{RoomID: room, ConsentedBy: consenter})
	}
	return rooms, waiting
}

// consentAttempt is what one consent check of the rooms of an action found.
type consentAttempt struct {
	rooms   []database.ConsentRoom
	waiting []id.RoomID
	// denied says, for each waiting room, why the requester's own authority does not count there.
	denied map[id.RoomID]authority
	// unknown: a room's membership and power could not be read; the action is refused (failing closed).
	unknown *authority
}

// requesterConsents checks the command's sender in every room of scope: where they have the authority, they
// consent themselves (the command's own room was checked by the caller).
func (ce *CommandEvent) requesterConsents(scope []id.RoomID) consentAttempt {
	att := consentAttempt{denied: make(map[id.RoomID]authority)}
	for _, room := range scope {
		if room == ce.RoomID {
			att.rooms = append(att.rooms, database.ConsentRoom{RoomID: room, ConsentedBy: ce.Sender})
			continue
		}
		a := ce.authorize(room, rightSettings)
		switch {
		case a.unknown:
			att.unknown = &a
			return att
		case a.ok:
			att.rooms = append(att.rooms, database.ConsentRoom{RoomID: room, ConsentedBy: ce.Sender})
		default:
			att.rooms = append(att.rooms, database.ConsentRoom{RoomID: room})
			att.waiting = append(att.waiting, room)
			att.denied[room] = a
		}
	}
	return att
}

// describeRequest says in one sentence what a request would do, for its notices and listings.
func (b *Bridge) describeRequest(ctx context.Context, req *database.ConsentRequest, room id.RoomID) noticeText {
	switch req.Kind {
	case database.ConsentDisappear:
		return renderNotice("%s asks to make messages disappear %s after they are sent, in every room of this room's link (originals here included).",
			req.RequestedBy, formatDuration(req.DisappearAfter))
	}
	other := req.TargetRoom
	if room == req.TargetRoom {
		other = req.FromRoom
	}
	var also []id.RoomID
	for _, c := range req.Rooms {
		if c.RoomID != room && c.RoomID != other {
			also = append(also, c.RoomID)
		}
	}
	n := renderNotice("%s asks to link this room with **%s**.", req.RequestedBy, b.roomName(ctx, other))
	if room != req.TargetRoom && room != req.FromRoom {
		n = renderNotice("%s asks to link **%s** with **%s**, which would join this room's link.", req.RequestedBy, b.roomName(ctx, req.FromRoom), b.roomName(ctx, req.TargetRoom))
		also = slices.DeleteFunc(also, func(r id.RoomID) bool { return r == req.FromRoom })
	}
	if len(also) > 0 {
		n = n.join(renderNotice("Messages would then also cross with %s.", b.joinRoomNames(ctx, also)))
	}
	return n
}

// requestNotice is the notice posted in a room whose consent a request waits for.
func (b *Bridge) requestNotice(ctx context.Context, req *database.ConsentRequest, room id.RoomID) noticeText {
	prefix := b.Config.CommandPrefix
	return b.describeRequest(ctx, req, room).join(renderNotice(
		"Request `%s`, valid until %s. Someone who may change room settings here can accept it with `%s` or refuse it with `%s`.",
		req.ID, req.ExpiresAt.UTC().Format("2006-01-02 15:04 MST"),
		commandLine(prefix, false, "accept "+req.ID), commandLine(prefix, false, "reject "+req.ID)))
}

// postRequest posts a request's notice in rooms. The transaction ID derives from the request and the room, so
// posting again (after a crash, or when a room is asked again) does not repeat a notice in a room that has one.
func (b *Bridge) postRequest(ctx context.Context, req *database.ConsentRequest, rooms []id.RoomID, round string) []id.RoomID {
	var failed []id.RoomID
	for _, room := range rooms {
		txnID := "ferry_" + consentRequestTxnKind + "_" + TxnID(id.EventID("consent:"+req.ID+":"+round), room)
		if _, err := b.sendRenderedNotice(ctx, room, b.requestNotice(ctx, req, room), "", txnID); err != nil {
			zerolog.Ctx(ctx).Warn().Err(err).Stringer("target_room_id", room).Str("request_id", req.ID).Msg("Failed to post a consent request")
			failed = append(failed, room)
		}
	}
	return failed
}

// askConsent stores a request for what base describes, with the consents att found, posts it in the waiting
// rooms and tells the requester. lead names the action for the reply ("link with **B**").
func (ce *CommandEvent) askConsent(base *database.ConsentRequest, att consentAttempt) {
	b, ctx := ce.Bridge, ce.Ctx
	now := time.Now()
	for _, room := range att.waiting {
		inRoom, byUser, err := b.DB.Consent.CountWaiting(ctx, room, ce.Sender, now)
		if err != nil {
			zerolog.Ctx(ctx).Err(err).Msg("Failed to count waiting consent requests")
			ce.Reply("Failed to store the request.")
			return
		}
		if inRoom >= maxWaitingPerRoom {
			ce.Reply("Cannot ask: %d requests already wait in **%s**. Ask there to answer or reject them first.", inRoom, b.roomName(ctx, room))
			return
		}
		if byUser >= maxWaitingPerUser && ce.Level < LevelAdmin {
			ce.Reply("Cannot ask: %d of your requests already wait for consent. Wait until they are answered or expire.", byUser)
			return
		}
	}
	base.RequestedBy, base.CommandEvent, base.CreatedAt, base.ExpiresAt = ce.Sender, ce.Event.ID, now, now.Add(consentLifetime)
	base.Rooms = att.rooms
	req, _, err := b.DB.Consent.Create(ctx, base)
	if err != nil {
		zerolog.Ctx(ctx).Err(err).Msg("Failed to store a consent request")
		ce.Reply("Failed to store the request.")
		return
	}
	zerolog.Ctx(ctx).Info().Str("request_id", req.ID).Str("kind", string(req.Kind)).Int("waiting_rooms", len(att.waiting)).Msg("Consent requested")
	failed := b.postRequest(ctx, req, att.waiting, "0")
	n := renderNotice("This needs consent in rooms where your own power does not count:")
	for _, room := range att.waiting {
		n = n.join(att.denied[room].short(b.roomName(ctx, room)))
	}
	n = n.join(renderNotice("I posted %s request `%s` there. Someone who may change room settings in each of them can accept it with `%s` within %d hours.",
		kindNoun(req.Kind), req.ID, commandLine(b.Config.CommandPrefix, false, "accept "+req.ID), int(consentLifetime/time.Hour)))
	if len(failed) > 0 {
		n = n.join(renderNotice("I could not post it in %s; someone there can still accept it by its ID.", b.joinRoomNames(ctx, failed)))
	}
	ce.reply(n)
}

// kindNoun names a kind of request in replies ("link request").
func kindNoun(k database.ConsentKind) string {
	if k == database.ConsentDisappear {
		return "timer"
	}
	return "link"
}

// short is one list item saying why a refused check failed in a room named name.
func (a authority) short(name string) noticeText {
	switch {
	case a.denial == denyNotJoined:
		return renderNotice("- **%s**: you are not a member of it now, and power there counts only while you are joined.", name)
	case a.denial == denyPower:
		return renderNotice("- **%s**: changing its settings needs power level %d; you have %d.", name, a.s.Need, a.s.Level)
	}
	return renderNotice("- **%s**", name)
}

// pickRequest finds the request accept or reject answers: the one named by the command's argument, or the only
// one waiting in the room. With several waiting and none named, it lists them and returns nil.
func (ce *CommandEvent) pickRequest(verb string) *database.ConsentRequest {
	b, ctx := ce.Bridge, ce.Ctx
	now := time.Now()
	waiting, err := b.DB.Consent.WaitingIn(ctx, ce.RoomID, now)
	if err != nil {
		zerolog.Ctx(ctx).Err(err).Msg("Failed to read consent requests")
		ce.Reply("Failed to read the requests waiting here.")
		return nil
	}
	if len(ce.Args) == 1 {
		want := strings.ToLower(strings.Trim(ce.Args[0], "`"))
		for _, req := range waiting {
			if req.ID == want {
				return req
			}
		}
		if req, err := b.DB.Consent.Get(ctx, want); err == nil && req != nil && !req.ExpiresAt.After(now) {
			ce.Reply("Request `%s` expired at %s; ask again if it is still wanted.", req.ID, req.ExpiresAt.UTC().Format("2006-01-02 15:04 MST"))
			return nil
		}
		ce.Reply("No request `%s` waits for this room's consent. %s", truncateName(want), waitingSummary(len(waiting), ce.cmd(verb)))
		return nil
	}
	switch len(waiting) {
	case 0:
		ce.Reply("No request waits for this room's consent.")
		return nil
	case 1:
		return waiting[0]
	}
	n := renderNotice("%d requests wait for this room's consent; name the one to %s, e.g. `%s`:", len(waiting), verb, ce.cmd(verb+" "+waiting[0].ID))
	for _, req := range waiting {
		n = n.join(renderNotice("- `%s` (expires in %s):", req.ID, formatDuration(time.Until(req.ExpiresAt)))).join(b.describeRequest(ctx, req, ce.RoomID))
	}
	ce.reply(n)
	return nil
}

// waitingSummary tells how many requests wait here and how to list them.
func waitingSummary(n int, listCmd string) string {
	switch n {
	case 0:
		return "None does."
	case 1:
		return fmt.Sprintf("One does: `%s` answers it.", listCmd)
	}
	return fmt.Sprintf("%d do: `%s` lists them.", n, listCmd)
}

func cmdAccept(ce *CommandEvent) {
	if a := ce.authorize(ce.RoomID, rightSettings); !a.ok {
		ce.reply(a.because("Cannot accept"))
		return
	}
	req := ce.pickRequest("accept")
	if req == nil {
		return
	}
	ctx := ce.Ctx
	if err := ce.Bridge.DB.Consent.SetRooms(ctx, req.ID, []database.ConsentRoom{{RoomID: ce.RoomID, ConsentedBy: ce.Sender}}); err != nil {
		zerolog.Ctx(ctx).Err(err).Msg("Failed to record consent")
		ce.Reply("Failed to record your consent.")
		return
	}
	zerolog.Ctx(ctx).Info().Str("request_id", req.ID).Msg("Consent given")
	ce.proceed(req.ID)
}

func cmdReject(ce *CommandEvent) {
	b, ctx := ce.Bridge, ce.Ctx
	if a := ce.authorize(ce.RoomID, rightSettings); !a.ok {
		ce.reply(a.because("Cannot reject"))
		return
	}
	req := ce.pickRequest("reject")
	if req == nil {
		return
	}
	if _, err := b.DB.Consent.Delete(ctx, req.ID); err != nil {
		zerolog.Ctx(ctx).Err(err).Msg("Failed to delete a consent request")
		ce.Reply("Failed to reject the request.")
		return
	}
	zerolog.Ctx(ctx).Info().Str("request_id", req.ID).Msg("Consent request rejected")
	ce.Reply("Rejected request `%s`; nothing changes.", req.ID)
	if req.FromRoom != ce.RoomID {
		ce.announce([]id.RoomID{req.FromRoom}, "rejected", renderNotice("Request `%s` by %s was rejected in **%s** by %s.", req.ID, req.RequestedBy, b.roomName(ctx, ce.RoomID), ce.Sender))
	}
}

// proceed checks a request again after a consent and acts once every room of its scope consented now.
func (ce *CommandEvent) proceed(requestID string) {
	b, ctx := ce.Bridge, ce.Ctx
	req, err := b.DB.Consent.Get(ctx, requestID)
	if err != nil || req == nil {
		if err != nil {
			zerolog.Ctx(ctx).Err(err).Msg("Failed to read a consent request")
		}
		ce.Reply("Failed to read request `%s`.", requestID)
		return
	}
	void := func(why noticeText) {
		if _, err := b.DB.Consent.Delete(ctx, req.ID); err != nil {
			zerolog.Ctx(ctx).Err(err).Msg("Failed to delete a void consent request")
		}
		ce.reply(renderNotice("Request `%s` is void:", req.ID).join(why))
	}
	var scope []id.RoomID
	var link *database.Link
	switch req.Kind {
	case database.ConsentLink:
		fromLink, _ := b.DB.Links.GetByRoom(ctx, req.FromRoom)
		targetLink, _ := b.DB.Links.GetByRoom(ctx, req.TargetRoom)
		switch {
		case fromLink != nil && targetLink != nil && fromLink.ID == targetLink.ID:
			void(renderNotice("the rooms are linked already."))
			return
		case fromLink != nil && targetLink != nil:
			void(renderNotice("**%s** and **%s** belong to different links now.", b.roomName(ctx, req.FromRoom), b.roomName(ctx, req.TargetRoom)))
			return
		}
		if reason, refused := b.linkRefusal(ctx, req.FromRoom, req.TargetRoom, fromLink, targetLink); refused {
			void(reason)
			return
		}
		scope = linkScope(req.FromRoom, req.TargetRoom, fromLink, targetLink)
	case database.ConsentDisappear:
		if link, err = b.DB.Links.Get(ctx, req.LinkID); err != nil {
			void(renderNotice("the link it was for no longer exists."))
			return
		}
		scope = link.Rooms
	default:
		void(renderNotice("ferry does not know what it asks for."))
		return
	}
	// Every consent must still be backed by authority now; a room whose consenter left or lost power, and a room
	// new to the scope, wait (again).
	var unknown *authority
	rooms, waiting := mergeConsents(scope, req.Rooms, func(room id.RoomID, by id.UserID) bool {
		if unknown != nil {
			return false
		}
		a := b.checkAuthority(ctx, by, room, rightSettings, false)
		if a.unknown {
			unknown = &a
		}
		return a.ok
	})
	if unknown != nil {
		ce.reply(unknown.because("Cannot go on with request `" + req.ID + "` yet"))
		return
	}
	if err = b.DB.Consent.SetRooms(ctx, req.ID, rooms); err != nil {
		zerolog.Ctx(ctx).Err(err).Msg("Failed to record consents")
		ce.Reply("Failed to record the consents of request `%s`.", req.ID)
		return
	}
	if len(waiting) > 0 {
		// Ask where a room is new to the request or its consent no longer holds; rooms that were waiting already
		// have the notice. The round is this answer's event, so handling it again after a crash posts nothing twice.
		newly := newlyWaiting(req.Rooms, waiting)
		req.Rooms = rooms
		b.postRequest(ctx, req, newly, string(ce.Event.ID))
		ce.Reply("Noted for this room. Request `%s` still waits for consent in %s.", req.ID, b.joinRoomNames(ctx, waiting))
		return
	}
	if _, err = b.DB.Consent.Delete(ctx, req.ID); err != nil {
		zerolog.Ctx(ctx).Err(err).Msg("Failed to delete a granted consent request")
	}
	zerolog.Ctx(ctx).Info().Str("request_id", req.ID).Msg("Every room consented")
	switch req.Kind {
	case database.ConsentLink:
		b.completeLink(ce, req.FromRoom, req.TargetRoom)
	case database.ConsentDisappear:
		b.setDisappear(ce, link, req.DisappearAfter, req.RequestedBy)
	}
}

// newlyWaiting lists the rooms of waiting that were not waiting in recorded: new to the request, or whose
// consent no longer holds.
func newlyWaiting(recorded []database.ConsentRoom, waiting []id.RoomID) []id.RoomID {
	var out []id.RoomID
	for _, room := range waiting {
		i := slices.IndexFunc(recorded, func(c database.ConsentRoom) bool { return c.RoomID == room })
		if i < 0 || recorded[i].ConsentedBy != "" {
			out = append(out, room)
		}
	}
	return out
}
