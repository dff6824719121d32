package crypto

import (
	"context"
	"reflect"
	"testing"

	"go.mau.fi/util/dbutil"
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
			db := dbtest.Open(t, dialect)
			ss := sqlstatestore.NewSQLStateStore(db, dbutil.NoopLogger, false)
			if err := ss.Upgrade(ctx); err != nil {
				t.Fatal(err)
			}
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
