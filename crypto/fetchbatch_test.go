package crypto

import (
	"context"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database/dbtest"
	"go.ferry.im/ferry/internal/fakehs"
)

// writeLog records the write statements a database runs, by the first words of each, and its reads apart.
type writeLog struct {
	dbutil.DatabaseLogger
	lock   sync.Mutex
	writes []string
	reads  []string
}

func (l *writeLog) QueryTiming(_ context.Context, method, query string, _ []any, _ int, _ time.Duration, _ error) {
	q := strings.Join(strings.Fields(query), " ")
	if method == "EndRows" || method == "<Transaction>" {
		return
	} else if strings.HasPrefix(q, "SELECT") {
		l.lock.Lock()
		l.reads = append(l.reads, q)
		l.lock.Unlock()
		return
	}
	if method == "Begin" || method == "Commit" || method == "Rollback" {
		q = strings.ToUpper(method)
	}
	l.lock.Lock()
	l.writes = append(l.writes, q)
	l.lock.Unlock()
}

// take returns the writes since the last take that touch one of tables.
func (l *writeLog) take(tables ...string) []string {
	l.lock.Lock()
	defer l.lock.Unlock()
	var out []string
	for _, w := range l.writes {
		keep := false
		for _, table := range tables {
			keep = keep || strings.Contains(w, table+" ")
		}
		if keep {
			out = append(out, w[:min(len(w), 60)])
		}
	}
	l.writes = nil
	return out
}

// takeAll returns every write since the last take, BEGIN and COMMIT included.
func (l *writeLog) takeAll() []string {
	l.lock.Lock()
	defer l.lock.Unlock()
	out := make([]string, 0, len(l.writes))
	for _, w := range l.writes {
		out = append(out, w[:min(len(w), 60)])
	}
	l.writes = nil
	return out
}

// takeReads returns the reads since the last takeReads that read table ("": every read, whole).
func (l *writeLog) takeReads(table string) []string {
	l.lock.Lock()
	defer l.lock.Unlock()
	var out []string
	for _, r := range l.reads {
		if table == "" {
			out = append(out, r)
		} else if strings.Contains(r, "FROM "+table+" ") {
			out = append(out, r[:min(len(r), 60)])
		}
	}
	l.reads = nil
	return out
}

// startASRigLogged is startASRig (with opts.SharedSecret) with the rig's write statements recorded from before the
// Machine starts.
func startASRigLogged(ctx context.Context, t *testing.T, opts fakehs.Options) (*asRig, *writeLog) {
	t.Helper()
	r := newASRig(t, opts, opts.SharedSecret)
	log := &writeLog{DatabaseLogger: r.db.Log}
	r.db.Log = log
	if err := r.m.Init(ctx); err != nil {
		t.Fatal(err)
	}
	r.m.Start(ctx)
	return r, log
}

// TestKeyFetchWritesInFewStatements: the bot meets a new member (its first message): ferry fetches the member's
// device list, cross-signing keys and signatures and stores them in one statement, where mautrix's store writes a
// statement and commit each; the member's device is then trusted as cross-signed by its owner, from what was
// stored.
func TestKeyFetchWritesInFewStatements(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r, log := startASRigLogged(ctx, t, fakehs.Options{CrossSigningUIA: true})
	defer r.m.Stop()
	tables := []string{"crypto_device", "crypto_tracked_user", "crypto_cross_signing_keys", "crypto_cross_signing_signatures"}
	log.take()
	msg := r.memberSends(t, "first words")
	if err := r.m.HandleTransactionCrypto(ctx, r.srv.TakeAppserviceTransaction()); err != nil {
		t.Fatal(err)
	}
	log.take()
	dec, err := r.m.Decrypt(ctx, msg)
	if err != nil {
		t.Fatal(err)
	}
	if dec.Mautrix.TrustState != id.TrustStateCrossSignedTOFU {
		t.Errorf("the member's device is %s, want cross-signed by its owner", dec.Mautrix.TrustState)
	}
	if writes := log.take(tables...); len(writes) != 1 {
		t.Errorf("the member's keys were stored in %d statements, want 1:\n%s", len(writes), strings.Join(writes, "\n"))
	}

	// What was stored, read without the cache: the member's two public cross-signing keys, first seen as they
	// are, and the four signatures a fetch verifies (the device by itself and by the self-signing key, the
	// self-signing key by the master key, the master key by the device).
	fresh := &cachedStore{SQLCryptoStore: r.m.storeFor(r.bot), c: newStoreCache()}
	member := r.member.Machine
	master, selfSigning := member.CrossSigningKeys.MasterKey.PublicKey(), member.CrossSigningKeys.SelfSigningKey.PublicKey()
	deviceKey := member.OwnIdentity().SigningKey
	keys, err := fresh.GetCrossSigningKeys(ctx, r.member.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got := keys[id.XSUsageMaster]; got.Key != master || got.First != master {
		t.Errorf("stored master key %+v, want %s", got, master)
	}
	if got := keys[id.XSUsageSelfSigning]; got.Key != selfSigning || got.First != selfSigning {
		t.Errorf("stored self-signing key %+v, want %s", got, selfSigning)
	}
	for _, sig := range []struct {
		what           string
		signed, signer id.Ed25519
	}{
		{"the device by itself", deviceKey, deviceKey},
		{"the device by the self-signing key", deviceKey, selfSigning},
		{"the self-signing key by the master key", selfSigning, master},
		{"the master key by the device", master, deviceKey},
	} {
		if ok, err := fresh.IsKeySignedBy(ctx, r.member.ID, sig.signed, r.member.ID, sig.signer); !ok || err != nil {
			t.Errorf("%s: stored %v, %v", sig.what, ok, err)
		}
	}
}

// failKeysOnce has the rig's database refuse the next write of cross-signing keys, once.
func failKeysOnce(ctx context.Context, t *testing.T, r *asRig) {
	t.Helper()
	for _, q := range []string{
		`CREATE SEQUENCE fail_keys_once`,
		`CREATE FUNCTION fail_keys_once() RETURNS trigger AS $$ BEGIN
			IF nextval('fail_keys_once') = 1 THEN RAISE EXCEPTION 'injected failure'; END IF;
			RETURN NEW; END $$ LANGUAGE plpgsql`,
		`CREATE TRIGGER fail_keys_once BEFORE INSERT ON crypto_cross_signing_keys FOR EACH ROW EXECUTE FUNCTION fail_keys_once()`,
	} {
		if _, err := r.db.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
}

// TestFailedShareFetchIsFetchedAgain: the same on a ghost's first key share, which fetches the member's keys
// itself: the failed write fails that message's encryption and stores nothing of the member; the next message
// fetches the member again, shares its key and reaches the member.
func TestFailedShareFetchIsFetchedAgain(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r := startASRig(ctx, t, fakehs.Options{CrossSigningUIA: true}, "")
	defer r.m.Stop()
	if err := r.m.PrepareSender(ctx, r.ghost); err != nil {
		t.Fatal(err)
	}
	failKeysOnce(ctx, t, r)
	if _, err := r.m.Encrypt(ctx, r.ghost, r.room, event.EventMessage, &event.Content{Parsed: &event.MessageEventContent{MsgType: event.MsgText, Body: "lost"}}); err == nil {
		t.Fatal("the injected failure did not reach the ghost's first message (test setup)")
	}
	var devices int
	if err := r.db.QueryRow(ctx, `SELECT COUNT(*) FROM crypto_device WHERE user_id=$1`, r.member.ID).Scan(&devices); err != nil {
		t.Fatal(err)
	} else if devices != 0 {
		t.Errorf("after the failed fetch %d of the member's devices are stored, want none", devices)
	}
	sent := r.sendAs(t, r.ghost, "after the failure")
	r.memberReads(t, sent, "after the failure")
}

// TestFailedKeyFetchIsFetchedAgain: when storing a new sender's keys fails half-way (the database refuses the
// cross-signing keys once), nothing of the fetch stays stored: the next decryption fetches the sender's keys again
// and trusts their device as cross-signed by its owner, instead of finding the device stored without them.
func TestFailedKeyFetchIsFetchedAgain(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r := startASRig(ctx, t, fakehs.Options{CrossSigningUIA: true}, "")
	defer r.m.Stop()
	failKeysOnce(ctx, t, r)
	msg := r.memberSends(t, "first words")
	if err := r.m.HandleTransactionCrypto(ctx, r.srv.TakeAppserviceTransaction()); err != nil {
		t.Fatal(err)
	}
	first, firstErr := r.m.Decrypt(ctx, msg)
	if firstErr == nil && first.Mautrix.TrustState == id.TrustStateCrossSignedTOFU {
		t.Fatal("the injected failure did not happen (test setup)")
	}
	dec, err := r.m.Decrypt(ctx, msg)
	if err != nil {
		t.Fatal(err)
	}
	if dec.Mautrix.TrustState != id.TrustStateCrossSignedTOFU {
		t.Errorf("after a failed fetch the member's device is %s, want cross-signed by its owner (first attempt: %v)", dec.Mautrix.TrustState, firstErr)
	}
}

// decryptMembersFirstMessage starts a rig whose statements are logged, has the member send their first message
// (its room key reaching the bot in a transaction) and decrypts it as the relay does; it returns the decrypted
// event and the reads the decryption made, whole.
func decryptMembersFirstMessage(t *testing.T, body string) (*event.Event, []string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	r, log := startASRigLogged(ctx, t, fakehs.Options{CrossSigningUIA: true})
	t.Cleanup(r.m.Stop)
	msg := r.memberSends(t, body)
	if err := r.m.HandleTransactionCrypto(ctx, r.srv.TakeAppserviceTransaction()); err != nil {
		t.Fatal(err)
	}
	log.takeReads("")
	dec, err := r.m.Decrypt(ctx, msg)
	if err != nil {
		t.Fatal(err)
	}
	if got := dec.Content.AsMessage().Body; got != body {
		t.Errorf("decrypted %q, want %q", got, body)
	}
	return dec, log.takeReads("")
}

// TestReceivedRoomKeyIsNotReadBack: the room key a member's client sends the bot is stored when it arrives, and the
// member's message is then decrypted with it without reading it back from the store.
func TestReceivedRoomKeyIsNotReadBack(t *testing.T) {
	_, reads := decryptMembersFirstMessage(t, "first words")
	if n := countReads(reads, "FROM crypto_megolm_inbound_session "); n != 0 {
		t.Errorf("decrypting read the room key back %d times, want none:\n%s", n, strings.Join(reads, "\n"))
	}
}

// TestKeyFetchReadsTheUserOnce: fetching a new member's keys (their first message) reads what the store holds of
// them (tracked or not, their devices, their cross-signing keys) in one query, and the member's device is then
// trusted as cross-signed by its owner.
func TestKeyFetchReadsTheUserOnce(t *testing.T) {
	dec, reads := decryptMembersFirstMessage(t, "first words")
	if dec.Mautrix.TrustState != id.TrustStateCrossSignedTOFU {
		t.Errorf("the member's device is %s, want cross-signed by its owner", dec.Mautrix.TrustState)
	}
	reads = slices.DeleteFunc(reads, func(q string) bool {
		return !strings.Contains(q, "FROM crypto_tracked_user ") && !strings.Contains(q, "FROM crypto_cross_signing_keys ")
	})
	if len(reads) != 1 {
		t.Errorf("the key fetch read the member's tracking and cross-signing keys in %d queries, want 1:\n%s", len(reads), strings.Join(reads, "\n"))
	}
}

// TestNewMemberTrustReadsNoSignature: the trust of a new member's device (their first message) is resolved
// without reading signatures back: the key fetch found the member untracked and read every signature stored on
// their keys (none) with their devices, and stored the ones it fetched; so whether ferry's bot verified them is
// known to be "no" without a read, and the device is still cross-signed by its owner.
func TestNewMemberTrustReadsNoSignature(t *testing.T) {
	dec, reads := decryptMembersFirstMessage(t, "first words")
	if dec.Mautrix.TrustState != id.TrustStateCrossSignedTOFU {
		t.Errorf("the member's device is %s, want cross-signed by its owner", dec.Mautrix.TrustState)
	}
	alone := slices.DeleteFunc(slices.Clone(reads), func(q string) bool { return strings.Contains(q, "FROM crypto_tracked_user ") })
	if n := countReads(alone, "FROM crypto_cross_signing_signatures "); n != 0 {
		t.Errorf("resolving the new member's trust read signatures %d times apart from their devices, want none:\n%s", n, strings.Join(reads, "\n"))
	}
}

// TestUntrackedUsersSignaturesAreKnown: for a user not tracked, GetDevices reads the signatures stored on their
// keys as well, so the cache answers whether a key is signed, yes or no, as the store does, without asking it; a
// tracked user's signatures are still read where asked about. On both databases.
func TestUntrackedUsersSignaturesAreKnown(t *testing.T) {
	for _, dialect := range dbtest.Dialects {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			db, plain := openCryptoStore(t, dialect, "acct")
			log := &writeLog{DatabaseLogger: db.Log}
			db.Log = log
			cached := &cachedStore{SQLCryptoStore: plain, c: newStoreCache()}
			const bot, untracked, tracked = id.UserID("@bot:x"), id.UserID("@untracked:x"), id.UserID("@tracked:x")
			// The bot verified the untracked user once (its user-signing key signed their master key).
			for _, u := range []id.UserID{untracked, tracked} {
				if err := plain.PutSignature(ctx, u, "master-"+id.Ed25519(u), bot, "bot-usk", "sig"); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := db.Exec(ctx, `INSERT INTO crypto_tracked_user (user_id) VALUES ($1)`, tracked); err != nil {
				t.Fatal(err)
			}
			for _, u := range []id.UserID{untracked, tracked} {
				if _, err := cached.GetDevices(ctx, u); err != nil {
					t.Fatal(err)
				}
				log.takeReads("")
				for _, q := range []struct {
					key, signer id.Ed25519
				}{{"master-" + id.Ed25519(u), "bot-usk"}, {"master-" + id.Ed25519(u), "other-usk"}, {"ssk", "master"}} {
					want, _ := plain.IsKeySignedBy(ctx, u, q.key, bot, q.signer)
					log.takeReads("")
					got, err := cached.IsKeySignedBy(ctx, u, q.key, bot, q.signer)
					if err != nil || got != want {
						t.Errorf("%s: %s signed by %s: %v (%v), the store answers %v", u, q.key, q.signer, got, err, want)
					}
					reads := log.takeReads("crypto_cross_signing_signatures")
					if u == untracked && len(reads) != 0 {
						t.Errorf("%s: %s signed by %s was read from the store, want it known", u, q.key, q.signer)
					} else if u == tracked && len(reads) != 1 {
						t.Errorf("%s: %s signed by %s made %d reads, want 1 (a tracked user's signatures are not read ahead)", u, q.key, q.signer, len(reads))
					}
				}
			}
		})
	}
}

// TestGetDevicesAsStore: the cache's GetDevices answers as mautrix's store does (none for a user not tracked; a
// tracked user's devices not deleted), on both databases, and fills the user's cross-signing keys it read with
// them.
func TestGetDevicesAsStore(t *testing.T) {
	for _, dialect := range dbtest.Dialects {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			db, plain := openCryptoStore(t, dialect, "acct")
			cached := &cachedStore{SQLCryptoStore: plain, c: newStoreCache()}
			const tracked, untracked, keysOnly = id.UserID("@tracked:x"), id.UserID("@untracked:x"), id.UserID("@keys:x")
			devs := []*id.Device{
				{UserID: tracked, DeviceID: "A", IdentityKey: "ika", SigningKey: "ska", Trust: id.TrustStateVerified, Name: "phone"},
				{UserID: tracked, DeviceID: "B", IdentityKey: "ikb", SigningKey: "skb", Deleted: true},
			}
			for _, d := range devs {
				if err := plain.PutDevice(ctx, d.UserID, d); err != nil {
					t.Fatal(err)
				}
			}
			if err := plain.PutDevice(ctx, untracked, &id.Device{UserID: untracked, DeviceID: "C", IdentityKey: "ikc", SigningKey: "skc"}); err != nil {
				t.Fatal(err)
			}
			if _, err := db.Exec(ctx, `INSERT INTO crypto_tracked_user (user_id) VALUES ($1), ($2)`, tracked, keysOnly); err != nil {
				t.Fatal(err)
			}
			if err := plain.PutCrossSigningKey(ctx, tracked, id.XSUsageMaster, "master"); err != nil {
				t.Fatal(err)
			}
			for _, u := range []id.UserID{tracked, untracked, keysOnly, "@nobody:x"} {
				want, wantErr := plain.GetDevices(ctx, u)
				got, err := cached.GetDevices(ctx, u)
				if err != nil || wantErr != nil || (want == nil) != (got == nil) || !reflect.DeepEqual(want, got) {
					t.Errorf("%s: devices %v (%v), the store answers %v (%v)", u, got, err, want, wantErr)
				}
				wantKeys, _ := plain.GetCrossSigningKeys(ctx, u)
				if keys, err := cached.GetCrossSigningKeys(ctx, u); err != nil || !reflect.DeepEqual(keys, wantKeys) {
					t.Errorf("%s: cross-signing keys %v (%v), the store answers %v", u, keys, err, wantKeys)
				}
			}
		})
	}
}
