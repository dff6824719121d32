package database

import (
	"context"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"
)

// ReadbackQuery keeps the rooms ferry must read back before it sends into them again (see upgrades/08-readback.sql).
type ReadbackQuery struct {
	db *dbutil.Database
}

// SQL on readback.
const (
	// A room marked again keeps the earliest since, and takes the latest marked_at.
	// A room marked from earlier than its read-back's passes read back to loses their progress.
	markReadbackQuery = `INSERT INTO readback (room_id, since, marked_at) VALUES ($1, $2, $3)
		ON CONFLICT (room_id) DO UPDATE SET marked_at=excluded.marked_at,
			since=CASE WHEN excluded.since < readback.since THEN excluded.since ELSE readback.since END,
			progress=CASE WHEN excluded.since < readback.since THEN NULL ELSE readback.progress END`
	readbackDoneQuery     = `DELETE FROM readback WHERE room_id=$1 AND since >= $2 AND marked_at < $3`
	readbackProgressQuery = `UPDATE readback SET progress=$2 WHERE room_id=$1 AND since >= $3`
	allReadbackQuery      = `SELECT room_id, since, COALESCE(progress, '') FROM readback`
)

// ReadbackMark is a room to read back: since when, and how far an earlier read-back got ("" when none did; the
// bridge's JSON).
type ReadbackMark struct {
	Since    time.Time
	Progress string
}

// Mark records at markedAt that room must be read back from since (keeping an earlier since already recorded).
func (rq *ReadbackQuery) Mark(ctx context.Context, room id.RoomID, since, markedAt time.Time) error {
	_, err := rq.db.Exec(ctx, markReadbackQuery, room, since.UnixMilli(), markedAt.UnixMilli())
	return err
}

// Done records that room was read back from since, in a read that began at began: the row goes unless an earlier
// since was marked, or the room was marked again after the read began.
func (rq *ReadbackQuery) Done(ctx context.Context, room id.RoomID, since, began time.Time) error {
	_, err := rq.db.Exec(ctx, readbackDoneQuery, room, since.UnixMilli(), began.UnixMilli())
	return err
}

// SaveProgress records how far the read-back of room from since got, unless the room was marked from earlier
// since (or was read back and its row went).
func (rq *ReadbackQuery) SaveProgress(ctx context.Context, room id.RoomID, since time.Time, progress string) error {
	_, err := rq.db.Exec(ctx, readbackProgressQuery, room, progress, since.UnixMilli())
	return err
}

// All returns every room to read back.
func (rq *ReadbackQuery) All(ctx context.Context) (map[id.RoomID]ReadbackMark, error) {
	rows, err := rq.db.Query(ctx, allReadbackQuery)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := make(map[id.RoomID]ReadbackMark)
	for rows.Next() {
		var room id.RoomID
		var since int64
		var progress string
		if err = rows.Scan(&room, &since, &progress); err != nil {
			return nil, err
		}
		out[room] = ReadbackMark{Since: time.UnixMilli(since), Progress: progress}
	}
	return out, rows.Err()
}
