package crypto

import (
	"context"

	"maunium.net/go/mautrix/id"
)

// DeviceSummary describes ferry's devices and key-sharing policy, for the bot's devices command.
type DeviceSummary struct {
	// BotDeviceID is the bot's device; empty before Init.
	BotDeviceID id.DeviceID
	// BotCrossSigned tells whether the bot's device is signed by the bot's own cross-signing identity.
	BotCrossSigned bool
	// GhostDevices is how many ghost devices ferry holds.
	GhostDevices int
	// Mode is the device mode in force: encryption.device_mode, or single_device when per-ghost devices are
	// not possible on this homeserver.
	Mode string
	// ShareMinTrust and ReceiveMinTrust are encryption.share_min_trust and encryption.receive_min_trust.
	ShareMinTrust   string
	ReceiveMinTrust string
}

// DeviceSummary reports the bot's device, how many ghost devices exist and the policy in force.
func (m *Machine) DeviceSummary(ctx context.Context) (DeviceSummary, error) {
	s := DeviceSummary{Mode: m.cfg.DeviceMode, ShareMinTrust: m.cfg.ShareMinTrust, ReceiveMinTrust: m.cfg.ReceiveMinTrust}
	if m.client != nil {
		s.BotDeviceID = m.client.DeviceID
	}
	if m.bot == nil {
		return s, nil
	}
	s.BotCrossSigned = m.botSigned
	if !m.perGhost {
		s.Mode = DeviceModeSingleDevice
	}
	ghosts, err := m.ghostAccounts(ctx)
	if err != nil {
		return s, err
	}
	s.GhostDevices = len(ghosts)
	return s, nil
}
