package crypto

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"sync"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// In appservice mode the homeserver pushes the bot device's to-device messages in transactions, but Synapse drops
// them for good while it counts the appservice as down: after any transaction that failed (ferry stopped, a
// network fault, an error answer) and until its retry goes through, 2 s to 8.5 min later. A room key lost that way
// can be asked for again only while it is its sender's current session (clients forward nothing else to another
// user's device), so a burst of messages across a rotation would stay undecryptable. Synapse still holds every
// to-device message in the device's inbox until the device syncs past it, so ferry fetches them from there: a
// /sync of the bot's device alone (the appservice token with device_id masquerading, rooms and everything else
// filtered out), at start, after a transaction that may have been lost, and before asking a sender for a key.
// Messages the push delivered already are recognised by their Olm message hash (mautrix keeps one per message it
// decrypted) and skipped; the sync token, stored after each batch, lets the homeserver delete what was fetched.

// toDeviceCatchUp serialises catch-ups and remembers when the last complete one began.
type toDeviceCatchUp struct {
	lock     sync.Mutex
	lastFrom time.Time // when the last complete catch-up began
}

// toDeviceCatchUpPages bounds one catch-up (Synapse returns at most 100 to-device messages per /sync).
const toDeviceCatchUpPages = 1000

// CatchUpToDevice fetches the to-device messages the homeserver holds for the bot's device and handles those not
// handled yet. It does nothing outside appservice mode (the bot's /sync loop reads them) and returns at once when
// a catch-up that began after asked finished meanwhile. It reports how many messages it handled.
func (m *Machine) CatchUpToDevice(ctx context.Context, asked time.Time) (int, error) {
	if !m.asMode.Load() || !m.botReady.Load() {
		return 0, nil
	}
	c := &m.toDeviceCatchUp
	c.lock.Lock()
	defer c.lock.Unlock()
	if !c.lastFrom.Before(asked) {
		return 0, nil
	}
	began := time.Now()
	handled := 0
	for page := 0; page < toDeviceCatchUpPages; page++ {
		_, more, err := m.bot.syncToDevice(ctx, func(evt *event.Event) error {
			done, err := m.handleCaughtUp(ctx, evt)
			if done {
				handled++
			}
			return err
		})
		if err != nil {
			return handled, fmt.Errorf("to-device catch-up: %w", err)
		}
		if !more {
			break
		}
	}
	c.lastFrom = began
	if handled > 0 {
		m.log.Info().Int("events", handled).Dur("elapsed", time.Since(began)).Msg("Fetched to-device messages the homeserver had not pushed")
	}
	return handled, nil
}

// handleCaughtUp hands one fetched to-device event to the bot's OlmMachine unless the push delivered it already
// (or it is ferry's own push probe); it reports whether it did, and the error of a handling that must be tried
// again (handleBotToDevice).
func (m *Machine) handleCaughtUp(ctx context.Context, evt *event.Event) (bool, error) {
	if evt.Type.Type == probeEventType.Type {
		return false, nil
	}
	evt.Type.Class = event.ToDeviceEventType
	if err := evt.Content.ParseRaw(evt.Type); err != nil {
		return false, nil
	}
	if enc, ok := evt.Content.Parsed.(*event.EncryptedEventContent); ok && enc.Algorithm == id.AlgorithmOlmV1 {
		own, ok := enc.OlmCiphertext[m.bot.mach.OwnIdentity().IdentityKey]
		if !ok {
			return false, nil
		}
		if hash, err := olmHash(own.Body); err == nil {
			if at, err := m.bot.store.GetOlmHash(ctx, hash); err == nil && !at.IsZero() {
				return false, nil // decrypted already, when the homeserver pushed it
			}
		}
	}
	evt.ToUserID, evt.ToDeviceID = m.bot.userID, m.bot.client.DeviceID
	if err := m.handleBotToDevice(ctx, evt); err != nil {
		return false, err
	}
	return true, nil
}

// olmHash is the hash mautrix records for each Olm message it decrypted (its duplicate check).
func olmHash(body string) ([32]byte, error) {
	raw, err := base64.RawStdEncoding.DecodeString(body)
	return sha256.Sum256(raw), err
}
