package crypto

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/appservice"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// HandleTransactionCrypto takes the encryption data that homeservers with MSC2409/MSC3202 push in appservice
// transactions (encryption.appservice): to-device events, device list changes and one-time key counts, for the
// bot's device and every ghost device. It implements bridge.ToDeviceHandler.
//
// To-device events for the bot go to its OlmMachine as if they came from /sync; for a ghost device only room key
// requests matter (answered under the key-sharing policy), the rest is dropped without decrypting it, exactly as
// the /sync drain does on other homeservers.
func (m *Machine) HandleTransactionCrypto(ctx context.Context, raw json.RawMessage) error {
	if !m.botReady.Load() {
		// Not initialised yet: refuse the transaction, the homeserver retries it (room keys must not be lost).
		return errors.New("encryption is not ready yet")
	}
	if !m.asMode.Load() {
		// encryption.appservice fell back to /sync (the homeserver lacks MSC4190): the devices' /sync delivers
		// all of this, and handling pushed copies too would process every to-device event twice.
		return nil
	}
	if m.missedPushes.Swap(false) {
		// The first transaction after one ferry failed: what the homeserver dropped meanwhile is asked for now.
		go func() {
			if err := m.catchUpDeviceLists(context.WithoutCancel(ctx)); err != nil {
				m.log.Warn().Err(err).Msg("Failed to catch up on device lists after a failed transaction")
			}
		}()
		go m.catchUpToDeviceLogged(context.WithoutCancel(ctx), time.Now(), "after a failed transaction")
	}
	// Only the encryption parts: the room events (the bulk of a transaction) are the relay's, which decodes them
	// itself.
	var txn cryptoTransaction
	if err := json.Unmarshal(raw, &txn); err != nil {
		return fmt.Errorf("failed to parse transaction: %w", err)
	}
	toDevice := txn.ToDeviceEvents
	if len(toDevice) == 0 {
		toDevice = txn.MSC2409ToDeviceEvents
	}
	counts := txn.DeviceOTKCount
	if len(counts) == 0 {
		counts = txn.MSC3202DeviceOTKCount
	}
	_, botCount := counts[m.bot.userID][m.bot.client.DeviceID]
	for _, evt := range toDevice {
		if m.takeProbe(evt, botCount) {
			continue
		}
		if err := m.routeToDevice(ctx, evt); err != nil {
			// Refused, the transaction comes again (and what Synapse drops meanwhile, the catch-up fetches).
			return err
		}
	}
	lists := txn.DeviceLists
	if lists == nil {
		lists = txn.MSC3202DeviceLists
	}
	if lists != nil && len(lists.Changed) > 0 {
		lists = &mautrix.DeviceLists{Changed: withoutGhosts(lists.Changed, m.isGhost), Left: lists.Left}
	}
	if lists != nil && len(lists.Changed)+len(lists.Left) > 0 {
		// Under the changed users' key locks, as key shares fetch device lists (device.devicesOf).
		unlock := m.cache.keyLocks.lock(lists.Changed)
		m.bot.mach.HandleDeviceLists(ctx, lists, "")
		unlock()
		m.rotateForDeviceChanges(ctx, append(append([]id.UserID{}, lists.Changed...), lists.Left...))
	}
	// Only the bot tops up one-time keys: ghost devices never decrypt what others send them, so their keys are
	// only ever used to send ferry messages it discards.
	if c, ok := counts[m.bot.userID][m.bot.client.DeviceID]; ok {
		c.UserID, c.DeviceID = m.bot.userID, m.bot.client.DeviceID
		m.bot.mach.HandleOTKCounts(ctx, &c)
	}
	return nil
}

// TransactionFailed records that a transaction failed as the homeserver sees it (see bridge.ToDeviceHandler): the
// next transaction that arrives starts a catch-up on device lists and to-device messages.
func (m *Machine) TransactionFailed() { m.missedPushes.Store(true) }

// catchUpToDeviceLogged runs CatchUpToDevice and logs its failure (when names the occasion).
func (m *Machine) catchUpToDeviceLogged(ctx context.Context, asked time.Time, when string) {
	if _, err := m.CatchUpToDevice(ctx, asked); err != nil && ctx.Err() == nil {
		m.log.Warn().Err(err).Str("when", when).Msg("Failed to fetch the to-device messages the homeserver holds")
	}
}

// cryptoTransaction is the part of an appservice transaction (appservice.Transaction) that encryption reads.
type cryptoTransaction struct {
	ToDeviceEvents        []*event.Event         `json:"to_device,omitempty"`
	DeviceLists           *mautrix.DeviceLists   `json:"device_lists,omitempty"`
	DeviceOTKCount        appservice.OTKCountMap `json:"device_one_time_keys_count,omitempty"`
	MSC2409ToDeviceEvents []*event.Event         `json:"de.sorunome.msc2409.to_device,omitempty"`
	MSC3202DeviceLists    *mautrix.DeviceLists   `json:"org.matrix.msc3202.device_lists,omitempty"`
	MSC3202DeviceOTKCount appservice.OTKCountMap `json:"org.matrix.msc3202.device_one_time_keys_count,omitempty"`
}

// routeToDevice hands one pushed to-device event to the device it is addressed to.
func (m *Machine) routeToDevice(ctx context.Context, evt *event.Event) error {
	evt.Type.Class = event.ToDeviceEventType
	if err := evt.Content.ParseRaw(evt.Type); err != nil {
		return nil
	}
	if evt.ToUserID == m.bot.userID && evt.ToDeviceID == m.bot.client.DeviceID {
		return m.handleBotToDevice(ctx, evt)
	}
	if evt.Type != event.ToDeviceRoomKeyRequest || m.isOwn == nil || !m.isOwn(evt.ToUserID) {
		return nil
	}
	m.ghostsLock.Lock()
	st := m.ghosts[evt.ToUserID]
	m.ghostsLock.Unlock()
	if st == nil || st.dev == nil || st.dev.client.DeviceID != evt.ToDeviceID {
		return nil // a ghost device not in use since the start has no session anyone could ask for yet
	}
	if req := evt.Content.AsRoomKeyRequest(); req != nil && req.Action == event.KeyRequestActionRequest {
		st.dev.mach.HandleRoomKeyRequest(ctx, evt.Sender, req)
	}
	return nil
}

// catchUpDeviceLists re-reads the device lists of every user ferry tracks and rotates ferry's sessions in the rooms
// of those whose devices changed. In appservice mode the homeserver pushes device-list changes only while ferry is
// up: Synapse drops them, with to-device messages and key counts, while it counts the appservice as down (ferry
// stopped, or a transaction failed), so after a start ferry cannot know what it missed without asking.
func (m *Machine) catchUpDeviceLists(ctx context.Context) error {
	defer m.cache.keyLocks.lockAll()()
	var users []id.UserID
	rows, err := m.db.Query(ctx, sqlAllTrackedUsers)
	if err != nil {
		return fmt.Errorf("failed to list tracked users: %w", err)
	}
	for rows.Next() {
		var u id.UserID
		if err = rows.Scan(&u); err != nil {
			_ = rows.Close()
			return err
		}
		if m.isOwn == nil || !m.isOwn(u) {
			users = append(users, u)
		}
	}
	if err = closeRows(rows); err != nil {
		return fmt.Errorf("failed to list tracked users: %w", err)
	}
	if len(users) == 0 {
		return nil
	}
	before, err := loadDevices(ctx, m.db, users)
	if err != nil {
		return err
	}
	// Only users whose keys on the server differ from the stored ones go through mautrix's fetch (which verifies
	// and stores them); the others' device lists did not change.
	start := time.Now()
	refetch, err := m.keysToRefetch(ctx, users, before)
	if err != nil {
		// The next key share fetches them instead (devicesOf), and rotates nothing it would have to.
		_ = m.bot.store.MarkTrackedUsersOutdated(ctx, users)
		return fmt.Errorf("failed to fetch device lists: %w", err)
	}
	m.log.Info().Int("tracked_users", len(users)).Int("changed_keys", len(refetch)).Dur("elapsed", time.Since(start)).
		Msg("Compared the tracked members' keys on the homeserver with the stored ones")
	if len(refetch) == 0 {
		return nil
	}
	after, err := m.bot.mach.FetchKeys(ctx, refetch, true)
	if err != nil {
		_ = m.bot.store.MarkTrackedUsersOutdated(ctx, refetch)
		return fmt.Errorf("failed to fetch device lists: %w", err)
	}
	var changed []id.UserID
	for _, u := range refetch {
		if devicesDiffer(before[u], after[u]) {
			changed = append(changed, u)
		}
	}
	if len(changed) > 0 {
		m.log.Info().Int("users", len(changed)).Msg("Device lists changed while ferry was not receiving pushes; rotating the sessions they affect")
		m.rotateForDeviceChanges(ctx, changed)
	}
	return nil
}

// devicesDiffer tells whether two device lists of one user name different devices or keys.
func devicesDiffer(a, b map[id.DeviceID]*id.Device) bool {
	if len(a) != len(b) {
		return true
	}
	for devID, da := range a {
		db, ok := b[devID]
		if !ok || da.IdentityKey != db.IdentityKey || da.SigningKey != db.SigningKey {
			return true
		}
	}
	return false
}
