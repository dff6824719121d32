package database_test

import (
	"context"
	"testing"
	"time"

	"go.mau.fi/util/dbutil"

	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/database/dbtest"
)

func TestConsentRequests(t *testing.T) {
	forEachDialect(t, func(t *testing.T, db *database.Database) {
		ctx := context.Background()
		now := time.Now().Truncate(time.Millisecond)
		req := &database.ConsentRequest{
			Kind: database.ConsentLink, FromRoom: "!a", TargetRoom: "!b", RequestedBy: "@u:x", CommandEvent: "$cmd1",
			CreatedAt: now, ExpiresAt: now.Add(24 * time.Hour),
			Rooms: []database.ConsentRoom{{RoomID: "!a", ConsentedBy: "@u:x"}, {RoomID: "!b"}, {RoomID: "!c"}},
		}
		stored, existed, err := db.Consent.Create(ctx, req)
		if err != nil || existed || stored == nil || len(stored.ID) != 6 {
			t.Fatalf("create = %+v, %t, %v", stored, existed, err)
		}
		if got := stored.Waiting(); len(got) != 2 || got[0] != "!b" || got[1] != "!c" {
			t.Fatalf("waiting = %v", got)
		}
		// The same command handled again (after a crash) finds its request.
		again, existed, err := db.Consent.Create(ctx, &database.ConsentRequest{Kind: database.ConsentLink, CommandEvent: "$cmd1", CreatedAt: now, ExpiresAt: now})
		if err != nil || !existed || again.ID != stored.ID || again.TargetRoom != "!b" {
			t.Fatalf("create again = %+v, %t, %v", again, existed, err)
		}
		waiting, err := db.Consent.WaitingIn(ctx, "!b", now)
		if err != nil || len(waiting) != 1 || waiting[0].ID != stored.ID {
			t.Fatalf("waiting in !b = %+v, %v", waiting, err)
		}
		if waiting, _ = db.Consent.WaitingIn(ctx, "!a", now); len(waiting) != 0 {
			t.Fatalf("room !a consented, yet a request waits there: %+v", waiting)
		}
		if err = db.Consent.SetRooms(ctx, stored.ID, []database.ConsentRoom{{RoomID: "!b", ConsentedBy: "@v:x"}, {RoomID: "!d"}}); err != nil {
			t.Fatal(err)
		}
		got, err := db.Consent.Get(ctx, stored.ID)
		if err != nil || len(got.Rooms) != 4 || got.Rooms[1] != (database.ConsentRoom{RoomID: "!b", ConsentedBy: "@v:x"}) {
			t.Fatalf("after consent = %+v, %v", got, err)
		}
		inRoom, byUser, err := db.Consent.CountWaiting(ctx, "!c", "@u:x", now)
		if err != nil || inRoom != 1 || byUser != 1 {
			t.Fatalf("counts = %d, %d, %v", inRoom, byUser, err)
		}
		// Expired requests wait nowhere and are swept.
		if waiting, _ = db.Consent.WaitingIn(ctx, "!c", now.Add(25*time.Hour)); len(waiting) != 0 {
			t.Fatalf("an expired request still waits: %+v", waiting)
		}
		if n, err := db.Consent.DeleteExpired(ctx, now.Add(25*time.Hour)); err != nil || n != 1 {
			t.Fatalf("deleted %d expired, %v", n, err)
		}
		if got, _ = db.Consent.Get(ctx, stored.ID); got != nil {
			t.Fatal("the expired request is still there")
		}
		// A request deleted by reject is gone with its rooms.
		other, _, err := db.Consent.Create(ctx, &database.ConsentRequest{Kind: database.ConsentDisappear, FromRoom: "!a", LinkID: "L", DisappearAfter: time.Minute,
			RequestedBy: "@u:x", CommandEvent: "$cmd2", CreatedAt: now, ExpiresAt: now.Add(time.Hour), Rooms: []database.ConsentRoom{{RoomID: "!b"}}})
		if err != nil || other.DisappearAfter != time.Minute {
			t.Fatalf("create disappear = %+v, %v", other, err)
		}
		if ok, err := db.Consent.Delete(ctx, other.ID); err != nil || !ok {
			t.Fatalf("delete = %t, %v", ok, err)
		}
		if ok, _ := db.Consent.Delete(ctx, other.ID); ok {
			t.Fatal("deleted twice")
		}
	})
}

// TestPendingLinkRequestsSurviveTheUpgrade: a link request stored before consent requests existed (schema v3)
// becomes a consent request waiting in its room, with the requesting room consented by the requester.
func TestPendingLinkRequestsSurviveTheUpgrade(t *testing.T) {
	for _, dialect := range dbtest.Dialects {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			root := dbtest.Open(t, dialect)
			v3 := root.Child(database.VersionTable, database.UpgradeTable[:3], dbutil.NoopLogger)
			if err := v3.Upgrade(ctx); err != nil {
				t.Fatal(err)
			}
			created := time.Now().Add(-time.Hour).UnixMilli()
			if _, err := v3.Exec(ctx, `INSERT INTO link_request (room_id, from_room, requested_by, created_at) VALUES ('!b', '!a', '@u:x', $1)`, created); err != nil {
				t.Fatal(err)
			}
			db := database.New(root, dbutil.NoopLogger)
			if err := db.Upgrade(ctx); err != nil {
				t.Fatal(err)
			}
			waiting, err := db.Consent.WaitingIn(ctx, "!b", time.Now())
			if err != nil || len(waiting) != 1 {
				t.Fatalf("waiting = %+v, %v", waiting, err)
			}
			req := waiting[0]
			want := []database.ConsentRoom{{RoomID: "!a", ConsentedBy: "@u:x"}, {RoomID: "!b"}}
			if req.Kind != database.ConsentLink || req.FromRoom != "!a" || req.TargetRoom != "!b" || req.RequestedBy != "@u:x" ||
				req.ExpiresAt.UnixMilli() != created+24*time.Hour.Milliseconds() || len(req.Rooms) != 2 || req.Rooms[0] != want[0] || req.Rooms[1] != want[1] || req.ID == "" {
				t.Fatalf("migrated request = %+v", req)
			}
		})
	}
}
