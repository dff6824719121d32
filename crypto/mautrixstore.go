package crypto

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/crypto"
	goolmaccount "maunium.net/go/mautrix/crypto/goolm/account"
	"maunium.net/go/mautrix/crypto/goolm/message"
	"maunium.net/go/mautrix/crypto/goolm/session"
	"maunium.net/go/mautrix/crypto/olm"
	cryptoupgrade "maunium.net/go/mautrix/crypto/sql_store_upgrade"
	"maunium.net/go/mautrix/id"
)

// This file is ferry's one door into what mautrix's crypto package owns beyond its public methods: the tables of
// its SQL crypto store (schema knownCryptoSchema) and goolm's Megolm internals. ferry batches and prunes where
// the store's own methods work row by row (key shares to a thousand devices, destroying expired keys); every
// statement and every reach into goolm is here, so that a mautrix upgrade that changes what they rely on fails in
// one place: at start-up (checkCryptoSchema) and in TestMautrixStoreStatements / TestGoolmInternals, loudly.

// StoreVersionTable is the crypto store's schema version table (dbutil's: version, compat).
const StoreVersionTable = "crypto_version"

// sqlStoreVersion reads the crypto store's schema version.
const sqlStoreVersion = `SELECT version FROM ` + StoreVersionTable

// knownCryptoSchema is the crypto store schema version (mautrix v0.32.0) whose tables the statements below
// were written for.
const knownCryptoSchema = 22

// ErrUnknownCryptoSchema means the crypto store's schema is not the one ferry's statements were written for.
var ErrUnknownCryptoSchema = errors.New("unknown crypto store schema")

// checkCryptoSchema refuses a crypto store whose schema version is not knownCryptoSchema, and a mautrix whose
// store upgrades to another: ferry would run its statements against tables it does not know. Call it after the
// store's upgrade.
func checkCryptoSchema(ctx context.Context, db *dbutil.Database) error {
	if latest := len(cryptoupgrade.Table); latest != knownCryptoSchema {
		return fmt.Errorf("%w: this build's mautrix upgrades the crypto store to version %d, ferry knows version %d (update ferry's crypto store statements before upgrading mautrix)",
			ErrUnknownCryptoSchema, latest, knownCryptoSchema)
	}
	var version int
	if err := db.QueryRow(ctx, sqlStoreVersion).Scan(&version); err != nil {
		return fmt.Errorf("failed to read the crypto store's schema version: %w", err)
	} else if version != knownCryptoSchema {
		return fmt.Errorf("%w: the database's crypto store is at version %d, ferry knows version %d", ErrUnknownCryptoSchema, version, knownCryptoSchema)
	}
	return nil
}

// Statements on the crypto store's tables. Batched statements are built by the functions below them.
const (
	// Accounts (crypto_account): the ghosts with a device, and forgetting the bot's vanished device.
	sqlGhostAccounts      = `SELECT account_id FROM crypto_account WHERE account_id<>$1 ORDER BY account_id`
	sqlDeleteAccount      = `DELETE FROM crypto_account WHERE account_id=$1`
	sqlDeleteOlmSessions  = `DELETE FROM crypto_olm_session WHERE account_id=$1`
	sqlDeleteAccountOut   = `DELETE FROM crypto_megolm_outbound_session WHERE account_id=$1`
	sqlDeleteAllOutbound  = `DELETE FROM crypto_megolm_outbound_session`
	sqlDeleteRoomOutbound = `DELETE FROM crypto_megolm_outbound_session WHERE room_id=$1`
	sqlDeleteOutbound     = `DELETE FROM crypto_megolm_outbound_session WHERE room_id=$1 AND session_id=$2`

	// The stored Olm state a to-device message that could not be handled is set back to (todevice.go).
	sqlAccountPickle    = `SELECT account FROM crypto_account WHERE account_id=$1`
	sqlOlmSessionPickle = `SELECT session FROM crypto_olm_session WHERE account_id=$1 AND session_id=$2`

	// Inbound sessions (crypto_megolm_inbound_session), under every account that holds a copy.
	sqlDeleteInbound        = `DELETE FROM crypto_megolm_inbound_session WHERE room_id=$1 AND session_id=$2`
	sqlDeleteGhostInbound   = `DELETE FROM crypto_megolm_inbound_session WHERE room_id=$1 AND session_id=$2 AND account_id<>$3`
	sqlInboundCopyAccounts  = `SELECT account_id FROM crypto_megolm_inbound_session WHERE room_id=$1 AND session_id=$2`
	sqlInboundKeyAccounts   = sqlInboundCopyAccounts + ` AND session IS NOT NULL`
	sqlDeleteSessionShared  = `DELETE FROM crypto_megolm_outbound_session_shared WHERE session_id=$1`
	sqlIsSessionRecipient   = `SELECT EXISTS(SELECT 1 FROM crypto_megolm_outbound_session_shared WHERE user_id=$1 AND session_id=$2)`
	sqlAllTrackedUsers      = `SELECT user_id FROM crypto_tracked_user`
	sqlReplayIndexOfSession = `SELECT "index", event_id, timestamp FROM crypto_message_index WHERE session_id=$1`
)

// sqlDrainState reads a device's sync token and one of its secrets (the access token, pickled), for draining an
// idle ghost's device.
const sqlDrainState = `SELECT a.sync_token, s.secret FROM crypto_account a
	LEFT JOIN crypto_secrets s ON s.account_id=a.account_id AND s.name=$2 WHERE a.account_id=$1`

// An account's secrets (crypto_secrets, pickled with the pickle key as the store's PutSecret writes them), read
// all at once and written several in one statement (secretCache).
const (
	// sqlAccountDeviceAndSecrets: the device ID of the account's Olm account (the store's FindDeviceID; a row
	// whose name is NULL) and the account's secrets, in one query.
	sqlAccountDeviceAndSecrets = `SELECT device_id, NULL, NULL FROM crypto_account WHERE account_id=$1
		UNION ALL SELECT NULL, name, secret FROM crypto_secrets WHERE account_id=$1`
	sqlPutSecretsHead     = `INSERT INTO crypto_secrets (account_id, name, secret) VALUES `
	sqlPutSecretsTail     = ` ON CONFLICT (account_id, name) DO UPDATE SET secret=excluded.secret`
	sqlPutSecretsRowWidth = 3
)

// Cross-signing signatures written several in one statement (trustBatch), as the store's PutSignature
// writes each.
const (
	sqlPutSignaturesHead     = `INSERT INTO crypto_cross_signing_signatures (signed_user_id, signed_key, signer_user_id, signer_key, signature) VALUES `
	sqlPutSignaturesTail     = ` ON CONFLICT (signed_user_id, signed_key, signer_user_id, signer_key) DO UPDATE SET signature=excluded.signature`
	sqlPutSignaturesRowWidth = 5
)

// sqlPutSignatures upserts n signatures (signed_user_id, signed_key, signer_user_id, signer_key, signature each).
func sqlPutSignatures(n int) string {
	return sqlPutSignaturesHead + placeholders(1, n, sqlPutSignaturesRowWidth) + sqlPutSignaturesTail
}

// Cross-signing keys written several in one statement (trustBatch's, with its own placeholders), as the store's
// PutCrossSigningKey writes each: a new row's first seen key is its key, an existing row keeps its own.
const (
	sqlPutCrossSigningKeysHead = `INSERT INTO crypto_cross_signing_keys (user_id, usage, key, first_seen_key) VALUES `
	sqlPutCrossSigningKeysTail = ` ON CONFLICT (user_id, usage) DO UPDATE SET key=excluded.key`
)

// StoredCopiesOf lists the crypto store accounts (the bot's, ghosts') that hold key material of a Megolm session
// (withheld sessions have none). ferry-keycheck uses it to tell whether ferry's database can decrypt an event.
func StoredCopiesOf(ctx context.Context, db *dbutil.Database, roomID id.RoomID, sessionID id.SessionID) ([]string, error) {
	rows, err := db.Query(ctx, sqlInboundKeyAccounts, roomID, sessionID)
	return dbutil.NewRowIterWithError(rows, dbutil.ScanSingleColumn[string], err).AsList()
}

// Statements with a list of parameters: each is its head, placeholders (see the functions below) and its tail.
const (
	// The users' tracked device lists, a row per device not deleted (a tracked user without any: one row with NULL
	// device columns), with whether a share fetches the list again: mautrix's rule for outdated lists
	// (SQLCryptoStore.GetOutdatedTrackedUsers: after 5 failed fetches, wait the cube of the failures in seconds, at
	// most 3 hours), for these users only. $1 is the time now (Unix seconds); %s is least (Postgres) or min (SQLite).
	sqlDeviceListsOfHead = `SELECT t.user_id, COALESCE(t.devices_outdated AND (t.error_count IS NULL OR t.error_count < 5
		OR t.last_attempt + %s(t.error_count*t.error_count*t.error_count, 10800) < $1), false),
		d.device_id, d.identity_key, d.signing_key, d.trust, d.name
		FROM crypto_tracked_user t LEFT JOIN crypto_device d ON d.user_id=t.user_id AND d.deleted=false
		WHERE t.user_id IN (`
	sqlCrossSigningKeysOfHead = `SELECT user_id, usage, key, first_seen_key FROM crypto_cross_signing_keys
		WHERE user_id IN (`
	sqlCrossSigningKeysOfTail = `) AND user_id<>$1`
	sqlSelfSignaturesOfHead   = `SELECT signed_user_id, signed_key, signer_user_id, signer_key FROM crypto_cross_signing_signatures
		WHERE signed_user_id IN (`
	sqlSelfSignaturesOfTail = `) AND (signer_user_id=signed_user_id OR signer_user_id=$1)`
	sqlOlmSessionsWithHead  = `SELECT sender_key, session_id, session, created_at, last_encrypted, last_decrypted FROM crypto_olm_session
		WHERE account_id=$1 AND sender_key IN (`
	sqlInListTail = `)`

	// Olm sessions: 7 parameters a row. A row is only overwritten by a state at least as new (last_encrypted), so
	// a slower concurrent save never puts back an older ratchet.
	sqlSaveOlmSessionsHead = `INSERT INTO crypto_olm_session (account_id, session_id, sender_key, session, created_at, last_encrypted, last_decrypted)
		VALUES `
	sqlSaveOlmSessionsTail = `
		ON CONFLICT (account_id, session_id) DO UPDATE SET session=excluded.session,
			last_encrypted=excluded.last_encrypted, last_decrypted=excluded.last_decrypted
		WHERE crypto_olm_session.last_encrypted <= excluded.last_encrypted`
	sqlSaveSessionSharedHead = `INSERT INTO crypto_megolm_outbound_session_shared (user_id, identity_key, session_id) VALUES `
	sqlSaveSessionSharedTail = ` ON CONFLICT DO NOTHING`

	// The replay index: a Megolm message index belongs to the first event that used it; writing an entry again
	// changes nothing.
	sqlSaveReplayIndexHead  = `INSERT INTO crypto_message_index (session_id, "index", event_id, timestamp) VALUES `
	sqlSaveReplayIndexWidth = 4
	sqlSaveReplayIndexTail  = ` ON CONFLICT (session_id, "index") DO NOTHING`
)

// sqlDeviceListsOf reads the tracked device lists of n users ($2..$n+1), with whether each is to be fetched again
// now ($1), in dialect's SQL.
func sqlDeviceListsOf(dialect dbutil.Dialect, n int) string {
	least := "least"
	if dialect == dbutil.SQLite {
		least = "min"
	}
	return fmt.Sprintf(sqlDeviceListsOfHead, least) + placeholders(2, n, 1) + sqlInListTail
}

// sqlCrossSigningKeysOf reads the cross-signing keys of n users ($2..$n+1), other than the one in $1.
func sqlCrossSigningKeysOf(n int) string {
	return sqlCrossSigningKeysOfHead + placeholders(2, n, 1) + sqlCrossSigningKeysOfTail
}

// sqlSelfSignaturesOf reads the signatures on n users' keys ($2..$n+1) made by themselves or by the user in $1.
func sqlSelfSignaturesOf(n int) string {
	return sqlSelfSignaturesOfHead + placeholders(2, n, 1) + sqlSelfSignaturesOfTail
}

// sqlDevicesAndKeysOf reads what the store's GetDevices and GetCrossSigningKeys read of a user ($1), each row led
// by its kind: 't' when the user is tracked, 'd' a device not deleted (device ID, identity and signing keys,
// trust, deleted, name), 'k' a cross-signing key (usage, key, first seen key); and for a user not tracked (one
// about to be fetched, usually with nothing stored) 's', every signature on their keys (signed key, signer,
// signer's key).
const sqlDevicesAndKeysOf = `SELECT 't', '', '', '', 0, false, '' FROM crypto_tracked_user WHERE user_id=$1
	UNION ALL SELECT 'd', device_id, identity_key, signing_key, trust, deleted, name FROM crypto_device WHERE user_id=$1 AND deleted=false
	UNION ALL SELECT 'k', usage, key, first_seen_key, 0, false, '' FROM crypto_cross_signing_keys WHERE user_id=$1
	UNION ALL SELECT 's', signed_key, signer_user_id, signer_key, 0, false, '' FROM crypto_cross_signing_signatures
		WHERE signed_user_id=$1 AND NOT EXISTS (SELECT 1 FROM crypto_tracked_user WHERE user_id=$1)`

// sqlTrustOf is sqlCrossSigningKeysOf and sqlSelfSignaturesOf in one query, each row led by its kind: 'k' for a
// key, 's' for a signature.
func sqlTrustOf(n int) string {
	return `SELECT 'k', user_id, usage, key, first_seen_key FROM (` + sqlCrossSigningKeysOf(n) + `) AS k
		UNION ALL SELECT 's', signed_user_id, signed_key, signer_user_id, signer_key FROM (` + sqlSelfSignaturesOf(n) + `) AS s`
}

// sqlOlmSessionsWith reads an account's ($1) Olm sessions with n sender keys ($2..$n+1).
func sqlOlmSessionsWith(n int) string {
	return sqlOlmSessionsWithHead + placeholders(2, n, 1) + sqlInListTail
}

// sqlSaveOlmSessions upserts n Olm sessions (7 parameters each).
func sqlSaveOlmSessions(n int) string {
	return sqlSaveOlmSessionsHead + placeholders(1, n, 7) + sqlSaveOlmSessionsTail
}

// sqlSaveSessionShared records n recipients of a Megolm session (user_id, identity_key, session_id each).
func sqlSaveSessionShared(n int) string {
	return sqlSaveSessionSharedHead + placeholders(1, n, 3) + sqlSaveSessionSharedTail
}

// sqlSaveShare saves n Olm sessions and records m recipients of a Megolm session in one statement (Postgres):
// sqlSaveOlmSessions' parameters, then (withInbound) sqlPutInboundSession's, then sqlSaveSessionShared's.
func sqlSaveShare(n, m int, withInbound bool) string {
	next := 7*n + 1
	q := "WITH olm AS (" + sqlSaveOlmSessions(n) + ")"
	if withInbound {
		q += ", inbound AS (" + sqlPutInboundSession(next) + ")"
		next += sqlPutInboundSessionWidth
	}
	return q + " " + sqlSaveSessionSharedHead + placeholders(next, m, 3) + sqlSaveSessionSharedTail
}

// sqlPutInboundSession stores an inbound Megolm session as mautrix's store does (PutGroupSession, the same upsert),
// with its sqlPutInboundSessionWidth parameters (inboundSessionArgs) numbered from first.
func sqlPutInboundSession(first int) string {
	return `INSERT INTO crypto_megolm_inbound_session (
			session_id, sender_key, signing_key, room_id, session, forwarding_chains, shared_history,
			ratchet_safety, received_at, max_age, max_messages, is_scheduled, key_backup_version, key_source,
			source_user, account_id
		) VALUES ` + placeholders(first, 1, sqlPutInboundSessionWidth) + `
		ON CONFLICT (session_id, account_id) DO UPDATE
			SET withheld_code=NULL, withheld_reason=NULL, sender_key=excluded.sender_key, signing_key=excluded.signing_key,
				room_id=excluded.room_id, session=excluded.session, forwarding_chains=excluded.forwarding_chains,
				shared_history=excluded.shared_history, ratchet_safety=excluded.ratchet_safety, received_at=excluded.received_at,
				max_age=excluded.max_age, max_messages=excluded.max_messages, is_scheduled=excluded.is_scheduled,
				key_backup_version=excluded.key_backup_version, key_source=excluded.key_source, source_user=excluded.source_user`
}

const sqlPutInboundSessionWidth = 16

// sqlPutAccountWithDevice stores a new account's own device and the account, as mautrix's PutDevice and
// PutAccount do (the same upserts), in one statement (Postgres): the device's seven parameters, then the
// account's six.
const sqlPutAccountWithDevice = `WITH dev AS (` + sqlPutOwnDevice + `) ` + sqlPutOwnAccount

const (
	sqlPutOwnDevice = `INSERT INTO crypto_device (user_id, device_id, identity_key, signing_key, trust, deleted, name)
		VALUES ($1, $2, $3, $4, $5, $6, $7)
		ON CONFLICT (user_id, device_id) DO UPDATE
			SET identity_key=excluded.identity_key, deleted=excluded.deleted, trust=excluded.trust, name=excluded.name`
	sqlPutOwnAccount = sqlPutAccountHead + `($8, $9, $10, $11, $12, $13)` + sqlPutAccountTail
)

// The account's upsert as mautrix's PutAccount writes it, as a RowInsert's parts (accountRow).
const (
	sqlPutAccountHead     = `INSERT INTO crypto_account (device_id, shared, sync_token, account, account_id, key_backup_version) VALUES `
	sqlPutAccountTail     = ` ON CONFLICT (account_id) DO UPDATE SET shared=excluded.shared, sync_token=excluded.sync_token, account=excluded.account, account_id=excluded.account_id, key_backup_version=excluded.key_backup_version`
	sqlPutAccountRowWidth = 6
)

// sqlPutAccountWithDeviceAnd is sqlPutAccountWithDevice that also writes rows (their parameters after the
// account's).
func sqlPutAccountWithDeviceAnd(rows *RowInsert) string {
	return `WITH dev AS (` + sqlPutOwnDevice + `), also AS (` + rows.statement(14) + `) ` + sqlPutOwnAccount
}

// inboundSessionArgs are sqlPutInboundSession's parameters for sess in account, the values mautrix's
// PutGroupSession writes.
func inboundSessionArgs(account string, pickleKey []byte, sess *crypto.InboundGroupSession) ([]any, error) {
	pickle, err := sess.Internal.Pickle(pickleKey)
	if err != nil {
		return nil, err
	}
	ratchetSafety, err := json.Marshal(&sess.RatchetSafety)
	if err != nil {
		return nil, fmt.Errorf("failed to marshal ratchet safety info: %w", err)
	}
	var receivedAt *time.Time
	if !sess.ReceivedAt.IsZero() {
		receivedAt = &sess.ReceivedAt
	}
	return []any{sess.ID(), sess.SenderKey, sess.SigningKey, sess.RoomID, pickle, strings.Join(sess.ForwardingChains, ","),
		sess.SharedHistory, ratchetSafety, receivedAt, dbutil.NumPtr(sess.MaxAge), dbutil.NumPtr(sess.MaxMessages),
		sess.IsScheduled, sess.KeyBackupVersion, sess.KeySource, sess.SourceUser, account}, nil
}

// RowInsert is a multi-row insert into one of mautrix's tables that ferry's relay runs in its own statement or
// transaction: Head, then one (...) group of Width parameters per row (Args), then Tail. The relay hands it to
// database.Batch (whose RowInsert has the same fields): database never imports crypto, so the statement is
// written here with the others on mautrix's tables and the relay only fills in the rows.
type RowInsert struct {
	Head, Tail string
	Width      int
	Args       []any
}

// statement is r's SQL with its parameters numbered from first.
func (r *RowInsert) statement(first int) string {
	return r.Head + placeholders(first, len(r.Args)/r.Width, r.Width) + r.Tail
}

// ReplayIndexInsert is the insert of replay index entries (TakeReplayIndex) that the relay commits together with
// the events they belong to. It is the only write of the replay index: an entry reaches the database in the
// statement that records its event as done, or not at all (the event is then decrypted again after a restart,
// which decides its entry anew).
func ReplayIndexInsert(entries []ReplayEntry) RowInsert {
	args := make([]any, 0, len(entries)*sqlSaveReplayIndexWidth)
	for _, e := range entries {
		args = append(args, e.SessionID, e.Index, e.EventID, e.Timestamp)
	}
	return RowInsert{Head: sqlSaveReplayIndexHead, Tail: sqlSaveReplayIndexTail, Width: sqlSaveReplayIndexWidth, Args: args}
}

// newBlankOlmSession is an Olm session to unpickle a stored one into (the store's own loader does the same).
func newBlankOlmSession() olm.Session { return olm.NewBlankSession() }

// advanceInboundRatchet moves a goolm inbound Megolm session's cached ratchet forward to index, as decrypting
// the message at index did inside mautrix's copy of it. It never moves backwards, by goolm's own rule for whether
// an index lies at or beyond the latest ratchet (the counter wraps). It returns false for sessions that are not
// goolm's.
func advanceInboundRatchet(internal olm.InboundGroupSession, index uint) bool {
	s, ok := internal.(*session.MegolmInboundSession)
	if !ok || index > math.MaxUint32 || uint32(index)-s.Ratchet.Counter >= 1<<31 {
		return false
	}
	s.Ratchet.AdvanceTo(uint32(index))
	return true
}

// megolmCiphertextIndex reads the message index of a decoded Megolm ciphertext (sent in the clear).
func megolmCiphertextIndex(raw []byte) (uint32, error) {
	var msg message.GroupMessage
	if err := msg.Decode(raw); err != nil {
		return 0, err
	} else if !msg.HasMessageIndex {
		return 0, errors.New("ciphertext has no message index")
	}
	return msg.MessageIndex, nil
}

// copyGoolmInbound copies a goolm inbound Megolm session (plain values), nil for other implementations.
func copyGoolmInbound(internal olm.InboundGroupSession) olm.InboundGroupSession {
	s, ok := internal.(*session.MegolmInboundSession)
	if !ok || s == nil {
		return nil
	}
	cp := *s
	return &cp
}

// restoreGoolmSession overwrites a goolm Olm session with a stored pickle of it.
func restoreGoolmSession(internal olm.Session, pickle, key []byte) error {
	dst, ok := internal.(*session.OlmSession)
	if !ok {
		return errors.New("not a goolm Olm session")
	}
	fresh := newBlankOlmSession()
	if err := fresh.Unpickle(pickle, key); err != nil {
		return err
	}
	*dst = *fresh.(*session.OlmSession)
	return nil
}

// restoreGoolmAccount overwrites a goolm Olm account with a stored pickle of it.
func restoreGoolmAccount(internal olm.Account, pickle, key []byte) error {
	dst, ok := internal.(*goolmaccount.Account)
	if !ok {
		return errors.New("not a goolm Olm account")
	}
	fresh := olm.NewBlankAccount()
	if err := fresh.Unpickle(pickle, key); err != nil {
		return err
	}
	*dst = *fresh.(*goolmaccount.Account)
	return nil
}
