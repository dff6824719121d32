package crypto

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.mau.fi/util/random"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// probeEventType is the to-device message the bot's device sends itself to see that the homeserver pushes
// to-device messages (MSC2409) and one-time key counts (MSC3202) back to ferry in transactions.
var probeEventType = event.Type{Type: "im.ferry.push_probe", Class: event.ToDeviceEventType}

// ErrNoToDevicePushes means the homeserver accepted ferry's appservice devices (MSC4190) but never pushed a
// to-device message to ferry: without them ferry receives no room keys at all.
var ErrNoToDevicePushes = errors.New("the homeserver does not push to-device messages to ferry's transactions")

// ErrNoKeyCountPushes means to-device messages arrive, but without one-time key counts and device lists: ferry
// would never learn members' new devices.
var ErrNoKeyCountPushes = errors.New("the homeserver pushes to-device messages but no one-time key counts or device lists")

// pushProbe is the probe in flight (guarded by Machine.probeLock).
type pushProbe struct {
	nonce    string
	arrived  chan struct{}
	otkCount bool // the transaction that carried it also carried the bot's one-time key count
}

// ProbePushes proves, by effect, that the homeserver pushes what appservice-mode encryption needs: the bot's
// device sends itself a to-device message, which must come back in a transaction together with the bot's
// one-time key count. Homeservers ignore unknown configuration silently (a Synapse without its experimental
// features still creates ferry's devices), so this is the only way to tell. kick, when set, asks the homeserver
// to deliver pending transactions now (the appservice ping; a homeserver that counted ferry as down drops pushes
// until then). Each attempt waits wait; a nil error means both arrived. Without appservice mode it does nothing.
func (m *Machine) ProbePushes(ctx context.Context, attempts int, wait time.Duration, kick func(context.Context)) error {
	if !m.asMode.Load() {
		return nil
	}
	for attempt := 1; attempt <= attempts; attempt++ {
		if kick != nil {
			kick(ctx)
		}
		p := &pushProbe{nonce: random.String(16), arrived: make(chan struct{})}
		m.probeLock.Lock()
		m.probe = p
		m.probeLock.Unlock()
		content := &event.Content{Raw: map[string]any{"nonce": p.nonce}}
		req := &mautrix.ReqSendToDevice{Messages: map[id.UserID]map[id.DeviceID]*event.Content{
			m.bot.userID: {m.bot.client.DeviceID: content},
		}}
		if _, err := m.bot.client.SendToDevice(ctx, probeEventType, req); err != nil {
			return fmt.Errorf("failed to send the push probe: %w", err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-p.arrived:
			if !p.otkCount {
				return ErrNoKeyCountPushes
			}
			return nil
		case <-time.After(wait):
			m.log.Debug().Int("attempt", attempt).Msg("The push probe has not come back yet")
		}
	}
	return ErrNoToDevicePushes
}

// takeProbe recognises the bot's own push probe among pushed to-device events; otkCount tells whether the same
// transaction carried the bot's one-time key count.
func (m *Machine) takeProbe(evt *event.Event, otkCount bool) bool {
	if evt.Type.Type != probeEventType.Type || evt.Sender != m.bot.userID {
		return false
	}
	m.probeLock.Lock()
	defer m.probeLock.Unlock()
	if p := m.probe; p != nil {
		if nonce, _ := evt.Content.Raw["nonce"].(string); nonce == p.nonce {
			p.otkCount = otkCount
			close(p.arrived)
			m.probe = nil
		}
	}
	return true
}

// FallBackToSync leaves appservice mode for the login + /sync path, after ProbePushes found that the homeserver
// does not push what appservice mode needs. The bot's device, created through the appservice, is logged in with
// m.login.application_service under the same device ID, so it keeps its keys and identity; ghost devices log in
// the same way when next used. Call it before Start.
func (m *Machine) FallBackToSync(ctx context.Context) error {
	if !m.asMode.Load() {
		return nil
	}
	if err := m.loginAppservice(ctx, m.client.DeviceID); err != nil {
		return err
	}
	m.client.SetAppServiceDeviceID = false // the device has a token of its own now
	m.asMode.Store(false)
	if m.cfg.DeviceMode == DeviceModePerGhost && !m.publishedWithoutUIA.Load() && m.SharedSecret == "" {
		m.perGhost = false
		m.log.Warn().Msg("encryption.device_mode is per_ghost, but ghost devices cannot be cross-signed here: falling back to single-device mode")
	}
	return nil
}
