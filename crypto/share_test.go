package crypto

import (
	"context"
	"fmt"
	"sync"
	"testing"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database/dbtest"
	"go.ferry.im/ferry/internal/fakehs"
)

const sharePickleKey = "share-test-pickle-key"

// shareRig is a fake homeserver with simulated members (mautrix OlmMachines on in-memory stores, cross-signed
// as Element does) and one of ferry's ghost devices on a real SQL crypto store.
type shareRig struct {
	srv     *fakehs.Server
	db      *dbutil.Database
	room    id.RoomID
	members []*fakehs.User
	users   []id.UserID
	ghost   *device
	state   crypto.StateStore
}

// newShareRig makes n members with one device each, and the ghost @ghost:fakehs.test.
func newShareRig(tb testing.TB, db *dbutil.Database, n int) *shareRig {
	tb.Helper()
	ctx := context.Background()
	srv := fakehs.New(fakehs.Options{})
	tb.Cleanup(srv.Close)
	r := &shareRig{srv: srv, db: db, room: id.RoomID("!share:" + srv.Domain()), members: make([]*fakehs.User, n)}
	var wg sync.WaitGroup
	errs := make(chan error, n)
	next := make(chan int)
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				u, err := srv.NewUser(ctx, id.NewUserID(fmt.Sprintf("member%04d", i), srv.Domain()), fakehs.UserOptions{CrossSign: true})
				if err != nil {
					errs <- err
					continue
				}
				r.members[i] = u
			}
		}()
	}
	for i := 0; i < n; i++ {
		next <- i
	}
	close(next)
	wg.Wait()
	close(errs)
	for err := range errs {
		tb.Fatal(err)
	}
	for _, u := range r.members {
		r.users = append(r.users, u.ID)
	}
	r.state = mautrix.NewMemoryStateStore().(crypto.StateStore)
	r.ghost = r.openGhost(tb, "")
	return r
}

// openGhost logs the ghost's device in (creating it when deviceID is empty) and loads its Olm account from the
// database, as ferry does at start-up.
func (r *shareRig) openGhost(tb testing.TB, deviceID id.DeviceID) *device {
	tb.Helper()
	return r.openDevice(tb, id.NewUserID("ghost", r.srv.Domain()), deviceID)
}

// openDevice logs one of ferry's devices in and loads (or creates and uploads) its Olm account.
func (r *shareRig) openDevice(tb testing.TB, ghost id.UserID, deviceID id.DeviceID) *device {
	tb.Helper()
	ctx := context.Background()
	cli, err := mautrix.NewClient(r.srv.URL, "", "")
	if err != nil {
		tb.Fatal(err)
	}
	cli.Client = r.srv.Client()
	cli.Log = zerolog.Nop()
	_, err = cli.Login(ctx, &mautrix.ReqLogin{
		Type:       mautrix.AuthTypePassword,
		Identifier: mautrix.UserIdentifier{Type: mautrix.IdentifierTypeUser, User: string(ghost)},
		Password:   "ghost-password", DeviceID: deviceID, StoreCredentials: true,
	})
	if err != nil {
		tb.Fatal(err)
	}
	store := crypto.NewSQLCryptoStore(r.db, dbutil.NoopLogger, string(ghost), cli.DeviceID, []byte(sharePickleKey))
	if err = store.DB.Upgrade(ctx); err != nil {
		tb.Fatal(err)
	}
	log := zerolog.Nop()
	mach := crypto.NewOlmMachine(cli, &log, store, r.state)
	mach.DisableDeviceChangeKeyRotation = true
	if err = mach.Load(ctx); err != nil {
		tb.Fatal(err)
	}
	dev := newDevice(ghost, cli, store, mach)
	if !mach.GetAccount().Shared {
		if err = mach.ShareKeys(ctx, -1); err != nil {
			tb.Fatal(err)
		}
	}
	return dev
}

// policy is ferry's default share policy (cross-signed TOFU), resolved against the ghost's store.
func (r *shareRig) policy() sharePolicy {
	return sharePolicy{
		level: levelCrossSignedTOFU,
		resolver: func() *trustResolver {
			return newTrustResolver(r.ghost.store, "@bot:"+id.UserID(r.srv.Domain()), func(context.Context) id.Ed25519 { return "" })
		},
		encEvent: func(context.Context, id.RoomID) (*event.EncryptionEventContent, *event.HistoryVisibilityEventContent) {
			return &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1}, nil
		},
	}
}

// rotate drops the ghost's outbound session, so the next share starts a new one.
func (r *shareRig) rotate(tb testing.TB) {
	tb.Helper()
	if err := r.ghost.olm.RemoveOutboundGroupSession(context.Background(), r.room); err != nil {
		tb.Fatal(err)
	}
}

// forgetOlm deletes the ghost's Olm sessions, so the next share claims one-time keys again.
func (r *shareRig) forgetOlm(tb testing.TB) {
	tb.Helper()
	if _, err := r.db.Exec(context.Background(), `DELETE FROM crypto_olm_session WHERE account_id=$1`, r.ghost.userID); err != nil {
		tb.Fatal(err)
	}
}

// takeAll empties every member's to-device queue and returns how many events there were.
func (r *shareRig) takeAll() int {
	n := 0
	for _, u := range r.members {
		n += len(r.srv.TakeToDevice(u.ID, u.DeviceID))
	}
	return n
}

// checkDecrypts has each member in members process its to-device queue and decrypt a message the ghost
// encrypts now; want tells which members must succeed (the others must fail).
func (r *shareRig) checkDecrypts(t *testing.T, members []*fakehs.User, want func(i int) bool, body string) {
	t.Helper()
	ctx := context.Background()
	enc, err := r.ghost.mach.EncryptMegolmEvent(ctx, r.room, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: body})
	if err != nil {
		t.Fatal(err)
	}
	evt := &event.Event{ID: id.EventID("$" + body), RoomID: r.room, Sender: r.ghost.userID, Type: event.EventEncrypted, Content: event.Content{Parsed: enc}}
	for i, u := range members {
		u.ReceiveToDevice(ctx)
		dec, err := u.Decrypt(ctx, evt)
		switch {
		case want(i) && err != nil:
			t.Errorf("%s cannot decrypt %q: %v", u.ID, body, err)
		case want(i) && dec.Content.AsMessage().Body != body:
			t.Errorf("%s decrypted %q, want %q", u.ID, dec.Content.AsMessage().Body, body)
		case !want(i) && err == nil:
			t.Errorf("%s decrypted %q, but the policy should have withheld the key", u.ID, body)
		}
	}
}

// TestShareBatched shares room keys from a ghost's device to members over a fake homeserver and checks what
// members notice: admitted devices decrypt the ghost's messages through new Olm sessions, through the same
// sessions afterwards, after ferry restarts (the saved ratchet state is current), and after mautrix's own code
// used a session in between; a blacklisted device gets m.room_key.withheld and cannot decrypt, yet its user is
// recorded as entitled.
func TestShareBatched(t *testing.T) {
	for _, dialect := range dbtest.Dialects {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			r := newShareRig(t, dbtest.Open(t, dialect), 6)
			black := r.members[5]
			if _, err := r.ghost.devicesOf(ctx, r.users); err != nil {
				t.Fatal(err)
			}
			dev, err := r.ghost.store.GetDevice(ctx, black.ID, black.DeviceID)
			if err != nil || dev == nil {
				t.Fatalf("blacklisted member's device not stored: %v", err)
			}
			dev.Trust = id.TrustStateBlacklisted
			if err = r.ghost.store.PutDevice(ctx, black.ID, dev); err != nil {
				t.Fatal(err)
			}
			admitted := func(i int) bool { return i != 5 }

			// New Olm sessions: one /keys/claim for all five devices.
			r.srv.ResetCounts()
			stats, err := r.ghost.share(ctx, r.room, r.users, r.policy())
			if err != nil {
				t.Fatal(err)
			}
			counts := r.srv.Counts()
			if stats.Shared != 5 || stats.Withheld != 1 || stats.NewOlm != 5 || stats.NoOlm != 0 {
				t.Errorf("first share: %+v, want 5 shared (new Olm sessions), 1 withheld", stats)
			}
			if c := counts["POST /_matrix/client/v3/keys/claim"]; c != 1 {
				t.Errorf("first share claimed keys in %d requests, want 1", c)
			}
			withheld := r.srv.TakeToDevice(black.ID, black.DeviceID)
			if len(withheld) != 1 || withheld[0].Type != event.ToDeviceRoomKeyWithheld ||
				withheld[0].Content.AsRoomKeyWithheld().Code != event.RoomKeyWithheldBlacklisted {
				t.Errorf("blacklisted device got %d events (%v), want one m.room_key.withheld m.blacklisted", len(withheld), withheld)
			}
			for _, u := range r.members {
				if ok, err := r.ghost.entitled(ctx, u.ID, stats.SessionID); err != nil || !ok {
					t.Errorf("%s not recorded as entitled to the session (err %v)", u.ID, err)
				}
			}
			r.checkDecrypts(t, r.members, admitted, "first")

			// Existing Olm sessions: no claim.
			r.rotate(t)
			r.srv.ResetCounts()
			if stats, err = r.ghost.share(ctx, r.room, r.users, r.policy()); err != nil {
				t.Fatal(err)
			}
			if c := r.srv.Counts()["POST /_matrix/client/v3/keys/claim"]; c != 0 || stats.NewOlm != 0 || stats.Shared != 5 {
				t.Errorf("second share: %+v with %d claims, want 5 shared over existing sessions", stats, c)
			}
			r.checkDecrypts(t, r.members, admitted, "second")

			// mautrix's own Olm path (as a key request answer uses it) between two shares: it must continue from
			// the state the share left, not from an older copy of the session.
			first := r.members[0]
			req := &mautrix.ReqSendToDevice{Messages: map[id.UserID]map[id.DeviceID]*event.Content{first.ID: {first.DeviceID: {
				Parsed: &event.DummyEventContent{}}}}}
			enc, err := r.ghost.mach.EncryptToDevices(ctx, event.ToDeviceDummy, req)
			if err != nil {
				t.Fatal(err)
			}
			if _, err = r.ghost.client.SendToDevice(ctx, event.ToDeviceEncrypted, enc); err != nil {
				t.Fatal(err)
			}
			r.rotate(t)
			if _, err = r.ghost.share(ctx, r.room, r.users, r.policy()); err != nil {
				t.Fatal(err)
			}
			r.checkDecrypts(t, r.members, admitted, "third")

			// A restart: the Olm sessions come back from the database as the shares left them.
			r.ghost = r.openGhost(t, r.ghost.client.DeviceID)
			r.rotate(t)
			if stats, err = r.ghost.share(ctx, r.room, r.users, r.policy()); err != nil {
				t.Fatal(err)
			} else if stats.NewOlm != 0 {
				t.Errorf("after a restart the share created %d Olm sessions, want 0", stats.NewOlm)
			}
			r.checkDecrypts(t, r.members, admitted, "fourth")
		})
	}
}

// TestShareSavesBeforeSending checks that a failed save sends nothing: no member gets a room key that the
// database does not know was sent.
func TestShareSavesBeforeSending(t *testing.T) {
	ctx := context.Background()
	db := dbtest.Open(t, "postgres")
	r := newShareRig(t, db, 2)
	if _, err := r.ghost.share(ctx, r.room, r.users, r.policy()); err != nil {
		t.Fatal(err)
	}
	r.takeAll()
	r.rotate(t)
	// Make the recipient record fail: every insert breaks the constraint, after the room key was encrypted.
	if _, err := db.Exec(ctx, `ALTER TABLE crypto_megolm_outbound_session_shared ADD CONSTRAINT share_test_no_rows CHECK (false) NOT VALID`); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_, _ = db.Exec(ctx, `ALTER TABLE crypto_megolm_outbound_session_shared DROP CONSTRAINT share_test_no_rows`)
	}()
	if _, err := r.ghost.share(ctx, r.room, r.users, r.policy()); err == nil {
		t.Fatal("share succeeded although its state could not be saved")
	}
	if n := r.takeAll(); n != 0 {
		t.Errorf("%d to-device messages went out although the share's state was not saved", n)
	}
}

func TestPlaceholders(t *testing.T) {
	for _, c := range []struct {
		first, rows, width int
		want               string
	}{
		{1, 3, 1, "$1,$2,$3"},
		{2, 2, 3, "($2,$3,$4),($5,$6,$7)"},
		{1, 0, 2, ""},
	} {
		if got := placeholders(c.first, c.rows, c.width); got != c.want {
			t.Errorf("placeholders(%d, %d, %d) = %q, want %q", c.first, c.rows, c.width, got, c.want)
		}
	}
}

// TestShareConcurrentRooms shares from one device into several rooms at once, over the same Olm sessions, then
// restarts: every member still decrypts every room's messages, so no save put back an older ratchet state.
func TestShareConcurrentRooms(t *testing.T) {
	ctx := context.Background()
	r := newShareRig(t, dbtest.Open(t, "postgres"), 4)
	rooms := []id.RoomID{"!a:fakehs.test", "!b:fakehs.test", "!c:fakehs.test"}
	all := func(int) bool { return true }
	for round := 0; round < 3; round++ {
		errs := make(chan error, len(rooms))
		for _, room := range rooms {
			go func() {
				_ = r.ghost.olm.RemoveOutboundGroupSession(ctx, room)
				_, err := r.ghost.share(ctx, room, r.users, r.policy())
				errs <- err
			}()
		}
		for range rooms {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
		for _, room := range rooms {
			r.room = room
			r.checkDecrypts(t, r.members, all, fmt.Sprintf("round %d in %s", round, room))
		}
	}
	r.ghost = r.openGhost(t, r.ghost.client.DeviceID)
	for _, room := range rooms {
		r.room = room
		r.rotate(t)
		stats, err := r.ghost.share(ctx, room, r.users, r.policy())
		if err != nil {
			t.Fatal(err)
		} else if stats.NewOlm != 0 {
			t.Errorf("after a restart the share created %d Olm sessions, want 0", stats.NewOlm)
		}
		r.checkDecrypts(t, r.members, all, "after the restart in "+string(room))
	}
}
