package crypto

import (
	"context"
	"fmt"
	"maps"
	"strings"
	"sync"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// storeCache keeps in memory what the decrypt path of every message would otherwise read from the crypto store
// although it rarely changes: cross-signing keys and signatures (trust resolution), the device that owns a
// session's sender key, and inbound Megolm sessions. It also holds the replay index (Megolm message index →
// event) in memory; the relay takes new entries (Machine.TakeReplayIndex) and writes them in the statement that
// records their events as done (ReplayIndexInsert).
//
// Every OlmMachine ferry creates uses the crypto store through cachedStore, so every write that can change a
// cached answer (devices, cross-signing keys, signatures, inbound sessions) passes through it and drops the
// entries it affects, or, for a committed cross-signing key or signature, applies itself to them. Devices and
// cross-signing data are shared by all of ferry's accounts in the store; inbound sessions are per account.
type storeCache struct {
	// keyLocks serialise device-list checks and fetches per user (see keyLocks).
	keyLocks keyLocks

	lock sync.Mutex
	// trust holds each user's cross-signing keys, signatures on their keys and devices. A write about a user
	// drops that user's entry only: a stream of writes about new users (ghosts being set up, members' keys
	// fetched) leaves the established users' entries, which every decryption reads, in place.
	trust map[id.UserID]*cachedTrust
	// gen counts device and cross-signing writes; trustGen is gen after the last write about each user, and
	// allGen after the last write that dropped every user. A read about a user that overlapped a write about
	// them does not fill the cache.
	gen      uint64
	trustGen map[id.UserID]uint64
	allGen   uint64
	// inbound sessions by account; sessionGen counts inbound-session writes, like gen.
	sessionGen uint64
	inbound    map[inboundKey]*crypto.InboundGroupSession
	// inboundRoom finds the cached inbound session a replay-index check is about (mautrix names only the session
	// there), so its latest ratchet can be moved to the index just decrypted (see advanceInbound). An entry may
	// outlive its session in inbound; it is then ignored.
	inboundRoom map[accountSession]id.RoomID

	indexLock sync.Mutex
	index     map[id.SessionID]*replayState
	pending   []ReplayEntry

	outboundLock sync.Mutex
	// outboundGen counts changes of stored outbound sessions; outboundRoom holds the count at a room's last
	// change and outboundAll at the last change of every room, so that what was read from the store (or written
	// to it) while its room changed is not kept (outboundStaleLocked).
	outboundGen  uint64
	outboundAll  uint64
	outboundRoom map[id.RoomID]uint64
	outbound     map[outboundKey]*outboundEntry
	// noOutbound holds accounts and rooms known to have no outbound session in the store: a new ghost's first
	// message in a room asks three times before its first session is created. Room "" stands for every room: an
	// account this process created, before it adds its first session (markFreshOutbound).
	noOutbound map[outboundKey]struct{}

	// successors shared ahead of time (preshare.go)
	preLock sync.Mutex
	pre     nextSessions
}

// cachedTrust is what the cache holds about one user (see storeCache.trust).
type cachedTrust struct {
	xsKeys   map[id.CrossSigningUsage]id.CrossSigningKey // nil: not read
	signedBy map[signatureKey]bool
	// allSigned: signedBy holds every signature stored on the user's keys (read with their devices while they
	// were not tracked, then kept by the writes that followed), so one not in it does not exist.
	allSigned bool
	devByKey  map[id.IdentityKey]*id.Device
}

// signatureKey names a signature on one of a user's keys (the user is cachedTrust's).
type signatureKey struct {
	key    id.Ed25519
	signer id.UserID
	sKey   id.Ed25519
}

// signed records that the signature k exists (a write of it committed).
func (t *cachedTrust) signed(k signatureKey) {
	if t.signedBy == nil {
		t.signedBy = make(map[signatureKey]bool)
	}
	t.signedBy[k] = true
}

type accountSession struct {
	account string
	session id.SessionID
}

type inboundKey struct {
	account string
	room    id.RoomID
	session id.SessionID
}

type replayState struct {
	seen      map[uint]replaySeen
	unflushed int
}

type replaySeen struct {
	eventID   id.EventID
	timestamp int64
}

// ReplayEntry is one replay index row (crypto_message_index): a Megolm message index of a session, used by an
// event.
type ReplayEntry struct {
	SessionID id.SessionID
	Index     uint
	EventID   id.EventID
	Timestamp int64
}

// maxTrustUsers bounds the users whose keys, signatures and devices the cache holds.
const maxTrustUsers = 16384

// maxNoOutbound bounds the accounts and rooms known to have no outbound session (storeCache.noOutbound); when
// full it starts again empty.
const maxNoOutbound = 16384

// maxReplaySessions bounds the sessions whose replay index stays in memory; fully written ones are dropped
// beyond it (and read again from the store when they come back).
const maxReplaySessions = 4096

func newStoreCache() *storeCache {
	return &storeCache{index: make(map[id.SessionID]*replayState)}
}

// trustChanged drops what the cache holds about user.
func (c *storeCache) trustChanged(user id.UserID) {
	c.lock.Lock()
	c.writtenLocked(user)
	delete(c.trust, user)
	c.lock.Unlock()
}

// writtenLocked counts a write about user, so that reads about user in flight do not fill the cache.
func (c *storeCache) writtenLocked(user id.UserID) {
	c.gen++
	if len(c.trustGen) >= 4*maxTrustUsers {
		c.trustGen, c.allGen = nil, c.gen // forget who was written when: reads in flight do not fill
	}
	if c.trustGen == nil {
		c.trustGen = make(map[id.UserID]uint64)
	}
	c.trustGen[user] = c.gen
}

// trustWrite begins a write about a user's cross-signing keys or signatures: trustWritten ends it.
func (c *storeCache) trustWrite() uint64 {
	c.lock.Lock()
	defer c.lock.Unlock()
	return c.gen
}

// trustWritten ends a write about user that began at since (trustWrite). A write that committed on its own
// (done; not inside a transaction, which may still roll back) is applied to user's entry by update, so that the
// reads which follow it (a key fetch stores a user's keys one by one, each followed by a read of them, then trust
// is resolved from them) are answered from memory. Any other write about user, or a drop of every entry, between
// since and now makes the order of the two writes in the store unknown: the entry is dropped, as for a write that
// failed or is not committed yet.
func (c *storeCache) trustWritten(user id.UserID, since uint64, done bool, update func(*cachedTrust)) {
	c.lock.Lock()
	defer c.lock.Unlock()
	stale := !done || c.allGen > since || c.trustGen[user] > since
	c.writtenLocked(user)
	if stale {
		delete(c.trust, user)
		return
	}
	update(c.entryLocked(user))
}

// allTrustChanged drops every device and cross-signing entry.
func (c *storeCache) allTrustChanged() {
	c.lock.Lock()
	c.gen++
	c.trust, c.trustGen, c.allGen = nil, nil, c.gen
	c.lock.Unlock()
}

// readTrust returns user's entry (nil if none) and the generation a read from the store starts at. Callers hold
// c.lock.
func (c *storeCache) readTrust(user id.UserID) (*cachedTrust, uint64) {
	return c.trust[user], c.gen
}

// fillTrust returns user's entry for filling, or nil when a write about user came after the read that started
// at gen (its answer may be stale). Callers hold c.lock.
func (c *storeCache) fillTrust(user id.UserID, gen uint64) *cachedTrust {
	if c.allGen > gen || c.trustGen[user] > gen {
		return nil
	}
	return c.entryLocked(user)
}

// entryLocked returns user's entry, creating an empty one.
func (c *storeCache) entryLocked(user id.UserID) *cachedTrust {
	if c.trust == nil {
		c.trust = make(map[id.UserID]*cachedTrust)
	}
	t := c.trust[user]
	if t == nil {
		if len(c.trust) >= maxTrustUsers {
			clear(c.trust) // bounded memory; the users still active are read again
		}
		t = &cachedTrust{}
		c.trust[user] = t
	}
	return t
}

// sessionsChanged drops inbound sessions: one (room and session given) or all.
func (c *storeCache) sessionsChanged(k *inboundKey) {
	c.lock.Lock()
	c.sessionGen++
	if k == nil {
		c.inbound, c.inboundRoom = nil, nil
	} else {
		delete(c.inbound, *k)
		delete(c.inboundRoom, accountSession{k.account, k.session})
	}
	c.lock.Unlock()
}

// cachedStore is one account's crypto store as its OlmMachine sees it.
type cachedStore struct {
	*crypto.SQLCryptoStore
	c *storeCache
}

var _ crypto.Store = (*cachedStore)(nil)

// GetCrossSigningKeys answers from the cache. A user's keys waiting in ctx's trust batch are applied to the
// cached ones, as the store would answer after writing them; when the cache does not hold the user, the batch is
// written first.
func (s *cachedStore) GetCrossSigningKeys(ctx context.Context, userID id.UserID) (map[id.CrossSigningUsage]id.CrossSigningKey, error) {
	var pending []batchedKey
	if b := trustBatchFrom(ctx); b != nil {
		pending = b.keysOf(s, userID)
	}
	s.c.lock.Lock()
	t, gen := s.c.readTrust(userID)
	if t != nil && t.xsKeys != nil {
		answer := &cachedTrust{xsKeys: copyKeys(t.xsKeys)}
		s.c.lock.Unlock()
		for _, k := range pending {
			answer.keyWritten(k.usage, k.key)
		}
		return answer.xsKeys, nil
	}
	s.c.lock.Unlock()
	if len(pending) > 0 {
		if err := s.flushFor(ctx); err != nil {
			return nil, err
		}
		return s.GetCrossSigningKeys(ctx, userID)
	}
	keys, err := s.SQLCryptoStore.GetCrossSigningKeys(ctx, userID)
	if err != nil {
		return nil, err
	}
	s.c.lock.Lock()
	if t = s.c.fillTrust(userID, gen); t != nil {
		t.xsKeys = copyKeys(keys)
	}
	s.c.lock.Unlock()
	return keys, nil
}

func copyKeys(in map[id.CrossSigningUsage]id.CrossSigningKey) map[id.CrossSigningUsage]id.CrossSigningKey {
	out := make(map[id.CrossSigningUsage]id.CrossSigningKey, len(in))
	for k, v := range in {
		out[k] = v
	}
	return out
}

// knownTrust fills keys and signed (as trustResolver.prefetch does) for the users whose cross-signing keys and
// every signature on them the cache holds (cachedTrust.allSigned), and returns the others, to be read.
func (c *storeCache) knownTrust(users []id.UserID, keys map[id.UserID]map[id.CrossSigningUsage]id.CrossSigningKey, signed map[signature]bool) []id.UserID {
	c.lock.Lock()
	defer c.lock.Unlock()
	var unknown []id.UserID
	for _, u := range users {
		t := c.trust[u]
		if t == nil || !t.allSigned || t.xsKeys == nil {
			unknown = append(unknown, u)
			continue
		}
		keys[u] = maps.Clone(t.xsKeys)
		for k, ok := range t.signedBy {
			if ok {
				signed[signature{signedUser: u, signedKey: k.key, signerUser: k.signer, signerKey: k.sKey}] = true
			}
		}
	}
	return unknown
}

// IsKeySignedBy answers from the cache, after writing ctx's trust batch.
func (s *cachedStore) IsKeySignedBy(ctx context.Context, userID id.UserID, key id.Ed25519, signedByUser id.UserID, signedByKey id.Ed25519) (bool, error) {
	if err := s.flushFor(ctx); err != nil {
		return false, err
	}
	k := signatureKey{key, signedByUser, signedByKey}
	s.c.lock.Lock()
	t, gen := s.c.readTrust(userID)
	if t != nil {
		if signed, ok := t.signedBy[k]; ok || t.allSigned {
			s.c.lock.Unlock()
			return signed, nil
		}
	}
	s.c.lock.Unlock()
	signed, err := s.SQLCryptoStore.IsKeySignedBy(ctx, userID, key, signedByUser, signedByKey)
	if err != nil {
		return false, err
	}
	s.c.lock.Lock()
	if t = s.c.fillTrust(userID, gen); t != nil {
		if t.signedBy == nil {
			t.signedBy = make(map[signatureKey]bool)
		}
		t.signedBy[k] = signed
	}
	s.c.lock.Unlock()
	return signed, nil
}

// GetSignaturesForKeyBy reads the store after writing ctx's trust batch, and answers the signatures without the
// padding Postgres adds to their CHAR(88) column: mautrix would put a signature with two trailing spaces, which is
// not base64, into every Olm message (the sending device's keys).
func (s *cachedStore) GetSignaturesForKeyBy(ctx context.Context, userID id.UserID, key id.Ed25519, signerID id.UserID) (map[id.Ed25519]string, error) {
	if err := s.flushFor(ctx); err != nil {
		return nil, err
	}
	sigs, err := s.SQLCryptoStore.GetSignaturesForKeyBy(ctx, userID, key, signerID)
	for k, sig := range sigs {
		sigs[k] = strings.TrimRight(sig, " ")
	}
	return sigs, err
}

func (s *cachedStore) FindDeviceByKey(ctx context.Context, userID id.UserID, identityKey id.IdentityKey) (*id.Device, error) {
	if err := s.flushForDevicesOf(ctx, userID); err != nil {
		return nil, err
	}
	s.c.lock.Lock()
	t, gen := s.c.readTrust(userID)
	if t != nil {
		if dev, ok := t.devByKey[identityKey]; ok {
			cp := *dev
			s.c.lock.Unlock()
			return &cp, nil
		}
	}
	s.c.lock.Unlock()
	dev, err := s.SQLCryptoStore.FindDeviceByKey(ctx, userID, identityKey)
	if err != nil || dev == nil {
		return dev, err
	}
	s.c.lock.Lock()
	if t = s.c.fillTrust(userID, gen); t != nil {
		if t.devByKey == nil {
			t.devByKey = make(map[id.IdentityKey]*id.Device)
		}
		cp := *dev
		t.devByKey[identityKey] = &cp
	}
	s.c.lock.Unlock()
	return dev, nil
}

func (s *cachedStore) PutDevice(ctx context.Context, userID id.UserID, device *id.Device) error {
	if err := s.flushForDevicesOf(ctx, userID); err != nil {
		return err
	}
	defer s.c.trustChanged(userID)
	return s.SQLCryptoStore.PutDevice(ctx, userID, device)
}

// PutDevices writes through to the cache as a trust batch's flush does (on Postgres in one statement, which tells
// the rows as stored; otherwise through mautrix's store, after which the user's devices are read again). Through a
// context of withTrustBatch it only joins the batch.
func (s *cachedStore) PutDevices(ctx context.Context, userID id.UserID, devices map[id.DeviceID]*id.Device) error {
	if b := trustBatchFrom(ctx); b != nil && b.addDevices(s, userID, devices) {
		return nil
	}
	return s.writeTrust(ctx, []batchedDevices{{userID, devices}}, nil, nil, nil)
}

// The reads and writes of devices and tracked users below come after ctx's trust batch when it holds a device
// list they concern.

// GetDevices answers as the store does (nil for a user it does not track; a tracked user's devices not deleted)
// in one query (the store reads the tracking, then the devices), which also reads the user's cross-signing keys
// into the cache: mautrix's key fetch asks for both, one after the other, about every user it fetches.
func (s *cachedStore) GetDevices(ctx context.Context, userID id.UserID) (map[id.DeviceID]*id.Device, error) {
	if err := s.flushForDevicesOf(ctx, userID); err != nil {
		return nil, err
	}
	s.c.lock.Lock()
	_, gen := s.c.readTrust(userID)
	s.c.lock.Unlock()
	rows, err := s.DB.Query(ctx, sqlDevicesAndKeysOf, userID)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	tracked := false
	devices := make(map[id.DeviceID]*id.Device)
	keys := make(map[id.CrossSigningUsage]id.CrossSigningKey)
	var sigs []signatureKey
	for rows.Next() {
		var kind, a, b, c, name string
		var trust id.TrustState
		var deleted bool
		if err = rows.Scan(&kind, &a, &b, &c, &trust, &deleted, &name); err != nil {
			return nil, err
		}
		switch kind {
		case "t":
			tracked = true
		case "d":
			devices[id.DeviceID(a)] = &id.Device{UserID: userID, DeviceID: id.DeviceID(a), IdentityKey: id.IdentityKey(b),
				SigningKey: id.Ed25519(c), Trust: trust, Deleted: deleted, Name: name}
		case "k":
			keys[id.CrossSigningUsage(a)] = id.CrossSigningKey{Key: id.Ed25519(b), First: id.Ed25519(c)}
		case "s":
			sigs = append(sigs, signatureKey{id.Ed25519(a), id.UserID(b), id.Ed25519(c)})
		}
	}
	if err = rows.Err(); err != nil {
		return nil, err
	}
	s.c.lock.Lock()
	if t := s.c.fillTrust(userID, gen); t != nil {
		if t.xsKeys == nil {
			t.xsKeys = keys
		}
		if !tracked { // the query read every signature on the user's keys
			for _, k := range sigs {
				t.signed(k)
			}
			t.allSigned = true
		}
	}
	s.c.lock.Unlock()
	if !tracked {
		return nil, nil
	}
	return devices, nil
}

func (s *cachedStore) GetDevice(ctx context.Context, userID id.UserID, deviceID id.DeviceID) (*id.Device, error) {
	if err := s.flushForDevicesOf(ctx, userID); err != nil {
		return nil, err
	}
	return s.SQLCryptoStore.GetDevice(ctx, userID, deviceID)
}

func (s *cachedStore) FilterTrackedUsers(ctx context.Context, users []id.UserID) ([]id.UserID, error) {
	if err := s.flushForDevicesOf(ctx, users...); err != nil {
		return nil, err
	}
	return s.SQLCryptoStore.FilterTrackedUsers(ctx, users)
}

func (s *cachedStore) MarkTrackedUsersOutdated(ctx context.Context, users []id.UserID) error {
	if err := s.flushForDevicesOf(ctx, users...); err != nil {
		return err
	}
	return s.SQLCryptoStore.MarkTrackedUsersOutdated(ctx, users)
}

func (s *cachedStore) IncrementTrackedUsersErrorCount(ctx context.Context, users []id.UserID) error {
	if err := s.flushForDevicesOf(ctx, users...); err != nil {
		return err
	}
	return s.SQLCryptoStore.IncrementTrackedUsersErrorCount(ctx, users)
}

func (s *cachedStore) GetOutdatedTrackedUsers(ctx context.Context) ([]id.UserID, error) {
	if err := s.flushForDevicesOf(ctx); err != nil {
		return nil, err
	}
	return s.SQLCryptoStore.GetOutdatedTrackedUsers(ctx)
}

// committed reports whether a write through ctx commits when it returns (it is not part of a transaction).
func (s *cachedStore) committed(ctx context.Context) bool {
	_, inTxn := s.DB.Execable(ctx).(dbutil.Transaction)
	return !inTxn
}

// PutCrossSigningKey writes through to the cache: the store keeps the first key seen for a usage and replaces
// the current one. Through a context of withTrustBatch it only joins the batch, which its flush writes.
func (s *cachedStore) PutCrossSigningKey(ctx context.Context, userID id.UserID, usage id.CrossSigningUsage, key id.Ed25519) error {
	if b := trustBatchFrom(ctx); b != nil && b.addKey(s, batchedKey{userID, usage, key}) {
		return nil
	}
	return s.putCrossSigningKey(ctx, userID, usage, key)
}

func (s *cachedStore) putCrossSigningKey(ctx context.Context, userID id.UserID, usage id.CrossSigningUsage, key id.Ed25519) error {
	since := s.c.trustWrite()
	err := s.SQLCryptoStore.PutCrossSigningKey(ctx, userID, usage, key)
	s.c.trustWritten(userID, since, err == nil && s.committed(ctx), func(t *cachedTrust) { t.keyWritten(usage, key) })
	return err
}

// devicesStored applies a committed write of the user's device list, which stored these rows: the devices it no
// longer lists are marked deleted, as the store marks them.
func (t *cachedTrust) devicesStored(stored []*id.Device) {
	listed := make(map[id.DeviceID]bool, len(stored))
	for _, d := range stored {
		listed[d.DeviceID] = true
	}
	byKey := make(map[id.IdentityKey]*id.Device, len(stored)+len(t.devByKey))
	for key, d := range t.devByKey {
		if !listed[d.DeviceID] {
			cp := *d
			cp.Deleted = true
			byKey[key] = &cp
		}
	}
	for _, d := range stored {
		if _, twice := byKey[d.IdentityKey]; twice {
			t.devByKey = nil // two devices with one key: the store's answer is not known
			return
		}
		byKey[d.IdentityKey] = d
	}
	t.devByKey = byKey
}

// keyWritten applies a committed write of a cross-signing key to the entry, when its keys were read.
func (t *cachedTrust) keyWritten(usage id.CrossSigningUsage, key id.Ed25519) {
	if t.xsKeys == nil {
		return // not read yet: the next read fills it
	}
	first := key
	if cur, ok := t.xsKeys[usage]; ok {
		first = cur.First
	}
	t.xsKeys[usage] = id.CrossSigningKey{Key: key, First: first}
}

func (s *cachedStore) ResetMasterKeyTOFU(ctx context.Context, userID id.UserID, key id.Ed25519) error {
	if err := s.flushFor(ctx); err != nil {
		return err
	}
	defer s.c.trustChanged(userID)
	return s.SQLCryptoStore.ResetMasterKeyTOFU(ctx, userID, key)
}

// PutSignature writes through to the cache: the signature is known to exist. Through a context of
// withTrustBatch it only joins the batch, which its flush writes.
func (s *cachedStore) PutSignature(ctx context.Context, signedUser id.UserID, signedKey id.Ed25519, signerUser id.UserID, signerKey id.Ed25519, signature string) error {
	row := signatureRow{signedUser, signatureKey{signedKey, signerUser, signerKey}}
	if b := trustBatchFrom(ctx); b != nil && b.addSignature(s, batchedSignature{row, signature}) {
		return nil
	}
	since := s.c.trustWrite()
	err := s.SQLCryptoStore.PutSignature(ctx, signedUser, signedKey, signerUser, signerKey, signature)
	s.c.trustWritten(signedUser, since, err == nil && s.committed(ctx), func(t *cachedTrust) {
		t.signed(row.signatureKey)
	})
	return err
}

// DropSignaturesByKey drops the signatures userID made with key, on anyone's keys: every user's entry goes (a
// user's cross-signing reset, which is rare).
func (s *cachedStore) DropSignaturesByKey(ctx context.Context, userID id.UserID, key id.Ed25519) (int64, error) {
	if err := s.flushFor(ctx); err != nil {
		return 0, err
	}
	defer s.c.allTrustChanged()
	return s.SQLCryptoStore.DropSignaturesByKey(ctx, userID, key)
}

// GetGroupSession returns a copy of the cached session (decrypting advances the copy's ratchet, and other users
// of the session, such as key requests, must not see that happen concurrently).
func (s *cachedStore) GetGroupSession(ctx context.Context, roomID id.RoomID, sessionID id.SessionID) (*crypto.InboundGroupSession, error) {
	k := inboundKey{s.AccountID, roomID, sessionID}
	s.c.lock.Lock()
	sess, ok := s.c.inbound[k]
	gen := s.c.sessionGen
	if ok {
		// Copied under the lock: advanceInbound moves the cached ratchet.
		cp := copyInbound(sess)
		s.c.lock.Unlock()
		return cp, nil
	}
	s.c.lock.Unlock()
	sess, err := s.SQLCryptoStore.GetGroupSession(ctx, roomID, sessionID)
	if err != nil || sess == nil {
		return sess, err
	}
	if cp := copyInbound(sess); cp != nil {
		s.c.lock.Lock()
		if s.c.sessionGen == gen {
			s.c.keepInboundLocked(k, cp)
		}
		s.c.lock.Unlock()
	}
	return sess, nil
}

// copyInbound copies a session whose Megolm state is goolm's (plain values); other implementations are not
// cached (nil).
// keepInboundLocked caches sess as the stored session k.
func (c *storeCache) keepInboundLocked(k inboundKey, sess *crypto.InboundGroupSession) {
	if c.inbound == nil {
		c.inbound = make(map[inboundKey]*crypto.InboundGroupSession)
	}
	if c.inboundRoom == nil {
		c.inboundRoom = make(map[accountSession]id.RoomID)
	}
	c.inbound[k] = sess
	c.inboundRoom[accountSession{k.account, k.session}] = k.room
}

func copyInbound(sess *crypto.InboundGroupSession) *crypto.InboundGroupSession {
	internal := copyGoolmInbound(sess.Internal)
	if internal == nil {
		return nil
	}
	cp := *sess
	cp.Internal = internal
	return &cp
}

// PutGroupSession stores sess and keeps a copy in the cache: a session just received is read next by the
// decryption of the message it came for. The copy is kept only when no other change of the account's sessions
// came between the write and now (the cache would not know which write the store holds last).
func (s *cachedStore) PutGroupSession(ctx context.Context, sess *crypto.InboundGroupSession) error {
	k := inboundKey{s.AccountID, sess.RoomID, sess.ID()}
	s.c.lock.Lock()
	gen := s.c.sessionGen
	s.c.lock.Unlock()
	err := s.SQLCryptoStore.PutGroupSession(ctx, sess)
	var cp *crypto.InboundGroupSession
	if err == nil {
		cp = copyInbound(sess)
	}
	s.c.lock.Lock()
	defer s.c.lock.Unlock()
	kept := s.c.sessionGen == gen && cp != nil
	s.c.sessionGen++
	delete(s.c.inbound, k)
	delete(s.c.inboundRoom, accountSession{k.account, k.session})
	if kept {
		s.c.keepInboundLocked(k, cp)
	}
	return err
}

func (s *cachedStore) RedactGroupSession(ctx context.Context, roomID id.RoomID, sessionID id.SessionID, reason string) error {
	defer s.c.sessionsChanged(&inboundKey{s.AccountID, roomID, sessionID})
	return s.SQLCryptoStore.RedactGroupSession(ctx, roomID, sessionID, reason)
}

func (s *cachedStore) RedactGroupSessions(ctx context.Context, roomID id.RoomID, senderKey id.SenderKey, reason string) ([]id.SessionID, error) {
	defer s.c.sessionsChanged(nil)
	return s.SQLCryptoStore.RedactGroupSessions(ctx, roomID, senderKey, reason)
}

func (s *cachedStore) RedactExpiredGroupSessions(ctx context.Context) ([]id.SessionID, error) {
	defer s.c.sessionsChanged(nil)
	return s.SQLCryptoStore.RedactExpiredGroupSessions(ctx)
}

func (s *cachedStore) RedactOutdatedGroupSessions(ctx context.Context) ([]id.SessionID, error) {
	defer s.c.sessionsChanged(nil)
	return s.SQLCryptoStore.RedactOutdatedGroupSessions(ctx)
}

func (s *cachedStore) PutWithheldGroupSession(ctx context.Context, content event.RoomKeyWithheldEventContent) error {
	defer s.c.sessionsChanged(&inboundKey{s.AccountID, content.RoomID, content.SessionID})
	return s.SQLCryptoStore.PutWithheldGroupSession(ctx, content)
}

// ValidateMessageIndex is replay protection: a Megolm message index of a session may belong to one event only.
// The first use of a session in this process reads its known indices from the store; from then on the index is
// decided in memory and new entries wait for the relay to take them (takeReplayIndex).
func (s *cachedStore) ValidateMessageIndex(ctx context.Context, sessionID id.SessionID, eventID id.EventID, index uint, timestamp int64) (bool, error) {
	c := s.c
	c.indexLock.Lock()
	if c.index[sessionID] == nil {
		c.indexLock.Unlock()
		loaded, err := s.loadReplayIndex(ctx, sessionID)
		if err != nil {
			return false, err
		}
		c.indexLock.Lock()
		if c.index[sessionID] == nil {
			c.index[sessionID] = loaded
		}
	}
	defer c.indexLock.Unlock()
	st := c.index[sessionID]
	seen, ok := st.seen[index]
	if eventID == "" && timestamp == 0 {
		// No event to compare with (mautrix checks undecryptable copies this way): any known use is a replay.
		return !ok, nil
	}
	if ok {
		return seen.eventID == eventID && seen.timestamp == timestamp, nil
	}
	st.seen[index] = replaySeen{eventID: eventID, timestamp: timestamp}
	st.unflushed++
	c.pending = append(c.pending, ReplayEntry{SessionID: sessionID, Index: index, EventID: eventID, Timestamp: timestamp})
	c.advanceInbound(s.AccountID, sessionID, index)
	return true, nil
}

// advanceInbound moves the latest ratchet of a cached inbound session forward to index, a message index that
// was just decrypted with it. mautrix's decrypt works on a copy, so without this every message of a session
// would step the ratchet from where the stored session stands (one hash per message since then); with it, from
// the previous message. The initial ratchet is untouched, so an earlier index still decrypts (from there). Held
// in memory only: the stored session keeps its ratchets.
func (c *storeCache) advanceInbound(account string, sessionID id.SessionID, index uint) {
	c.lock.Lock()
	defer c.lock.Unlock()
	room, ok := c.inboundRoom[accountSession{account, sessionID}]
	if !ok {
		return
	}
	sess := c.inbound[inboundKey{account, room, sessionID}]
	if sess == nil {
		return
	}
	advanceInboundRatchet(sess.Internal, index)
}

func (s *cachedStore) loadReplayIndex(ctx context.Context, sessionID id.SessionID) (*replayState, error) {
	rows, err := s.DB.Query(ctx, sqlReplayIndexOfSession, sessionID)
	if err != nil {
		return nil, fmt.Errorf("failed to read the replay index: %w", err)
	}
	defer rows.Close()
	st := &replayState{seen: make(map[uint]replaySeen)}
	for rows.Next() {
		var idx int64
		var seen replaySeen
		if err = rows.Scan(&idx, &seen.eventID, &seen.timestamp); err != nil {
			return nil, err
		}
		st.seen[uint(idx)] = seen
	}
	return st, rows.Err()
}

// takeReplayIndex hands over the pending replay index entries for writing. settle(true) after they were
// committed marks them written; settle(false) puts them back for the next write.
func (c *storeCache) takeReplayIndex() ([]ReplayEntry, func(committed bool)) {
	c.indexLock.Lock()
	batch := c.pending
	c.pending = nil
	c.indexLock.Unlock()
	if len(batch) == 0 {
		return nil, func(bool) {}
	}
	return batch, func(committed bool) {
		c.indexLock.Lock()
		defer c.indexLock.Unlock()
		if !committed {
			c.pending = append(batch, c.pending...)
			return
		}
		for _, e := range batch {
			if st := c.index[e.SessionID]; st != nil {
				st.unflushed--
			}
		}
		if len(c.index) > maxReplaySessions {
			for sid, st := range c.index {
				if st.unflushed <= 0 {
					delete(c.index, sid)
				}
				if len(c.index) <= maxReplaySessions/2 {
					break
				}
			}
		}
	}
}

// Outbound Megolm sessions stay in memory once shared: encrypting a message advances the session's ratchet, and
// writing the ratchet back after every message was a statement and a commit per message. The written state may
// therefore lag behind what was sent, so a session whose state was not written at a clean stop must never be
// used again (its next message index would repeat one already sent): Machine.Init rotates every outbound session
// unless the previous run ended with Machine.Stop writing them all (outboundCleanSecret).

type outboundKey struct {
	account string
	room    id.RoomID
}

type outboundEntry struct {
	sess  *crypto.OutboundGroupSession
	store *crypto.SQLCryptoStore
	dirty bool
}

func (s *cachedStore) GetOutboundGroupSession(ctx context.Context, roomID id.RoomID) (*crypto.OutboundGroupSession, error) {
	k := outboundKey{s.AccountID, roomID}
	s.c.outboundLock.Lock()
	e := s.c.outbound[k]
	if e != nil && !e.sess.Expired() {
		s.c.outboundLock.Unlock()
		return e.sess, nil
	}
	_, none := s.c.noOutbound[k]
	_, fresh := s.c.noOutbound[outboundKey{s.AccountID, ""}]
	if none || fresh {
		s.c.outboundLock.Unlock()
		return nil, nil
	}
	if e != nil {
		// Expired: write its final state so that the share path (which reads the store) sees it expired too.
		delete(s.c.outbound, k)
	}
	gen := s.c.outboundGen
	s.c.outboundLock.Unlock()
	if e != nil {
		if e.dirty {
			if err := e.store.UpdateOutboundGroupSession(ctx, e.sess); err != nil {
				return nil, err
			}
		}
		return e.sess, nil
	}
	sess, err := s.SQLCryptoStore.GetOutboundGroupSession(ctx, roomID)
	if err == nil && sess == nil {
		s.c.outboundLock.Lock()
		if !s.c.outboundStaleLocked(roomID, gen) {
			s.c.noOutboundLocked(k)
		}
		s.c.outboundLock.Unlock()
	}
	if err != nil || sess == nil || !sess.Shared || sess.Expired() {
		return sess, err
	}
	s.c.outboundLock.Lock()
	defer s.c.outboundLock.Unlock()
	if s.c.outboundStaleLocked(roomID, gen) {
		return sess, nil
	}
	if cur := s.c.outbound[k]; cur != nil {
		return cur.sess, nil
	}
	s.c.keepOutboundLocked(k, sess, s.SQLCryptoStore)
	return sess, nil
}

// UpdateOutboundGroupSession marks a cached session for writing at the next flush; others are written at once.
func (s *cachedStore) UpdateOutboundGroupSession(ctx context.Context, sess *crypto.OutboundGroupSession) error {
	s.c.outboundLock.Lock()
	if e := s.c.outbound[outboundKey{s.AccountID, sess.RoomID}]; e != nil && e.sess == sess {
		e.dirty = true
		s.c.outboundLock.Unlock()
		return nil
	}
	s.c.outboundLock.Unlock()
	return s.SQLCryptoStore.UpdateOutboundGroupSession(ctx, sess)
}

// AddOutboundGroupSession stores a session as the account's in its room. A shared one (the session a share has
// just sent, which the next message encrypts with) is kept in memory as stored, unless its room changed while it
// was written; others are forgotten, to be read again.
func (s *cachedStore) AddOutboundGroupSession(ctx context.Context, sess *crypto.OutboundGroupSession) error {
	k := outboundKey{s.AccountID, sess.RoomID}
	s.c.outboundLock.Lock()
	delete(s.c.noOutbound, outboundKey{s.AccountID, ""})
	gen := s.c.outboundGen
	s.c.outboundLock.Unlock()
	err := s.SQLCryptoStore.AddOutboundGroupSession(ctx, sess)
	s.c.outboundLock.Lock()
	defer s.c.outboundLock.Unlock()
	keep := err == nil && sess.Shared && !sess.Expired() && !s.c.outboundStaleLocked(sess.RoomID, gen)
	s.c.outboundChangedLocked(s.AccountID, sess.RoomID)
	if keep {
		s.c.keepOutboundLocked(k, sess, s.SQLCryptoStore)
	}
	return err
}

// keepOutboundLocked holds sess in memory as k's stored session. c.outboundLock must be held.
func (c *storeCache) keepOutboundLocked(k outboundKey, sess *crypto.OutboundGroupSession, store *crypto.SQLCryptoStore) {
	if c.outbound == nil {
		c.outbound = make(map[outboundKey]*outboundEntry)
	}
	c.outbound[k] = &outboundEntry{sess: sess, store: store}
}

// noOutboundLocked remembers that k has no outbound session stored. c.outboundLock must be held.
func (c *storeCache) noOutboundLocked(k outboundKey) {
	if c.noOutbound == nil || len(c.noOutbound) >= maxNoOutbound {
		c.noOutbound = make(map[outboundKey]struct{})
	}
	c.noOutbound[k] = struct{}{}
}

// markFreshOutbound records that account was created by this process: it has no outbound session stored, in
// any room, until it adds one.
func (c *storeCache) markFreshOutbound(account string) {
	c.outboundLock.Lock()
	defer c.outboundLock.Unlock()
	c.noOutboundLocked(outboundKey{account, ""})
}

// outboundStaleLocked tells whether room's stored outbound sessions changed since the change count was since.
// c.outboundLock must be held.
func (c *storeCache) outboundStaleLocked(room id.RoomID, since uint64) bool {
	return c.outboundAll > since || c.outboundRoom[room] > since
}

// RemoveOutboundGroupSession removes the account's session in a room; any successor prepared in the room is
// dropped too, as for every rotation.
func (s *cachedStore) RemoveOutboundGroupSession(ctx context.Context, roomID id.RoomID) error {
	dropped := s.c.dropNext(roomID)
	defer s.c.outboundChanged(s.AccountID, roomID)
	if err := s.SQLCryptoStore.RemoveOutboundGroupSession(ctx, roomID); err != nil {
		return err
	}
	return s.c.forgetSuccessors(ctx, s.DB, dropped)
}

// cachedOutbound returns k's session if it is in memory, without reading the store.
func (c *storeCache) cachedOutbound(k outboundKey) *crypto.OutboundGroupSession {
	c.outboundLock.Lock()
	defer c.outboundLock.Unlock()
	if e := c.outbound[k]; e != nil {
		return e.sess
	}
	return nil
}

// outboundChanged forgets cached outbound sessions without writing them: of one account in one room, of every
// account in a room (account ""), or all (room "").
func (c *storeCache) outboundChanged(account string, room id.RoomID) {
	c.outboundLock.Lock()
	defer c.outboundLock.Unlock()
	c.outboundChangedLocked(account, room)
}

// outboundChangedLocked is outboundChanged with c.outboundLock held.
func (c *storeCache) outboundChangedLocked(account string, room id.RoomID) {
	c.noteOutboundLocked(room)
	if account != "" && room != "" {
		delete(c.outbound, outboundKey{account, room})
		delete(c.noOutbound, outboundKey{account, room})
		return
	}
	for k := range c.outbound {
		if (room == "" || k.room == room) && (account == "" || k.account == account) {
			delete(c.outbound, k)
		}
	}
	for k := range c.noOutbound {
		if (room == "" || k.room == room) && (account == "" || k.account == account) {
			delete(c.noOutbound, k)
		}
	}
}

// noteOutboundLocked counts a change of room's stored outbound sessions (of every room when room is "").
// c.outboundLock must be held.
func (c *storeCache) noteOutboundLocked(room id.RoomID) {
	c.outboundGen++
	if room == "" {
		c.outboundAll = c.outboundGen
		return
	}
	if c.outboundRoom == nil || len(c.outboundRoom) >= maxNoOutbound {
		// Starting the map again forgets when its rooms changed: count that as a change of every room.
		c.outboundRoom = make(map[id.RoomID]uint64)
		c.outboundAll = c.outboundGen
	}
	c.outboundRoom[room] = c.outboundGen
}

// flushOutbound writes the state of every cached outbound session that encrypted since it was last written.
func (c *storeCache) flushOutbound(ctx context.Context) error {
	c.outboundLock.Lock()
	var dirty []*outboundEntry
	for _, e := range c.outbound {
		if e.dirty {
			e.dirty = false
			dirty = append(dirty, e)
		}
	}
	c.outboundLock.Unlock()
	for i, e := range dirty {
		if err := e.store.UpdateOutboundGroupSession(ctx, e.sess); err != nil {
			c.outboundLock.Lock()
			for _, rest := range dirty[i:] {
				rest.dirty = true
			}
			c.outboundLock.Unlock()
			return err
		}
	}
	return nil
}

// forgetSession drops one Megolm session from memory, as its keys are deleted from the store: the outbound
// session of whichever account holds it (without writing it back: its stored row is gone or going) and the
// inbound copies of every account.
func (c *storeCache) forgetSession(room id.RoomID, session id.SessionID) {
	c.outboundLock.Lock()
	c.noteOutboundLocked(room)
	for k, e := range c.outbound {
		if k.room == room && e.sess.ID() == session {
			delete(c.outbound, k)
		}
	}
	c.outboundLock.Unlock()
	c.lock.Lock()
	c.sessionGen++
	for k := range c.inbound {
		if k.room == room && k.session == session {
			delete(c.inbound, k)
		}
	}
	c.lock.Unlock()
}

// forgetGhostCopies drops the inbound copies of a Megolm session held for accounts other than the bot's.
func (c *storeCache) forgetGhostCopies(room id.RoomID, session id.SessionID) {
	c.lock.Lock()
	c.sessionGen++
	for k := range c.inbound {
		if k.room == room && k.session == session && k.account != botAccountID {
			delete(c.inbound, k)
		}
	}
	c.lock.Unlock()
}
