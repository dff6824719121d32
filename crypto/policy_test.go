package crypto

import (
	"testing"

	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

func TestParseTrustLevel(t *testing.T) {
	for _, s := range TrustLevels {
		l, err := parseTrustLevel(s)
		if err != nil || l.String() != s {
			t.Errorf("parseTrustLevel(%q) = %v, %v", s, l, err)
		}
	}
	if _, err := parseTrustLevel("trusted"); err == nil {
		t.Error("parseTrustLevel accepted an unknown level")
	}
}

// Devices as ferry may find them, from worst to best.
var (
	blacklisted     = deviceTrust{Blacklisted: true, HasIdentity: true, SignedByOwner: true, VerifiedByFerry: true}
	keyMismatch     = deviceTrust{KeyMismatch: true, HasIdentity: true, SignedByOwner: true}
	unknownDevice   = deviceTrust{Unknown: true}
	forwardedKey    = deviceTrust{Forwarded: true, HasIdentity: true, SignedByOwner: true}
	unsigned        = deviceTrust{HasIdentity: true}
	signedChanged   = deviceTrust{HasIdentity: true, SignedByOwner: true, MasterKeyChanged: true}
	legacyUser      = deviceTrust{}
	signedTOFU      = deviceTrust{HasIdentity: true, SignedByOwner: true}
	verifiedChanged = deviceTrust{HasIdentity: true, SignedByOwner: true, MasterKeyChanged: true, VerifiedByFerry: true}
	verified        = deviceTrust{HasIdentity: true, SignedByOwner: true, VerifiedByFerry: true}
	verifiedNoSig   = deviceTrust{HasIdentity: true, VerifiedByFerry: true}
)

func TestTrustLevelAdmits(t *testing.T) {
	for name, tc := range map[string]struct {
		device                      deviceTrust
		unverified, tofu, verifiedL bool
	}{
		"blacklisted device":                          {blacklisted, false, false, false},
		"signing key changed":                         {keyMismatch, true, false, false},
		"device not in the owner's list":              {unknownDevice, true, false, false},
		"key came from a forward or backup":           {forwardedKey, true, false, false},
		"owner has an identity, device unsigned":      {unsigned, true, false, false},
		"signed, but the owner's master key changed":  {signedChanged, true, false, false},
		"owner never published an identity (legacy)":  {legacyUser, true, true, false},
		"signed by the first master key seen (TOFU)":  {signedTOFU, true, true, false},
		"changed master key that ferry verified":      {verifiedChanged, true, true, true},
		"signed, owner verified by ferry":             {verified, true, true, true},
		"owner verified by ferry but device unsigned": {verifiedNoSig, true, false, false},
		"verified owner, device signing key mismatch": {deviceTrust{KeyMismatch: true, HasIdentity: true, SignedByOwner: true, VerifiedByFerry: true}, true, false, false},
		"legacy user whose device is unknown":         {deviceTrust{Unknown: true}, true, false, false},
		"legacy user whose key arrived forwarded":     {deviceTrust{Forwarded: true}, true, false, false},
		"blacklisted device of a legacy user":         {deviceTrust{Blacklisted: true}, false, false, false},
		"identity known, self-signing key not signed": {deviceTrust{HasIdentity: true, VerifiedByFerry: false}, true, false, false},
	} {
		t.Run(name, func(t *testing.T) {
			for level, want := range map[trustLevel]bool{levelUnverified: tc.unverified, levelCrossSignedTOFU: tc.tofu, levelVerified: tc.verifiedL} {
				if got := level.admits(tc.device); got != want {
					t.Errorf("%s admits %+v = %v, want %v", level, tc.device, got, want)
				}
			}
		})
	}
}

func TestWithheldCode(t *testing.T) {
	for name, tc := range map[string]struct {
		device deviceTrust
		want   event.RoomKeyWithheldCode
	}{
		"blacklisted": {blacklisted, event.RoomKeyWithheldBlacklisted},
		"unsigned":    {unsigned, event.RoomKeyWithheldUnverified},
		"mismatch":    {keyMismatch, event.RoomKeyWithheldUnverified},
		"changed":     {signedChanged, event.RoomKeyWithheldUnverified},
	} {
		t.Run(name, func(t *testing.T) {
			if got := withheldCode(tc.device); got != tc.want {
				t.Errorf("got %s, want %s", got, tc.want)
			}
		})
	}
}

func TestDecideKeyRequest(t *testing.T) {
	member := keyRequest{OwnSession: true, Entitled: true, Member: true, Device: signedTOFU}
	with := func(f func(r *keyRequest)) keyRequest { r := member; f(&r); return r }
	for name, tc := range map[string]struct {
		level trustLevel
		req   keyRequest
		want  *crypto.KeyShareRejection
	}{
		"member's signed device, entitled":           {levelCrossSignedTOFU, member, nil},
		"member's later device (entitled as a user)": {levelCrossSignedTOFU, with(func(r *keyRequest) { r.Device = signedTOFU }), nil},
		"legacy member":                                   {levelCrossSignedTOFU, with(func(r *keyRequest) { r.Device = legacyUser }), nil},
		"ferry's own user asks":                           {levelUnverified, with(func(r *keyRequest) { r.FromOwnUser = true }), &crypto.KeyShareRejectNoResponse},
		"session from another device":                     {levelUnverified, with(func(r *keyRequest) { r.OwnSession = false }), &crypto.KeyShareRejectNoResponse},
		"user was not in the room when it was shared":     {levelUnverified, with(func(r *keyRequest) { r.Entitled = false }), &crypto.KeyShareRejectNotRecipient},
		"user left since":                                 {levelUnverified, with(func(r *keyRequest) { r.Member = false }), &crypto.KeyShareRejectNotRecipient},
		"not entitled outranks an untrusted device":       {levelCrossSignedTOFU, with(func(r *keyRequest) { r.Entitled = false; r.Device = unsigned }), &crypto.KeyShareRejectNotRecipient},
		"blacklisted device":                              {levelUnverified, with(func(r *keyRequest) { r.Device = blacklisted }), &crypto.KeyShareRejectBlacklisted},
		"unsigned device of a cross-signed user":          {levelCrossSignedTOFU, with(func(r *keyRequest) { r.Device = unsigned }), &crypto.KeyShareRejectUnverified},
		"unsigned device with an unverified policy":       {levelUnverified, with(func(r *keyRequest) { r.Device = unsigned }), nil},
		"TOFU device when ferry wants verified users":     {levelVerified, member, &crypto.KeyShareRejectUnverified},
		"verified device when ferry wants verified users": {levelVerified, with(func(r *keyRequest) { r.Device = verified }), nil},
	} {
		t.Run(name, func(t *testing.T) {
			got := decideKeyRequest(tc.level, tc.req)
			if (got == nil) != (tc.want == nil) || got != nil && *got != *tc.want {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
}

func TestMembershipRotates(t *testing.T) {
	const (
		join   = event.MembershipJoin
		invite = event.MembershipInvite
		leave  = event.MembershipLeave
		ban    = event.MembershipBan
		knock  = event.MembershipKnock
		none   = event.Membership("unknown")
	)
	for name, tc := range map[string]struct {
		prev, next event.Membership
		want       bool
	}{
		"profile change":           {join, join, false},
		"invited user joins":       {invite, join, false},
		"member leaves":            {join, leave, true},
		"member is banned":         {join, ban, true},
		"invite withdrawn":         {invite, leave, true},
		"new user joins":           {leave, join, true},
		"join without history":     {none, join, true},
		"new invite":               {leave, invite, true},
		"knock":                    {leave, knock, true},
		"banned user unbanned":     {ban, leave, false},
		"departed user then ban":   {leave, ban, false},
		"unknown previous, leaves": {none, leave, true},
	} {
		t.Run(name, func(t *testing.T) {
			if got := membershipRotates(tc.prev, tc.next); got != tc.want {
				t.Errorf("membershipRotates(%s, %s) = %v, want %v", tc.prev, tc.next, got, tc.want)
			}
		})
	}
}

func TestTrustFromState(t *testing.T) {
	for name, tc := range map[string]struct {
		state       id.TrustState
		hasIdentity bool
		tofu        bool
	}{
		"cross-signed TOFU":             {id.TrustStateCrossSignedTOFU, true, true},
		"cross-signed, verified":        {id.TrustStateCrossSignedVerified, true, true},
		"cross-signed, key changed":     {id.TrustStateCrossSignedUntrusted, true, false},
		"unsigned, user has identity":   {id.TrustStateUnset, true, false},
		"unsigned, legacy user":         {id.TrustStateUnset, false, true},
		"unknown device":                {id.TrustStateUnknownDevice, false, false},
		"forwarded key":                 {id.TrustStateForwarded, false, false},
		"blacklisted":                   {id.TrustStateBlacklisted, true, false},
		"device signing key mismatched": {id.TrustStateDeviceKeyMismatch, true, false},
	} {
		t.Run(name, func(t *testing.T) {
			if got := levelCrossSignedTOFU.admits(trustFromState(tc.state, tc.hasIdentity)); got != tc.tofu {
				t.Errorf("cross_signed_tofu admits %s (identity %v) = %v, want %v", tc.state, tc.hasIdentity, got, tc.tofu)
			}
			if !levelUnverified.admits(trustFromState(tc.state, tc.hasIdentity)) && tc.state != id.TrustStateBlacklisted {
				t.Errorf("unverified refuses %s", tc.state)
			}
		})
	}
}

func TestSharedSecretMAC(t *testing.T) {
	// HMAC-SHA1 of "abcd\x00alice\x00pw\x00notadmin" keyed with "secret", as the registration API defines it.
	got := sharedSecretMAC("secret", "abcd", "alice", "pw", false)
	if want := "34581d633f71742cfa36177f121f09973c7948c6"; got != want {
		t.Fatalf("got %s, want %s", got, want)
	}
	if got == sharedSecretMAC("secret", "abcd", "alice", "pw", true) {
		t.Error("the admin flag does not change the MAC")
	}
	if got != sharedSecretMAC("secret", "abcd", "alice", "pw", false) {
		t.Error("the MAC is not deterministic")
	}
}

// TestTrustFlag: which senders the source room's clients would flag, and why.
func TestTrustFlag(t *testing.T) {
	for name, tc := range map[string]struct {
		t    deviceTrust
		want string
	}{
		"signed by its owner":                    {t: deviceTrust{HasIdentity: true, SignedByOwner: true}},
		"verified by ferry":                      {t: deviceTrust{HasIdentity: true, SignedByOwner: true, VerifiedByFerry: true}},
		"owner without any identity (legacy)":    {t: deviceTrust{}},
		"unsigned device of a cross-signed user": {t: deviceTrust{HasIdentity: true}, want: FlagUnsignedDevice},
		"unknown device":                         {t: deviceTrust{Unknown: true}, want: FlagUnknownDevice},
		"keys do not match":                      {t: deviceTrust{KeyMismatch: true, HasIdentity: true, SignedByOwner: true}, want: FlagKeyMismatch},
		"forwarded key":                          {t: deviceTrust{Forwarded: true}, want: FlagForwardedKey},
		"identity changed, not verified":         {t: deviceTrust{HasIdentity: true, SignedByOwner: true, MasterKeyChanged: true}, want: FlagIdentityChanged},
		"identity changed, verified by ferry":    {t: deviceTrust{HasIdentity: true, SignedByOwner: true, MasterKeyChanged: true, VerifiedByFerry: true}},
		"blacklisted":                            {t: deviceTrust{Blacklisted: true, HasIdentity: true, SignedByOwner: true}, want: FlagBlacklisted},
	} {
		t.Run(name, func(t *testing.T) {
			if got := trustFlag(tc.t); got != tc.want {
				t.Fatalf("trustFlag = %q, want %q", got, tc.want)
			}
		})
	}
}
