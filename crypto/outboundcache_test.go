package crypto

import (
	"context"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database/dbtest"
	"go.ferry.im/ferry/internal/fakehs"
)

// TestNewGhostReadsNoOutboundSession: a ghost whose account this process created has no outbound session stored,
// and the session it shares is the one its next messages are encrypted with, so its first messages read no
// outbound session from the store. What a rotation forgot is read again (once), and after a restart the stored
// session is read and kept.
func TestNewGhostReadsNoOutboundSession(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r, log := startASRigLogged(ctx, t, fakehs.Options{})
	reads := func(step string, want int) {
		t.Helper()
		if got := log.takeReads("crypto_megolm_outbound_session"); len(got) != want {
			t.Errorf("%s: %d reads of outbound sessions, want %d:\n%s", step, len(got), want, strings.Join(got, "\n"))
		}
	}
	session := func(evt *event.Event) id.SessionID { return evt.Content.AsEncrypted().SessionID }
	log.takeReads("")
	var first *event.Event
	for _, body := range []string{"first words", "second words"} {
		sent := r.sendAs(t, r.ghost, body)
		reads(body, 0)
		r.memberReads(t, sent, body)
		if first == nil {
			first = sent
		} else if session(sent) != session(first) {
			t.Errorf("the second message has session %s, want the first's %s", session(sent), session(first))
		}
	}

	if err := r.m.Rotate(ctx, r.room); err != nil {
		t.Fatal(err)
	}
	log.takeReads("")
	rotated := r.sendAs(t, r.ghost, "after the rotation")
	reads("after the rotation", 1)
	r.memberReads(t, rotated, "after the rotation")
	if session(rotated) == session(first) {
		t.Error("the message after the rotation kept the rotated session")
	}

	r.m.Stop()
	r.m = r.newMachine(t)
	if err := r.m.Init(ctx); err != nil {
		t.Fatal(err)
	}
	r.m.Start(ctx)
	defer r.m.Stop()
	log.takeReads("")
	restarted := r.sendAs(t, r.ghost, "after a restart")
	reads("after a restart", 1)
	r.memberReads(t, restarted, "after a restart")
	if session(restarted) != session(rotated) {
		t.Errorf("after a clean restart the ghost encrypted with session %s, want the stored %s", session(restarted), session(rotated))
	}
}

// hookLog calls after with each statement a database ran.
type hookLog struct {
	dbutil.DatabaseLogger
	after func(query string)
}

func (l *hookLog) QueryTiming(_ context.Context, _, query string, _ []any, _ int, _ time.Duration, _ error) {
	if l.after != nil {
		l.after(query)
	}
}

// TestAddedOutboundSessionKeptAsStored: a shared session just added is answered from memory, also when another
// room's sessions changed meanwhile, unless its own room's sessions were deleted while it was being written (then
// the store's answer, none, is given); a session added before it was shared is read from the store; an account
// marked fresh has none until it adds one.
func TestAddedOutboundSessionKeptAsStored(t *testing.T) {
	ctx := context.Background()
	db := dbtest.Open(t, "postgres")
	hook := &hookLog{DatabaseLogger: db.Log}
	db.Log = hook
	store := newBatchStore(ctx, t, db)
	room := id.RoomID("!room:x")
	var reads int
	countReads := func(q string) {
		if strings.Contains(q, "FROM crypto_megolm_outbound_session") && strings.HasPrefix(strings.TrimSpace(q), "SELECT") {
			reads++
		}
	}
	hook.after = countReads
	get := func(step string, want *crypto.OutboundGroupSession, wantReads int) {
		t.Helper()
		reads = 0
		got, err := store.GetOutboundGroupSession(ctx, room)
		if err != nil {
			t.Fatal(err)
		}
		if (got == nil) != (want == nil) || (got != nil && got.ID() != want.ID()) {
			t.Errorf("%s: got session %v, want %v", step, got, want)
		}
		if reads != wantReads {
			t.Errorf("%s: %d reads, want %d", step, reads, wantReads)
		}
	}
	newSession := func() *crypto.OutboundGroupSession {
		sess, err := crypto.NewOutboundGroupSession(room, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		return sess
	}

	store.c.markFreshOutbound(store.AccountID)
	get("a fresh account", nil, 0)
	sess := newSession()
	if err := store.AddOutboundGroupSession(ctx, sess); err != nil {
		t.Fatal(err)
	}
	get("added before it was shared", sess, 1)
	sess.Shared = true
	if err := store.AddOutboundGroupSession(ctx, sess); err != nil {
		t.Fatal(err)
	}
	get("added shared", sess, 0)

	// addShared adds a new shared session and runs during right after the store wrote its row.
	addShared := func(during func()) *crypto.OutboundGroupSession {
		t.Helper()
		sess := newSession()
		sess.Shared = true
		hook.after = func(q string) {
			if strings.HasPrefix(strings.TrimSpace(q), "INSERT INTO crypto_megolm_outbound_session") {
				hook.after = nil
				during()
			}
		}
		if err := store.AddOutboundGroupSession(ctx, sess); err != nil {
			t.Fatal(err)
		}
		hook.after = countReads
		return sess
	}

	// Another room's sessions change while a shared session is being written: this room's is still kept.
	other := addShared(func() { store.c.outboundChanged("", "!another:x") })
	get("added shared while another room changed", other, 0)

	// A rotation of the room runs while the next shared session is being written, after its row: the row is gone.
	addShared(func() {
		if _, err := db.Exec(ctx, sqlDeleteRoomOutbound, room); err != nil {
			t.Error(err)
		}
		store.c.outboundChanged("", room)
	})
	get("added shared while the room was rotated", nil, 1)
}

// TestNewGhostLooksForNoAccountOrOlmSession: a ghost without a stored account gets a new one without reading the
// account a second time, and its first share looks for no Olm session (the new account has none) nor reads back
// the signature of its device it just made (answered as the store holds it). Once it has added an Olm session,
// shares find it: a rotation in the same process, and one after a restart, share over the stored Olm session (no
// new one, so no one-time key claimed), and the member reads every message. On both device paths.
func TestNewGhostLooksForNoAccountOrOlmSession(t *testing.T) {
	onEachDevicePathLogged(t, func(ctx context.Context, t *testing.T, r *asRig, log *writeLog) {
		olmSessions := func() int {
			var n int
			if err := r.db.QueryRow(ctx, `SELECT COUNT(*) FROM crypto_olm_session WHERE account_id=$1`, string(r.ghost)).Scan(&n); err != nil {
				t.Fatal(err)
			}
			return n
		}
		log.takeReads("")
		if err := r.m.PrepareSender(ctx, r.ghost); err != nil {
			t.Fatal(err)
		}
		// (The login path's first drain of the device's to-device queue reads its token from the same row.)
		got := slices.DeleteFunc(log.takeReads("crypto_account"), func(q string) bool { return strings.HasPrefix(q, "SELECT sync_token ") })
		if len(got) != 1 {
			t.Errorf("the new ghost's set-up read its account %d times, want once:\n%s", len(got), strings.Join(got, "\n"))
		}
		sent := r.sendAs(t, r.ghost, "first words")
		reads := log.takeReads("")
		if n := countReads(reads, "FROM crypto_olm_session "); n != 0 {
			t.Errorf("the new ghost's first share looked for Olm sessions %d times, want none", n)
		}
		// Its Olm messages carry its device's keys with the signature it just made, which it need not read back.
		if n := countReads(reads, ownSignatureRead); n != 0 {
			t.Errorf("the new ghost's first share read its own device's signature %d times, want none", n)
		}
		dev, err := r.m.ghostDevice(ctx, r.ghost)
		if err != nil || dev == nil {
			t.Fatalf("the ghost's device: %v, %v", dev, err)
		}
		own := dev.mach.OwnIdentity().SigningKey
		stored, err := crypto.NewSQLCryptoStore(r.db, dbutil.NoopLogger, string(r.ghost), "", nil).GetSignaturesForKeyBy(ctx, r.ghost, own, r.ghost)
		if err != nil {
			t.Fatal(err)
		}
		answered, err := dev.olm.GetSignaturesForKeyBy(ctx, r.ghost, own, r.ghost)
		if err != nil || len(answered) != 1 || len(stored) == 0 {
			t.Fatalf("the own device's signatures: answered %v (%v), stored %v", answered, err, stored)
		}
		for ssk, sig := range answered {
			// (Postgres pads the stored signature to its column's width, CHAR(88).)
			if strings.TrimRight(stored[ssk], " ") != sig {
				t.Errorf("answered the own device's signature by %s as %q, the store holds %q", ssk, sig, stored[ssk])
			}
		}
		r.memberReads(t, sent, "first words")
		if n := olmSessions(); n != 1 {
			t.Fatalf("the ghost stored %d Olm sessions, want 1", n)
		}

		for _, step := range []string{"after a rotation", "after a restart"} {
			if step == "after a restart" {
				r.m.Stop()
				r.m = r.newMachine(t)
				if err := r.m.Init(ctx); err != nil {
					t.Fatal(err)
				}
				r.m.Start(ctx)
			}
			if err := r.m.Rotate(ctx, r.room); err != nil {
				t.Fatal(err)
			}
			log.takeReads("")
			sent = r.sendAs(t, r.ghost, step)
			reads := log.takeReads("")
			if countReads(reads, "FROM crypto_olm_session ") == 0 {
				t.Errorf("%s: the share did not look for the ghost's Olm sessions", step)
			}
			// A restarted process has not made the signature: it reads it, as it was made (without padding).
			if n, want := countReads(reads, ownSignatureRead), map[bool]int{true: 1, false: 0}[step == "after a restart"]; n != want {
				t.Errorf("%s: the share read the own device's signature %d times, want %d", step, n, want)
			}
			dev, err := r.m.ghostDevice(ctx, r.ghost)
			if err != nil || dev == nil {
				t.Fatalf("%s: the ghost's device: %v, %v", step, dev, err)
			}
			if again, err := dev.olm.GetSignaturesForKeyBy(ctx, r.ghost, own, r.ghost); err != nil || !maps.Equal(again, answered) {
				t.Errorf("%s: the own device's signatures read %v (%v), want %v", step, again, err, answered)
			}
			r.memberReads(t, sent, step)
			if n := olmSessions(); n != 1 {
				t.Errorf("%s: the ghost has %d Olm sessions, want its first one only", step, n)
			}
		}
	})
}

// ownSignatureRead is the start of mautrix's read of a key's signatures by one signer (GetSignaturesForKeyBy).
const ownSignatureRead = "SELECT signer_key, signature FROM crypto_cross_signing_signatures"
