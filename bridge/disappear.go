package bridge

// Disappearing messages. A link may carry a timer (5 s to 24 h, `!ferry disappear`). Every message relayed while
// it is on gets a deadline: the original's origin_server_ts plus the timer; a reaction, edit or thread reply to a
// disappearing message gets its parent's deadline at the latest. The event map records the deadline, and the
// same transaction schedules the copies (redacted by the ghost that sent them) and the original (redacted by the
// bot when bridge.redact_originals is on and the bot has the power) in disappear_queue. The scheduler below
// redacts them when due, after a restart at once, and retries like a send.
//
// Key destruction. ferry tracks (disappear_session) the Megolm sessions that carried disappearing messages:
//   - Outbound (ferry's own devices): a session that carried a disappearing message is used for at most the
//     timer's length, and never mixed with messages without deadline (either change rotates it), so it only
//     carries messages that expire within about twice the timer.
//   - Inbound (real users' sessions, received by ferry's devices): ferry cannot make a client rotate. A session
//     that carried a disappearing message is tracked from then on; a later message without deadline on it
//     (the timer was turned off) keeps it for good.
// Once every tracked message of a session passed its deadline and the session was idle for a while
// (outboundIdle / bridge.disappear_key_idle, so a live conversation does not lose its key between two messages), ferry
// deletes the session's keys under every account of its crypto store. A later message on a deleted inbound
// session goes through the usual missing-key path: ferry asks the sender's devices for the key again. Messages
// on an inbound session from before the timer was set do not keep it: ferry relayed them already and never needs
// their key again (the copies it sent are under its own sessions).

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/jsontime"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/crypto"
	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/internal/metrics"
)

// Limits of the disappearing timer.
const (
	MinDisappear = 5 * time.Second
	MaxDisappear = 24 * time.Hour
)

// How long one of ferry's outbound sessions whose messages all expired must have been unused before ferry deletes
// it. Inbound sessions wait bridge.disappear_key_idle.
const outboundIdle = 10 * time.Second

// Scheduler tuning.
const (
	disappearMaxSleep = time.Second      // the scheduler looks for new deadlines at least this often
	disappearBatch    = 100              // redactions read per query
	disappearParallel = 4                // redactions in flight at once
	keySweepInterval  = 2 * time.Second  // how often expired sessions are looked for
	keyResweep        = 2 * time.Minute  // deleted sessions are deleted again for this long (late key copies)
	disappearMaxRetry = 10 * time.Minute // longest wait between two attempts of one redaction
)

// errDisappearRange is the refusal for a timer that cannot be parsed or is out of range.
var errDisappearRange = errors.New("the timer must be a duration from 5 seconds to 24 hours (e.g. 5s, 90s, 10m, 1h, 24h), or off")

// ParseDisappear parses a timer argument: a duration such as 5s, 90s, 10m, 1h30m, 24h or 1d, from 5 seconds to
// 24 hours, or "off" (returned as 0).
func ParseDisappear(arg string) (time.Duration, error) {
	s := strings.ToLower(strings.TrimSpace(arg))
	switch s {
	case "off", "0":
		return 0, nil
	case "":
		return 0, errDisappearRange
	}
	var d time.Duration
	if days, ok := strings.CutSuffix(s, "d"); ok {
		n, err := strconv.Atoi(days)
		if err != nil || n < 0 || n > 1 {
			return 0, errDisappearRange
		}
		d = time.Duration(n) * 24 * time.Hour
	} else {
		var err error
		if d, err = time.ParseDuration(s); err != nil {
			return 0, errDisappearRange
		}
	}
	if d < MinDisappear || d > MaxDisappear || d%time.Millisecond != 0 {
		return 0, errDisappearRange
	}
	return d, nil
}

// disappearStateContent is the com.beeper.disappearing_timer content for a timer (0 = off: an empty object).
func disappearStateContent(d time.Duration) *event.BeeperDisappearingTimer {
	if d <= 0 {
		return &event.BeeperDisappearingTimer{}
	}
	return &event.BeeperDisappearingTimer{Type: event.DisappearingTypeAfterSend, Timer: jsontime.MS(d)}
}

func cmdDisappear(ce *CommandEvent) {
	b, ctx := ce.Bridge, ce.Ctx
	if len(ce.Args) == 0 {
		b.showDisappear(ce)
		return
	}
	after, err := ParseDisappear(ce.Args[0])
	if err != nil {
		ce.Reply("Cannot set the disappearing timer: %s.", err)
		return
	}
	if a := ce.authorize(ce.RoomID, rightSettings); !a.ok {
		ce.reply(a.because("Cannot change the disappearing timer"))
		return
	}
	link, err := b.DB.Links.GetByRoom(ctx, ce.RoomID)
	if errors.Is(err, database.ErrLinkNotFound) {
		ce.Reply("This room is not linked; the disappearing timer belongs to a link.")
		return
	} else if err != nil {
		zerolog.Ctx(ctx).Err(err).Msg("Failed to read link")
		ce.Reply("Failed to read this room's link.")
		return
	}
	if link.DisappearAfter == after {
		ce.reply(renderNotice("Nothing to change.").join(disappearText(after)))
		return
	}
	// A timer redacts originals in every room of the link (bridge.redact_originals): each room must consent
	// (consent.go). Turning it off, or a timer that only removes ferry's own copies, acts on nothing but ferry's
	// events.
	if after > 0 && b.Config.RedactOriginals {
		att := ce.requesterConsents(link.Rooms)
		if att.unknown != nil {
			ce.reply(att.unknown.because("Cannot change the disappearing timer"))
			return
		}
		if len(att.waiting) > 0 {
			ce.askConsent(&database.ConsentRequest{Kind: database.ConsentDisappear, FromRoom: ce.RoomID, LinkID: link.ID, DisappearAfter: after}, att)
			return
		}
	}
	b.setDisappear(ce, link, after, ce.Sender)
}

// setDisappear sets a link's timer (every room of it consented, or none needed to) and tells every room.
func (b *Bridge) setDisappear(ce *CommandEvent, link *database.Link, after time.Duration, by id.UserID) {
	ctx := ce.Ctx
	if err := b.DB.Links.SetDisappear(ctx, link.ID, after); err != nil {
		zerolog.Ctx(ctx).Err(err).Msg("Failed to change the disappearing timer")
		ce.Reply("Failed to change the disappearing timer.")
		return
	}
	zerolog.Ctx(ctx).Info().Str("link_id", link.ID).Dur("disappear_after", after).Msg("Disappearing timer changed")
	b.disappearTimerChanged(ctx, link, after)
	ce.reply(renderNotice("Done.").join(disappearText(after)))
	ce.announce(link.Others(ce.RoomID), "disappear", disappearText(after).join(renderNotice("(set by %s)", by)))
}

// showDisappear answers `disappear` without argument: the timer, how to set it, and for admins the redactions
// waiting or failed.
func (b *Bridge) showDisappear(ce *CommandEvent) {
	ctx := ce.Ctx
	link, err := b.DB.Links.GetByRoom(ctx, ce.RoomID)
	if err != nil {
		ce.Reply("Failed to read this room's link.")
		return
	}
	n := disappearText(link.DisappearAfter).
		join(renderNotice("Set it with `%s` (any duration from 5s to 24h), or turn it off with `%s`.", ce.cmd("disappear <duration>"), ce.cmd("disappear off")))
	if ce.Level >= LevelAdmin {
		pending, err1 := b.DB.Disappear.Count(ctx, database.RedactionPending)
		failed, err2 := b.DB.Disappear.Count(ctx, database.RedactionFailed)
		if err1 == nil && err2 == nil {
			n = n.join(renderNotice("All links: %d redactions scheduled, %d refused for good (see `disappear_queue`).", pending, failed))
		}
	}
	ce.reply(n)
}

// disappearText describes a link's timer.
func disappearText(after time.Duration) noticeText {
	if after <= 0 {
		return renderNotice("Disappearing messages are off for this link: new messages stay. Messages sent while the timer was on still disappear on time.")
	}
	return renderNotice("Disappearing messages are on for this link: every new message disappears %s after it was sent, in every linked room, together with ferry's keys for it.", formatDuration(after))
}

// disappearTimerChanged records the timer as room state in every room of the link and starts new outbound
// sessions there, so no session carries messages with and without a deadline.
func (b *Bridge) disappearTimerChanged(ctx context.Context, link *database.Link, after time.Duration) {
	for _, room := range link.Rooms {
		log := zerolog.Ctx(ctx).With().Stringer("target_room_id", room).Logger()
		if b.Crypto != nil {
			if enc, _ := b.StateStore.IsEncrypted(ctx, room); enc {
				if err := b.Crypto.Rotate(ctx, room); err != nil {
					log.Warn().Err(err).Msg("Failed to rotate outbound sessions after a timer change")
				}
				b.disappear().forgetRoom(room)
			}
		}
		b.writeDisappearState(log.WithContext(ctx), room, after)
	}
}

// writeDisappearState records a link's timer as room state in one room (also a room that replaced a linked one).
func (b *Bridge) writeDisappearState(ctx context.Context, room id.RoomID, after time.Duration) {
	log := zerolog.Ctx(ctx)
	if ok, have, need := b.botMaySendState(ctx, room, event.StateBeeperDisappearingTimer); !ok {
		log.Warn().Int("have", have).Int("need", need).Msg("Cannot record the disappearing timer as room state: not enough power")
		return
	}
	if _, err := b.AS.BotIntent().SendStateEvent(ctx, room, event.StateBeeperDisappearingTimer, "", disappearStateContent(after)); err != nil {
		log.Warn().Err(err).Msg("Failed to record the disappearing timer as room state")
	}
}

// ---- deadlines on the relay path ------------------------------------------------------------------------------

// disappearInfo is when a relayed event's copies disappear, as send needs it: the deadline (zero: they stay) and
// the link's timer (or the window the deadline inherited from the event's parent).
type disappearInfo struct {
	deadline time.Time
	window   time.Duration
}

// inboundSession is the Megolm session an encrypted original came with, and its message index there.
type inboundSession struct {
	id       id.SessionID
	index    uint32
	hasIndex bool
}

// inboundSessionOf reads the session an encrypted original came with, and its message index there (handle reads
// it after decrypting); zero for content that names no session.
func inboundSessionOf(encrypted *event.Event) inboundSession {
	content, ok := encrypted.Content.Parsed.(*event.EncryptedEventContent)
	if !ok || content.SessionID == "" {
		return inboundSession{}
	}
	s := inboundSession{id: content.SessionID}
	if index, err := crypto.MegolmMessageIndex(content); err == nil {
		s.index, s.hasIndex = index, true
	}
	return s
}

// relatedEvent returns the event a message relates to (reaction, edit, thread, reference), or "".
func relatedEvent(evt *event.Event) id.EventID {
	rel, ok := evt.Content.Raw["m.relates_to"].(map[string]any)
	if !ok {
		return ""
	}
	target, _ := rel["event_id"].(string)
	return id.EventID(target)
}

// disappearDeadline computes when a relayed event's copies disappear (a zero deadline: they stay) and records the
// inbound session the event came with (zero when it was not encrypted).
func (b *Bridge) disappearDeadline(ctx context.Context, evt *event.Event, link *database.Link, inbound inboundSession) disappearInfo {
	if evt.Type == event.EventRedaction {
		return disappearInfo{}
	}
	info := disappearInfo{window: link.DisappearAfter}
	if link.DisappearAfter > 0 {
		info.deadline = time.UnixMilli(evt.Timestamp).Add(link.DisappearAfter)
	}
	if parent := relatedEvent(evt); parent != "" {
		pd, err := b.DB.Disappear.DeadlineOf(ctx, parent)
		// The parent's copies may still be staged in a batch that has not committed yet.
		if staged := b.DB.EventMap.StagedDeadline(parent); !staged.IsZero() && (pd.IsZero() || staged.Before(pd)) {
			pd = staged
		}
		if err != nil {
			zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to read the deadline of a related event")
		} else if !pd.IsZero() && (info.deadline.IsZero() || pd.Before(info.deadline)) {
			info.deadline = pd
			if info.window == 0 {
				info.window = max(pd.Sub(time.UnixMilli(evt.Timestamp)), MinDisappear)
			}
		}
	}
	if inbound.id != "" {
		b.disappear().noteInbound(ctx, b, evt.RoomID, inbound.id, evt.Sender, info.deadline)
		if !info.deadline.IsZero() && inbound.hasIndex {
			// When the deadline passes, ferry's copies of the sender's session are ratcheted past this message
			// (sweepKeys), even if the session carries other messages.
			if err := b.DB.Disappear.NoteIndex(ctx, evt.RoomID, inbound.id, inbound.index, info.deadline); err != nil {
				zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to record a disappearing message's index")
			}
		}
	}
	if !info.deadline.IsZero() {
		// The original is scheduled now, so it disappears even when no copy of it could be made.
		err := b.DB.Disappear.Schedule(ctx, &database.Redaction{EventID: evt.ID, RoomID: evt.RoomID, Original: true, Deadline: info.deadline})
		if err != nil {
			zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to schedule the original's redaction; its copies schedule it again")
		} else if time.Until(info.deadline) < disappearMaxSleep {
			// Due (or overdue: a reaction to a message about to disappear) before the scheduler would look again.
			select {
			case b.disappear().kick <- struct{}{}:
			default:
			}
		}
	}
	return info
}

// ---- outbound sessions ------------------------------------------------------------------------------------------

// KeyDestroyer is implemented by E2EE layers that can delete Megolm session keys. *crypto.Machine implements it.
type KeyDestroyer interface {
	// DiscardOutboundSession discards one outbound session so the next message starts a new one.
	DiscardOutboundSession(ctx context.Context, roomID id.RoomID, sessionID id.SessionID) error
	// DestroySession deletes every stored key of a session (inbound and outbound, every account).
	DestroySession(ctx context.Context, roomID id.RoomID, sessionID id.SessionID) (int64, error)
	// DestroyLateCopies deletes copies of a destroyed session that ghost devices received afterwards.
	DestroyLateCopies(ctx context.Context, roomID id.RoomID, sessionID id.SessionID) (int64, error)
	// RatchetInboundSession moves every stored copy of a session forward to start at floor, so messages below it
	// no longer decrypt from ferry's database.
	RatchetInboundSession(ctx context.Context, roomID id.RoomID, sessionID id.SessionID, floor uint32) (int, error)
}

type senderRoom struct {
	sender id.UserID
	room   id.RoomID
}

type roomSession struct {
	room    id.RoomID
	session id.SessionID
}

// currentOutbound is an outbound session ferry encrypted with. It is shared by every sender that used it (in
// single-device mode the bot's session carries the bot's and every ghost's messages), so a change of its kind
// is seen by all of them.
type currentOutbound struct {
	session   id.SessionID
	firstUsed time.Time
	keep      bool
}

// disappearer holds the in-memory index of tracked sessions, so the relay path touches the database only for
// sessions that matter.
type disappearer struct {
	lock     sync.Mutex
	tracked  map[roomSession]bool // sessions that have a row in disappear_session
	current  map[senderRoom]*currentOutbound
	sessions map[roomSession]*currentOutbound // the same objects, by session
	loaded   bool
	kick     chan struct{}
}

func (b *Bridge) disappear() *disappearer {
	b.disappearOnce.Do(func() {
		b.disappearing = &disappearer{tracked: make(map[roomSession]bool), current: make(map[senderRoom]*currentOutbound),
			sessions: make(map[roomSession]*currentOutbound), kick: make(chan struct{}, 1)}
	})
	return b.disappearing
}

func (d *disappearer) load(ctx context.Context, db *database.Database) error {
	rows, err := db.Disappear.LiveTracked(ctx)
	if err != nil {
		return err
	}
	d.lock.Lock()
	defer d.lock.Unlock()
	for _, s := range rows {
		d.tracked[roomSession{s.RoomID, s.SessionID}] = true
	}
	d.loaded = true
	return nil
}

func (d *disappearer) isTracked(room id.RoomID, session id.SessionID) bool {
	d.lock.Lock()
	defer d.lock.Unlock()
	return d.tracked[roomSession{room, session}]
}

func (d *disappearer) forgetRoom(room id.RoomID) {
	d.lock.Lock()
	defer d.lock.Unlock()
	for k := range d.current {
		if k.room == room {
			delete(d.current, k)
		}
	}
	for k := range d.sessions {
		if k.room == room {
			delete(d.sessions, k)
		}
	}
}

// use records that sender encrypted with session in room, and returns the shared record of the session.
func (d *disappearer) use(sender id.UserID, room id.RoomID, session id.SessionID, firstUsed time.Time) *currentOutbound {
	cur := d.sessions[roomSession{room, session}]
	if cur == nil {
		cur = &currentOutbound{session: session, firstUsed: firstUsed}
		d.sessions[roomSession{room, session}] = cur
	}
	sr := senderRoom{sender, room}
	prev := d.current[sr]
	d.current[sr] = cur
	if prev != nil && prev != cur {
		// The sender moved on to another session: its record goes once no sender uses it (otherwise every
		// rotated session of every sender stayed here for good).
		for _, c := range d.current {
			if c == prev {
				return cur
			}
		}
		delete(d.sessions, roomSession{room, prev.session})
	}
	return cur
}

func (d *disappearer) forgetSession(room id.RoomID, session id.SessionID) {
	d.lock.Lock()
	defer d.lock.Unlock()
	for k, c := range d.current {
		if k.room == room && c.session == session {
			delete(d.current, k)
		}
	}
	delete(d.sessions, roomSession{room, session})
}

func (d *disappearer) noteInbound(ctx context.Context, b *Bridge, room id.RoomID, session id.SessionID, sender id.UserID, deadline time.Time) {
	if deadline.IsZero() {
		if d.isTracked(room, session) {
			if err := b.DB.Disappear.KeepSession(ctx, room, session); err != nil {
				zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to mark an inbound session as kept")
			}
		}
		return
	}
	_, err := b.DB.Disappear.NoteSession(ctx, &database.SessionUse{RoomID: room, SessionID: session, Sender: sender, At: time.Now(), Deadline: deadline})
	if err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to track an inbound session")
		return
	}
	d.lock.Lock()
	d.tracked[roomSession{room, session}] = true
	d.lock.Unlock()
}

// outboundInfo is the deadline information of a message ferry encrypts as sender: the bot's own notices (a relay
// failure reported while a disappearing message is relayed, say) never disappear.
func (b *Bridge) outboundInfo(sender id.UserID, dis disappearInfo) disappearInfo {
	if b.AS != nil && sender == b.AS.BotMXID() {
		return disappearInfo{}
	}
	return dis
}

// beforeEncrypt starts a new outbound session for sender in room when the current one must not carry this
// message (which disappears as dis says): it is older than the timer, or it carried messages of the other kind
// (with / without deadline).
func (b *Bridge) beforeEncrypt(ctx context.Context, sender id.UserID, room id.RoomID, dis disappearInfo) {
	kd, ok := b.Crypto.(KeyDestroyer)
	if !ok {
		return
	}
	info := b.outboundInfo(sender, dis)
	disappearing := !info.deadline.IsZero()
	d := b.disappear()
	d.lock.Lock()
	var cur currentOutbound
	if c := d.current[senderRoom{sender, room}]; c != nil {
		cur = *c
	}
	d.lock.Unlock()
	if cur.session == "" {
		return
	}
	stale := cur.keep == disappearing || disappearing && time.Since(cur.firstUsed) >= info.window
	if !stale {
		return
	}
	if err := kd.DiscardOutboundSession(ctx, room, cur.session); err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to rotate an outbound session for disappearing messages")
		return
	}
	d.forgetSession(room, cur.session)
}

// afterEncrypt tracks the outbound session a message (which disappears as dis says) was encrypted with when the
// message disappears or the session is tracked already.
func (b *Bridge) afterEncrypt(ctx context.Context, sender id.UserID, room id.RoomID, enc *event.EncryptedEventContent, dis disappearInfo) {
	if enc == nil || enc.SessionID == "" {
		return
	}
	if _, ok := b.Crypto.(KeyDestroyer); !ok {
		return
	}
	deadline := b.outboundInfo(sender, dis).deadline
	d := b.disappear()
	if deadline.IsZero() && !d.isTracked(room, enc.SessionID) {
		d.lock.Lock()
		// Remembered (without a database row) so a later disappearing message does not join this session.
		d.use(sender, room, enc.SessionID, time.Now()).keep = true
		d.lock.Unlock()
		return
	}
	s, err := b.DB.Disappear.NoteSession(ctx, &database.SessionUse{RoomID: room, SessionID: enc.SessionID, Sender: sender, Outbound: true, At: time.Now(), Deadline: deadline})
	if err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to track an outbound session")
		return
	}
	d.lock.Lock()
	d.tracked[roomSession{room, enc.SessionID}] = true
	cur := d.use(sender, room, s.SessionID, s.FirstUsed)
	cur.firstUsed, cur.keep = s.FirstUsed, s.Keep
	d.lock.Unlock()
}

// ---- the scheduler ----------------------------------------------------------------------------------------------

// clock is the scheduler's time source; tests inject a fake one.
type clock interface {
	Now() time.Time
	After(d time.Duration) <-chan time.Time
}

type realClock struct{}

func (realClock) Now() time.Time                         { return time.Now() }
func (realClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// redactionStore is the part of the database the scheduler uses.
type redactionStore interface {
	Due(ctx context.Context, now time.Time, limit int) ([]*database.Redaction, error)
	Next(ctx context.Context) (time.Time, bool, error)
	Done(ctx context.Context, evt id.EventID) error
	Retry(ctx context.Context, evt id.EventID, notBefore time.Time, lastError string) error
	Fail(ctx context.Context, evt id.EventID, lastError string) error
}

// redactionResult is what one redaction attempt did.
type redactionResult struct {
	done    bool          // redacted, or nothing left to redact
	fail    string        // permanent failure: the reason
	retryIn time.Duration // transient failure: wait this long (0: exponential backoff)
	err     error
}

// scheduler redacts disappearing events when their deadlines come.
type scheduler struct {
	store    redactionStore
	redact   func(ctx context.Context, r *database.Redaction) redactionResult
	clock    clock
	kick     <-chan struct{}
	maxSleep time.Duration
	log      zerolog.Logger
	// sweep runs between rounds (key destruction); nil in tests of the redaction part alone.
	sweep      func(ctx context.Context, now time.Time)
	sweepEvery time.Duration
	lastSweep  time.Time
}

// run loops until ctx ends.
func (s *scheduler) run(ctx context.Context) {
	for ctx.Err() == nil {
		wait := s.round(ctx)
		if wait <= 0 {
			continue
		}
		select {
		case <-ctx.Done():
			return
		case <-s.kick:
		case <-s.clock.After(wait):
		}
	}
}

// round redacts everything due now and returns how long to wait before the next round.
func (s *scheduler) round(ctx context.Context) time.Duration {
	now := s.clock.Now()
	if s.sweep != nil && now.Sub(s.lastSweep) >= s.sweepEvery {
		s.lastSweep = now
		s.sweep(ctx, now)
	}
	due, err := s.store.Due(ctx, now, disappearBatch)
	if err != nil {
		s.log.Err(err).Msg("Failed to read due redactions")
		return s.maxSleep
	}
	s.process(ctx, now, due)
	if len(due) == disappearBatch {
		return 0
	}
	next, ok, err := s.store.Next(ctx)
	if err != nil {
		s.log.Err(err).Msg("Failed to read the next deadline")
		return s.maxSleep
	}
	wait := s.maxSleep
	if ok {
		wait = min(wait, max(next.Sub(s.clock.Now()), time.Millisecond))
	}
	return wait
}

// process redacts due events, a few at a time.
func (s *scheduler) process(ctx context.Context, now time.Time, due []*database.Redaction) {
	sem := make(chan struct{}, disappearParallel)
	var wg sync.WaitGroup
	for _, r := range due {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			s.one(ctx, now, r)
		}()
	}
	wg.Wait()
}

func (s *scheduler) one(ctx context.Context, now time.Time, r *database.Redaction) {
	log := s.log.With().Stringer("event_id", r.EventID).Stringer("room_id", r.RoomID).Bool("original", r.Original).Logger()
	res := s.redact(ctx, r)
	var err error
	switch {
	case res.done:
		err = s.store.Done(ctx, r.EventID)
		late := s.clock.Now().Sub(r.Deadline)
		metrics.DisappearRedactions.WithLabelValues("done").Inc()
		metrics.DisappearLateness.Observe(max(late, 0).Seconds())
		log.Debug().Dur("late_by", late).Msg("Disappearing event redacted")
	case res.fail != "":
		metrics.DisappearRedactions.WithLabelValues("failed").Inc()
		log.Warn().Err(res.err).Str("reason", res.fail).Msg("Cannot redact a disappearing event")
		err = s.store.Fail(ctx, r.EventID, res.fail)
	default:
		metrics.DisappearRedactions.WithLabelValues("retry").Inc()
		wait := res.retryIn
		if wait <= 0 {
			wait = min(time.Second<<min(r.Attempts, 10), disappearMaxRetry)
		}
		log.Warn().Err(res.err).Int("attempt", r.Attempts+1).Dur("retry_in", wait).Msg("Redacting a disappearing event failed, will retry")
		msg := "error"
		if res.err != nil {
			msg = res.err.Error()
		}
		err = s.store.Retry(ctx, r.EventID, now.Add(wait), msg)
	}
	if err != nil {
		log.Err(err).Msg("Failed to record a redaction's outcome")
	}
}

// startDisappear launches the scheduler.
func (b *Bridge) startDisappear(ctx context.Context) {
	d := b.disappear()
	if err := d.load(ctx, b.DB); err != nil {
		b.Log.Err(err).Msg("Failed to load tracked sessions; they are loaded again on the next sweep")
	}
	log := b.Log.With().Str("component", "disappear").Logger()
	s := &scheduler{
		store: b.DB.Disappear, redact: b.redactDisappearing, clock: realClock{}, kick: d.kick,
		maxSleep: disappearMaxSleep, log: log, sweep: b.sweepKeys, sweepEvery: keySweepInterval,
	}
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		s.run(log.WithContext(ctx))
	}()
}

// disappearTxnID is the transaction ID of the redaction of a disappearing event.
func disappearTxnID(evt id.EventID) string {
	sum := sha256.Sum256([]byte("disappear\x00" + string(evt)))
	return "ferry_disappear_" + base64.RawURLEncoding.EncodeToString(sum[:18])
}

// redactDisappearing redacts one disappearing event: a copy as the ghost that sent it, an original as the bot.
func (b *Bridge) redactDisappearing(ctx context.Context, r *database.Redaction) redactionResult {
	intent := b.AS.BotIntent()
	if r.Original {
		if !b.Config.RedactOriginals {
			return redactionResult{done: true}
		}
		if pl, err := b.powerLevels(ctx, r.RoomID); err == nil && pl.GetUserLevel(b.AS.BotMXID()) < pl.Redact() {
			return redactionResult{fail: fmt.Sprintf("the bot's power level %d is below the %d needed to redact others' messages", pl.GetUserLevel(b.AS.BotMXID()), pl.Redact())}
		}
	} else if r.RedactAs != "" {
		intent = b.AS.Intent(r.RedactAs)
	}
	// No reason: it would be readable by the server.
	_, err := intent.RedactEvent(ctx, r.RoomID, r.EventID, mautrix.ReqRedact{TxnID: disappearTxnID(r.EventID)})
	if err == nil {
		return redactionResult{done: true}
	}
	var httpErr mautrix.HTTPError
	if errors.As(err, &httpErr) && httpErr.Response != nil && httpErr.Response.StatusCode == http.StatusNotFound {
		return redactionResult{done: true} // the event is gone already
	}
	res := classify(err)
	if res.state == database.InboxFailed {
		return redactionResult{fail: userFacingError(err), err: err}
	}
	return redactionResult{retryIn: res.retryIn, err: err}
}

// sweepKeys deletes the keys of sessions whose messages all passed their deadlines.
func (b *Bridge) sweepKeys(ctx context.Context, now time.Time) {
	kd, ok := b.Crypto.(KeyDestroyer)
	if !ok {
		return
	}
	log := zerolog.Ctx(ctx)
	d := b.disappear()
	if !d.loaded {
		if err := d.load(ctx, b.DB); err != nil {
			log.Err(err).Msg("Failed to load tracked sessions")
			return
		}
	}
	expired, err := b.DB.Disappear.ExpiredSessions(ctx, now, now.Add(-outboundIdle), now.Add(-b.Config.DisappearKeyIdle), now.Add(-keyResweep))
	if err != nil {
		log.Err(err).Msg("Failed to list expired sessions")
		return
	}
	busy := make(map[id.RoomID]bool)
	roomBusy := func(room id.RoomID) bool {
		// A message still queued in the room may need the session to decrypt.
		waiting, ok := busy[room]
		if !ok {
			counts, err := b.DB.Inbox.CountByState(ctx, room)
			waiting = err != nil || counts[database.InboxPending]+counts[database.InboxWaitingKeys] > 0
			busy[room] = waiting
		}
		return waiting
	}
	b.ratchetExpired(ctx, kd, now, roomBusy)
	for _, s := range expired {
		if !s.Outbound && roomBusy(s.RoomID) {
			continue
		}
		destroy := kd.DestroySession
		if s.Deleted {
			// Deleted already: a key ferry asked for again (a later message used the session) must stay.
			destroy = kd.DestroyLateCopies
		}
		n, err := destroy(ctx, s.RoomID, s.SessionID)
		if err != nil {
			log.Err(err).Msg("Failed to delete an expired session")
			continue
		}
		if !s.Deleted {
			if err = b.DB.Disappear.SessionDeleted(ctx, s.RoomID, s.SessionID, now); err != nil {
				log.Err(err).Msg("Failed to record a deleted session")
			}
			log.Info().Stringer("room_id", s.RoomID).Stringer("session_id", s.SessionID).Bool("outbound", s.Outbound).
				Int64("rows", n).Msg("Deleted the keys of a session whose messages all disappeared")
		} else if n > 0 {
			log.Info().Stringer("room_id", s.RoomID).Stringer("session_id", s.SessionID).Int64("rows", n).Msg("Deleted a late copy of an expired session's keys")
		}
		d.forgetSession(s.RoomID, s.SessionID)
	}
}

// ratchetExpired moves ferry's stored copies of users' sessions past every disappearing message whose deadline
// passed, so the original of an expired message no longer decrypts from ferry's database even when its sender's
// session also carried messages that have not expired (or carry no deadline): only what messages still to come
// need is kept. The floor is remembered, so a copy of the session that arrives later is ratcheted too.
func (b *Bridge) ratchetExpired(ctx context.Context, kd KeyDestroyer, now time.Time, roomBusy func(id.RoomID) bool) {
	log := zerolog.Ctx(ctx)
	due, err := b.DB.Disappear.RatchetsDue(ctx, now)
	if err != nil {
		log.Err(err).Msg("Failed to list sessions to ratchet")
		return
	}
	for _, r := range due {
		if roomBusy(r.RoomID) {
			continue
		}
		n, err := kd.RatchetInboundSession(ctx, r.RoomID, r.SessionID, r.Floor)
		if err != nil {
			log.Err(err).Stringer("session_id", r.SessionID).Msg("Failed to ratchet a session past expired messages")
			continue
		}
		if err = b.DB.Disappear.Ratcheted(ctx, r.RoomID, r.SessionID, r.Floor); err != nil {
			log.Err(err).Msg("Failed to record a ratcheted session")
			continue
		}
		log.Info().Stringer("room_id", r.RoomID).Stringer("session_id", r.SessionID).Uint32("first_index_kept", r.Floor).Int("copies", n).
			Msg("Ratcheted a session past its expired messages")
	}
}

// enforceFloor ratchets a copy of a session that just arrived (a key request answered, a forward) to the floor
// ferry keeps of it: an earlier index of a session whose messages expired is never imported back.
func (b *Bridge) enforceFloor(ctx context.Context, roomID id.RoomID, sessionID id.SessionID) {
	kd, ok := b.Crypto.(KeyDestroyer)
	if !ok {
		return
	}
	floor, err := b.DB.Disappear.Floor(ctx, roomID, sessionID)
	if err != nil || floor == 0 {
		return
	}
	if n, err := kd.RatchetInboundSession(ctx, roomID, sessionID, floor); err != nil {
		zerolog.Ctx(ctx).Err(err).Stringer("session_id", sessionID).Msg("Failed to ratchet a re-imported session to its floor")
	} else if n > 0 {
		zerolog.Ctx(ctx).Info().Stringer("session_id", sessionID).Uint32("first_index_kept", floor).Msg("Ratcheted a re-imported session past its expired messages")
	}
}
