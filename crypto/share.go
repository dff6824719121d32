package crypto

import (
	"context"
	"database/sql"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/internal/metrics"
)

// Fast key sharing.
//
// A room key share to N devices needs, per device, its device keys, its trust, its latest Olm session, one Olm
// encryption, the updated Olm session saved, and a record that the device's user may later ask for the session.
// Done one device at a time against the SQL store (as mautrix's ShareGroupSession does) that is several
// statements and two commits per device. ferry keeps mautrix's OlmMachine for the Olm work itself (the one-time
// key claim and its signature checks, session creation, encryption, all under the machine's own lock) and gives
// it a store (olmStore) that, during one share, answers from data loaded in a few queries and collects the
// updated sessions, which ferry then saves in one transaction before anything is sent. Olm sessions stay in
// mautrix's crypto_olm_session table with mautrix's pickles, so mautrix's own code reads them as before.

// shareChunkRows bounds the rows of one multi-row statement (SQLite allows 999 parameters in old builds). A
// variable only so that a test can make a share of a few devices take several statements.
var shareChunkRows = 100

// toDeviceChunk bounds the devices per to-device request: a room key to 1,000 devices is about 1.5 MB of JSON,
// which homeservers accept, but a few requests keep each one well under request body limits.
const toDeviceChunk = 250

// olmStore is a device's crypto store as its OlmMachine sees it. Outside a share it behaves like the SQL store,
// except that it hands out one Go object per Olm session (the first one loaded), so a session advanced by a
// share is never used again in an older copy, which would reuse a message key. Inside a share (a context made
// by withShareBatch) it serves devices and latest sessions from the batch and records updated sessions there
// instead of writing them one by one.
//
// It sits on top of the store cache (cachedStore, see storecache.go): Olm sessions are olmStore's, Megolm
// sessions, trust and the replay index the cache's, and everything else the SQL store's.
type olmStore struct {
	*cachedStore
	mu    sync.Mutex
	canon map[id.SessionID]*crypto.OlmSession
	// noSessions: the account was created by this process and has added no Olm session since, so the store
	// holds none of it (loadShareBatch). Cleared before any session is added, in a share or otherwise.
	noSessions atomic.Bool
	// owner is the user whose device the account is. While unstored (a new account, not yet written), PutDevice
	// holds the account's own device back in ownDevice for the PutAccount that follows it (see PutDevice).
	owner     id.UserID
	unstored  atomic.Bool
	ownDevice atomic.Pointer[id.Device]
	// withAccount holds secrets (a new ghost's cross-signing keys) for the statement of that same PutAccount.
	withAccount atomic.Pointer[heldSecrets]
	// holdUploaded makes the next PutAccount of the account as uploaded (shared) wait in uploaded, for the
	// statement that stores the new identity's signatures (crossSign): one write less for a new ghost.
	holdUploaded atomic.Bool
	uploaded     atomic.Pointer[RowInsert]
	// ownSig is the signature of the account's device by the owner's self-signing key this process made (nil:
	// none yet), for GetSignaturesForKeyBy.
	ownSig atomic.Pointer[ownSignature]
}

// heldSecrets are secrets PutAccount writes in the statement that first stores a new account with its own device;
// stored runs once that statement committed.
type heldSecrets struct {
	rows   *RowInsert
	stored func()
}

// ownSignature is a device's signature by its owner's self-signing key.
type ownSignature struct {
	device, selfSigning id.Ed25519
	signature           string
}

// GetSignaturesForKeyBy answers mautrix's one question of it, the own device's signature by the owner's
// self-signing key (which every Olm message carries with the device's keys; mautrix asks once per device), from
// the signature this process made and stored, when it made one: the answer holds that signature only. Every other
// question goes to the store.
func (s *olmStore) GetSignaturesForKeyBy(ctx context.Context, userID id.UserID, key id.Ed25519, signerID id.UserID) (map[id.Ed25519]string, error) {
	if p := s.ownSig.Load(); p != nil && userID == s.owner && signerID == s.owner && key == p.device {
		return map[id.Ed25519]string{p.selfSigning: p.signature}, nil
	}
	return s.cachedStore.GetSignaturesForKeyBy(ctx, userID, key, signerID)
}

var _ crypto.Store = (*olmStore)(nil)

func newOlmStore(base *cachedStore, owner id.UserID) *olmStore {
	return &olmStore{cachedStore: base, canon: make(map[id.SessionID]*crypto.OlmSession), owner: owner}
}

// adopt returns the one object that stands for sess's Olm session.
func (s *olmStore) adopt(sess *crypto.OlmSession) *crypto.OlmSession {
	if sess == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if c, ok := s.canon[sess.ID()]; ok {
		return c
	}
	s.canon[sess.ID()] = sess
	return sess
}

// shareBatch is what one share loaded and what it changed.
type shareBatch struct {
	devices map[id.UserID]map[id.DeviceID]*id.Device
	// latest holds, for every recipient's identity key, its latest Olm session (nil: none yet).
	latest map[id.SenderKey]*crypto.OlmSession
	mu     sync.Mutex
	dirty  map[id.SessionID]*pickledSession
	// created counts the Olm sessions made from claimed one-time keys.
	created int
}

// pickledSession is an Olm session as it will be saved: pickled when it was updated, which happens under the
// OlmMachine's lock, so the save never reads a session another goroutine is advancing.
type pickledSession struct {
	senderKey                           id.SenderKey
	pickle                              []byte
	created, lastEncrypted, lastDecrypt time.Time
}

type shareBatchKey struct{}

// withShareBatch hands b to the olmStore through the context of one call into mautrix (device.shareSession's
// EncryptToDevices), and nowhere else. It is the one value in a context that changes behaviour, kept because
// there is no other way: mautrix's crypto.Store methods receive nothing per call but the context, and the store
// must tell that call's reads and writes from those of other goroutines using the same OlmMachine at the same
// time (Olm decryption creating and advancing sessions, key requests, shares of other rooms), which must keep
// going straight to the database. ferry's own code passes the batch as a parameter up to that call.
func withShareBatch(ctx context.Context, b *shareBatch) context.Context {
	return context.WithValue(ctx, shareBatchKey{}, b)
}

// batchFrom returns the batch of the share ctx belongs to (see withShareBatch), or nil outside a share.
func batchFrom(ctx context.Context) *shareBatch {
	b, _ := ctx.Value(shareBatchKey{}).(*shareBatch)
	return b
}

func (s *olmStore) record(b *shareBatch, key id.SenderKey, sess *crypto.OlmSession) error {
	pickle, err := sess.Internal.Pickle(s.PickleKey)
	if err != nil {
		return err
	}
	b.mu.Lock()
	b.dirty[sess.ID()] = &pickledSession{senderKey: key, pickle: pickle, created: sess.CreationTime,
		lastEncrypted: sess.LastEncryptedTime, lastDecrypt: sess.LastDecryptedTime}
	b.mu.Unlock()
	return nil
}

func (s *olmStore) GetDevice(ctx context.Context, userID id.UserID, deviceID id.DeviceID) (*id.Device, error) {
	if b := batchFrom(ctx); b != nil {
		if dev := b.devices[userID][deviceID]; dev != nil {
			return dev, nil
		}
	}
	return s.SQLCryptoStore.GetDevice(ctx, userID, deviceID)
}

func (s *olmStore) HasSession(ctx context.Context, key id.SenderKey) bool {
	if b := batchFrom(ctx); b != nil {
		b.mu.Lock()
		sess, ok := b.latest[key]
		b.mu.Unlock()
		if ok {
			return sess != nil
		}
	}
	return s.SQLCryptoStore.HasSession(ctx, key)
}

func (s *olmStore) GetLatestSession(ctx context.Context, key id.SenderKey) (*crypto.OlmSession, error) {
	if b := batchFrom(ctx); b != nil {
		b.mu.Lock()
		sess, ok := b.latest[key]
		b.mu.Unlock()
		if ok {
			return sess, nil
		}
	}
	sess, err := s.SQLCryptoStore.GetLatestSession(ctx, key)
	return s.adopt(sess), err
}

func (s *olmStore) GetSessions(ctx context.Context, key id.SenderKey) (crypto.OlmSessionList, error) {
	list, err := s.SQLCryptoStore.GetSessions(ctx, key)
	for i, sess := range list {
		list[i] = s.adopt(sess)
	}
	return list, noteStoreErr(ctx, err)
}

func (s *olmStore) AddSession(ctx context.Context, key id.SenderKey, sess *crypto.OlmSession) error {
	metrics.OlmSessionsCreated.Inc()
	s.noSessions.Store(false)
	if b := batchFrom(ctx); b != nil {
		sess = s.adopt(sess)
		if err := s.record(b, key, sess); err != nil {
			return err
		}
		b.mu.Lock()
		b.latest[key] = sess
		b.created++
		b.mu.Unlock()
		return nil
	}
	if u := unitFrom(ctx); u != nil {
		u.mu.Lock()
		u.added[sess.ID()] = pendingOlm{key: key, sess: sess}
		u.mu.Unlock()
		return nil
	}
	err := s.SQLCryptoStore.AddSession(ctx, key, sess)
	s.adopt(sess)
	return err
}

func (s *olmStore) UpdateSession(ctx context.Context, key id.SenderKey, sess *crypto.OlmSession) error {
	if b := batchFrom(ctx); b != nil {
		return s.record(b, key, sess)
	}
	if u := unitFrom(ctx); u != nil {
		u.mu.Lock()
		u.updated[sess.ID()] = pendingOlm{key: key, sess: sess}
		u.mu.Unlock()
		return nil
	}
	return s.SQLCryptoStore.UpdateSession(ctx, key, sess)
}

// loadShareBatch loads, in one query, the latest Olm session with each recipient device.
func (s *olmStore) loadShareBatch(ctx context.Context, devices map[id.UserID]map[id.DeviceID]*id.Device) (*shareBatch, error) {
	b := &shareBatch{devices: devices, latest: make(map[id.SenderKey]*crypto.OlmSession), dirty: make(map[id.SessionID]*pickledSession)}
	var keys []any
	for _, devs := range devices {
		for _, dev := range devs {
			if _, ok := b.latest[dev.IdentityKey]; !ok {
				b.latest[dev.IdentityKey] = nil
				keys = append(keys, dev.IdentityKey)
			}
		}
	}
	if s.noSessions.Load() {
		return b, nil
	}
	type row struct {
		sessionID     id.SessionID
		pickle        []byte
		created, enc  time.Time
		lastDecrypted time.Time
	}
	best := make(map[id.SenderKey]*row, len(keys))
	for start := 0; start < len(keys); start += shareChunkRows * 5 {
		chunk := keys[start:min(start+shareChunkRows*5, len(keys))]
		args := append([]any{s.AccountID}, chunk...)
		rows, err := s.DB.Query(ctx, sqlOlmSessionsWith(len(chunk)), args...)
		if err != nil {
			return nil, fmt.Errorf("failed to load Olm sessions: %w", err)
		}
		for rows.Next() {
			var key id.SenderKey
			var r row
			if err = rows.Scan(&key, &r.sessionID, &r.pickle, &r.created, &r.enc, &r.lastDecrypted); err != nil {
				_ = rows.Close()
				return nil, fmt.Errorf("failed to read an Olm session: %w", err)
			}
			// The same choice as the store's GetLatestSession: the most recently decrypted.
			if prev := best[key]; prev == nil || r.lastDecrypted.After(prev.lastDecrypted) {
				best[key] = &r
			}
		}
		if err = closeRows(rows); err != nil {
			return nil, err
		}
	}
	for key, r := range best {
		s.mu.Lock()
		known := s.canon[r.sessionID]
		s.mu.Unlock()
		if known != nil {
			b.latest[key] = known
			continue
		}
		sess := &crypto.OlmSession{Internal: newBlankOlmSession()}
		if err := sess.Internal.Unpickle(r.pickle, s.PickleKey); err != nil {
			return nil, fmt.Errorf("failed to unpickle an Olm session: %w", err)
		}
		sess.CreationTime, sess.LastEncryptedTime, sess.LastDecryptedTime = r.created, r.enc, r.lastDecrypted
		b.latest[key] = s.adopt(sess)
	}
	return b, nil
}

// saveShare saves, in one transaction, the Olm sessions the share created or advanced, the recipients entitled to
// the Megolm session and, for a new session, its inbound copy (nil for a session stored before). A session row is
// only overwritten by a state at least as new as the stored one (last_encrypted), so a slower concurrent save
// never puts back an older ratchet.
func (s *olmStore) saveShare(ctx context.Context, b *shareBatch, recipients []recipient, sessionID id.SessionID, inbound *crypto.InboundGroupSession) error {
	if inbound != nil {
		defer s.c.sessionsChanged(&inboundKey{s.AccountID, inbound.RoomID, inbound.ID()})
	}
	// Rows in a fixed order: concurrent shares of one device into different rooms upsert overlapping sessions,
	// and two transactions locking the same rows in different orders deadlock.
	ids := make([]id.SessionID, 0, len(b.dirty))
	for sid := range b.dirty {
		ids = append(ids, sid)
	}
	slices.Sort(ids)
	sessions := make([]any, 0, len(b.dirty)*7)
	for _, sid := range ids {
		p := b.dirty[sid]
		sessions = append(sessions, s.AccountID, sid, p.senderKey, p.pickle, p.created, p.lastEncrypted, p.lastDecrypt)
	}
	var inboundArgs []any
	if inbound != nil {
		var err error
		if inboundArgs, err = inboundSessionArgs(s.AccountID, s.PickleKey, inbound); err != nil {
			return fmt.Errorf("failed to store the inbound copy of the session: %w", err)
		}
	}
	if s.DB.Dialect == dbutil.Postgres && len(ids) > 0 && len(ids) <= shareChunkRows && len(recipients) > 0 && len(recipients) <= shareChunkRows {
		// One statement, as atomic as the transaction below, without its BEGIN and COMMIT: a share's usual size.
		args := append(sessions, inboundArgs...)
		for _, r := range recipients {
			args = append(args, r.userID, r.identityKey, sessionID)
		}
		if _, err := s.DB.Exec(ctx, sqlSaveShare(len(ids), len(recipients), inbound != nil), args...); err != nil {
			return fmt.Errorf("failed to save Olm sessions and session recipients: %w", err)
		}
		return nil
	}
	return s.DB.DoTxn(ctx, nil, func(ctx context.Context) error {
		if inbound != nil {
			if _, err := s.DB.Exec(ctx, sqlPutInboundSession(1), inboundArgs...); err != nil {
				return fmt.Errorf("failed to store the inbound copy of the session: %w", err)
			}
		}
		for start := 0; start < len(sessions); start += shareChunkRows * 7 {
			chunk := sessions[start:min(start+shareChunkRows*7, len(sessions))]
			if _, err := s.DB.Exec(ctx, sqlSaveOlmSessions(len(chunk)/7), chunk...); err != nil {
				return fmt.Errorf("failed to save Olm sessions: %w", err)
			}
		}
		for start := 0; start < len(recipients); start += shareChunkRows {
			chunk := recipients[start:min(start+shareChunkRows, len(recipients))]
			args := make([]any, 0, len(chunk)*3)
			for _, r := range chunk {
				args = append(args, r.userID, r.identityKey, sessionID)
			}
			if _, err := s.DB.Exec(ctx, sqlSaveSessionShared(len(chunk)), args...); err != nil {
				return fmt.Errorf("failed to record session recipients: %w", err)
			}
		}
		return nil
	})
}

// recipient is a device entitled to a Megolm session.
type recipient struct {
	userID      id.UserID
	identityKey id.IdentityKey
}

// placeholders returns rows groups of width numbered parameters from first: "($1,$2),($3,$4)". With width 1 it
// returns a plain list "$1,$2".
func placeholders(first, rows, width int) string {
	var sb strings.Builder
	n := first
	for r := 0; r < rows; r++ {
		if r > 0 {
			sb.WriteByte(',')
		}
		if width > 1 {
			sb.WriteByte('(')
		}
		for c := 0; c < width; c++ {
			if c > 0 {
				sb.WriteByte(',')
			}
			fmt.Fprintf(&sb, "$%d", n)
			n++
		}
		if width > 1 {
			sb.WriteByte(')')
		}
	}
	return sb.String()
}

// sendToDeviceChunked sends req in requests of at most toDeviceChunk devices. It returns the number of requests.
func sendToDeviceChunked(ctx context.Context, cli *mautrix.Client, evtType event.Type, req *mautrix.ReqSendToDevice) (int, error) {
	requests := 0
	part := &mautrix.ReqSendToDevice{Messages: make(map[id.UserID]map[id.DeviceID]*event.Content)}
	n := 0
	flush := func() error {
		if n == 0 {
			return nil
		}
		if _, err := cli.SendToDevice(ctx, evtType, part); err != nil {
			return err
		}
		requests++
		part = &mautrix.ReqSendToDevice{Messages: make(map[id.UserID]map[id.DeviceID]*event.Content)}
		n = 0
		return nil
	}
	for userID, devs := range req.Messages {
		for deviceID, content := range devs {
			addMessage(part, userID, deviceID, content)
			if n++; n >= toDeviceChunk {
				if err := flush(); err != nil {
					return requests, err
				}
			}
		}
	}
	return requests, flush()
}

// loadDevices reads the stored devices of users in a few queries: users whose device list ferry does not track
// yet are left out (the caller fetches them).
func loadDevices(ctx context.Context, db *dbutil.Database, users []id.UserID) (map[id.UserID]map[id.DeviceID]*id.Device, error) {
	out, _, err := loadDeviceLists(ctx, db, users, time.Now())
	return out, err
}

// loadDeviceLists is loadDevices that also tells which of the tracked lists are to be fetched again at now
// (outdated, and not waiting out the backoff of failed fetches), from the same rows.
func loadDeviceLists(ctx context.Context, db *dbutil.Database, users []id.UserID, now time.Time) (map[id.UserID]map[id.DeviceID]*id.Device, map[id.UserID]bool, error) {
	out := make(map[id.UserID]map[id.DeviceID]*id.Device, len(users))
	stale := make(map[id.UserID]bool)
	for start := 0; start < len(users); start += shareChunkRows * 5 {
		chunk := users[start:min(start+shareChunkRows*5, len(users))]
		args := make([]any, len(chunk))
		for i, u := range chunk {
			args[i] = u
		}
		// The tracking and the devices in one read: a row per device of a tracked user, or one without a device.
		rows, err := db.Query(ctx, sqlDeviceListsOf(db.Dialect, len(chunk)), append([]any{now.Unix()}, args...)...)
		if err != nil {
			return nil, nil, fmt.Errorf("failed to read tracked users and their devices: %w", err)
		}
		for rows.Next() {
			var u id.UserID
			var outdated bool
			var deviceID, identityKey, signingKey, name sql.NullString
			var trust sql.NullInt64
			if err = rows.Scan(&u, &outdated, &deviceID, &identityKey, &signingKey, &trust, &name); err != nil {
				_ = rows.Close()
				return nil, nil, err
			}
			if out[u] == nil {
				out[u] = make(map[id.DeviceID]*id.Device)
			}
			if outdated {
				stale[u] = true
			}
			if deviceID.Valid {
				out[u][id.DeviceID(deviceID.String)] = &id.Device{UserID: u, DeviceID: id.DeviceID(deviceID.String),
					IdentityKey: id.Curve25519(identityKey.String), SigningKey: id.Ed25519(signingKey.String),
					Trust: id.TrustState(trust.Int64), Name: name.String}
			}
		}
		if err = closeRows(rows); err != nil {
			return nil, nil, err
		}
	}
	return out, stale, nil
}

// prefetch loads the cross-signing keys of users and the signatures over them (by themselves or by the bot) in a
// few queries, so that resolving the trust of their devices needs no further query. It does nothing when the
// store is not SQL.
func (r *trustResolver) prefetch(ctx context.Context, users []id.UserID) error {
	store, ok := r.store.(*crypto.SQLCryptoStore)
	if !ok || len(users) == 0 {
		return nil
	}
	keys := make(map[id.UserID]map[id.CrossSigningUsage]id.CrossSigningKey, len(users))
	signed := make(map[signature]bool)
	// Users the cache knows whole (their keys, and every signature on them) are not read again.
	unknown := users
	if r.cache != nil {
		unknown = r.cache.knownTrust(users, keys, signed)
	}
	for _, u := range unknown {
		keys[u] = make(map[id.CrossSigningUsage]id.CrossSigningKey)
	}
	if len(unknown) == 0 {
		delete(keys, r.bot)
		r.prefetched, r.signed = keys, signed
		return nil
	}
	err := readTrust(ctx, store.DB, r.bot, unknown, func(u id.UserID, usage id.CrossSigningUsage, key, first id.Ed25519) {
		keys[u][usage] = id.CrossSigningKey{Key: key, First: first}
	}, func(s signature) { signed[s] = true })
	if err != nil {
		return err
	}
	// The bot's own keys are never prefetched: it is not a recipient.
	delete(keys, r.bot)
	r.prefetched, r.signed = keys, signed
	return nil
}

// readTrust reads the cross-signing keys of users other than self, and the signatures on them by their owners
// or by self, in one query per chunk of users (sqlTrustOf), handing each key to key and each signature to sig.
func readTrust(ctx context.Context, db *dbutil.Database, self id.UserID, users []id.UserID,
	key func(u id.UserID, usage id.CrossSigningUsage, key, first id.Ed25519), sig func(s signature)) error {
	for start := 0; start < len(users); start += shareChunkRows * 5 {
		chunk := users[start:min(start+shareChunkRows*5, len(users))]
		args := make([]any, 0, len(chunk)+1)
		args = append(args, self)
		for _, u := range chunk {
			args = append(args, u)
		}
		rows, err := db.Query(ctx, sqlTrustOf(len(chunk)), args...)
		if err != nil {
			return fmt.Errorf("failed to read cross-signing keys and signatures: %w", err)
		}
		for rows.Next() {
			var kind, a, b, c, d string
			if err = rows.Scan(&kind, &a, &b, &c, &d); err != nil {
				_ = rows.Close()
				return err
			}
			if kind == "k" {
				key(id.UserID(a), id.CrossSigningUsage(b), id.Ed25519(c), id.Ed25519(d))
			} else {
				sig(signature{signedUser: id.UserID(a), signedKey: id.Ed25519(b), signerUser: id.UserID(c), signerKey: id.Ed25519(d)})
			}
		}
		if err = closeRows(rows); err != nil {
			return err
		}
	}
	return nil
}

func closeRows(rows dbutil.Rows) error {
	if err := rows.Err(); err != nil {
		_ = rows.Close()
		return err
	}
	return rows.Close()
}
