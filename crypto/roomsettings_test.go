package crypto

import (
	"context"
	"reflect"
	"slices"
	"strings"
	"testing"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
	"maunium.net/go/mautrix/sqlstatestore"

	"go.ferry.im/ferry/database/dbtest"
)

// TestRoomSessionSettingsAsStateStore: a new session's settings (the room's m.room.encryption rotation and its
// history visibility) are read in one statement, and are what the state store's own two reads return, for rooms
// holding either, both, or neither.
func TestRoomSessionSettingsAsStateStore(t *testing.T) {
	for _, dialect := range dbtest.Dialects {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			db, ss := openStateStore(t, dialect)
			enc := &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1, RotationPeriodMillis: 3600000, RotationPeriodMessages: 25}
			rooms := map[string]func(id.RoomID) error{
				"nothing stored": func(id.RoomID) error { return nil },
				"other state only": func(r id.RoomID) error {
					return ss.SetPowerLevels(ctx, r, &event.PowerLevelsEventContent{UsersDefault: 0})
				},
				"encryption only": func(r id.RoomID) error { return ss.SetEncryptionEvent(ctx, r, enc) },
				"history visibility only": func(r id.RoomID) error {
					return ss.SetHistoryVisibility(ctx, r, &event.HistoryVisibilityEventContent{HistoryVisibility: event.HistoryVisibilityShared})
				},
				"both": func(r id.RoomID) error {
					if err := ss.SetEncryptionEvent(ctx, r, &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1}); err != nil {
						return err
					}
					return ss.SetHistoryVisibility(ctx, r, &event.HistoryVisibilityEventContent{HistoryVisibility: event.HistoryVisibilityJoined})
				},
			}
			for name, set := range rooms {
				room := id.RoomID("!" + name + ":x")
				if err := set(room); err != nil {
					t.Fatal(err)
				}
				wantEnc, err := ss.GetEncryptionEvent(ctx, room)
				if err != nil {
					t.Fatal(err)
				}
				wantHV, err := ss.GetHistoryVisibility(ctx, room)
				if err != nil {
					t.Fatal(err)
				}
				counter := &statementCounter{DatabaseLogger: db.Log}
				db.Log = counter
				gotEnc, gotHV, err := roomSessionSettings(ctx, db, room)
				db.Log = counter.DatabaseLogger
				if err != nil {
					t.Fatalf("%s: %v", name, err)
				}
				if !reflect.DeepEqual(gotEnc, wantEnc) || !reflect.DeepEqual(gotHV, wantHV) {
					t.Errorf("%s: read %+v and %+v, the state store reads %+v and %+v", name, gotEnc, gotHV, wantEnc, wantHV)
				}
				if n := counter.all.Load(); n != 1 {
					t.Errorf("%s: %d statements, want 1", name, n)
				}
			}
		})
	}
}

// TestRoomShareState: the one query of a share's room (roomShareState) answers what the state store's joined or
// invited members (less ferry's own) and the room's encryption and history visibility settings answer, on both
// databases.
func TestRoomShareState(t *testing.T) {
	for _, dialect := range dbtest.Dialects {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			db, ss := openStateStore(t, dialect)
			room, other := id.RoomID("!room:x"), id.RoomID("!other:x")
			isOwn := func(u id.UserID) bool { return strings.HasPrefix(string(u), "@ghost_") }
			for u, m := range map[id.UserID]event.Membership{"@joined:x": event.MembershipJoin, "@invited:x": event.MembershipInvite,
				"@left:x": event.MembershipLeave, "@banned:x": event.MembershipBan, "@ghost_a:x": event.MembershipJoin} {
				if err := ss.SetMembership(ctx, room, u, m); err != nil {
					t.Fatal(err)
				}
			}
			if err := ss.SetMembership(ctx, other, "@elsewhere:x", event.MembershipJoin); err != nil {
				t.Fatal(err)
			}
			members, enc, hv, err := roomShareState(ctx, db, room, isOwn)
			slices.Sort(members)
			if err != nil || !slices.Equal(members, []id.UserID{"@invited:x", "@joined:x"}) || enc != nil || hv != nil {
				t.Fatalf("without settings: %v, %v, %v, %v", members, enc, hv, err)
			}
			if err = ss.SetEncryptionEvent(ctx, room, &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1, RotationPeriodMessages: 7}); err != nil {
				t.Fatal(err)
			}
			if err = ss.SetHistoryVisibility(ctx, room, &event.HistoryVisibilityEventContent{HistoryVisibility: event.HistoryVisibilityJoined}); err != nil {
				t.Fatal(err)
			}
			members, enc, hv, err = roomShareState(ctx, db, room, isOwn)
			if err != nil || len(members) != 2 || enc == nil || enc.RotationPeriodMessages != 7 || hv == nil || hv.HistoryVisibility != event.HistoryVisibilityJoined {
				t.Fatalf("with settings: %v, %+v, %+v, %v", members, enc, hv, err)
			}
			wantEnc, wantHV, err := roomSessionSettings(ctx, db, room)
			if err != nil || wantEnc.RotationPeriodMessages != enc.RotationPeriodMessages || wantHV.HistoryVisibility != hv.HistoryVisibility {
				t.Errorf("roomSessionSettings answers %+v, %+v (%v), the share's query %+v, %+v", wantEnc, wantHV, err, enc, hv)
			}
		})
	}
}

// openStateStore opens a fresh database of dialect with mautrix's state store on it.
func openStateStore(t *testing.T, dialect string) (*dbutil.Database, *sqlstatestore.SQLStateStore) {
	t.Helper()
	db := dbtest.Open(t, dialect)
	ss := sqlstatestore.NewSQLStateStore(db, dbutil.NoopLogger, false)
	if err := ss.Upgrade(context.Background()); err != nil {
		t.Fatal(err)
	}
	return db, ss
}

// openCryptoStore opens a fresh database of dialect with mautrix's crypto store of account in it.
func openCryptoStore(t *testing.T, dialect string, account string) (*dbutil.Database, *crypto.SQLCryptoStore) {
	t.Helper()
	db := dbtest.Open(t, dialect)
	store := crypto.NewSQLCryptoStore(db, dbutil.NoopLogger, account, "", []byte("pickle key"))
	if err := store.DB.Upgrade(context.Background()); err != nil {
		t.Fatal(err)
	}
	return db, store
}
