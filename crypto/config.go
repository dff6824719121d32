package crypto

// PickleKeyGenerate is the pickle_key marker meaning "generate a random key at first start and write it back
// to the config file".
const PickleKeyGenerate = "generate"

// Device modes (encryption.device_mode).
const (
	DeviceModePerGhost     = "per_ghost"
	DeviceModeSingleDevice = "single_device"
)

// DeviceModes lists the accepted device_mode values, default first.
var DeviceModes = []string{DeviceModePerGhost, DeviceModeSingleDevice}

// Trust levels for encryption.share_min_trust and encryption.receive_min_trust, weakest first.
const (
	// TrustUnverified accepts any device of the user.
	TrustUnverified = "unverified"
	// TrustCrossSignedTOFU accepts devices signed by the user's cross-signing key, the first seen master key
	// being trusted on first use; users who never published a cross-signing identity are accepted as they are.
	TrustCrossSignedTOFU = "cross_signed_tofu"
	// TrustVerified accepts only devices whose user's master key ferry's bot signed (ferry has no
	// verification flow yet, so nobody qualifies).
	TrustVerified = "verified"
)

// TrustLevels lists the accepted trust values, weakest first.
var TrustLevels = []string{TrustUnverified, TrustCrossSignedTOFU, TrustVerified}

// What ferry does with a message its source room's clients would flag (encryption.untrusted_messages).
const (
	// UntrustedMark relays it with a visible warning in the copy and the reason under SenderTrustKey.
	UntrustedMark = "mark"
	// UntrustedRefuse does not relay it (as receive_min_trust: cross_signed_tofu would).
	UntrustedRefuse = "refuse"
)

// UntrustedModes lists the accepted untrusted_messages values, default first.
var UntrustedModes = []string{UntrustedMark, UntrustedRefuse}

// DefaultConfig returns the `encryption` section with every default filled in.
func DefaultConfig() Config {
	return Config{
		PickleKey:         PickleKeyGenerate,
		DeviceMode:        DeviceModePerGhost,
		Appservice:        false,
		ShareMinTrust:     TrustCrossSignedTOFU,
		ReceiveMinTrust:   TrustUnverified,
		UntrustedMessages: UntrustedMark,
	}
}

// Config is the `encryption` section of ferry's configuration.
type Config struct {
	// PickleKey encrypts every private key ferry stores. "generate" means: generate once at first start and
	// write it back to the config file.
	PickleKey string `yaml:"pickle_key"`
	// DeviceMode is "per_ghost" (default: every ghost sends from its own device, cross-signed by the ghost's
	// own identity) or "single_device" (the bot's device encrypts for every ghost, as mautrix bridges do).
	// per_ghost needs Appservice (MSC4190) or, on Dendrite, homeserver.registration_shared_secret; without
	// either ferry falls back to single_device and says so at start.
	DeviceMode string `yaml:"device_mode"`
	// Appservice enables appservice-mode encryption (MSC2409 to-device pushes, MSC3202 device lists and key
	// counts, MSC4190 device creation). Only for homeservers that support it (Synapse); Dendrite does not.
	Appservice bool `yaml:"appservice"`
	// ShareMinTrust is the minimum trust of a recipient device for ferry's outbound room keys:
	// "unverified", "cross_signed_tofu" or "verified". Devices below it get m.room_key.withheld; key requests
	// are answered under the same rule. cross_signed_tofu accepts users without any cross-signing identity as
	// they are (see trustLevel.admits).
	ShareMinTrust string `yaml:"share_min_trust"`
	// ReceiveMinTrust is the minimum trust of a sending device whose messages ferry relays.
	ReceiveMinTrust string `yaml:"receive_min_trust"`
	// UntrustedMessages says what happens to a message the source room's clients would flag (a device its
	// owner's cross-signing identity did not sign, an unknown device, mismatched keys, a key from an untrusted
	// forward, a changed identity): "mark" relays it with a visible warning and a machine-readable reason, so it
	// never arrives looking trusted from a ghost's cross-signed device; "refuse" does not relay it.
	UntrustedMessages string `yaml:"untrusted_messages"`
}
