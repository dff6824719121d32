// Package crypto is ferry's device, trust, storage and policy layer around mautrix's Olm/Megolm implementation.
// It owns the bot's device (and, in per-ghost mode, each ghost's device), decides who receives ferry's room
// keys, and keeps every private key pickled with the pickle key in the crypto store. It never implements
// Olm/Megolm primitives itself and never logs plaintext, keys or tokens. It does not import bridge or database.
package crypto

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
	"maunium.net/go/mautrix/sqlstatestore"
)

// ErrKeyMissing is returned by Decrypt when the Megolm session of an event is not (yet) known. The caller
// should wait, request the key and park the event; it relays once the key arrives.
var ErrKeyMissing = errors.New("room key not received yet")

// ErrKeyWithheld is returned by Decrypt when the sender's device refused to share the room key.
var ErrKeyWithheld = errors.New("room key withheld by sender")

// accountID is the crypto store account of the bot device. Ghost devices use their user ID.
const botAccountID = "ferry-bot"

// deviceDisplayName is shown in clients' device lists for ferry's devices.
const deviceDisplayName = "ferry"

// Machine is the E2EE side of ferry for one homeserver: the bot device that decrypts everything ferry
// receives, and the devices that encrypt what ferry sends.
type Machine struct {
	log        zerolog.Logger
	cfg        Config
	db         *dbutil.Database
	stateStore *sqlstatestore.SQLStateStore
	client     *mautrix.Client
	store      *crypto.SQLCryptoStore
	mach       *crypto.OlmMachine
	// IsOwn tells ferry's own users (bot and ghosts) apart from real users; they never receive ferry's keys.
	isOwn func(id.UserID) bool

	// SessionReceived is called when a Megolm session arrives, so parked events can relay.
	SessionReceived func(ctx context.Context, roomID id.RoomID, sessionID id.SessionID)
	// SyncedTimeline receives the room events the bot's /sync returns (only types in syncTimelineTypes): some
	// homeservers (Dendrite 0.13.8) never push redactions to appservices.
	SyncedTimeline func(ctx context.Context, evts []*event.Event)

	// guards the following fields
	lock       sync.Mutex
	syncCancel context.CancelFunc
}

// NewMachine prepares the crypto layer. client must be a fresh appservice client for the bot (it will be logged
// in as the bot's device). Call Init before use.
func NewMachine(log zerolog.Logger, cfg Config, db *dbutil.Database, ss *sqlstatestore.SQLStateStore, client *mautrix.Client, isOwn func(id.UserID) bool) *Machine {
	return &Machine{log: log, cfg: cfg, db: db, stateStore: ss, client: client, isOwn: isOwn}
}

// Init upgrades the crypto store, creates or reuses the bot's device and loads its Olm account.
func (m *Machine) Init(ctx context.Context) error {
	if m.cfg.PickleKey == "" || m.cfg.PickleKey == "generate" {
		return errors.New("encryption.pickle_key is not set")
	}
	m.store = crypto.NewSQLCryptoStore(m.db, dbutil.ZeroLogger(m.log.With().Str("db_section", "crypto").Logger()), botAccountID, "", []byte(m.cfg.PickleKey))
	if err := m.store.DB.Upgrade(ctx); err != nil {
		return fmt.Errorf("failed to upgrade crypto store: %w", err)
	}
	deviceID, err := m.store.FindDeviceID(ctx)
	if err != nil {
		return fmt.Errorf("failed to read the bot's device ID: %w", err)
	}
	existing := deviceID != ""
	if err = m.login(ctx, deviceID); err != nil {
		return err
	}
	m.store.DeviceID = m.client.DeviceID
	m.mach = crypto.NewOlmMachine(m.client, &m.log, m.store, m.stateStore)
	// ferry decides who gets keys per room (real members only), so mautrix's own tracking is not needed.
	m.mach.DisableSharedGroupSessionTracking = true
	m.mach.AllowKeyShare = m.allowKeyShare
	m.mach.SessionReceived = func(ctx context.Context, roomID id.RoomID, sessionID id.SessionID, _ uint32) {
		if m.SessionReceived != nil {
			m.SessionReceived(ctx, roomID, sessionID)
		}
	}
	m.client.Store = m.store
	m.client.Syncer = &cryptoSyncer{mach: m.mach, log: m.log, timeline: func(ctx context.Context, evts []*event.Event) {
		if m.SyncedTimeline != nil {
			m.SyncedTimeline(ctx, evts)
		}
	}}
	if err = m.mach.Load(ctx); err != nil {
		return fmt.Errorf("failed to load the bot's Olm account: %w", err)
	}
	if existing {
		ok, err := m.keysOnServer(ctx)
		if err != nil {
			return err
		} else if !ok {
			m.log.Warn().Msg("The bot's device vanished from the homeserver, creating a new one")
			return m.reset(ctx)
		}
	} else if err = m.mach.ShareKeys(ctx, -1); err != nil {
		return fmt.Errorf("failed to upload the bot's device keys: %w", err)
	}
	m.log.Info().Stringer("device_id", m.client.DeviceID).Bool("new_device", !existing).Msg("Bot device ready")
	return nil
}

func (m *Machine) login(ctx context.Context, deviceID id.DeviceID) error {
	if m.cfg.Appservice {
		if err := m.client.CreateDeviceMSC4190(ctx, deviceID, deviceDisplayName); err != nil {
			return fmt.Errorf("failed to create the bot's device through the appservice (MSC4190): %w", err)
		}
		return nil
	}
	_, err := m.client.Login(ctx, &mautrix.ReqLogin{
		Type:                     mautrix.AuthTypeAppservice,
		Identifier:               mautrix.UserIdentifier{Type: mautrix.IdentifierTypeUser, User: string(m.client.UserID)},
		DeviceID:                 deviceID,
		StoreCredentials:         true,
		InitialDeviceDisplayName: deviceDisplayName,
	})
	if err != nil {
		return fmt.Errorf("failed to log in the bot's device with m.login.application_service: %w", err)
	}
	return nil
}

func (m *Machine) keysOnServer(ctx context.Context) (bool, error) {
	resp, err := m.client.QueryKeys(ctx, &mautrix.ReqQueryKeys{DeviceKeys: map[id.UserID]mautrix.DeviceIDList{m.client.UserID: {m.client.DeviceID}}})
	if err != nil {
		return false, fmt.Errorf("failed to check that the bot's device still exists: %w", err)
	}
	dev, ok := resp.DeviceKeys[m.client.UserID][m.client.DeviceID]
	return ok && len(dev.Keys) > 0, nil
}

// reset forgets the bot's vanished device and creates a fresh one.
func (m *Machine) reset(ctx context.Context) error {
	if _, err := m.db.Exec(ctx, `DELETE FROM crypto_account WHERE account_id=$1`, botAccountID); err != nil {
		return fmt.Errorf("failed to forget the vanished device: %w", err)
	}
	m.client.DeviceID = ""
	m.client.AccessToken = ""
	return m.Init(ctx)
}

// Start runs the to-device /sync loop for homeservers that do not push to-device events to appservices.
func (m *Machine) Start(ctx context.Context) {
	if m.cfg.Appservice {
		return
	}
	ctx, cancel := context.WithCancel(ctx)
	m.lock.Lock()
	m.syncCancel = cancel
	m.lock.Unlock()
	go func() {
		for ctx.Err() == nil {
			err := m.client.SyncWithContext(ctx)
			if err != nil && ctx.Err() == nil {
				m.log.Err(err).Msg("To-device sync stopped, restarting in 5 seconds")
				select {
				case <-ctx.Done():
				case <-time.After(5 * time.Second):
				}
			}
		}
	}()
}

// Stop ends the sync loop.
func (m *Machine) Stop() {
	m.lock.Lock()
	defer m.lock.Unlock()
	if m.syncCancel != nil {
		m.syncCancel()
	}
	m.client.StopSync()
}

// SetIsOwn tells the machine which users are ferry's own (bot and ghosts); they never receive ferry's keys.
func (m *Machine) SetIsOwn(isOwn func(id.UserID) bool) { m.isOwn = isOwn }

// DeviceID is the bot's device.
func (m *Machine) DeviceID() id.DeviceID { return m.client.DeviceID }

// Olm exposes the bot's OlmMachine to appservice-mode listeners.
func (m *Machine) Olm() *crypto.OlmMachine { return m.mach }

// Decrypt decrypts a Megolm event received by the bot. A missing session is ErrKeyMissing.
func (m *Machine) Decrypt(ctx context.Context, evt *event.Event) (*event.Event, error) {
	dec, err := m.mach.DecryptMegolmEvent(ctx, evt)
	switch {
	case errors.Is(err, crypto.ErrNoSessionFound):
		return nil, fmt.Errorf("%w: %w", ErrKeyMissing, err)
	case errors.Is(err, crypto.ErrGroupSessionWithheld):
		return nil, fmt.Errorf("%w: %w", ErrKeyWithheld, err)
	}
	return dec, err
}

// WaitForKey waits up to timeout for the session of an encrypted event.
func (m *Machine) WaitForKey(ctx context.Context, evt *event.Event, timeout time.Duration) bool {
	content, ok := evt.Content.Parsed.(*event.EncryptedEventContent)
	if !ok {
		return false
	}
	return m.mach.WaitForSession(ctx, evt.RoomID, content.SenderKey, content.SessionID, timeout)
}

// RequestKey asks the sender's devices for the session of an encrypted event.
func (m *Machine) RequestKey(ctx context.Context, evt *event.Event) error {
	content, ok := evt.Content.Parsed.(*event.EncryptedEventContent)
	if !ok {
		return errors.New("not an encrypted event")
	}
	device := content.DeviceID
	if device == "" {
		device = "*"
	}
	return m.mach.SendRoomKeyRequest(ctx, evt.RoomID, content.SenderKey, content.SessionID, "", map[id.UserID][]id.DeviceID{evt.Sender: {device}})
}

// Encrypt encrypts content for a room as sender (the bot or a ghost). The room key is shared only with the
// devices of the room's real members (joined and invited), never with ghosts or the bot.
func (m *Machine) Encrypt(ctx context.Context, sender id.UserID, roomID id.RoomID, evtType event.Type, content *event.Content) (*event.EncryptedEventContent, error) {
	enc, err := m.mach.EncryptMegolmEvent(ctx, roomID, evtType, content)
	if err != nil {
		if !errors.Is(err, crypto.ErrSessionExpired) && !errors.Is(err, crypto.ErrSessionNotShared) && !errors.Is(err, crypto.ErrNoGroupSession) {
			return nil, err
		}
		members, err := m.RealMembers(ctx, roomID)
		if err != nil {
			return nil, fmt.Errorf("failed to get room members: %w", err)
		}
		if err = m.mach.ShareGroupSession(ctx, roomID, members); err != nil {
			return nil, fmt.Errorf("failed to share room key: %w", err)
		}
		if enc, err = m.mach.EncryptMegolmEvent(ctx, roomID, evtType, content); err != nil {
			return nil, fmt.Errorf("failed to encrypt after sharing the room key: %w", err)
		}
	}
	return enc, nil
}

// RealMembers lists a room's joined and invited members that are not ferry's own users.
func (m *Machine) RealMembers(ctx context.Context, roomID id.RoomID) ([]id.UserID, error) {
	all, err := m.stateStore.GetRoomJoinedOrInvitedMembers(ctx, roomID)
	if err != nil {
		return nil, err
	}
	out := all[:0]
	for _, u := range all {
		if !m.isOwn(u) {
			out = append(out, u)
		}
	}
	return out, nil
}

// HandleMemberEvent rotates a room's outbound session when a real member leaves.
func (m *Machine) HandleMemberEvent(ctx context.Context, evt *event.Event) {
	if evt.StateKey == nil || m.isOwn(id.UserID(*evt.StateKey)) {
		return
	}
	m.mach.HandleMemberEvent(ctx, evt)
}

// Rotate discards a room's outbound sessions so the next message starts a new one.
func (m *Machine) Rotate(ctx context.Context, roomID id.RoomID) error {
	return m.store.RemoveOutboundGroupSession(ctx, roomID)
}

// allowKeyShare answers key requests: only devices of real users who are members of the room.
func (m *Machine) allowKeyShare(ctx context.Context, device *id.Device, info event.RequestedKeyInfo) *crypto.KeyShareRejection {
	if m.isOwn(device.UserID) {
		return &crypto.KeyShareRejectNoResponse
	}
	member := m.stateStore.IsMembership(ctx, info.RoomID, device.UserID, event.MembershipJoin, event.MembershipInvite)
	if !member {
		return &crypto.KeyShareRejectNotRecipient
	}
	return nil
}

// syncTimelineTypes are the room event types the bot's /sync asks for besides to-device and device lists.
var syncTimelineTypes = []event.Type{event.EventRedaction}

type cryptoSyncer struct {
	mach     *crypto.OlmMachine
	log      zerolog.Logger
	timeline func(ctx context.Context, evts []*event.Event)
}

func (s *cryptoSyncer) ProcessResponse(ctx context.Context, resp *mautrix.RespSync, since string) error {
	s.mach.ProcessSyncResponse(ctx, resp, since)
	var evts []*event.Event
	for roomID, room := range resp.Rooms.Join {
		for _, evt := range room.Timeline.Events {
			evt.RoomID = roomID
			evts = append(evts, evt)
		}
	}
	if len(evts) > 0 {
		s.timeline(ctx, evts)
	}
	return nil
}

func (s *cryptoSyncer) OnFailedSync(_ *mautrix.RespSync, err error) (time.Duration, error) {
	if errors.Is(err, mautrix.MUnknownToken) {
		return 0, err
	}
	s.log.Warn().Err(err).Msg("To-device sync failed, retrying in 5 seconds")
	return 5 * time.Second, nil
}

func (s *cryptoSyncer) GetFilterJSON(_ id.UserID) *mautrix.Filter {
	everything := []event.Type{{Type: "*"}}
	return &mautrix.Filter{
		Presence:    &mautrix.FilterPart{NotTypes: everything},
		AccountData: &mautrix.FilterPart{NotTypes: everything},
		Room: &mautrix.RoomFilter{
			Ephemeral:   &mautrix.FilterPart{NotTypes: everything},
			AccountData: &mautrix.FilterPart{NotTypes: everything},
			State:       &mautrix.FilterPart{NotTypes: everything},
			Timeline:    &mautrix.FilterPart{Types: syncTimelineTypes, Limit: 50},
		},
	}
}
