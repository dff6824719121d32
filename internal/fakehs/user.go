package fakehs

import (
	"context"
	"errors"
	"fmt"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// User is a simulated Matrix user with one E2EE device logged in on a Server: a mautrix client and an
// OlmMachine on in-memory stores, standing for a real client such as Element. A User is not safe for
// concurrent use.
type User struct {
	ID       id.UserID
	DeviceID id.DeviceID
	Client   *mautrix.Client
	Machine  *crypto.OlmMachine
	Store    *crypto.MemoryStore
	State    mautrix.StateStore

	srv *Server
}

// userPassword is the password of every User (it answers the cross-signing UIA with Options.CrossSigningUIA).
const userPassword = "fakehs-password"

// passwordUIA answers an m.login.password UIA challenge.
func passwordUIA(user id.UserID, password string) mautrix.UIACallback {
	return func(resp *mautrix.RespUserInteractive) any {
		if resp == nil || !resp.HasSingleStageFlow(mautrix.AuthTypePassword) {
			return nil
		}
		return map[string]any{
			"type": mautrix.AuthTypePassword, "session": resp.Session, "password": password,
			"identifier": map[string]string{"type": string(mautrix.IdentifierTypeUser), "user": string(user)},
		}
	}
}

// UserOptions describe a User made with NewUser.
type UserOptions struct {
	// DeviceID is the device to log in as (generated when empty).
	DeviceID id.DeviceID
	// DisplayName becomes the user's profile name (used in membership events).
	DisplayName string
	// CrossSign generates and uploads cross-signing keys and signs the device with them, as Element does at
	// sign-up, so that senders requiring cross-signed devices (mautrix's default) share room keys with it.
	CrossSign bool
	// ShareMinTrust is the lowest trust of devices this user shares its room keys with. The zero value
	// (TrustStateUnset) shares with every device; mautrix's own default is cross-signed TOFU.
	ShareMinTrust id.TrustState
}

// NewUser logs a user in with a password (creating the account), creates its Olm account and uploads its
// device and one-time keys.
func (s *Server) NewUser(ctx context.Context, userID id.UserID, opts UserOptions) (*User, error) {
	cli, err := mautrix.NewClient(s.URL, "", "")
	if err != nil {
		return nil, err
	}
	cli.Client = s.client
	cli.Log = zerolog.Nop()
	_, err = cli.Login(ctx, &mautrix.ReqLogin{
		Type:             mautrix.AuthTypePassword,
		Identifier:       mautrix.UserIdentifier{Type: mautrix.IdentifierTypeUser, User: userID.String()},
		Password:         userPassword,
		DeviceID:         opts.DeviceID,
		StoreCredentials: true,
	})
	if err != nil {
		return nil, fmt.Errorf("failed to log in %s: %w", userID, err)
	}
	if opts.DisplayName != "" {
		s.mu.Lock()
		s.accountLocked(userID).displayname = opts.DisplayName
		s.mu.Unlock()
	}
	store := crypto.NewMemoryStore(nil)
	state := mautrix.NewMemoryStateStore()
	cli.StateStore = state
	log := zerolog.Nop()
	mach := crypto.NewOlmMachine(cli, &log, store, state.(crypto.StateStore))
	mach.ShareKeysMinTrust = opts.ShareMinTrust
	if err = mach.Load(ctx); err != nil {
		return nil, fmt.Errorf("failed to load the Olm account of %s: %w", userID, err)
	}
	if err = mach.ShareKeys(ctx, -1); err != nil {
		return nil, fmt.Errorf("failed to upload the keys of %s: %w", userID, err)
	}
	if opts.CrossSign {
		keys, err := mach.GenerateCrossSigningKeys()
		if err != nil {
			return nil, err
		}
		if err = mach.PublishCrossSigningKeys(ctx, keys, passwordUIA(userID, userPassword)); err != nil {
			return nil, fmt.Errorf("failed to publish the cross-signing keys of %s: %w", userID, err)
		}
		if err = mach.SignOwnDevice(ctx, mach.OwnIdentity()); err != nil {
			return nil, fmt.Errorf("failed to cross-sign the device of %s: %w", userID, err)
		}
	}
	return &User{ID: userID, DeviceID: cli.DeviceID, Client: cli, Machine: mach, Store: store, State: state, srv: s}, nil
}

// SetRoom tells the user's state store who is in a room and whether (and how) it is encrypted, as its sync
// would have.
func (u *User) SetRoom(ctx context.Context, room id.RoomID, members []id.UserID, enc *event.EncryptionEventContent) error {
	for _, m := range members {
		if err := u.State.SetMembership(ctx, room, m, event.MembershipJoin); err != nil {
			return err
		}
	}
	if enc != nil {
		return u.State.SetEncryptionEvent(ctx, room, enc)
	}
	return nil
}

// Encrypt encrypts content for room with the user's Megolm session, first sharing a new session with the
// room's members (per SetRoom) when there is none or it rotated. shared reports whether a key share happened.
func (u *User) Encrypt(ctx context.Context, room id.RoomID, evtType event.Type, content any) (enc *event.EncryptedEventContent, shared bool, err error) {
	enc, err = u.Machine.EncryptMegolmEvent(ctx, room, evtType, content)
	if err == nil {
		return enc, false, nil
	}
	if !errors.Is(err, crypto.ErrSessionExpired) && !errors.Is(err, crypto.ErrNoGroupSession) && !errors.Is(err, crypto.ErrSessionNotShared) {
		return nil, false, err
	}
	members, err := u.State.GetRoomJoinedOrInvitedMembers(ctx, room)
	if err != nil {
		return nil, false, err
	}
	if err = u.Machine.ShareGroupSession(ctx, room, members); err != nil {
		return nil, false, fmt.Errorf("failed to share a room key: %w", err)
	}
	enc, err = u.Machine.EncryptMegolmEvent(ctx, room, evtType, content)
	return enc, true, err
}

// ReceiveToDevice hands the to-device events queued for the user's device to its OlmMachine (room keys,
// key requests), as a sync loop would. It returns how many there were.
func (u *User) ReceiveToDevice(ctx context.Context) int {
	evts := u.srv.TakeToDevice(u.ID, u.DeviceID)
	for _, evt := range evts {
		u.Machine.HandleToDeviceEvent(ctx, evt)
	}
	return len(evts)
}

// Decrypt decrypts a Megolm event with the user's device.
func (u *User) Decrypt(ctx context.Context, evt *event.Event) (*event.Event, error) {
	return u.Machine.DecryptMegolmEvent(ctx, evt)
}
