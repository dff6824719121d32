package crypto

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"testing"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/crypto/goolm/session"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database/dbtest"
)

// testKey makes a key-shaped value (43 characters of unpadded base64, as the store's columns expect).
func testKey(name string) id.Ed25519 {
	sum := sha256.Sum256([]byte(name))
	return id.Ed25519(base64.RawStdEncoding.EncodeToString(sum[:]))
}

func newCachedStore(t *testing.T, db *dbutil.Database, account string, c *storeCache) *cachedStore {
	t.Helper()
	store := crypto.NewSQLCryptoStore(db, dbutil.NoopLogger, account, "", []byte("pickle"))
	if err := store.DB.Upgrade(context.Background()); err != nil {
		t.Fatal(err)
	}
	return &cachedStore{SQLCryptoStore: store, c: c}
}

// writeReplayIndex writes the entries waiting in a store's cache as the relay does: taken, rendered by
// ReplayIndexInsert (the batch adds the placeholders), committed, settled.
func writeReplayIndex(t *testing.T, s *cachedStore) {
	t.Helper()
	entries, settle := s.c.takeReplayIndex()
	ins := ReplayIndexInsert(entries)
	if len(entries) > 0 {
		q := ins.Head + placeholders(1, len(entries), ins.Width) + ins.Tail
		if _, err := s.DB.Exec(context.Background(), q, ins.Args...); err != nil {
			settle(false)
			t.Fatal(err)
		}
	}
	settle(true)
}

// TestReplayIndex: an index belongs to the first event that used it, in memory and, once written, across a
// restart; entries not written before a crash are the only ones lost (which is why the relay writes them with
// the events it records as done).
func TestReplayIndex(t *testing.T) {
	for _, dialect := range dbtest.Dialects {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			db := dbtest.Open(t, dialect)
			s := newCachedStore(t, db, botAccountID, newStoreCache())
			check := func(s *cachedStore, evt id.EventID, index uint, want bool) {
				t.Helper()
				ok, err := s.ValidateMessageIndex(ctx, "S", evt, index, 1000)
				if err != nil || ok != want {
					t.Fatalf("index %d for %s = %v, %v; want %v", index, evt, ok, err, want)
				}
			}
			check(s, "$a", 0, true)
			check(s, "$a", 0, true) // the same event again (a retry) is not a replay
			check(s, "$b", 0, false)
			check(s, "$b", 1, true)
			if ok, _ := s.ValidateMessageIndex(ctx, "S", "", 1, 0); ok {
				t.Fatal("an index in use passed the check without event")
			}
			writeReplayIndex(t, s)
			check(s, "$c", 2, true) // not written

			restarted := newCachedStore(t, db, botAccountID, newStoreCache())
			check(restarted, "$x", 0, false)
			check(restarted, "$b", 1, true)
			check(restarted, "$d", 2, true) // $c's index was never written
		})
	}
}

// twoCachedStores opens the bot's and a ghost's crypto stores over one cache, on a fresh database.
func twoCachedStores(t *testing.T) (db *dbutil.Database, bot, ghost *cachedStore) {
	db = dbtest.Open(t, "postgres")
	c := newStoreCache()
	return db, newCachedStore(t, db, botAccountID, c), newCachedStore(t, db, "@ghost:x", c)
}

// TestTrustCacheFollowsWrites: cross-signing keys, signatures and devices are cached, and a write through any of
// ferry's stores (here another account's) is seen by the next read.
func TestTrustCacheFollowsWrites(t *testing.T) {
	ctx := context.Background()
	_, bot, ghost := twoCachedStores(t)
	const user = id.UserID("@alice:x")
	master, ssk := testKey("master"), testKey("ssk")
	if keys, _ := bot.GetCrossSigningKeys(ctx, user); len(keys) != 0 {
		t.Fatalf("keys before any: %v", keys)
	}
	if signed, _ := bot.IsKeySignedBy(ctx, user, ssk, user, master); signed {
		t.Fatal("signed before any signature")
	}
	if err := ghost.PutCrossSigningKey(ctx, user, id.XSUsageMaster, master); err != nil {
		t.Fatal(err)
	}
	if err := ghost.PutSignature(ctx, user, ssk, user, master, "sig"); err != nil {
		t.Fatal(err)
	}
	if keys, _ := bot.GetCrossSigningKeys(ctx, user); keys[id.XSUsageMaster].Key != master {
		t.Fatalf("new master key not seen: %v", keys)
	}
	if signed, _ := bot.IsKeySignedBy(ctx, user, ssk, user, master); !signed {
		t.Fatal("new signature not seen")
	}
	dev := &id.Device{UserID: user, DeviceID: "D1", IdentityKey: id.Curve25519(testKey("curve")), SigningKey: testKey("device")}
	if err := ghost.PutDevice(ctx, user, dev); err != nil {
		t.Fatal(err)
	}
	got, err := bot.FindDeviceByKey(ctx, user, dev.IdentityKey)
	if err != nil || got == nil || got.DeviceID != "D1" {
		t.Fatalf("device = %+v, %v", got, err)
	}
	changed := *dev
	changed.Name = "renamed"
	if err = ghost.PutDevice(ctx, user, &changed); err != nil {
		t.Fatal(err)
	}
	if got, _ = bot.FindDeviceByKey(ctx, user, dev.IdentityKey); got.Name != "renamed" {
		t.Fatalf("device change not seen: %+v", got)
	}
}

// TestTrustCacheKeepsOtherUsersEntries: a write about one user's keys leaves what the cache holds about every
// other user. Before, any device, key or signature write dropped the whole cache, so while new senders' ghosts
// were set up (a stream of such writes) every message of an established link resolved its sender's trust from
// the database again, queueing for connections behind the set-up.
func TestTrustCacheKeepsOtherUsersEntries(t *testing.T) {
	ctx := context.Background()
	db, bot, ghost := twoCachedStores(t)
	const alice, bob = id.UserID("@alice:x"), id.UserID("@bob:x")
	master, ssk := testKey("master"), testKey("ssk")
	dev := &id.Device{UserID: alice, DeviceID: "D1", IdentityKey: id.Curve25519(testKey("curve")), SigningKey: testKey("device")}
	if err := ghost.PutCrossSigningKey(ctx, alice, id.XSUsageMaster, master); err != nil {
		t.Fatal(err)
	}
	if err := ghost.PutSignature(ctx, alice, ssk, alice, master, "sig"); err != nil {
		t.Fatal(err)
	}
	if err := ghost.PutDevice(ctx, alice, dev); err != nil {
		t.Fatal(err)
	}
	// Alice's entries are read (and cached), then her rows go away behind the cache's back: from here on, only
	// the cache can answer for her.
	_, _ = bot.GetCrossSigningKeys(ctx, alice)
	_, _ = bot.IsKeySignedBy(ctx, alice, ssk, alice, master)
	_, _ = bot.FindDeviceByKey(ctx, alice, dev.IdentityKey)
	for _, q := range []string{
		`DELETE FROM crypto_cross_signing_keys WHERE user_id=$1`,
		`DELETE FROM crypto_cross_signing_signatures WHERE signed_user_id=$1`,
		`DELETE FROM crypto_device WHERE user_id=$1`,
	} {
		if _, err := db.Exec(ctx, q, alice); err != nil {
			t.Fatal(err)
		}
	}
	// Writes about Bob.
	bobDev := &id.Device{UserID: bob, DeviceID: "B1", IdentityKey: id.Curve25519(testKey("bob-curve")), SigningKey: testKey("bob-device")}
	if err := ghost.PutDevice(ctx, bob, bobDev); err != nil {
		t.Fatal(err)
	}
	if err := ghost.PutCrossSigningKey(ctx, bob, id.XSUsageMaster, testKey("bob-master")); err != nil {
		t.Fatal(err)
	}
	if err := ghost.PutSignature(ctx, bob, testKey("bob-ssk"), bob, testKey("bob-master"), "sig"); err != nil {
		t.Fatal(err)
	}
	if keys, _ := bot.GetCrossSigningKeys(ctx, alice); keys[id.XSUsageMaster].Key != master {
		t.Errorf("after writes about another user, Alice's keys were read again: %v", keys)
	}
	if signed, _ := bot.IsKeySignedBy(ctx, alice, ssk, alice, master); !signed {
		t.Error("after writes about another user, Alice's signature was read again")
	}
	if got, _ := bot.FindDeviceByKey(ctx, alice, dev.IdentityKey); got == nil || got.DeviceID != "D1" {
		t.Errorf("after writes about another user, Alice's device was read again: %+v", got)
	}
	// A write about Alice herself is seen.
	if err := ghost.PutCrossSigningKey(ctx, alice, id.XSUsageMaster, testKey("new-master")); err != nil {
		t.Fatal(err)
	}
	if keys, _ := bot.GetCrossSigningKeys(ctx, alice); keys[id.XSUsageMaster].Key != testKey("new-master") {
		t.Errorf("Alice's new master key not seen: %v", keys)
	}
	// A device write about her drops her entry (a cross-signing write applies itself to it: see
	// TestTrustCacheWritesThrough).
	if err := ghost.PutDevice(ctx, alice, dev); err != nil {
		t.Fatal(err)
	}
	if signed, _ := bot.IsKeySignedBy(ctx, alice, ssk, alice, master); signed {
		t.Error("after a device write about Alice, her removed signature is still cached")
	}
}

// TestOutboundSessionsInMemory: a shared outbound session is kept in memory and its ratchet written only by a
// flush, or when it expires (so that the share path, which reads the store, sees it expired).
func TestOutboundSessionsInMemory(t *testing.T) {
	ctx := context.Background()
	db := dbtest.Open(t, "postgres")
	s := newCachedStore(t, db, "@ghost:x", newStoreCache())
	const room = id.RoomID("!r:x")
	sess, err := crypto.NewOutboundGroupSession(room, &event.EncryptionEventContent{RotationPeriodMessages: 3}, nil)
	if err != nil {
		t.Fatal(err)
	}
	sess.Shared = true
	if err = s.SQLCryptoStore.AddOutboundGroupSession(ctx, sess); err != nil {
		t.Fatal(err)
	}
	stored := func() int {
		t.Helper()
		got, err := s.SQLCryptoStore.GetOutboundGroupSession(ctx, room)
		if err != nil || got == nil {
			t.Fatalf("stored session: %v", err)
		}
		return got.MessageCount
	}
	use := func() *crypto.OutboundGroupSession {
		t.Helper()
		got, err := s.GetOutboundGroupSession(ctx, room)
		if err != nil || got == nil {
			t.Fatalf("get: %v", err)
		}
		if !got.Expired() {
			if _, err = got.Encrypt([]byte("x")); err != nil {
				t.Fatal(err)
			}
			if err = s.UpdateOutboundGroupSession(ctx, got); err != nil {
				t.Fatal(err)
			}
		}
		return got
	}
	first := use()
	if second := use(); second != first || stored() != 0 {
		t.Fatalf("not kept in memory: same object %v, stored count %d", second == first, stored())
	}
	if err = s.c.flushOutbound(ctx); err != nil {
		t.Fatal(err)
	}
	if n := stored(); n != 2 {
		t.Fatalf("stored count after flush = %d, want 2", n)
	}
	use() // third message: the session is used up
	if got := use(); !got.Expired() || stored() != 3 {
		t.Fatalf("expired session: expired %v, stored count %d; want the final state written", got.Expired(), stored())
	}
}

// TestUncleanStopRotatesOutboundSessions: outbound sessions survive a clean stop and are discarded after any
// other, since their stored ratchet may lag behind what was sent.
func TestUncleanStopRotatesOutboundSessions(t *testing.T) {
	ctx := context.Background()
	db := dbtest.Open(t, "postgres")
	cfg := DefaultConfig()
	cfg.PickleKey = "pickle"
	m := NewMachine(zerolog.Nop(), cfg, db, nil, &mautrix.Client{UserID: "@bot:x"}, nil)
	if err := m.open(ctx); err != nil {
		t.Fatal(err)
	}
	ghost := m.storeFor("@ghost:x")
	addSession := func() {
		t.Helper()
		sess, err := crypto.NewOutboundGroupSession("!r:x", nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err = ghost.AddOutboundGroupSession(ctx, sess); err != nil {
			t.Fatal(err)
		}
	}
	present := func() bool {
		t.Helper()
		got, err := ghost.GetOutboundGroupSession(ctx, "!r:x")
		if err != nil {
			t.Fatal(err)
		}
		return got != nil
	}
	addSession()
	// First start (no marker): treated as unclean.
	if err := m.checkCleanStop(ctx); err != nil {
		t.Fatal(err)
	}
	if present() {
		t.Fatal("outbound session kept after a start without a clean-stop marker")
	}
	addSession()
	// Killed while running: the marker still says "in use".
	if err := m.checkCleanStop(ctx); err != nil || present() {
		t.Fatalf("outbound session kept after an unclean stop (err %v)", err)
	}
	addSession()
	if err := m.storeFor("@bot:x").PutSecret(ctx, outboundCleanSecret, "yes"); err != nil {
		t.Fatal(err)
	}
	if err := m.checkCleanStop(ctx); err != nil || !present() {
		t.Fatalf("outbound session dropped after a clean stop (err %v)", err)
	}
	// Started after that clean stop, then killed: the start must have marked the store in use again.
	addSession()
	if err := m.checkCleanStop(ctx); err != nil || present() {
		t.Fatalf("outbound session kept after a kill that followed a clean stop (err %v)", err)
	}
}

// TestDestroySessionForgetsMemory: once a session's keys are destroyed (disappearing messages), neither the
// inbound copy cached for decryption nor the outbound session held between writes is found any more.
func TestDestroySessionForgetsMemory(t *testing.T) {
	ctx := context.Background()
	db := dbtest.Open(t, "postgres")
	c := newStoreCache()
	s := newCachedStore(t, db, "@ghost:x", c)
	m := &Machine{db: db, cache: c}
	const room = id.RoomID("!r:x")
	out, err := crypto.NewOutboundGroupSession(room, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	out.Shared = true
	in, err := crypto.NewInboundGroupSession("sender", "signing", room, out.Internal.Key(), 0, 0, nil, false)
	if err != nil {
		t.Fatal(err)
	}
	if err = s.SQLCryptoStore.AddOutboundGroupSession(ctx, out); err != nil {
		t.Fatal(err)
	}
	if err = s.SQLCryptoStore.PutGroupSession(ctx, in); err != nil {
		t.Fatal(err)
	}
	// Read once each: now both are held in memory.
	if got, err := s.GetOutboundGroupSession(ctx, room); err != nil || got == nil {
		t.Fatalf("outbound session not found: %v", err)
	}
	if got, err := s.GetGroupSession(ctx, room, out.ID()); err != nil || got == nil {
		t.Fatalf("inbound session not found: %v", err)
	}
	if _, err = m.DestroySession(ctx, room, out.ID()); err != nil {
		t.Fatal(err)
	}
	if got, err := s.GetOutboundGroupSession(ctx, room); err != nil || got != nil {
		t.Errorf("outbound session still found after its keys were destroyed (err %v)", err)
	}
	if got, err := s.GetGroupSession(ctx, room, out.ID()); err != nil || got != nil {
		t.Errorf("inbound session still found after its keys were destroyed (err %v)", err)
	}
}

// TestInboundRatchetFollowsDecrypts: the cached inbound session's latest ratchet moves with each decrypted
// message (so the next one steps from there), never backwards, and an earlier message still decrypts; the stored
// session keeps its ratchets.
func TestInboundRatchetFollowsDecrypts(t *testing.T) {
	ctx := context.Background()
	db := dbtest.Open(t, "postgres")
	s := newCachedStore(t, db, botAccountID, newStoreCache())
	const room = id.RoomID("!r:x")
	out, err := crypto.NewOutboundGroupSession(room, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	in, err := crypto.NewInboundGroupSession("sender", "signing", room, out.Internal.Key(), 0, 0, nil, false)
	if err != nil {
		t.Fatal(err)
	}
	if err = s.SQLCryptoStore.PutGroupSession(ctx, in); err != nil {
		t.Fatal(err)
	}
	var cts [][]byte
	for i := 0; i < 40; i++ {
		ct, err := out.Internal.Encrypt([]byte(fmt.Sprintf("message %d", i)))
		if err != nil {
			t.Fatal(err)
		}
		cts = append(cts, ct)
	}
	latest := func() uint32 {
		t.Helper()
		sess, err := s.GetGroupSession(ctx, room, out.ID())
		if err != nil || sess == nil {
			t.Fatalf("session not found: %v", err)
		}
		return sess.Internal.(*session.MegolmInboundSession).Ratchet.Counter
	}
	decrypt := func(i int) {
		t.Helper()
		sess, err := s.GetGroupSession(ctx, room, out.ID())
		if err != nil || sess == nil {
			t.Fatalf("session not found: %v", err)
		}
		plain, index, err := sess.Internal.Decrypt(cts[i])
		if err != nil || string(plain) != fmt.Sprintf("message %d", i) || index != uint(i) {
			t.Fatalf("message %d decrypted to %q at %d: %v", i, plain, index, err)
		}
		if ok, err := s.ValidateMessageIndex(ctx, out.ID(), id.EventID(fmt.Sprintf("$%d", i)), index, int64(i)); err != nil || !ok {
			t.Fatalf("index %d refused: %v", i, err)
		}
	}
	for _, i := range []int{0, 1, 2, 30, 31} {
		decrypt(i)
		if got := latest(); got != uint32(i) {
			t.Fatalf("after message %d the cached ratchet is at %d", i, got)
		}
	}
	decrypt(5) // an earlier index: decrypts from the initial ratchet, and the latest one stays
	if got := latest(); got != 31 {
		t.Fatalf("an earlier message moved the cached ratchet back to %d", got)
	}
	if ok, _ := s.ValidateMessageIndex(ctx, out.ID(), "$other", 39, 1); !ok {
		t.Fatal("a new index was refused")
	}
	if ok, _ := s.ValidateMessageIndex(ctx, out.ID(), "$replay", 39, 2); ok {
		t.Fatal("a replayed index was accepted")
	}
	if got := latest(); got != 39 {
		t.Fatalf("the cached ratchet is at %d, want 39", got)
	}
	stored, err := s.SQLCryptoStore.GetGroupSession(ctx, room, out.ID())
	if err != nil || stored.Internal.(*session.MegolmInboundSession).Ratchet.Counter != 0 {
		t.Fatalf("the stored session's ratchet moved: %v", err)
	}
}

// TestTrustCacheWritesThrough: a committed cross-signing key or signature applies itself to the cached entry, with
// the store's rules (the first key seen for a usage is kept), so the reads that follow it are answered from memory:
// a key fetch stores a user's keys one by one, reading them between, and trust is resolved from them right after.
// A write inside a transaction, or one that overlapped another write about the same user, drops the entry.
func TestTrustCacheWritesThrough(t *testing.T) {
	ctx := context.Background()
	db, bot, ghost := twoCachedStores(t)
	const alice = id.UserID("@alice:x")
	m1, m2, ssk := testKey("master-1"), testKey("master-2"), testKey("ssk")
	same := func(step string) {
		t.Helper()
		cached, err := bot.GetCrossSigningKeys(ctx, alice)
		stored, err2 := bot.SQLCryptoStore.GetCrossSigningKeys(ctx, alice)
		if err != nil || err2 != nil || fmt.Sprint(cached) != fmt.Sprint(stored) {
			t.Fatalf("%s: cached keys %v (%v), stored %v (%v)", step, cached, err, stored, err2)
		}
	}
	same("before any")
	if err := ghost.PutCrossSigningKey(ctx, alice, id.XSUsageMaster, m1); err != nil {
		t.Fatal(err)
	}
	same("first master key")
	if err := ghost.PutCrossSigningKey(ctx, alice, id.XSUsageMaster, m2); err != nil {
		t.Fatal(err)
	}
	same("replaced master key (the first seen is kept)")
	if err := ghost.PutSignature(ctx, alice, ssk, alice, m2, "sig"); err != nil {
		t.Fatal(err)
	}
	// Alice's rows go behind the cache's back: what follows is answered from memory.
	for _, q := range []string{`DELETE FROM crypto_cross_signing_keys WHERE user_id=$1`, `DELETE FROM crypto_cross_signing_signatures WHERE signed_user_id=$1`} {
		if _, err := db.Exec(ctx, q, alice); err != nil {
			t.Fatal(err)
		}
	}
	if keys, _ := bot.GetCrossSigningKeys(ctx, alice); keys[id.XSUsageMaster] != (id.CrossSigningKey{Key: m2, First: m1}) {
		t.Errorf("keys after the writes were read again: %v", keys)
	}
	if signed, _ := bot.IsKeySignedBy(ctx, alice, ssk, alice, m2); !signed {
		t.Error("the signature just written was read again")
	}

	// A signature written in a transaction that rolls back is not cached.
	other := testKey("other-ssk")
	_ = db.DoTxn(ctx, nil, func(ctx context.Context) error {
		if err := ghost.PutSignature(ctx, alice, other, alice, m2, "sig"); err != nil {
			t.Fatal(err)
		}
		return fmt.Errorf("roll back")
	})
	if signed, _ := bot.IsKeySignedBy(ctx, alice, other, alice, m2); signed {
		t.Error("a signature whose transaction rolled back is cached as written")
	}

	// A write that overlapped a drop of every entry (a signer's keys reset) leaves nothing behind.
	since := bot.c.trustWrite()
	bot.c.allTrustChanged()
	bot.c.trustWritten(alice, since, true, func(t *cachedTrust) {
		t.xsKeys = map[id.CrossSigningUsage]id.CrossSigningKey{id.XSUsageMaster: {Key: m1}}
	})
	if keys, _ := bot.GetCrossSigningKeys(ctx, alice); len(keys) != 0 {
		t.Errorf("an overlapping write filled the cache: %v", keys)
	}
}

// TestNoOutboundSessionIsRemembered: that an account has no outbound session in a room is read from the store
// once (a new ghost's first message asks three times before its session exists); adding or removing a session
// through the store is seen at once, and other rooms are read as before.
func TestNoOutboundSessionIsRemembered(t *testing.T) {
	ctx := context.Background()
	db := dbtest.Open(t, "postgres")
	s := newCachedStore(t, db, "@ghost:x", newStoreCache())
	const room, other = id.RoomID("!r:x"), id.RoomID("!other:x")
	newSession := func(room id.RoomID) *crypto.OutboundGroupSession {
		t.Helper()
		sess, err := crypto.NewOutboundGroupSession(room, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		sess.Shared = true
		return sess
	}
	get := func(room id.RoomID) *crypto.OutboundGroupSession {
		t.Helper()
		got, err := s.GetOutboundGroupSession(ctx, room)
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	if get(room) != nil {
		t.Fatal("a session before any was added")
	}
	// Behind the cache's back: the absence is remembered.
	if err := s.SQLCryptoStore.AddOutboundGroupSession(ctx, newSession(room)); err != nil {
		t.Fatal(err)
	}
	if get(room) != nil {
		t.Fatal("the store was read again for a room known to have no session")
	}
	if err := s.SQLCryptoStore.RemoveOutboundGroupSession(ctx, room); err != nil {
		t.Fatal(err)
	}
	// Through the store: seen at once.
	added := newSession(room)
	if err := s.AddOutboundGroupSession(ctx, added); err != nil {
		t.Fatal(err)
	}
	if got := get(room); got == nil || got.ID() != added.ID() {
		t.Fatalf("added session not seen: %v", got)
	}
	if err := s.RemoveOutboundGroupSession(ctx, room); err != nil {
		t.Fatal(err)
	}
	if get(room) != nil {
		t.Fatal("removed session still seen")
	}
	// Another room of the same account is not marked by the first: its session, added behind the back, is read.
	fresh := newSession(other)
	if err := s.SQLCryptoStore.AddOutboundGroupSession(ctx, fresh); err != nil {
		t.Fatal(err)
	}
	if got := get(other); got == nil || got.ID() != fresh.ID() {
		t.Fatalf("another room's session not read: %v", got)
	}
}
