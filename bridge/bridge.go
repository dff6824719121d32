// Package bridge is ferry's relay. It takes events the homeserver pushes (intake), records them durably in the
// inbox before acknowledging, and drains the inbox with one ordered worker per source room: decrypt with the
// bot's device; then, for every other room of the room's link, read up front what the event refers to there
// (Resolve: counterparts of the events it relates to, a call's ID), translate (Translate, a pure function of
// the event and what was read), encrypt, send as the original sender's ghost with a deterministic transaction
// ID, and record the copy in the event map. What handling one event carries on the way (its batch of writes,
// its disappearing deadline) is passed as a parameter (eventRun), never in the context.
//
// Relay contract:
//   - Crossing a link: m.room.message (every msgtype), m.sticker, m.reaction, redactions, and m.call.*; replies,
//     threads, edits and reactions point at the counterpart in the target room; mentions map real users to
//     ghosts and ghosts back to real users.
//   - Authority (authority.go): only real redactions cross, and only when their sender sent the original or may
//     redact others in the source room; commands that act on a room need their sender joined there now and the
//     power.
//   - Dropped: events from ferry's own users (bot, ghosts) and from blocked users, bot commands, state events,
//     encrypted events whose cleartext type is control (a redaction, a state type), relations to events ferry
//     never relayed when no graceful fallback exists (edits, reactions).
//   - Room upgrades (upgrade.go): a link follows a linked room's tombstone into the room that replaces it; edits,
//     reactions and redactions of events from before the upgrade go to the old room where those live (restated
//     in the new room when the old one is muted), replies to them link to the old room.
//   - Encryption: a copy sent into an encrypted room is always encrypted; relaying from an encrypted room into
//     an unencrypted one is refused unless bridge.allow_unencrypted_targets is set.
//   - Delivery status (status.go): a message that cannot be relayed into a room (refused, failing, undecryptable)
//     gets a reply notice and com.beeper.message_send_status in its own room; both resolve when it crosses later.
//   - Durability: an event is acknowledged to the homeserver only once recorded; it is relayed at most once per
//     target room (event map + deterministic transaction IDs) and at least once (inbox rows stay until done).
package bridge

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/appservice"
	"maunium.net/go/mautrix/id"
	"maunium.net/go/mautrix/sqlstatestore"

	"go.ferry.im/ferry/database"
)

// Version is set by cmd/ferry at start.
var Version = "dev"

// Bridge is one ferry instance attached to one homeserver.
type Bridge struct {
	Log        zerolog.Logger
	Config     *Config
	DB         *database.Database
	AS         *appservice.AppService
	StateStore *sqlstatestore.SQLStateStore
	Crypto     Crypto
	Ghosts     GhostNamer
	// EncryptionPath describes how ferry gets keys from this homeserver (for status and logs).
	EncryptionPath string
	// Reload re-reads the permissions from the config file (the reload command); nil when unavailable.
	Reload func() (Permissions, error)
	// SyncOrders: the homeserver may push events out of their room's order (Dendrite 0.13.8 does after a restart)
	// or not at all (Synapse 1.163.2 can leave a transaction unsent), and ferry's bot runs a /sync that shows the
	// order (IngestSynced): its device's, or the bot user's rooms-only one with appservice-mode encryption. Events
	// the homeserver pushes then wait, holding their room's queue, until /sync has shown them (at most
	// syncOrderWait).
	SyncOrders atomic.Bool
	// HoldOnGaps (with SyncOrders, the rooms-only /sync): pushed events wait only when their transaction does not
	// follow the last one recorded (txngaps.go); WakeRoomSync then gets the /sync reading at once.
	HoldOnGaps   atomic.Bool
	WakeRoomSync func()
	gaps         txnGaps
	// syncCovers (Unix ns): every room event the homeserver had before it was in a /sync batch IngestSynced
	// recorded (crypto.SyncedBatch.Covers).
	syncCovers atomic.Int64

	perms     atomic.Pointer[Permissions]
	startedAt time.Time
	rootCtx   context.Context
	cancel    context.CancelFunc
	wg        sync.WaitGroup

	// guards the following fields
	workersLock sync.Mutex
	workers     map[id.RoomID]*roomWorker
	workerCtx   context.Context // set by Start: workers run from then on
	idleForTest time.Duration   // when set, how long a worker waits for work before it is freed

	roomNames roomNameCache
	notices   noticeLimiter // bounded.go
	stats     stats
	commits   groupCommit // room workers' batches, written together (worker.go)
	hot       hotCache
	removals  removalCache // moderation.go
	// inviteFirst holds the target rooms where a ghost's join was refused until the bot invited it
	// (ghostprofile.go): one entry per such room, at most one per room ferry brings ghosts into.
	inviteFirst sync.Map   // id.RoomID → struct{}
	prep        senderPrep // new senders' devices prepared side by side (prepare.go)

	disappearOnce sync.Once
	disappearing  *disappearer // see disappear.go

	ephemeralOnce sync.Once
	eph           *ephemeralRelay // typing and read receipts (ephemeral.go)

	sent    sentLedger   // rooms to read back before sending, and what read-backs found (reconcile.go)
	failing failingRooms // rooms whose homeserver keeps failing sends (relay.go)
	joins   joinWaits    // ghosts' joins whose first message has not gone out yet (joinwait.go)
	health  *hsHealth    // outages of the homeserver (hshealth.go)
	pushes  pushWatch    // signs that the homeserver holds its pushes back (pushwatch.go)

	// wrongTokenLog says once a minute that the homeserver presents a wrong hs_token (http.go).
	wrongTokenLog everyLimiter

	// guards the following fields
	keyRequestsLock sync.Mutex
	keyRequests     map[id.SessionID]*keyAsk // sessions whose keys ferry asked for while it runs (handle.go)
}

// New creates a bridge. Call Start to begin draining the inbox.
func New(log zerolog.Logger, cfg *Config, perms Permissions, db *database.Database, as *appservice.AppService, ss *sqlstatestore.SQLStateStore, cr Crypto) *Bridge {
	b := &Bridge{
		Log:        log,
		Config:     cfg,
		DB:         db,
		AS:         as,
		StateStore: ss,
		Crypto:     cr,
		Ghosts:     GhostNamer{Prefix: cfg.GhostPrefix, Domain: as.HomeserverDomain, BotUserID: as.BotMXID()},
		workers:    make(map[id.RoomID]*roomWorker),
	}
	// The relay retries failed requests itself, durably (the inbox row keeps its place and its not_before) and
	// honouring retry_after_ms; mautrix's in-client retries would hold a room's worker for up to a minute with
	// their own backoff and read only the Retry-After header, which Dendrite does not send.
	as.DefaultHTTPRetries = 0
	// Every client of the appservice shares its HTTP client: one watch sees all of ferry's requests.
	b.health = watchHomeserver(as.HTTPClient, b.Log, b.homeserverRecovered)
	b.pushes.watchSends(as.HTTPClient)
	b.SetPermissions(perms)
	b.roomNames.names = make(map[id.RoomID]string)
	return b
}

// SetPermissions replaces the permission table (used at start and by the reload command).
func (b *Bridge) SetPermissions(p Permissions) {
	b.perms.Store(&p)
}

// Permission returns the configured level of a user.
func (b *Bridge) Permission(user id.UserID) Level {
	return b.perms.Load().Get(user)
}

// Start launches workers for every room with recorded, unfinished events and the background loops.
func (b *Bridge) Start(ctx context.Context) error {
	// mautrix creates the bot's client and intent on first use, without a lock; room workers and the preparation
	// of new senders (prepare.go) ask for them side by side, so both are created here, before any of them runs.
	_ = b.AS.BotClient()
	_ = b.AS.BotIntent()
	rooms, err := b.DB.Inbox.RoomsWithWork(ctx)
	if err != nil {
		return err
	}
	if err = b.loadReadback(ctx); err != nil {
		return err
	}
	unclean, prevStart, err := b.markRunning(ctx)
	if err != nil {
		return fmt.Errorf("failed to record that the relay runs: %w", err)
	}
	if unclean {
		// Sends in flight when the previous run died may have been posted: the rooms are read back before the
		// next send into them (reconcile.go).
		n, err := b.markInFlight(ctx, prevStart)
		if err != nil {
			return fmt.Errorf("failed to mark the rooms to read back after an unclean stop: %w", err)
		}
		// What the dead run left on its way to the homeserver may arrive after this start: the read-backs look
		// only once it has.
		b.health.settleFrom(time.Now())
		b.Log.Info().Int("rooms", n).Msg("The previous run stopped uncleanly: rooms with pending events are read back before ferry sends into them")
	}
	b.startedAt = time.Now()
	b.rootCtx, b.cancel = context.WithCancel(ctx)
	// Workers run from here on: those of rooms whose transactions came in before Start too.
	b.workersLock.Lock()
	b.workerCtx = b.rootCtx
	for _, w := range b.workers {
		if !w.running {
			b.runWorkerLocked(w)
		}
	}
	b.workersLock.Unlock()
	for _, room := range rooms {
		b.Notify(room)
	}
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		b.parkedLoop(b.rootCtx)
	}()
	b.startDisappear(b.rootCtx)
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		b.ephemeralLoop(b.rootCtx)
	}()
	if b.AS.SpecVersions != nil && b.AS.SpecVersions.Supports(mautrix.FeatureAppservicePing) {
		b.pushes.on.Store(true)
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			b.pushWatchLoop(b.Log.With().Str("component", "pushwatch").Logger().WithContext(b.rootCtx))
		}()
	}
	b.Log.Info().Int("rooms_with_backlog", len(rooms)).Msg("Relay started")
	return nil
}

// running tells whether Start has run and Stop has not.
func (b *Bridge) running() bool {
	b.workersLock.Lock()
	ctx := b.workerCtx
	b.workersLock.Unlock()
	return ctx != nil && ctx.Err() == nil
}

// Stop cancels workers and waits for them to finish their current event.
func (b *Bridge) Stop() {
	if b.cancel == nil {
		return
	}
	// Cancelled under the workers' lock, so no worker starts after this (runWorkerLocked).
	b.workersLock.Lock()
	b.cancel()
	b.workersLock.Unlock()
	b.wg.Wait()
	b.commits.closeKept()
	b.markStopped()
}

// Uptime is how long the relay has been running.
func (b *Bridge) Uptime() time.Duration { return time.Since(b.startedAt) }

type roomNameCache struct {
	// guards the following fields
	lock  sync.Mutex
	names map[id.RoomID]string
}

// stats are in-memory counters for the status command.
type stats struct {
	relayed   atomic.Int64
	lastError atomic.Pointer[errorRecord]
	// guards the following fields
	lock   sync.Mutex
	errors []errorRecord
}

type errorRecord struct {
	at   time.Time
	room id.RoomID
}

func (s *stats) recordError(room id.RoomID) {
	s.lock.Lock()
	defer s.lock.Unlock()
	now := time.Now()
	s.errors = append(s.errors, errorRecord{at: now, room: room})
	cut := 0
	for cut < len(s.errors) && now.Sub(s.errors[cut].at) > time.Hour {
		cut++
	}
	s.errors = s.errors[cut:]
}

// errorsLastHour counts errors in the last hour for a set of rooms (all rooms when nil).
func (s *stats) errorsLastHour(rooms []id.RoomID) int {
	s.lock.Lock()
	defer s.lock.Unlock()
	n := 0
	for _, e := range s.errors {
		if time.Since(e.at) > time.Hour {
			continue
		}
		if rooms == nil {
			n++
			continue
		}
		for _, r := range rooms {
			if r == e.room {
				n++
				break
			}
		}
	}
	return n
}

// everyLimiter allows one event per minute (a log line that would otherwise repeat for every request).
type everyLimiter struct {
	last atomic.Int64 // unix nanoseconds of the last allowed event
}

// Allow tells whether a minute has passed since the last allowed event, and if so counts this one.
func (l *everyLimiter) Allow() bool {
	now := time.Now().UnixNano()
	last := l.last.Load()
	return now-last >= int64(time.Minute) && l.last.CompareAndSwap(last, now)
}
