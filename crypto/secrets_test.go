package crypto

import (
	"context"
	"testing"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database/dbtest"
)

// TestSecretCacheAnswersAsTheStore: what a set-up reads and writes through the cache is what the crypto store
// itself holds and answers, on PostgreSQL and SQLite: a missing secret is "", writes (one, or several at once)
// reach the database before the call returns, a deletion too, another account's secrets are not its own, and a
// secret that cannot be unpickled fails only when it is asked for.
func TestSecretCacheAnswersAsTheStore(t *testing.T) {
	for _, dialect := range dbtest.Dialects {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			db, store := openCryptoStore(t, dialect, "@ghost:test")
			other := crypto.NewSQLCryptoStore(db, dbutil.NoopLogger, "@other:test", "", []byte("pickle key"))
			must := func(err error) {
				t.Helper()
				if err != nil {
					t.Fatal(err)
				}
			}
			must(store.PutSecret(ctx, secretPassword, "hunter2"))
			must(other.PutSecret(ctx, secretAccessToken, "DEV other-token"))
			// A row the pickle key cannot open (written with another key).
			wrongKey := crypto.NewSQLCryptoStore(db, dbutil.NoopLogger, "@ghost:test", "", []byte("another key"))
			must(wrongKey.PutSecret(ctx, secretSignedDevice, "DEV"))

			c := newSecretCache(store)
			get := func(name id.Secret) string {
				t.Helper()
				v, err := c.GetSecret(ctx, name)
				if err != nil {
					t.Fatalf("%s: %v", name, err)
				}
				return v
			}
			if v := get(secretPassword); v != "hunter2" {
				t.Errorf("password: %q", v)
			}
			if v := get(secretAccessToken); v != "" {
				t.Errorf("another account's access token read as this one's: %q", v)
			}
			if _, err := c.GetSecret(ctx, secretSignedDevice); err == nil {
				t.Error("a secret that cannot be unpickled read without an error")
			}

			must(c.PutSecret(ctx, secretAccessToken, "DEV token"))
			must(c.PutSecrets(ctx, seedNames[:], []string{"m", "s", "u"}))
			must(c.DeleteSecret(ctx, secretPassword))
			must(c.PutSecret(ctx, secretSignedDevice, "DEV"))
			for name, want := range map[id.Secret]string{
				secretAccessToken: "DEV token", id.SecretXSMaster: "m", id.SecretXSSelfSigning: "s",
				id.SecretXSUserSigning: "u", secretPassword: "", secretSignedDevice: "DEV",
			} {
				if v := get(name); v != want {
					t.Errorf("cache: %s = %q, want %q", name, v, want)
				}
				// Written through: the store (a new reader) sees the same.
				if v, err := store.GetSecret(ctx, name); err != nil || v != want {
					t.Errorf("store: %s = %q (%v), want %q", name, v, err, want)
				}
			}
			if v, err := other.GetSecret(ctx, secretAccessToken); err != nil || v != "DEV other-token" {
				t.Errorf("the other account's secret changed: %q (%v)", v, err)
			}
		})
	}
}

// TestSecretCacheDeletesOnlyWhatExists: deleting a secret the account does not have (by the secrets the cache
// read) writes nothing; one it has, or one that cannot be unpickled, is deleted in the store; before the cache
// has read anything, a deletion goes to the store.
func TestSecretCacheDeletesOnlyWhatExists(t *testing.T) {
	ctx := context.Background()
	db := dbtest.Open(t, "postgres")
	counter := &statementCounter{DatabaseLogger: db.Log}
	db.Log = counter
	store := crypto.NewSQLCryptoStore(db, dbutil.NoopLogger, "@ghost:test", "", []byte("pickle key"))
	if err := store.DB.Upgrade(ctx); err != nil {
		t.Fatal(err)
	}
	wrongKey := crypto.NewSQLCryptoStore(db, dbutil.NoopLogger, "@ghost:test", "", []byte("another key"))
	for _, err := range []error{store.PutSecret(ctx, secretPassword, "hunter2"), wrongKey.PutSecret(ctx, secretSignedDevice, "DEV")} {
		if err != nil {
			t.Fatal(err)
		}
	}
	deletes := func(c *secretCache, name id.Secret) int32 {
		t.Helper()
		before := counter.writes.Load()
		if err := c.DeleteSecret(ctx, name); err != nil {
			t.Fatal(err)
		}
		return counter.writes.Load() - before
	}
	if n := deletes(newSecretCache(store), secretRecoveryKey); n != 1 {
		t.Errorf("a deletion before the cache read anything wrote %d statements, want 1", n)
	}
	c := newSecretCache(store)
	if _, err := c.GetSecret(ctx, secretPassword); err != nil {
		t.Fatal(err)
	}
	if n := deletes(c, secretRecoveryKey); n != 0 {
		t.Errorf("deleting a secret the account does not have wrote %d statements", n)
	}
	for _, name := range []id.Secret{secretPassword, secretSignedDevice} {
		if n := deletes(c, name); n != 1 {
			t.Errorf("deleting %s wrote %d statements, want 1", name, n)
		}
		if v, err := wrongKey.GetSecret(ctx, name); err != nil || v != "" {
			t.Errorf("%s after its deletion: %q, %v", name, v, err)
		}
	}
}
