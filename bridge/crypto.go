package bridge

import (
	"context"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// Crypto is everything the relay needs from the E2EE layer. cmd/ferry passes a *crypto.Machine; tests fake it.
type Crypto interface {
	// Decrypt decrypts a Megolm event received by the bot. It returns an error wrapping crypto.ErrKeyMissing
	// when the room key has not arrived yet.
	Decrypt(ctx context.Context, evt *event.Event) (*event.Event, error)
	// WaitForKey waits up to timeout for the room key of an encrypted event.
	WaitForKey(ctx context.Context, evt *event.Event, timeout time.Duration) bool
	// RequestKey asks the sender's devices for the room key of an encrypted event.
	RequestKey(ctx context.Context, evt *event.Event) error
	// Encrypt encrypts content for roomID as sender (the bot or a ghost), sharing the room key with the room's
	// real members only.
	Encrypt(ctx context.Context, sender id.UserID, roomID id.RoomID, evtType event.Type, content *event.Content) (*event.EncryptedEventContent, error)
	// HandleMemberEvent lets the E2EE layer rotate sessions when real members leave. An error means the
	// rotation (if one was due) did not happen: the relay retries the event.
	HandleMemberEvent(ctx context.Context, evt *event.Event) error
	// Rotate discards the outbound sessions ferry uses in a room.
	Rotate(ctx context.Context, roomID id.RoomID) error
}

// SenderPreparer is implemented by E2EE layers that give each ghost its own device: PrepareSender makes that
// device ready (created, cross-signed, signature served) before the ghost joins an encrypted room, so members'
// clients never cache it as unsigned.
type SenderPreparer interface {
	PrepareSender(ctx context.Context, sender id.UserID) error
	// SenderReady tells, without waiting, whether sender's device is ready (PrepareSender would return at once).
	SenderReady(sender id.UserID) bool
}

// TrustFlagger is implemented by E2EE layers that tell whether the source room's clients would flag a decrypted
// message (an unsigned device of a user with a cross-signing identity, an unknown device, mismatched keys, an
// untrusted forwarded key, a changed identity). TrustFlag returns the reason, or "" when they would not; the
// relay then marks the copies (see Translate), so trust is not laundered through a ghost's cross-signed device.
// *crypto.Machine implements it.
type TrustFlagger interface {
	TrustFlag(ctx context.Context, dec *event.Event) (string, error)
}
