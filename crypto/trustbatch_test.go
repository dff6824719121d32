package crypto

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database/dbtest"
)

// statementCounter counts the statements a store runs on its database (dbutil reports each to its logger).
type statementCounter struct {
	dbutil.DatabaseLogger
	writes atomic.Int32
	all    atomic.Int32 // reads too
}

func (c *statementCounter) QueryTiming(_ context.Context, method, query string, _ []any, _ int, _ time.Duration, _ error) {
	if method != "EndRows" {
		c.all.Add(1)
	}
	if !strings.HasPrefix(strings.TrimSpace(query), "SELECT") {
		c.writes.Add(1)
	}
}

// sigWrite is one PutSignature call.
type sigWrite struct {
	signedUser id.UserID
	signedKey  id.Ed25519
	signerUser id.UserID
	signerKey  id.Ed25519
	signature  string
}

// newBatchStore is a ghost account's cached crypto store over db, with mautrix's schema.
func newBatchStore(ctx context.Context, t *testing.T, db *dbutil.Database) *cachedStore {
	t.Helper()
	sql := crypto.NewSQLCryptoStore(db, dbutil.NoopLogger, "@ghost:x", "", []byte("pickle"))
	if err := sql.DB.Upgrade(ctx); err != nil {
		t.Fatal(err)
	}
	return &cachedStore{SQLCryptoStore: sql, c: newStoreCache()}
}

// TestSignatureBatch: the signatures an identity step stores through a batch (mautrix's PutSignature, one
// statement and commit each) are written when the batch is flushed, all in one statement, and leave the rows the
// same writes one by one leave (of two signatures of the same key by the same signer, the later one); the trust
// cache answers for them from memory afterwards, but not for a flush inside a transaction that rolled back.
func TestSignatureBatch(t *testing.T) {
	for _, dialect := range dbtest.Dialects {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			db := dbtest.Open(t, dialect)
			// Statements are reported to the logger of the database the store's is a child of.
			counter := &statementCounter{DatabaseLogger: db.Log}
			db.Log = counter
			store := newBatchStore(ctx, t, db)
			master, ssk, device := testKey("master"), testKey("ssk"), testKey("device")
			writes := func(user id.UserID) []sigWrite {
				return []sigWrite{
					{user, master, user, device, "master-by-device-1"},
					{user, ssk, user, master, "ssk-by-master"},
					{user, master, user, device, "master-by-device-2"}, // the same row again
				}
			}
			rows := func(user id.UserID) string {
				r, err := db.Query(ctx, `SELECT signed_key, signer_key, signature FROM crypto_cross_signing_signatures
					WHERE signed_user_id=$1 ORDER BY signed_key, signer_key`, user)
				if err != nil {
					t.Fatal(err)
				}
				var out []string
				for r.Next() {
					var a, b, c string
					if err = r.Scan(&a, &b, &c); err != nil {
						t.Fatal(err)
					}
					out = append(out, strings.Join([]string{a[:6], b[:6], c}, " "))
				}
				_ = r.Close()
				return strings.Join(out, "; ")
			}

			const alone, batched = id.UserID("@alone:x"), id.UserID("@batched:x")
			for _, w := range writes(alone) {
				if err := store.PutSignature(ctx, w.signedUser, w.signedKey, w.signerUser, w.signerKey, w.signature); err != nil {
					t.Fatal(err)
				}
			}
			bctx, batch := withTrustBatch(ctx)
			counter.writes.Store(0)
			for _, w := range writes(batched) {
				if err := store.PutSignature(bctx, w.signedUser, w.signedKey, w.signerUser, w.signerKey, w.signature); err != nil {
					t.Fatal(err)
				}
			}
			if got := rows(batched); got != "" || counter.writes.Load() != 0 {
				t.Fatalf("before the flush: rows %q, %d statements written", got, counter.writes.Load())
			}
			if err := batch.flush(ctx); err != nil {
				t.Fatal(err)
			}
			if n := counter.writes.Load(); n != 1 {
				t.Errorf("the flush wrote %d statements, want 1", n)
			}
			if got, want := rows(batched), rows(alone); got != want || want == "" {
				t.Errorf("batched rows %q, one by one %q", got, want)
			}
			if err := batch.flush(ctx); err != nil || counter.writes.Load() != 1 {
				t.Errorf("a second flush: %v, %d statements in all", err, counter.writes.Load())
			}

			// Written through: answered from memory once the rows are gone behind the cache's back.
			if _, err := db.Exec(ctx, `DELETE FROM crypto_cross_signing_signatures WHERE signed_user_id=$1`, batched); err != nil {
				t.Fatal(err)
			}
			for _, w := range writes(batched) {
				if ok, err := store.IsKeySignedBy(ctx, w.signedUser, w.signedKey, w.signerUser, w.signerKey); !ok || err != nil {
					t.Errorf("%s signed by %s: %v, %v, want answered from the cache", w.signedKey[:6], w.signerKey[:6], ok, err)
				}
			}

			// A flush in a transaction that rolls back leaves nothing, in the store or the cache.
			const rolledBack = id.UserID("@rolledback:x")
			errRollback := errors.New("rollback")
			err := db.DoTxn(ctx, nil, func(ctx context.Context) error {
				bctx, batch := withTrustBatch(ctx)
				for _, w := range writes(rolledBack) {
					_ = store.PutSignature(bctx, w.signedUser, w.signedKey, w.signerUser, w.signerKey, w.signature)
				}
				if err := batch.flush(ctx); err != nil {
					return err
				}
				return errRollback
			})
			if !errors.Is(err, errRollback) {
				t.Fatal(err)
			}
			if ok, err := store.IsKeySignedBy(ctx, rolledBack, master, rolledBack, device); ok || err != nil {
				t.Errorf("a rolled-back batch's signature: %v, %v, want not signed", ok, err)
			}
		})
	}
}

// TestTrustBatchKeys: cross-signing keys written through a batch leave the rows mautrix's one-by-one writes leave
// (the first key seen for a usage stays first, also when a usage comes twice in one batch); a read of a user's
// keys in the batch's context answers as the store would after the writes, from memory when the cache holds the
// user and by writing the batch first when it does not.
func TestTrustBatchKeys(t *testing.T) {
	for _, dialect := range dbtest.Dialects {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			db := dbtest.Open(t, dialect)
			counter := &allStatements{DatabaseLogger: db.Log}
			db.Log = counter
			store := newBatchStore(ctx, t, db)
			sql := store.SQLCryptoStore
			const user = id.UserID("@member:x")
			k1, k2, a, b := testKey("k1"), testKey("k2"), testKey("a"), testKey("b")
			stored := func() string {
				fresh := &cachedStore{SQLCryptoStore: sql, c: newStoreCache()}
				keys, err := fresh.GetCrossSigningKeys(ctx, user)
				if err != nil {
					t.Fatal(err)
				}
				return fmt.Sprintf("master %.4s/%.4s ssk %.4s/%.4s", keys[id.XSUsageMaster].Key, keys[id.XSUsageMaster].First,
					keys[id.XSUsageSelfSigning].Key, keys[id.XSUsageSelfSigning].First)
			}

			bctx, batch := withTrustBatch(ctx)
			if err := store.PutCrossSigningKey(bctx, user, id.XSUsageMaster, k1); err != nil {
				t.Fatal(err)
			}
			// Not cached yet: the read writes the batch first.
			counter.n.Store(0)
			keys, err := store.GetCrossSigningKeys(bctx, user)
			if err != nil || keys[id.XSUsageMaster].Key != k1 || keys[id.XSUsageMaster].First != k1 {
				t.Fatalf("first read in the batch: %+v, %v", keys, err)
			}
			if n := counter.n.Load(); n != 2 {
				t.Errorf("the first read ran %d statements, want 2 (the batch's write, the read)", n)
			}
			// Cached now: a new master key and a self-signing key seen twice are answered from memory.
			for _, k := range []struct {
				usage id.CrossSigningUsage
				key   id.Ed25519
			}{{id.XSUsageMaster, k2}, {id.XSUsageSelfSigning, a}, {id.XSUsageSelfSigning, b}} {
				if err = store.PutCrossSigningKey(bctx, user, k.usage, k.key); err != nil {
					t.Fatal(err)
				}
			}
			counter.n.Store(0)
			keys, err = store.GetCrossSigningKeys(bctx, user)
			if err != nil || counter.n.Load() != 0 {
				t.Fatalf("second read: %v, %d statements", err, counter.n.Load())
			}
			got := fmt.Sprintf("master %.4s/%.4s ssk %.4s/%.4s", keys[id.XSUsageMaster].Key, keys[id.XSUsageMaster].First,
				keys[id.XSUsageSelfSigning].Key, keys[id.XSUsageSelfSigning].First)
			if err = batch.flush(ctx); err != nil {
				t.Fatal(err)
			}
			want := fmt.Sprintf("master %.4s/%.4s ssk %.4s/%.4s", k2, k1, b, a) // as one-by-one writes leave them
			if s := stored(); s != want || got != want {
				t.Errorf("answered %s in the batch, stored %s after it; want %s", got, s, want)
			}

			// Once finished, a write through the batch's context (something the step left running) is written
			// at once.
			if err = batch.finish(ctx); err != nil {
				t.Fatal(err)
			}
			counter.n.Store(0)
			if err = store.PutCrossSigningKey(bctx, user, id.XSUsageUserSigning, k1); err != nil || counter.n.Load() != 1 {
				t.Errorf("a write after the batch finished: %v, %d statements, want written at once", err, counter.n.Load())
			}
		})
	}
}

// TestTrustBatchCarriesMarkers: an identity step's markers (secrets of the account) handed to the batch's finish
// are written all or nothing with the signatures the batch holds (one statement on Postgres, one transaction on
// SQLite): a marker that cannot be stored leaves no signature behind, and the reverse; with nothing left in the
// batch the markers are not carried, and the caller writes them.
func TestTrustBatchCarriesMarkers(t *testing.T) {
	for _, dialect := range dbtest.Dialects {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			db := dbtest.Open(t, dialect)
			store := newBatchStore(ctx, t, db)
			const user = id.UserID("@ghost:x")
			master, device := testKey("master"), testKey("device")
			signed := func() bool {
				fresh := &cachedStore{SQLCryptoStore: store.SQLCryptoStore, c: newStoreCache()}
				ok, err := fresh.IsKeySignedBy(ctx, user, master, user, device)
				if err != nil {
					t.Fatal(err)
				}
				return ok
			}
			marker := func(name id.Secret) string {
				v, err := newSecretCache(store.SQLCryptoStore).GetSecret(ctx, name)
				if err != nil {
					t.Fatal(err)
				}
				return v
			}
			step := func(name id.Secret) (bool, error) {
				bctx, batch := withTrustBatch(ctx)
				if err := store.PutSignature(bctx, user, master, user, device, "master-by-device"); err != nil {
					t.Fatal(err)
				}
				rows, err := newSecretCache(store.SQLCryptoStore).rows([]id.Secret{name}, []string{"done"})
				if err != nil {
					t.Fatal(err)
				}
				return batch.finishWith(ctx, rows)
			}

			// A trigger refuses the marker named "refused".
			refuse := map[string][]string{
				"postgres": {
					`CREATE FUNCTION marker_refused() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$`,
					`CREATE TRIGGER marker_refused BEFORE INSERT ON crypto_secrets FOR EACH ROW WHEN (NEW.name = 'refused') EXECUTE FUNCTION marker_refused()`,
				},
				"sqlite3-fk-wal": {
					`CREATE TRIGGER marker_refused BEFORE INSERT ON crypto_secrets FOR EACH ROW WHEN NEW.name = 'refused' BEGIN SELECT RAISE(ABORT, 'refused'); END`,
				},
			}[dialect]
			if len(refuse) == 0 {
				t.Fatalf("no trigger for %s", dialect)
			}
			for _, q := range refuse {
				if _, err := db.Exec(ctx, q); err != nil {
					t.Fatal(err)
				}
			}
			if carried, err := step("refused"); !carried || err == nil {
				t.Fatalf("a marker that cannot be stored: carried %v, err %v; want carried and failed", carried, err)
			}
			if signed() || marker("refused") != "" {
				t.Errorf("the failed write left signature %v, marker %q; want neither", signed(), marker("refused"))
			}

			if carried, err := step("published"); !carried || err != nil {
				t.Fatalf("carried %v, err %v; want carried and written", carried, err)
			}
			if !signed() || marker("published") != "done" {
				t.Errorf("after the write: signature %v, marker %q; want both", signed(), marker("published"))
			}

			_, batch := withTrustBatch(ctx)
			rows, err := newSecretCache(store.SQLCryptoStore).rows([]id.Secret{"alone"}, []string{"done"})
			if err != nil {
				t.Fatal(err)
			}
			if carried, err := batch.finishWith(ctx, rows); carried || err != nil {
				t.Errorf("an empty batch: carried %v, err %v; want neither", carried, err)
			}
			if v := marker("alone"); v != "" {
				t.Errorf("an empty batch wrote the marker %q", v)
			}
		})
	}
}
