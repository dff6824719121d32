package crypto

import (
	"context"
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

// allStatements counts every statement a database runs.
type allStatements struct {
	dbutil.DatabaseLogger
	n atomic.Int32
}

func (c *allStatements) QueryTiming(_ context.Context, method, _ string, _ []any, _ int, _ time.Duration, _ error) {
	if method != "EndRows" && method != "<Transaction>" { // reports of a statement already counted
		c.n.Add(1)
	}
}

// TestPutDevicesAsMautrix: a user's device list written through ferry's cache leaves the rows mautrix's store
// leaves for the same lists (devices no longer listed deleted, a known device keeping its signing key, the user
// tracked and up to date), in one statement on Postgres; the devices found by key are answered from memory after
// it, as the store answers.
func TestPutDevicesAsMautrix(t *testing.T) {
	dev := func(name, key, signing, display string) *id.Device {
		return &id.Device{DeviceID: id.DeviceID(name), IdentityKey: id.IdentityKey(testKey(key)), SigningKey: id.SigningKey(testKey(signing)), Name: display}
	}
	steps := []struct {
		what    string
		devices []*id.Device
	}{
		{"two new devices", []*id.Device{dev("D1", "k1", "s1", "one"), dev("D2", "k2", "s2", "two")}},
		{"one renamed with a new key, one new, one gone", []*id.Device{dev("D1", "k1b", "s1b", "one again"), dev("D3", "k3", "s3", "three")}},
		{"none", nil},
		{"one back", []*id.Device{dev("D2", "k2", "s2", "two back")}},
	}
	var keys []id.IdentityKey
	for _, k := range []string{"k1", "k1b", "k2", "k3"} {
		keys = append(keys, id.IdentityKey(testKey(k)))
	}
	for _, dialect := range dbtest.Dialects {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			db := dbtest.Open(t, dialect)
			counter := &allStatements{DatabaseLogger: db.Log}
			db.Log = counter
			plain := crypto.NewSQLCryptoStore(db, dbutil.NoopLogger, "acct", "", []byte("pickle"))
			if err := plain.DB.Upgrade(ctx); err != nil {
				t.Fatal(err)
			}
			store := &cachedStore{SQLCryptoStore: plain, c: newStoreCache()}
			const ours, theirs = id.UserID("@ours:x"), id.UserID("@theirs:x")
			rows := func(user id.UserID) string {
				r, err := db.Query(ctx, `SELECT device_id, identity_key, signing_key, trust, deleted, name FROM crypto_device
					WHERE user_id=$1 ORDER BY device_id`, user)
				if err != nil {
					t.Fatal(err)
				}
				var out []string
				for r.Next() {
					var d id.Device
					if err = r.Scan(&d.DeviceID, &d.IdentityKey, &d.SigningKey, &d.Trust, &d.Deleted, &d.Name); err != nil {
						t.Fatal(err)
					}
					out = append(out, fmt.Sprintf("%s %.6s %.6s %d %v %q", d.DeviceID, d.IdentityKey, d.SigningKey, d.Trust, d.Deleted, d.Name))
				}
				_ = r.Close()
				var outdated bool
				var errors int
				if err = db.QueryRow(ctx, `SELECT devices_outdated, error_count FROM crypto_tracked_user WHERE user_id=$1`, user).Scan(&outdated, &errors); err != nil {
					t.Fatalf("%s is not tracked: %v", user, err)
				}
				return fmt.Sprintf("%s; outdated %v, errors %d", strings.Join(out, ", "), outdated, errors)
			}
			find := func(user id.UserID, s crypto.Store, key id.IdentityKey) string {
				d, err := s.FindDeviceByKey(ctx, user, key)
				if err != nil {
					t.Fatal(err)
				} else if d == nil {
					return "none"
				}
				return fmt.Sprintf("%s %s %.6s %.6s %v %q", d.UserID.Localpart(), d.DeviceID, d.IdentityKey, d.SigningKey, d.Deleted, d.Name)
			}
			for _, step := range steps {
				// Every key is looked up first, so that the cache holds what the write changes.
				for _, k := range keys {
					find(ours, store, k)
				}
				list := func() map[id.DeviceID]*id.Device {
					m := make(map[id.DeviceID]*id.Device)
					for _, d := range step.devices {
						cp := *d
						m[d.DeviceID] = &cp
					}
					return m
				}
				counter.n.Store(0)
				if err := store.PutDevices(ctx, ours, list()); err != nil {
					t.Fatalf("%s: %v", step.what, err)
				}
				if n := counter.n.Load(); dialect == "postgres" && n != 1 {
					t.Errorf("%s: %d statements, want 1", step.what, n)
				}
				// The devices just written are known without asking the store.
				counter.n.Store(0)
				for _, d := range step.devices {
					find(ours, store, d.IdentityKey)
				}
				if n := counter.n.Load(); dialect == "postgres" && n != 0 {
					t.Errorf("%s: %d statements to find the devices just written, want none", step.what, n)
				}
				if err := plain.PutDevices(ctx, theirs, list()); err != nil {
					t.Fatal(err)
				}
				if got, want := rows(ours), rows(theirs); got != want {
					t.Errorf("%s: rows\n%s\nmautrix leaves\n%s", step.what, got, want)
				}
				for _, k := range keys {
					got := strings.Replace(find(ours, store, k), "ours ", "", 1)
					want := strings.Replace(find(theirs, plain, k), "theirs ", "", 1)
					if got != want {
						t.Errorf("%s: the device with key %s is %q, the store says %q", step.what, k, got, want)
					}
				}
			}

			// A signature known before a device write is still known after it: a device list changes no signature.
			master, signer := testKey("master"), testKey("signer")
			if err := store.PutSignature(ctx, ours, master, ours, signer, "sig"); err != nil {
				t.Fatal(err)
			}
			if err := store.PutDevices(ctx, ours, map[id.DeviceID]*id.Device{"D4": dev("D4", "k4", "s4", "four")}); err != nil {
				t.Fatal(err)
			}
			counter.n.Store(0)
			if ok, err := store.IsKeySignedBy(ctx, ours, master, ours, signer); !ok || err != nil || counter.n.Load() != 0 {
				t.Errorf("after a device write the signature is %v, %v, with %d statements; want known from memory", ok, err, counter.n.Load())
			}

			// A write in a transaction that rolls back leaves the cache as the store: without the device.
			errRollback := fmt.Errorf("rollback")
			err := db.DoTxn(ctx, nil, func(ctx context.Context) error {
				if err := store.PutDevices(ctx, ours, map[id.DeviceID]*id.Device{"D5": dev("D5", "k5", "s5", "five")}); err != nil {
					return err
				}
				return errRollback
			})
			if err != errRollback {
				t.Fatal(err)
			}
			if got := find(ours, store, id.IdentityKey(testKey("k5"))); got != "none" {
				t.Errorf("a rolled-back write's device is found: %s", got)
			}
			if got := find(ours, store, id.IdentityKey(testKey("k4"))); !strings.Contains(got, "D4") || strings.Contains(got, "true") {
				t.Errorf("after a rolled-back write the device before it is %s", got)
			}
		})
	}
}

// TestHeldSecretsWithoutTheOwnDevice: secrets held for a new account's first write (holdWithAccount: a login-path
// ghost's password and access token, its cross-signing keys) are not lost when that write comes without the
// account's own device (mautrix's key upload always stores the device first, so this is the fallback): the account
// is written alone, the secrets stay held, and writeHeld stores them. On both databases.
func TestHeldSecretsWithoutTheOwnDevice(t *testing.T) {
	for _, dialect := range dbtest.Dialects {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			_, store := openCryptoStore(t, dialect, "@ghost:test")
			olm := newOlmStore(&cachedStore{SQLCryptoStore: store, c: newStoreCache()}, "@ghost:test")
			sec := newSecretCache(store)
			if err := sec.load(ctx); err != nil {
				t.Fatal(err)
			}
			rows, err := sec.rows([]id.Secret{secretAccessToken}, []string{"DEVICE token"})
			if err != nil {
				t.Fatal(err)
			}
			var stored atomic.Bool
			olm.withAccount.Store(&heldSecrets{rows: rows, stored: func() { stored.Store(true) }})
			if err = olm.PutAccount(ctx, crypto.NewOlmAccount()); err != nil {
				t.Fatal(err)
			}
			token := func() string {
				v, err := newSecretCache(store).GetSecret(ctx, secretAccessToken)
				if err != nil {
					t.Fatal(err)
				}
				return v
			}
			if v := token(); v != "" || stored.Load() {
				t.Fatalf("the account's write without its device stored the held token (%q, %v)", v, stored.Load())
			}
			if err = olm.writeHeld(ctx); err != nil {
				t.Fatal(err)
			}
			if v := token(); v != "DEVICE token" || !stored.Load() {
				t.Errorf("after writeHeld the token is %q (stored callback run: %v), want it stored", v, stored.Load())
			}
			if err = olm.writeHeld(ctx); err != nil {
				t.Errorf("a second writeHeld, with nothing held: %v", err)
			}
		})
	}
}
