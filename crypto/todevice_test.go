package crypto

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database/dbtest"
	"go.ferry.im/ferry/internal/fakehs"
	"go.ferry.im/ferry/internal/faultproxy"
)

// cutAfter takes the database away (as a crash or a restart of PostgreSQL does) right after the first statement
// containing match that runs while it is armed: what ferry does next cannot reach the database.
type cutAfter struct {
	dbutil.DatabaseLogger
	proxy *faultproxy.TCP
	mu    sync.Mutex
	match string
	cut   chan struct{}
}

func (c *cutAfter) arm(match string) {
	c.mu.Lock()
	c.match, c.cut = match, make(chan struct{})
	c.mu.Unlock()
}

func (c *cutAfter) QueryTiming(_ context.Context, _, query string, _ []any, _ int, _ time.Duration, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.match != "" && err == nil && strings.Contains(query, c.match) {
		c.match = ""
		c.proxy.Down()
		close(c.cut)
	}
}

// toDeviceRig is the appservice rig on a database the test can cut off, in either encryption mode.
type toDeviceRig struct {
	*asRig
	cut    *cutAfter
	asMode bool
}

func newToDeviceRig(t *testing.T, asMode bool) *toDeviceRig {
	t.Helper()
	db, proxy := dbtest.PostgresThroughProxy(t)
	cut := &cutAfter{DatabaseLogger: dbutil.NoopLogger, proxy: proxy}
	db.Log = cut
	r := newASRigOn(t, fakehs.Options{NoMSC4190: !asMode}, "", db)
	return &toDeviceRig{asRig: r, cut: cut, asMode: asMode}
}

// start initialises and starts a Machine (a fresh one after a "crash"), stopped when the test ends.
func (r *toDeviceRig) start(ctx context.Context, t *testing.T) {
	t.Helper()
	// On the /sync path encryption.appservice is off, as on Dendrite.
	r.m.cfg.Appservice = r.asMode
	if err := r.m.Init(ctx); err != nil {
		t.Fatal(err)
	}
	if r.m.AppserviceMode() != r.asMode {
		t.Fatalf("the Machine's appservice mode is %v, want %v", r.m.AppserviceMode(), r.asMode)
	}
	r.m.Start(ctx)
	t.Cleanup(r.m.Stop)
}

// deliver hands the bot the member's to-device messages: in appservice mode as one transaction, whose body it
// returns with the Machine's answer; on the /sync path the Machine's own loop fetches them.
func (r *toDeviceRig) deliver(ctx context.Context) (json.RawMessage, error) {
	if !r.asMode {
		return nil, nil
	}
	txn := r.srv.TakeAppserviceTransaction()
	return txn, r.m.HandleTransactionCrypto(ctx, txn)
}

// outageAfter takes the database away right after the next statement that mentions match, for 1.5 s.
func (r *toDeviceRig) outageAfter(ctx context.Context, match string) {
	r.cut.arm(match)
	go func() {
		select {
		case <-r.cut.cut:
			time.Sleep(1500 * time.Millisecond)
			r.cut.proxy.Up()
		case <-ctx.Done():
		}
	}()
}

// botReads waits until the bot decrypts evt.
func (r *toDeviceRig) botReads(ctx context.Context, t *testing.T, evt *event.Event, body, when string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		dec, err := r.m.Decrypt(ctx, evt)
		if err == nil {
			if got := dec.Content.AsMessage().Body; got != body {
				t.Fatalf("%s: the bot decrypted %q, want %q", when, got, body)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: the bot cannot decrypt the member's %q: %v (its room key was lost)", when, body, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// newMemberSession makes the member's client start a new Megolm session at its next message (as it does after
// 100 messages or a week), so that message carries a new room key to the bot.
func (r *toDeviceRig) newMemberSession(ctx context.Context, t *testing.T) {
	t.Helper()
	if err := r.member.Machine.CryptoStore.RemoveOutboundGroupSession(ctx, r.room); err != nil {
		t.Fatal(err)
	}
}

// TestRoomKeyOutlivesACrashWhileItIsStored: ferry is killed while it stores a member's room key, at each point
// where the key's Olm message was partly handled, and the homeserver delivers the message again to the next
// run (ferry had not acknowledged it). The next run must read the member's messages of that session, and the
// member's next room key must reach it too. Before the key's handling was one unit, a kill after mautrix
// recorded the message's hash, or saved the Olm session it advanced, lost the key for good: the redelivery was
// ignored as a duplicate, and clients forward an old session's key to no other user.
func TestRoomKeyOutlivesACrashWhileItIsStored(t *testing.T) {
	defer dbtest.SetConnectWait(300 * time.Millisecond)() // the killed run's statements fail at once
	for _, mode := range []struct {
		name   string
		asMode bool
	}{{"sync", false}, {"appservice", true}} {
		for _, tc := range []struct {
			name     string
			existing bool   // the member's Olm session with the bot exists (an earlier key came through it)
			after    string // the statement the kill follows
		}{
			{"new Olm session, after the message hash", false, "INSERT INTO crypto_olm_message_hash"},
			{"new Olm session, after the Olm session", false, "INSERT INTO crypto_olm_session"},
			{"new Olm session, after the room key", false, "INSERT INTO crypto_megolm_inbound_session"},
			{"existing Olm session, after the message hash", true, "INSERT INTO crypto_olm_message_hash"},
			{"existing Olm session, after the Olm session", true, "UPDATE crypto_olm_session"},
		} {
			t.Run(mode.name+"/"+tc.name, func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
				defer cancel()
				r := newToDeviceRig(t, mode.asMode)
				// The first run works under a context of its own: cancelling it is the kill (no clean stop).
				runCtx, kill := context.WithCancel(ctx)
				r.start(runCtx, t)
				if tc.existing {
					warm := r.memberSends(t, "before")
					if _, err := r.deliver(runCtx); err != nil {
						t.Fatal(err)
					}
					r.botReads(ctx, t, warm, "before", "the first key")
					r.newMemberSession(ctx, t)
				}

				r.cut.arm(tc.after)
				msg := r.memberSends(t, "the key of this one was being stored")
				delivered := make(chan json.RawMessage, 1)
				go func() {
					txn, _ := r.deliver(runCtx)
					delivered <- txn
				}()
				select {
				case <-r.cut.cut:
				case <-ctx.Done():
					t.Fatalf("ferry never ran %q while handling the room key", tc.after)
				}
				// The kill: this run is gone, nothing it does from here reaches the database.
				kill()
				txn := <-delivered
				r.cut.proxy.Up()

				r.m = r.newMachine(t)
				r.start(ctx, t)
				if mode.asMode {
					// The transaction was never answered: the homeserver sends it again.
					if err := r.m.HandleTransactionCrypto(ctx, txn); err != nil {
						t.Fatal(err)
					}
				}
				r.botReads(ctx, t, msg, "the key of this one was being stored", "after the restart")

				r.newMemberSession(ctx, t)
				next := r.memberSends(t, "a new session after the restart")
				if _, err := r.deliver(ctx); err != nil {
					t.Fatal(err)
				}
				r.botReads(ctx, t, next, "a new session after the restart", "the member's next key")
			})
		}
	}
}

// TestRoomKeyOutlivesADatabaseOutage: PostgreSQL goes away while ferry handles a member's room key, for longer
// than a statement waits for a connection, and comes back; ferry keeps running. The key must arrive: on the
// /sync path the batch is handled again once the database is back, in appservice mode the transaction is refused
// and the homeserver's retry carries it. Before, the failed reads made mautrix drop the message ("Failed to
// decrypt to-device event") and ferry acknowledged it. With an existing Olm session the outage also hits the
// save of the session the key advanced.
func TestRoomKeyOutlivesADatabaseOutage(t *testing.T) {
	defer dbtest.SetConnectWait(300 * time.Millisecond)()
	for _, mode := range []struct {
		name     string
		asMode   bool
		existing bool // the member's Olm session with the bot exists: the key advances it
	}{{"sync", false, false}, {"appservice", true, false}, {"sync/existing Olm session", false, true}, {"appservice/existing Olm session", true, true}} {
		t.Run(mode.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
			defer cancel()
			r := newToDeviceRig(t, mode.asMode)
			r.start(ctx, t)
			if mode.existing {
				warm := r.memberSends(t, "before")
				if _, err := r.deliver(ctx); err != nil {
					t.Fatal(err)
				}
				r.botReads(ctx, t, warm, "before", "the first key")
				r.newMemberSession(ctx, t)
			}
			// New session: the database goes away after the duplicate check, before the key is read. Existing
			// session: after the unit's save began, which then fails with the Olm session advanced in memory
			// (set back in place, TestUnitRevertWaitsForTheDatabase).
			cut := "crypto_olm_message_hash"
			if mode.existing {
				cut = "INSERT INTO crypto_olm_message_hash"
			}
			r.outageAfter(ctx, cut)
			msg := r.memberSends(t, "sent while the database restarts")
			txn, err := r.deliver(ctx)
			if mode.asMode {
				<-r.cut.cut
				if err == nil {
					t.Log("the transaction was answered as handled: the homeserver will not send it again")
				} else {
					for err != nil && ctx.Err() == nil {
						time.Sleep(500 * time.Millisecond) // the homeserver's retry
						err = r.m.HandleTransactionCrypto(ctx, txn)
					}
				}
			}
			r.botReads(ctx, t, msg, "sent while the database restarts", "after the outage")
		})
	}
}

// TestCatchUpKeepsItsPageOnAnOutage: in appservice mode a room key whose push was lost is fetched from the bot
// device's to-device inbox (CatchUpToDevice). When the database goes away while the key is handled, the catch-up
// fails without storing the page's token, so the next catch-up fetches the key again and the bot reads the message;
// a stored token would have let the homeserver delete it for good.
func TestCatchUpKeepsItsPageOnAnOutage(t *testing.T) {
	defer dbtest.SetConnectWait(300 * time.Millisecond)()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	r := newToDeviceRig(t, true)
	r.start(ctx, t)
	msg := r.memberSends(t, "its push was lost")
	// The push never comes; the key waits in the bot device's inbox. The database goes away right after the
	// catch-up's duplicate check and comes back 1.5 s later.
	r.outageAfter(ctx, "crypto_olm_message_hash")
	if _, err := r.m.CatchUpToDevice(ctx, time.Now()); err == nil {
		t.Fatal("the catch-up succeeded although the database went away while it handled the key")
	}
	for {
		n, err := r.m.CatchUpToDevice(ctx, time.Now())
		if err == nil {
			if n != 1 {
				t.Fatalf("the catch-up after the outage handled %d messages, want the room key again", n)
			}
			break
		}
		if ctx.Err() != nil {
			t.Fatal(err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	r.botReads(ctx, t, msg, "its push was lost", "after the outage")
}

// TestToDeviceUnitAbortsOnlyOnPassingErrors: a store error the caller counts as passing (the database away) aborts
// the unit, keeping none of its Olm writes so that the message is handled again; any other (a corrupt row, which
// would fail every try) leaves the handling as mautrix ended it, and the Olm writes are saved.
func TestToDeviceUnitAbortsOnlyOnPassingErrors(t *testing.T) {
	ctx := context.Background()
	store, s := newUnitStore(t)
	for i, tc := range []struct {
		passing bool
		kept    bool
	}{{passing: true, kept: false}, {passing: false, kept: true}} {
		hash := [32]byte{byte(i + 1)}
		err := s.handleUnit(ctx, func(error) bool { return tc.passing }, func(ctx context.Context) {
			_ = s.PutOlmHash(ctx, hash, time.Now())
			_ = noteStoreErr(ctx, errors.New("the store failed"))
		})
		if got := errors.Is(err, ErrToDeviceAborted); got == tc.kept {
			t.Errorf("passing error %v: aborted %v (%v), want %v", tc.passing, got, err, !tc.kept)
		}
		at, err := store.GetOlmHash(ctx, hash)
		if err != nil {
			t.Fatal(err)
		}
		if kept := !at.IsZero(); kept != tc.kept {
			t.Errorf("passing error %v: the message hash was kept: %v, want %v", tc.passing, kept, tc.kept)
		}
	}
}

// TestToDeviceUnitDropsWhatCannotBeSaved: when saving a unit's Olm writes fails with an error that will not pass
// (here a table the write needs is gone), the unit is not aborted (the caller would be handed the message again
// and again, holding every later one up): it reports ErrToDeviceDropped; an error that may pass still aborts.
func TestToDeviceUnitDropsWhatCannotBeSaved(t *testing.T) {
	ctx := context.Background()
	store, s := newUnitStore(t)
	if _, err := store.DB.Exec(ctx, "ALTER TABLE crypto_olm_message_hash RENAME TO crypto_olm_message_hash_gone"); err != nil {
		t.Fatal(err)
	}
	for _, passing := range []bool{false, true} {
		err := s.handleUnit(ctx, func(error) bool { return passing }, func(ctx context.Context) {
			_ = s.PutOlmHash(ctx, [32]byte{1}, time.Now())
		})
		if dropped, aborted := errors.Is(err, ErrToDeviceDropped), errors.Is(err, ErrToDeviceAborted); dropped == passing || aborted != passing {
			t.Errorf("save error that may pass: %v: dropped %v, aborted %v (%v)", passing, dropped, aborted, err)
		}
	}
	// A save cut short by ferry stopping is not dropped, whatever the error: the message comes again.
	stopping, stop := context.WithCancel(ctx)
	err := s.handleUnit(stopping, func(error) bool { return false }, func(ctx context.Context) {
		_ = s.PutOlmHash(ctx, [32]byte{2}, time.Now())
		stop()
	})
	if !errors.Is(err, ErrToDeviceAborted) {
		t.Errorf("a save whose context ended: %v, want it aborted", err)
	}
}

// newUnitStore is a crypto store on PostgreSQL with an account, and ferry's Olm store over it.
func newUnitStore(t *testing.T) (*crypto.SQLCryptoStore, *olmStore) {
	t.Helper()
	return newUnitStoreOn(t, dbtest.Open(t, "postgres"))
}

func newUnitStoreOn(t *testing.T, db *dbutil.Database) (*crypto.SQLCryptoStore, *olmStore) {
	t.Helper()
	ctx := context.Background()
	store := crypto.NewSQLCryptoStore(db, dbutil.NoopLogger, "acct", "DEVICE", []byte("pickle key"))
	if err := store.DB.Upgrade(ctx); err != nil {
		t.Fatal(err)
	}
	if err := store.PutAccount(ctx, crypto.NewOlmAccount()); err != nil {
		t.Fatal(err)
	}
	return store, newOlmStore(&cachedStore{SQLCryptoStore: store, c: newStoreCache()}, "@acct:x")
}

// TestDroppedToDeviceMessageIsAcknowledged: a member's room key whose Olm state cannot be saved for good (here a
// table the save needs is gone, an error retrying cannot fix) is dropped and acknowledged: in appservice mode the
// transaction is answered as handled, on the /sync path the loop goes on. Refused instead, the homeserver would
// send the message again and again, and hold every later one up behind it: the member's next room key, sent once
// the table is back, must reach the bot.
func TestDroppedToDeviceMessageIsAcknowledged(t *testing.T) {
	for _, mode := range []struct {
		name   string
		asMode bool
	}{{"sync", false}, {"appservice", true}} {
		t.Run(mode.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
			defer cancel()
			r := newToDeviceRig(t, mode.asMode)
			r.m.Transient = func(error) bool { return false }
			r.start(ctx, t)
			rename := func(from, to string) {
				t.Helper()
				if _, err := r.db.Exec(ctx, "ALTER TABLE "+from+" RENAME TO "+to); err != nil {
					t.Fatal(err)
				}
			}
			rename("crypto_olm_message_hash", "crypto_olm_message_hash_gone")
			r.memberSends(t, "its key cannot be saved")
			if _, err := r.deliver(ctx); err != nil {
				t.Fatalf("the transaction with the message that cannot be saved was refused: %v", err)
			}
			if mode.asMode {
				rename("crypto_olm_message_hash_gone", "crypto_olm_message_hash")
			} else {
				// The /sync loop takes the message in its own time: wait until it was dropped.
				deadline := time.Now().Add(20 * time.Second)
				for len(r.logs.warnings("Dropped a to-device message")) == 0 {
					if time.Now().After(deadline) {
						t.Fatal("the /sync loop did not drop the message that cannot be saved")
					}
					time.Sleep(50 * time.Millisecond)
				}
				// Acknowledged: the loop does not take the same message again (a refused one is retried after
				// 0.5 s, 1.5 s, …, and dropped again each time).
				time.Sleep(2 * time.Second)
				if n := len(r.logs.warnings("Dropped a to-device message")); n != 1 {
					t.Fatalf("the message was dropped %d times: the /sync loop took it again", n)
				}
				rename("crypto_olm_message_hash_gone", "crypto_olm_message_hash")
			}
			r.newMemberSession(ctx, t)
			msg := r.memberSends(t, "sent after it")
			if _, err := r.deliver(ctx); err != nil {
				t.Fatalf("the next transaction was refused: %v", err)
			}
			r.botReads(ctx, t, msg, "sent after it", "after a dropped message")
		})
	}
}

// TestUnitRevertWaitsForTheDatabase: when a to-device message's unit is aborted because the database went away,
// the Olm session it advanced is set back to its stored state although the database is still away at that
// moment (it is read once it is back): the message's redelivery must decrypt. The revert used to try once and
// then only forget the session, which mautrix's own session cache kept handing out advanced, so the redelivery
// could not be decrypted (an Olm message decrypts once) and the room key it carried was lost.
func TestUnitRevertWaitsForTheDatabase(t *testing.T) {
	defer dbtest.SetConnectWait(300 * time.Millisecond)()
	ctx := context.Background()
	db, proxy := dbtest.PostgresThroughProxy(t)
	store, s := newUnitStoreOn(t, db)

	bob, aliceIdentity, typ, first, second := olmPair(t)
	in, err := bob.NewInboundSession(string(first))
	if err != nil {
		t.Fatal(err)
	}
	if _, err = in.Decrypt(string(first), typ); err != nil {
		t.Fatal(err)
	}
	key := id.SenderKey(aliceIdentity)
	if err = store.AddSession(ctx, key, &crypto.OlmSession{Internal: in}); err != nil {
		t.Fatal(err)
	}
	sessions, err := s.GetSessions(ctx, key)
	if err != nil || len(sessions) != 1 {
		t.Fatalf("stored sessions: %d (%v)", len(sessions), err)
	}
	inUse := sessions[0]

	up := make(chan struct{})
	err = s.handleUnit(ctx, func(error) bool { return true }, func(ctx context.Context) {
		if _, err := inUse.Internal.Decrypt(string(second), typ); err != nil {
			t.Errorf("the first delivery does not decrypt: %v", err)
		}
		_ = s.UpdateSession(ctx, key, inUse)
		proxy.Down()
		_ = noteStoreErr(ctx, errors.New("the database went away"))
		time.AfterFunc(time.Second, func() { proxy.Up(); close(up) })
	})
	if !errors.Is(err, ErrToDeviceAborted) {
		t.Fatalf("the unit: %v, want it aborted", err)
	}
	<-up
	sessions, err = s.GetSessions(ctx, key)
	if err != nil || len(sessions) != 1 {
		t.Fatalf("stored sessions after the outage: %d (%v)", len(sessions), err)
	}
	if got, err := sessions[0].Internal.Decrypt(string(second), typ); err != nil || string(got) != "second" {
		t.Fatalf("the redelivery decrypts as %q (%v): the advanced session is still in use", got, err)
	}
}
