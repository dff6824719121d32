package database_test

import (
	"context"
	"testing"
	"time"

	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
)

func TestCalls(t *testing.T) {
	forEachDialect(t, func(t *testing.T, db *database.Database) {
		ctx := context.Background()
		now := time.Now()
		call := &database.Call{
			Key: "k1", LinkID: "L", OriginRoom: "!a", OriginCallID: "c1", Caller: "@alice:x", CallerParty: "PA", Invitee: "@bob:x",
			State: database.CallRinging, ExpiresAt: now.Add(time.Minute), CreatedAt: now, UpdatedAt: now,
			Rooms: map[id.RoomID]string{"!a": "c1", "!b": "c1-b"},
		}
		if err := db.Calls.Insert(ctx, call); err != nil {
			t.Fatal(err)
		}
		// Both directions resolve to the same call.
		for room, callID := range map[id.RoomID]string{"!a": "c1", "!b": "c1-b"} {
			got, err := db.Calls.ByRoomCallID(ctx, room, callID)
			if err != nil || got == nil || got.Key != "k1" || got.Invitee != "@bob:x" || got.Rooms["!a"] != "c1" || got.Rooms["!b"] != "c1-b" {
				t.Fatalf("ByRoomCallID(%s, %s) = %+v, %v", room, callID, got, err)
			}
		}
		if got, err := db.Calls.ByRoomCallID(ctx, "!b", "c1"); err != nil || got != nil {
			t.Fatalf("the original ID must not resolve in the copy room: %+v, %v", got, err)
		}
		// A second call may not take a (room, call_id) pair already used, and the failed insert leaves nothing.
		dup := *call
		dup.Key = "k2"
		dup.Rooms = map[id.RoomID]string{"!c": "c9", "!a": "c1"}
		if err := db.Calls.Insert(ctx, &dup); err == nil {
			t.Fatal("a duplicate (room, call_id) was accepted")
		}
		if got, _ := db.Calls.ByRoomCallID(ctx, "!c", "c9"); got != nil {
			t.Fatal("a failed insert left a row behind")
		}
		// The first answer is recorded; a second device's answer changes nothing.
		if err := db.Calls.Answered(ctx, "k1", "@bob:x", "PB"); err != nil {
			t.Fatal(err)
		}
		if err := db.Calls.Answered(ctx, "k1", "@bob:x", "PB2"); err != nil {
			t.Fatal(err)
		}
		live, err := db.Calls.Live(ctx, "L")
		if err != nil || len(live) != 1 || live[0].State != database.CallAnswered || live[0].Callee != "@bob:x" || live[0].CalleeParty != "PB" {
			t.Fatalf("Live = %+v, %v", live, err)
		}
		if err = db.Calls.SetState(ctx, "k1", database.CallEnded); err != nil {
			t.Fatal(err)
		}
		if live, err = db.Calls.Live(ctx, "L"); err != nil || len(live) != 0 {
			t.Fatalf("an ended call is still live: %+v, %v", live, err)
		}
		if got, _ := db.Calls.ByRoomCallID(ctx, "!b", "c1-b"); got == nil || got.State != database.CallEnded {
			t.Fatalf("an ended call is still resolvable, as ended: %+v", got)
		}
	})
}

// TestCallsForgottenAfterADay: recording a new call forgets calls that have not changed for a day (with their
// room mappings, so their call IDs may be used again), and keeps younger ones, whatever their state.
func TestCallsForgottenAfterADay(t *testing.T) {
	forEachDialect(t, func(t *testing.T, db *database.Database) {
		ctx := context.Background()
		now := time.Now()
		mk := func(key, callID string, updated time.Time) *database.Call {
			return &database.Call{
				Key: key, LinkID: "L", OriginRoom: "!a", OriginCallID: callID, Caller: "@alice:x", CallerParty: "PA",
				State: database.CallAnswered, ExpiresAt: updated.Add(time.Minute), CreatedAt: updated, UpdatedAt: updated,
				Rooms: map[id.RoomID]string{"!a": callID, "!b": callID + "-b"},
			}
		}
		for _, c := range []*database.Call{mk("old", "c-old", now.Add(-25*time.Hour)), mk("young", "c-young", now.Add(-23*time.Hour))} {
			if err := db.Calls.Insert(ctx, c); err != nil {
				t.Fatal(err)
			}
		}
		if err := db.Calls.Insert(ctx, mk("new", "c-new", now)); err != nil {
			t.Fatal(err)
		}
		if got, err := db.Calls.ByRoomCallID(ctx, "!b", "c-old-b"); err != nil || got != nil {
			t.Fatalf("a call untouched for 25 hours is still there: %+v, %v", got, err)
		}
		if got, err := db.Calls.ByRoomCallID(ctx, "!b", "c-young-b"); err != nil || got == nil || got.Key != "young" {
			t.Fatalf("a call untouched for 23 hours was forgotten: %+v, %v", got, err)
		}
		live, err := db.Calls.Live(ctx, "L")
		if err != nil || len(live) != 2 {
			t.Fatalf("Live = %+v, %v; want the young and the new call", live, err)
		}
		// The forgotten call's IDs are free again.
		if err = db.Calls.Insert(ctx, mk("reuse", "c-old", now)); err != nil {
			t.Fatalf("the call ID of a forgotten call cannot be used again: %v", err)
		}
	})
}
