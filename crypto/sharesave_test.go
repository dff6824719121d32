package crypto

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database/dbtest"
	"go.ferry.im/ferry/internal/fakehs"
)

// TestShareSavedInOneStatement: a ghost's key share stores the Olm session it created, the member's device as a
// recipient of the Megolm session and the new session's inbound copy in one statement on Postgres, where a
// transaction took four (BEGIN, two inserts, COMMIT) and the inbound copy one more; what it stored lets the
// member read the message, and the session is not shared again.
func TestShareSavedInOneStatement(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r, log, sent, writes := ghostFirstMessage(ctx, t, fakehs.Options{}, "shared once")
	defer r.m.Stop()
	var share, txn []string
	for _, w := range writes {
		switch {
		case w == "BEGIN" || w == "COMMIT":
			txn = append(txn, w)
		case strings.Contains(w, "crypto_olm_session ") || strings.Contains(w, "crypto_megolm_outbound_session_shared ") ||
			strings.Contains(w, "crypto_megolm_inbound_session "):
			share = append(share, w)
		}
	}
	if len(share) != 1 || len(txn) != 0 {
		t.Errorf("the share was stored in %d statements and %d transaction statements, want 1 and 0:\n%s", len(share), len(txn), strings.Join(append(share, txn...), "\n"))
	}
	r.memberReads(t, sent, "shared once")
	var recipients, sessions int
	if err := r.db.QueryRow(ctx, `SELECT COUNT(*) FROM crypto_megolm_outbound_session_shared WHERE session_id=$1`, sent.Content.AsEncrypted().SessionID).Scan(&recipients); err != nil {
		t.Fatal(err)
	}
	if err := r.db.QueryRow(ctx, `SELECT COUNT(*) FROM crypto_olm_session WHERE account_id=$1`, string(r.ghost)).Scan(&sessions); err != nil {
		t.Fatal(err)
	}
	if recipients != 1 || sessions != 1 {
		t.Errorf("stored %d recipients of the session and %d Olm sessions of the ghost, want 1 and 1", recipients, sessions)
	}
	var source string
	if err := r.db.QueryRow(ctx, `SELECT source_user FROM crypto_megolm_inbound_session WHERE account_id=$1 AND session_id=$2`,
		string(r.ghost), sent.Content.AsEncrypted().SessionID).Scan(&source); err != nil || source != string(r.ghost) {
		t.Errorf("the session's inbound copy: source %q, err %v; want one stored with the ghost as its source", source, err)
	}
	log.takeAll()
	again := r.sendAs(t, r.ghost, "no second share")
	for _, w := range log.takeAll() {
		if strings.Contains(w, "crypto_olm_session ") || strings.Contains(w, "crypto_megolm_outbound_session_shared ") {
			t.Errorf("the second message wrote %q", w)
		}
	}
	r.memberReads(t, again, "no second share")
}

// TestShareLargerThanOneStatement: a share to more devices than one statement carries (shareChunkRows) is saved
// in chunks inside one transaction. Every member reads the message, every Olm session and recipient is stored
// (a restart shares the next session over the same Olm sessions), and a failure in a later chunk stores and sends
// nothing, after which the share goes through whole.
func TestShareLargerThanOneStatement(t *testing.T) {
	// Chunks of 10 rows: 25 devices' Olm sessions and recipients take three statements each, as 250 devices'
	// would with the real size, for a fifth of the members the test made before.
	defer func(rows int) { shareChunkRows = rows }(shareChunkRows)
	shareChunkRows = 10
	n := 2*shareChunkRows + 5
	for _, dialect := range dbtest.Dialects {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			r := newShareRig(t, dbtest.Open(t, dialect), n)
			all := func(int) bool { return true }
			count := func(query string, arg any) int {
				t.Helper()
				var c int
				if err := r.db.QueryRow(ctx, query, arg).Scan(&c); err != nil {
					t.Fatal(err)
				}
				return c
			}
			olmSessions := func() int {
				return count(`SELECT COUNT(*) FROM crypto_olm_session WHERE account_id=$1`, string(r.ghost.userID))
			}

			// A failure in the last chunk of recipients: the constraint refuses one member near the end.
			last := string(r.members[n-1].ID)
			if _, err := r.db.Exec(ctx, `ALTER TABLE crypto_megolm_outbound_session_shared ADD CONSTRAINT share_test_not_last CHECK (user_id <> '`+last+`')`); err != nil {
				t.Fatal(err)
			}
			if _, err := r.ghost.share(ctx, r.room, r.users, r.policy()); err == nil {
				t.Fatal("share succeeded although its last recipient could not be recorded")
			}
			if sent := r.takeAll(); sent != 0 {
				t.Errorf("%d to-device messages went out although the share's state was not saved", sent)
			}
			if c := olmSessions(); c != 0 {
				t.Errorf("the failed share left %d Olm sessions stored, want 0 (one transaction)", c)
			}
			inboundCopies := func() int {
				return count(`SELECT COUNT(*) FROM crypto_megolm_inbound_session WHERE account_id=$1`, string(r.ghost.userID))
			}
			if c := inboundCopies(); c != 0 {
				t.Errorf("the failed share left %d inbound copies of its session stored, want 0 (one transaction)", c)
			}
			if _, err := r.db.Exec(ctx, `ALTER TABLE crypto_megolm_outbound_session_shared DROP CONSTRAINT share_test_not_last`); err != nil {
				t.Fatal(err)
			}

			r.rotate(t)
			stats, err := r.ghost.share(ctx, r.room, r.users, r.policy())
			if err != nil {
				t.Fatal(err)
			}
			if stats.Shared != n {
				t.Errorf("share: %+v, want %d shared", stats, n)
			}
			if c := count(`SELECT COUNT(*) FROM crypto_megolm_outbound_session_shared WHERE session_id=$1`, string(stats.SessionID)); c != n {
				t.Errorf("stored %d recipients of the session, want %d", c, n)
			}
			if c := olmSessions(); c != n {
				t.Errorf("stored %d Olm sessions, want %d", c, n)
			}
			if c := inboundCopies(); c != 1 {
				t.Errorf("stored %d inbound copies of the session, want 1", c)
			}
			r.checkDecrypts(t, r.members, all, "to many")

			r.ghost = r.openGhost(t, r.ghost.client.DeviceID)
			r.rotate(t)
			if stats, err = r.ghost.share(ctx, r.room, r.users, r.policy()); err != nil {
				t.Fatal(err)
			} else if stats.NewOlm != 0 || stats.Shared != n {
				t.Errorf("after a restart: %+v, want %d shared over stored Olm sessions", stats, n)
			}
			r.checkDecrypts(t, r.members, all, "to many again")
		})
	}
}

// TestNewSessionWrittenOnce: a ghost's first message in a room writes its new outbound session once, when it has
// been shared (as a session shared ahead of time is), not also before the share; the member reads the message,
// and the stored session is marked shared. On both device paths.
func TestNewSessionWrittenOnce(t *testing.T) {
	for name, opts := range devicePaths() {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			r, _, sent, writes := ghostFirstMessage(ctx, t, opts, "one write")
			defer r.m.Stop()
			var stored []string
			for _, w := range writes {
				if strings.Contains(w, "crypto_megolm_outbound_session (") {
					stored = append(stored, w)
				}
			}
			if len(stored) != 1 {
				t.Errorf("the first message wrote the outbound session %d times, want 1:\n%s", len(stored), strings.Join(stored, "\n"))
			}
			r.memberReads(t, sent, "one write")
			var shared bool
			if err := r.db.QueryRow(ctx, `SELECT shared FROM crypto_megolm_outbound_session WHERE account_id=$1 AND room_id=$2`, string(r.ghost), string(r.room)).Scan(&shared); err != nil || !shared {
				t.Errorf("stored outbound session: shared=%v, err %v; want a shared session", shared, err)
			}
		})
	}
}

// ghostFirstMessage starts a rig with opts (the caller stops its Machine), sets up its ghost as a sender
// and has it send body: the sent event, and the statements written while it was encrypted and its key shared.
func ghostFirstMessage(ctx context.Context, t *testing.T, opts fakehs.Options, body string) (*asRig, *writeLog, *event.Event, []string) {
	t.Helper()
	r, log := startASRigLogged(ctx, t, opts)
	if err := r.m.PrepareSender(ctx, r.ghost); err != nil {
		r.m.Stop()
		t.Fatal(err)
	}
	log.takeAll()
	sent := r.sendAs(t, r.ghost, body)
	return r, log, sent, log.takeAll()
}

// TestShareCutShortBeforeItsSessionIsStored: when the new session cannot be stored after its key went out (a crash
// or a database failure between the share and the write), the message is not sent, nothing of the session is
// left to encrypt with, and the next attempt shares a session the member can read. On both device paths.
func TestShareCutShortBeforeItsSessionIsStored(t *testing.T) {
	onEachDevicePath(t, func(ctx context.Context, t *testing.T, r *asRig) {
		if _, err := r.db.Exec(ctx, `ALTER TABLE crypto_megolm_outbound_session ADD CONSTRAINT share_test_no_session CHECK (false) NOT VALID`); err != nil {
			t.Fatal(err)
		}
		_, err := r.m.Encrypt(ctx, r.ghost, r.room, event.EventMessage, &event.Content{Parsed: &event.MessageEventContent{MsgType: event.MsgText, Body: "lost"}})
		if err == nil {
			t.Fatal("the message was encrypted although its session could not be stored")
		}
		if _, err = r.db.Exec(ctx, `ALTER TABLE crypto_megolm_outbound_session DROP CONSTRAINT share_test_no_session`); err != nil {
			t.Fatal(err)
		}
		r.member.ReceiveToDevice(ctx) // the key of the session that was never stored
		sent := r.sendAs(t, r.ghost, "after the failure")
		r.memberReads(t, sent, "after the failure")
		var stored int
		if err = r.db.QueryRow(ctx, `SELECT COUNT(*) FROM crypto_megolm_outbound_session WHERE account_id=$1 AND session_id=$2 AND shared`,
			string(r.ghost), string(sent.Content.AsEncrypted().SessionID)).Scan(&stored); err != nil || stored != 1 {
			t.Errorf("the session of the message sent after the failure is stored shared %d times (err %v), want 1", stored, err)
		}
	})
}

// TestShareFetchesOutdatedDeviceLists: a share fetches a member's devices again when their list is outdated, not
// while the fetches of that list keep failing and their backoff runs (mautrix's rule: after 5 failures, wait the
// cube of the failures in seconds, at most 3 hours), and again once it ran out; it reads the member's tracking and
// devices in one statement per share, without listing every outdated user of the store.
func TestShareFetchesOutdatedDeviceLists(t *testing.T) {
	for _, dialect := range dbtest.Dialects {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			r := newShareRig(t, dbtest.Open(t, dialect), 1)
			member := r.members[0].ID
			if _, err := r.ghost.share(ctx, r.room, r.users, r.policy()); err != nil {
				t.Fatal(err)
			}
			log := &writeLog{DatabaseLogger: r.db.Log}
			r.db.Log = log
			now := time.Now().Unix()
			for _, c := range []struct {
				what                 string
				outdated             bool
				errors, sinceAttempt int64
				fetches              int
			}{
				{"an up-to-date list", false, 0, 0, 0},
				{"an outdated list", true, 0, 0, 1},
				{"an outdated list after 5 failed fetches, 10 s after the last", true, 5, 10, 0},
				{"an outdated list after 5 failed fetches, 200 s after the last", true, 5, 200, 1},
			} {
				if _, err := r.db.Exec(ctx, `UPDATE crypto_tracked_user SET devices_outdated=$1, error_count=$2, last_attempt=$3 WHERE user_id=$4`,
					c.outdated, c.errors, now-c.sinceAttempt, member); err != nil {
					t.Fatal(err)
				}
				r.rotate(t)
				r.srv.ResetCounts()
				log.takeReads("crypto_tracked_user")
				stats, err := r.ghost.share(ctx, r.room, r.users, r.policy())
				if err != nil {
					t.Fatalf("%s: %v", c.what, err)
				} else if stats.Shared != 1 {
					t.Errorf("%s: %+v, want the member's device shared", c.what, stats)
				}
				if n := r.srv.Counts()["POST /_matrix/client/v3/keys/query"]; n != int64(c.fetches) {
					t.Errorf("%s: the share fetched the member's devices %d times, want %d", c.what, n, c.fetches)
				}
				reads := log.takeReads("")
				// A fetch reads the tracking and the devices again in mautrix's own code; the share itself reads
				// both once, in one statement.
				if n := countReads(reads, "FROM crypto_tracked_user "); n != 1+c.fetches {
					t.Errorf("%s: the share read crypto_tracked_user %d times, want %d", c.what, n, 1+c.fetches)
				}
				if n := countReads(reads, "FROM crypto_device "); n != c.fetches {
					t.Errorf("%s: the share read crypto_device on its own %d times, want %d", c.what, n, c.fetches)
				}
			}
			r.checkDecrypts(t, r.members, func(int) bool { return true }, "after the fetches")
		})
	}
}

// countReads counts the reads that contain part.
func countReads(reads []string, part string) int {
	n := 0
	for _, r := range reads {
		if strings.Contains(r, part) {
			n++
		}
	}
	return n
}

// TestShareReadsTrustInOneQuery: a key share reads its members' cross-signing keys and the signatures on them
// (which decide whether each device gets the key) in one query, here on a rotation after a restart (nothing of
// the member in memory), and the member's cross-signed device still gets the key.
func TestShareReadsTrustInOneQuery(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r, log := startASRigLogged(ctx, t, fakehs.Options{})
	defer func() { r.m.Stop() }()
	r.memberReads(t, r.sendAs(t, r.ghost, "first words"), "first words")
	r.restart(ctx, t)
	if err := r.m.Rotate(ctx, r.room); err != nil {
		t.Fatal(err)
	}
	log.takeReads("")
	sent := r.sendAs(t, r.ghost, "after the rotation")
	if got := countReads(log.takeReads(""), "SELECT 'k', user_id, usage"); got != 1 {
		t.Errorf("the share after the rotation read cross-signing keys and signatures in %d queries, want 1", got)
	}
	if trust := r.memberReads(t, sent, "after the rotation"); trust != id.TrustStateCrossSignedTOFU {
		t.Errorf("the member's client sees the ghost's device as %s, want %s", trust, id.TrustStateCrossSignedTOFU)
	}
}

// TestShareReadsNoTrustOfAMemberFetchedWhole: a member ferry fetched while they were not tracked is known
// whole in memory (their cross-signing keys, and every signature on them: read with their devices, then what the
// fetch stored), so the key shares that follow (the first one, and another after a rotation) read neither; the
// member's cross-signed device gets the key each time. A member ferry's bot has verified is still seen as
// verified (a signature known in memory counts as in the store).
func TestShareReadsNoTrustOfAMemberFetchedWhole(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r, log := startASRigLogged(ctx, t, fakehs.Options{})
	defer r.m.Stop()
	if err := r.m.PrepareSender(ctx, r.ghost); err != nil {
		t.Fatal(err)
	}
	log.takeReads("")
	first := r.sendAs(t, r.ghost, "first words")
	if got := countReads(log.takeReads(""), "SELECT 'k', user_id, usage"); got != 0 {
		t.Errorf("the first share read cross-signing keys and signatures %d times, want none", got)
	}
	r.memberReads(t, first, "first words")
	if err := r.m.Rotate(ctx, r.room); err != nil {
		t.Fatal(err)
	}
	log.takeReads("")
	sent := r.sendAs(t, r.ghost, "after the rotation")
	if got := countReads(log.takeReads(""), "SELECT 'k', user_id, usage"); got != 0 {
		t.Errorf("the share after the rotation read cross-signing keys and signatures %d times, want none", got)
	}
	if trust := r.memberReads(t, sent, "after the rotation"); trust != id.TrustStateCrossSignedTOFU {
		t.Errorf("the member's client sees the ghost's device as %s, want %s", trust, id.TrustStateCrossSignedTOFU)
	}
}

// TestShareReadsTheRoomOnce: a new session's share reads the room's members and the settings the session takes
// from the room's state (m.room.encryption's rotation) in one query, and the session follows those settings.
func TestShareReadsTheRoomOnce(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r, log := startASRigLogged(ctx, t, fakehs.Options{})
	defer r.m.Stop()
	if err := r.ss.SetEncryptionEvent(ctx, r.room, &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1, RotationPeriodMessages: 2}); err != nil {
		t.Fatal(err)
	}
	if err := r.m.PrepareSender(ctx, r.ghost); err != nil {
		t.Fatal(err)
	}
	log.takeReads("")
	first := r.sendAs(t, r.ghost, "first words")
	reads := log.takeReads("")
	room := slices.DeleteFunc(slices.Clone(reads), func(q string) bool {
		return !strings.Contains(q, "FROM mx_room_state ") && !strings.Contains(q, "FROM mx_user_profile ")
	})
	if n := len(room); n != 1 {
		t.Errorf("the first share read the room's members and settings in %d queries, want 1:\n%s", n, strings.Join(reads, "\n"))
	}
	r.memberReads(t, first, "first words")
	session := func(evt *event.Event) id.SessionID { return evt.Content.AsEncrypted().SessionID }
	second := r.sendAs(t, r.ghost, "second words")
	third := r.sendAs(t, r.ghost, "third words")
	if session(second) != session(first) || session(third) == session(first) {
		t.Errorf("sessions %s, %s, %s: want the room's rotation after two messages", session(first), session(second), session(third))
	}
	r.memberReads(t, third, "third words")
}
