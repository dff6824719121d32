// Package crypto is ferry's device, trust, storage and policy layer around mautrix's Olm/Megolm implementation.
// It owns the bot's device (and, in per-ghost mode, each ghost's device), their cross-signing identities, decides
// who receives ferry's room keys, and keeps every private key (Olm and Megolm pickles, cross-signing seeds,
// passwords, access tokens, the recovery key) encrypted with the pickle key in the crypto store. It never
// implements Olm/Megolm primitives itself and never logs plaintext, keys or tokens. It does not import bridge or
// database.
//
// Devices: the bot has one device, cross-signed by the bot's identity; it receives and decrypts everything. In
// per-ghost mode each ghost that sends into an encrypted room gets its own device (created on first use, with its
// own Olm account in the shared crypto store under the ghost's user ID) signed by the ghost's own identity, and
// the ghost's messages are encrypted with that device's Megolm session. Room keys go only to real members'
// devices (joined and invited), never to the bot or ghosts, under encryption.share_min_trust.
package crypto

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"go.mau.fi/util/exsync"
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

// ErrUntrustedSender is returned by Decrypt when the sending device is below encryption.receive_min_trust. The
// caller must not relay the event.
var ErrUntrustedSender = errors.New("sending device is below encryption.receive_min_trust")

// botAccountID is the crypto store account of the bot device. Ghost devices use their user ID.
const botAccountID = "ferry-bot"

// deviceDisplayName is shown in clients' device lists for ferry's devices.
const deviceDisplayName = "ferry"

// Machine is the E2EE side of ferry for one homeserver: the bot device that decrypts everything ferry
// receives, and the devices that encrypt what ferry sends.
type Machine struct {
	log        zerolog.Logger
	dbLog      dbutil.DatabaseLogger
	cfg        Config
	db         *dbutil.Database
	stateStore *sqlstatestore.SQLStateStore
	client     *mautrix.Client
	asToken    string // the appservice token the client was made with (logins replace the client's token)
	// IsOwn tells ferry's own users (bot and ghosts) apart from real users; they never receive ferry's keys.
	isOwn func(id.UserID) bool

	// Transient tells the database errors that may pass on a later try (a lost connection, a restart) from those
	// that will not (database.Transient): a to-device message whose handling met one is handled again
	// (todevice.go). nil counts every error of the crypto store as transient. Set before Start.
	Transient func(error) bool
	// RetryWait is how long to wait before the bot's next /sync after a failed one, given ferry's backoff: what a
	// rate limit asked for (bridge.RetryWait), else the backoff. nil waits the backoff. Set before Start.
	RetryWait func(err error, backoff time.Duration) time.Duration
	// SharedSecret is homeserver.registration_shared_secret. With it ferry registers its accounts with passwords
	// (see registeringStateStore), which Dendrite's cross-signing upload asks for. Set before Init.
	SharedSecret string
	// NewUserClient returns an appservice client acting as a user (the as_token with user_id masquerading);
	// cmd/ferry sets it to AppService.NewMautrixClient. Needed for ghost devices.
	NewUserClient func(id.UserID) *mautrix.Client

	// SessionReceived is called when a Megolm session arrives, so parked events can relay.
	SessionReceived func(ctx context.Context, roomID id.RoomID, sessionID id.SessionID)
	// SyncedTimeline records the room events of each batch the bot's /sync returns (see SyncedBatch): some
	// homeservers (Dendrite 0.13.8) never push redactions to appservices, and push events out of order after a
	// restart. It is called for every batch, also without events. The /sync token moves past a batch only once
	// it returned nil for it.
	SyncedTimeline func(ctx context.Context, batch SyncedBatch) error
	// SyncedEphemeral receives the typing notifications and read receipts the bot's /sync returns (with their
	// room IDs): homeservers push them to appservices only with appservice-mode encryption's receive_ephemeral,
	// and Dendrite 0.13.8 never does. It must not block.
	SyncedEphemeral func(ctx context.Context, evts []*event.Event)
	// RoomSync: in appservice mode, also run the bot user's /sync without a device, for the rooms' events
	// (roomsync.go), each batch to SyncedTimeline. Set before Start; needs NewUserClient.
	RoomSync bool
	// RoomSyncRefused is called when the homeserver refuses that /sync for good; it ends then. It must not block.
	RoomSyncRefused func(err error)
	// RoomSyncWanted, when set, lets that /sync idle: after each batch it reads on only while this says so, and
	// otherwise reads once every roomSyncIdle or when WakeRoomSync is called. It must not block.
	RoomSyncWanted func() bool

	shareLevel, receiveLevel trustLevel
	// perGhost is the effective device mode (device_mode per_ghost and a way to cross-sign ghosts).
	perGhost bool
	bot      *device
	// botReady is set once Init has made the bot's device: the HTTP server (and so HandleTransactionCrypto) runs
	// before Init, and reads bot only after seeing botReady.
	botReady atomic.Bool
	// botSigned: the bot's device is signed by the bot's cross-signing identity.
	botSigned bool
	// publishedWithoutUIA: the homeserver accepted a cross-signing identity without a password (first-time setup
	// without UIA, or MSC4190), so ghosts can be cross-signed on the login path without passwords too.
	publishedWithoutUIA atomic.Bool
	// refetchKeys holds the senders whose key fetch during a decryption failed to be stored (Decrypt).
	refetchKeys sync.Map
	// asMode is the effective encryption.appservice: true while ferry's devices are created through the
	// appservice (MSC4190) and get their to-device events in transactions; Init turns it off when the
	// homeserver does not offer MSC4190 (see login). Read by the transaction handler, hence atomic.
	asMode atomic.Bool
	// missedPushes: ferry answered a transaction with an error since the last catch-up on device lists.
	missedPushes atomic.Bool
	// toDeviceUnits serialises the handling of the bot's encrypted to-device messages (todevice.go).
	toDeviceUnits sync.Mutex
	// toDeviceCatchUp serialises fetches of the to-device messages the homeserver did not push (catchup_todevice.go).
	toDeviceCatchUp toDeviceCatchUp

	// guards the following fields
	probeLock sync.Mutex
	probe     *pushProbe // see ProbePushes

	ghostCreate *exsync.KeyedMutex[id.UserID]
	// ghostSetUp bounds how many ghost devices are loaded or set up at once (see ghostDevice).
	ghostSetUp chan struct{}
	// cache is shared by the crypto stores of all of ferry's devices (see storeCache).
	cache *storeCache
	// guards the following fields
	ghostsLock sync.Mutex
	ghosts     map[id.UserID]*ghostState
	drained    map[id.UserID]time.Time
	lastSent   map[id.UserID]time.Time
	drainSoon  map[id.UserID]bool // ghosts whose devices a member's room key probably reached (noteRoomKey)

	// guards the following fields
	openLock sync.Mutex
	opened   bool

	// guards the following fields
	adminLock sync.Mutex
	// admin is the admin helper's live login, shared by the calls that overlap it (adminhelper.go); nil when no
	// call runs. adminGone is closed when the last login's logout ended (nil before the first).
	admin     *adminSession
	adminGone chan struct{}
	// adminSecrets holds the admin helper's secrets once a login read them (its password, device, removal
	// marker): logins write them only through it, and RemoveAdminHelper drops it.
	adminSecrets *secretCache
	// adminGate is held for reading by every call that uses the admin helper, and for writing while it is removed.
	adminGate sync.RWMutex

	// loops counts the goroutines Start started (the /sync loops, the ghosts' drain, the to-device catch-up);
	// Stop waits for them.
	loops sync.WaitGroup

	// guards the following fields
	lock        sync.Mutex
	startCancel context.CancelFunc // ends everything Start started (loops)
	roomWake    chan struct{}      // WakeRoomSync's signal to an idle rooms-only /sync (buffered, one)
}

// NewMachine prepares the crypto layer. client must be a fresh appservice client for the bot (it will be logged
// in as the bot's device). Call Init before use.
func NewMachine(log zerolog.Logger, cfg Config, db *dbutil.Database, ss *sqlstatestore.SQLStateStore, client *mautrix.Client, isOwn func(id.UserID) bool) *Machine {
	return &Machine{
		log: log, cfg: cfg, db: db, stateStore: ss, client: client, isOwn: isOwn, asToken: client.AccessToken,
		dbLog:       dbutil.ZeroLogger(log.With().Str("db_section", "crypto").Logger()),
		ghostCreate: exsync.NewKeyedMutex[id.UserID](),
		ghostSetUp:  make(chan struct{}, ghostSetUpParallel),
		cache:       newStoreCache(),
		ghosts:      make(map[id.UserID]*ghostState),
		drained:     make(map[id.UserID]time.Time),
		lastSent:    make(map[id.UserID]time.Time),
		roomWake:    make(chan struct{}, 1),
	}
}

// open upgrades the crypto store once. The shared-secret registration needs it before Init.
func (m *Machine) open(ctx context.Context) error {
	m.openLock.Lock()
	defer m.openLock.Unlock()
	if m.opened {
		return nil
	}
	if m.cfg.PickleKey == "" || m.cfg.PickleKey == PickleKeyGenerate {
		return errors.New("encryption.pickle_key is not set")
	}
	store := crypto.NewSQLCryptoStore(m.db, m.dbLog, botAccountID, "", []byte(m.cfg.PickleKey))
	if err := store.DB.Upgrade(ctx); err != nil {
		return fmt.Errorf("failed to upgrade crypto store: %w", err)
	}
	if err := checkCryptoSchema(ctx, m.db); err != nil {
		return err
	}
	m.opened = true
	return nil
}

// Init upgrades the crypto store, creates or reuses the bot's device and identity, and decides the device mode.
func (m *Machine) Init(ctx context.Context) error {
	if err := m.open(ctx); err != nil {
		return err
	}
	var err error
	if m.shareLevel, err = parseTrustLevel(m.cfg.ShareMinTrust); err != nil {
		return fmt.Errorf("encryption.share_min_trust: %w", err)
	}
	if m.receiveLevel, err = parseTrustLevel(m.cfg.ReceiveMinTrust); err != nil {
		return fmt.Errorf("encryption.receive_min_trust: %w", err)
	}
	switch m.cfg.UntrustedMessages {
	case UntrustedRefuse:
		// Refusing what clients would flag is refusing what cross_signed_tofu does not admit.
		m.receiveLevel = max(m.receiveLevel, levelCrossSignedTOFU)
	case UntrustedMark, "":
	default:
		return fmt.Errorf("encryption.untrusted_messages: unknown value %q (expected one of %v)", m.cfg.UntrustedMessages, UntrustedModes)
	}
	if err = m.checkCleanStop(ctx); err != nil {
		return err
	}
	m.asMode.Store(m.cfg.Appservice)
	if err = m.initBot(ctx); err != nil {
		return err
	}
	m.botReady.Store(true)
	if noUIA, err := m.bot.store.GetSecret(ctx, secretPublishedWithoutUIA); err != nil {
		return fmt.Errorf("failed to read the publication marker: %w", err)
	} else if noUIA != "" {
		m.publishedWithoutUIA.Store(true)
	}
	m.perGhost = false
	switch {
	case m.cfg.DeviceMode != DeviceModePerGhost:
		m.log.Info().Msg("Single-device mode: the bot's device encrypts every ghost's messages (encryption.device_mode)")
	case m.asMode.Load():
		m.perGhost = true
		m.log.Info().Msg("Per-ghost devices: created through the appservice (MSC4190), cross-signed by each ghost")
	case m.publishedWithoutUIA.Load():
		m.perGhost = true
		m.log.Info().Msg("Per-ghost devices: logged in with m.login.application_service, cross-signed without a password (the homeserver accepts a first cross-signing setup without UIA)")
	case m.SharedSecret != "":
		m.perGhost = true
		m.log.Info().Msg("Per-ghost devices: logged in with m.login.application_service, cross-signed after password UIA (ferry sets its accounts' passwords with the shared secret)")
	case m.cfg.Appservice:
		// login already said, in one line, that the homeserver lacks MSC4190 and that this is the fallback.
	default:
		m.log.Warn().Msg("encryption.device_mode is per_ghost, but ghost devices cannot be cross-signed here (needs encryption.appservice with MSC4190, or homeserver.registration_shared_secret): falling back to single-device mode")
	}
	return nil
}

func (m *Machine) initBot(ctx context.Context) error {
	store := m.storeFor(m.client.UserID)
	deviceID, err := store.FindDeviceID(ctx)
	if err != nil {
		return fmt.Errorf("failed to read the bot's device ID: %w", err)
	}
	existing := deviceID != ""
	if err = m.login(ctx, deviceID); err != nil {
		return err
	}
	store.DeviceID = m.client.DeviceID
	mach := m.newOlmMachine(m.client, store)
	mach.SessionReceived = func(ctx context.Context, roomID id.RoomID, sessionID id.SessionID, _ uint32) {
		m.noteRoomKey(ctx, roomID)
		if m.SessionReceived != nil {
			m.SessionReceived(ctx, roomID, sessionID)
		}
	}
	syncStore := &afterBatchStore{SyncStore: store}
	m.client.Store = syncStore
	m.client.Syncer = &cryptoSyncer{mach: mach, client: m.client, store: syncStore, log: m.log, keyLocks: &m.cache.keyLocks, timeline: func(ctx context.Context, batch SyncedBatch) error {
		if m.SyncedTimeline != nil {
			return m.SyncedTimeline(ctx, batch)
		}
		return nil
	}, ephemeral: func(ctx context.Context, evts []*event.Event) {
		if m.SyncedEphemeral != nil {
			m.SyncedEphemeral(ctx, evts)
		}
	}, deviceChanges: m.rotateForDeviceChanges, ghost: m.isGhost, toDevice: m.handleBotToDevice, retryWait: func(err error, backoff time.Duration) time.Duration {
		if m.RetryWait != nil {
			return m.RetryWait(err, backoff)
		}
		return backoff
	}}
	if err = mach.Load(ctx); err != nil {
		return fmt.Errorf("failed to load the bot's Olm account: %w", err)
	}
	m.bot = newDevice(m.client.UserID, m.client, store, mach)
	mach.AllowKeyShare = m.allowKeyShare(m.bot)
	var serverMaster id.Ed25519
	if existing {
		ok, master, err := m.ownKeysOnServer(ctx, m.bot)
		if err != nil {
			return err
		} else if !ok {
			m.log.Warn().Msg("The bot's device vanished from the homeserver, creating a new one")
			return m.reset(ctx)
		}
		serverMaster = master
	} else if err = mach.ShareKeys(ctx, -1); err != nil {
		return fmt.Errorf("failed to upload the bot's device keys: %w", err)
	}
	if err = m.crossSign(ctx, m.bot, newSecretCache(m.bot.store), true, serverMaster); err != nil {
		m.botSigned = false
		if errors.Is(err, ErrNoPassword) {
			m.log.Warn().Err(err).Msg("The bot's device is not cross-signed: the homeserver asks for the bot's password before accepting cross-signing keys, and ferry cannot set one (set homeserver.registration_shared_secret on Dendrite)")
		} else {
			m.log.Warn().Err(err).Msg("The bot's device is not cross-signed")
		}
	} else {
		m.botSigned = true
	}
	m.log.Info().Stringer("device_id", m.client.DeviceID).Bool("new_device", !existing).Bool("cross_signed", m.botSigned).Msg("Bot device ready")
	return nil
}

// newOlmMachine creates the OlmMachine of one of ferry's devices with ferry's settings.
func (m *Machine) newOlmMachine(cli *mautrix.Client, store *crypto.SQLCryptoStore) *crypto.OlmMachine {
	log := m.log.With().Stringer("device_user_id", cli.UserID).Logger()
	mach := crypto.NewOlmMachine(cli, &log, &cachedStore{SQLCryptoStore: store, c: m.cache}, m.stateStore)
	// ferry rotates every device's sessions itself when a member's devices change (rotateForDeviceChanges).
	mach.DisableDeviceChangeKeyRotation = true
	// ferry does not ratchet inbound sessions forward on decrypt, so the per-message ratchet bookkeeping (a
	// session write for every message) buys nothing. Replay protection (the message index) is unaffected.
	mach.DisableRatchetTracking = true
	return mach
}

// AppserviceMode tells whether ferry's devices use the appservice encryption path (MSC4190 devices, to-device
// events and device lists in transactions): encryption.appservice, unless Init found the homeserver without
// MSC4190 and fell back to logins and /sync.
func (m *Machine) AppserviceMode() bool { return m.asMode.Load() }

// lacksMSC4190 tells whether an error creating a device through the appservice means the homeserver does not
// offer MSC4190 (as opposed to a network failure or a server error, which must not switch the path for the whole
// run): servers without it answer PUT /devices/{id} for an unknown device with 404 (M_NOT_FOUND or
// M_UNRECOGNIZED), 405 or 501, or reject the request with a 4xx M_UNRECOGNIZED or M_UNKNOWN.
func lacksMSC4190(err error) bool {
	var httpErr mautrix.HTTPError
	if !errors.As(err, &httpErr) || httpErr.Response == nil {
		return false
	}
	switch status := httpErr.Response.StatusCode; {
	case status == http.StatusNotFound, status == http.StatusMethodNotAllowed, status == http.StatusNotImplemented:
		return true
	case status >= 400 && status < 500 && httpErr.RespError != nil:
		code := httpErr.RespError.ErrCode
		return code == mautrix.MUnrecognized.ErrCode || code == mautrix.MUnknown.ErrCode
	}
	return false
}

// describeHTTPError renders what the homeserver answered, for the MSC4190 detection line.
func describeHTTPError(err error) string {
	var httpErr mautrix.HTTPError
	if errors.As(err, &httpErr) && httpErr.Response != nil {
		if httpErr.RespError != nil && httpErr.RespError.ErrCode != "" {
			return fmt.Sprintf("%d %s", httpErr.Response.StatusCode, httpErr.RespError.ErrCode)
		}
		return fmt.Sprint(httpErr.Response.StatusCode)
	}
	return err.Error()
}

// fallbackDescription says what ferry does without MSC4190, for the detection line.
func (m *Machine) fallbackDescription() string {
	switch {
	case m.cfg.DeviceMode != DeviceModePerGhost:
		return "single-device mode as configured"
	case m.SharedSecret != "":
		return "per-ghost devices cross-signed with passwords set through homeserver.registration_shared_secret"
	default:
		return "per-ghost devices if the homeserver accepts cross-signing keys without a password, otherwise single-device mode (set homeserver.registration_shared_secret for Dendrite)"
	}
}

func (m *Machine) login(ctx context.Context, deviceID id.DeviceID) error {
	// With the appservice's token: an earlier Init that failed after its login (start-up retries Init) left the
	// device's own token in the client.
	m.client.AccessToken = m.asToken
	if m.asMode.Load() {
		err := m.client.CreateDeviceMSC4190(ctx, deviceID, deviceDisplayName)
		if err == nil {
			return nil
		} else if !lacksMSC4190(err) {
			return fmt.Errorf("failed to create the bot's device through the appservice (MSC4190, encryption.appservice): %w", err)
		}
		m.log.Warn().Msgf("encryption.appservice is true, but the homeserver does not offer MSC4190 appservice device creation "+
			"(PUT /_matrix/client/v3/devices/{deviceId} answered %s): falling back to m.login.application_service devices "+
			"with to-device and device lists through /sync, and %s; set encryption.appservice to false to silence this",
			describeHTTPError(err), m.fallbackDescription())
		m.asMode.Store(false)
		if loginErr := m.loginAppservice(ctx, deviceID); loginErr != nil {
			return fmt.Errorf("encryption.appservice is true, but the homeserver offers neither MSC4190 device creation (%s) "+
				"nor m.login.application_service logins, so ferry's bot cannot have an encryption device: %w", describeHTTPError(err), loginErr)
		}
		return nil
	}
	return m.loginAppservice(ctx, deviceID)
}

// loginAppservice logs the bot's device in with m.login.application_service.
func (m *Machine) loginAppservice(ctx context.Context, deviceID id.DeviceID) error {
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

// ownKeysOnServer checks that d's device keys are still on the homeserver and returns the master key the server
// publishes for d's user ("" when none).
func (m *Machine) ownKeysOnServer(ctx context.Context, d *device) (bool, id.Ed25519, error) {
	resp, err := d.client.QueryKeys(ctx, &mautrix.ReqQueryKeys{DeviceKeys: map[id.UserID]mautrix.DeviceIDList{d.userID: {d.client.DeviceID}}})
	if err != nil {
		return false, "", fmt.Errorf("failed to check that the device %s still exists: %w", d.client.DeviceID, err)
	}
	var master id.Ed25519
	if mk, ok := resp.MasterKeys[d.userID]; ok {
		master = mk.FirstKey()
	}
	dev, ok := resp.DeviceKeys[d.userID][d.client.DeviceID]
	return ok && len(dev.Keys) > 0, master, nil
}

// reset forgets the bot's vanished device (and the Olm and outbound Megolm sessions of its old identity key)
// and creates a fresh one.
func (m *Machine) reset(ctx context.Context) error {
	for _, q := range []string{
		sqlDeleteOlmSessions, sqlDeleteAccountOut, sqlDeleteAccount,
	} {
		if _, err := m.db.Exec(ctx, q, botAccountID); err != nil {
			return fmt.Errorf("failed to forget the vanished device: %w", err)
		}
	}
	if err := m.cache.forgetSuccessors(ctx, m.db, m.cache.dropNext("")); err != nil {
		return err
	}
	m.cache.outboundChanged(botAccountID, "")
	// Reaching the server with the old device ID recreated it, empty: remove it again, so the bot's user keeps
	// one device. The appservice deletes it (MSC4190); a logged-in device goes with its token's logout.
	if old := m.client.DeviceID; old != "" {
		var err error
		if m.asMode.Load() {
			// An empty object, not no body: Synapse refuses a DELETE without one (M_BAD_JSON).
			err = m.client.DeleteDevice(ctx, old, &mautrix.ReqDeleteDevice[any]{})
		} else {
			_, err = m.client.Logout(ctx)
		}
		if err != nil {
			m.log.Warn().Err(err).Stringer("device_id", old).Msg("Failed to remove the empty device left where the vanished one was")
		}
	}
	// A new device is created (MSC4190) or logged in (m.login.application_service) with the appservice's token,
	// which logging the old device in had replaced.
	m.client.DeviceID = ""
	m.client.AccessToken = m.asToken
	return m.initBot(ctx)
}

// Start runs the bot's to-device /sync loop and the ghost devices' drain for homeservers that do not push
// to-device events to appservices; in appservice mode it catches up on the device-list changes the homeserver
// may not have pushed while ferry was down.
func (m *Machine) Start(ctx context.Context) {
	ctx, cancel := context.WithCancel(ctx)
	m.lock.Lock()
	m.startCancel = cancel
	m.lock.Unlock()
	if m.asMode.Load() {
		if err := m.catchUpDeviceLists(ctx); err != nil {
			m.log.Warn().Err(err).Msg("Failed to catch up on device lists after the start; the next key share of each room fetches them")
		}
		// One-time key counts are pushed only while ferry is up, too: check the bot's on the server.
		if err := m.bot.mach.ShareKeys(ctx, -1); err != nil {
			m.log.Warn().Err(err).Msg("Failed to check the bot's one-time keys after the start")
		}
		// And so are to-device messages: room keys sent while ferry was down wait in the device's inbox.
		m.goLoop(func() { m.catchUpToDeviceLogged(ctx, time.Now(), "after the start") })
		if m.RoomSync {
			m.startRoomSync(ctx)
		}
		return
	}
	m.goLoop(func() { m.syncLoop(ctx, m.client) })
	if m.perGhost {
		m.goLoop(func() { m.drainLoop(ctx) })
	}
}

// goLoop runs f in a goroutine Stop waits for.
func (m *Machine) goLoop(f func()) {
	m.loops.Add(1)
	go func() {
		defer m.loops.Done()
		f()
	}()
}

// stopLoopsWait bounds Stop's wait for what Start started, each of which ends with its context.
var stopLoopsWait = 15 * time.Second

// Stop ends the sync loops and writes the outbound sessions held in memory, marking the stop as clean so that
// the next start keeps them. Call it after the relay stopped.
func (m *Machine) Stop() {
	m.lock.Lock()
	cancel := m.startCancel
	m.lock.Unlock()
	if cancel != nil {
		cancel()
	}
	m.client.StopSync()
	// A batch still being handled ends first: its token write or log line must not follow the caller's close.
	ended := make(chan struct{})
	go func() {
		m.loops.Wait()
		close(ended)
	}()
	select {
	case <-ended:
	case <-time.After(stopLoopsWait):
		m.log.Warn().Dur("waited", stopLoopsWait).Msg("The /sync loop had not ended at shutdown; stopping without it")
	}
	m.lock.Lock()
	defer m.lock.Unlock()
	if m.bot == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Background shares of successor sessions end first; their sessions are never written (never used either).
	m.cache.closePreshare()
	waitCtx, waitCancel := context.WithTimeout(ctx, 10*time.Second)
	if err := m.cache.waitPreshare(waitCtx); err != nil {
		m.log.Warn().Err(err).Msg("Background room key shares still running at shutdown")
	}
	waitCancel()
	// The replay index is not written here: the relay writes its entries with the events it records as done
	// (TakeReplayIndex). One it has not taken belongs to an event not recorded yet (an inbox event not done, or
	// a copy read back after an unclean stop), decrypted again after the restart, as after a kill.
	if err := m.cache.flushOutbound(ctx); err != nil {
		m.log.Err(err).Msg("Failed to write outbound sessions at shutdown; they will be rotated at the next start")
		return
	}
	if err := m.bot.store.PutSecret(ctx, outboundCleanSecret, "yes"); err != nil {
		m.log.Err(err).Msg("Failed to record the clean stop; outbound sessions will be rotated at the next start")
	}
}

// outboundCleanSecret is "yes" in the bot's crypto store while ferry is stopped after writing every outbound
// session (Stop), and "no" while it runs.
const outboundCleanSecret id.Secret = "ferry_outbound_sessions_written"

// checkCleanStop rotates every outbound Megolm session (of every ferry device) unless the previous run stopped
// cleanly: their stored ratchet state may lag behind messages already sent (see storeCache), and reusing it would
// repeat message indices. Then it marks the store as in use.
func (m *Machine) checkCleanStop(ctx context.Context) error {
	store := m.storeFor(m.client.UserID)
	clean, err := store.GetSecret(ctx, outboundCleanSecret)
	if err != nil {
		return fmt.Errorf("failed to read the clean-stop marker: %w", err)
	}
	if clean != "yes" {
		res, err := m.db.Exec(ctx, sqlDeleteAllOutbound)
		if err != nil {
			return fmt.Errorf("failed to rotate outbound sessions after an unclean stop: %w", err)
		}
		if n, _ := res.RowsAffected(); n > 0 {
			m.log.Warn().Int64("sessions", n).Msg("The previous run did not stop cleanly: rotated every outbound Megolm session")
		}
	}
	m.cache.outboundChanged("", "")
	if err = store.PutSecret(ctx, outboundCleanSecret, "no"); err != nil {
		return fmt.Errorf("failed to write the clean-stop marker: %w", err)
	}
	return nil
}

// SetIsOwn tells the machine which users are ferry's own (bot and ghosts); they never receive ferry's keys.
func (m *Machine) SetIsOwn(isOwn func(id.UserID) bool) { m.isOwn = isOwn }

// DeviceID is the bot's device.
func (m *Machine) DeviceID() id.DeviceID { return m.client.DeviceID }

// Decrypt decrypts a Megolm event received by the bot. A missing session is ErrKeyMissing; a sending device
// below encryption.receive_min_trust is ErrUntrustedSender.
func (m *Machine) Decrypt(ctx context.Context, evt *event.Event) (*event.Event, error) {
	// A sender ferry meets for the first time has their keys fetched here; what the fetch stores is written
	// together, all or nothing (trustBatch).
	bctx, batch := withTrustBatch(ctx)
	_, again := m.refetchKeys.Load(evt.Sender)
	if again {
		// mautrix fetches a sender's keys once per device key and machine: after a fetch whose writes failed
		// (nothing of it stored), ferry fetches them again itself.
		if _, err := m.bot.mach.FetchKeys(bctx, []id.UserID{evt.Sender}, true); err != nil {
			_ = batch.finish(ctx)
			return nil, fmt.Errorf("failed to fetch the keys of %s again: %w", evt.Sender, err)
		}
	}
	dec, err := m.bot.mach.DecryptMegolmEvent(bctx, evt)
	if flushErr := batch.finish(ctx); flushErr != nil {
		m.refetchKeys.Store(evt.Sender, struct{}{})
		return nil, flushErr
	} else if again {
		m.refetchKeys.Delete(evt.Sender)
	}
	switch {
	case errors.Is(err, crypto.ErrNoSessionFound):
		return nil, fmt.Errorf("%w: %w", ErrKeyMissing, err)
	case errors.Is(err, crypto.ErrGroupSessionWithheld):
		return nil, fmt.Errorf("%w: %w", ErrKeyWithheld, err)
	case err != nil:
		return nil, err
	}
	if m.receiveLevel > levelUnverified {
		state := dec.Mautrix.TrustState
		hasIdentity, err := m.hasIdentity(ctx, evt.Sender)
		if err != nil {
			return nil, err
		}
		if t := trustFromState(state, hasIdentity); !m.receiveLevel.admits(t) {
			return nil, fmt.Errorf("%w (device trust %s)", ErrUntrustedSender, state)
		}
	}
	return dec, nil
}

// TrustFlag tells why the source room's clients would flag a decrypted message (crypto.Flag*), or "" when they
// would not. The relay marks the copies of flagged messages, so none arrives looking trusted from a ghost's
// cross-signed device. Only an unsigned device needs a store lookup (does its owner have an identity?).
func (m *Machine) TrustFlag(ctx context.Context, dec *event.Event) (string, error) {
	state := dec.Mautrix.TrustState
	hasIdentity := false
	if state == id.TrustStateUnset {
		var err error
		if hasIdentity, err = m.hasIdentity(ctx, dec.Sender); err != nil {
			return "", err
		}
	}
	return trustFlag(trustFromState(state, hasIdentity)), nil
}

// DecryptOwn decrypts an event one of ferry's own devices encrypted (the bot's, or a ghost's in per-ghost mode),
// with the inbound copy that device keeps of its own session. The relay reads back what it sent before an
// unclean stop with it. An event from a user who is not ferry's is an error.
func (m *Machine) DecryptOwn(ctx context.Context, evt *event.Event) (*event.Event, error) {
	content, ok := evt.Content.Parsed.(*event.EncryptedEventContent)
	if !ok {
		return nil, errors.New("not an encrypted event")
	}
	d := m.bot
	if evt.Sender != m.client.UserID {
		if m.isOwn == nil || !m.isOwn(evt.Sender) {
			return nil, fmt.Errorf("%s is not one of ferry's users", evt.Sender)
		}
		if content.DeviceID != m.client.DeviceID {
			g, err := m.ghostDevice(ctx, evt.Sender)
			if err != nil {
				return nil, fmt.Errorf("failed to load the device of %s: %w", evt.Sender, err)
			} else if g != nil {
				d = g
			}
		}
	}
	return d.mach.DecryptMegolmEvent(ctx, evt)
}

func (m *Machine) hasIdentity(ctx context.Context, userID id.UserID) (bool, error) {
	keys, err := m.bot.mach.CryptoStore.GetCrossSigningKeys(ctx, userID)
	if err != nil {
		return false, fmt.Errorf("failed to read the cross-signing keys of %s: %w", userID, err)
	}
	return keys[id.XSUsageMaster].Key != "", nil
}

// TakeReplayIndex hands over the replay protection entries of the events decrypted since the last call: the
// relay writes them (ReplayIndexInsert) in the statement or transaction that records those events as done (so
// a restart never forgets an index it relayed), then calls settle with whether that committed; entries not
// committed are handed over again.
func (m *Machine) TakeReplayIndex() (entries []ReplayEntry, settle func(committed bool)) {
	return m.cache.takeReplayIndex()
}

// WaitForKey waits up to timeout for the session of an encrypted event.
func (m *Machine) WaitForKey(ctx context.Context, evt *event.Event, timeout time.Duration) bool {
	content, ok := evt.Content.Parsed.(*event.EncryptedEventContent)
	if !ok {
		return false
	}
	return m.bot.mach.WaitForSession(ctx, evt.RoomID, content.SenderKey, content.SessionID, timeout)
}

// RequestKey asks the sender's devices for the session of an encrypted event.
func (m *Machine) RequestKey(ctx context.Context, evt *event.Event) error {
	content, ok := evt.Content.Parsed.(*event.EncryptedEventContent)
	if !ok {
		return errors.New("not an encrypted event")
	}
	if m.asMode.Load() {
		// The homeserver may have dropped the key instead of pushing it (catchup_todevice.go): fetch what it holds
		// first; a key found there needs no request.
		if n, err := m.CatchUpToDevice(ctx, time.Now()); err != nil {
			m.log.Warn().Err(err).Msg("Failed to fetch the to-device messages the homeserver holds; asking the sender for the key")
		} else if n > 0 {
			if sess, err := m.bot.mach.CryptoStore.GetGroupSession(ctx, evt.RoomID, content.SessionID); err == nil && sess != nil {
				return nil
			}
		}
	}
	device := content.DeviceID
	if device == "" {
		device = "*"
	}
	return m.bot.mach.SendRoomKeyRequest(ctx, evt.RoomID, content.SenderKey, content.SessionID, "", map[id.UserID][]id.DeviceID{evt.Sender: {device}})
}

// Encrypt encrypts content for a room as sender (the bot or a ghost). In per-ghost mode a ghost's message is
// encrypted by the ghost's own device (created on first use). The room key is shared only with the devices of
// the room's real members (joined and invited), never with ghosts or the bot, under share_min_trust.
func (m *Machine) Encrypt(ctx context.Context, sender id.UserID, roomID id.RoomID, evtType event.Type, content *event.Content) (*event.EncryptedEventContent, error) {
	d := m.bot
	if sender != m.client.UserID && m.isOwn != nil && m.isOwn(sender) {
		g, err := m.ghostDevice(ctx, sender)
		if err != nil {
			return nil, fmt.Errorf("failed to prepare the device of %s: %w", sender, err)
		} else if g != nil {
			d = g
			m.markSent(sender)
		}
	}
	room := &roomRead{m: m, roomID: roomID}
	policy := m.policy()
	policy.encEvent = room.settings
	enc, err := d.encrypt(ctx, roomID, evtType, content, room.members, policy)
	if err != nil && d != m.bot && errors.Is(err, mautrix.MUnknownToken) {
		// The ghost's access token was revoked: log the same device in again and retry once.
		m.forgetGhost(sender)
		_ = m.storeFor(sender).DeleteSecret(ctx, secretAccessToken)
		if d, err = m.ghostDevice(ctx, sender); err == nil && d != nil {
			enc, err = d.encrypt(ctx, roomID, evtType, content, room.members, policy)
		}
	}
	return enc, err
}

// roomRead reads what a key share needs of a room: its real members and, in the same query, the settings a new
// session takes from the room's state (sqlRoomShare). A session made after the members were read takes the
// settings read with them; before any such read, settings reads them alone (roomEncryption).
type roomRead struct {
	m      *Machine
	roomID id.RoomID
	mu     sync.Mutex
	read   bool
	enc    *event.EncryptionEventContent
	hv     *event.HistoryVisibilityEventContent
}

func (r *roomRead) members(ctx context.Context) ([]id.UserID, error) {
	members, enc, hv, err := roomShareState(ctx, r.m.stateStore.Database, r.roomID, r.m.isOwn)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	r.read, r.enc, r.hv = true, enc, hv
	r.mu.Unlock()
	return members, nil
}

func (r *roomRead) settings(ctx context.Context, roomID id.RoomID) (*event.EncryptionEventContent, *event.HistoryVisibilityEventContent) {
	r.mu.Lock()
	read, enc, hv := r.read, r.enc, r.hv
	r.mu.Unlock()
	if read && roomID == r.roomID {
		return enc, hv
	}
	return r.m.roomEncryption(ctx, roomID)
}

// PrepareSender creates (or loads) the device a ghost sends from, cross-signed and with its signature served by
// the homeserver, before the ghost joins a room: members' clients query a new member's keys when they see the
// join, and a device created after that query stays "unsigned" in their cache. It does nothing for the bot or in
// single-device mode.
func (m *Machine) PrepareSender(ctx context.Context, sender id.UserID) error {
	if sender == m.client.UserID || m.isOwn == nil || !m.isOwn(sender) {
		return nil
	}
	if _, err := m.ghostDevice(ctx, sender); err != nil {
		return fmt.Errorf("failed to prepare the device of %s: %w", sender, err)
	}
	return nil
}

// SenderReady tells whether sender's device is loaded (or sender needs none), so that PrepareSender would
// return at once.
func (m *Machine) SenderReady(sender id.UserID) bool {
	if !m.perGhost || sender == m.client.UserID || m.isOwn == nil || !m.isOwn(sender) {
		return true
	}
	m.ghostsLock.Lock()
	defer m.ghostsLock.Unlock()
	_, ok := m.ghosts[sender]
	return ok
}

func (m *Machine) policy() sharePolicy {
	return sharePolicy{level: m.shareLevel, resolver: m.resolver, encEvent: m.roomEncryption}
}

func (m *Machine) resolver() *trustResolver {
	r := newTrustResolver(m.bot.store, m.client.UserID, func(ctx context.Context) id.Ed25519 {
		if !m.botSigned || m.bot.mach.CrossSigningKeys == nil {
			return ""
		}
		return m.bot.mach.CrossSigningKeys.UserSigningKey.PublicKey()
	})
	r.cache = m.cache
	return r
}

func (m *Machine) roomEncryption(ctx context.Context, roomID id.RoomID) (*event.EncryptionEventContent, *event.HistoryVisibilityEventContent) {
	enc, hv, err := roomSessionSettings(ctx, m.stateStore.Database, roomID)
	if err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to read m.room.encryption; using default rotation")
	}
	return enc, hv
}

// sqlRoomSessionSettings reads the room's m.room.encryption and m.room.history_visibility contents from mautrix's
// state store in one statement (its GetEncryptionEvent and GetHistoryVisibility read one each).
const sqlRoomSessionSettings = `SELECT encryption, history_visibility FROM mx_room_state WHERE room_id=$1`

// roomSessionSettings returns what the state store's GetEncryptionEvent and GetHistoryVisibility return for
// roomID (nil for what it does not hold), in one read.
func roomSessionSettings(ctx context.Context, db *dbutil.Database, roomID id.RoomID) (*event.EncryptionEventContent, *event.HistoryVisibilityEventContent, error) {
	var encData, hvData []byte
	err := db.QueryRow(ctx, sqlRoomSessionSettings, roomID).Scan(&encData, &hvData)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, nil, nil
	} else if err != nil {
		return nil, nil, err
	}
	return parseSessionSettings(encData, hvData)
}

// sqlRoomShare reads a room's joined and invited members (the state store's GetRoomJoinedOrInvitedMembers) and,
// in a row whose user is NULL, what sqlRoomSessionSettings reads.
const sqlRoomShare = `SELECT user_id, NULL, NULL FROM mx_user_profile WHERE room_id=$1 AND membership IN ('join', 'invite')
	UNION ALL SELECT NULL, encryption, history_visibility FROM mx_room_state WHERE room_id=$1`

// isGhost tells ferry's ghosts: its own users other than the bot.
func (m *Machine) isGhost(u id.UserID) bool {
	return u != m.client.UserID && m.isOwn != nil && m.isOwn(u)
}

// withoutGhosts is a device-list change's users without ferry's ghosts (isGhost), whose devices ferry never needs
// to know: it never shares room keys with them nor reads what they send. A new ghost's device is reported to the
// bot in every room the ghost joins.
func withoutGhosts(changed []id.UserID, isGhost func(id.UserID) bool) []id.UserID {
	if !slices.ContainsFunc(changed, isGhost) {
		return changed
	}
	return slices.DeleteFunc(slices.Clone(changed), isGhost)
}

// roomShareState is a room's joined and invited members that isOwn does not claim, and roomSessionSettings, in one query. A
// setting that cannot be parsed is left out and logged, as roomEncryption does; the members are returned all the
// same.
func roomShareState(ctx context.Context, db *dbutil.Database, roomID id.RoomID, isOwn func(id.UserID) bool) ([]id.UserID, *event.EncryptionEventContent, *event.HistoryVisibilityEventContent, error) {
	rows, err := db.Query(ctx, sqlRoomShare, roomID)
	if err != nil {
		return nil, nil, nil, err
	}
	defer rows.Close()
	var members []id.UserID
	var encData, hvData []byte
	for rows.Next() {
		var user sql.NullString
		var e, h []byte
		if err = rows.Scan(&user, &e, &h); err != nil {
			return nil, nil, nil, err
		}
		if !user.Valid {
			encData, hvData = e, h
		} else if u := id.UserID(user.String); isOwn == nil || !isOwn(u) {
			members = append(members, u)
		}
	}
	if err = rows.Err(); err != nil {
		return nil, nil, nil, err
	}
	enc, hv, err := parseSessionSettings(encData, hvData)
	if err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to read m.room.encryption; using default rotation")
	}
	return members, enc, hv, nil
}

// parseSessionSettings parses the stored m.room.encryption and m.room.history_visibility contents (nil: none).
func parseSessionSettings(encData, hvData []byte) (*event.EncryptionEventContent, *event.HistoryVisibilityEventContent, error) {
	var err error
	var enc *event.EncryptionEventContent
	var hv *event.HistoryVisibilityEventContent
	if encData != nil {
		enc = &event.EncryptionEventContent{}
		if err = json.Unmarshal(encData, enc); err != nil {
			return nil, nil, fmt.Errorf("failed to parse the stored m.room.encryption: %w", err)
		}
	}
	if hvData != nil {
		// Into the pointer, as the store does: a stored JSON null reads as none.
		if err = json.Unmarshal(hvData, &hv); err != nil {
			return enc, nil, fmt.Errorf("failed to parse the stored m.room.history_visibility: %w", err)
		}
	}
	return enc, hv, nil
}

// HandleMemberEvent rotates the room's outbound sessions (of every ferry device) when a real member's
// membership changes in a way that requires it (see membershipRotates). An error means a rotation that may be
// due did not happen; the caller retries.
func (m *Machine) HandleMemberEvent(ctx context.Context, evt *event.Event) error {
	if evt.StateKey == nil || (m.isOwn != nil && m.isOwn(id.UserID(*evt.StateKey))) {
		return nil
	}
	if encrypted, err := m.stateStore.IsEncrypted(ctx, evt.RoomID); err != nil {
		return fmt.Errorf("failed to tell whether the room is encrypted: %w", err)
	} else if !encrypted {
		return nil
	}
	content := evt.Content.AsMember()
	prev := event.Membership("unknown")
	if evt.Unsigned.PrevContent != nil {
		_ = evt.Unsigned.PrevContent.ParseRaw(evt.Type)
		if pc := evt.Unsigned.PrevContent.AsMember(); pc != nil && pc.Membership != "" {
			prev = pc.Membership
		}
	}
	if !membershipRotates(prev, content.Membership) {
		return nil
	}
	if err := m.Rotate(ctx, evt.RoomID); err != nil {
		return fmt.Errorf("failed to rotate outbound sessions: %w", err)
	}
	return nil
}

// Rotate discards the outbound sessions of every ferry device (bot and ghosts) in a room, so the next message
// from each starts a new one.
func (m *Machine) Rotate(ctx context.Context, roomID id.RoomID) error {
	// Successors shared ahead of time go first (and shares still running are invalidated): they were shared with
	// the members before this rotation.
	dropped := m.cache.dropNext(roomID)
	_, err := m.db.Exec(ctx, sqlDeleteRoomOutbound, roomID)
	m.cache.outboundChanged("", roomID)
	if err != nil {
		return err
	}
	return m.cache.forgetSuccessors(ctx, m.db, dropped)
}

// rotateForDeviceChanges rotates every ferry device's sessions in the encrypted rooms shared with real users
// whose device lists (or cross-signing keys) changed: a removed device must not read what follows, and a new
// device needs the key. An error means a rotation did not happen; the /sync batch is then handled again.
func (m *Machine) rotateForDeviceChanges(ctx context.Context, users []id.UserID) error {
	for _, u := range users {
		if m.isOwn != nil && m.isOwn(u) {
			continue
		}
		rooms, err := m.stateStore.FindSharedRooms(ctx, u)
		if err != nil {
			return fmt.Errorf("failed to find the rooms to rotate after a device change: %w", err)
		}
		for _, room := range rooms {
			if err = m.Rotate(ctx, room); err != nil {
				return fmt.Errorf("failed to rotate after a device change: %w", err)
			}
		}
		if len(rooms) > 0 {
			m.log.Debug().Stringer("user_id", u).Int("rooms", len(rooms)).Msg("Rotated outbound sessions after a device list change")
		}
	}
	return nil
}

// allowKeyShare answers key requests sent to d (see decideKeyRequest).
func (m *Machine) allowKeyShare(d *device) func(context.Context, *id.Device, event.RequestedKeyInfo) *crypto.KeyShareRejection {
	return func(ctx context.Context, dev *id.Device, info event.RequestedKeyInfo) *crypto.KeyShareRejection {
		r := keyRequest{FromOwnUser: m.isOwn == nil || m.isOwn(dev.UserID)}
		if !r.FromOwnUser {
			var err error
			r.OwnSession = d.ownsSession(ctx, info.RoomID, info.SessionID)
			if r.Entitled, err = d.entitled(ctx, dev.UserID, info.SessionID); err != nil {
				m.log.Warn().Err(err).Msg("Failed to check key request entitlement")
				return &crypto.KeyShareRejectInternalError
			}
			r.Member = m.stateStore.IsMembership(ctx, info.RoomID, dev.UserID, event.MembershipJoin, event.MembershipInvite)
			if r.Device, err = m.resolver().device(ctx, dev); err != nil {
				m.log.Warn().Err(err).Msg("Failed to resolve the trust of a requesting device")
				return &crypto.KeyShareRejectInternalError
			}
		}
		rejection := decideKeyRequest(m.shareLevel, r)
		evt := m.log.Debug().Stringer("device_user_id", d.userID).Stringer("requester", dev.UserID).Stringer("requesting_device", dev.DeviceID).
			Stringer("session_id", info.SessionID).Bool("accepted", rejection == nil)
		if rejection != nil {
			evt = evt.Str("code", string(rejection.Code))
		}
		evt.Msg("Answered room key request")
		return rejection
	}
}

// syncTimelineLimit bounds the room events of one /sync answer per room (more make the timeline limited, and the
// gap is read from /messages). The bot's /sync asks for every room event: redactions (which some homeservers
// never push to appservices) and the room's order (which some get wrong in their pushes).
const syncTimelineLimit = 50

// afterBatchStore keeps the bot's /sync token from being saved before the batch it ends is handled. mautrix saves
// the token first (so that a batch that panics is skipped); then a crash, or a failure to record the batch, loses
// it: to-device messages (room keys) and redactions the homeserver will not send again. ferry saves the token
// in cryptoSyncer once the batch is recorded; until then a restart fetches the batch again.
type afterBatchStore struct {
	mautrix.SyncStore
	// guards the following fields
	lock    sync.Mutex
	pending string
}

// SaveNextBatch holds the token until commit.
func (s *afterBatchStore) SaveNextBatch(_ context.Context, _ id.UserID, token string) error {
	s.lock.Lock()
	s.pending = token
	s.lock.Unlock()
	return nil
}

// commit saves the token of the batch just handled.
func (s *afterBatchStore) commit(ctx context.Context, userID id.UserID) error {
	s.lock.Lock()
	token := s.pending
	s.lock.Unlock()
	return s.SyncStore.SaveNextBatch(ctx, userID, token)
}

// Limits of filling a gap in a limited /sync timeline.
const (
	gapPage  = 100
	gapPages = 50
)

// syncEphemeralTypes are the ephemeral event types the bot's /sync asks for: typing and read receipts, which ferry
// relays (bridge/ephemeral.go).
var syncEphemeralTypes = []event.Type{event.EphemeralEventTyping, event.EphemeralEventReceipt}

type cryptoSyncer struct {
	// roomsOnly: the /sync of the appservice's bot user without a device (roomsync.go): its batches hold room
	// events only, and no key counts (which the device parts would read as zero).
	roomsOnly bool
	// wanted (rooms-only, may be nil): after a batch, false ends the run with errRoomSyncIdle.
	wanted   func() bool
	mach     *crypto.OlmMachine
	client   *mautrix.Client
	store    *afterBatchStore
	log      zerolog.Logger
	keyLocks *keyLocks // the store cache's: device-list fetches take them, as key shares do (device.devicesOf)
	timeline func(ctx context.Context, batch SyncedBatch) error
	// toDevice handles one to-device message of the batch (Machine.handleBotToDevice).
	toDevice func(ctx context.Context, evt *event.Event) error
	// ephemeral receives typing notifications and read receipts; it must not block.
	ephemeral func(ctx context.Context, evts []*event.Event)
	// requestedAfter: the request of the next batch starts after this (the loop's start, or the end of the
	// previous batch). Only the sync loop's goroutine uses it.
	requestedAfter time.Time
	deviceChanges  func(ctx context.Context, users []id.UserID) error
	// ghost tells ferry's ghosts (its own users other than the bot), whose device-list changes are dropped.
	ghost func(id.UserID) bool
	// failures counts the /sync requests that failed since the last batch was handled (OnFailedSync's backoff);
	// retryWait turns the backoff into the wait (a rate limit's). Only the sync loop's goroutine uses them.
	failures  int
	retryWait func(err error, backoff time.Duration) time.Duration
	// lastSince is the since of the last batch handled, lastHandled when it was; cleared once that batch was read
	// again (OnFailedSync). Only the sync loop's goroutine uses them.
	lastSince   string
	lastHandled time.Time
	// rereadWait is how long the loop waits before it reads the batch again (errRereadBatch).
	rereadWait time.Duration
}

// rereadWindow: a /sync that fails this soon after the previous batch was handled, and the first to fail since,
// may follow an answer the homeserver gave as it went away. Dendrite 0.13.8 answers the /sync requests in flight
// when it shuts down with a next_batch past events it has not written yet, and gives those events positions
// before it after its restart: read on from that token, /sync never shows them (seen in chaos runs: the first
// message sent as it restarted, and another time the twelve sent while it was shutting down, pushed late and never
// shown, and relayed after the messages that followed them). So the batch before is read again.
const rereadWindow = 2 * time.Second

// errRereadBatch ends the sync loop so that it starts again from the token it saved before the last batch.
var errRereadBatch = errors.New("reading the last /sync batch again")

func (s *cryptoSyncer) ProcessResponse(ctx context.Context, resp *mautrix.RespSync, since string) error {
	if !s.roomsOnly {
		if err := s.deviceParts(ctx, resp, since); err != nil {
			return err
		}
	}
	return s.roomParts(ctx, resp, since)
}

// deviceParts handles what a /sync batch holds for the bot's device: device lists, key counts, to-device messages.
func (s *cryptoSyncer) deviceParts(ctx context.Context, resp *mautrix.RespSync, since string) error {
	// mautrix fetches the changed device lists first thing in ProcessSyncResponse; ferry does it here instead,
	// under the changed users' key locks, so a key share never sees a user's new devices before their signatures.
	lists, reported := resp.DeviceLists, resp.DeviceLists.Changed
	if s.ghost != nil {
		lists.Changed = withoutGhosts(lists.Changed, s.ghost)
	}
	var before map[id.UserID]string
	if len(lists.Changed) > 0 {
		unlock := s.keyLocks.lock(lists.Changed)
		before = s.keysOf(ctx, lists.Changed)
		s.mach.HandleDeviceLists(ctx, &lists, since)
		unlock()
	}
	// ferry handles the to-device messages itself, each as a unit (todevice.go), after mautrix's part.
	toDevice := resp.ToDevice.Events
	resp.DeviceLists.Changed, resp.ToDevice.Events = nil, nil
	s.mach.ProcessSyncResponse(ctx, resp, since)
	resp.DeviceLists.Changed, resp.ToDevice.Events = reported, toDevice
	// Homeservers report users whose keys did not change too (Dendrite 0.13.8 reports a user's every upload, and
	// again and again after restarts): only a real change of devices or cross-signing keys rotates.
	changed := slices.Clone(lists.Left)
	if len(lists.Changed) > 0 {
		after := s.keysOf(ctx, lists.Changed)
		for _, u := range lists.Changed {
			if b, ok := before[u]; !ok || b != after[u] {
				changed = append(changed, u)
			}
		}
	}
	// From here on, what fails is retried (the database restarting, the homeserver busy) while the loop waits:
	// the token moves past the batch only once it is handled.
	for _, evt := range toDevice {
		evt.Type.Class = event.ToDeviceEventType
		if err := evt.Content.ParseRaw(evt.Type); err != nil {
			s.log.Warn().Str("event_type", evt.Type.Type).Err(err).Msg("Failed to parse to-device event")
			continue
		}
		if err := s.retry(ctx, "handle a to-device message", func() error { return s.toDevice(ctx, evt) }); err != nil {
			return err
		}
	}
	if since != "" && len(changed) > 0 {
		if err := s.retry(ctx, "rotate after device list changes", func() error { return s.deviceChanges(ctx, changed) }); err != nil {
			return err
		}
	}
	return nil
}

// roomParts records a batch's room events (limited timelines filled in), then saves the token, then hands on the
// batch's typing notifications and receipts.
func (s *cryptoSyncer) roomParts(ctx context.Context, resp *mautrix.RespSync, since string) error {
	var evts []*event.Event
	incomplete := make(map[id.RoomID]bool)
	edge := make(map[id.EventID]bool)
	beforeJoin := make(map[id.EventID]bool)
	for roomID, room := range resp.Rooms.Join {
		// A room the bot joined since the previous batch comes with events from before the join: the room's
		// history, not news (see SyncedBatch.BeforeJoin).
		joinedAt := s.ownJoin(room.Timeline.Events)
		for _, evt := range room.Timeline.Events[:max(joinedAt, 0)] {
			beforeJoin[evt.ID] = true
		}
		if room.Timeline.Limited && since != "" && room.Timeline.PrevBatch != "" && joinedAt < 0 {
			// More happened than the timeline holds: fetch the rest, or a redaction in the gap is never relayed.
			var gap filledGap
			err := s.retry(ctx, "fill a gap in the timeline", func() (err error) {
				gap, err = s.fillGap(ctx, roomID, room.Timeline.PrevBatch, since)
				return err
			})
			if err != nil {
				return err
			}
			if !gap.complete {
				incomplete[roomID] = true
			}
			maps.Copy(edge, gap.edge)
			if at := s.ownJoin(gap.events); at >= 0 {
				// The join is in the gap: what the gap holds before it is history too, and the room's events since
				// the join are all here.
				for _, evt := range gap.events[:at] {
					beforeJoin[evt.ID] = true
				}
				delete(incomplete, roomID)
			}
			inTimeline := make(map[id.EventID]bool, len(room.Timeline.Events))
			for _, evt := range room.Timeline.Events {
				inTimeline[evt.ID] = true
			}
			for _, evt := range gap.events {
				if !inTimeline[evt.ID] {
					evts = append(evts, evt)
				}
			}
		}
		if room.Timeline.Limited && room.Timeline.PrevBatch == "" {
			incomplete[roomID] = true // cut, with nowhere to read the rest from
		}
		for _, evt := range room.Timeline.Events {
			evt.RoomID = roomID
			evts = append(evts, evt)
		}
	}
	batch := SyncedBatch{Events: evts, Initial: since == "", Covers: s.requestedAfter, Incomplete: incomplete, Edge: edge, BeforeJoin: beforeJoin}
	if err := s.retry(ctx, "record synced room events", func() error { return s.timeline(ctx, batch) }); err != nil {
		return err
	}
	if err := s.retry(ctx, "save the sync token", func() error { return s.store.commit(ctx, s.client.UserID) }); err != nil {
		return err
	}
	s.requestedAfter = time.Now()
	s.failures = 0
	s.lastSince, s.lastHandled = since, time.Now()
	// Typing and receipts are news only once: relayed after the batch is recorded, never from the first /sync
	// (which reports old receipts).
	var eph []*event.Event
	for roomID, room := range resp.Rooms.Join {
		for _, evt := range room.Ephemeral.Events {
			evt.RoomID = roomID
			eph = append(eph, evt)
		}
	}
	if len(eph) > 0 && since != "" && s.ephemeral != nil {
		s.ephemeral(ctx, eph)
	}
	if s.wanted != nil && !s.wanted() {
		return errRoomSyncIdle // recorded and its token saved: the loop reads again when woken
	}
	return nil
}

// SyncedBatch is one batch of room events from the bot's /sync, every room's in the room's order (limited
// timelines filled in).
type SyncedBatch struct {
	Events []*event.Event
	// Initial is true for the first /sync of a device: its events may predate ferry.
	Initial bool
	// Covers: every room event the homeserver had before this time is in this batch or an earlier one (the
	// request started after it).
	Covers time.Time
	// Incomplete lists rooms whose gap in the timeline was longer than ferry reads: events between the previous
	// batch and this one's are missing there. In every other room of a batch that is not Initial, the batch holds
	// everything the room had between the two.
	Incomplete map[id.RoomID]bool
	// Edge holds events a gap fill read at the previous batch's end, where some homeservers' pages include events
	// of earlier batches (fillGap): the relay may have handled them long ago.
	Edge map[id.EventID]bool
	// BeforeJoin holds the events of a room the bot joined since the previous batch that came before its join
	// (the join's batch shows some of the room's history). Like an initial batch's, they are only confirmed: were
	// they recorded, the relay would apply old state over what it learned since (the rooms-only /sync may idle
	// for seconds after the join was pushed) and could relay messages from before the bot was there.
	BeforeJoin map[id.EventID]bool
}

// ownJoin is the index in evts of the event that made the syncing user (the bot) a member of the room, or -1.
func (s *cryptoSyncer) ownJoin(evts []*event.Event) int {
	self := s.client.UserID.String()
	for i := len(evts) - 1; i >= 0; i-- {
		evt := evts[i]
		if evt.Type != event.StateMember || evt.StateKey == nil || *evt.StateKey != self || membershipOf(&evt.Content) != event.MembershipJoin {
			continue
		}
		if evt.Unsigned.PrevContent == nil || membershipOf(evt.Unsigned.PrevContent) != event.MembershipJoin {
			return i
		}
	}
	return -1
}

// membershipOf reads the membership of a member event's content, parsed or not.
func membershipOf(c *event.Content) event.Membership {
	if m, ok := c.Raw["membership"].(string); ok {
		return event.Membership(m)
	}
	if mc, ok := c.Parsed.(*event.MemberEventContent); ok {
		return mc.Membership
	}
	return ""
}

// keysOf fingerprints the devices and cross-signing keys ferry's store has for each user; a user whose keys
// cannot be read is left out (and then counts as changed).
func (s *cryptoSyncer) keysOf(ctx context.Context, users []id.UserID) map[id.UserID]string {
	out := make(map[id.UserID]string, len(users))
	for _, u := range users {
		devices, err := s.mach.CryptoStore.GetDevices(ctx, u)
		if err != nil {
			continue
		}
		xs, err := s.mach.CryptoStore.GetCrossSigningKeys(ctx, u)
		if err != nil {
			continue
		}
		var parts []string
		for devID, d := range devices {
			parts = append(parts, fmt.Sprintf("d %s %s %s %t %d", devID, d.IdentityKey, d.SigningKey, d.Deleted, d.Trust))
		}
		for usage, k := range xs {
			parts = append(parts, fmt.Sprintf("x %s %s", usage, k.Key))
		}
		slices.Sort(parts)
		out[u] = strings.Join(parts, "\n") + "\n"
	}
	return out
}

// retry runs fn until it succeeds or ctx ends, with backoff, saying why it waits.
func (s *cryptoSyncer) retry(ctx context.Context, what string, fn func() error) error {
	backoff := 500 * time.Millisecond
	for {
		err := fn()
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		s.log.Warn().Err(err).Str("step", what).Dur("retry_in", backoff).Msg("Failed to handle a /sync batch, retrying")
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 30*time.Second)
	}
}

// filledGap is what fillGap read of a gap in a room's timeline.
type filledGap struct {
	events []*event.Event // oldest first
	// complete is false when the gap held more than ferry reads (gapPages pages): events are then only its most
	// recent part.
	complete bool
	// edge holds the events of the page read past the previous batch's end (below): some may be older than it.
	edge map[id.EventID]bool
}

// fillGap reads a room's events between the previous /sync token (since) and the start of a limited timeline
// (prevBatch).
//
// Dendrite 0.13.8 does not stop at since: its pages go on backwards past it, one event at a time, up to the room's
// creation, always with an end token. It also leaves the first event after since out of its pages when since is a
// position of another room; only the first page past since holds it. So the fill reads one page past the first
// that is not full, and no further: what that page adds before since was in an earlier batch and sorts first.
func (s *cryptoSyncer) fillGap(ctx context.Context, roomID id.RoomID, prevBatch, since string) (filledGap, error) {
	var out []*event.Event
	edge := make(map[id.EventID]bool)
	from := prevBatch
	short, complete := false, false
	for page := 0; page < gapPages && !complete; page++ {
		resp, err := s.client.Messages(ctx, roomID, from, since, mautrix.DirectionBackward, nil, gapPage)
		if err != nil {
			return filledGap{}, err
		}
		for _, evt := range resp.Chunk {
			evt.RoomID = roomID
			if short {
				edge[evt.ID] = true
			}
			out = append(out, evt)
		}
		// A page may hold fewer events than asked for and still not be the last: only a missing end says so
		// (or, for Dendrite, the page after a short one).
		complete = resp.End == "" || resp.End == from || short
		short = len(resp.Chunk) < gapPage
		from = resp.End
	}
	slices.Reverse(out)
	seen := make(map[id.EventID]bool, len(out))
	out = slices.DeleteFunc(out, func(evt *event.Event) bool {
		dup := seen[evt.ID]
		seen[evt.ID] = true
		return dup
	})
	if !complete {
		s.log.Warn().Stringer("room_id", roomID).Int("events", len(out)).Msg("Filled only the most recent part of a gap in the timeline")
	}
	return filledGap{events: out, complete: complete, edge: edge}, nil
}

// syncRetryFirst and syncRetryMax bound the wait before the bot's next /sync after a failed one: it starts short
// and doubles while the requests keep failing. On this path room keys reach the bot's device through /sync, and
// a pushed event is relayed once a /sync batch has shown it: a fixed 5 s pause after every failed request (a 502,
// a connection reset) held every message in flight 5 s more.
const (
	syncRetryFirst = 250 * time.Millisecond
	syncRetryMax   = 5 * time.Second
)

func (s *cryptoSyncer) OnFailedSync(_ *mautrix.RespSync, err error) (time.Duration, error) {
	if errors.Is(err, mautrix.MUnknownToken) {
		return 0, err
	}
	backoff := syncRetryMax
	if s.failures < 5 {
		backoff = min(syncRetryFirst<<s.failures, syncRetryMax)
	}
	first := s.failures == 0
	s.failures++
	wait := backoff
	if s.retryWait != nil {
		wait = s.retryWait(err, backoff)
	}
	if s.roomsOnly && refusedForGood(err) {
		// Waiting would not help: the homeserver does not let the appservice /sync as its bot.
		return 0, fmt.Errorf("%w: %w", errRoomSyncRefused, err)
	}
	s.log.Warn().Err(err).Dur("retry_in", wait).Str("sync", s.kind()).Msg("The bot's /sync failed, retrying")
	if first && s.lastSince != "" && time.Since(s.lastHandled) < rereadWindow && !errors.Is(err, mautrix.MLimitExceeded) {
		// The homeserver may have answered the last batch as it went away (rereadWindow): read it again. Events
		// already recorded are recognised by ID, to-device messages already handled by their hash.
		since := s.lastSince
		s.lastSince = ""
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if serr := s.store.SyncStore.SaveNextBatch(ctx, s.client.UserID, since); serr != nil {
			s.log.Warn().Err(serr).Msg("Failed to set the bot's /sync back to before its last batch; going on from that batch's end")
			return wait, nil
		}
		s.log.Info().Dur("retry_in", wait).Msg("The bot's /sync failed right after a batch, which the homeserver may have answered as it went away; reading that batch again")
		s.rereadWait = wait
		return wait, errRereadBatch
	}
	return wait, nil
}

func (s *cryptoSyncer) GetFilterJSON(_ id.UserID) *mautrix.Filter {
	everything := []event.Type{{Type: "*"}}
	ephemeral := &mautrix.FilterPart{Types: syncEphemeralTypes}
	if s.roomsOnly {
		// Typing and receipts come in transactions with appservice-mode encryption; each would wake this /sync.
		ephemeral = &mautrix.FilterPart{NotTypes: everything}
	}
	return &mautrix.Filter{
		Presence:    &mautrix.FilterPart{NotTypes: everything},
		AccountData: &mautrix.FilterPart{NotTypes: everything},
		Room: &mautrix.RoomFilter{
			Ephemeral:   ephemeral,
			AccountData: &mautrix.FilterPart{NotTypes: everything},
			State:       &mautrix.FilterPart{NotTypes: everything},
			Timeline:    &mautrix.FilterPart{Limit: syncTimelineLimit},
		},
	}
}
