package crypto

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// ghostDeviceDisplayName is shown in clients' device lists for a ghost's device.
const ghostDeviceDisplayName = "ferry"

// Drain timing: every ghost device's queued to-device messages are fetched (and so deleted) at least every
// drainInterval; a ghost that sent within activeWindow is drained every activeDrainInterval instead, because
// room key requests for its sessions come soon after it sends. The loop wakes every drainTick and drains at most
// drainBatch devices per wake, so the work is spread out rather than bursting every interval.
var (
	drainInterval       = 2 * time.Minute
	activeDrainInterval = 10 * time.Second
	activeWindow        = 10 * time.Minute
	drainTick           = 5 * time.Second
	drainBatch          = 50
)

// drainFilter keeps a ghost device's /sync to to-device messages: no rooms, presence or account data. Rooms are
// excluded twice (an empty room list, and nothing from any room section) for servers that ignore one of them.
const drainFilter = `{"presence":{"not_types":["*"]},"account_data":{"not_types":["*"]},` +
	`"room":{"rooms":[],"timeline":{"not_types":["*"],"limit":1},"state":{"not_types":["*"]},` +
	`"ephemeral":{"not_types":["*"]},"account_data":{"not_types":["*"]}}}`

// errGhostFallback means a ghost cannot have a cross-signed device here; the bot's device encrypts for it.
var errGhostFallback = errors.New("ghost device cannot be cross-signed")

// ghostState is a ghost's device, or nil when the ghost falls back to the bot's device.
type ghostState struct {
	dev *device
}

// ghostDevice returns the ghost's own device, creating it on first use; nil (without error) means the bot's
// device encrypts for this ghost (single-device mode, or this ghost's device cannot be cross-signed).
func (m *Machine) ghostDevice(ctx context.Context, ghost id.UserID) (*device, error) {
	if !m.perGhost {
		return nil, nil
	}
	m.ghostsLock.Lock()
	st, ok := m.ghosts[ghost]
	m.ghostsLock.Unlock()
	if ok {
		return st.dev, nil
	}
	defer m.ghostCreate.WithLock(ghost)()
	m.ghostsLock.Lock()
	st, ok = m.ghosts[ghost]
	m.ghostsLock.Unlock()
	if ok {
		return st.dev, nil
	}
	log := m.log.With().Stringer("ghost", ghost).Logger()
	start := time.Now()
	dev, created, err := m.loadGhost(ctx, ghost)
	if errors.Is(err, errGhostFallback) || errors.Is(err, ErrNoPassword) {
		log.Warn().Err(err).Msg("This ghost's messages are encrypted by the bot's device (single-device fallback)")
		m.setGhost(ghost, &ghostState{})
		return nil, nil
	} else if err != nil {
		return nil, err
	}
	if created {
		log.Info().Stringer("device_id", dev.client.DeviceID).Dur("elapsed", time.Since(start)).Msg("Created cross-signed ghost device")
	}
	m.setGhost(ghost, &ghostState{dev: dev})
	return dev, nil
}

func (m *Machine) setGhost(ghost id.UserID, st *ghostState) {
	m.ghostsLock.Lock()
	m.ghosts[ghost] = st
	m.ghostsLock.Unlock()
}

func (m *Machine) forgetGhost(ghost id.UserID) {
	m.ghostsLock.Lock()
	delete(m.ghosts, ghost)
	m.ghostsLock.Unlock()
}

// loadGhost loads the ghost's device from the crypto store, or creates it: a device (an appservice login, or
// MSC4190), its Olm account and keys, and the ghost's cross-signing identity signing the device. Every step is
// recorded before the next, so a crash or error resumes where it stopped.
func (m *Machine) loadGhost(ctx context.Context, ghost id.UserID) (*device, bool, error) {
	store := m.storeFor(ghost)
	deviceID, err := store.FindDeviceID(ctx)
	if err != nil {
		return nil, false, fmt.Errorf("failed to read the ghost's device: %w", err)
	}
	if !m.asMode.Load() && !m.publishedWithoutUIA.Load() {
		// Without MSC4190 the cross-signing upload needs the password (unless the homeserver accepted the bot's
		// first setup without one): without one, don't create a device that would only ever be unsigned.
		published, err := store.GetSecret(ctx, secretPublishedMaster)
		if err != nil {
			return nil, false, err
		}
		if published == "" {
			if password, err := store.GetSecret(ctx, secretPassword); err != nil {
				return nil, false, err
			} else if password == "" {
				// Registered without a password (by the appservice): set one through the admin API.
				if _, err = m.provisionPassword(ctx, ghost, store); err != nil {
					return nil, false, fmt.Errorf("%w: %w", errGhostFallback, err)
				}
			}
		}
	}
	created, relogged := false, false
	var cli *mautrix.Client
	if m.asMode.Load() {
		if m.NewUserClient == nil {
			return nil, false, errors.New("no appservice client factory")
		}
		cli = m.NewUserClient(ghost)
		if deviceID == "" {
			if err = cli.CreateDeviceMSC4190(ctx, "", ghostDeviceDisplayName); err != nil {
				return nil, false, fmt.Errorf("failed to create the ghost's device (MSC4190): %w", err)
			}
			created = true
		} else {
			cli.DeviceID = deviceID
			cli.SetAppServiceDeviceID = true
		}
	} else {
		saved, err := store.GetSecret(ctx, secretAccessToken)
		if err != nil {
			return nil, false, fmt.Errorf("failed to read the ghost's access token: %w", err)
		}
		savedDevice, token, _ := strings.Cut(saved, " ")
		if token == "" || (deviceID != "" && id.DeviceID(savedDevice) != deviceID) {
			resp, err := m.loginGhost(ctx, ghost, deviceID)
			if err != nil {
				return nil, false, err
			}
			created = deviceID == "" || resp.DeviceID != deviceID
			relogged = !created
			savedDevice, token = string(resp.DeviceID), resp.AccessToken
			if err = store.PutSecret(ctx, secretAccessToken, savedDevice+" "+token); err != nil {
				return nil, false, fmt.Errorf("failed to store the ghost's access token: %w", err)
			}
		}
		cli = m.userClient(ghost, id.DeviceID(savedDevice), token)
	}
	store.DeviceID = cli.DeviceID
	mach := m.newOlmMachine(cli, store)
	if err = mach.Load(ctx); err != nil {
		return nil, false, fmt.Errorf("failed to load the ghost's Olm account: %w", err)
	}
	dev := newDevice(ghost, cli, store, mach)
	if relogged {
		// The token was revoked: if the device went with it, the homeserver recreated it empty on login.
		// Upload the same device keys again and sign the device again.
		if ok, _, err := m.ownKeysOnServer(ctx, dev); err != nil {
			return nil, false, err
		} else if !ok {
			m.log.Warn().Stringer("ghost", ghost).Msg("A ghost's device vanished from the homeserver; uploading its keys again")
			mach.GetAccount().Shared = false
			_ = store.DeleteSecret(ctx, secretSignedDevice)
		}
	}
	if !mach.GetAccount().Shared {
		// Uploads the device keys and one-time keys, and saves the account (its crypto_account row).
		if err = mach.ShareKeys(ctx, -1); err != nil {
			return nil, false, fmt.Errorf("failed to upload the ghost's device keys: %w", err)
		}
		created = true
	}
	mach.AllowKeyShare = m.allowKeyShare(dev)
	if err = m.crossSign(ctx, dev, false, ""); err != nil {
		return nil, false, err
	}
	return dev, created, nil
}

// loginGhost logs a ghost device in with m.login.application_service (the appservice token proves ferry may act
// as the ghost), reusing deviceID when set.
func (m *Machine) loginGhost(ctx context.Context, ghost id.UserID, deviceID id.DeviceID) (*mautrix.RespLogin, error) {
	if m.NewUserClient == nil {
		return nil, errors.New("no appservice client factory")
	}
	cli := m.NewUserClient(ghost)
	resp, err := cli.Login(ctx, &mautrix.ReqLogin{
		Type:                     mautrix.AuthTypeAppservice,
		Identifier:               mautrix.UserIdentifier{Type: mautrix.IdentifierTypeUser, User: string(ghost)},
		DeviceID:                 deviceID,
		InitialDeviceDisplayName: ghostDeviceDisplayName,
	})
	if err != nil {
		return nil, fmt.Errorf("failed to log in the ghost's device: %w", err)
	}
	return resp, nil
}

// ghostAccounts lists the ghosts that have a device in the crypto store.
func (m *Machine) ghostAccounts(ctx context.Context) ([]id.UserID, error) {
	rows, err := m.db.Query(ctx, `SELECT account_id FROM crypto_account WHERE account_id<>$1 ORDER BY account_id`, botAccountID)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []id.UserID
	for rows.Next() {
		var u id.UserID
		if err = rows.Scan(&u); err != nil {
			return nil, err
		}
		out = append(out, u)
	}
	return out, rows.Err()
}

// DrainStats describes one drain of a ghost device's to-device queue.
type DrainStats struct {
	Events     int // to-device events fetched (and so deleted on the server at the next drain)
	KeyRequest int // of which room key requests, answered under the key-sharing policy
	Elapsed    time.Duration
}

// drainLoop keeps the to-device queues of ghost devices from growing on homeservers that do not push to-device
// events to appservices (Dendrite): members' clients send room keys to ghost devices, since ghosts are members
// with devices. Ghost devices answer key requests and discard everything else without decrypting it: ferry
// never needs what members encrypt for its ghosts.
func (m *Machine) drainLoop(ctx context.Context) {
	tick := time.NewTicker(drainTick)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		ghosts, err := m.ghostAccounts(ctx)
		if err != nil {
			if ctx.Err() == nil {
				m.log.Warn().Err(err).Msg("Failed to list ghost devices to drain")
			}
			continue
		}
		var pass DrainStats
		done := 0
		start := time.Now()
		for _, ghost := range ghosts {
			if ctx.Err() != nil || done >= drainBatch {
				break
			}
			if !m.drainDue(ghost, time.Now()) {
				continue
			}
			done++
			stats, err := m.DrainGhost(ctx, ghost)
			if err != nil && ctx.Err() == nil {
				m.log.Warn().Err(err).Stringer("ghost", ghost).Msg("Failed to drain a ghost device's to-device queue")
			} else if stats != nil {
				pass.Events += stats.Events
				pass.KeyRequest += stats.KeyRequest
			}
		}
		if done > 0 {
			m.log.Debug().Int("ghost_devices", done).Int("events", pass.Events).Int("key_requests", pass.KeyRequest).
				Dur("elapsed", time.Since(start)).Msg("Drained ghost devices")
		}
	}
}

// drainDue tells whether a ghost device's queue should be drained now (see drainInterval).
func (m *Machine) drainDue(ghost id.UserID, now time.Time) bool {
	m.ghostsLock.Lock()
	defer m.ghostsLock.Unlock()
	since := now.Sub(m.drained[ghost])
	if now.Sub(m.lastSent[ghost]) < activeWindow {
		return since >= activeDrainInterval
	}
	return since >= drainInterval
}

// markSent records that a ghost just sent, so its device is drained more often for a while.
func (m *Machine) markSent(ghost id.UserID) {
	m.ghostsLock.Lock()
	m.lastSent[ghost] = time.Now()
	m.ghostsLock.Unlock()
}

// DrainGhost fetches what the homeserver queued for a ghost's device once: room key requests are answered,
// everything else is discarded. The homeserver deletes the fetched messages when the next drain presents the
// returned sync token.
func (m *Machine) DrainGhost(ctx context.Context, ghost id.UserID) (*DrainStats, error) {
	m.ghostsLock.Lock()
	m.drained[ghost] = time.Now()
	m.ghostsLock.Unlock()
	start := time.Now()
	dev, err := m.ghostDevice(ctx, ghost)
	if err != nil || dev == nil {
		return nil, err
	}
	stats, err := dev.drain(ctx)
	if err != nil {
		if errors.Is(err, mautrix.MUnknownToken) {
			m.forgetGhost(ghost)
			_ = dev.store.DeleteSecret(ctx, secretAccessToken)
		}
		return nil, err
	}
	stats.Elapsed = time.Since(start)
	if stats.Events > 0 {
		m.log.Debug().Stringer("ghost", ghost).Int("events", stats.Events).Int("key_requests", stats.KeyRequest).
			Dur("elapsed", stats.Elapsed).Msg("Drained ghost device")
	}
	return stats, nil
}

// drain fetches the device's queued to-device events once, answers room key requests and discards the rest, and
// stores the sync token (which acknowledges the fetched events at the next drain).
func (d *device) drain(ctx context.Context) (*DrainStats, error) {
	since, err := d.store.GetNextBatch(ctx)
	if err != nil {
		return nil, err
	}
	resp, err := d.client.FullSyncRequest(ctx, mautrix.ReqSync{Since: since, FilterID: drainFilter})
	if err != nil {
		return nil, fmt.Errorf("to-device sync failed: %w", err)
	}
	stats := &DrainStats{Events: len(resp.ToDevice.Events)}
	for _, evt := range resp.ToDevice.Events {
		if evt.Type != event.ToDeviceRoomKeyRequest {
			continue
		}
		evt.Type.Class = event.ToDeviceEventType
		if err = evt.Content.ParseRaw(evt.Type); err != nil {
			continue
		}
		if req := evt.Content.AsRoomKeyRequest(); req != nil && req.Action == event.KeyRequestActionRequest {
			stats.KeyRequest++
			d.mach.HandleRoomKeyRequest(ctx, evt.Sender, req)
		}
	}
	if err = d.store.PutNextBatch(ctx, resp.NextBatch); err != nil {
		return nil, err
	}
	return stats, nil
}
