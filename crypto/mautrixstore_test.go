package crypto

import (
	"context"
	"encoding/base64"
	"errors"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/crypto/olm"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database/dbtest"
)

// errRollback ends the statement test's transaction without keeping what it wrote.
var errRollback = errors.New("rollback")

// TestMautrixStoreStatements runs every statement ferry has on the crypto store's tables against the schema this
// build's mautrix creates, on PostgreSQL and SQLite. A mautrix upgrade that renames or drops what they use fails
// here, before any start-up does.
func TestMautrixStoreStatements(t *testing.T) {
	const n = 2 // rows in the batched statements
	args := func(k int) []any {
		out := make([]any, k)
		for i := range out {
			out[i] = "x"
		}
		return out
	}
	statements := map[string][]any{
		sqlGhostAccounts: {"x"}, sqlDeleteAccount: {"x"}, sqlDeleteOlmSessions: {"x"}, sqlDeleteAccountOut: {"x"},
		sqlDeleteAllOutbound: {}, sqlDeleteRoomOutbound: {"x"}, sqlDeleteOutbound: {"x", "x"}, sqlDeleteInbound: {"x", "x"},
		sqlDeleteGhostInbound: {"x", "x", "x"}, sqlInboundCopyAccounts: {"x", "x"}, sqlInboundKeyAccounts: {"x", "x"},
		sqlDeleteSessionShared: {"x"}, sqlIsSessionRecipient: {"x", "x"}, sqlAllTrackedUsers: {}, sqlDrainState: {"x", "x"},
		sqlReplayIndexOfSession: {"x"}, sqlAccountPickle: {"x"}, sqlOlmSessionPickle: {"x", "x"},
		sqlTrustOf(n): args(n + 1), sqlDevicesAndKeysOf: {"@u:x"}, sqlOlmSessionsWith(n): args(n + 1),
		sqlSaveSessionShared(n): args(3 * n), sqlAccountDeviceAndSecrets: {"x"},
	}
	// Typed values where the schema needs them.
	now := time.Now()
	olmRow := []any{"acct", "sess", "key", []byte("pickle"), now, now, now}
	statements[sqlSaveOlmSessions(1)] = olmRow
	out, err := crypto.NewOutboundGroupSession("!room:x", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	igs, err := crypto.NewInboundGroupSession("senderkey", "signingkey", "!room:x", out.Internal.Key(), 0, 0, nil, false)
	if err != nil {
		t.Fatal(err)
	}
	inboundRow, err := inboundSessionArgs("acct", []byte("pickle key"), igs)
	if err != nil {
		t.Fatal(err)
	}
	statements[sqlPutInboundSession(1)] = inboundRow
	// Postgres only (a data-modifying WITH): saveShare's one statement.
	postgresOnly := map[string][]any{
		sqlSaveShare(1, 1, true):  append(append(slices.Clone(olmRow), inboundRow...), "@u:x", "key", "sess"),
		sqlSaveShare(1, 1, false): append(slices.Clone(olmRow), "@u:x", "key", "sess"),
		sqlPutAccountWithDevice:   {"@u:x", "DEVICE", "ik", "sk", 0, false, "name", "DEVICE", false, "", []byte("pickle"), "acct", ""},
	}
	secrets := &RowInsert{Head: sqlPutSecretsHead, Tail: sqlPutSecretsTail, Width: sqlPutSecretsRowWidth, Args: []any{"acct", "a", []byte("1"), "acct", "b", []byte("2")}}
	postgresOnly[sqlPutAccountWithDeviceAnd(secrets)] = append(slices.Clone(postgresOnly[sqlPutAccountWithDevice]), secrets.Args...)
	statements[secrets.statement(1)] = secrets.Args
	statements[sqlPutSignatures(n)] = []any{"@u:x", "key1", "@u:x", "signer", "sig", "@u:x", "key2", "@u:x", "signer", "sig"}
	// The replay index insert as the relay's batch renders it (database.Batch adds the rows' placeholders).
	replay := ReplayIndexInsert([]ReplayEntry{{SessionID: "sess", Index: 1, EventID: "$event", Timestamp: 1}, {SessionID: "sess", Index: 2, EventID: "$next", Timestamp: 2}})
	statements[replay.statement(1)] = replay.Args
	statements[sqlStoreVersion] = []any{}

	for _, dialect := range dbtest.Dialects {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			db, _ := openCryptoStore(t, dialect, "acct")
			if err := checkCryptoSchema(ctx, db); err != nil {
				t.Fatalf("the crypto store this mautrix creates is not the one ferry knows: %v", err)
			}
			// Statements written for each dialect.
			all := maps.Clone(statements)
			all[sqlDeviceListsOf(db.Dialect, n)] = append([]any{now.Unix()}, args(n)...)
			if db.Dialect == dbutil.Postgres {
				maps.Copy(all, postgresOnly)
			}
			for q, a := range all {
				// Each in a transaction of its own, rolled back: nothing stays, and one failure does not hide others.
				err := db.DoTxn(ctx, nil, func(ctx context.Context) error {
					var err error
					if strings.HasPrefix(strings.TrimSpace(q), "SELECT") {
						var rows dbutil.Rows
						if rows, err = db.Query(ctx, q, a...); err == nil {
							err = rows.Close()
						}
					} else {
						_, err = db.Exec(ctx, q, a...)
					}
					if err != nil {
						return err
					}
					return errRollback
				})
				if !errors.Is(err, errRollback) {
					t.Errorf("%s\n  fails on the crypto store: %v", q, err)
				}
			}
		})
	}
}

// TestCryptoSchemaRefusesUnknownVersion: a database whose crypto store another mautrix upgraded is refused at
// start-up with a reason, not used with statements written for another schema.
func TestCryptoSchemaRefusesUnknownVersion(t *testing.T) {
	ctx := context.Background()
	db := dbtest.Open(t, "sqlite3-fk-wal")
	store := crypto.NewSQLCryptoStore(db, dbutil.NoopLogger, "acct", "", []byte("pickle key"))
	if err := store.DB.Upgrade(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(ctx, `UPDATE crypto_version SET version=$1`, knownCryptoSchema+1); err != nil {
		t.Fatal(err)
	}
	if err := checkCryptoSchema(ctx, db); !errors.Is(err, ErrUnknownCryptoSchema) {
		t.Fatalf("err = %v, want ErrUnknownCryptoSchema", err)
	}
}

// TestGoolmInternals pins what ferry relies on inside goolm's Megolm sessions: an inbound session is goolm's
// (so it can be copied and its cached ratchet stepped), stepping forward makes earlier indices undecryptable and
// later ones not, it never steps back, and the message index is read from a ciphertext without a key.
func TestGoolmInternals(t *testing.T) {
	out, err := olm.NewOutboundGroupSession()
	if err != nil {
		t.Fatal(err)
	}
	key := out.Key()
	in, err := olm.NewInboundGroupSession([]byte(key))
	if err != nil {
		t.Fatal(err)
	}
	var ciphertexts [][]byte
	for range 3 {
		ct, err := out.Encrypt([]byte(`{"type":"m.room.message"}`))
		if err != nil {
			t.Fatal(err)
		}
		ciphertexts = append(ciphertexts, ct)
	}
	for i, ct := range ciphertexts {
		raw, err := base64.RawStdEncoding.DecodeString(strings.TrimRight(string(ct), "="))
		if err != nil {
			t.Fatal(err)
		}
		if idx, err := megolmCiphertextIndex(raw); err != nil || idx != uint32(i) {
			t.Fatalf("message index of ciphertext %d = %d (%v)", i, idx, err)
		}
	}
	cp := copyGoolmInbound(in)
	if cp == nil || cp == in {
		t.Fatal("the inbound session is not goolm's: ferry's session cache and ratchet steps cannot work (build with -tags goolm)")
	}
	if !advanceInboundRatchet(cp, 2) {
		t.Fatal("the cached ratchet did not step forward")
	}
	if _, _, err = cp.Decrypt(ciphertexts[2]); err != nil {
		t.Fatalf("the message at the ratchet no longer decrypts: %v", err)
	}
	if _, _, err = in.Decrypt(ciphertexts[0]); err != nil {
		t.Fatalf("stepping a copy changed the original: %v", err)
	}
	advanceInboundRatchet(cp, 1) // backwards: ignored
	if _, _, err = cp.Decrypt(ciphertexts[2]); err != nil {
		t.Fatalf("a backward step moved the ratchet: %v", err)
	}
}

// TestGoolmRestore: the Olm session and account a to-device message advanced are set back to a stored pickle in
// place (the OlmMachine and the store's cache hold those objects), after which the message decrypts again.
func TestGoolmRestore(t *testing.T) {
	key := []byte("pickle key")
	bob, _, typ, first, second := olmPair(t)
	storedAccount, _ := bob.Pickle(key)
	in, err := bob.NewInboundSession(string(first))
	if err != nil {
		t.Fatal(err)
	}
	if err = bob.RemoveOneTimeKeys(in); err != nil {
		t.Fatal(err)
	}
	if _, err = bob.NewInboundSession(string(first)); err == nil {
		t.Fatal("the account still has the one-time key it used: this test shows nothing")
	}
	if err = restoreGoolmAccount(bob, storedAccount, key); err != nil {
		t.Fatalf("the account is not goolm's: %v (build with -tags goolm)", err)
	}
	if _, err = bob.NewInboundSession(string(first)); err != nil {
		t.Fatalf("the restored account cannot take the message again: %v", err)
	}

	if _, err = in.Decrypt(string(first), typ); err != nil {
		t.Fatal(err)
	}
	storedSession, _ := in.Pickle(key)
	if _, err = in.Decrypt(string(second), typ); err != nil {
		t.Fatal(err)
	}
	if _, err = in.Decrypt(string(second), typ); err == nil {
		t.Fatal("the session decrypts a message twice: this test shows nothing")
	}
	if err = restoreGoolmSession(in, storedSession, key); err != nil {
		t.Fatalf("the session is not goolm's: %v (build with -tags goolm)", err)
	}
	if got, err := in.Decrypt(string(second), typ); err != nil || string(got) != "second" {
		t.Fatalf("the restored session decrypts the message as %q (%v)", got, err)
	}
}

// olmPair makes two Olm accounts, alice and bob, and the first two messages of alice's new Olm session with bob
// (pre-key messages of type typ, "first" and "second"); it returns bob's account, alice's identity key and them.
func olmPair(t *testing.T) (bob olm.Account, aliceIdentity id.Curve25519, typ id.OlmMsgType, first, second []byte) {
	t.Helper()
	alice, err := olm.NewAccount()
	if err != nil {
		t.Fatal(err)
	}
	if bob, err = olm.NewAccount(); err != nil {
		t.Fatal(err)
	}
	if err = bob.GenOneTimeKeys(1); err != nil {
		t.Fatal(err)
	}
	_, bobIdentity, _ := bob.IdentityKeys()
	_, aliceIdentity, _ = alice.IdentityKeys()
	otks, _ := bob.OneTimeKeys()
	var otk id.Curve25519
	for _, k := range otks {
		otk = k
	}
	out, err := alice.NewOutboundSession(bobIdentity, otk)
	if err != nil {
		t.Fatal(err)
	}
	typ, first, _ = out.Encrypt([]byte("first"))
	_, second, _ = out.Encrypt([]byte("second"))
	return bob, aliceIdentity, typ, first, second
}
