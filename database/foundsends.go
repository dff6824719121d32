package database

import (
	"context"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"
)

// FoundSendQuery keeps the unanswered sends read-backs found until ferry recorded them (see
// upgrades/10-found-sends.sql).
type FoundSendQuery struct {
	db *dbutil.Database
}

// FoundSend is one send a read-back found: ferry sent TxnID into RoomID, and the homeserver posted EventID.
type FoundSend struct {
	RoomID  id.RoomID
	TxnID   string
	EventID id.EventID
	FoundAt time.Time
}

// SQL on found_sends.
const (
	putFoundSendQuery = `INSERT INTO found_sends (room_id, txn_id, event_id, found_at) VALUES ($1, $2, $3, $4)
		ON CONFLICT (room_id, txn_id) DO NOTHING`
	foundSendsSinceQuery = `SELECT room_id, txn_id, event_id, found_at FROM found_sends WHERE found_at >= $1`
	pruneFoundSendsQuery = `DELETE FROM found_sends WHERE found_at < $1`
)

// Put records a found send; a send found before keeps its first record.
func (fq *FoundSendQuery) Put(ctx context.Context, f FoundSend) error {
	_, err := fq.db.Exec(ctx, putFoundSendQuery, f.RoomID, f.TxnID, f.EventID, f.FoundAt.UnixMilli())
	return err
}

// Since returns the sends found at or after since.
func (fq *FoundSendQuery) Since(ctx context.Context, since time.Time) ([]FoundSend, error) {
	rows, err := fq.db.Query(ctx, foundSendsSinceQuery, since.UnixMilli())
	return dbutil.NewRowIterWithError(rows, func(row dbutil.Scannable) (f FoundSend, err error) {
		var at int64
		err = row.Scan(&f.RoomID, &f.TxnID, &f.EventID, &at)
		f.FoundAt = time.UnixMilli(at)
		return
	}, err).AsList()
}

// Prune drops the sends found before before.
func (fq *FoundSendQuery) Prune(ctx context.Context, before time.Time) error {
	_, err := fq.db.Exec(ctx, pruneFoundSendsQuery, before.UnixMilli())
	return err
}
