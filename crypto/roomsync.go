package crypto

import (
	"context"
	"errors"
	"net/http"
	"time"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// The rooms-only /sync. In appservice mode the homeserver pushes every room event in transactions, and ferry
// used to rely on that alone. Synapse 1.163.2 can leave a transaction unsent: while it counts the appservice as
// down it only stores new transactions, and its retry loop sends stored ones until it finds none, then counts the
// appservice as up again; a transaction stored between the loop's last look and that moment waits for the next
// failure (appservice/scheduler.py, seen after ferry's restarts: one message of a burst came 80 s late, after
// those that followed it). So the bot user also runs /sync, with the appservice's token and no device: its
// batches show each room's events in the room's order, which the relay records and orders pushes by
// (bridge.Bridge.SyncOrders), as it does with the device's /sync on the login + /sync path. Without a device the
// homeserver sends no to-device messages, device lists or key counts here; those stay with the transactions.
// A waiting /sync costs the homeserver a computation per event in the bot's rooms, and pushes need its order only
// where a transaction may be missing (bridge/txngaps.go): so with RoomSyncWanted it idles between those times,
// reading once every roomSyncIdle, and reads at once when WakeRoomSync is called.

// secretRoomSyncToken holds the rooms-only /sync's token in the bot's crypto store, apart from the device's
// token: a device /sync read on from a token of this one could skip to-device messages.
const secretRoomSyncToken = "im.ferry.room_sync_token"

// roomSyncIdle: how often an idle rooms-only /sync reads (Machine.RoomSyncWanted). Its reads keep its token
// recent, so that the read after a wake-up has little to catch up on, and find a transaction left unsent with
// none after it to show the gap. A variable for tests.
var roomSyncIdle = 10 * time.Second

// errRoomSyncIdle ends a run of the rooms-only /sync after a batch: RoomSyncWanted said it may idle.
var errRoomSyncIdle = errors.New("the rooms-only /sync idles")

// WakeRoomSync gets an idle rooms-only /sync reading at once (a pushed event waits for it). It does not block.
func (m *Machine) WakeRoomSync() {
	select {
	case m.roomWake <- struct{}{}:
	default:
	}
}

// errRoomSyncRefused ends the rooms-only /sync: the homeserver refused it in a way waiting does not mend.
var errRoomSyncRefused = errors.New("the homeserver refuses the bot's rooms-only /sync")

// roomSyncStore keeps the rooms-only /sync's token (the filter is made again at each start).
type roomSyncStore struct {
	dev *device
}

func (s roomSyncStore) SaveFilterID(context.Context, id.UserID, string) error { return nil }

func (s roomSyncStore) LoadFilterID(context.Context, id.UserID) (string, error) { return "", nil }

func (s roomSyncStore) SaveNextBatch(ctx context.Context, _ id.UserID, token string) error {
	return s.dev.store.PutSecret(ctx, secretRoomSyncToken, token)
}

func (s roomSyncStore) LoadNextBatch(ctx context.Context, _ id.UserID) (string, error) {
	return s.dev.store.GetSecret(ctx, secretRoomSyncToken)
}

// startRoomSync starts the rooms-only /sync (see above) under Start's ctx; Stop ends it.
func (m *Machine) startRoomSync(ctx context.Context) {
	if m.NewUserClient == nil {
		m.log.Warn().Msg("No appservice client for the bot's rooms-only /sync: pushed events are relayed in the order they arrive")
		return
	}
	cli := m.NewUserClient(m.client.UserID) // the as_token and user_id, never a device_id
	// Each /sync request would otherwise set the bot online: presence work on the homeserver for every batch.
	cli.SyncPresence = event.PresenceOffline
	store := &afterBatchStore{SyncStore: roomSyncStore{dev: m.bot}}
	cli.Store = store
	cli.Syncer = &cryptoSyncer{roomsOnly: true, wanted: m.RoomSyncWanted, client: cli, store: store, log: m.log, timeline: func(ctx context.Context, batch SyncedBatch) error {
		if m.SyncedTimeline != nil {
			return m.SyncedTimeline(ctx, batch)
		}
		return nil
	}, retryWait: func(err error, backoff time.Duration) time.Duration {
		if m.RetryWait != nil {
			return m.RetryWait(err, backoff)
		}
		return backoff
	}}
	m.goLoop(func() { m.syncLoop(ctx, cli) })
}

// syncLoop runs cli's /sync until ctx ends: the bot device's (login + /sync path) or the rooms-only one.
func (m *Machine) syncLoop(ctx context.Context, cli *mautrix.Client) {
	syncer, _ := cli.Syncer.(*cryptoSyncer)
	for ctx.Err() == nil {
		if syncer != nil {
			syncer.requestedAfter = time.Now()
		}
		err := cli.SyncWithContext(ctx)
		if errors.Is(err, errRereadBatch) && syncer != nil {
			// Started again from the token saved before the last batch (cryptoSyncer.OnFailedSync).
			select {
			case <-ctx.Done():
			case <-time.After(syncer.rereadWait):
			}
			continue
		}
		if errors.Is(err, errRoomSyncIdle) {
			select {
			case <-ctx.Done():
			case <-m.roomWake:
			case <-time.After(roomSyncIdle):
			}
			continue
		}
		if errors.Is(err, errRoomSyncRefused) {
			m.log.Warn().Err(err).Msg("The homeserver refuses the bot's rooms-only /sync: pushed events are relayed in the order they arrive, and a transaction the homeserver never sends is not noticed")
			if m.RoomSyncRefused != nil {
				m.RoomSyncRefused(err)
			}
			return
		}
		if err != nil && ctx.Err() == nil {
			m.log.Err(err).Str("sync", syncer.kind()).Msg("The bot's /sync stopped, restarting in 5 seconds")
			select {
			case <-ctx.Done():
			case <-time.After(5 * time.Second):
			}
		}
	}
}

// kind names the sync in log lines.
func (s *cryptoSyncer) kind() string {
	if s == nil || !s.roomsOnly {
		return "device"
	}
	return "rooms"
}

// refusedForGood tells a refusal that retrying does not mend (the token or the request refused) from a failure
// that may pass (network, 5xx, rate limit).
func refusedForGood(err error) bool {
	var httpErr mautrix.HTTPError
	if !errors.As(err, &httpErr) || httpErr.Response == nil {
		return false
	}
	code := httpErr.Response.StatusCode
	return code >= 400 && code < 500 && code != http.StatusTooManyRequests && code != http.StatusRequestTimeout
}
