package crypto

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/exsync"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/internal/metrics"
)

// device is one of ferry's devices (the bot's or a ghost's): its own client (access token), its own account in
// the shared crypto store (account_id = botAccountID or the ghost's user ID) and its own OlmMachine.
type device struct {
	userID id.UserID
	client *mautrix.Client
	store  *crypto.SQLCryptoStore
	// olm is the store the OlmMachine uses: store, with one object per Olm session and batched shares.
	olm  *olmStore
	mach *crypto.OlmMachine
	// shareLock serialises key shares per room (mautrix's own lock is private to ShareGroupSession).
	shareLock *exsync.KeyedMutex[id.RoomID]
	// noOlm remembers devices already told m.no_olm, which the spec wants sent once per device.
	noOlm *exsync.Set[id.IdentityKey]
	// newKeys are the cross-signing keys stored with the device's new account, until crossSign takes them
	// (holdWithAccount); only the set-up's goroutine uses it.
	newKeys *crypto.CrossSigningKeysCache
	// noToken: the device's account was created by this process, so its to-device token is store.SyncToken
	// (empty until its first drain stores one) without a read.
	noToken atomic.Bool
}

func newDevice(userID id.UserID, client *mautrix.Client, store *crypto.SQLCryptoStore, mach *crypto.OlmMachine) *device {
	// The machine's store is normally the cache over store (Machine.newOlmMachine); a machine made on the plain
	// store (tests) gets a cache of its own, so the layers are always the same.
	base, ok := mach.CryptoStore.(*cachedStore)
	if !ok {
		base = &cachedStore{SQLCryptoStore: store, c: newStoreCache()}
	}
	olm := newOlmStore(base, userID)
	mach.CryptoStore = olm
	// mautrix reads the account's identity keys into fields of its own on first use, without a lock: read them
	// now, before the machine's goroutines (decrypting, handling to-device messages) can race to do it.
	_ = mach.OwnIdentity()
	return &device{userID: userID, client: client, store: store, olm: olm, mach: mach,
		shareLock: exsync.NewKeyedMutex[id.RoomID](), noOlm: exsync.NewSet[id.IdentityKey]()}
}

// ShareStats describes one key share (for logs and benchmarks).
type ShareStats struct {
	SessionID id.SessionID
	Shared    int // devices that got the room key
	Withheld  int // devices refused by the trust policy (m.unverified, m.blacklisted)
	NoOlm     int // devices without a one-time key (m.no_olm)
	NewOlm    int // Olm sessions created from claimed one-time keys
	Messages  int // to-device messages sent (room keys and withheld notices)
	Requests  int // to-device requests sent
	// Where the time went: reading devices, trust and Olm sessions; claiming one-time keys and encrypting;
	// saving the Olm sessions and recipients; sending.
	Load, Encrypt, Save, Send time.Duration
	Elapsed                   time.Duration
}

// sharePolicy is what a share needs from the Machine: the policy, a trust resolver and the room's state.
type sharePolicy struct {
	level    trustLevel
	resolver func() *trustResolver
	encEvent func(ctx context.Context, roomID id.RoomID) (*event.EncryptionEventContent, *event.HistoryVisibilityEventContent)
}

// encrypt Megolm-encrypts content with this device's outbound session in roomID, first creating and sharing a
// session with users' devices (under the policy) when there is none, or it expired. When a successor was already
// shared in the background (preshare.go) it switches to that instead of sharing, and a session nearing its limits
// starts that background share.
func (d *device) encrypt(ctx context.Context, roomID id.RoomID, evtType event.Type, content *event.Content, users func(context.Context) ([]id.UserID, error), policy sharePolicy) (*event.EncryptedEventContent, error) {
	enc, err := d.mach.EncryptMegolmEvent(ctx, roomID, evtType, content)
	if err == nil {
		d.maybePreshare(ctx, roomID, users, policy)
		return enc, nil
	} else if !errors.Is(err, crypto.ErrSessionExpired) && !errors.Is(err, crypto.ErrSessionNotShared) && !errors.Is(err, crypto.ErrNoGroupSession) {
		return nil, err
	}
	// The successor shared ahead of time, when ready, saves this message the share.
	if enc, ok := d.encryptPrepared(ctx, roomID, evtType, content); ok {
		return enc, nil
	}
	// A forced rotation (a member left, a device changed) while the share runs makes it share again with the
	// members as they are then; twice in a row is left to the next message.
	for attempt := 0; ; attempt++ {
		stamp := d.olm.c.stamp(roomID) // before the members are read
		members, err := users(ctx)
		if err != nil {
			return nil, fmt.Errorf("failed to get room members: %w", err)
		}
		_, err = d.shareStamped(ctx, roomID, members, policy, stamp)
		if errors.Is(err, errRotatedDuringShare) && attempt == 0 {
			continue
		} else if err != nil {
			return nil, fmt.Errorf("failed to share room key: %w", err)
		}
		break
	}
	if enc, err = d.mach.EncryptMegolmEvent(ctx, roomID, evtType, content); err != nil {
		return nil, fmt.Errorf("failed to encrypt after sharing the room key: %w", err)
	}
	return enc, nil
}

// errRotatedDuringShare: a forced rotation of the room ran while a session was being shared with a member list
// read before it; the session was withdrawn.
var errRotatedDuringShare = errors.New("the room's keys were rotated while the session was being shared")

// shareStamped makes sure this device has a shared, unexpired outbound session in roomID: otherwise it creates
// one and sends it (Olm-encrypted) to every device of users that the policy admits, and m.room_key.withheld to
// the others. It records every device of every user as entitled to the session (so a device that the policy refused
// now, or that did not exist yet, can later get it through a key request once it qualifies).
//
// Its cost does not grow in queries with the number of devices (see share.go): devices, trust and Olm sessions
// are read in a few queries, one-time keys are claimed in one request, the advanced Olm sessions and the
// recipients are saved in one transaction before anything is sent, and the messages go out in a few requests.
//
// The member list was read while the room's rotation stamp was stamp. When a forced rotation ran since (Rotate
// does not wait for shares), the new session may have reached a member who has left or a device that was
// removed: it is withdrawn instead of kept, and errRotatedDuringShare returned.
func (d *device) shareStamped(ctx context.Context, roomID id.RoomID, users []id.UserID, policy sharePolicy, stamp rotationStamp) (*ShareStats, error) {
	defer d.shareLock.WithLock(roomID)()
	start := time.Now()
	session, err := d.olm.GetOutboundGroupSession(ctx, roomID)
	if err != nil {
		return nil, fmt.Errorf("failed to read the outbound session: %w", err)
	} else if session != nil && session.Shared && !session.Expired() {
		return &ShareStats{SessionID: session.ID()}, nil
	}
	var inbound *crypto.InboundGroupSession
	if session == nil || session.Expired() {
		// Stored once, below, when shared: before that no message is encrypted with it, and a share cut short
		// (a crash, a failed request) leaves nothing that a retry could not replace with a new session. An
		// unshared session found here is one stored by an earlier version, shared again.
		if session, inbound, err = d.createSession(ctx, roomID, policy); err != nil {
			return nil, err
		}
	}
	stats, err := d.shareSession(ctx, session, inbound, users, policy, start)
	if err != nil {
		return nil, err
	}
	session.Shared = true
	if err = d.olm.AddOutboundGroupSession(ctx, session); err != nil {
		return nil, fmt.Errorf("failed to save the shared session: %w", err)
	}
	if !d.olm.c.stampValid(roomID, stamp) {
		if err = d.withdraw(ctx, roomID, session); err != nil {
			return nil, err
		}
		return nil, errRotatedDuringShare
	}
	stats.Elapsed = time.Since(start)
	zerolog.Ctx(ctx).Debug().Stringer("room_id", roomID).Stringer("session_id", session.ID()).Stringer("sender", d.userID).
		Int("shared", stats.Shared).Int("withheld", stats.Withheld).Int("no_olm", stats.NoOlm).
		Int("new_olm_sessions", stats.NewOlm).Int("to_device_requests", stats.Requests).
		Dur("elapsed", stats.Elapsed).Msg("Shared room key")
	return stats, nil
}

// shareSession sends session (Olm-encrypted) to every device of users that the policy admits and
// m.room_key.withheld to the others, and records every device of every user as entitled to it, with inbound, the
// inbound copy of a session createSession just made (nil for one stored before). It neither marks the session
// shared nor stores it as the device's outbound session: share and preshare do.
func (d *device) shareSession(ctx context.Context, session *crypto.OutboundGroupSession, inbound *crypto.InboundGroupSession, users []id.UserID, policy sharePolicy, start time.Time) (*ShareStats, error) {
	roomID := session.RoomID
	log := zerolog.Ctx(ctx).With().Stringer("room_id", roomID).Stringer("session_id", session.ID()).Stringer("sender", d.userID).Logger()
	stats := &ShareStats{SessionID: session.ID()}

	devices, err := d.devicesOf(ctx, users)
	if err != nil {
		return nil, err
	}
	resolver := policy.resolver()
	if err = resolver.prefetch(ctx, users); err != nil {
		return nil, err
	}
	plain := &mautrix.ReqSendToDevice{Messages: make(map[id.UserID]map[id.DeviceID]*event.Content)}
	withheld := &mautrix.ReqSendToDevice{Messages: make(map[id.UserID]map[id.DeviceID]*event.Content)}
	admitted := make(map[id.UserID]map[id.DeviceID]*id.Device)
	var recipients []recipient
	keyContent := session.ShareContent()
	for userID, devs := range devices {
		for deviceID, dev := range devs {
			if userID == d.userID && deviceID == d.client.DeviceID {
				continue
			}
			// Entitlement is per user: a later device of a member may ask for this session.
			recipients = append(recipients, recipient{userID: userID, identityKey: dev.IdentityKey})
			trust, err := resolver.device(ctx, dev)
			if err != nil {
				return nil, err
			}
			if !policy.level.admits(trust) {
				addMessage(withheld, userID, deviceID, d.withheld(session, withheldCode(trust)))
				stats.Withheld++
				continue
			}
			addMessage(plain, userID, deviceID, &keyContent)
			if admitted[userID] == nil {
				admitted[userID] = make(map[id.DeviceID]*id.Device)
			}
			admitted[userID][deviceID] = dev
		}
	}
	batch, err := d.olm.loadShareBatch(ctx, admitted)
	if err != nil {
		return nil, err
	}
	mark := time.Now()
	stats.Load = mark.Sub(start)
	encrypted := &mautrix.ReqSendToDevice{Messages: make(map[id.UserID]map[id.DeviceID]*event.Content)}
	if len(plain.Messages) > 0 {
		// mautrix claims the missing one-time keys (one request), checks their signatures, creates the Olm
		// sessions and encrypts, under its own lock; the batch keeps every Olm session change in memory.
		if encrypted, err = d.mach.EncryptToDevices(withShareBatch(ctx, batch), event.ToDeviceRoomKey, plain); err != nil {
			return nil, fmt.Errorf("failed to encrypt the room key for recipients: %w", err)
		}
		for userID, devs := range plain.Messages {
			for deviceID := range devs {
				if _, ok := encrypted.Messages[userID][deviceID]; ok {
					stats.Shared++
					continue
				}
				// No one-time key: tell the device once, as the spec asks, without room or session.
				stats.NoOlm++
				dev := devices[userID][deviceID]
				if d.noOlm.Add(dev.IdentityKey) {
					addMessage(withheld, userID, deviceID, &event.Content{Parsed: &event.RoomKeyWithheldEventContent{
						Algorithm: id.AlgorithmMegolmV1, SenderKey: d.mach.OwnIdentity().IdentityKey,
						Code: event.RoomKeyWithheldNoOlmSession, Reason: "No Olm session could be established with this device",
					}})
				}
			}
		}
		dropEmpty(encrypted)
	}
	stats.NewOlm = batch.created
	stats.Encrypt, mark = time.Since(mark), time.Now()
	// Saved before sending: a crash after this point can only lose messages, never encrypt twice with the same
	// Olm ratchet state.
	if err = d.olm.saveShare(ctx, batch, recipients, session.ID(), inbound); err != nil {
		return nil, err
	}
	stats.Save, mark = time.Since(mark), time.Now()
	if len(encrypted.Messages) > 0 {
		n, err := sendToDeviceChunked(ctx, d.client, event.ToDeviceEncrypted, encrypted)
		stats.Requests += n
		if err != nil {
			return nil, fmt.Errorf("failed to send the room key: %w", err)
		}
	}
	if len(withheld.Messages) > 0 {
		n, err := sendToDeviceChunked(ctx, d.client, event.ToDeviceRoomKeyWithheld, withheld)
		stats.Requests += n
		if err != nil {
			// The key itself went out; clients only show a vaguer error without the withheld notice.
			log.Warn().Err(err).Msg("Failed to send m.room_key.withheld")
		}
	}
	stats.Messages = stats.Shared + countMessages(withheld)
	stats.Send = time.Since(mark)
	stats.Elapsed = time.Since(start)
	metrics.KeyShares.Inc()
	metrics.KeyShareDevices.WithLabelValues("shared").Add(float64(stats.Shared))
	metrics.KeyShareDevices.WithLabelValues("withheld").Add(float64(stats.Withheld))
	metrics.KeyShareDevices.WithLabelValues("no_olm").Add(float64(stats.NoOlm))
	metrics.KeyShareDuration.Observe(stats.Elapsed.Seconds())
	return stats, nil
}

// createSession creates an outbound session from the room's m.room.encryption rotation settings and its inbound
// copy (which answering key requests needs). Neither is stored: the share stores the inbound copy with its Olm
// sessions, before the key goes out (saveShare), and the session once shared.
func (d *device) createSession(ctx context.Context, roomID id.RoomID, policy sharePolicy) (*crypto.OutboundGroupSession, *crypto.InboundGroupSession, error) {
	encEvt, histVis := policy.encEvent(ctx, roomID)
	session, err := crypto.NewOutboundGroupSession(roomID, encEvt, histVis)
	if err != nil {
		return nil, nil, fmt.Errorf("failed to create an outbound session: %w", err)
	}
	own := d.mach.OwnIdentity()
	igs, err := crypto.NewInboundGroupSession(own.IdentityKey, own.SigningKey, roomID, session.Internal.Key(),
		session.MaxAge, session.MaxMessages, session.SharedHistory, false)
	if err != nil {
		return nil, nil, fmt.Errorf("failed to create the inbound copy of the session: %w", err)
	}
	igs.SourceUser = d.userID
	return session, igs, nil
}

// devicesOf returns the known devices of users, fetching users whose device lists are unknown or outdated. The
// stored lists are read in a few queries whatever the number of users.
func (d *device) devicesOf(ctx context.Context, users []id.UserID) (map[id.UserID]map[id.DeviceID]*id.Device, error) {
	// A fetch stores a user's devices before their cross-signing keys and signatures; a concurrent share that
	// found the devices already known would judge them unsigned and withhold the key. Checking and fetching
	// under one lock (shared by all of the machine's devices, which share the device tables) prevents that
	// between shares, and between a share and the fetches for device-list changes (HandleDeviceLists, which
	// ferry calls under the same lock from /sync and from appservice transactions).
	defer d.olm.c.keyLocks.lock(users)()
	out, stale, err := loadDeviceLists(ctx, d.store.DB, users, time.Now())
	if err != nil {
		return nil, err
	}
	var fetch []id.UserID
	for _, u := range users {
		if _, known := out[u]; !known || stale[u] {
			delete(out, u)
			fetch = append(fetch, u)
		}
	}
	if len(fetch) > 0 {
		bctx, batch := withTrustBatch(ctx)
		fetched, err := d.mach.FetchKeys(bctx, fetch, true)
		if flushErr := batch.finish(ctx); err == nil && flushErr != nil {
			err = flushErr
		}
		if err != nil {
			return nil, fmt.Errorf("failed to fetch device keys: %w", err)
		}
		for u, devs := range fetched {
			out[u] = devs
		}
	}
	return out, nil
}

func (d *device) withheld(session *crypto.OutboundGroupSession, code event.RoomKeyWithheldCode) *event.Content {
	reason := "This device does not share keys with devices that are not cross-signed by their owner"
	if code == event.RoomKeyWithheldBlacklisted {
		reason = "This device does not share keys with blacklisted devices"
	}
	return &event.Content{Parsed: &event.RoomKeyWithheldEventContent{
		RoomID: session.RoomID, Algorithm: id.AlgorithmMegolmV1, SessionID: session.ID(),
		SenderKey: d.mach.OwnIdentity().IdentityKey, Code: code, Reason: reason,
	}}
}

func addMessage(req *mautrix.ReqSendToDevice, userID id.UserID, deviceID id.DeviceID, content *event.Content) {
	if req.Messages[userID] == nil {
		req.Messages[userID] = make(map[id.DeviceID]*event.Content)
	}
	req.Messages[userID][deviceID] = content
}

func countMessages(req *mautrix.ReqSendToDevice) int {
	n := 0
	for _, devs := range req.Messages {
		n += len(devs)
	}
	return n
}

func dropEmpty(req *mautrix.ReqSendToDevice) {
	for userID, devs := range req.Messages {
		if len(devs) == 0 {
			delete(req.Messages, userID)
		}
	}
}

// ownsSession reports whether this device created the Megolm session (it holds the inbound copy with its own
// sender key).
func (d *device) ownsSession(ctx context.Context, roomID id.RoomID, sessionID id.SessionID) bool {
	// Through the cache: mautrix reads the same session right after the key-share policy answered.
	igs, err := d.olm.GetGroupSession(ctx, roomID, sessionID)
	return err == nil && igs != nil && igs.SenderKey == d.mach.OwnIdentity().IdentityKey
}

// entitled reports whether userID was among the recipients of a session this device shared.
func (d *device) entitled(ctx context.Context, userID id.UserID, sessionID id.SessionID) (bool, error) {
	var ok bool
	err := d.store.DB.QueryRow(ctx, sqlIsSessionRecipient, userID, sessionID).Scan(&ok)
	return ok, err
}

// withdraw takes back a session that a forced rotation overtook while it was being installed: it stops being this
// device's outbound session (without counting as another rotation), and its inbound copy and recipients go, so
// nobody can use or request it.
func (d *device) withdraw(ctx context.Context, roomID id.RoomID, sess *crypto.OutboundGroupSession) error {
	if err := d.olm.SQLCryptoStore.RemoveOutboundGroupSession(ctx, roomID); err != nil {
		return fmt.Errorf("failed to withdraw an overtaken session: %w", err)
	}
	d.olm.c.outboundChanged(d.olm.AccountID, roomID)
	return d.olm.c.forgetSuccessors(ctx, d.store.DB, []*crypto.OutboundGroupSession{sess})
}
