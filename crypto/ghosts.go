package crypto

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/crypto/goolm/libolmpickle"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// ghostDeviceDisplayName is shown in clients' device lists for a ghost's device.
const ghostDeviceDisplayName = "ferry"

// ghostOneTimeKeys is how many one-time keys a ghost's new device uploads (mautrix uploads 50, and the bot tops its
// own up). Members' clients claim one to open an Olm channel to the device, only to share their room keys with
// it, which ferry never needs: the bot's device decrypts, and a ghost answers room key requests and sends its own
// keys over channels it opens itself with the members' keys. Each key costs a Curve25519 key and a signature
// (about 0.2 ms on a small server), room in the stored account, and later the Olm decryption of every room key a
// member sends to it. Ghosts' keys are never topped up: a member device that finds none left shares its keys
// without the ghost's device (its client records it as unreachable), and reads the ghost's messages as before
// (TestGhostDeviceKeysRunOut). Two cover a member with two devices in a room linked one to one.
const ghostOneTimeKeys = 2

// Drain timing, for homeservers that do not push to-device messages to appservices. What reaches a ghost's device
// comes from members of the rooms it is in, and ferry sees when: a member's new room key reaches the bot's device
// too (the member's client shares it with every device in the room), and room key requests for a ghost's sessions
// come soon after the ghost sends. So a ghost is drained within a tick or two after a room key arrived in one of
// its rooms (noteRoomKey), every activeDrainInterval while it sent within activeWindow, and otherwise once every
// backstopInterval as a backstop (a minute for a few ghosts, growing with their number up to drainInterval),
// spread evenly over the interval from the start. The loop wakes every drainTick
// and drains at most drainBatch devices per wake. Idle ghosts cost nothing in memory: a drain needs only the
// device's access token and sync token, and loads the device only to answer a key request.
var (
	drainInterval       = time.Hour
	activeDrainInterval = 10 * time.Second
	activeWindow        = 10 * time.Minute
	drainTick           = 5 * time.Second
	drainBatch          = 100
	// drainListRefresh: how often the list of ghost devices is read again from the store (ghosts created by this
	// process join it at once).
	drainListRefresh = 10 * time.Minute
)

// backstopInterval is how often each of n ghost devices is drained when nothing points at it: half a second per
// ghost (two backstop drains a second in all), at least a minute and at most drainInterval. A small instance
// answers a late key request to an idle ghost within a minute; a large one spends no more than that rate on it.
func backstopInterval(n int) time.Duration {
	return min(max(time.Duration(n)*500*time.Millisecond, time.Minute), drainInterval)
}

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

// ghostSetUpParallel bounds the ghost devices loaded or set up at once, across every room.
const ghostSetUpParallel = 8

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
	// A new ghost's device costs a dozen homeserver requests and a few dozen statements; when hundreds of new
	// senders speak at once, setting all of theirs up side by side would take every pooled connection and leave
	// the established links' messages queueing for one (and then finish no sooner).
	select {
	case m.ghostSetUp <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	defer func() { <-m.ghostSetUp }()
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
	sec := newSecretCache(store)
	deviceID, err := sec.loadWithDevice(ctx)
	if err != nil {
		return nil, false, fmt.Errorf("failed to read the ghost's device and secrets: %w", err)
	} else if deviceID == "" {
		// No account stored, so no outbound session either (they are stored after it and deleted with it).
		m.cache.markFreshOutbound(store.AccountID)
	}
	// A new account on Postgres: what it gets before its device exists (a password, an access token) is written
	// with the account's first write, before its keys are uploaded (holdWithAccount), not each on its own.
	holding := deviceID == "" && store.DB.Dialect == dbutil.Postgres
	var held heldValues
	if !m.asMode.Load() && !m.publishedWithoutUIA.Load() {
		// Without MSC4190 the cross-signing upload needs the password (unless the homeserver accepted the bot's
		// first setup without one): without one, don't create a device that would only ever be unsigned.
		published, err := sec.GetSecret(ctx, secretPublishedMaster)
		if err != nil {
			return nil, false, err
		}
		if published == "" {
			if password, err := sec.GetSecret(ctx, secretPassword); err != nil {
				return nil, false, err
			} else if password == "" {
				// Registered without a password (by the appservice): set one through the admin API.
				var into secretStore = sec
				if holding {
					into = nil
				}
				if password, err = m.provisionPassword(ctx, ghost, into); err != nil {
					return nil, false, fmt.Errorf("%w: %w", errGhostFallback, err)
				} else if holding {
					held.add(secretPassword, password)
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
		saved, err := sec.GetSecret(ctx, secretAccessToken)
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
			if holding {
				held.add(secretAccessToken, savedDevice+" "+token)
			} else if err = sec.PutSecret(ctx, secretAccessToken, savedDevice+" "+token); err != nil {
				return nil, false, fmt.Errorf("failed to store the ghost's access token: %w", err)
			}
		}
		cli = m.userClient(ghost, id.DeviceID(savedDevice), token)
	}
	store.DeviceID = cli.DeviceID
	if deviceID == "" {
		// No account stored: the new one Load would make after reading that none is, without the read.
		store.Account = crypto.NewOlmAccount()
	}
	mach := m.newOlmMachine(cli, store)
	if err = mach.Load(ctx); err != nil {
		return nil, false, fmt.Errorf("failed to load the ghost's Olm account: %w", err)
	}
	dev := newDevice(ghost, cli, store, mach)
	if deviceID == "" {
		// Nor any Olm session: the account's first share need not look for them. Nor a to-device token.
		dev.olm.noSessions.Store(true)
		dev.noToken.Store(true)
		dev.olm.unstored.Store(true)
		if holding { // where the account's first write can carry them
			if err = holdWithAccount(ctx, dev, sec, held); err != nil {
				return nil, false, err
			}
			dev.olm.holdUploaded.Store(true)
		}
	}
	if relogged {
		// The token was revoked: if the device went with it, the homeserver recreated it empty on login.
		// Upload the same device keys again and sign the device again.
		if ok, _, err := m.ownKeysOnServer(ctx, dev); err != nil {
			return nil, false, err
		} else if !ok {
			m.log.Warn().Stringer("ghost", ghost).Msg("A ghost's device vanished from the homeserver; uploading its keys again")
			mach.GetAccount().Shared = false
			_ = sec.DeleteSecret(ctx, secretSignedDevice)
		}
	}
	if acct := mach.GetAccount(); !acct.Shared {
		// Uploads the device keys and ghostOneTimeKeys one-time keys (ShareKeys tops up to half the account's
		// maximum from the count it is told is there), and saves the account (its crypto_account row).
		if err = mach.ShareKeys(ctx, int(acct.Internal.MaxNumberOfOneTimeKeys()/2)-ghostOneTimeKeys); err != nil {
			return nil, false, fmt.Errorf("failed to upload the ghost's device keys: %w", err)
		}
		created = true
	}
	// What the account's first write did not carry (it always does for a new account: ShareKeys stores the own
	// device first), before the device is used.
	if err = dev.olm.writeHeld(ctx); err != nil {
		return nil, false, err
	}
	mach.AllowKeyShare = m.allowKeyShare(dev)
	err = m.crossSign(ctx, dev, sec, false, "")
	// The account as its upload left it, if crossSign's statement did not carry it: written before the device is
	// used (nothing else can change the account before then).
	dev.olm.holdUploaded.Store(false)
	if writeErr := dev.olm.writeUploaded(ctx); writeErr != nil {
		err = errors.Join(err, writeErr)
	}
	if err != nil {
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
	rows, err := m.db.Query(ctx, sqlGhostAccounts, botAccountID)
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
	var ghosts []id.UserID
	var listedSet map[id.UserID]bool
	var listed time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		now := time.Now()
		if ghosts == nil || now.Sub(listed) >= drainListRefresh {
			list, err := m.ghostAccounts(ctx)
			if err != nil {
				if ctx.Err() == nil {
					m.log.Warn().Err(err).Msg("Failed to list ghost devices to drain")
				}
				continue
			}
			ghosts, listed = list, now
			listedSet = make(map[id.UserID]bool, len(list))
			for _, g := range list {
				listedSet[g] = true
			}
			m.spreadDrains(ghosts, now)
		}
		due := m.dueDrains(ghosts, listedSet, now, drainBatch)
		var pass DrainStats
		done := 0
		for _, ghost := range due {
			if ctx.Err() != nil {
				break
			}
			done++
			stats, err := m.drainGhost(ctx, ghost)
			if err != nil && ctx.Err() == nil {
				m.log.Warn().Err(err).Stringer("ghost", ghost).Msg("Failed to drain a ghost device's to-device queue")
			} else if stats != nil {
				pass.Events += stats.Events
				pass.KeyRequest += stats.KeyRequest
			}
		}
		if done > 0 {
			m.log.Debug().Int("ghost_devices", done).Int("events", pass.Events).Int("key_requests", pass.KeyRequest).
				Dur("elapsed", time.Since(now)).Msg("Drained ghost devices")
		}
	}
}

// spreadDrains gives ghosts never drained by this process a last drain spread evenly over the past backstop interval,
// so that the backstop drains run at an even rate instead of all at once after a start.
func (m *Machine) spreadDrains(ghosts []id.UserID, now time.Time) {
	backstop := backstopInterval(len(ghosts))
	m.ghostsLock.Lock()
	defer m.ghostsLock.Unlock()
	for i, ghost := range ghosts {
		if _, ok := m.drained[ghost]; !ok {
			m.drained[ghost] = now.Add(-backstop * time.Duration(i+1) / time.Duration(len(ghosts)+1))
		}
	}
}

// dueDrains picks at most limit ghost devices to drain now: those a room key pointed at first, then those that
// sent recently, then the backstop's, each group oldest drain first. Ghosts created by this process (loaded, not
// in listed) count too.
func (m *Machine) dueDrains(ghosts []id.UserID, listed map[id.UserID]bool, now time.Time, limit int) []id.UserID {
	backstop := backstopInterval(len(ghosts))
	m.ghostsLock.Lock()
	defer m.ghostsLock.Unlock()
	type cand struct {
		ghost id.UserID
		rank  int
		last  time.Time
	}
	var cands []cand
	consider := func(ghost id.UserID) {
		last := m.drained[ghost]
		since := now.Sub(last)
		switch {
		case m.drainSoon[ghost]:
			cands = append(cands, cand{ghost, 0, last})
		case now.Sub(m.lastSent[ghost]) < activeWindow:
			if since >= activeDrainInterval {
				cands = append(cands, cand{ghost, 1, last})
			}
		case since >= backstop:
			cands = append(cands, cand{ghost, 2, last})
		}
	}
	for _, ghost := range ghosts {
		consider(ghost)
	}
	for ghost, st := range m.ghosts {
		if !listed[ghost] && st.dev != nil {
			if _, ok := m.drained[ghost]; !ok {
				m.drained[ghost] = now // created by this process: nothing queued yet
			}
			consider(ghost)
		}
	}
	sort.Slice(cands, func(i, j int) bool {
		if cands[i].rank != cands[j].rank {
			return cands[i].rank < cands[j].rank
		}
		return cands[i].last.Before(cands[j].last)
	})
	out := make([]id.UserID, 0, min(len(cands), limit))
	for _, c := range cands[:min(len(cands), limit)] {
		out = append(out, c.ghost)
	}
	return out
}

// markSent records that a ghost just sent, so its device is drained more often for a while.
func (m *Machine) markSent(ghost id.UserID) {
	m.ghostsLock.Lock()
	m.lastSent[ghost] = time.Now()
	m.ghostsLock.Unlock()
}

// noteRoomKey records that a member's room key for roomID reached the bot's device: the member's client sent it
// to the ghosts' devices in the room as well, so they are drained at the next tick.
func (m *Machine) noteRoomKey(ctx context.Context, roomID id.RoomID) {
	if !m.perGhost || m.asMode.Load() || m.isOwn == nil {
		return
	}
	members, err := m.stateStore.GetRoomJoinedOrInvitedMembers(ctx, roomID)
	if err != nil {
		return // the backstop drains them
	}
	m.ghostsLock.Lock()
	defer m.ghostsLock.Unlock()
	for _, u := range members {
		if u != m.client.UserID && m.isOwn(u) {
			if m.drainSoon == nil {
				m.drainSoon = make(map[id.UserID]bool)
			}
			m.drainSoon[u] = true
		}
	}
}

// drainGhost drains a ghost device's queue once as the loop does: with the device already loaded, or else with
// only its stored access token and sync token, loading the device only when a room key request came.
func (m *Machine) drainGhost(ctx context.Context, ghost id.UserID) (*DrainStats, error) {
	m.ghostsLock.Lock()
	st := m.ghosts[ghost]
	m.drained[ghost] = time.Now()
	delete(m.drainSoon, ghost)
	m.ghostsLock.Unlock()
	if st != nil {
		if st.dev == nil {
			return nil, nil // the bot's device encrypts for this ghost: it has no device of its own
		}
		return m.DrainGhost(ctx, ghost)
	}
	start := time.Now()
	store := m.storeFor(ghost)
	// One statement for both tokens (the store reads them in two, and its GetNextBatch answers "" on the first
	// read of a fresh store, which would fetch the whole queue again).
	var since string
	var pickled []byte
	if err := m.db.QueryRow(ctx, sqlDrainState, store.AccountID, secretAccessToken).Scan(&since, &pickled); errors.Is(err, sql.ErrNoRows) {
		return nil, nil // no device: nothing can be queued for it
	} else if err != nil {
		return nil, fmt.Errorf("failed to read the ghost device's tokens: %w", err)
	}
	if len(pickled) == 0 {
		return nil, nil // no device logged in yet: nothing can be queued for it
	}
	saved, err := libolmpickle.Unpickle(store.PickleKey, pickled)
	if err != nil {
		return nil, fmt.Errorf("failed to read the ghost's access token: %w", err)
	}
	deviceID, token, _ := strings.Cut(string(saved), " ")
	if token == "" {
		return nil, nil
	}
	cli := m.userClient(ghost, id.DeviceID(deviceID), token)
	resp, err := cli.FullSyncRequest(ctx, mautrix.ReqSync{Since: since, FilterID: drainFilter})
	if err != nil {
		if errors.Is(err, mautrix.MUnknownToken) {
			_ = store.DeleteSecret(ctx, secretAccessToken)
		}
		return nil, fmt.Errorf("to-device sync failed: %w", err)
	}
	stats := &DrainStats{Events: len(resp.ToDevice.Events)}
	for _, evt := range resp.ToDevice.Events {
		if evt.Type == event.ToDeviceRoomKeyRequest {
			stats.KeyRequest++
		}
	}
	if stats.KeyRequest > 0 {
		// Requests are answered by the ghost's device; fetching again from the same token hands it the same
		// events (the homeserver deletes them only when a later sync presents a newer token).
		return m.DrainGhost(ctx, ghost)
	}
	if stats.Events > 0 {
		// The new token acknowledges what was fetched. With nothing fetched the stored one is as good, and not
		// writing it saves a commit for every idle drain.
		if err = store.PutNextBatch(ctx, resp.NextBatch); err != nil {
			return nil, err
		}
	}
	stats.Elapsed = time.Since(start)
	return stats, nil
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
	stats := &DrainStats{}
	n, _, err := d.syncToDevice(ctx, func(evt *event.Event) error {
		if evt.Type != event.ToDeviceRoomKeyRequest {
			return nil
		}
		evt.Type.Class = event.ToDeviceEventType
		if err := evt.Content.ParseRaw(evt.Type); err != nil {
			return nil
		}
		if req := evt.Content.AsRoomKeyRequest(); req != nil && req.Action == event.KeyRequestActionRequest {
			stats.KeyRequest++
			d.mach.HandleRoomKeyRequest(ctx, evt.Sender, req)
		}
		return nil
	})
	stats.Events = n
	if err != nil {
		return nil, err
	}
	return stats, nil
}

// syncToDevice fetches one page of the device's queued to-device events with a /sync that reads nothing else
// (drainFilter), hands each to handle, and stores the sync token, which acknowledges them at the next fetch. more
// tells whether the homeserver may hold further pages. An error of handle stops the page before its token is
// stored: the next fetch gets the page again.
func (d *device) syncToDevice(ctx context.Context, handle func(*event.Event) error) (n int, more bool, err error) {
	since := d.store.SyncToken
	if !d.noToken.Load() {
		var err error
		if since, err = d.store.GetNextBatch(ctx); err != nil {
			return 0, false, fmt.Errorf("failed to read the device's to-device token: %w", err)
		}
	}
	resp, err := d.client.FullSyncRequest(ctx, mautrix.ReqSync{Since: since, FilterID: drainFilter})
	if err != nil {
		return 0, false, fmt.Errorf("to-device sync failed: %w", err)
	}
	for _, evt := range resp.ToDevice.Events {
		if err = handle(evt); err != nil {
			return 0, false, err
		}
	}
	if err = d.store.PutNextBatch(ctx, resp.NextBatch); err != nil {
		return 0, false, fmt.Errorf("failed to store the device's to-device token: %w", err)
	}
	return len(resp.ToDevice.Events), len(resp.ToDevice.Events) > 0 && resp.NextBatch != since, nil
}
