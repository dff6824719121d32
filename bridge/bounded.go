package bridge

// Bounded by design: what strangers can make ferry keep is capped, and per-room state is freed when idle.
//   - Room workers end after workerIdle without work and are made again by the next event (worker.go).
//   - In-memory caches (room names, ghosts ready in a room, links by room) are dropped whole when they grow past
//     maxCacheEntries: they refill from the database and the homeserver on demand.
//   - Handled inbox rows (kept so that a redelivered event is recognised) are deleted after inboxRetention.
//   - Undecryptable events wait for their key at most parkedExpiry, and at most maxParkedPerRoom of them per
//     room; the rest are given up, with one notice per room saying how many from whom (expireParked).
//   - Bot notices are rate-limited per room and user (noticeLimiter): a user who floods commands, or a device that
//     floods undecryptable messages, gets a few answers, not one each.
//   - A send that still fails after maxSendAttempts (minutes of backoff) is no silent stall: its sender is told
//     once, in its room, that the room waits for it. ferry keeps trying: an outage must not lose a message.

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
)

// Limits of what ferry keeps.
const (
	workerIdle        = 10 * time.Minute
	maxCacheEntries   = 10000
	inboxRetention    = 24 * time.Hour
	inboxPruneBatch   = 1000
	inboxPruneEvery   = time.Minute
	parkedExpiry      = 24 * time.Hour
	maxParkedPerRoom  = 200
	maxSendAttempts   = 10
	maxNoticeBuckets  = 10000
	noticeBucketReset = time.Hour
)

// noticeKind names a class of notices with its own budget per room and user.
type noticeKind uint8

const (
	// noticeReply: answers to commands (refusals included).
	noticeReply noticeKind = iota
	// noticeAboutSender: notices ferry posts about what a user sent (a missing key, a message it could not
	// relay).
	noticeAboutSender
	// noticeStatus: com.beeper.message_send_status events about what a user sent (status.go).
	noticeStatus
)

// noticeBudget is a token bucket: burst notices at once, then one every refill.
type noticeBudget struct {
	burst  float64
	refill time.Duration
}

var noticeBudgets = [...]noticeBudget{
	noticeReply:       {burst: 20, refill: 3 * time.Second},
	noticeAboutSender: {burst: 3, refill: 5 * time.Minute},
	noticeStatus:      {burst: 30, refill: 10 * time.Second},
}

type noticeKey struct {
	room id.RoomID
	user id.UserID
	kind noticeKind
}

type noticeBucket struct {
	tokens float64
	at     time.Time
}

// noticeLimiter rate-limits bot notices per room, user and kind.
type noticeLimiter struct {
	// guards the following fields
	lock    sync.Mutex
	buckets map[noticeKey]*noticeBucket
}

// allow takes one notice from the budget of (room, user, kind) at now, or reports that it is spent.
func (l *noticeLimiter) allow(room id.RoomID, user id.UserID, kind noticeKind, now time.Time) bool {
	l.lock.Lock()
	defer l.lock.Unlock()
	budget := noticeBudgets[kind]
	if l.buckets == nil {
		l.buckets = make(map[noticeKey]*noticeBucket)
	}
	k := noticeKey{room, user, kind}
	b, ok := l.buckets[k]
	if !ok {
		if len(l.buckets) >= maxNoticeBuckets {
			// Buckets untouched for an hour are full again anyway: forgetting them changes nothing.
			for key, old := range l.buckets {
				if now.Sub(old.at) > noticeBucketReset {
					delete(l.buckets, key)
				}
			}
			if len(l.buckets) >= maxNoticeBuckets {
				return false // under a flood of distinct users: no new budgets until old ones are forgotten
			}
		}
		b = &noticeBucket{tokens: budget.burst, at: now}
		l.buckets[k] = b
	}
	b.tokens = min(budget.burst, b.tokens+float64(now.Sub(b.at))/float64(budget.refill))
	b.at = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// mayNotice reports whether ferry may post a notice of kind about user in room now, and logs when it may not.
func (b *Bridge) mayNotice(ctx context.Context, room id.RoomID, user id.UserID, kind noticeKind) bool {
	if b.notices.allow(room, user, kind, time.Now()) {
		return true
	}
	zerolog.Ctx(ctx).Debug().Stringer("target_room_id", room).Stringer("user_id", user).Msg("Notice not sent: rate limit for this room and user")
	return false
}

// pruneInbox deletes handled inbox rows older than inboxRetention, a batch at a time.
func (b *Bridge) pruneInbox(ctx context.Context, now time.Time) {
	for ctx.Err() == nil {
		n, err := b.DB.Inbox.Prune(ctx, now.Add(-inboxRetention), inboxPruneBatch)
		if err != nil {
			zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to prune handled inbox rows")
			return
		}
		if n < inboxPruneBatch {
			return
		}
	}
}

// expireParked gives up on parked events older than parkedExpiry, and on the oldest beyond maxParkedPerRoom in a
// room, marking them failed. Each room is told once per round how many messages from whom will not be relayed.
// It returns the rows still parked.
func (b *Bridge) expireParked(ctx context.Context, parked []*database.InboxEvent, now time.Time) []*database.InboxEvent {
	perRoom := make(map[id.RoomID]int)
	for _, row := range parked {
		perRoom[row.RoomID]++
	}
	var keep []*database.InboxEvent
	expired := make(map[id.RoomID][]*database.InboxEvent)
	for _, row := range parked { // oldest first
		over := perRoom[row.RoomID] > maxParkedPerRoom
		if over || now.Sub(row.ReceivedAt) > parkedExpiry {
			expired[row.RoomID] = append(expired[row.RoomID], row)
			perRoom[row.RoomID]--
			continue
		}
		keep = append(keep, row)
	}
	rooms := make([]id.RoomID, 0, len(expired))
	for room := range expired {
		rooms = append(rooms, room)
	}
	sort.Slice(rooms, func(i, j int) bool { return rooms[i] < rooms[j] })
	for _, room := range rooms {
		rows := expired[room]
		seqs := make([]int64, len(rows))
		senders := map[id.UserID]bool{}
		var names []string
		for i, row := range rows {
			seqs[i] = row.Seq
			if !senders[row.Sender] {
				senders[row.Sender] = true
				names = append(names, string(row.Sender))
			}
			// Undecryptable for good: its status says so, and its own missing-key notice, if any, is replaced by
			// the room's one below.
			b.tellSender(ctx, deliveryOf(row), deliveryProblem{status: event.MessageStatusFail, reason: event.MessageStatusUndecryptable, kind: "nokey_expired"})
		}
		if err := b.DB.Inbox.FinishMany(ctx, seqs, database.InboxFailed); err != nil {
			zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to give up on parked events")
			continue
		}
		zerolog.Ctx(ctx).Info().Stringer("room_id", room).Int("events", len(rows)).Msg("Gave up waiting for the keys of parked events")
		n := renderNotice("ferry gave up waiting for the room keys of %d message(s) from %s: they stayed undecryptable too long (or too many waited), and will not be relayed.",
			len(rows), strings.Join(names, ", "))
		txn := "ferry_parked_expired_" + TxnID(rows[len(rows)-1].EventID, room)
		if _, err := b.sendRenderedNotice(ctx, room, n, "", txn); err != nil {
			zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to tell a room that parked events expired")
		}
	}
	return keep
}

// boundedCacheFull tells whether an in-memory cache of n entries is to be dropped whole before another entry:
// it refills on demand, which costs nothing in steady state and keeps a flood of rooms from growing it.
func boundedCacheFull(n int) bool { return n >= maxCacheEntries }

// workerIdle is how long a room worker waits for work before it is freed (workerIdleForTest in tests).
func (b *Bridge) workerIdle() time.Duration {
	if b.idleForTest > 0 {
		return b.idleForTest
	}
	return workerIdle
}

// tellStalled tells an event's sender, in its room, that ferry has not managed to relay it after
// maxSendAttempts and keeps trying (status.go: the notice goes once the event is relayed).
func (b *Bridge) tellStalled(ctx context.Context, row *database.InboxEvent, err error) {
	why := "the homeserver did not answer"
	var httpErr mautrix.HTTPError
	if errors.As(err, &httpErr) && httpErr.Response != nil {
		why = fmt.Sprintf("the homeserver answered %d", httpErr.Response.StatusCode)
		if httpErr.RespError != nil {
			why += " " + httpErr.RespError.ErrCode
		}
	}
	b.tellSender(ctx, deliveryOf(row), deliveryProblem{
		status: event.MessageStatusRetriable, reason: event.MessageStatusNetworkError, kind: "stalled",
		notice: renderNotice("ferry has not managed to relay this message after %d attempts (%s); it keeps trying, and later messages of this room wait for it.", maxSendAttempts, why),
	})
}
