package crypto

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// A member's room key reaches ferry in an Olm-encrypted to-device message, and mautrix handles one in separate
// writes: it records the message's hash (its duplicate check), saves the Olm session that decrypting advanced
// (for a new session, also the account without the one-time key it used), and only then stores the Megolm
// session the message carried. A crash between those writes, or a database error in one of them, lost the key
// for good: the homeserver delivers the message again (ferry had not acknowledged it), but mautrix ignored it as
// a duplicate, or could no longer decrypt it with the advanced session. Clients give a key again only to their
// own user's devices, so every message of that session stayed unreadable to ferry.
//
// ferry therefore handles each encrypted to-device message of the bot as one unit (Machine.handleBotToDevice):
// the Olm writes (the hash, sessions, the account) wait in the unit while mautrix handles the message and are
// saved together, in one transaction, after what the message carried is stored. A crash before that transaction
// leaves the Olm state as it was before the message, so the redelivery decrypts again (storing a Megolm session
// a second time changes nothing); a crash after it makes the redelivery a duplicate with nothing lost. A database
// error while the unit runs aborts it: the Olm session and account that decrypting advanced in memory are set
// back to what the database holds, and the caller has the message delivered again.

type toDeviceUnitKey struct{}

// toDeviceUnit is what mautrix's handling of one to-device message wrote to the Olm state, held until the end.
type toDeviceUnit struct {
	mu      sync.Mutex
	err     error // the first error of the store while the unit ran
	hashes  map[[32]byte]time.Time
	added   map[id.SessionID]pendingOlm
	updated map[id.SessionID]pendingOlm
	account *crypto.OlmAccount
}

type pendingOlm struct {
	key  id.SenderKey
	sess *crypto.OlmSession
}

// unitFrom returns the unit ctx belongs to, or nil outside one.
func unitFrom(ctx context.Context) *toDeviceUnit {
	u, _ := ctx.Value(toDeviceUnitKey{}).(*toDeviceUnit)
	return u
}

// noteStoreErr records err as the failure of the unit ctx belongs to (the first one counts) and returns it. The
// unit is looked up only for an error: the store's reads on the decrypt path of every message pass here.
func noteStoreErr(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	if u := unitFrom(ctx); u != nil {
		u.mu.Lock()
		if u.err == nil {
			u.err = err
		}
		u.mu.Unlock()
	}
	return err
}

// ErrToDeviceAborted wraps the database error that stopped the handling of a to-device message: nothing of it was
// kept, and the message must be delivered again.
var ErrToDeviceAborted = errors.New("a to-device message could not be handled")

// ErrToDeviceDropped wraps the error that kept the Olm state of a handled to-device message from being saved when
// retrying cannot help (a constraint the write breaks): the state in memory is set back to the stored one, and the
// message must be acknowledged anyway, or it would hold every later one up for good.
var ErrToDeviceDropped = errors.New("the Olm state of a to-device message could not be saved")

// handleUnit runs handle (mautrix handling one to-device message) as a unit and then saves its Olm writes. On a
// database error that transient says may pass, it sets the Olm state in memory back to the stored one and returns
// an error wrapping ErrToDeviceAborted; other errors of the store (a corrupt row would fail every try) are logged
// by mautrix, as before, and the rest is saved. When saving fails for good, it returns ErrToDeviceDropped.
func (s *olmStore) handleUnit(ctx context.Context, transient func(error) bool, handle func(ctx context.Context)) error {
	u := &toDeviceUnit{hashes: make(map[[32]byte]time.Time), added: make(map[id.SessionID]pendingOlm),
		updated: make(map[id.SessionID]pendingOlm)}
	handle(context.WithValue(ctx, toDeviceUnitKey{}, u))
	u.mu.Lock()
	defer u.mu.Unlock()
	// An error of a context that ended (ferry stopping, a request given up) passes too: the message is delivered
	// again to the next run.
	passing := func(err error) bool {
		return transient(err) || ctx.Err() != nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
	}
	err := u.err
	if err == nil || !passing(err) {
		if err = s.saveUnit(ctx, u); err == nil {
			return nil
		}
	}
	s.revertUnit(ctx, transient, u)
	if !passing(err) {
		return fmt.Errorf("%w: %w", ErrToDeviceDropped, err)
	}
	return fmt.Errorf("%w: %w", ErrToDeviceAborted, err)
}

// saveUnit writes what the unit held back, in one transaction.
func (s *olmStore) saveUnit(ctx context.Context, u *toDeviceUnit) error {
	if len(u.hashes)+len(u.added)+len(u.updated) == 0 && u.account == nil {
		return nil
	}
	err := s.DB.DoTxn(ctx, nil, func(ctx context.Context) error {
		for _, p := range u.added {
			if err := s.SQLCryptoStore.AddSession(ctx, p.key, p.sess); err != nil {
				return err
			}
		}
		for _, p := range u.updated {
			if err := s.SQLCryptoStore.UpdateSession(ctx, p.key, p.sess); err != nil {
				return err
			}
		}
		if u.account != nil {
			if err := s.SQLCryptoStore.PutAccount(ctx, u.account); err != nil {
				return err
			}
		}
		for h, at := range u.hashes {
			if err := s.SQLCryptoStore.PutOlmHash(ctx, h, at); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("failed to save the Olm state of a to-device message: %w", err)
	}
	for _, p := range u.added {
		s.adopt(p.sess)
	}
	return nil
}

// revertUnitWait bounds how long revertUnit keeps reading the stored Olm state while the database is away.
const revertUnitWait = 2 * time.Minute

// revertUnit sets the Olm sessions and the account the unit advanced back to their stored state, in place, so
// that the message's redelivery decrypts as the first delivery did. A session the unit created is forgotten.
//
// It must be in place: mautrix's SQL store keeps every Olm session it loaded in a cache of its own and hands out
// those objects again, so a session forgotten here would still be the advanced one to mautrix. When the database
// is away (the usual reason a unit aborts), the stored state is read again, with backoff, until it answers, for up
// to revertUnitWait or until ctx ends (ferry stopping: what is in memory goes with it). Only a session whose stored
// state is gone or unreadable is dropped from ferry's use instead.
func (s *olmStore) revertUnit(ctx context.Context, transient func(error) bool, u *toDeviceUnit) {
	readCtx := context.WithoutCancel(ctx)
	deadline := time.Now().Add(revertUnitWait)
	stored := func(query string, args ...any) ([]byte, error) {
		backoff := 100 * time.Millisecond
		for {
			var pickle []byte
			err := s.DB.QueryRow(readCtx, query, args...).Scan(&pickle)
			if err == nil || errors.Is(err, sql.ErrNoRows) || !transient(err) || time.Now().Add(backoff).After(deadline) {
				return pickle, err
			}
			select {
			case <-ctx.Done():
				return nil, err
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 5*time.Second)
		}
	}
	s.mu.Lock()
	for id := range u.added {
		delete(s.canon, id)
	}
	s.mu.Unlock()
	for sid, p := range u.updated {
		pickle, err := stored(sqlOlmSessionPickle, s.AccountID, sid)
		if err == nil {
			err = restoreGoolmSession(p.sess.Internal, pickle, s.PickleKey)
		}
		if err != nil {
			// Left as it is, the session cannot decrypt the redelivery; it is dropped from use instead.
			s.mu.Lock()
			delete(s.canon, sid)
			s.mu.Unlock()
		}
	}
	if u.account != nil {
		if pickle, err := stored(sqlAccountPickle, s.AccountID); err == nil {
			_ = restoreGoolmAccount(u.account.Internal, pickle, s.PickleKey)
		}
	}
}

// The Olm writes mautrix makes while handling a to-device message: inside a unit they wait for its end.

func (s *olmStore) PutOlmHash(ctx context.Context, hash [32]byte, at time.Time) error {
	if u := unitFrom(ctx); u != nil {
		u.mu.Lock()
		u.hashes[hash] = at
		u.mu.Unlock()
		return nil
	}
	return s.SQLCryptoStore.PutOlmHash(ctx, hash, at)
}

func (s *olmStore) PutAccount(ctx context.Context, account *crypto.OlmAccount) error {
	if u := unitFrom(ctx); u != nil {
		u.mu.Lock()
		u.account = account
		u.mu.Unlock()
		return nil
	}
	dev, held := s.ownDevice.Swap(nil), s.withAccount.Swap(nil)
	if dev == nil && account.Shared && s.holdUploaded.CompareAndSwap(true, false) {
		// The account as its upload left it: written by crossSign with the identity's signatures, or by
		// loadGhost after it (writeUploaded). Until then a restart finds it not uploaded and uploads the same
		// keys again, as after a stop between the upload and a write of its own.
		rows, err := s.accountRow(account)
		if err != nil {
			return err
		}
		s.Account = account
		s.uploaded.Store(rows)
		return nil
	}
	if dev == nil {
		// (Held secrets go only with the own device; otherwise writeHeld stores them.)
		if held != nil {
			s.withAccount.CompareAndSwap(nil, held)
		}
		err := s.SQLCryptoStore.PutAccount(ctx, account)
		if err == nil {
			s.unstored.Store(false)
		}
		return err
	}
	// The new account's first write, with its own device (held back by PutDevice) and the held secrets, in one
	// statement.
	defer s.c.trustChanged(s.owner)
	row, err := s.accountRow(account)
	if err != nil {
		return err
	}
	query, args := sqlPutAccountWithDevice, append([]any{s.owner, dev.DeviceID, dev.IdentityKey, dev.SigningKey, dev.Trust, dev.Deleted, dev.Name}, row.Args...)
	if held != nil {
		query, args = sqlPutAccountWithDeviceAnd(held.rows), append(args, held.rows.Args...)
	}
	if _, err = s.DB.Exec(ctx, query, args...); err != nil {
		return err
	}
	s.Account = account
	s.unstored.Store(false)
	if held != nil {
		held.stored()
	}
	return nil
}

// accountRow is account's row as PutAccount writes it (sqlPutAccountWithDevice takes its values as its $8..$13).
func (s *olmStore) accountRow(account *crypto.OlmAccount) (*RowInsert, error) {
	pickled, err := account.Internal.Pickle(s.PickleKey)
	if err != nil {
		return nil, err
	}
	return &RowInsert{Head: sqlPutAccountHead, Tail: sqlPutAccountTail, Width: sqlPutAccountRowWidth,
		Args: []any{s.DeviceID, account.Shared, s.SyncToken, pickled, s.AccountID, account.KeyBackupVersion}}, nil
}

// writeUploaded writes the account PutAccount held back (holdUploaded), if it still holds it.
func (s *olmStore) writeUploaded(ctx context.Context) error {
	rows := s.uploaded.Swap(nil)
	if rows == nil {
		return nil
	}
	if _, err := s.DB.Exec(ctx, rows.statement(1), rows.Args...); err != nil {
		s.uploaded.CompareAndSwap(nil, rows)
		return fmt.Errorf("failed to store the ghost's account after its upload: %w", err)
	}
	return nil
}

// writeHeld stores the secrets held for the account's first write (holdWithAccount) when that write did not
// carry them.
func (s *olmStore) writeHeld(ctx context.Context) error {
	held := s.withAccount.Swap(nil)
	if held == nil {
		return nil
	}
	if _, err := s.DB.Exec(ctx, held.rows.statement(1), held.rows.Args...); err != nil {
		return fmt.Errorf("failed to store the ghost's secrets: %w", err)
	}
	held.stored()
	return nil
}

// PutDevice holds the account's own device back while the account is new and unstored: mautrix's ShareKeys
// stores that device and then the account, one after the other, before their first upload, and PutAccount
// writes both in one statement (Postgres; SQLite has no data-modifying WITH). Every other device write goes to
// the store at once.
func (s *olmStore) PutDevice(ctx context.Context, userID id.UserID, device *id.Device) error {
	if s.DB.Dialect == dbutil.Postgres && userID == s.owner && device.DeviceID == s.DeviceID && s.unstored.Load() &&
		unitFrom(ctx) == nil && trustBatchFrom(ctx) == nil {
		s.ownDevice.Store(device)
		return nil
	}
	return s.cachedStore.PutDevice(ctx, userID, device)
}

// The reads and Megolm writes of that handling: inside a unit, their errors abort it.

func (s *olmStore) GetOlmHash(ctx context.Context, hash [32]byte) (time.Time, error) {
	at, err := s.SQLCryptoStore.GetOlmHash(ctx, hash)
	return at, noteStoreErr(ctx, err)
}

func (s *olmStore) FindDeviceByKey(ctx context.Context, userID id.UserID, key id.IdentityKey) (*id.Device, error) {
	dev, err := s.cachedStore.FindDeviceByKey(ctx, userID, key)
	return dev, noteStoreErr(ctx, err)
}

func (s *olmStore) GetGroupSession(ctx context.Context, roomID id.RoomID, sessionID id.SessionID) (*crypto.InboundGroupSession, error) {
	sess, err := s.cachedStore.GetGroupSession(ctx, roomID, sessionID)
	return sess, noteStoreErr(ctx, err)
}

func (s *olmStore) PutGroupSession(ctx context.Context, sess *crypto.InboundGroupSession) error {
	return noteStoreErr(ctx, s.cachedStore.PutGroupSession(ctx, sess))
}

func (s *olmStore) PutWithheldGroupSession(ctx context.Context, content event.RoomKeyWithheldEventContent) error {
	return noteStoreErr(ctx, s.cachedStore.PutWithheldGroupSession(ctx, content))
}

// handleBotToDevice hands one parsed to-device event addressed to the bot's device to its OlmMachine. An
// encrypted one is handled as a unit (see above), one at a time: it returns an error wrapping
// ErrToDeviceAborted when the database failed meanwhile, and the caller must then not acknowledge the message. A
// message whose Olm state cannot be saved for good is logged and acknowledged.
func (m *Machine) handleBotToDevice(ctx context.Context, evt *event.Event) error {
	if _, ok := evt.Content.Parsed.(*event.EncryptedEventContent); !ok {
		m.bot.mach.HandleToDeviceEvent(ctx, evt)
		return nil
	}
	m.toDeviceUnits.Lock()
	defer m.toDeviceUnits.Unlock()
	transient := m.Transient
	if transient == nil {
		transient = func(error) bool { return true }
	}
	err := m.bot.olm.handleUnit(ctx, transient, func(ctx context.Context) { m.bot.mach.HandleToDeviceEvent(ctx, evt) })
	if errors.Is(err, ErrToDeviceDropped) {
		m.log.Error().Err(err).Stringer("sender", evt.Sender).Msg("Dropped a to-device message whose Olm state could not be saved")
		return nil
	}
	return err
}
