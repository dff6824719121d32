package crypto

import (
	"fmt"

	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// trustLevel is a parsed encryption.share_min_trust / receive_min_trust value, weakest first.
type trustLevel int

const (
	levelUnverified trustLevel = iota
	levelCrossSignedTOFU
	levelVerified
)

func (l trustLevel) String() string {
	switch l {
	case levelUnverified:
		return TrustUnverified
	case levelCrossSignedTOFU:
		return TrustCrossSignedTOFU
	case levelVerified:
		return TrustVerified
	}
	return fmt.Sprintf("trustLevel(%d)", int(l))
}

// parseTrustLevel reads a config trust value.
func parseTrustLevel(s string) (trustLevel, error) {
	switch s {
	case TrustUnverified:
		return levelUnverified, nil
	case TrustCrossSignedTOFU:
		return levelCrossSignedTOFU, nil
	case TrustVerified:
		return levelVerified, nil
	}
	return 0, fmt.Errorf("unknown trust level %q (expected one of %v)", s, TrustLevels)
}

// deviceTrust is what ferry knows about another user's device when it applies a trust policy. Every field is
// derived from the crypto store, which holds what /keys/query returned and what ferry verified of it.
type deviceTrust struct {
	// Blacklisted devices never get keys and their messages are never relayed.
	Blacklisted bool
	// KeyMismatch: the device's signing key changed since ferry first saw it (a server-side forgery or a
	// corrupted device); treated like an untrusted device at every level above unverified.
	KeyMismatch bool
	// Unknown: the device is not in the owner's device list (only possible for received messages).
	Unknown bool
	// Forwarded: the room key came from a forward or a backup, so the sending device is not proven.
	Forwarded bool
	// HasIdentity: the owner has published cross-signing keys (ferry has seen a master key for them).
	HasIdentity bool
	// SignedByOwner: the device is signed by the owner's self-signing key, itself signed by the owner's
	// master key.
	SignedByOwner bool
	// MasterKeyChanged: the owner's master key differs from the first one ferry saw (an identity reset, or a
	// homeserver swapping keys); trust on first use no longer holds.
	MasterKeyChanged bool
	// VerifiedByFerry: ferry's bot signed the owner's master key with its user-signing key.
	VerifiedByFerry bool
}

// admits reports whether a device meets this minimum trust level.
//
//   - unverified: every device except blacklisted ones.
//   - cross_signed_tofu: devices signed by their owner's cross-signing identity, the first master key ferry saw
//     being trusted; and, for users who have never published a cross-signing identity, their devices as they
//     are ("legacy" users, whom ferry cannot tell apart from an impostor any better than TOFU can: a server that
//     could hide an identity could just as well present a forged one on first use). Once ferry has seen an
//     identity it remembers it, so a server cannot later strip it to slip in an unsigned device.
//   - verified: devices signed by their owner's identity, whose master key ferry's bot has signed.
func (l trustLevel) admits(t deviceTrust) bool {
	if t.Blacklisted {
		return false
	}
	switch l {
	case levelUnverified:
		return true
	case levelCrossSignedTOFU:
		if t.KeyMismatch || t.Unknown || t.Forwarded {
			return false
		}
		if !t.HasIdentity {
			return true
		}
		return t.SignedByOwner && (!t.MasterKeyChanged || t.VerifiedByFerry)
	case levelVerified:
		return !t.KeyMismatch && !t.Unknown && !t.Forwarded && t.HasIdentity && t.SignedByOwner && t.VerifiedByFerry
	}
	return false
}

// withheldCode is the m.room_key.withheld code for a device this level refuses.
func withheldCode(t deviceTrust) event.RoomKeyWithheldCode {
	if t.Blacklisted {
		return event.RoomKeyWithheldBlacklisted
	}
	return event.RoomKeyWithheldUnverified
}

// keyRequest is what ferry knows when a device asks one of ferry's devices for a Megolm session.
type keyRequest struct {
	// FromOwnUser: the requester is ferry's bot or a ghost. ferry's devices never exchange keys.
	FromOwnUser bool
	// OwnSession: the session was created by the device that was asked. ferry never forwards sessions it
	// received from others.
	OwnSession bool
	// Entitled: the requester's user was among the session's recipients when it was shared (a member of the
	// room then), whether or not this particular device existed or was trusted at that time.
	Entitled bool
	// Member: the requester's user is still joined or invited.
	Member bool
	// Device is the requesting device's trust.
	Device deviceTrust
}

// decideKeyRequest answers a key request under the share policy: a member's device gets a session that its
// user was entitled to, if the device passes the same policy as a fresh share would apply; everyone else is
// refused with the matching code (or silently, for requests that are not ferry's business).
func decideKeyRequest(share trustLevel, r keyRequest) *crypto.KeyShareRejection {
	switch {
	case r.FromOwnUser, !r.OwnSession:
		return &crypto.KeyShareRejectNoResponse
	case !r.Entitled || !r.Member:
		return &crypto.KeyShareRejectNotRecipient
	case r.Device.Blacklisted:
		return &crypto.KeyShareRejectBlacklisted
	case !share.admits(r.Device):
		return &crypto.KeyShareRejectUnverified
	}
	return nil
}

// membershipRotates reports whether a real member's membership change must end the room's outbound sessions:
// anyone who may hold the key leaving (leave, kick, ban, a withdrawn or rejected invite), and anyone arriving
// other than an invited user joining (the new member needs a key, and a fresh session is the simple way to
// give it without sharing history they may not see). Unchanged memberships (profile changes) do not rotate.
func membershipRotates(prev, next event.Membership) bool {
	switch {
	case prev == next:
		return false
	case prev == event.MembershipInvite && next == event.MembershipJoin:
		return false
	case prev == event.MembershipBan && next == event.MembershipLeave,
		prev == event.MembershipLeave && next == event.MembershipBan:
		return false
	}
	return true
}

// Reasons a message's source room clients would flag it (TrustFlag), the values of the copy's SenderTrustKey.
const (
	FlagBlacklisted     = "blacklisted_device"
	FlagKeyMismatch     = "sender_key_mismatch"
	FlagUnknownDevice   = "unknown_device"
	FlagForwardedKey    = "untrusted_forwarded_key"
	FlagIdentityChanged = "identity_changed"
	FlagUnsignedDevice  = "unsigned_device"
)

// trustFlag says why clients would flag a message from a device with this trust, or "" when they would not: the
// devices cross_signed_tofu does not admit, the ones clients show with a warning (an unsigned device of a user
// who has a cross-signing identity, an unknown device, mismatched keys, an untrusted forwarded key, a changed
// identity).
func trustFlag(t deviceTrust) string {
	switch {
	case levelCrossSignedTOFU.admits(t):
		return ""
	case t.Blacklisted:
		return FlagBlacklisted
	case t.KeyMismatch:
		return FlagKeyMismatch
	case t.Unknown:
		return FlagUnknownDevice
	case t.Forwarded:
		return FlagForwardedKey
	case t.MasterKeyChanged:
		return FlagIdentityChanged
	}
	return FlagUnsignedDevice
}

// trustFromState maps mautrix's resolved trust of a sender (as DecryptMegolmEvent reports it) onto deviceTrust.
// hasIdentity and blacklisted come from the crypto store.
func trustFromState(state id.TrustState, hasIdentity bool) deviceTrust {
	t := deviceTrust{HasIdentity: hasIdentity}
	switch state {
	case id.TrustStateBlacklisted:
		t.Blacklisted = true
	case id.TrustStateDeviceKeyMismatch:
		t.KeyMismatch = true
	case id.TrustStateUnknownDevice:
		t.Unknown = true
	case id.TrustStateForwarded, id.TrustStateBackup:
		t.Forwarded = true
	case id.TrustStateCrossSignedUntrusted:
		t.SignedByOwner, t.MasterKeyChanged = true, true
	case id.TrustStateCrossSignedTOFU:
		t.SignedByOwner = true
	case id.TrustStateCrossSignedVerified, id.TrustStateVerified:
		t.SignedByOwner, t.VerifiedByFerry = true, true
	}
	return t
}
